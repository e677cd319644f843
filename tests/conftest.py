"""Shared fixtures. Builders of tiny GGUFs live in tests/ggufs.py."""

from __future__ import annotations

from pathlib import Path

import pytest

import ggufs


@pytest.fixture(scope="session")
def tiny_base(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A plain tiny qwen2 GGUF (3 layers, n_embd 64, Q8_0/Q4_0/F16/F32 tensors). Do not modify it."""
    return ggufs.write_base(tmp_path_factory.mktemp("tiny") / "base.gguf")


# --- the real default model (slow tests) ---------------------------------------------------

DEFAULT_PROMPT = "def fibonacci(n):\n    \"\"\"Return the n-th Fibonacci number.\"\"\"\n"
DEFAULT_CONTINUATION = "    if n < 2:\n        return n\n    return fibonacci(n - 1) + fibonacci(n - 2)\n"


def spread_routers(n_layer: int, n_embd: int, seed: int = 1):
    """Recipe routers with seeded random w2 and b2, so p_i spreads over (0, 1) and the mask
    skips some layers: exercises every code path that identity routers (p = 0.9) do not."""
    import numpy as np

    from first_gguf.format import make_identity_routers

    rs = make_identity_routers(n_layer, n_embd, seed=0, train_source=f"tests: spread routers seed {seed}")
    rng = np.random.default_rng(seed)
    for i in range(n_layer):
        rs.tensors[i]["out_weight"] = rng.normal(0.0, 0.5, size=rs.tensors[i]["out_weight"].shape).astype(np.float32)
        rs.tensors[i]["out_bias"] = np.array([rng.normal(0.3, 1.0)], dtype=np.float32)
    return rs


@pytest.fixture(scope="session")
def default_base() -> Path:
    from first_gguf import models

    return models.fetch(models.DEFAULT_MODEL)


@pytest.fixture(scope="session")
def default_first(default_base: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The default model with spread routers (a ~500 MB FiRST-GGUF in a temporary directory)."""
    from first_gguf.format import attach_routers, inspect_gguf

    info = inspect_gguf(default_base)
    out = tmp_path_factory.mktemp("default") / "default.first.gguf"
    return attach_routers(default_base, spread_routers(info["n_layer"], info["n_embd"]), out)


@pytest.fixture(scope="session")
def default_tokens(default_base: Path) -> tuple[list[int], list[int]]:
    from llama_cpp import Llama

    vocab = Llama(str(default_base), vocab_only=True, verbose=False)
    prompt = vocab.tokenize(DEFAULT_PROMPT.encode(), add_bos=True)
    cont = vocab.tokenize(DEFAULT_CONTINUATION.encode(), add_bos=False, special=False)
    return prompt, cont


@pytest.fixture(scope="session")
def stock_lib() -> Path:
    from first_gguf import build

    return build.ensure_stock_library()


@pytest.fixture(scope="module")
def torch_one_thread():
    """Tiny models run several times faster on one thread on a shared machine (no OpenMP waits).
    Modules that train or run tiny PyTorch models use it: ``pytestmark = pytest.mark.usefixtures(...)``."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)

"""The README's main job on a zoo model: fetch it, attach routers, inspect, generate.

The routers are the ones committed with the package for that model
(``first_gguf/data/<model>.routers.safetensors``) when they exist, else the deterministic
untrained recipe of ``make_identity_routers`` (seed 0), which keeps every layer. The demo
generates with the FiRST-GGUF in ``first`` mode on the patched library, reports which layers
the routers skipped, and compares with the base GGUF on the same library.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import numpy as np

from . import format as fmt
from . import models
from .errors import FirstError
from .paths import cache_dir


def _log(msg: str) -> None:
    print(f"[first-gguf demo] {msg}", file=sys.stderr, flush=True)


def demo_first_gguf(model: str, seed: int = 0) -> Path:
    """The zoo model with its committed routers (else the recipe's) as a FiRST-GGUF in the cache (rebuilt if stale)."""
    base = models.fetch(model)
    routers, shipped = shipped_routers(model), shipped_routers_path(model)
    if routers is None:
        info = fmt.inspect_gguf(base)
        routers = fmt.make_identity_routers(info["n_layer"], info["n_embd"], seed=seed)
    w1 = fmt.stored_w1_dtype(shipped) if shipped else "f32"  # a W1 shipped as F16 stays F16 in the GGUF
    out_dir = cache_dir() / "demo"
    out_dir.mkdir(parents=True, exist_ok=True)
    router_file = fmt.save_router_file(routers, out_dir / f"{model}.routers.safetensors", force=True, w1_dtype=w1)
    out = out_dir / f"{model}.first.gguf"
    if (out.is_file() and out.stat().st_mtime >= base.stat().st_mtime and _same_routers(out, routers)
            and _w1_dtype(out) == w1):
        _log(f"reusing {out}")
        return out
    _log(f"attaching {router_file.name} to {base.name}")
    return fmt.attach_routers(base, router_file, out, force=True, w1_dtype=w1)


def _w1_dtype(path: Path) -> str:
    """"f16" or "f32": how a FiRST-GGUF stores its routers' W1."""
    import gguf

    from .constants import ROUTER_F16_ROLES, router_tensor_name

    name = router_tensor_name(ROUTER_F16_ROLES[0], 0)
    kind = next((t.tensor_type for t in gguf.GGUFReader(path).tensors if t.name == name), None)
    return "f16" if kind == gguf.GGMLQuantizationType.F16 else "f32"


def shipped_routers_path(model: str) -> Path | None:
    """The file of the trained routers committed with the package for ``model``, if any."""
    path = Path(__file__).parent / "data" / f"{model}.routers.safetensors"
    return path if path.is_file() else None


def shipped_routers(model: str) -> fmt.RouterSet | None:
    """Trained routers committed with the package for ``model``, if any."""
    path = shipped_routers_path(model)
    return fmt.load_router_file(path) if path else None


def _same_routers(path: Path, routers: fmt.RouterSet) -> bool:
    try:
        have = fmt.validate_first_gguf(path)
    except FirstError:
        return False
    return have.metadata() == routers.metadata() and all(
        np.array_equal(have.tensors[i][role], arr)
        for i, layer in routers.tensors.items() for role, arr in layer.items())


def generate(path: Path, prompt: str, max_tokens: int, threads: int | None, mode: str | None = None):
    """Greedy completion on the patched library; returns (text, decode tok/s, prefill report)."""
    from .runtime import FirstModel

    llm = FirstModel(path, mode=mode, n_ctx=512, n_threads=threads)
    t0 = time.perf_counter()
    out = llm.create_completion(prompt, max_tokens=max_tokens, temperature=0.0)
    dt = time.perf_counter() - t0
    return out["choices"][0]["text"], out["usage"]["completion_tokens"] / dt, llm.last_prefill


def run_demo(model: str | None = None, prompt: str = "def fibonacci(n):", max_tokens: int = 32,
             threads: int | None = None) -> dict:
    """Fetch, attach, inspect and generate; prints the report to stdout.

    Returns:
        The completions of the FiRST-GGUF (``first`` mode) and of its base model.
    """
    from .runtime import runtime_info

    model = model or models.DEFAULT_MODEL
    path = demo_first_gguf(model)
    print(fmt.format_inspect(fmt.inspect_gguf(path)))
    rt = runtime_info()
    print(f"\nruntime: {rt['library']} (format v{rt['format_version']}, build {rt['build_key']})")
    text, speed, rep = generate(path, prompt, max_tokens, threads)
    base_text, base_speed, _ = generate(models.fetch(model), prompt, max_tokens, threads)
    print(f"\nprompt: {prompt!r}")
    print(f"routers: p = {[round(p, 2) for p in rep.probs]}, threshold {rep.threshold}")
    print(f"FiRST-GGUF, first mode ({speed:.1f} tok/s, skipped layers {list(rep.skipped) or 'none'}):")
    print(prompt + text)
    if text == base_text:
        print(f"\nbase GGUF ({base_speed:.1f} tok/s): output identical to the FiRST-GGUF's")
    else:
        print(f"\nbase GGUF ({base_speed:.1f} tok/s), a different output:\n{prompt}{base_text}")
    if not rep.skipped and text != base_text:
        raise FirstError(f"{path.name}: no layer skipped, yet the output differs from the base model's: {base_text!r}")
    return {"text": text, "tok_s": speed, "skipped": rep.skipped, "base_text": base_text, "base_tok_s": base_speed}

"""The README's main job on a zoo model: fetch it, attach routers, inspect, generate.

The FiRST-GGUF is ``shipped.first_gguf_path``'s: the routers (and named operating points)
committed with the package for that model when they exist, else the untrained recipe, which
keeps every layer. The demo generates with the FiRST-GGUF on the patched library as
``FirstModel`` runs it by default (its default point, else ``first`` mode) or under a named
point, reports which layers decode skipped, and compares with the base GGUF on the same library.
"""

from __future__ import annotations

from pathlib import Path

from . import format as fmt
from . import models, shipped
from .errors import FirstError


def generate(path: Path, prompt: str, max_tokens: int, threads: int | None, mode: str | None = None,
             point: str | None = None):
    """Greedy completion on the patched library; returns (text, tok/s over prefill and decode, prefill report)."""
    from .runtime import FirstModel
    from .runtime.greedy import greedy

    llm = FirstModel(path, mode=mode, point=point, n_ctx=512, n_threads=threads)
    g = greedy(llm, llm.tokenize(prompt.encode(), add_bos=True, special=True), max_tokens)
    return g.text, len(g.tokens) / (g.t_prefill + g.t_decode), g.report


def run_demo(model: str | None = None, prompt: str = "def fibonacci(n):", max_tokens: int = 32,
             threads: int | None = None, point: str | None = None) -> dict:
    """Fetch, attach, inspect and generate; prints the report to stdout.

    Args:
        point: a named operating point of the FiRST-GGUF (default: the file's default point,
            else ``first`` mode).

    Returns:
        The completions of the FiRST-GGUF and of its base model, and the point it ran under.
    """
    from .runtime import runtime_info

    model = model or models.DEFAULT_MODEL
    path = shipped.first_gguf_path(model)
    points = fmt.read_points(path)
    if point is not None and points.get(point) is None:  # before the long part, as FirstModel would say it
        raise FirstError(f"{path}: no operating point {point!r}; it has {', '.join(points.names) or 'no named points'}")
    print(fmt.format_inspect(fmt.inspect_gguf(path)))
    rt = runtime_info()
    print(f"\nruntime: {rt['library']} (format v{rt['format_version']}, build {rt['build_key']})")
    text, speed, rep = generate(path, prompt, max_tokens, threads, point=point)
    base_text, base_speed, _ = generate(models.fetch(model), prompt, max_tokens, threads)
    print(f"\nprompt: {prompt!r}")
    if rep.probs is not None:
        print(f"routers: p = {[round(p, 2) for p in rep.probs]}, threshold {rep.threshold}")
    how = f"point {rep.point} ({rep.mode} mode)" if rep.point else f"{rep.mode} mode"
    print(f"FiRST-GGUF, {how} ({speed:.1f} tok/s, skipped layers {list(rep.skipped) or 'none'}):")
    print(prompt + text)
    if text == base_text:
        print(f"\nbase GGUF ({base_speed:.1f} tok/s): output identical to the FiRST-GGUF's")
    else:
        print(f"\nbase GGUF ({base_speed:.1f} tok/s), a different output:\n{prompt}{base_text}")
    if not rep.skipped and text != base_text:
        raise FirstError(f"{path.name}: no layer skipped, yet the output differs from the base model's: {base_text!r}")
    return {"text": text, "tok_s": speed, "skipped": rep.skipped, "point": rep.point, "base_text": base_text,
            "base_tok_s": base_speed}

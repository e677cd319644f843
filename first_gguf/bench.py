"""Side-by-side speed of the FiRST strategies, interleaved in one run.

Every measurement runs in a fresh worker process (``python -m first_gguf.bench --worker``)
so the stock library (``LLAMA_CPP_LIB_PATH``) and the patched one never share a process;
the strategies alternate within each repeat, so machine noise hits them alike. Reported
per strategy: median decode and prefill tok/s with their spread, and the median of the
per-repeat ratios to ``full`` (paired, docs/FORMAT.md section 4).
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from .errors import FirstError
from .log import logger

WARMUP_DECODE = 4
DEFAULT_PROMPT = "def quicksort(items):\n    \"\"\"Sort a list of numbers.\"\"\"\n"


_log = logger("bench")


def middle_layers(n_layer: int, k: int) -> list[int]:
    """``k`` consecutive layers centred in the model (never the first or the last)."""
    if not 0 < k <= n_layer - 2:
        raise FirstError(f"skip count {k} must lie in 1..{n_layer - 2}")
    start = max(1, (n_layer - k) // 2)
    return list(range(start, start + k))


def worker(spec: dict) -> dict:
    """One timed run: prefill ``prompt_tokens`` tokens, then decode ``decode_tokens`` greedily."""
    from .runtime.greedy import PlainModel, greedy

    kw = dict(n_ctx=spec["prompt_tokens"] + spec["decode_tokens"] + 16, n_threads=spec["threads"],
              n_batch=max(512, spec["prompt_tokens"]), n_ubatch=512, verbose=False)
    if spec["engine"] == "first":
        from .runtime import FirstModel

        llm = FirstModel(spec["path"], mode=spec["mode"], mask=spec.get("mask"), heal=spec.get("heal"), **kw)
    else:
        llm = PlainModel(spec["path"], **kw)
    prompt = _prompt_tokens(llm, spec["prompt_tokens"])
    # warm-up: pages the weights in and builds the graphs; then a fixed count of decode steps
    greedy(llm, prompt, WARMUP_DECODE + 1, eog=False)
    g = greedy(llm, prompt, spec["decode_tokens"] + 1, eog=False)
    skipped = g.skipped if spec["engine"] == "first" else spec.get("pruned", [])
    return {"prefill_tok_s": len(prompt) / g.t_prefill, "decode_tok_s": g.n_decode / g.t_decode,
            "skipped_layers": skipped}


def _prompt_tokens(llm, n: int) -> list[int]:
    toks = llm.tokenize(DEFAULT_PROMPT.encode(), add_bos=True)
    body = llm.tokenize(b"    # keep the list sorted and stable while we go\n", add_bos=False)
    while len(toks) < n:
        toks += body
    return toks[:n]


def _run_worker(spec: dict, lib_path: Path | None) -> dict:
    env = {k: v for k, v in os.environ.items() if k != "LLAMA_CPP_LIB_PATH"}
    if lib_path:
        env["LLAMA_CPP_LIB_PATH"] = str(lib_path)
    proc = subprocess.run([sys.executable, "-m", "first_gguf.bench", "--worker", json.dumps(spec)],
                          env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"bench worker {spec['name']} failed:\n{proc.stderr[-2000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def run_bench(model: Path, skip_count: int = 6, repeats: int = 5, prompt_tokens: int = 128,
              decode_tokens: int = 64, threads: int | None = None, stock: bool = True,
              strategies: list[str] | None = None, heal: Path | None = None) -> dict:
    """Measure full, first, mask, pruned (and stock) side by side; with ``heal`` (a healing
    adapter) also its skip set unhealed (``heal_mask``) and healed (``healed``).

    Returns:
        ``{"model", "setup", "strategies": {name: {decode_tok_s, prefill_tok_s, skipped_layers,
        decode_ratio, prefill_ratio, ...}}}``.
    """
    from . import build
    from .format import inspect_gguf, prune_gguf

    info = inspect_gguf(model)
    n_layer, threads = info["n_layer"], threads or os.cpu_count() or 1
    skip = middle_layers(n_layer, skip_count)
    base = dict(prompt_tokens=prompt_tokens, decode_tokens=decode_tokens, threads=threads)
    specs = [dict(base, name="full", engine="first", path=str(model), mode="full")]
    if info["first"]:
        specs.append(dict(base, name="first", engine="first", path=str(model), mode="first"))
    specs.append(dict(base, name="mask", engine="first", path=str(model), mode="mask",
                      mask=[i not in skip for i in range(n_layer)]))
    if heal is not None:
        from .format import read_heal

        heal_mask = [i not in read_heal(heal).skip for i in range(n_layer)]
        specs.append(dict(base, name="heal_mask", engine="first", path=str(model), mode="mask", mask=heal_mask))
        specs.append(dict(base, name="healed", engine="first", path=str(model), mode="mask", mask=heal_mask,
                          heal=str(heal)))
    with tempfile.TemporaryDirectory(dir=model.parent) as tmp:
        pruned = prune_gguf(model, skip, Path(tmp) / "pruned.gguf")
        stock = stock and (not strategies or bool({"pruned", "stock", "patched_plain"} & set(strategies)))
        stock_lib = build.ensure_stock_library() if stock else None
        specs.append(dict(base, name="pruned", engine="plain", path=str(pruned), pruned=skip,
                          lib="stock" if stock else None))
        if stock:
            # the pruned file on the patched library too: separates our graph from the build
            specs.append(dict(base, name="pruned_patched", engine="plain", path=str(pruned), pruned=skip))
            specs.append(dict(base, name="stock", engine="plain", path=str(model) if not info["first"]
                              else str(_plain_copy(model, Path(tmp))), lib="stock"))
            specs.append(dict(base, name="patched_plain", engine="plain", path=specs[-1]["path"]))
        if strategies:
            unknown = set(strategies) - {s["name"] for s in specs}
            if unknown:
                raise FirstError(f"unknown or unavailable strategies {sorted(unknown)}; "
                                 f"choose from {[s['name'] for s in specs]}")
            specs = [s for s in specs if s["name"] == "full" or s["name"] in strategies]
        runs: dict[str, list[dict]] = {s["name"]: [] for s in specs}
        for r in range(repeats):
            for spec in specs[r % len(specs):] + specs[:r % len(specs)]:  # rotate: no strategy always runs first
                lib = stock_lib if spec.get("lib") == "stock" else None
                runs[spec["name"]].append(_run_worker(spec, lib))
            _log(f"repeat {r + 1}/{repeats}: " + ", ".join(
                f"{k} {v[-1]['decode_tok_s']:.1f}" for k, v in runs.items()) + " decode tok/s")
    return {"model": str(model), "setup": dict(base, repeats=repeats, skip_count=skip_count, n_layer=n_layer,
                                               machine=_machine(), date=time.strftime("%Y-%m-%d %H:%M")),
            "strategies": {k: _summary(v, runs["full"]) for k, v in runs.items()}}


def _plain_copy(model: Path, tmp: Path) -> Path:
    # the stock library cannot load router tensors: strip them (a zero-layer prune)
    from .format import prune_gguf

    return prune_gguf(model, [], tmp / "plain.gguf")


def _summary(runs: list[dict], full: list[dict]) -> dict:
    out = {"skipped_layers": runs[0]["skipped_layers"]}
    for key in ("decode_tok_s", "prefill_tok_s"):
        vals = [r[key] for r in runs]
        ratios = [r[key] / f[key] for r, f in zip(runs, full)]
        out[key] = statistics.median(vals)
        out[key.replace("tok_s", "spread")] = [min(vals), max(vals)]
        out[key.replace("tok_s", "ratio")] = statistics.median(ratios)
        out[key.replace("tok_s", "ratio_spread")] = [min(ratios), max(ratios)]
    return out


def _machine() -> str:
    import platform

    return f"{platform.machine()}, {os.cpu_count()} cores, {platform.system()}"


def format_bench(result: dict) -> str:
    """A table: one row per strategy."""
    s = result["setup"]
    lines = [f"{result['model']}: {s['n_layer']} layers, prompt {s['prompt_tokens']}, decode {s['decode_tokens']}, "
             f"{s['threads']} threads, {s['repeats']} interleaved repeats ({s['machine']}, {s['date']})",
             f"{'strategy':<14}{'decode tok/s':>14}{'x full':>8}{'ratio spread':>16}{'prefill tok/s':>15}"
             f"{'x full':>8}  skipped"]
    for name, r in result["strategies"].items():
        lo, hi = r["decode_ratio_spread"]
        lines.append(f"{name:<14}{r['decode_tok_s']:>14.1f}{r['decode_ratio']:>8.3f}{f'{lo:.2f}-{hi:.2f}':>16}"
                     f"{r['prefill_tok_s']:>15.1f}{r['prefill_ratio']:>8.3f}  {r['skipped_layers']}")
    return "\n".join(lines)


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "--worker":
        print(json.dumps(worker(json.loads(sys.argv[2]))))

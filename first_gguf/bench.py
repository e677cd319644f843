"""Side-by-side speed of the FiRST strategies, interleaved in one run.

Every measurement runs in a fresh worker process (``python -m first_gguf.bench --worker``)
so the stock library (``LLAMA_CPP_LIB_PATH``) and the patched one never share a process;
the strategies alternate within each repeat, so machine noise hits them alike. A run
covers every cell (context length x thread count). Reported per cell and strategy: median
decode and prefill tok/s with their spread, the median of the per-repeat ratios to ``full``
(paired, docs/FORMAT.md section 4) and the worker's peak resident set; every repeat's
figures stay in the result.
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
from typing import Sequence

import numpy as np

from .bench_files import fresh_copy, load_prompt_state, page_run, save_prompt_state
from .errors import FirstError
from .log import logger

WARMUP_DECODE = 4
WARMUP_PROMPT = 512  # the warm-up prompt's cap: one full ubatch builds and touches the largest graph
DEFAULT_PROMPT = "def quicksort(items):\n    \"\"\"Sort a list of numbers.\"\"\"\n"


_log = logger("bench")


def middle_layers(n_layer: int, k: int) -> list[int]:
    """``k`` consecutive layers centred in the model (never the first or the last)."""
    if not 0 < k <= n_layer - 2:
        raise FirstError(f"skip count {k} must lie in 1..{n_layer - 2}")
    start = max(1, (n_layer - k) // 2)
    return list(range(start, start + k))


def _open(spec: dict):
    """The worker's model, configured as ``spec`` says, and its prompt's tokens."""
    from .runtime.greedy import PlainModel

    # the prompt runs on the same threads (llama-cpp-python's default there is every core)
    kw = dict(n_ctx=spec["prompt_tokens"] + spec["decode_tokens"] + 16, n_threads=spec["threads"],
              n_threads_batch=spec["threads"], n_batch=max(512, spec["prompt_tokens"]), n_ubatch=512,
              use_mmap=spec.get("mmap", True), verbose=False)
    if spec["engine"] == "first":
        from .runtime import FirstModel

        llm = FirstModel(spec["path"], mode=spec["mode"], mask=spec.get("mask"), heal=spec.get("heal"),
                         thin=spec.get("thin"), vocab=spec.get("vocab"), **kw)
    else:
        llm = PlainModel(spec["path"], **kw)
    return llm, _prompt_tokens(llm, spec["prompt_tokens"])


def _skipped(spec: dict, report) -> list[int]:
    return list(report.skipped) if spec["engine"] == "first" else spec.get("pruned", [])


def worker(spec: dict) -> dict:
    """One timed run: prefill ``prompt_tokens`` tokens, then decode ``decode_tokens`` greedily."""
    from .runtime.greedy import decode, greedy

    llm, prompt = _open(spec)
    state = spec.get("state")
    if state and spec.get("save_state"):  # the one prefill whose KV every timed repeat restores
        greedy(llm, prompt[:WARMUP_PROMPT], WARMUP_DECODE + 1, eog=False)
        g = greedy(llm, prompt, 1, eog=False)
        save_prompt_state(llm, Path(state), prompt)
        return {"prefill_tok_s": len(prompt) / g.t_prefill, "peak_rss_mb": peak_rss_mb()}
    if state:
        for n_new in (WARMUP_DECODE + 1, spec["decode_tokens"] + 1):  # warm-up, then the timed run
            load_prompt_state(llm, Path(state), prompt)
            report = llm.extend(prompt[-1:])
            tokens, _, n_decode, t_decode = decode(llm, n_new, eog=False)
        prefill = None
    else:
        # warm-up: pages the weights in and builds the graphs; then a fixed count of decode steps
        greedy(llm, prompt[:WARMUP_PROMPT], WARMUP_DECODE + 1, eog=False)
        g = greedy(llm, prompt, spec["decode_tokens"] + 1, eog=False)
        report, tokens, n_decode, t_decode = g.report, g.tokens, g.n_decode, g.t_decode
        prefill = len(prompt) / g.t_prefill
    return {"prefill_tok_s": prefill, "decode_tok_s": n_decode / t_decode, "peak_rss_mb": peak_rss_mb(),
            "skipped_layers": _skipped(spec, report), "tokens": tokens}


def live_worker(spec: dict, commands=None, answer=None) -> None:
    """A worker that stays loaded for its cell (``run_bench(live=True)``): the prompt once (or its
    restored KV cache), one untimed decode of ``decode_tokens`` greedy steps, then per line read
    from ``commands`` (stdin) the same steps again from the same cache position, timed.

    Each answer is one JSON line on ``answer`` (stdout): first ``{"prefill_tok_s", "skipped_layers"}``;
    ``decode`` -> ``{"decode_tok_s"}``; ``stop`` -> ``{"peak_rss_mb", "tokens"}``, then it returns.
    Every timed decode evaluates the tokens the untimed one chose (the argmax still taken per step),
    so each repeat computes the same positions and tokens."""
    from .runtime.greedy import decode, greedy

    commands, answer = commands or sys.stdin, answer or sys.stdout

    def say(obj: dict) -> None:
        answer.write(json.dumps(obj) + "\n")
        answer.flush()

    llm, prompt = _open(spec)
    if spec.get("state"):
        load_prompt_state(llm, Path(spec["state"]), prompt)
        report, prefill = llm.extend(prompt[-1:]), None
    else:
        greedy(llm, prompt[:WARMUP_PROMPT], WARMUP_DECODE + 1, eog=False)  # pages the weights in, builds the graphs
        t0 = time.perf_counter()
        report = llm.prefill(prompt)
        prefill = len(prompt) / (time.perf_counter() - t0)
    start = llm.n_tokens
    tokens = decode(llm, spec["decode_tokens"] + 1, eog=False)[0]
    say({"prefill_tok_s": prefill, "skipped_layers": _skipped(spec, report)})
    for line in commands:
        op = line.strip()
        if op == "stop":
            break
        if op != "decode":
            raise FirstError(f"bench worker: unknown command {op!r}")
        llm.n_tokens = start  # back to the prompt's end: the next evaluation drops the cache beyond it
        t0 = time.perf_counter()
        for tok in tokens[:-1]:
            llm.eval([tok])
            int(np.argmax(llm.last_logits(copy=False)))
        say({"decode_tok_s": (len(tokens) - 1) / (time.perf_counter() - t0)})
    say({"peak_rss_mb": peak_rss_mb(), "tokens": tokens})


def peak_rss_mb() -> float:
    """Peak resident set of this process in MiB: Linux's ``VmHWM`` (of this program image only;
    ``ru_maxrss`` would carry the parent's peak across fork and exec), else ``ru_maxrss``."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 2**10  # kB
    except OSError:
        pass
    import resource  # POSIX only

    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / (2**20 if sys.platform == "darwin" else 2**10)  # bytes on macOS, KiB elsewhere


def _prompt_tokens(llm, n: int) -> list[int]:
    toks = llm.tokenize(DEFAULT_PROMPT.encode(), add_bos=True)
    body = llm.tokenize(b"    # keep the list sorted and stable while we go\n", add_bos=False)
    while len(toks) < n:
        toks += body
    return toks[:n]


def _worker_env(spec: dict, stock_lib: Path | None) -> dict:
    env = {k: v for k, v in os.environ.items() if k != "LLAMA_CPP_LIB_PATH"}
    if spec.get("lib") == "stock":
        env["LLAMA_CPP_LIB_PATH"] = str(stock_lib)
    return env


def _run_worker(spec: dict, stock_lib: Path | None) -> dict:
    """``worker(spec)`` in a fresh process, on the stock library when the spec names it."""
    proc = subprocess.run([sys.executable, "-m", "first_gguf.bench", "--worker", json.dumps(spec)],
                          env=_worker_env(spec, stock_lib), capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"bench worker {spec['name']} failed:\n{proc.stderr[-2000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


class _Live:
    """``live_worker(spec)`` in its own process, asked for one timed decode at a time."""

    def __init__(self, spec: dict, stock_lib: Path | None, tmp: Path):
        self.name = spec["name"]
        self._err = open(tmp / f"{self.name}.live.log", "w+")
        self._proc = subprocess.Popen([sys.executable, "-m", "first_gguf.bench", "--live-worker", json.dumps(spec)],
                                      env=_worker_env(spec, stock_lib), stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                      stderr=self._err, text=True)
        self.ready = self._read()

    def _read(self) -> dict:
        for line in self._proc.stdout:
            if line.startswith("{"):
                return json.loads(line)
        self._proc.wait()
        self._err.seek(0)
        raise RuntimeError(f"bench worker {self.name} failed:\n{self._err.read()[-2000:]}")

    def ask(self, op: str) -> dict:
        try:
            self._proc.stdin.write(op + "\n")
            self._proc.stdin.flush()
        except BrokenPipeError:  # the worker is gone: _read reports why
            pass
        return self._read()

    def close(self) -> None:
        if self._proc.poll() is None:
            self._proc.kill()
        self._proc.wait()
        self._err.close()


def _live_cell(specs: list[dict], stock_lib: Path | None, repeats: int, tmp: Path, log) -> dict[str, list[dict]]:
    """Every strategy of one cell loaded at once; the repeats alternate their timed decodes (each a
    few seconds), so a pair's two measurements lie next to each other in time."""
    workers: list[_Live] = []
    try:
        for spec in specs:
            workers.append(_Live(spec, stock_lib, tmp))
        rates: dict[str, list[float]] = {w.name: [] for w in workers}
        for r in range(repeats):
            for w in workers[r % len(workers):] + workers[:r % len(workers)]:  # rotate: no strategy always first
                rates[w.name].append(w.ask("decode")["decode_tok_s"])
            log(r, {k: v[-1] for k, v in rates.items()})
        ends = {w.name: w.ask("stop") for w in workers}
    finally:
        for w in workers:
            w.close()
    return {w.name: [dict(w.ready, decode_tok_s=v, **ends[w.name]) for v in rates[w.name]] for w in workers}


def run_bench(model: Path, skip_count: int = 6, repeats: int = 5, ctx: Sequence[int] = (128,),
              decode_tokens: int = 64, threads: Sequence[int] | None = None, stock: bool = True,
              strategies: list[str] | None = None, heal: Path | None = None, fresh_files: bool = True,
              mmap: bool = True, restore_prompt: bool = False, live: bool = False) -> dict:
    """Measure full, first, mask, pruned (and stock) side by side, in every cell (context x threads);
    with ``heal`` (a healing adapter) also its skip set unhealed (``heal_mask``) and healed (``healed``);
    a FiRST-GGUF with thinned FFNs adds ``thin`` (every layer runs, each thinned layer decodes thin)
    and ``thinned`` (a plain GGUF with those FFNs physically thinned, prompt included); one with a
    short output vocabulary adds ``vocab`` (every layer runs, the decode computes the listed and
    the prompt's tokens' logits only).

    Args:
        model: the GGUF (a FiRST-GGUF adds the ``first`` strategy).
        skip_count: middle layers that ``mask`` and ``pruned`` leave out.
        repeats: interleaved repeats of every strategy in every cell.
        ctx: prompt lengths, one cell each: the context every decode step runs at.
        decode_tokens: decode steps timed per measurement.
        threads: CPU thread counts, one cell each (default: every core).
        stock: also the stock-library strategies (builds the stock library once).
        strategies: a subset of the strategy names (``full`` always runs).
        heal: a healing adapter.
        fresh_files: every strategy reads a copy written anew at the start of the run (the model,
            the pruned file, the routers-free copy), so no file is measured with an older, more
            scattered page cache than another (``bench_files``); False: the model file as it is.
        mmap: map the weights from the page cache (llama.cpp's default); False reads them into each
            worker's own memory, which no page-cache history can slow down (costs load time and memory).
        restore_prompt: evaluate each strategy's prompt once per context length (at the largest thread
            count) and save its KV cache; every timed repeat restores it and evaluates the prompt's last
            token again, then decodes at the same context. Long contexts then cost one prefill per
            strategy instead of one per repeat; the cells' prefill figures are None and
            ``setup["restored_prefill_tok_s"]`` holds the one prefill's. ``first`` and ``vocab``,
            whose decode depends on the whole prompt, still evaluate it in every repeat.
        live: per cell, every strategy's worker stays loaded and the repeats alternate between
            them, each a timed decode of ``decode_tokens`` steps from the prompt's end (the same
            positions and tokens every time): a pair's two measurements lie seconds apart instead
            of a model load and a prefill apart, so slow drifts of a shared machine cancel. The
            prompt (or its restored cache) runs once per worker: its figure repeats in every run.

    Returns:
        ``{"model", "setup", "cells": [{"ctx", "threads", "strategies": {name: {decode_tok_s, decode_spread,
        decode_ratio, decode_ratio_spread, prefill_..., peak_rss_mb, peak_rss_spread, skipped_layers, runs}}}]}``;
        ``setup["files"]`` gives each file's mean physically contiguous page run before and after (Linux, root).
    """
    from .format import inspect_gguf, read_thin, read_vocab

    ctxs = _positive(ctx, "context length")
    thread_counts = _positive(threads or [os.cpu_count() or 1], "thread count")
    info = inspect_gguf(model)
    thin = read_thin(model) if info["first"] else None
    info["thin"] = list(thin.layers) if thin else []
    info["vocab"] = bool(info["first"] and read_vocab(model))
    n_layer = info["n_layer"]
    skip = middle_layers(n_layer, skip_count)
    cells = [(c, t) for c in ctxs for t in thread_counts]
    with tempfile.TemporaryDirectory(dir=model.parent) as tmp:
        stock = stock and (not strategies or bool({"pruned", "stock", "patched_plain"} & set(strategies)))
        files = _bench_files(model, info, skip, Path(tmp), plain=stock, fresh=fresh_files)
        layout = {key: {"file": path.name, "page_run_before": page_run(path)} for key, path in files.items()}
        specs, stock_lib = _strategy_specs(files, info, skip, stock, strategies, heal)
        runs = {cell: {s["name"]: [] for s in specs} for cell in cells}
        states, restored = _prompt_states(specs, stock_lib, ctxs, decode_tokens, max(thread_counts), mmap, Path(tmp)) \
            if restore_prompt else ({}, {})
        for c, t in cells if live else ():
            jobs = [dict(spec, prompt_tokens=c, decode_tokens=decode_tokens, threads=t, mmap=mmap,
                         state=states.get((c, spec["name"]))) for spec in specs]
            runs[(c, t)] = _live_cell(jobs, stock_lib, repeats, Path(tmp), lambda r, rates: _log(
                f"repeat {r + 1}/{repeats}, ctx {c}, {t} threads: "
                + ", ".join(f"{k} {v:.1f}" for k, v in rates.items()) + " decode tok/s"))
        for r in range(0 if live else repeats):
            for c, t in cells:
                cell = runs[(c, t)]
                for spec in specs[r % len(specs):] + specs[:r % len(specs)]:  # rotate: no strategy always first
                    job = dict(spec, prompt_tokens=c, decode_tokens=decode_tokens, threads=t, mmap=mmap,
                               state=states.get((c, spec["name"])))
                    cell[spec["name"]].append(_run_worker(job, stock_lib))
                _log(f"repeat {r + 1}/{repeats}, ctx {c}, {t} threads: " + ", ".join(
                    f"{k} {v[-1]['decode_tok_s']:.1f}" for k, v in cell.items()) + " decode tok/s")
        for key, path in files.items():
            layout[key]["page_run_after"] = page_run(path)
    setup = dict(ctx=ctxs, threads=thread_counts, decode_tokens=decode_tokens, repeats=repeats,
                 skip_count=skip_count, n_layer=n_layer, fresh_files=fresh_files, mmap=mmap, files=layout,
                 restore_prompt=restore_prompt, restored_prefill_tok_s=restored, live=live,
                 machine=_machine(), date=time.strftime("%Y-%m-%d %H:%M"))
    return {"model": str(model), "setup": setup,
            "cells": [{"ctx": c, "threads": t, "strategies": {k: _summary(v, runs[(c, t)]["full"])
                                                              for k, v in runs[(c, t)].items()},
                       "pairs": _pairs(runs[(c, t)])} for c, t in cells]}


# paired decode ratios the targets are stated in (docs/SPEED.md): in-graph skipping against the
# pruned file, and the patched library (with and without routers in the file) against stock
PAIRS = (("mask", "pruned"), ("thin", "thinned"), ("full", "stock"), ("patched_plain", "stock"),
         ("pruned_patched", "pruned"))


PROMPT_DEPENDENT = ("first", "vocab")  # their decode follows the whole prompt (routers; its tokens' logits)


def _prompt_states(specs: list[dict], stock_lib: Path | None, ctxs: list[int], decode_tokens: int, threads: int,
                   mmap: bool, tmp: Path) -> tuple[dict, dict]:
    """One prefill per strategy and context, its KV cache saved for the timed repeats to restore."""
    states: dict = {}
    prefill: dict = {}
    for c in ctxs:
        for spec in specs:
            if spec["name"] in PROMPT_DEPENDENT:
                continue
            path = tmp / f"{spec['name']}-{c}.state"
            job = dict(spec, prompt_tokens=c, decode_tokens=decode_tokens, threads=threads, mmap=mmap, state=str(path),
                       save_state=True)
            res = _run_worker(job, stock_lib)
            states[(c, spec["name"])] = str(path)
            prefill.setdefault(str(c), {})[spec["name"]] = res["prefill_tok_s"]
            _log(f"ctx {c}: {spec['name']}'s prompt state saved ({res['prefill_tok_s']:.1f} prefill tok/s)")
    return states, prefill


def _pairs(cell: dict[str, list[dict]]) -> dict[str, dict]:
    out = {}
    for a, b in PAIRS:
        if a in cell and b in cell:
            ratios = [x["decode_tok_s"] / y["decode_tok_s"] for x, y in zip(cell[a], cell[b])]
            out[f"{a}/{b}"] = {"decode_ratio": statistics.median(ratios), "spread": [min(ratios), max(ratios)]}
    return out


def _positive(values: Sequence[int] | None, what: str) -> list[int]:
    out = [int(v) for v in values or ()]
    if not out or min(out) < 1:
        raise FirstError(f"every {what} must be a positive integer, got {list(values or ())}")
    return list(dict.fromkeys(out))  # in the order given, each once


def _bench_files(model: Path, info: dict, skip: list[int], tmp: Path, plain: bool, fresh: bool) -> dict[str, Path]:
    """The files the strategies read: ``model``, ``pruned`` and (for the stock library) ``plain``,
    the model without routers. With ``fresh`` each is a copy written into ``tmp`` back to back."""
    from .format import prune_gguf

    written = {"pruned": prune_gguf(model, skip, tmp / "pruned.written.gguf")}
    if info["thin"]:  # its thinned FFNs in place of the full ones: the speed limit of `thin`
        written["thinned"] = prune_gguf(model, [], tmp / "thinned.written.gguf", thin=True)
    if plain and info["first"]:  # the stock library cannot load router tensors: strip them (a zero-layer prune)
        written["plain"] = prune_gguf(model, [], tmp / "plain.written.gguf")
    if fresh:
        files = {"model": fresh_copy(model, tmp / "model.gguf")}
        for key, path in written.items():
            files[key] = fresh_copy(path, tmp / f"{key}.gguf")
            path.unlink()
    else:
        files = {"model": model, **written}
    if plain:
        files.setdefault("plain", files["model"])
    return files


def _strategy_specs(files: dict[str, Path], info: dict, skip: list[int], stock: bool,
                    strategies: list[str] | None, heal: Path | None) -> tuple[list[dict], Path | None]:
    """The strategies to measure (name, engine, file, mode, mask, library) and the stock library."""
    from . import build

    n_layer, model = info["n_layer"], files["model"]
    specs = [dict(name="full", engine="first", path=str(model), mode="full")]
    if info["first"]:
        specs.append(dict(name="first", engine="first", path=str(model), mode="first"))
    specs.append(dict(name="mask", engine="first", path=str(model), mode="mask",
                      mask=[i not in skip for i in range(n_layer)]))
    if info["thin"]:
        specs.append(dict(name="thin", engine="first", path=str(model), mode="mask", mask=[True] * n_layer,
                          thin=info["thin"]))
        specs.append(dict(name="thinned", engine="plain", path=str(files["thinned"])))
    if info["vocab"]:
        specs.append(dict(name="vocab", engine="first", path=str(model), mode="mask", mask=[True] * n_layer,
                          vocab=True))
    if heal is not None:
        from .format import read_heal

        heal_mask = [i not in read_heal(heal).skip for i in range(n_layer)]
        specs.append(dict(name="heal_mask", engine="first", path=str(model), mode="mask", mask=heal_mask))
        specs.append(dict(name="healed", engine="first", path=str(model), mode="mask", mask=heal_mask,
                          heal=str(heal)))
    pruned = files["pruned"]
    stock_lib = build.ensure_stock_library() if stock else None
    specs.append(dict(name="pruned", engine="plain", path=str(pruned), pruned=skip, lib="stock" if stock else None))
    if stock:
        # the pruned file on the patched library too: separates our graph from the build
        specs.append(dict(name="pruned_patched", engine="plain", path=str(pruned), pruned=skip))
        specs.append(dict(name="stock", engine="plain", path=str(files["plain"]), lib="stock"))
        specs.append(dict(name="patched_plain", engine="plain", path=specs[-1]["path"]))
    if strategies:
        unknown = set(strategies) - {s["name"] for s in specs}
        if unknown:
            raise FirstError(f"unknown or unavailable strategies {sorted(unknown)}; "
                             f"choose from {[s['name'] for s in specs]}")
        specs = [s for s in specs if s["name"] == "full" or s["name"] in strategies]
    return specs, stock_lib


def _summary(runs: list[dict], full: list[dict]) -> dict:
    out: dict = {"skipped_layers": runs[0]["skipped_layers"]}
    for key in ("decode_tok_s", "prefill_tok_s"):
        vals = [r[key] for r in runs]
        ratios = [r[key] / f[key] for r, f in zip(runs, full) if r[key] is not None and f[key] is not None]
        have = None not in vals  # None: a restored prompt (``restore_prompt``)
        out[key] = statistics.median(vals) if have else None
        out[key.replace("tok_s", "spread")] = [min(vals), max(vals)] if have else None
        out[key.replace("tok_s", "ratio")] = statistics.median(ratios) if ratios else None
        out[key.replace("tok_s", "ratio_spread")] = [min(ratios), max(ratios)] if ratios else None
    rss = [r["peak_rss_mb"] for r in runs]
    out["peak_rss_mb"], out["peak_rss_spread"] = statistics.median(rss), [min(rss), max(rss)]
    out["runs"] = [{k: v for k, v in r.items() if k not in ("skipped_layers", "tokens")} for r in runs]
    return out


def _machine() -> str:
    import platform

    cpu = ""
    if Path("/proc/cpuinfo").is_file():  # the CPU's name, where Linux gives it
        cpu = next((ln.split(":", 1)[1].strip() + ", " for ln in Path("/proc/cpuinfo").read_text().splitlines()
                    if ln.startswith("model name")), "")
    return f"{cpu}{platform.machine()}, {os.cpu_count()} cores, {platform.system()}"


def format_bench(result: dict) -> str:
    """A table per cell (context x threads): one row per strategy."""
    s = result["setup"]
    how = "alternating between loaded workers" if s.get("live") else "interleaved"
    lines = [f"{result['model']}: {s['n_layer']} layers, decode {s['decode_tokens']}, {s['repeats']} repeats {how} "
             f"({s['machine']}, {s['date']})"]
    runs = {k: (f["page_run_before"], f["page_run_after"]) for k, f in s.get("files", {}).items()}
    if any(v != (None, None) for v in runs.values()):
        how = ("fresh copies" if s.get("fresh_files") else "files as cached") + (
            "" if s.get("mmap", True) else ", weights read into memory (no mmap)")
        lines.append(f"{how}; mean contiguous page run before/after (1 = scattered pages): "
                     + ", ".join(f"{k} {b}/{a}" for k, (b, a) in runs.items()))
    for cell in result["cells"]:
        lines += ["", f"context {cell['ctx']}, {cell['threads']} thread{'s' if cell['threads'] > 1 else ''}",
                  f"{'strategy':<16}{'decode tok/s':>13}{'x full':>8}{'ratio spread':>14}{'prefill tok/s':>15}"
                  f"{'x full':>8}{'peak RSS MB':>13}  skipped"]
        for name, r in cell["strategies"].items():
            lo, hi = r["decode_ratio_spread"]
            ratio = f"{r['prefill_ratio']:>8.3f}" if r["prefill_ratio"] is not None else f"{'-':>8}"
            prefill = (f"{r['prefill_tok_s']:>15.1f}" if r["prefill_tok_s"] is not None else f"{'restored':>15}") + ratio
            lines.append(f"{name:<16}{r['decode_tok_s']:>13.1f}{r['decode_ratio']:>8.3f}{f'{lo:.2f}-{hi:.2f}':>14}"
                         f"{prefill}{r['peak_rss_mb']:>13.0f}  {r['skipped_layers']}")
        if cell.get("pairs"):
            lines.append("paired decode ratios: " + ", ".join(
                f"{k} {v['decode_ratio']:.3f} ({v['spread'][0]:.2f}-{v['spread'][1]:.2f})"
                for k, v in cell["pairs"].items()))
    return "\n".join(lines)


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "--worker":
        print(json.dumps(worker(json.loads(sys.argv[2]))))
    elif len(sys.argv) == 3 and sys.argv[1] == "--live-worker":
        live_worker(json.loads(sys.argv[2]))

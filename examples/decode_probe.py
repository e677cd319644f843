"""Measurements behind docs/SPEED.md, "Why reduced decode trails a pruned file".

    python examples/decode_probe.py layout FILE[@SKIP] ...        # page-cache layout + streaming read
    python examples/decode_probe.py decode mask|full|pruned FILE [--skip 9-14] [--threads 1] [--ctx 128] [--tokens 64]
                                                                 [--no-mmap]
    python examples/decode_probe.py icount OUT.callgrind ...      # instructions per decode step

``layout``: for each GGUF, the pages holding the tensors a decode step reads (every tensor
but the routers and the blocks in SKIP, e.g. ``model.first.gguf@9,10,11,12,13,14``), how many
physically contiguous runs of page frames they lie in and how many sit in large folios
(``/proc/self/pagemap`` and ``/proc/kpageflags``: Linux, root); then those bytes read once per
pass through a read-only mmap, the files interleaved, thread CPU ms per pass.

``decode``: prefill ``--ctx`` tokens, then ``--tokens`` greedy decode steps; prints thread CPU
and wall ms per step, llama.cpp's graph-reuse count and the peak resident set. With
``PERF_CTL``/``PERF_ACK`` set to two FIFOs it switches ``perf`` on only around the decode steps:

    mkfifo ctl ack; PERF_CTL=ctl PERF_ACK=ack perf stat -e task-clock,page-faults -D -1 \\
        --control fifo:ctl,ack -- python examples/decode_probe.py decode mask MODEL.first.gguf

``icount``: instructions executed per decode step, counted by valgrind (repeatable whatever else
the machine does, unlike any timing). Run ``decode`` under callgrind with a dump after every
``llama_decode`` (1 thread: valgrind serialises threads anyway)::

    valgrind --tool=callgrind --dump-after='llama_context::decode(llama_batch const&)' \\
        --callgrind-out-file=mask.cg python examples/decode_probe.py decode mask MODEL.first.gguf --ctx 128 --tokens 8

then ``icount mask.cg pruned.cg ...`` reads the dumps of the measured steps (those after the
second prefill: dump 1 is the load and first prefill, then 4 warm-up steps, the second
prefill, the measured steps) and prints, per file, the median instructions per step: in all,
inside ``llama_decode``, inside ggml's graph compute, and in its matrix products.
"""

from __future__ import annotations

import argparse
import json
import mmap
import os
import statistics
import struct
import time

import numpy as np

KPF_COMPOUND_HEAD, KPF_COMPOUND_TAIL = 15, 16


def decode_ranges(path: str, skip: list[int]) -> list[tuple[int, int]]:
    """File byte ranges of the tensors a decode step with ``skip`` left out reads."""
    import gguf

    reader = gguf.GGUFReader(path)
    out = []
    for t in reader.tensors:
        parts = t.name.split(".")
        if "first" in parts or (parts[0] == "blk" and int(parts[1]) in skip):
            continue
        out.append((int(t.data_offset), int(t.data_offset) + int(t.n_bytes)))
    return out


def frames(view: np.ndarray, ranges: list[tuple[int, int]]) -> dict:
    """Contiguous frame runs and large-folio pages behind ``ranges`` of a mapped file."""
    ps, base = mmap.PAGESIZE, view.ctypes.data
    with open("/proc/self/pagemap", "rb") as pm, open("/proc/kpageflags", "rb") as kf:
        pfns, large = [], 0
        for start, end in ranges:
            view[start:end:ps].sum()  # fault the pages in (reads only)
            first, last = (base + start) // ps, (base + end - 1) // ps
            pm.seek(first * 8)
            for (entry,) in struct.iter_unpack("<Q", pm.read((last - first + 1) * 8)):
                pfn = entry & ((1 << 55) - 1)
                kf.seek(pfn * 8)
                (flags,) = struct.unpack("<Q", kf.read(8))
                large += bool(flags >> KPF_COMPOUND_HEAD & 1 or flags >> KPF_COMPOUND_TAIL & 1)
                pfns.append(pfn)
    arr = np.array(pfns, dtype=np.int64)
    runs = 1 + int(np.count_nonzero(np.diff(arr) != 1))
    return {"pages": len(arr), "runs": runs, "pages_per_run": round(len(arr) / runs, 1),
            "in_large_folios": round(large / len(arr), 3)}


def layout(specs: list[str], passes: int = 12) -> None:
    files = []
    for spec in specs:
        path, _, skip = spec.partition("@")
        ranges = decode_ranges(path, [int(i) for i in skip.split(",") if i])
        with open(path, "rb") as f:
            m = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
        view = np.frombuffer(m, dtype=np.uint8)
        words = [view[s + (-s) % 8:e - e % 8].view(np.uint64) for s, e in ranges]
        files.append((os.path.basename(path), frames(view, ranges), words))
    times: dict[str, list[float]] = {name: [] for name, _, _ in files}
    for _ in range(passes):
        for name, _, words in files:
            t0 = time.thread_time()
            for w in words:
                np.bitwise_xor.reduce(w)  # every byte once, little arithmetic
            times[name].append((time.thread_time() - t0) * 1e3)
    for name, info, _ in files:
        t = times[name][2:]  # the first passes warm up
        print(json.dumps({"file": name, **info, "read_ms_median": round(statistics.median(t), 1),
                          "read_ms_min": round(min(t), 1)}))


def _perf(cmd: str) -> None:
    if os.environ.get("PERF_CTL"):
        with open(os.environ["PERF_CTL"], "w") as ctl:
            ctl.write(cmd + "\n")
        with open(os.environ["PERF_ACK"]) as ack:
            ack.readline()


def decode(strategy: str, path: str, skip: list[int], threads: int, ctx: int, tokens: int, mmap_: bool = True) -> None:
    import llama_cpp

    from first_gguf.bench import _prompt_tokens, peak_rss_mb
    from first_gguf.runtime.greedy import PlainModel

    kw = dict(n_ctx=ctx + tokens + 16, n_threads=threads, n_threads_batch=threads, n_batch=max(512, ctx),
              use_mmap=mmap_, verbose=bool(os.environ.get("VERBOSE")))
    if strategy == "pruned":
        llm = PlainModel(path, **kw)
    else:
        from first_gguf.runtime import FirstModel

        llm = FirstModel(path, mode="full", **kw)
        if strategy == "mask":
            llm.configure(mode="mask", mask=[i not in skip for i in range(llm.n_layer)])
    prompt = _prompt_tokens(llm, ctx)
    for steps in (4, tokens):  # a warm-up, then the measured steps
        llm.prefill(prompt)
        llama_cpp.llama_perf_context_reset(llm.ctx)
        if steps == tokens:
            _perf("enable")
        c0, w0 = time.thread_time(), time.perf_counter()
        for _ in range(steps):
            llm.eval([int(np.argmax(llm.last_logits(copy=False)))])
        c1, w1 = time.thread_time(), time.perf_counter()
        if steps == tokens:
            _perf("disable")
    perf = llama_cpp.llama_perf_context(llm.ctx)
    print(json.dumps({"strategy": strategy, "cpu_ms_per_token": (c1 - c0) * 1e3 / tokens,
                      "wall_ms_per_token": (w1 - w0) * 1e3 / tokens, "graph_reused": perf.n_reused,
                      "decode_calls": perf.n_eval, "peak_rss_mb": peak_rss_mb()}))


ICOUNT_FUNCTIONS = {"decode": "llama_context::decode(llama_batch const&)", "compute": "ggml_graph_compute",
                   "mul_mat": "ggml_compute_forward_mul_mat"}


def icount(outs: list[str]) -> None:
    import glob
    import re
    import subprocess

    for out in outs:
        dumps = sorted(glob.glob(f"{out}.*"), key=lambda p: int(p.rsplit(".", 1)[1]))[6:]
        if not dumps:
            raise SystemExit(f"{out}: no callgrind dumps of measured decode steps ({out}.7 and on)")
        rows = []
        for path in dumps:
            row = {"total": int(re.search(r"^summary: (\d+)", open(path).read(), re.M).group(1))}
            text = subprocess.run(["callgrind_annotate", "--inclusive=yes", "--threshold=100", path],
                                  capture_output=True, text=True, check=True).stdout
            for key, name in ICOUNT_FUNCTIONS.items():
                row[key] = next((int(line.split()[0].replace(",", "")) for line in text.splitlines()
                                 if line.strip()[:1].isdigit() and re.search(rf":{re.escape(name)}( |$)", line)), 0)
            rows.append(row)
        print(json.dumps({"file": out, "steps": len(rows)} |
                         {k: statistics.median(r[k] for r in rows) for k in ("total", *ICOUNT_FUNCTIONS)}))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    lay = sub.add_parser("layout")
    lay.add_argument("files", nargs="+")
    lay.add_argument("--passes", type=int, default=12)
    dec = sub.add_parser("decode")
    dec.add_argument("strategy", choices=["full", "mask", "pruned"])
    dec.add_argument("file")
    dec.add_argument("--skip", default="9-14")
    dec.add_argument("--threads", type=int, default=1)
    dec.add_argument("--ctx", type=int, default=128)
    dec.add_argument("--tokens", type=int, default=64)
    dec.add_argument("--no-mmap", action="store_true", help="read the weights into memory instead of mapping the file")
    cnt = sub.add_parser("icount")
    cnt.add_argument("outs", nargs="+", help="--callgrind-out-file of each decode run")
    a = ap.parse_args()
    if a.cmd == "layout":
        layout(a.files, a.passes)
    elif a.cmd == "icount":
        icount(a.outs)
    else:
        lo, _, hi = a.skip.partition("-")
        decode(a.strategy, a.file, list(range(int(lo), int(hi or lo) + 1)), a.threads, a.ctx, a.tokens, not a.no_mmap)


if __name__ == "__main__":
    main()

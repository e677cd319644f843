"""The summary of an evaluation run: per strategy, quality, speed and the layers skipped.

``results.py`` turns it into the report. Speeds compare a row with full's row of the same
item from the same run (command); a run directory can hold rows of several commands.
"""

from __future__ import annotations

from typing import Any, Iterable

import numpy as np

from . import metrics
from .strategies import Strategy

MIN_DECODE = 8  # decode speeds of items where both sides generated at least this many tokens
SCORED = ("humaneval", "humaneval-chat", "doctest")  # tasks whose rows the sandbox scores (pass@1)
GENERATION = SCORED + ("chat",)           # tasks whose rows are timed greedy generations


def summarize(rows: Iterable[dict], strategies: list[Strategy], meta: dict,
              references: dict[tuple[str, str, str | None], dict] | None = None) -> dict:
    """Per strategy (random seeds pooled under ``random-K``): quality, speed, skipped layers.

    ``references`` holds full's generation rows by (task, item, run); speeds compare a row with
    full's row of the same item and run (default: full's rows among ``rows``).
    """
    rows = list(rows)
    by: dict[str, dict[str, list[dict]]] = {}
    for r in rows:
        by.setdefault(r["strategy"], {}).setdefault(r["task"], []).append(r)
    fams = list(dict.fromkeys(s.family for s in strategies))
    out: dict[str, dict] = {}
    for fam in fams:
        names = [s.name for s in strategies if s.family == fam]
        tasks: dict[str, list[dict]] = {}
        for name in names:
            for task, rs in by.get(name, {}).items():
                tasks.setdefault(task, []).extend(rs)
        out[fam] = _strategy_summary(tasks, by.get("full", {}), references)
        out[fam]["members"] = names
    return {**meta, "summary": out, "skip_heatmap": _skip_heatmap(rows, strategies, meta["n_layer"])}


def _strategy_summary(tasks: dict[str, list[dict]], full: dict[str, list[dict]],
                      references: dict[tuple[str, str, str | None], dict] | None = None) -> dict:
    s: dict[str, Any] = {}
    for task in SCORED:
        he = [r for r in tasks.get(task, []) if "status" in r]
        if he:
            passed = {name: sorted(r["id"] for r in he if r["strategy"] == name and r["status"] == "passed")
                      for name in dict.fromkeys(r["strategy"] for r in he)}
            s[task] = {"pass@1": float(np.mean([r["status"] == "passed" for r in he])), "n": len(he),
                       "skipped": float(np.mean([len(r["skipped"]) for r in he])), "passed": passed}
    tf = tasks.get("tf", [])
    if tf:
        w = np.array([r["n"] for r in tf], dtype=float)
        wr = np.array([r["n_real"] for r in tf], dtype=float)
        s["tf"] = {"top1": float(np.average([r["top1"] for r in tf], weights=w)),
                   "kl": float(np.average([r["kl"] for r in tf], weights=w)),
                   "ppl": float(np.exp(np.average([r["nll"] for r in tf], weights=wr))), "n": len(tf)}
        for fam in dict.fromkeys(r["family"] for r in tf):
            sub = [r for r in tf if r["family"] == fam]
            s["tf"][fam] = {"top1": float(np.average([r["top1"] for r in sub], weights=[r["n"] for r in sub])),
                            "kl": float(np.average([r["kl"] for r in sub], weights=[r["n"] for r in sub])),
                            "skipped": float(np.mean([len(r["skipped"]) for r in sub]))}
    chat = tasks.get("chat", [])
    if chat:
        ref = {r["id"]: r["tokens"] for r in full.get("chat", [])}
        agree = [metrics.greedy_agreement(ref[r["id"]], r["tokens"]) for r in chat if r["id"] in ref]
        if agree:
            s["chat"] = {"prefix_fraction": float(np.mean([a["prefix_fraction"] for a in agree])),
                         "exact": float(np.mean([a["exact"] for a in agree])), "n": len(agree)}
    # speeds: each row against full's row of the same item from the same run (command); a run
    # directory can hold rows of several commands. The median over items is robust to a stretch
    # of the run that shared the cores with other work, which a ratio of summed times is not.
    if references is None:
        references = {(r["task"], r["id"], r.get("run")): r for task in GENERATION
                      for r in full.get(task, [])}
    pairs = [(r, references[(r["task"], r["id"], r.get("run"))]) for task in GENERATION for r in tasks.get(task, [])
             if (r["task"], r["id"], r.get("run")) in references]
    if pairs:
        s["speed"] = _speeds(pairs)
    every = [r for rs in tasks.values() for r in rs]
    if every:
        s["skipped"] = float(np.mean([len(r["skipped"]) for r in every]))
    return s



def _speeds(pairs: list[tuple[dict, dict]]) -> dict:
    """Median over items of tok/s and of the ratio to full's row of the item, with its quartiles."""
    out: dict[str, Any] = {"n_items": len(pairs)}
    for key, n, t, least in (("decode", "n_decode", "t_decode", MIN_DECODE), ("prefill", "n_prompt", "t_prefill", 1)):
        ok = [(r[n] / r[t], f[n] / f[t]) for r, f in pairs
              if r[n] >= least and f[n] >= least and r[t] > 0 and f[t] > 0]
        if not ok:
            out.update({f"{key}_tok_s": None, f"{key}_x": None, f"{key}_x_iqr": None})
            continue
        mine, ratio = np.array([a for a, _ in ok]), np.array([a / b for a, b in ok])
        out[f"{key}_tok_s"] = float(np.median(mine))
        out[f"{key}_x"] = float(np.median(ratio))
        out[f"{key}_x_iqr"] = [float(np.quantile(ratio, 0.25)), float(np.quantile(ratio, 0.75))]
    return out


def _skip_heatmap(rows: list[dict], strategies: list[Strategy], n_layer: int) -> dict:
    """For each ``first`` strategy: per task family, the fraction of prompts skipping each layer."""
    out: dict[str, dict[str, list[float]]] = {}
    for s in strategies:
        if s.kind != "first":
            continue
        groups: dict[str, list[list[int]]] = {}
        for r in rows:
            if r["strategy"] == s.name:
                groups.setdefault(r["family"] or r["task"], []).append(r["skipped"])
        out[s.name] = {g: [float(np.mean([il in sk for sk in v])) for il in range(n_layer)]
                       for g, v in groups.items()}
    return out

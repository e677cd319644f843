"""The report of an evaluation run: a Markdown table, two PNG figures (matplotlib, imported here only)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from ..figures import pyplot
from .doctests import SOURCE
from .summary import MIN_DECODE

ORDER = ("full", "first", "point", "draft", "static", "static-kl", "mask", "heal", "modal", "pruned", "early-exit",
         "random")
# the scored tasks, as the report names them
TITLES = {"humaneval": "HumanEval", "humaneval-chat": "HumanEval (chat)", "doctest": "Standard-library doctests"}


def _kind(name: str, result: dict) -> str:
    members = result["summary"][name]["members"]
    return result["strategies"][members[0]]["kind"]


def rows(result: dict) -> list[dict]:
    """One flat row per reported strategy, in report order, with ratios to ``full``."""
    summary = result["summary"]
    full = summary.get("full", {})
    out = []
    for name, s in summary.items():
        speed = s.get("speed", {})
        he = s.get("humaneval", {})
        row = {"strategy": name, "kind": _kind(name, result), "skipped": s.get("skipped"),
               **_pass(s, full, "humaneval", ""), **_pass(s, full, "humaneval-chat", "_chat"),
               **_pass(s, full, "doctest", "_doctest"),
               "skipped_he": he.get("skipped"),
               "top1": s.get("tf", {}).get("top1"), "kl": s.get("tf", {}).get("kl"), "ppl": s.get("tf", {}).get("ppl"),
               "chat_prefix": s.get("chat", {}).get("prefix_fraction"), "chat_exact": s.get("chat", {}).get("exact"),
               "decode_tok_s": speed.get("decode_tok_s"), "prefill_tok_s": speed.get("prefill_tok_s"),
               "decode_x": speed.get("decode_x"), "prefill_x": speed.get("prefill_x"),
               "decode_x_iqr": speed.get("decode_x_iqr"), "prefill_x_iqr": speed.get("prefill_x_iqr")}
        out.append(row)
    return sorted(out, key=lambda r: (ORDER.index(r["kind"]), r["skipped"] or 0, r["strategy"]))


def _pass(s: dict, full: dict, task: str, suffix: str) -> dict:
    """pass@1 of a scored task, its problem count and its ratio to full's, keys ending in ``suffix``."""
    he, full_pass = s.get(task, {}), full.get(task, {}).get("pass@1")
    return {f"pass@1{suffix}": he.get("pass@1"), f"n_humaneval{suffix}": he.get("n"),
            f"pass_rel{suffix}": he["pass@1"] / full_pass if he and full_pass else None}


def _f(v, fmt: str) -> str:
    return "-" if v is None else format(v, fmt)


def _x(v, iqr) -> str:
    return "-" if v is None else f"{v:.3f}" + (f" ({iqr[0]:.2f}-{iqr[1]:.2f})" if iqr else "")


def _passed(r: dict, suffix: str) -> str:
    p, n = r[f"pass@1{suffix}"], r[f"n_humaneval{suffix}"]
    return "-" if p is None else f"{p:.3f} ({round(p * n)}/{n})"


def format_table(result: dict) -> str:
    """The main table as Markdown (a doctest column pair only when the run has that task)."""
    rs = rows(result)
    doc = any(r["pass@1_doctest"] is not None for r in rs)
    lines = ["| strategy | mean skipped (all / HumanEval) | HumanEval pass@1 | of full | pass@1 (chat) | of full "
             + ("| doctests pass@1 | of full " if doc else "")
             + "| top-1 | KL | ppl | chat prefix / exact | decode tok/s | x full (IQR) | prefill tok/s | x full (IQR) |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|" + ("---|---|" if doc else "")]
    for r in rs:
        lines.append(f"| {r['strategy']} | {_f(r['skipped'], '.2f')} / {_f(r['skipped_he'], '.2f')} | "
                     f"{_passed(r, '')} | {_f(r['pass_rel'], '.0%')} | "
                     f"{_passed(r, '_chat')} | {_f(r['pass_rel_chat'], '.0%')} | "
                     + (f"{_passed(r, '_doctest')} | {_f(r['pass_rel_doctest'], '.0%')} | " if doc else "")
                     + f"{_f(r['top1'], '.3f')} | {_f(r['kl'], '.3f')} | {_f(r['ppl'], '.2f')} | "
                     f"{_f(r['chat_prefix'], '.2f')} / {_f(r['chat_exact'], '.2f')} | "
                     f"{_f(r['decode_tok_s'], '.1f')} | {_x(r['decode_x'], r['decode_x_iqr'])} | "
                     f"{_f(r['prefill_tok_s'], '.1f')} | {_x(r['prefill_x'], r['prefill_x_iqr'])} |")
    return "\n".join(lines)


def paired(result: dict, task: str = "humaneval") -> list[dict]:
    """A HumanEval task problem by problem, each ``first`` strategy against every non-``first`` one.

    Returns:
        Rows ``{"first", "other", "only_first", "only_other", "p"}``: problems only one of the two
        solves (a ``random-K`` pools its seeds, so counts can be fractional) and the two-sided
        sign-test p-value of the discordant problems (None for pooled seeds).
    """
    from math import comb

    summary = result["summary"]

    def solved(name: str) -> dict[str, float] | None:
        he = summary[name].get(task)
        if not he or "passed" not in he:
            return None
        out: dict[str, float] = {}
        for ids in he["passed"].values():
            for pid in ids:
                out[pid] = out.get(pid, 0.0) + 1.0 / len(summary[name]["members"])
        return out

    out = []
    firsts = [n for n in summary if _kind(n, result) == "first"]
    for f in firsts:
        fs = solved(f)
        for other in summary:
            os_ = solved(other)
            if _kind(other, result) == "first" or fs is None or os_ is None:
                continue
            ids = set(fs) | set(os_)
            a = sum(max(0.0, fs.get(i, 0.0) - os_.get(i, 0.0)) for i in ids)
            b = sum(max(0.0, os_.get(i, 0.0) - fs.get(i, 0.0)) for i in ids)
            p = None
            if a == int(a) and b == int(b) and len(summary[other]["members"]) == 1:
                n, k = int(a + b), int(min(a, b))
                p = min(1.0, 2 * sum(comb(n, j) for j in range(k + 1)) / 2 ** n) if n else 1.0
            out.append({"first": f, "other": other, "only_first": a, "only_other": b, "p": p})
    return out


def format_paired(result: dict, task: str = "humaneval") -> str:
    rs = paired(result, task)
    if not rs:
        return ""
    lines = [f"{TITLES[task]} problem by problem (problems only one side solves; sign test on those):", "",
             "| FiRST | other | only FiRST | only other | p |", "|---|---|---|---|---|"]
    lines += [f"| {r['first']} | {r['other']} | {r['only_first']:g} | {r['only_other']:g} | {_f(r['p'], '.3f')} |"
              for r in rs]
    return "\n".join(lines) + "\n"


def oracle(result: dict, task: str = "humaneval") -> list[dict]:
    """Per skip count K, a HumanEval task solved by a per-problem oracle over the fixed K-layer masks run.

    The masks are those of the input-agnostic strategies with a full-depth prompt (``static``, ``static-kl``, ``modal``,
    every ``random`` seed, ``early-exit``): the masks a router could pick from per input. A
    problem counts if at least one of them solves it, so the figure bounds what choosing among
    these masks per input could reach at that skip count (it sees the tests: a bound, not a method).

    Returns:
        Rows ``{"k", "masks", "solved", "n", "pass@1", "of_full"}`` in order of K.
    """
    summary, strategies = result["summary"], result["strategies"]
    full = summary.get("full", {}).get(task, {})
    by_k: dict[int, dict[tuple[int, ...], set[str]]] = {}
    n_by_k: dict[int, set[int]] = {}
    for name, s in summary.items():
        he = s.get(task)
        if _kind(name, result) not in ("static", "static-kl", "modal", "random", "early-exit") or not he or "passed" not in he:
            continue
        for member in s["members"]:
            skip = tuple(strategies[member]["skip"])
            by_k.setdefault(len(skip), {}).setdefault(skip, set()).update(he["passed"].get(member, []))
            n_by_k.setdefault(len(skip), set()).add(he["n"] // len(s["members"]))
    out = []
    for k in sorted(by_k):
        if len(n_by_k[k]) != 1:  # the strategies of this K cover different problem sets
            continue
        n = n_by_k[k].pop()
        solved = len(set().union(*by_k[k].values()))
        out.append({"k": k, "masks": sorted(by_k[k]), "solved": solved, "n": n, "pass@1": solved / n,
                    "of_full": solved / n / full["pass@1"] if full.get("pass@1") and full.get("n") == n else None})
    return out


def format_oracle(result: dict, task: str = "humaneval") -> str:
    rs = oracle(result, task)
    if not rs:
        return ""
    lines = [f"Headroom for input adaptivity: {TITLES[task]} solved by at least one of the fixed K-layer masks run "
             "(static, static-kl, modal, random seeds, early-exit; a per-problem oracle that sees the tests, "
             "so a bound):", "",
             "| K | masks | oracle pass@1 | of full |", "|---|---|---|---|"]
    lines += [f"| {r['k']} | {', '.join('-'.join(map(str, m)) for m in r['masks'])} | "
              f"{r['pass@1']:.3f} ({r['solved']}/{r['n']}) | {_f(r['of_full'], '.0%')} |" for r in rs]
    return "\n".join(lines) + "\n"


def format_heatmap(result: dict) -> str:
    n_layer = result["n_layer"]
    lines = []
    for name, groups in result["skip_heatmap"].items():
        lines += [f"Fraction of prompts skipping each layer, `{name}`:", "",
                  "| task | " + " | ".join(str(i) for i in range(n_layer)) + " |", "|---|" + "---|" * n_layer]
        for g, row in groups.items():
            lines.append(f"| {g} | " + " | ".join(f"{v:.2f}" if v else "." for v in row) + " |")
        lines.append("")
    return "\n".join(lines)


def _tasks_line(result: dict) -> str:
    """What each task ran, as the report's second paragraph."""
    cfg, rs = result["config"], rows(result)
    he_n = next((r["n_humaneval"] for r in rs if r["n_humaneval"]), None)
    chat_n = next((r["n_humaneval_chat"] for r in rs if r["n_humaneval_chat"]), None)
    doc_n = next((r["n_humaneval_doctest"] for r in rs if r["n_humaneval_doctest"]), None)
    seeds = sorted({len(s["members"]) for s in result["summary"].values()
                    if result["strategies"][s["members"][0]]["kind"] == "random"})
    he = (f"HumanEval: {he_n or 0} problems, greedy raw completion, at most {cfg['max_new_tokens']} new tokens. "
          if he_n or not (chat_n or doc_n) else "")
    if chat_n:
        he += (f"HumanEval (chat): {chat_n} problems asked through the model's chat template (evalplus's "
               f"instruction), greedy, the code of the answer's first Python block, at most {cfg['max_new_tokens']} "
               f"new tokens beyond the prompt's own, which the answer restates. ")
    if doc_n:
        he += (f"Doctests: {doc_n} functions of {SOURCE} rewritten from their signature and docstring "
               f"(raw completion, HumanEval's stops), passing when every example of the docstring does. ")
    return (he + f"Programs sandboxed ({cfg['timeout']:g} s each). Teacher-forced: {cfg['n_per_family']} held-out "
            f"prompts per family ({cfg['max_prompt_tokens']} tokens at most), {cfg['cont_tokens']} tokens of the "
            f"full model's greedy continuation; ppl on the real text after the prompt. Chat: {cfg['n_chat']} "
            f"held-out chat requests, {cfg['chat_tokens']} greedy tokens. Speeds: strategies interleaved item by "
            f"item; per HumanEval problem (of either task) and chat request, the strategy's tok/s and its ratio to "
            f"full's run of the same item by the same command; the table gives medians over items (decode: items "
            f"where both generated at least {MIN_DECODE} tokens) and the ratio's quartiles"
            + (f". `random-K` pools {'/'.join(map(str, seeds))} seeds." if seeds else "."))


def format_report(result: dict) -> str:
    """The whole report: setup line, the commands that wrote the rows, main table, static order, skip tables."""
    parts = [f"Model `{Path(result['model']).name}` ({result['n_layer']} layers, protected {result['protected']}); "
             f"{result['machine']}; written {result['date']} by the last command below "
             f"({result['threads']} threads); the rows come from every command below.", _tasks_line(result), ""]
    if result.get("commands"):
        parts += ["```sh", *result["commands"], "```", ""]
    parts += [format_table(result), ""] + [text for task in TITLES for f in (format_paired, format_oracle)
                                           if (text := f(result, task))]
    parts += [f"Static order (block influence on training prompts, least first): {result['static_order']}", "",
              format_heatmap(result)]
    return "\n".join(parts)


def plot_quality_speed(result: dict, path: Path) -> None:
    """HumanEval pass@1 and top-1 vs decode speed (x full), and pass@1 vs layers skipped; one series per kind."""
    plt = pyplot()
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
    rs = rows(result)
    # raw HumanEval's pass@1, or the chat task's when it ran alone
    he, title = ("pass@1", "HumanEval pass@1") if any(r["pass@1"] is not None for r in rs) else \
        ("pass@1_chat", "HumanEval (chat) pass@1")
    panels = ((axes[0], "decode_x", he, title),
              (axes[1], "decode_x", "top1", "top-1 agreement with full"),
              (axes[2], "skipped_he", he, title))
    for ax, x, metric, label in panels:
        for j, kind in enumerate(ORDER):
            pts = sorted((r[x], r[metric], r["strategy"]) for r in rs
                         if r["kind"] == kind and r[x] is not None and r[metric] is not None)
            if not pts:
                continue
            xs, ys, names = zip(*pts)
            ax.plot(xs, ys, "o-" if kind == "first" else "s--", color=f"C{j}", label=kind)
            for px, py, n in pts:
                ax.annotate(n, (px, py), fontsize=6, xytext=(3, 3), textcoords="offset points")
        ax.set_xlabel("decode speed, x full" if x == "decode_x" else "layers skipped on HumanEval (mean)")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=7)
    fig.suptitle(f"{Path(result['model']).name}: quality vs decode speed and skip count ({result['date']})", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_skip_heatmap(result: dict, path: Path) -> None:
    """Per task: how often each layer is skipped, for every ``first`` strategy."""
    plt = pyplot()
    maps = result["skip_heatmap"]
    if not maps:
        return
    fig, axes = plt.subplots(len(maps), 1, figsize=(11, 1.2 + 1.6 * len(maps)), squeeze=False)
    for ax, (name, groups) in zip(axes[:, 0], maps.items()):
        names = list(groups)
        data = np.array([groups[g] for g in names])
        im = ax.imshow(data, aspect="auto", cmap="viridis", vmin=0, vmax=1)
        ax.set_yticks(range(len(names)), names)
        ax.set_xticks(range(data.shape[1]))
        ax.set_title(name, fontsize=8)
        fig.colorbar(im, ax=ax)
    axes[-1, 0].set_xlabel("layer")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_report(result: dict, out: Path) -> Path:
    """``report.md``, ``quality-speed.png`` and ``skips.png`` in ``out``; returns the Markdown path."""
    out.mkdir(parents=True, exist_ok=True)
    plot_quality_speed(result, out / "quality-speed.png")
    plot_skip_heatmap(result, out / "skips.png")
    md = out / "report.md"
    md.write_text(format_report(result) + "\n\n![quality vs speed](quality-speed.png)\n\n"
                  "![layers skipped per task](skips.png)\n")
    return md

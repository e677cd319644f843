"""An evaluation report: Markdown tables, JSON, and two figures (matplotlib, imported here only)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from ..figures import pyplot


def plot_quality(result: dict, path: Path) -> None:
    """Top-1 agreement and KL vs mean skipped layers: FiRST's sweep, static masks (both prefills)."""
    plt = pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    sweep = sorted(result["sweep"], key=lambda row: row["skipped"])
    static = [result["static"][k] for k in sorted(result["static"], key=int)]
    families = [f for f in sweep[0]["families"] if f != "all"] if sweep else []
    for ax, metric, label in ((axes[0], "top1", "top-1 agreement with the full model"),
                              (axes[1], "kl", "KL(full || skipping), nats/token")):
        ax.plot([r["skipped"] for r in sweep], [r[metric] for r in sweep], "o-", color="C0", lw=2,
                label="FiRST routers (threshold sweep)")
        for j, fam in enumerate(families):
            pts = sorted((r["families"][fam]["skipped"], r["families"][fam][metric]) for r in sweep)
            ax.plot(*zip(*pts), ":", color=f"C{j + 3}", lw=1, label=f"FiRST, {fam}")
        if static:
            ax.plot([s["full"]["all"]["skipped"] for s in static], [s["full"]["all"][metric] for s in static],
                    "s--", color="C1", label="best static mask, prefill=full")
            ax.plot([s["masked"]["all"]["skipped"] for s in static], [s["masked"]["all"][metric] for s in static],
                    "^--", color="C2", label="same mask, prefill=masked (pruned GGUF)")
        ax.set_xlabel("mean skipped layers per prompt (decode)")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
    axes[1].set_yscale("log")
    axes[0].legend(fontsize=7, loc="lower left")
    fig.suptitle("Held-out prompts, teacher-forced along the full model's greedy continuation (hard rule)",
                 fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_skips(result: dict, path: Path) -> None:
    """Heatmap: per family, how often each layer is skipped at the report threshold."""
    plt = pyplot()
    table = result["skip_table"]["layers"]
    names = list(table)
    data = np.array([table[n] for n in names])
    fig, ax = plt.subplots(figsize=(11, 0.5 * len(names) + 1.6))
    im = ax.imshow(data, aspect="auto", cmap="viridis", vmin=0, vmax=1)
    ax.set_yticks(range(len(names)), names)
    ax.set_xticks(range(data.shape[1]))
    ax.set_xlabel("layer")
    for (i, j), v in np.ndenumerate(data):
        if v > 0:
            ax.text(j, i, f"{v:.2f}".lstrip("0"), ha="center", va="center", fontsize=6,
                    color="black" if v > 0.6 else "white")
    fig.colorbar(im, ax=ax, label="fraction of prompts that skip it")
    ax.set_title(f"Layers skipped per family (held-out prompts, threshold {result['skip_table']['threshold']:.3g})",
                 fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_training_report(result: dict, out_dir: Path, name: str) -> None:
    """``<name>-eval.json``, ``<name>-quality.png`` and ``<name>-skips.png`` in ``out_dir``."""
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / f"{name}-eval.json").write_text(json.dumps(result, indent=1) + "\n")
    plot_quality(result, out_dir / f"{name}-quality.png")
    plot_skips(result, out_dir / f"{name}-skips.png")


def format_training_report(result: dict) -> str:
    """The evaluation as Markdown tables: the sweep, the static masks, the per-family skip table."""
    fams = list(result["examples"])
    per_family = " | ".join(f"{f} skipped / top-1 / KL" for f in fams)
    lines = [f"Held-out examples: {', '.join(f'{f} {n}' for f, n in result['examples'].items())}", "",
             f"| threshold | mean skipped | top-1 | KL | {per_family} |", "|---|---|---|---|" + "---|" * len(fams)]
    for row in result["sweep"]:
        cells = [f"{row['families'][f]['skipped']:.2f} / {row['families'][f]['top1']:.3f} / "
                 f"{row['families'][f]['kl']:.3f}" for f in fams]
        lines.append(f"| {row['threshold']:.4g} | {row['skipped']:.2f} | {row['top1']:.3f} | {row['kl']:.3f} | "
                     + " | ".join(cells) + " |")
    lines += ["", "| static k | skip set (chosen on train) | prefill=full top-1 / KL | prefill=masked top-1 / KL "
                  "| FiRST at the same mean skip: top-1 / KL |", "|---|---|---|---|---|"]
    for k, row in sorted(result["static"].items(), key=lambda kv: int(kv[0])):
        full, masked = row["full"]["all"], row["masked"]["all"]
        at = interpolate_sweep(result["sweep"], int(k))
        first = f"{at['top1']:.3f} / {at['kl']:.3f}" if at else "outside the sweep"
        lines.append(f"| {k} | {row['skip']} | {full['top1']:.3f} / {full['kl']:.3f} | "
                     f"{masked['top1']:.3f} / {masked['kl']:.3f} | {first} |")
    table = result["skip_table"]["layers"]
    n_layer = len(next(iter(table.values())))
    lines += ["", f"Fraction of held-out prompts skipping each layer (threshold "
                  f"{result['skip_table']['threshold']:.4g}; distinct masks per family: "
                  f"{result['distinct_masks']})", "",
              "| family | " + " | ".join(str(i) for i in range(n_layer)) + " |", "|---|" + "---|" * n_layer]
    for fam, row in table.items():
        lines.append(f"| {fam} | " + " | ".join(f"{v:.2f}" if v else "." for v in row) + " |")
    return "\n".join(lines)


def interpolate_sweep(sweep: list[dict], skipped: float) -> dict | None:
    """FiRST's top-1 and KL at a mean skip count, linearly between the sweep's points (None outside)."""
    pts = sorted(sweep, key=lambda r: r["skipped"])
    for a, b in zip(pts, pts[1:]):
        if a["skipped"] <= skipped <= b["skipped"]:
            w = 0.0 if b["skipped"] == a["skipped"] else (skipped - a["skipped"]) / (b["skipped"] - a["skipped"])
            return {m: a[m] + w * (b[m] - a[m]) for m in ("top1", "kl")}
    return None

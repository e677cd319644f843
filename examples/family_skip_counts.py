"""Should the skip count follow the prompt's family? Measured on the committed damage labels.

A damage label is the KL to the full model when one layer alone is skipped, along the full
model's own continuation of a training prompt (``first-gguf damage``). Each random split of
the labelled prompts into two halves (stratified by family) chooses on one half and scores on
the other, with the damage of a set taken as the sum of its layers' single-layer damage:

- one order, one count: the layers in the order of the chosen half's mean damage, the same
  K for every family (the fixed masks ``static-kl-K`` of ``first-gguf eval``);
- one order per family, the same K;
- one order, a count per family: (k_code, k_instruct, k_prose) summing to 3K, chosen to
  minimise the chosen half's summed damage (a skip budget spent where it costs least);
- an order and a count per family.

    python examples/family_skip_counts.py qwen2.5-coder-0.5b-instruct qwen2.5-coder-1.5b-instruct [--splits 200]
"""

from __future__ import annotations

import argparse
import itertools
import json
from collections import Counter
from pathlib import Path

import numpy as np

DATA = Path(__file__).resolve().parent.parent / "first_gguf" / "data"
MAX_K = 6


def load(name: str) -> tuple[np.ndarray, np.ndarray]:
    """(damage [prompt, layer], NaN for protected layers; family per prompt) of a zoo model's labels."""
    with open(DATA / f"{name}.damage.jsonl") as f:
        rows = [json.loads(line) for line in f][1:]
    kl = np.array([[np.nan if x is None else x for x in r["kl"]] for r in rows], dtype=np.float64)
    return kl, np.array([r["family"] for r in rows])


def curves(kl: np.ndarray, fam: np.ndarray, families: list[str], choose: np.ndarray, score: np.ndarray,
           per_family: bool) -> dict[str, list[float]]:
    """Family -> summed damage on ``score`` of the first k layers (k = 0..MAX_K) of the order chosen on ``choose``."""
    free = [i for i in range(kl.shape[1]) if not np.isnan(kl[:, i]).all()]
    out = {}
    for f in families:
        chosen = choose & (fam == f) if per_family else choose
        order = sorted(free, key=lambda i: np.nanmean(kl[chosen, i]))
        rows = kl[score & (fam == f)]
        out[f] = [float(np.nanmean(np.nansum(rows[:, order[:k]], axis=1))) for k in range(MAX_K + 1)]
    return out


def best_counts(curve: dict[str, list[float]], families: list[str], total: int) -> tuple[int, ...]:
    """Counts per family summing to ``total`` with the least summed damage on ``curve``."""
    options = (c for c in itertools.product(range(MAX_K + 1), repeat=len(families)) if sum(c) == total)
    return min(options, key=lambda c: sum(curve[f][k] for f, k in zip(families, c)))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("models", nargs="+")
    ap.add_argument("--splits", type=int, default=200)
    args = ap.parse_args()
    for name in args.models:
        kl, fam = load(name)
        families = sorted(set(fam))
        free = ~np.isnan(kl).all(axis=0)
        print(f"{name}: {len(fam)} labelled prompts; mean single-layer damage of the 4 least damaging layers "
              f"per family: " + ", ".join(f"{f} {np.mean(np.sort(np.nanmean(kl[fam == f][:, free], 0))[:4]):.4f}"
                                          for f in families))
        results: dict[int, list] = {}
        for seed in range(args.splits):
            rng = np.random.default_rng(seed)
            a = np.zeros(len(fam), bool)
            for f in families:
                idx = rng.permutation(np.flatnonzero(fam == f))
                a[idx[: len(idx) // 2]] = True
            b = ~a
            one_a, one_b = curves(kl, fam, families, a, a, False), curves(kl, fam, families, a, b, False)
            fam_a, fam_b = curves(kl, fam, families, a, a, True), curves(kl, fam, families, a, b, True)
            for k in (1, 2, 3):
                total = k * len(families)
                c1, c2 = best_counts(one_a, families, total), best_counts(fam_a, families, total)
                score = lambda curve, counts: float(np.mean([curve[f][n] for f, n in zip(families, counts)]))  # noqa: E731
                results.setdefault(k, []).append((score(one_b, (k,) * len(families)),
                                                  score(fam_b, (k,) * len(families)),
                                                  score(one_b, c1), score(fam_b, c2), c1))
        print(f"  held-out summed damage, mean of {args.splits} splits (families {', '.join(families)}):")
        for k, rows in results.items():
            v = np.array([r[:4] for r in rows])
            counts = Counter(r[4] for r in rows).most_common(3)
            change, lower = v[:, 2].mean() / v[:, 0].mean() - 1, np.mean(v[:, 2] < v[:, 0])
            print(f"  mean {k} layer(s): one order, one count {v[:, 0].mean():.4f}; an order per family "
                  f"{v[:, 1].mean():.4f}; one order, a count per family {v[:, 2].mean():.4f} ({change:+.1%}, "
                  f"lower in {lower:.0%} of splits); both {v[:, 3].mean():.4f}; counts chosen most often {counts}")


if __name__ == "__main__":
    main()

"""Quality of a strategy against the full model: teacher-forced and greedy agreement.

Teacher forcing: both models read the same tokens (the reference's own greedy continuation)
and are compared position by position; the logits of each position are the distribution
over the next token. All arithmetic is float64 whatever the input dtype.
"""

from __future__ import annotations

import math
from typing import Sequence

import numpy as np

from ..errors import FirstError


def log_softmax(logits: np.ndarray) -> np.ndarray:
    """Log-probabilities over the last axis, in float64 (max-shifted for stability)."""
    x = np.asarray(logits, dtype=np.float64)
    x = x - x.max(axis=-1, keepdims=True)
    return x - np.log(np.exp(x).sum(axis=-1, keepdims=True))


def teacher_forced(ref_logits: np.ndarray, logits: np.ndarray, targets: Sequence[int]) -> dict:
    """Compare a model with the reference on the positions that predict ``targets``.

    Args:
        ref_logits: [n, vocab] logits of the reference (full) model.
        logits: [n, vocab] logits of the model under test, at the same positions.
        targets: [n] the tokens those positions predict (the reference's greedy continuation).

    Returns:
        ``n``; ``top1``, the fraction of positions whose argmax equals the reference's;
        ``kl``, the mean KL(reference || model) in nats; ``nll``, the mean negative
        log-likelihood of ``targets`` under ``logits``; ``ppl`` = exp(nll).
    """
    ref = np.asarray(ref_logits, dtype=np.float64)
    cur = np.asarray(logits, dtype=np.float64)
    if ref.ndim != 2 or ref.shape[0] == 0:
        raise FirstError(f"ref_logits must be [n, vocab] with n >= 1, got shape {ref.shape}")
    if cur.shape != ref.shape:
        raise FirstError(f"logits shape {cur.shape} differs from ref_logits shape {ref.shape}")
    tgt = _targets(ref, targets)
    if not (np.isfinite(ref).all() and np.isfinite(cur).all()):
        raise FirstError("logits must be finite (a NaN or an infinity would poison every mean)")
    ref_lp, cur_lp = log_softmax(ref), log_softmax(cur)
    n = ref.shape[0]
    mean_nll = float(-cur_lp[np.arange(n), tgt].mean())
    return {
        "n": n,
        "top1": float((cur.argmax(axis=-1) == ref.argmax(axis=-1)).mean()),
        "kl": float((np.exp(ref_lp) * (ref_lp - cur_lp)).sum(axis=-1).mean()),
        "nll": mean_nll,
        "ppl": math.exp(mean_nll),
    }


def nll(logits: np.ndarray, targets: Sequence[int]) -> float:
    """Mean negative log-likelihood of ``targets`` under ``logits`` [n, vocab] (teacher_forced's
    ``nll`` without a reference: one log-sum-exp per row, no KL)."""
    x = np.asarray(logits, dtype=np.float64)
    if x.ndim != 2 or x.shape[0] == 0:
        raise FirstError(f"logits must be [n, vocab] with n >= 1, got shape {x.shape}")
    tgt = _targets(x, targets)
    if not np.isfinite(x).all():
        raise FirstError("logits must be finite (a NaN or an infinity would poison every mean)")
    top = x.max(axis=-1)
    lse = top + np.log(np.exp(x - top[:, None]).sum(axis=-1))
    return float((lse - x[np.arange(x.shape[0]), tgt]).mean())


def _targets(logits: np.ndarray, targets: Sequence[int]) -> np.ndarray:
    tgt = np.asarray(targets)
    if tgt.shape != (logits.shape[0],) or not np.issubdtype(tgt.dtype, np.integer):
        raise FirstError(f"targets must be {logits.shape[0]} integers, got shape {tgt.shape} ({tgt.dtype})")
    if tgt.min() < 0 or tgt.max() >= logits.shape[1]:
        raise FirstError(f"targets must lie in 0..{logits.shape[1] - 1}, got {tgt.min()}..{tgt.max()}")
    return tgt


def greedy_agreement(ref_tokens: Sequence[int], tokens: Sequence[int]) -> dict:
    """How far a greedy generation follows the reference's greedy generation.

    Returns:
        ``prefix``, the length of the common prefix; ``prefix_fraction`` = prefix /
        len(ref_tokens) (1.0 when both are empty, 0.0 when only the reference is);
        ``exact``, whether the two sequences are equal.
    """
    ref, cur = [int(t) for t in ref_tokens], [int(t) for t in tokens]
    prefix = next((i for i, (a, b) in enumerate(zip(ref, cur)) if a != b), min(len(ref), len(cur)))
    if ref:
        fraction = prefix / len(ref)
    else:
        fraction = 1.0 if not cur else 0.0
    return {"prefix": prefix, "prefix_fraction": fraction, "exact": ref == cur}


def aggregate(rows: Sequence[dict]) -> dict:
    """Means over rows of the same keys (e.g. one row per prompt).

    If the rows carry a count ``n`` (teacher_forced does: its positions), each row weighs
    ``n`` and the result's ``n`` is the total, so the means are per position, not per
    prompt; otherwise every row weighs 1. Booleans average to fractions. ``ppl`` is
    recomputed as exp of the pooled ``nll`` (a mean of perplexities is not a perplexity).
    """
    if not rows:
        raise FirstError("cannot aggregate no rows")
    keys = list(rows[0])
    if any(set(r) != set(keys) for r in rows):
        raise FirstError(f"rows to aggregate must share their keys, the first has {keys}")
    weights = np.array([r["n"] for r in rows] if "n" in keys else [1] * len(rows), dtype=np.float64)
    total = weights.sum()
    if total <= 0:
        raise FirstError("rows to aggregate have a total count n of 0")
    out = {k: int(total) if k == "n" else float(np.dot(weights, [float(r[k]) for r in rows]) / total)
           for k in keys}
    if "ppl" in out and "nll" in out:
        out["ppl"] = math.exp(out["nll"])
    return out

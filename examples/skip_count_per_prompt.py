"""Could a per-prompt skip count beat one fixed count? Measured on HumanEval rows of `first-gguf eval`.

The fixed masks ``static-kl-K`` (the K layers of least measured damage) are nested, and a
greedy decode with a given mask is the same whoever chose the mask, so every per-prompt
policy "skip K(prompt) layers of that order" can be scored from the rows already run:
problem p passes under the policy exactly when ``static-kl-K(p)`` passed on it.

The prompt signals are what the runtime has after the prefill, at full depth: the entropy
of the next-token distribution at the last prompt token, the prompt's mean token NLL and
its length. Policies split the problems at a signal's median and give one half K+1 layers
and the other K-1 (mean count K, nothing fitted to the results), in either direction.

    python examples/skip_count_per_prompt.py docs/results/qwen2.5-coder-0.5b-instruct [--threads 2]
    python examples/skip_count_per_prompt.py docs/results/qwen2.5-coder-0.5b-instruct-chat50 --task humaneval-chat
"""

from __future__ import annotations

import argparse
import json
from collections import Counter, defaultdict
from pathlib import Path

import numpy as np


def passes(run_dir: Path, task: str) -> dict[str, dict[str, bool]]:
    """strategy -> HumanEval id -> passed, from a run directory's scored rows of ``task``."""
    out: dict[str, dict[str, bool]] = defaultdict(dict)
    with open(run_dir / "rows.jsonl") as f:
        for line in f:
            row = json.loads(line)
            if row.get("task") == task and "status" in row:
                out[row["strategy"]][row["id"]] = row["status"] == "passed"
    return out


def signals(task: str, limit: int, threads: int) -> dict[str, dict[str, float]]:
    """Per HumanEval id: last-token entropy, mean prompt NLL and length, from a full-depth prefill
    of the prompt as ``task`` asks it (raw, or through the chat template)."""
    from first_gguf.evaluation.items import humaneval_chat_items, humaneval_items
    from first_gguf.models import DEFAULT_MODEL, fetch
    from first_gguf.runtime import FirstModel

    llm = FirstModel(str(fetch(DEFAULT_MODEL)), mode="full", n_ctx=4096, n_threads=threads, logits_all=True,
                     verbose=False)
    items = (humaneval_items if task == "humaneval" else humaneval_chat_items)(llm, limit)
    out = {}
    for item in items:
        tokens = item.prompt
        llm.reset()
        llm.eval(tokens)
        logits = np.asarray(llm.scores[:len(tokens)], dtype=np.float64)
        logp = logits - logits.max(1, keepdims=True)
        logp -= np.log(np.exp(logp).sum(1, keepdims=True))
        nll = -logp[np.arange(len(tokens) - 1), tokens[1:]]
        out[item.id] = {"entropy": float(-(np.exp(logp[-1]) * logp[-1]).sum()),
                        "nll": float(nll.mean()), "length": float(len(tokens))}
    return out


def _ranks(x: list[float]) -> np.ndarray:
    """Ranks with ties given their mean rank (as Spearman's coefficient wants)."""
    x = np.asarray(x, dtype=float)
    order = np.argsort(x, kind="stable")
    ranks = np.empty(len(x))
    ranks[order] = np.arange(len(x), dtype=float)
    for value in np.unique(x):
        tied = x == value
        ranks[tied] = ranks[tied].mean()
    return ranks


def spearman(a: list[float], b: list[float]) -> float:
    return float(np.corrcoef(_ranks(a), _ranks(b))[0, 1])


def report(p: dict[str, dict[str, bool]], sig: dict[str, dict[str, float]], ks: range) -> None:
    ids = sorted(i for i in sig if i in p["full"])
    fixed = {k: p["full"] if k == 0 else p[f"static-kl-{k}"] for k in range(0, max(ks) + 2)}
    solved = [i for i in ids if p["full"][i]]
    safe = {i: next((k - 1 for k in range(1, max(ks) + 2) if not fixed[k][i]), max(ks) + 1) for i in solved}
    survived = Counter(safe.values())
    print(f"full solves {len(solved)}; how many layers of the fixed order each survives "
          f"(layers: problems): {dict(sorted(survived.items()))}")
    for name in ("entropy", "nll", "length"):
        rho = spearman([sig[i][name] for i in solved], [safe[i] for i in solved])
        print(f"\n{name}: Spearman with the layers survived, over problems full solves: {rho:+.2f}")
        order = sorted(ids, key=lambda i: sig[i][name])  # low signal (easy) first
        for k in ks:
            low = {i: k + 1 if j < len(order) // 2 else k - 1 for j, i in enumerate(order)}
            high = {i: 2 * k - n for i, n in low.items()}
            print(f"  mean {k} layers: fixed {_score(fixed, dict.fromkeys(ids, k), solved)}; one more where "
                  f"{name} is low {_score(fixed, low, solved)}; one more where it is high "
                  f"{_score(fixed, high, solved)}")
    rng = np.random.default_rng(0)
    for k in ks:
        split = [k + 1] * (len(ids) // 2) + [k - 1] * (len(ids) - len(ids) // 2)
        runs = [sum(fixed[n][i] for i, n in zip(ids, rng.permutation(split))) for _ in range(2000)]
        print(f"random halves, mean {k} layers: {np.mean(runs):.1f} solved (sd {np.std(runs):.1f})")


def _score(fixed: dict, count: dict[str, int], solved: list[str]) -> str:
    """Problems the policy ``count`` solves, and how many of those are ones full solves."""
    got = [i for i, k in count.items() if fixed[k][i]]
    return f"{len(got)} ({len(set(got) & set(solved))} of full's {len(solved)})"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("run_dir", type=Path)
    ap.add_argument("--task", choices=("humaneval", "humaneval-chat"), default="humaneval")
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    p = passes(args.run_dir, args.task)
    ks = range(1, max(int(s.rsplit("-", 1)[1]) for s in p if s.startswith("static-kl-")))
    report(p, signals(args.task, len(p["full"]), args.threads), ks)


if __name__ == "__main__":
    main()

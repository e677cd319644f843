"""How much of the per-prompt room in the damage labels is real? A split-half test.

The labels (``first-gguf damage``) say that choosing the skipped layers per prompt would cost
35-50% less KL than one fixed set. That figure picks, per prompt, the least of many noisy
means over 32 tokens, in the same sample it is scored on. Here the damage of skipping each
candidate layer is measured token by token along the full model's greedy continuation
(teacher-forced, on the runtime's fork/branch API: the weights that run), and a policy
chooses each prompt's set from the first G tokens (the *probe*) and is scored on the
tokens after them. Such a probe sees the skipped model on the very text it will write, so
it bounds what any prompt-level router (which sees less) can take of that room. The
fixed set is the shipped labels' order (other prompts).

    python examples/damage_split_half.py measure qwen2.5-coder-0.5b-instruct probe-0.5b.jsonl \
        --per-family 24 --layers 4,9,3,5,8,10,7,11,6,12 --threads 2
    python examples/damage_split_half.py report probe-0.5b.jsonl --model qwen2.5-coder-0.5b-instruct

Measuring costs one branch per candidate layer and prompt (about 9.5 s per prompt for the
0.5B with 10 layers and 64 tokens, 17 s for the 1.5B, two threads); the file is resumable.
Prompts are the built-in families' held-out split (never HumanEval).
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import numpy as np


def measure(model: str, out: Path, per_family: int, tokens: int, layers: list[int], threads: int | None,
            seed: int) -> None:
    """Append one row per held-out prompt: per-token KL of skipping each of ``layers`` alone."""
    from first_gguf.evaluation.items import LlamaTokenizer
    from first_gguf.evaluation.metrics import log_softmax
    from first_gguf.prompts import Limits, builtin_examples
    from first_gguf.runtime import FirstModel
    from first_gguf.runtime.greedy import greedy
    from first_gguf.shipped import resolve_model

    llm = FirstModel(resolve_model(model), mode="full", n_ctx=160 + tokens + 8, n_batch=512, n_threads=threads,
                     logits_all=True)
    examples = builtin_examples(LlamaTokenizer(llm), Limits(160, tokens, 4096), ["code", "instruct", "prose"],
                                per_family, seed=seed, split="heldout")
    done = {json.loads(line)["source"] for line in out.read_text().splitlines()} if out.exists() else set()
    everything = [True] * llm.n_layer
    with out.open("a") as f:
        for ex in (e for e in examples if e.source not in done):
            t0 = time.perf_counter()
            llm.configure(mode="full")
            cont = greedy(llm, ex.prompt, tokens).tokens
            if len(cont) < tokens:  # an answer that ends early has no held-out half
                continue
            llm.fork(list(ex.prompt))
            ref = log_softmax(llm.branch_logits(cont, everything).astype(np.float64))
            kl = {}
            for il in layers:
                mask = list(everything)
                mask[il] = False
                cur = log_softmax(llm.branch_logits(cont, mask).astype(np.float64))
                kl[str(il)] = np.round((np.exp(ref) * (ref - cur)).sum(-1), 5).tolist()
            f.write(json.dumps({"source": ex.source, "family": ex.family, "n_prompt": len(ex.prompt),
                                "cont": cont, "kl": kl}) + "\n")
            f.flush()
            print(f"{ex.family:9s} {len(ex.prompt):4d} prompt tokens  {time.perf_counter() - t0:5.1f} s", flush=True)


def sign_p(wins: int, losses: int) -> float:
    """Two-sided exact sign test."""
    n = wins + losses
    if n == 0:
        return 1.0
    tail = sum(math.comb(n, i) for i in range(min(wins, losses) + 1)) / 2 ** n
    return min(1.0, 2 * tail)


def report(path: Path, order: list[int], probes: list[int], ks: list[int]) -> None:
    """Fixed set (``order``) against the probe's choice and the in-sample oracle, on held-out tokens."""
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    layers = [int(k) for k in rows[0]["kl"]]
    kl = np.array([[r["kl"][str(il)] for il in layers] for r in rows])  # [prompt, layer, token]
    fixed_order = [layers.index(il) for il in order if il in layers]
    print(f"{path}: {len(rows)} prompts, {kl.shape[2]} tokens, candidates {layers}; fixed order {order[:max(ks)]}")
    print("Row 0 is the prompt's own prediction (full depth in every branch), so the probe is rows 1..G.")
    print("| probe G | held-out tokens | k | fixed | probe's choice | wins / losses (p) | oracle on the probe | "
          "oracle in-sample |")
    print("|---|---|---|---|---|---|---|---|")
    for g in probes:
        probe, held = kl[:, :, 1:g + 1].mean(-1), kl[:, :, g + 1:].mean(-1)
        for k in ks:
            fixed = held[:, fixed_order[:k]].sum(1)
            chosen = np.take_along_axis(held, np.argsort(probe, 1)[:, :k], 1).sum(1)
            # what the probe's own oracle claims: its best set scored on the probe itself
            claim = np.sort(probe, 1)[:, :k].sum(1)
            oracle = np.sort(held, 1)[:, :k].sum(1)
            w, lo = int((chosen < fixed).sum()), int((chosen > fixed).sum())
            print(f"| {g} | {kl.shape[2] - g - 1} | {k} | {fixed.mean():.4f} | {chosen.mean():.4f} "
                  f"({chosen.mean() / fixed.mean() - 1:+.0%}) | {w} / {lo} ({sign_p(w, lo):.2f}) | {claim.mean():.4f} | "
                  f"{oracle.mean():.4f} |")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    m = sub.add_parser("measure")
    m.add_argument("model")
    m.add_argument("out", type=Path)
    m.add_argument("--per-family", type=int, default=24)
    m.add_argument("--tokens", type=int, default=64)
    m.add_argument("--layers", required=True, help="comma-separated candidate layers")
    m.add_argument("--threads", type=int, default=None)
    m.add_argument("--seed", type=int, default=7)
    r = sub.add_parser("report")
    r.add_argument("file", type=Path)
    r.add_argument("--model", required=True, help="zoo model whose shipped labels give the fixed order")
    r.add_argument("--probes", default="8,16,32")
    r.add_argument("--ks", default="1,2,3")
    a = ap.parse_args()
    if a.cmd == "measure":
        measure(a.model, a.out, a.per_family, a.tokens, [int(x) for x in a.layers.split(",")], a.threads, a.seed)
        return
    from first_gguf.damage import damage_order, read_labels
    from first_gguf.shipped import shipped_labels_path

    labels = shipped_labels_path(a.model)
    if labels is None:
        raise SystemExit(f"no shipped damage labels for {a.model!r}")
    _, label_rows = read_labels(labels)
    n_layer = len(label_rows[0]["kl"])
    protected = [i for i, v in enumerate(label_rows[0]["kl"]) if v is None]
    report(a.file, damage_order(label_rows, n_layer, protected), [int(x) for x in a.probes.split(",")],
           [int(x) for x in a.ks.split(",")])


if __name__ == "__main__":
    main()

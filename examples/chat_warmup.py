"""HumanEval through the chat template with the first decode steps at full depth, then a skip set.

FiRST fixes the decode mask after the prompt. A decode may also run its first K steps at full
depth and skip from then on: a layer skipped from step K on is never read again, so the KV
cache stays valid (the reverse, skipping first and running the layer later, is what would
read entries that were never written). Through the chat template the 0.5B's layers 3, 4 lose
24 of their 40 lost answers to one token: a stray ``python`` line under the opening fence, the
answer's fourth token (docs/TRAINING.md, "How skipped layers lose chat answers"). This script
measures what running those first steps at full depth gives: the same problems, prompts, stop
rule, budget and scoring as ``first-gguf eval --tasks humaneval-chat``, on the runtime (the
mode changes between two decode steps of one sequence), one row per problem.

    python examples/chat_warmup.py qwen2.5-coder-0.5b-instruct --skip 3,4 --warmup 4 -o warmup-3-4-k4.jsonl

About 6 s per problem for the 0.5B on two threads (all 164: 16 min).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np


def main() -> None:
    from first_gguf.evaluation import humaneval_chat
    from first_gguf.evaluation.items import humaneval_chat_items
    from first_gguf.evaluation.sandbox import run_programs
    from first_gguf.runtime import FirstModel
    from first_gguf.shipped import resolve_model

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("model")
    ap.add_argument("--skip", required=True, help="the decode skip set, e.g. 3,4")
    ap.add_argument("--warmup", type=int, required=True, help="decode steps at full depth before the skip set")
    ap.add_argument("-o", "--out", type=Path, required=True)
    ap.add_argument("--limit", type=int, help="first N problems only")
    ap.add_argument("--max-new-tokens", type=int, default=384, help="beyond the restated prompt, as eval")
    ap.add_argument("--threads", type=int)
    a = ap.parse_args()

    llm = FirstModel(resolve_model(a.model), mode="full", n_ctx=2048, n_threads=a.threads, verbose=False)
    skip = {int(x) for x in a.skip.split(",")}
    keep = [i not in skip for i in range(llm.n_layer)]
    rows, programs = [], []
    for it in humaneval_chat_items(llm, a.limit):
        t0 = time.perf_counter()
        llm.configure(mode="full")
        llm.prefill(list(it.prompt))
        tokens: list[int] = []
        text = ""
        while True:
            tok = int(np.argmax(llm.last_logits(copy=False)))
            if llm.is_eog(tok):
                break
            tokens.append(tok)
            text = llm.detokenize(tokens).decode("utf-8", errors="ignore")
            if len(tokens) >= a.max_new_tokens + it.restated or humaneval_chat.block_closed(text):
                break
            if len(tokens) == a.warmup:  # tokens 1..warmup came from full-depth decode steps
                llm.configure(mode="mask", mask=keep, prefill="full")
            llm.eval([tok])
        rows.append({"id": it.id, "skip": sorted(skip), "warmup": a.warmup, "tokens": tokens, "text": text,
                     "seconds": round(time.perf_counter() - t0, 3)})
        programs.append(humaneval_chat.program(it.problem, humaneval_chat.extract_code(text)))
    for row, outcome in zip(rows, run_programs(programs)):
        row["status"] = "passed" if outcome.passed else "failed"
    a.out.write_text("".join(json.dumps(r) + "\n" for r in rows))
    print(f"passed {sum(r['status'] == 'passed' for r in rows)} of {len(rows)}")


if __name__ == "__main__":
    main()

"""Streaming multi-turn chat with a FiRST-GGUF on the CPU.

    python examples/chat.py MODEL.first.gguf [--threshold 0.5]

Each turn prints which layers the routers dropped for that answer. The KV cache is reused
across turns within docs/FORMAT.md's rules (positions decoded under a mask are recomputed).
"""

from __future__ import annotations

import argparse
import sys

from first_gguf.runtime import FirstModel


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("model")
    ap.add_argument("--threshold", type=float, default=None)
    ap.add_argument("--max-tokens", type=int, default=256)
    ap.add_argument("--threads", type=int, default=None)
    args = ap.parse_args()
    llm = FirstModel(args.model, threshold=args.threshold, n_ctx=4096, n_threads=args.threads)
    messages = [{"role": "system", "content": "You are a concise coding assistant."}]
    while True:
        try:
            user = input("\nyou> ").strip()
        except EOFError:
            break
        if not user:
            continue
        messages.append({"role": "user", "content": user})
        answer = []
        for chunk in llm.create_chat_completion(messages, max_tokens=args.max_tokens, stream=True):
            piece = chunk["choices"][0]["delta"].get("content", "")
            answer.append(piece)
            print(piece, end="", flush=True)
        rep = llm.last_prefill
        print(f"\n[{rep.mode}: skipped layers {list(rep.skipped) or 'none'} of {len(rep.mask)}]", file=sys.stderr)
        messages.append({"role": "assistant", "content": "".join(answer)})


if __name__ == "__main__":
    main()

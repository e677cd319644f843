"""Write a tiny random Hugging Face model: the README's one-minute train -> convert -> chat example.

    python examples/tiny_model.py tiny-hf

A qwen2 decoder with 4 layers of width 64, seeded random weights, and the default zoo
model's real tokenizer and chat template (taken from its GGUF, so nothing is downloaded).
It speaks nonsense; every step of the pipeline runs on it as on a real model.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
from transformers import AutoTokenizer, Qwen2Config, Qwen2ForCausalLM

from first_gguf import models


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("out", type=Path, help="HF directory to write (must not exist)")
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    if args.out.exists():
        raise SystemExit(f"Error: {args.out} exists; choose a new directory")
    gguf = models.fetch(models.DEFAULT_MODEL)
    tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    torch.manual_seed(args.seed)
    cfg = Qwen2Config(vocab_size=max(tok.get_vocab().values()) + 1, hidden_size=64, intermediate_size=128,
                      num_hidden_layers=args.layers, num_attention_heads=4, num_key_value_heads=2,
                      max_position_embeddings=4096, tie_word_embeddings=True, rope_theta=1e6,
                      eos_token_id=tok.eos_token_id, initializer_range=0.15)
    model = Qwen2ForCausalLM(cfg)
    model.save_pretrained(args.out)
    tok.save_pretrained(args.out)
    print(args.out)


if __name__ == "__main__":
    main()

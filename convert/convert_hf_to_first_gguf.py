#!/usr/bin/env python3
"""Hugging Face model directory -> FiRST-GGUF (a thin script over ``first_gguf.convert.convert_hf``).

    python convert/convert_hf_to_first_gguf.py HF_DIR -o OUT.gguf [--routers R.safetensors]
        [--outtype f32|f16|bf16|q8_0|q4_k_m|...] [--force] [--threads N]

Runs llama.cpp's own convert_hf_to_gguf.py (from the pinned sdist), quantizes with the
library's llama_model_quantize, then attaches the routers. Progress on stderr; a failure is
one line on stderr and exit code 1.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


def main(argv: list[str] | None = None) -> int:
    from first_gguf.convert import OUTTYPES, convert_hf
    from first_gguf.errors import FirstError

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("hf_dir", type=Path, help="Hugging Face model directory (config.json, weights, tokenizer)")
    parser.add_argument("-o", "--output", type=Path, required=True, help="GGUF to write")
    parser.add_argument("--routers", type=Path, default=None,
                        help="router file (.safetensors); without it the output is a plain GGUF")
    parser.add_argument("--outtype", default="f16", choices=OUTTYPES, help="weight type (default: f16)")
    parser.add_argument("--force", action="store_true", help="overwrite OUTPUT if it exists")
    parser.add_argument("--threads", type=int, default=None, help="quantization threads (default: all cores)")
    args = parser.parse_args(argv)
    try:
        convert_hf(args.hf_dir, args.output, routers=args.routers, outtype=args.outtype, force=args.force,
                   threads=args.threads)
    except FirstError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("error: interrupted; no output written", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())

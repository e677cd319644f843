#!/usr/bin/env python3
"""Hugging Face model directory -> FiRST-GGUF (a thin script over ``first-gguf convert``).

    python convert/convert_hf_to_first_gguf.py HF_DIR -o OUT.gguf [--routers R.safetensors]
        [--outtype f32|f16|bf16|q8_0|q4_k_m|...] [--force] [--threads N]

Runs llama.cpp's own convert_hf_to_gguf.py (from the pinned sdist), quantizes with the
library's llama_model_quantize, then attaches the routers. The options are those of
``first-gguf convert`` (first_gguf/cli.py), which this script runs. Progress on stderr; a
failure is one line on stderr and exit code 1 (130 when interrupted).
"""

from __future__ import annotations

import sys
from pathlib import Path

import click


def main(argv: list[str] | None = None) -> int:
    from first_gguf.cli import convert
    from first_gguf.errors import FirstError

    try:  # not standalone: click's own Ctrl-C handling would exit 1 with "Aborted!"
        return convert.main(args=argv, prog_name=Path(__file__).name, standalone_mode=False,
                            help_option_names=["-h", "--help"]) or 0
    except FirstError as exc:
        click.ClickException(str(exc)).show()
        return 1
    except click.ClickException as exc:  # usage errors: exit 2, as the CLI's
        exc.show()
        return exc.exit_code
    except (click.Abort, KeyboardInterrupt):
        print("Error: interrupted; no output written", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())

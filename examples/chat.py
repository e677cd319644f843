"""Streaming multi-turn chat with a FiRST-GGUF: the same as ``first-gguf chat`` (first_gguf/chat.py).

    python examples/chat.py [MODEL] [--threshold 0.5] [--max-tokens 256] [--threads N]

Type /help inside for the commands.
"""

import sys

from first_gguf.cli import cli

if __name__ == "__main__":
    cli(["chat", *sys.argv[1:]])

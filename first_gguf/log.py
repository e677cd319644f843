"""The one progress logger: ``[first-gguf STAGE] message`` lines on stderr (data goes to stdout)."""

from __future__ import annotations

import sys
from typing import Callable


def logger(stage: str) -> Callable[[str], None]:
    """A function printing progress messages of ``stage`` (e.g. "build") to stderr, flushed."""

    def log(msg: str) -> None:
        print(f"[first-gguf {stage}] {msg}", file=sys.stderr, flush=True)

    return log

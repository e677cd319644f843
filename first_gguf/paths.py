"""Where first-gguf keeps its caches and finds its own source checkout."""

from __future__ import annotations

import os
from pathlib import Path

ENV_CACHE = "FIRST_GGUF_CACHE"


def cache_dir() -> Path:
    """Root of every cache (built wheels, sdists, assembled models).

    ``$FIRST_GGUF_CACHE`` if set, else ``$XDG_CACHE_HOME/first-gguf``, else ``~/.cache/first-gguf``.
    """
    if os.environ.get(ENV_CACHE):
        return Path(os.environ[ENV_CACHE]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base).expanduser() / "first-gguf"


def repo_root() -> Path:
    """The source checkout this package was imported from (holds ``patches/``)."""
    return Path(__file__).resolve().parent.parent

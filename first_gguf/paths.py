"""Where first-gguf keeps its caches and finds its own source checkout, and how it writes outputs.

Every writer of an output file (attach, prune, router files, convert, training) goes through
``check_output_path`` (never the input, never an existing file without ``--force``) and
writes to a temporary name next to the output that is renamed into place only on success
(``atomic_output``; ``ScratchFiles`` and ``move_output`` for a pipeline of intermediate files).
"""

from __future__ import annotations

import contextlib
import os
import secrets
from pathlib import Path
from typing import Iterator

from .errors import FirstError

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


def check_output_path(out: Path, force: bool, inputs: tuple[Path, ...] = ()) -> None:
    """Refuse an output that is one of the inputs (always) or exists (unless ``force``)."""
    for src in inputs:
        if out.resolve() == src.resolve() or (out.exists() and src.exists() and out.samefile(src)):
            raise FirstError(f"{out}: the output would overwrite the input {src}; write to another file")
    if out.is_dir():
        raise FirstError(f"{out} is a directory")
    if out.exists() and not force:
        raise FirstError(f"{out} exists; pass --force")
    if not out.parent.is_dir():
        raise FirstError(f"{out.parent}: no such directory")


def temp_path(out: Path, stage: str = "") -> Path:
    """A fresh hidden name next to ``out`` (same directory, so a rename is atomic)."""
    return out.with_name(f".{out.name}.{secrets.token_hex(6)}{'.' + stage if stage else ''}.tmp")


@contextlib.contextmanager
def atomic_output(out: Path) -> Iterator[Path]:
    """Yield a fresh temporary path next to ``out``; rename it to ``out`` if the block succeeds.

    On any exception (KeyboardInterrupt too) the temporary file is removed and ``out`` is
    untouched, so a reader never sees half a file.
    """
    tmp = temp_path(out)
    try:
        os.close(os.open(tmp, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o666))  # mode follows the umask
    except OSError as exc:
        raise FirstError(f"{out}: cannot write next to it ({exc.strerror})") from None
    mode = tmp.stat().st_mode & 0o777
    try:
        yield tmp
        os.chmod(tmp, mode)  # some writers (safetensors) recreate the file as 0600
        os.replace(tmp, out)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def move_output(done: Path, out: Path, force: bool) -> Path:
    """Rename a finished temporary file (next to ``out``) onto ``out``, checking ``out`` again:
    it may have appeared while the file was being made."""
    check_output_path(out, force)
    os.replace(done, out)
    return out


class ScratchFiles:
    """Temporary files next to an output, all removed on exit (success or any failure)."""

    def __init__(self, out: Path):
        self.out, self.paths = out, []

    def path(self, stage: str) -> Path:
        """A new temporary name for one stage's file."""
        p = temp_path(self.out, stage)
        self.paths.append(p)
        return p

    def __enter__(self) -> "ScratchFiles":
        return self

    def __exit__(self, *exc) -> None:
        for p in self.paths:
            p.unlink(missing_ok=True)

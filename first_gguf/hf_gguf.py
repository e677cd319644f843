"""Loading a GGUF into transformers with its header parsed once.

transformers reads a GGUF through gguf-py's ``GGUFReader`` once per ``from_pretrained`` step
(the config twice, the tokenizer, the model: four parses), and that reader parses the
tokenizer's 151k-entry arrays element by element: 9-21 s per parse on our models here, most of
``first-gguf thin`` / ``heal`` / ``train``'s start-up. Inside ``one_parse_per_file()`` every
``GGUFReader(path)`` of the same file returns the first reader (read-only, memory-mapped), so the
file is parsed once; the reader is restored on exit.
"""

from __future__ import annotations

import os
from contextlib import contextmanager
from typing import Iterator


@contextmanager
def one_parse_per_file() -> Iterator[None]:
    """Within the block, ``gguf.GGUFReader(path)`` (read-only) parses each file once."""
    import gguf

    original = gguf.GGUFReader
    readers: dict[tuple[str, int, int], object] = {}

    def reader(path, mode="r"):
        if mode != "r":
            return original(path, mode)
        st = os.stat(path)
        key = (os.path.realpath(path), st.st_size, st.st_mtime_ns)
        if key not in readers:
            readers[key] = original(path, mode)
        return readers[key]

    gguf.GGUFReader = reader
    try:
        yield
    finally:
        gguf.GGUFReader = original

"""The files a bench compares, on equal footing.

Decode reads every weight it uses once per token, so its speed follows how the page cache
holds the file: a file whose cached pages are scattered 4 KiB frames (an old file on a busy
machine) streams measurably slower than a freshly written one whose pages lie in physically
contiguous runs (docs/SPEED.md, "Why reduced decode trails a pruned file"). ``fresh_copy``
writes every file a bench compares anew, the same way, at the start of the run; ``page_run``
tells how contiguous a file's cached pages are.
"""

from __future__ import annotations

import mmap
import sys
from pathlib import Path

CHUNK = 16 << 20  # large writes: the page cache takes them in large folios where it can


def fresh_copy(src: Path, dst: Path) -> Path:
    """Copy ``src`` to ``dst`` in 16 MiB writes (new page-cache pages); returns ``dst``."""
    with open(src, "rb") as f, open(dst, "wb") as g:
        while chunk := f.read(CHUNK):
            g.write(chunk)
    return dst


def page_run(path: Path) -> float | None:
    """Mean length, in pages, of the physically contiguous runs of page frames that hold ``path``
    in the page cache (every page is faulted in first; 1.0 = scattered frames).

    Returns:
        None where frame numbers cannot be read (not Linux, or without CAP_SYS_ADMIN, which
        ``/proc/self/pagemap`` needs to show them).
    """
    if sys.platform != "linux":
        return None
    import numpy as np

    size = path.stat().st_size
    with open(path, "rb") as f, mmap.mmap(f.fileno(), size, access=mmap.ACCESS_READ) as m:
        view = np.frombuffer(m, dtype=np.uint8)
        view[::mmap.PAGESIZE].sum()  # fault every page in (reads only)
        first = view.ctypes.data // mmap.PAGESIZE
        n = (size + mmap.PAGESIZE - 1) // mmap.PAGESIZE
        try:
            with open("/proc/self/pagemap", "rb") as pm:
                pm.seek(first * 8)
                entries = np.frombuffer(pm.read(n * 8), dtype="<u8")
        except OSError:
            return None
        del view
    pfn = entries & np.uint64((1 << 55) - 1)
    present = (entries >> np.uint64(63)) == 1
    if not present.any() or not pfn[present].any():
        return None  # frame numbers hidden (no CAP_SYS_ADMIN)
    pfn, runs = pfn[present].astype(np.int64), 1
    runs += int(np.count_nonzero(np.diff(pfn) != 1))
    return round(len(pfn) / runs, 1)


def save_prompt_state(llm, path: Path, prompt: list[int]) -> None:
    """Write sequence 0's KV cache (the evaluated ``prompt``) to ``path`` (``--restore-prompt``)."""
    import llama_cpp

    toks = (llama_cpp.llama_token * len(prompt))(*prompt)
    if not llama_cpp.llama_state_seq_save_file(llm._ctx.ctx, str(path).encode(), 0, toks, len(prompt)):
        raise RuntimeError(f"could not write the prompt state {path}")


def load_prompt_state(llm, path: Path, prompt: list[int]) -> None:
    """Load ``path`` (saved by ``save_prompt_state`` for ``prompt``) into sequence 0 and leave
    the cache at its first ``len(prompt) - 1`` positions, so that evaluating the prompt's last
    token gives the logits the prompt's prefill gave, at the same context length."""
    import ctypes

    import llama_cpp

    toks = (llama_cpp.llama_token * len(prompt))()
    n = ctypes.c_size_t(0)
    got = llama_cpp.llama_state_seq_load_file(llm._ctx.ctx, str(path).encode(), 0, toks, len(prompt),
                                              ctypes.byref(n))
    if not got or list(toks[:n.value]) != list(prompt):
        raise RuntimeError(f"the prompt state {path} does not hold this prompt")
    llm.input_ids[:len(prompt)] = prompt
    llm.restored_full_depth(len(prompt) - 1)

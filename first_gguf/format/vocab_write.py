"""Write a short output vocabulary into a FiRST-GGUF (``docs/FORMAT.md`` section 8): ``first-gguf vocab``'s writer.

The FiRST-GGUF is rewritten byte for byte (``writer``), never in place: every key and tensor
as it is, but ``first.version`` (3) and any old ``first.vocab.*`` keys and ``first_output.weight``,
which are replaced; the new keys come last among the keys, the tensor last among the tensors.
The tensor is the listed rows of the output matrix (``output.weight``, else ``token_embd.weight``),
their stored bytes, in its type, or those rows requantized by ggml to ``qtype`` (``first.vocab.type``).
Written to a temporary file beside the output, read back and checked, renamed. numpy + gguf
(and ggml's quantizer for ``qtype``), never torch.
"""

from __future__ import annotations

import os
import types
from pathlib import Path
from typing import Any, Iterable

import numpy as np

from ..constants import KEY_VOCAB_TYPE, VOCAB_KEY_PREFIX, VOCAB_TENSOR, first_version_for
from ..errors import FirstError, FormatError
from ..paths import atomic_output, check_output_path
from .header import read_header
from .reader import Reader, first_parts_from_reader, model_dims
from .thin import thin_qtype
from .thin_write import requantized
from .vocab import VocabInfo, check_tokens, non_normal_tokens, output_matrix
from .writer import others_table, write_replacing_part


def plan_tokens(reader: Reader, where: str, tokens: Iterable[int]) -> np.ndarray:
    """``tokens`` (any order, repeats allowed) and every token of a type other than normal, ascending;
    checked against the model before anything is written."""
    n_vocab = int(output_matrix(reader, where).shape[1])
    ids = np.asarray(list(tokens))
    if ids.size and not np.issubdtype(ids.dtype, np.integer):
        raise FirstError(f"{where}: tokens must be integer ids, got {ids.dtype}")
    ids = ids.astype(np.int64).ravel()
    if ids.size and (ids.min() < 0 or ids.max() >= n_vocab):
        bad = int(ids.min() if ids.min() < 0 else ids.max())
        raise FirstError(f"{where}: token {bad} outside 0..{n_vocab - 1}")
    required = non_normal_tokens(reader)
    ids = np.union1d(ids, required)
    check_tokens(where, ids, n_vocab, required, error=FirstError)
    return ids


def write_vocab(path: str | os.PathLike, tokens: Iterable[int], out_path: str | os.PathLike,
                source: str | None = None, force: bool = False, qtype: str | None = None) -> Path:
    """Write the FiRST-GGUF ``path`` with a short output vocabulary; the input is never modified.

    Args:
        path: A valid FiRST-GGUF (any quantization); a short vocabulary it already carries is replaced,
            its thinned FFNs are kept.
        tokens: Token ids to list; every token of a type other than normal is added to them.
        out_path: Where to write; never the input.
        source: ``first.vocab.source`` (how the tokens were chosen), or None.
        force: Overwrite an existing output.
        qtype: A ggml type name (``format.thin.THIN_TYPES``): the rows are requantized to it (a
            decode-only copy: the listed tokens' logits then differ from ``full``'s by its rounding).

    Returns:
        The output path.
    """
    src, out = Path(path), Path(out_path)
    check_output_path(out, force, inputs=(src,))
    reader = read_header(src)
    parts = first_parts_from_reader(reader, str(src))
    arch, _, _ = model_dims(reader, str(src))
    ids = plan_tokens(reader, str(src), tokens)
    info = VocabInfo(tuple(int(i) for i in ids), source, qtype)
    matrix = output_matrix(reader, str(src))
    if qtype is None:
        rows = types.SimpleNamespace(data=np.ascontiguousarray(np.asarray(matrix.data)[ids]),
                                     tensor_type=matrix.tensor_type)
    else:
        kind = thin_qtype(str(src), qtype, int(matrix.shape[0]), KEY_VOCAB_TYPE, matrix.name)
        rows = types.SimpleNamespace(data=requantized(matrix, ids, kind, columns=False), tensor_type=kind)
    with atomic_output(out) as tmp:
        _write(reader, arch, info, rows, first_version_for(thin=parts.thin is not None, vocab=True,
                                                    attn=parts.thin is not None and parts.thin.attn), tmp)
        _verify(tmp, reader, info, rows, str(out))
    return out


def top_tokens(counts: np.ndarray, size: int) -> np.ndarray:
    """The ``size`` most frequent tokens of ``counts`` (one count per token id), ascending (ties: the lower id)."""
    return np.sort(np.argsort(-np.asarray(counts, dtype=np.int64), kind="stable")[:size])


def write_vocab_from_counts(path: str | os.PathLike, counts: np.ndarray, size: int, out_path: str | os.PathLike,
                            source: str | None = None, force: bool = False, qtype: str | None = None) -> Path:
    """``write_vocab`` listing the ``size`` most frequent tokens of ``counts`` (shape ``[n_vocab]``;
    ties: the lower id), plus every token of a type other than normal."""
    counts, reader = np.asarray(counts), read_header(path)
    n_vocab = int(output_matrix(reader, str(path)).shape[1])
    if counts.shape != (n_vocab,) or not np.issubdtype(counts.dtype, np.integer) or (counts < 0).any():
        raise FirstError(f"token counts of shape {list(counts.shape)} ({counts.dtype}) do not fit {path} "
                         f"(non-negative integers, {n_vocab} tokens)")
    if not 0 < size < n_vocab:
        raise FirstError(f"{path}: a short vocabulary of {size} tokens must have 1..{n_vocab - 1}")
    return write_vocab(path, top_tokens(counts, size), out_path, source=source, force=force, qtype=qtype)


def _write(reader: Reader, arch: str, info: VocabInfo, rows: Any, version: int, path: Path) -> None:
    """Every key in order (first.version set, old vocab keys dropped), then the vocab keys; every
    tensor but an old first_output.weight, then the new one."""
    write_replacing_part(reader, arch, path, version, VOCAB_KEY_PREFIX, _in_part, info.metadata(),
                         [(VOCAB_TENSOR, rows)])


def _in_part(name: str) -> bool:
    return name == VOCAB_TENSOR


def _verify(path: Path, base: Reader, info: VocabInfo, rows: Any, where: str) -> None:
    """Read the new file back: valid (rows byte for byte), its vocabulary as planned, everything else
    as in the input."""
    out = read_header(path)
    if first_parts_from_reader(out, where).vocab != info:
        raise FormatError(f"{where}: read-back check failed: the short vocabulary differs from the plan")
    if others_table(out, VOCAB_KEY_PREFIX, _in_part) != others_table(base, VOCAB_KEY_PREFIX, _in_part):
        raise FormatError(f"{where}: read-back check failed: keys or tensors beside the short vocabulary differ")
    got = next(t for t in out.tensors if t.name == VOCAB_TENSOR)
    if np.asarray(got.data).tobytes() != rows.data.tobytes():
        raise FormatError(f"{where}: read-back check failed: {VOCAB_TENSOR} differs from the planned bytes")

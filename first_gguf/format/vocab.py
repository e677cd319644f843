"""Short output vocabulary (first.version 3, ``docs/FORMAT.md`` section 8): read and check it.

A FiRST-GGUF may carry a list of tokens (``first.vocab.tokens``) and their rows of the output
matrix (``first_output.weight``, their stored bytes): reduced decode graphs compute only those
tokens' logits. The output matrix is ``output.weight``, or ``token_embd.weight`` when the output
is tied to the embeddings. ``vocab_from_reader`` applies every rule (keys, tensor, their
agreement, the rows byte for byte); the writer is ``vocab_write``. numpy + gguf only, never torch.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
from gguf import GGUFValueType

from ..constants import (
    FIRST_VERSION_VOCAB,
    KEY_TOKEN_TYPE,
    KEY_VERSION,
    KEY_VOCAB_SOURCE,
    KEY_VOCAB_TOKENS,
    KEY_VOCAB_TYPE,
    OUTPUT_TENSOR,
    TOKEN_EMBD_TENSOR,
    TOKEN_TYPE_NORMAL,
    VOCAB_KEYS,
    VOCAB_TENSOR,
)
from ..errors import FirstError, FormatError
from .thin import _pad4, _row_bytes, thin_qtype

# GGUF type of each first.vocab.* key: (type, array item type).
VOCAB_KEY_TYPES: dict[str, tuple[GGUFValueType, GGUFValueType | None]] = {
    KEY_VOCAB_TOKENS: (GGUFValueType.ARRAY, GGUFValueType.INT32),
    KEY_VOCAB_SOURCE: (GGUFValueType.STRING, None),
    KEY_VOCAB_TYPE: (GGUFValueType.STRING, None),
}
_SHOWN = 8  # token ids quoted in a message at most


@dataclass(frozen=True)
class VocabInfo:
    """What a file's first.vocab.* keys declare.

    Attributes:
        tokens: The short vocabulary's token ids, ascending.
        source: How they were chosen (free text), or None.
        qtype: The ggml type their rows were requantized to (``first.vocab.type``), or None:
            the output matrix's stored rows.
    """

    tokens: tuple[int, ...]
    source: str | None = None
    qtype: str | None = None

    @property
    def size(self) -> int:
        return len(self.tokens)

    def metadata(self) -> dict[str, object]:
        """The first.vocab.* keys -> values."""
        meta: dict[str, object] = {KEY_VOCAB_TOKENS: list(self.tokens)}
        meta |= {KEY_VOCAB_SOURCE: self.source} if self.source is not None else {}
        return meta | ({KEY_VOCAB_TYPE: self.qtype} if self.qtype is not None else {})


def output_matrix(reader: Any, where: str) -> Any:
    """The output matrix of an open GGUF: ``output.weight``, else (tied) ``token_embd.weight``."""
    tensors = {t.name: t for t in reader.tensors if t.name in (OUTPUT_TENSOR, TOKEN_EMBD_TENSOR)}
    t = tensors.get(OUTPUT_TENSOR, tensors.get(TOKEN_EMBD_TENSOR))
    if t is None:
        raise FormatError(f"{where}: no {OUTPUT_TENSOR} or {TOKEN_EMBD_TENSOR}; a short vocabulary needs the "
                          f"output matrix")
    if len(t.shape) != 2:
        raise FormatError(f"{where}: {t.name} has shape {tuple(int(n) for n in t.shape)}, expected [n_embd, n_vocab]")
    return t


def non_normal_tokens(reader: Any) -> np.ndarray:
    """Ids of the tokens whose ``tokenizer.ggml.token_type`` is not normal (1), ascending (int64)."""
    field = reader.fields.get(KEY_TOKEN_TYPE)
    if field is None:
        return np.zeros(0, dtype=np.int64)
    values = field.array() if hasattr(field, "array") else np.asarray(field.contents())
    return np.flatnonzero(np.asarray(values) != TOKEN_TYPE_NORMAL).astype(np.int64)


def check_tokens(where: str, tokens: np.ndarray, n_vocab: int, required: np.ndarray,
                 error: type[FirstError] = FormatError) -> None:
    """A short vocabulary's list: non-empty, ascending, distinct, in range, fewer than ``n_vocab``,
    containing every ``required`` (non-normal) token; ``error`` names ``where`` and the rule."""
    at = f"{where}: {KEY_VOCAB_TOKENS}"
    if len(tokens) == 0:
        raise error(f"{at} is empty; leave the first.vocab.* keys out instead")
    if np.any(np.diff(tokens) <= 0):
        i = int(np.flatnonzero(np.diff(tokens) <= 0)[0])
        raise error(f"{at} must be ascending and distinct ({int(tokens[i])} then {int(tokens[i + 1])} at "
                    f"{i}, {i + 1})")
    if tokens[0] < 0 or tokens[-1] >= n_vocab:
        bad = int(tokens[0] if tokens[0] < 0 else tokens[-1])
        raise error(f"{at} has token {bad}, outside 0..{n_vocab - 1}")
    if len(tokens) >= n_vocab:
        raise error(f"{at} lists all {n_vocab} tokens; a short vocabulary has fewer")
    if len(missing := np.setdiff1d(required, tokens)):
        shown = ", ".join(map(str, missing[:_SHOWN].tolist())) + (", ..." if len(missing) > _SHOWN else "")
        raise error(f"{at} lacks {len(missing)} tokens of a type other than normal ({KEY_TOKEN_TYPE} != "
                    f"{TOKEN_TYPE_NORMAL}): {shown}")


def vocab_from_reader(reader: Any, where: str, meta: dict[str, object], deep: bool = True) -> VocabInfo | None:
    """Check a file's short vocabulary (keys, tensor, their agreement); None when it has none.

    Args:
        reader: The open GGUF (``header.read_header`` or GGUFReader).
        where: Named in messages.
        meta: Its first.* values, types already checked (``reader._first_metadata``).
        deep: Also compare ``first_output.weight`` with the listed rows of the output matrix,
            byte for byte (the runtime's loader skips it, as for thinned FFNs); requantized rows
            (``first.vocab.type``) are checked by type and shape only.

    Raises:
        FormatError: naming ``where`` and the broken rule.
    """
    present = [k for k in VOCAB_KEYS if k in meta]
    tensor = next((t for t in reader.tensors if t.name == VOCAB_TENSOR), None)
    if not present:
        if tensor is not None:
            raise FormatError(f"{where}: tensor {VOCAB_TENSOR} without {KEY_VOCAB_TOKENS}")
        return None
    if meta[KEY_VERSION] < FIRST_VERSION_VOCAB:
        raise FormatError(f"{where}: {present[0]} in a {KEY_VERSION} {meta[KEY_VERSION]} file (a short output "
                          f"vocabulary needs {KEY_VERSION} {FIRST_VERSION_VOCAB})")
    if KEY_VOCAB_TOKENS not in meta:
        raise FormatError(f"{where}: {present[0]} without {KEY_VOCAB_TOKENS}")
    if tensor is None:
        raise FormatError(f"{where}: {KEY_VOCAB_TOKENS} without the tensor {VOCAB_TENSOR}")
    out = output_matrix(reader, where)
    n_embd, n_vocab = (int(n) for n in out.shape)
    tokens = np.asarray(meta[KEY_VOCAB_TOKENS], dtype=np.int64)
    check_tokens(where, tokens, n_vocab, non_normal_tokens(reader))
    want = (n_embd, len(tokens))
    if _pad4(tensor.shape) != _pad4(want):
        raise FormatError(f"{where}: {VOCAB_TENSOR} has shape {tuple(int(n) for n in tensor.shape)}, expected "
                          f"{want} (n_embd of {out.name}, {len(tokens)} tokens)")
    qname = meta.get(KEY_VOCAB_TYPE)
    want_type = out.tensor_type if qname is None else thin_qtype(where, qname, n_embd, KEY_VOCAB_TYPE, out.name)
    if tensor.tensor_type != want_type:
        why = f"the type of {out.name}" if qname is None else KEY_VOCAB_TYPE
        raise FormatError(f"{where}: {VOCAB_TENSOR} has type {tensor.tensor_type.name}, expected "
                          f"{want_type.name} ({why})")
    if deep and qname is None and not np.array_equal(_row_bytes(out.data)[tokens], _row_bytes(tensor.data)):
        raise FormatError(f"{where}: {VOCAB_TENSOR} is not the rows {KEY_VOCAB_TOKENS} of {out.name}")
    source = meta.get(KEY_VOCAB_SOURCE)
    return VocabInfo(tuple(int(i) for i in tokens), None if source is None else str(source),
                     None if qname is None else str(qname))


def vocab_bytes(reader: Any) -> tuple[int, int]:
    """(bytes of ``first_output.weight``, bytes of the output matrix); 0 for a missing one."""
    sizes = {t.name: int(t.n_bytes) for t in reader.tensors}
    return sizes.get(VOCAB_TENSOR, 0), sizes.get(OUTPUT_TENSOR, sizes.get(TOKEN_EMBD_TENSOR, 0))

"""Read a GGUF: open it safely, validate its FiRST part, read its routers.

numpy + gguf only, never torch. The read path (``validate_first_gguf``, ``read_routers``,
``is_first_gguf``, and ``inspection``) uses ``header.read_header``, which opens a real
model in milliseconds where gguf-py's GGUFReader takes seconds; ``open_gguf`` returns a
GGUFReader for callers that want gguf-py's own. The helpers below take either reader.

The GGUF stores router tensors with ``ne`` (innermost first) the reverse of the NumPy shape
(``constants.router_ne`` vs ``constants.router_shape``); validation messages quote ``ne``, as
gguf-dump shows it. A shape matches when it is equal after padding with trailing 1s to four
dims, as ggml compares shapes (llama.cpp's own writers drop trailing 1s). The rules themselves
are ``rules``', shared with the router files.
"""

from __future__ import annotations

import os
from typing import Any, NamedTuple

import gguf
from gguf import GGUFValueType

from ..constants import (
    FIRST_KEY_PREFIX,
    KEY_AGGREGATION,
    KEY_POINTS,
    KEY_POINTS_DEFAULT,
    KEY_PREFILL,
    KEY_PROTECTED_LAYERS,
    KEY_ROUTER_HIDDEN_SIZE,
    KEY_ROUTER_NORM_EPS,
    KEY_ROUTER_THRESHOLD,
    KEY_TRAIN_SOURCE,
    KEY_VERSION,
    POINT_KEYS,
    ROUTER_NAME_MARKER,
    THIN_KEYS,
    VOCAB_KEYS,
)
from ..errors import FormatError
from .header import GGUFHeader, read_header
from .points import Points, points_from_metadata
from .routers import RouterSet, routers_from_metadata
from .rules import KNOWN_KEYS, StoredTensor, check_keys_present, check_metadata, check_version, collect_layers
from .thin import THIN_KEY_TYPES, ThinInfo, thin_from_reader
from .vocab import VOCAB_KEY_TYPES, VocabInfo, vocab_from_reader

# GGUF type of each first.* key (docs/FORMAT.md section 2): (type, array item type).
KEY_TYPES: dict[str, tuple[GGUFValueType, GGUFValueType | None]] = {
    KEY_VERSION: (GGUFValueType.UINT32, None),
    KEY_ROUTER_HIDDEN_SIZE: (GGUFValueType.UINT32, None),
    KEY_ROUTER_NORM_EPS: (GGUFValueType.FLOAT32, None),
    KEY_ROUTER_THRESHOLD: (GGUFValueType.FLOAT32, None),
    KEY_PROTECTED_LAYERS: (GGUFValueType.ARRAY, GGUFValueType.INT32),
    KEY_AGGREGATION: (GGUFValueType.STRING, None),
    KEY_PREFILL: (GGUFValueType.STRING, None),
    KEY_TRAIN_SOURCE: (GGUFValueType.STRING, None),
    KEY_POINTS: (GGUFValueType.ARRAY, GGUFValueType.STRING),
    KEY_POINTS_DEFAULT: (GGUFValueType.STRING, None),
    **THIN_KEY_TYPES,
    **VOCAB_KEY_TYPES,
}
Reader = gguf.GGUFReader | GGUFHeader
_INT_TYPES = (GGUFValueType.UINT8, GGUFValueType.UINT16, GGUFValueType.UINT32, GGUFValueType.UINT64,
              GGUFValueType.INT8, GGUFValueType.INT16, GGUFValueType.INT32, GGUFValueType.INT64)


def open_gguf(path: str | os.PathLike) -> gguf.GGUFReader:
    """A GGUFReader, or FormatError naming the file and what is wrong with it.

    The file is checked by ``read_header`` first (milliseconds): its message names the broken
    field, and GGUFReader never meets a corrupt length.
    """
    read_header(path)
    try:
        return gguf.GGUFReader(path, "r")
    except FileNotFoundError:
        raise FormatError(f"{path}: no such file") from None
    except Exception as exc:  # noqa: BLE001 - ValueError, IndexError, KeyError, OSError, ... on bad bytes
        raise FormatError(f"{path}: not a readable GGUF file ({type(exc).__name__}: {exc})") from None


def field_type(field: Any) -> tuple[GGUFValueType, GGUFValueType | None]:
    """(type, item type) of a KV field; the item type of an empty array too (parts[3])."""
    if field.types[0] != GGUFValueType.ARRAY:
        return field.types[0], None
    return GGUFValueType.ARRAY, GGUFValueType(int(field.parts[3][0]))


def _type_name(vtype: tuple[GGUFValueType, GGUFValueType | None]) -> str:
    return vtype[0].name if vtype[1] is None else f"ARRAY[{vtype[1].name}]"


def int_key(reader: Reader, key: str) -> int | None:
    """The value of an integer-typed key, else None."""
    field = reader.fields.get(key)
    return int(field.contents()) if field is not None and field.types[0] in _INT_TYPES else None


def architecture(reader: Reader) -> str | None:
    """``general.architecture``, or None if it is missing or not a string."""
    field = reader.fields.get(gguf.Keys.General.ARCHITECTURE)
    if field is None or field.types[0] != GGUFValueType.STRING:
        return None
    return bytes(field.parts[-1]).decode("utf-8", "replace")


def model_dims(reader: Reader, where: str) -> tuple[str, int, int]:
    """(architecture, n_layer, n_embd) from ``general.architecture`` and its ``{arch}.*`` keys."""
    arch = architecture(reader)
    if arch is None:
        raise FormatError(f"{where}: no string key {gguf.Keys.General.ARCHITECTURE}")
    keys = [tpl.format(arch=arch) for tpl in (gguf.Keys.LLM.BLOCK_COUNT, gguf.Keys.LLM.EMBEDDING_LENGTH)]
    dims = [int_key(reader, key) for key in keys]
    for key, value in zip(keys, dims):
        if value is None:
            raise FormatError(f"{where}: no integer key {key}; cannot size the routers")
    return arch, dims[0], dims[1]


def _first_metadata(reader: Reader, where: str) -> dict[str, object]:
    """The first.* values, every key present with its exact GGUF type."""
    fields = {name: f for name, f in reader.fields.items() if name.startswith(FIRST_KEY_PREFIX)}
    if not fields:
        raise FormatError(f"{where}: not a FiRST-GGUF (no {FIRST_KEY_PREFIX}* keys)")
    version = fields.get(KEY_VERSION)
    if version is not None and field_type(version) == KEY_TYPES[KEY_VERSION]:
        check_version(where, version.contents())
    check_keys_present(where, list(fields), KNOWN_KEYS + POINT_KEYS + THIN_KEYS + VOCAB_KEYS)
    meta = {}
    for key, field in fields.items():
        got, want = field_type(field), KEY_TYPES[key]
        if got != want:
            raise FormatError(f"{where}: {key} has type {_type_name(got)}, expected {_type_name(want)}")
        try:
            meta[key] = field.contents()
        except UnicodeDecodeError:
            raise FormatError(f"{where}: {key} is not UTF-8") from None
    return meta


def _stored(tensor: Any) -> StoredTensor:
    shape = tuple(int(n) for n in tensor.shape)
    return StoredTensor(tensor.name, shape, tensor.tensor_type.name, tensor.data)


class FirstParts(NamedTuple):
    """Everything a valid FiRST-GGUF declares: routers, operating points, thinned FFNs and short
    output vocabulary (each None when absent)."""

    routers: RouterSet
    points: Points
    thin: ThinInfo | None
    vocab: VocabInfo | None = None


def first_parts_from_reader(reader: Reader, where: str, deep: bool = True) -> FirstParts:
    """Validate an open GGUF's FiRST part (messages name ``where``); return all of it. ``deep=False``
    leaves out the byte comparisons of thinned FFN rows and short-vocabulary rows with the base's
    (``thin.thin_from_reader``, ``vocab.vocab_from_reader``)."""
    arch, n_layer, n_embd = model_dims(reader, where)
    meta = _first_metadata(reader, where)
    check_metadata(where, meta, n_layer)
    stored = {t.name: _stored(t) for t in reader.tensors if ROUTER_NAME_MARKER in t.name}
    tensors = collect_layers(where, stored, n_layer, n_embd, meta[KEY_ROUTER_HIDDEN_SIZE], gguf_ne=True)
    thin = thin_from_reader(reader, where, meta, arch, n_layer, n_embd, deep)
    vocab = vocab_from_reader(reader, where, meta, deep)
    points = points_from_metadata(meta, where, n_layer, meta[KEY_PROTECTED_LAYERS], thin.layers if thin else (),
                                  has_vocab=vocab is not None)
    return FirstParts(routers_from_metadata(meta, n_layer, n_embd, tensors, where), points, thin, vocab)


def first_from_reader(reader: Reader, where: str, deep: bool = True) -> tuple[RouterSet, Points]:
    """Validate an open GGUF's FiRST part (messages name ``where``); return its routers and points."""
    parts = first_parts_from_reader(reader, where, deep)
    return parts.routers, parts.points


def routers_from_reader(reader: Reader, where: str) -> RouterSet:
    """Validate an open GGUF's FiRST part (messages name ``where``) and return its routers."""
    return first_from_reader(reader, where)[0]


def validate_first_gguf(path: str | os.PathLike) -> RouterSet:
    """Check a FiRST-GGUF against every rule of docs/FORMAT.md section 2 and return its routers.

    Raises:
        FormatError: naming the file, the layer (if any) and the broken rule.
    """
    return routers_from_reader(read_header(path), str(path))


def is_first_gguf(path: str | os.PathLike) -> bool:
    """Whether a GGUF has any first.* key (valid or not); FormatError if it is not a readable GGUF."""
    return any(key.startswith(FIRST_KEY_PREFIX) for key in read_header(path).fields)


def read_routers(path: str | os.PathLike) -> RouterSet:
    """The routers of a FiRST-GGUF (float32, NumPy shapes). Reading always validates."""
    return validate_first_gguf(path)


def read_points(path: str | os.PathLike) -> Points:
    """The operating points of a FiRST-GGUF (empty when it has none). Reading always validates
    (all but the byte comparisons of copied rows: ``first_parts_from_reader``)."""
    return read_first(path, deep=False)[1]


def read_first(path: str | os.PathLike, deep: bool = True) -> tuple[RouterSet, Points]:
    """The routers and operating points of a FiRST-GGUF, validated once (``deep``: see
    ``first_parts_from_reader``; the runtime's loader passes False)."""
    return first_from_reader(read_header(path), str(path), deep)


def read_first_parts(path: str | os.PathLike, deep: bool = True) -> FirstParts:
    """The routers, operating points, thinned FFNs and short vocabulary (None: none) of a FiRST-GGUF, validated once
    (``deep``: see ``first_parts_from_reader``)."""
    return first_parts_from_reader(read_header(path), str(path), deep)


def gguf_w1_dtype(path: str | os.PathLike) -> str:
    """"f16" or "f32": how a FiRST-GGUF stores its routers' W1."""
    from ..constants import ROUTER_F16_ROLES, router_tensor_name

    name = router_tensor_name(ROUTER_F16_ROLES[0], 0)
    kind = next((t.tensor_type for t in read_header(path).tensors if t.name == name), None)
    return "f16" if kind == gguf.GGMLQuantizationType.F16 else "f32"


def read_thin(path: str | os.PathLike) -> ThinInfo | None:
    """The thinned FFNs a FiRST-GGUF declares (None: none); the whole file is validated."""
    return read_first_parts(path).thin


def read_vocab(path: str | os.PathLike) -> VocabInfo | None:
    """The short output vocabulary a FiRST-GGUF declares (None: none); the whole file is validated."""
    return read_first_parts(path).vocab

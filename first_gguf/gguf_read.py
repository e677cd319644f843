"""Read a GGUF: open it safely, validate its FiRST part, read its routers, inspect it.

numpy + gguf only, never torch. The read path (``validate_first_gguf``, ``read_routers``,
``inspect_gguf``, ``is_first_gguf``) uses ``gguf_header.read_header``, which opens a real
model in milliseconds where gguf-py's GGUFReader takes seconds; ``open_gguf`` (attach's
byte-exact copy) still returns a GGUFReader. The helpers below take either reader.

The GGUF stores router tensors with ``ne`` (innermost first) the reverse of the NumPy shape
(``constants.router_ne`` vs ``constants.router_shape``); validation messages quote ``ne``, as
gguf-dump shows it. A shape matches when it is equal after padding with trailing 1s to four
dims, as ggml compares shapes (llama.cpp's own writers drop trailing 1s). The rules themselves
are ``router_set``'s, shared with the router files. The public names are re-exported by
``gguf_router``.
"""

from __future__ import annotations

import collections
import math
import os
from typing import Any

import gguf
import numpy as np
from gguf import GGMLQuantizationType, GGUFValueType

from .constants import (
    FIRST_KEY_PREFIX,
    KEY_AGGREGATION,
    KEY_PREFILL,
    KEY_PROTECTED_LAYERS,
    KEY_ROUTER_HIDDEN_SIZE,
    KEY_ROUTER_NORM_EPS,
    KEY_ROUTER_THRESHOLD,
    KEY_TRAIN_SOURCE,
    KEY_VERSION,
    ROUTER_IN_WEIGHT,
    ROUTER_NAME_MARKER,
    ROUTER_OUT_BIAS,
    ROUTER_TENSORS,
)
from .errors import FormatError
from .gguf_header import GGUFHeader, read_header
from .router_set import (
    RouterSet,
    StoredTensor,
    check_keys_present,
    check_metadata,
    check_version,
    collect_layers,
    parse_router_name,
    routers_from_metadata,
)

# GGUF type of each first.* key (FIRST.md section 2): (type, array item type).
KEY_TYPES: dict[str, tuple[GGUFValueType, GGUFValueType | None]] = {
    KEY_VERSION: (GGUFValueType.UINT32, None),
    KEY_ROUTER_HIDDEN_SIZE: (GGUFValueType.UINT32, None),
    KEY_ROUTER_NORM_EPS: (GGUFValueType.FLOAT32, None),
    KEY_ROUTER_THRESHOLD: (GGUFValueType.FLOAT32, None),
    KEY_PROTECTED_LAYERS: (GGUFValueType.ARRAY, GGUFValueType.INT32),
    KEY_AGGREGATION: (GGUFValueType.STRING, None),
    KEY_PREFILL: (GGUFValueType.STRING, None),
    KEY_TRAIN_SOURCE: (GGUFValueType.STRING, None),
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
    check_keys_present(where, list(fields))
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


def routers_from_reader(reader: Reader, where: str) -> RouterSet:
    """Validate an open GGUF's FiRST part (messages name ``where``) and return its routers."""
    _, n_layer, n_embd = model_dims(reader, where)
    meta = _first_metadata(reader, where)
    check_metadata(where, meta, n_layer)
    stored = {t.name: _stored(t) for t in reader.tensors if ROUTER_NAME_MARKER in t.name}
    tensors = collect_layers(where, stored, n_layer, n_embd, meta[KEY_ROUTER_HIDDEN_SIZE], gguf_ne=True)
    return routers_from_metadata(meta, n_layer, n_embd, tensors, where)


def validate_first_gguf(path: str | os.PathLike) -> RouterSet:
    """Check a FiRST-GGUF against every rule of FIRST.md section 2 and return its routers.

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


# --- inspect -----------------------------------------------------------------------------

# first.* key -> its name in inspect's output.
_FIRST_FIELDS = {
    KEY_VERSION: "version",
    KEY_ROUTER_HIDDEN_SIZE: "hidden_size",
    KEY_ROUTER_NORM_EPS: "norm_eps",
    KEY_ROUTER_THRESHOLD: "threshold",
    KEY_PROTECTED_LAYERS: "protected_layers",
    KEY_AGGREGATION: "aggregation",
    KEY_PREFILL: "prefill",
    KEY_TRAIN_SOURCE: "train_source",
}


def inspect_gguf(path: str | os.PathLike) -> dict:
    """Describe a GGUF as JSON-serialisable data: model, quantization, FiRST keys and routers.

    Returns:
        ``{file, size_bytes, architecture, n_layer, n_embd, n_tensors, quantization:
        {file_type, tensor_types}, first}``; ``first`` is None for a plain GGUF, else the
        first.* values, ``router`` (dtypes and ``ne`` per role, per-layer b2, p_bias =
        sigmoid(b2) and W1 Frobenius norm) and ``valid``: True or the validation error.
    """
    reader = read_header(path)
    arch = architecture(reader)
    file_type = int_key(reader, gguf.Keys.General.FILE_TYPE)
    counts = collections.Counter(t.tensor_type.name for t in reader.tensors)
    return {
        "file": str(path),
        "size_bytes": os.path.getsize(path),
        "architecture": arch,
        "n_layer": int_key(reader, gguf.Keys.LLM.BLOCK_COUNT.format(arch=arch)) if arch else None,
        "n_embd": int_key(reader, gguf.Keys.LLM.EMBEDDING_LENGTH.format(arch=arch)) if arch else None,
        "n_tensors": len(reader.tensors),
        "quantization": {"file_type": None if file_type is None else _file_type_name(file_type),
                         "tensor_types": dict(counts.most_common())},
        "first": _inspect_first(reader, str(path)),
    }


def _file_type_name(value: int) -> str:
    try:
        return gguf.LlamaFileType(value).name.removeprefix("MOSTLY_")
    except ValueError:
        return f"unknown ({value})"


def _finite(x: float) -> float | None:
    return float(x) if math.isfinite(x) else None


def _inspect_first(reader: Reader, where: str) -> dict | None:
    """The FiRST part as far as it can be read, and whether it is valid; None if there is none."""
    fields = {n: f for n, f in reader.fields.items() if n.startswith(FIRST_KEY_PREFIX)}
    tensors = [t for t in reader.tensors if ROUTER_NAME_MARKER in t.name]
    if not fields and not tensors:
        return None
    info: dict[str, Any] = {}
    for key, short in _FIRST_FIELDS.items():
        try:
            value = fields[key].contents() if key in fields else None
        except (UnicodeDecodeError, IndexError, ValueError):
            value = None
        # strict JSON has no NaN / inf: an invalid file's non-finite value is shown as text
        info[short] = str(value) if isinstance(value, float) and not math.isfinite(value) else value
    info["router"] = _router_summary(tensors)
    try:
        routers_from_reader(reader, where)
        info["valid"] = True
    except FormatError as exc:
        info["valid"] = str(exc)
    return info


def _router_summary(tensors: list[Any]) -> dict:
    """dtypes and ne per role, and per-layer stats, from whatever router tensors are readable."""
    dtypes: dict[str, set] = collections.defaultdict(set)
    shapes: dict[str, set] = collections.defaultdict(set)
    layers: dict[int, dict] = collections.defaultdict(dict)
    for t in tensors:
        parsed = parse_router_name(t.name)
        if parsed is None:
            continue
        bid, role = parsed
        dtypes[role].add(t.tensor_type.name)
        shapes[role].add(tuple(int(n) for n in t.shape))
        if t.tensor_type not in (GGMLQuantizationType.F32, GGMLQuantizationType.F16) or t.data.size == 0:
            continue
        values = np.asarray(t.data, dtype=np.float64)
        if role == ROUTER_OUT_BIAS:
            b2 = float(values.flat[0])
            layers[bid]["b2"] = _finite(b2)
            layers[bid]["p_bias"] = _finite(_sigmoid(b2)) if math.isfinite(b2) else None
        elif role == ROUTER_IN_WEIGHT:
            # not np.linalg.norm: its BLAS dot spins up threads, ~100x slower on a busy machine
            layers[bid]["w1_norm"] = _finite(math.sqrt(float(np.square(values).sum())))
    one = lambda s: sorted(s)[0] if len(s) == 1 else sorted(s)  # noqa: E731
    return {
        "dtypes": {role: one(dtypes[role]) for role in ROUTER_TENSORS if role in dtypes},
        "shapes": {role: [list(x) for x in sorted(shapes[role])] if len(shapes[role]) > 1
                   else list(one(shapes[role])) for role in ROUTER_TENSORS if role in shapes},
        "layers": [{"layer": bid, "b2": s.get("b2"), "p_bias": s.get("p_bias"), "w1_norm": s.get("w1_norm")}
                   for bid, s in sorted(layers.items())],
    }


def _sigmoid(x: float) -> float:
    return 1.0 / (1.0 + math.exp(-x)) if x >= 0 else math.exp(x) / (1.0 + math.exp(x))


def format_inspect(info: dict) -> str:
    """The compact human-readable report of ``inspect_gguf`` (what ``first-gguf inspect`` prints)."""
    q = info["quantization"]
    types = ", ".join(f"{name} {n}" for name, n in q["tensor_types"].items())
    lines = [
        f"file          {info['file']} ({info['size_bytes'] / 1e6:.1f} MB)",
        f"model         {info['architecture']}, {info['n_layer']} layers, n_embd {info['n_embd']}, "
        f"{info['n_tensors']} tensors",
        f"quantization  {q['file_type'] or '?'} ({types})",
    ]
    first = info["first"]
    if first is None:
        return "\n".join(lines + ["not a FiRST-GGUF"])
    router = first["router"]
    lines += [
        f"FiRST         version {first['version']}, router hidden {first['hidden_size']}, "
        f"norm eps {_num(first['norm_eps'])}, threshold {_num(first['threshold'])}",
        f"              protected layers {first['protected_layers']}, aggregation {first['aggregation']}, "
        f"prefill {first['prefill']}",
        f"trained on    {first['train_source']}",
        "router        " + ", ".join(f"{role} {dtype} {router['shapes'][role]}"
                                     for role, dtype in router["dtypes"].items()),
        "  layer        b2   p_bias    |W1|",
    ]
    lines += [f"  {s['layer']:5d} {_num(s['b2'], 9)} {_num(s['p_bias'], 8)} {_num(s['w1_norm'], 7)}"
              for s in router["layers"]]
    lines.append("valid         yes" if first["valid"] is True else f"INVALID       {first['valid']}")
    return "\n".join(lines)


def _num(x: object, width: int = 0) -> str:
    """A number in 4 significant digits; "-" for None; anything else (an invalid file's value) as is."""
    if x is None:
        return f"{'-':>{width}}"
    return f"{x:>{width}.4g}" if isinstance(x, (int, float)) else f"{x!s:>{width}}"

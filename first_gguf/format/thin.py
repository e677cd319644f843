"""Thinned FFNs (first.version 2, ``docs/FORMAT.md`` section 7): read and check them.

A FiRST-GGUF may carry, for some layers, a decode-only stand-in of the layer's FFN: the kept
neurons' rows of ``ffn_gate`` / ``ffn_up`` (their stored bytes) and columns of ``ffn_down``
(quantized again to its type), named by ``constants.THIN_TENSORS``; the ``first.thin.*``
keys list the layers, widths and neuron indices. With ``first.thin.type`` every thin tensor
is instead ggml's quantization of the kept neurons to that type, and the width may be the
whole FFN (a faster-to-decode copy); with ``first.thin.attn`` (version 4) every thin layer also
carries its attention weights in that type (``constants.ATTN_COPY_TENSORS``), read by the same
reduced graphs. ``thin_from_reader`` applies every rule (keys, tensors
and their agreement, gate/up rows byte for byte when they are copies); the writer is ``thin_write``.
numpy + gguf only, never torch.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

import numpy as np
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType, GGUFValueType

from ..constants import (
    ATTN_COPY_MARKER,
    ATTN_COPY_TENSORS,
    BASE_ATTN_TENSORS,
    BASE_FFN_TENSORS,
    FIRST_VERSION_ATTN,
    FIRST_VERSION_THIN,
    KEY_THIN_ATTN,
    KEY_THIN_LAYERS,
    KEY_THIN_NEURONS,
    KEY_THIN_SOURCE,
    KEY_THIN_TYPE,
    KEY_THIN_WIDTHS,
    KEY_VERSION,
    THIN_DOWN,
    THIN_KEYS,
    THIN_NAME_MARKER,
    THIN_REQUIRED_KEYS,
    THIN_TENSORS,
    base_ffn_name,
    thin_ne,
    thin_tensor_name,
)
from ..errors import FormatError

# GGUF type of each first.thin.* key: (type, array item type).
THIN_KEY_TYPES: dict[str, tuple[GGUFValueType, GGUFValueType | None]] = {
    KEY_THIN_LAYERS: (GGUFValueType.ARRAY, GGUFValueType.INT32),
    KEY_THIN_WIDTHS: (GGUFValueType.ARRAY, GGUFValueType.UINT32),
    KEY_THIN_NEURONS: (GGUFValueType.ARRAY, GGUFValueType.INT32),
    KEY_THIN_SOURCE: (GGUFValueType.STRING, None),
    KEY_THIN_TYPE: (GGUFValueType.STRING, None),
    KEY_THIN_ATTN: (GGUFValueType.BOOL, None),
}
# Types a thin copy may be requantized to: what ggml's quantizer writes without an importance
# matrix (the F32 / F16 conversions are numpy's).
THIN_TYPES = ("F32", "F16", "Q8_0", "Q6_K", "Q5_K", "Q5_1", "Q5_0", "Q4_K", "Q4_1", "Q4_0", "IQ4_NL", "Q3_K", "Q2_K")
_INT_TYPES = (GGUFValueType.UINT8, GGUFValueType.UINT16, GGUFValueType.UINT32, GGUFValueType.UINT64,
              GGUFValueType.INT8, GGUFValueType.INT16, GGUFValueType.INT32, GGUFValueType.INT64)


@dataclass(frozen=True)
class ThinInfo:
    """What a file's first.thin.* keys declare: per listed layer its width and kept neurons.

    Attributes:
        layers: Layers with a thinned FFN, ascending.
        widths: Kept neurons per listed layer.
        neurons: Per listed layer, its kept neuron indices, ascending.
        source: How they were chosen (free text), or None.
        qtype: The ggml type every thin tensor was requantized to (``first.thin.type``), or None:
            gate/up rows are the base's bytes and down has the base's type.
        attn: Every thin layer also carries attention copies in ``qtype`` (``first.thin.attn``).
    """

    layers: tuple[int, ...]
    widths: tuple[int, ...]
    neurons: tuple[tuple[int, ...], ...]
    source: str | None = None
    qtype: str | None = None
    attn: bool = False

    def width(self, layer: int) -> int:
        """Kept neurons of ``layer`` (KeyError if it carries no thin FFN)."""
        return self.widths[self._index(layer)]

    def neurons_of(self, layer: int) -> np.ndarray:
        """Kept neuron indices of ``layer``, ascending (int64)."""
        return np.asarray(self.neurons[self._index(layer)], dtype=np.int64)

    def mask(self, n_layer: int) -> list[bool]:
        """One bool per layer: True where the file carries a thin FFN."""
        return [i in self.layers for i in range(n_layer)]

    def metadata(self) -> dict[str, object]:
        """The first.thin.* keys -> values (neurons concatenated in layer order)."""
        meta: dict[str, object] = {KEY_THIN_LAYERS: list(self.layers), KEY_THIN_WIDTHS: list(self.widths),
                                   KEY_THIN_NEURONS: [i for seg in self.neurons for i in seg]}
        meta |= {KEY_THIN_SOURCE: self.source} if self.source is not None else {}
        meta |= {KEY_THIN_TYPE: self.qtype} if self.qtype is not None else {}
        return meta | ({KEY_THIN_ATTN: True} if self.attn else {})

    def _index(self, layer: int) -> int:
        try:
            return self.layers.index(layer)
        except ValueError:
            raise KeyError(f"layer {layer} has no thinned FFN (thin layers {list(self.layers)})") from None


def thin_qtype(where: str, name: Any, n_embd: int, key: str = KEY_THIN_TYPE,
               rows: str = "ffn_gate / ffn_up") -> GGMLQuantizationType:
    """The ggml type a ``first.thin.type`` (or ``key``) value names, checked to fit rows of ``n_embd`` values."""
    if name not in THIN_TYPES:
        raise FormatError(f"{where}: {key} {name!r} is not one of {', '.join(THIN_TYPES)}")
    qtype = GGMLQuantizationType[name]
    if n_embd % block_size(qtype):
        raise FormatError(f"{where}: {key} {name}: its block of {block_size(qtype)} does not divide "
                          f"the rows of {n_embd} values of {rows}")
    return qtype


def block_size(tensor_type: Any) -> int:
    """Elements per quantization block along ``ne0`` (1 for F32 / F16)."""
    return GGML_QUANT_SIZES[tensor_type][0]


def ffn_length(reader: Any, arch: str, layer: int, where: str) -> int:
    """``{arch}.feed_forward_length`` of ``layer``: a scalar, or a per-layer array by index."""
    key = f"{arch}.feed_forward_length"
    field = reader.fields.get(key)
    if field is None:
        raise FormatError(f"{where}: no key {key}; cannot size thinned FFNs")
    if field.types[0] in _INT_TYPES:
        return int(field.contents())
    if field.types[0] == GGUFValueType.ARRAY and len(field.types) > 1 and field.types[1] in _INT_TYPES:
        values = field.contents()
        if layer < len(values):
            return int(values[layer])
    raise FormatError(f"{where}: {key} is neither an integer nor an integer per layer (layer {layer})")


def base_ffn(reader: Any, where: str, layer: int, n_embd: int, n_ff: int) -> dict[str, Any]:
    """Role -> the base FFN tensor of ``layer``, each present with a dense FFN's shape."""
    tensors = {t.name: t for t in reader.tensors}
    out = {}
    for role in BASE_FFN_TENSORS:
        name = base_ffn_name(role, layer)
        t = tensors.get(name)
        if t is None:
            raise FormatError(f"{where}: layer {layer}: no {name}; thinned FFNs need a gated FFN "
                              f"(ffn_gate, ffn_up, ffn_down) in every thinned layer")
        want = thin_ne(role, n_embd, n_ff)
        if _pad4(t.shape) != _pad4(want):
            raise FormatError(f"{where}: layer {layer}: {name} has shape {tuple(int(n) for n in t.shape)}, "
                              f"expected {want} for n_embd {n_embd}, feed_forward_length {n_ff}")
        out[role] = t
    return out


def thin_from_reader(reader: Any, where: str, meta: dict[str, object], arch: str, n_layer: int,
                     n_embd: int, deep: bool = True) -> ThinInfo | None:
    """Check a file's thinned FFNs (keys, tensors, their agreement); None when it has none.

    Args:
        reader: The open GGUF (``header.read_header`` or GGUFReader).
        where: Named in messages.
        meta: Its first.* values, types already checked (``reader._first_metadata``).
        arch, n_layer, n_embd: The model's.
        deep: Also compare the thin ffn_gate / ffn_up rows with the base's, byte for byte (reads
            both; the runtime's loader skips it, which would page in about 300 MB of a 0.5B).

    Raises:
        FormatError: naming ``where``, the layer and the broken rule.
    """
    present = [k for k in THIN_KEYS if k in meta]
    tensors = {t.name: t for t in reader.tensors if THIN_NAME_MARKER in t.name}
    copies = {t.name: t for t in reader.tensors if ATTN_COPY_MARKER in t.name}
    if not present:
        if tensors or copies:
            kind = "thinned FFN tensor" if tensors else "attention copy"
            raise FormatError(f"{where}: {kind} {next(iter(tensors or copies))} without {KEY_THIN_LAYERS}")
        return None
    if meta[KEY_VERSION] < FIRST_VERSION_THIN:
        raise FormatError(f"{where}: {present[0]} in a {KEY_VERSION} {meta[KEY_VERSION]} file (thinned FFNs "
                          f"need {KEY_VERSION} {FIRST_VERSION_THIN})")
    for key in THIN_REQUIRED_KEYS:
        if key not in meta:
            raise FormatError(f"{where}: missing key {key} ({', '.join(THIN_REQUIRED_KEYS)} go together)")
    layers, widths = [int(x) for x in meta[KEY_THIN_LAYERS]], [int(x) for x in meta[KEY_THIN_WIDTHS]]
    _check_layers(where, layers, n_layer)
    if len(widths) != len(layers):
        raise FormatError(f"{where}: {KEY_THIN_WIDTHS} has {len(widths)} values for {len(layers)} "
                          f"{KEY_THIN_LAYERS}")
    neurons = np.asarray(meta[KEY_THIN_NEURONS], dtype=np.int64)
    if len(neurons) != sum(widths):
        raise FormatError(f"{where}: {KEY_THIN_NEURONS} has {len(neurons)} values; the widths add up to "
                          f"{sum(widths)}")
    _check_tensor_names(where, tensors, layers)
    name = meta.get(KEY_THIN_TYPE)
    qtype = None if name is None else thin_qtype(where, str(name), n_embd)
    attn = _check_attn(reader, where, meta, copies, layers, qtype)
    segments, start = [], 0
    for layer, width in zip(layers, widths):
        idx = neurons[start:start + width]
        start += width
        _check_layer(reader, where, tensors, layer, width, idx, n_embd, ffn_length(reader, arch, layer, where), deep,
                     qtype)
        segments.append(tuple(int(i) for i in idx))
    source = meta.get(KEY_THIN_SOURCE)
    return ThinInfo(tuple(layers), tuple(widths), tuple(segments), None if source is None else str(source),
                    None if name is None else str(name), attn)


def _check_attn(reader: Any, where: str, meta: dict[str, object], copies: dict[str, Any], layers: list[int],
                qtype: GGMLQuantizationType | None) -> bool:
    """``first.thin.attn`` and the attention copies: each thin layer's four, the base's shapes, ``qtype``."""
    if KEY_THIN_ATTN not in meta:
        if copies:
            raise FormatError(f"{where}: attention copy {next(iter(copies))} without {KEY_THIN_ATTN}")
        return False
    if meta[KEY_VERSION] < FIRST_VERSION_ATTN:
        raise FormatError(f"{where}: {KEY_THIN_ATTN} in a {KEY_VERSION} {meta[KEY_VERSION]} file (attention "
                          f"copies need {KEY_VERSION} {FIRST_VERSION_ATTN})")
    if not meta[KEY_THIN_ATTN]:
        raise FormatError(f"{where}: {KEY_THIN_ATTN} must be true; leave it out for no attention copies")
    if qtype is None:
        raise FormatError(f"{where}: {KEY_THIN_ATTN} needs {KEY_THIN_TYPE} (the copies' type)")
    base = {t.name: t for t in reader.tensors}
    wanted = {ATTN_COPY_TENSORS[r].format(bid=i): (i, BASE_ATTN_TENSORS[r].format(bid=i))
              for i in layers for r in ATTN_COPY_TENSORS}
    for name in copies:
        if name not in wanted:
            raise FormatError(f"{where}: unknown or extra attention copy {name} (thin layers {layers})")
    for name, (layer, base_name) in wanted.items():
        at = f"{where}: layer {layer}"
        t, b = copies.get(name), base.get(base_name)
        if b is None:
            raise FormatError(f"{at}: no {base_name}; attention copies need separate q, k, v and output weights")
        if t is None:
            raise FormatError(f"{at}: missing {name} ({KEY_THIN_ATTN} is set)")
        if _pad4(t.shape) != _pad4(b.shape):
            raise FormatError(f"{at}: {name} has shape {tuple(int(n) for n in t.shape)}, expected "
                              f"{tuple(int(n) for n in b.shape)} (the shape of {base_name})")
        if t.tensor_type != qtype:
            raise FormatError(f"{at}: {name} has type {t.tensor_type.name}, expected {qtype.name} ({KEY_THIN_TYPE})")
        if int(b.shape[0]) % block_size(qtype):
            raise FormatError(f"{at}: {KEY_THIN_TYPE} {qtype.name}: its block of {block_size(qtype)} does not "
                              f"divide the rows of {int(b.shape[0])} values of {base_name}")
    return True


def _check_layers(where: str, layers: list[int], n_layer: int) -> None:
    if not layers:
        raise FormatError(f"{where}: {KEY_THIN_LAYERS} is empty; leave the first.thin.* keys out instead")
    if layers != sorted(set(layers)):
        raise FormatError(f"{where}: {KEY_THIN_LAYERS} {layers} must be ascending and distinct")
    if layers[0] < 0 or layers[-1] >= n_layer:
        bad = layers[0] if layers[0] < 0 else layers[-1]
        raise FormatError(f"{where}: {KEY_THIN_LAYERS} has layer {bad}, outside 0..{n_layer - 1}")


_NAME_PATTERNS = {role: re.compile("^" + re.escape(tpl).replace(re.escape("{bid}"), r"(0|[1-9][0-9]*)") + "$")
                  for role, tpl in THIN_TENSORS.items()}


def parse_thin_name(name: str) -> tuple[int, str] | None:
    """(layer, role) of a well-formed thinned-FFN tensor name, else None."""
    for role, pattern in _NAME_PATTERNS.items():
        if match := pattern.match(name):
            return int(match.group(1)), role
    return None


def _check_tensor_names(where: str, tensors: dict[str, Any], layers: list[int]) -> None:
    for name in tensors:
        parsed = parse_thin_name(name)
        if parsed is None:
            raise FormatError(f"{where}: unknown thinned FFN tensor {name}")
        if parsed[0] not in layers:
            raise FormatError(f"{where}: layer {parsed[0]}: extra thinned FFN tensor {name}; the layer is not in "
                              f"{KEY_THIN_LAYERS}")


def check_width(at: str, width: int, n_ff: int, down_type: Any, requantized: bool) -> None:
    """A thin width: 1..n_ff - 1 (n_ff too for a requantized copy), a multiple of the thin down's block."""
    block, top = block_size(down_type), n_ff if requantized else n_ff - 1
    if not 0 < width <= top or width % block:
        raise FormatError(f"{at}: width {width} must be in 1..{top} and a multiple of {block} (the block of "
                          f"the thin ffn_down's {down_type.name})")


def _check_layer(reader: Any, where: str, tensors: dict[str, Any], layer: int, width: int, idx: np.ndarray,
                 n_embd: int, n_ff: int, deep: bool = True, qtype: GGMLQuantizationType | None = None) -> None:
    """One listed layer: width, neurons, and its three tensors against the base FFN (or ``qtype``)."""
    at = f"{where}: layer {layer}"
    base = base_ffn(reader, where, layer, n_embd, n_ff)
    requantized = qtype is not None  # (F32 is type 0: never `qtype or ...`)
    check_width(at, width, n_ff, qtype if requantized else base[THIN_DOWN].tensor_type, requantized)
    if len(idx) and (idx[0] < 0 or idx[-1] >= n_ff or np.any(np.diff(idx) <= 0)):
        raise FormatError(f"{at}: {KEY_THIN_NEURONS} must be ascending and distinct, in 0..{n_ff - 1}")
    for role in THIN_TENSORS:
        name = thin_tensor_name(role, layer)
        t = tensors.get(name)
        if t is None:
            raise FormatError(f"{at}: missing {name}")
        want = thin_ne(role, n_embd, width)
        if _pad4(t.shape) != _pad4(want):
            raise FormatError(f"{at}: {name} has shape {tuple(int(n) for n in t.shape)}, expected {want}")
        want_type = qtype if requantized else base[role].tensor_type
        if t.tensor_type != want_type:
            why = KEY_THIN_TYPE if requantized else f"the type of {base_ffn_name(role, layer)}"
            raise FormatError(f"{at}: {name} has type {t.tensor_type.name}, expected {want_type.name} ({why})")
        copied = not requantized and role != THIN_DOWN
        if deep and copied and not np.array_equal(_row_bytes(base[role].data)[idx], _row_bytes(t.data)):
            raise FormatError(f"{at}: {name} is not the rows {KEY_THIN_NEURONS} of {base_ffn_name(role, layer)}")


def _row_bytes(data: np.ndarray) -> np.ndarray:
    """A 2-D tensor's rows as bytes (so NaN compares equal to itself)."""
    data = np.ascontiguousarray(data)
    return data.reshape(data.shape[0], -1).view(np.uint8)


def _pad4(shape: Any) -> tuple[int, ...]:
    shape = tuple(int(n) for n in shape)
    return shape + (1,) * (4 - len(shape)) if len(shape) <= 4 else shape


def top_neurons(scores: np.ndarray, width: int) -> np.ndarray:
    """The ``width`` highest-scoring neurons of one layer, ascending (ties: the lower index)."""
    return np.sort(np.argsort(-np.asarray(scores, dtype=np.float64), kind="stable")[:width])


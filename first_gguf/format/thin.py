"""Thinned FFNs (first.version 2, ``docs/FORMAT.md`` section 7): read and check them.

A FiRST-GGUF may carry, for some layers, a decode-only stand-in of the layer's FFN: the kept
neurons' rows of ``ffn_gate`` / ``ffn_up`` (their stored bytes) and columns of ``ffn_down``
(quantized again to its type), named by ``constants.THIN_TENSORS``; the ``first.thin.*``
keys list the layers, widths and neuron indices. ``thin_from_reader`` applies every rule
(keys, tensors and their agreement, gate/up rows byte for byte); the writer is ``thin_write``.
numpy + gguf only, never torch.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

import numpy as np
from gguf import GGML_QUANT_SIZES, GGUFValueType

from ..constants import (
    BASE_FFN_TENSORS,
    FIRST_VERSION_THIN,
    KEY_THIN_LAYERS,
    KEY_THIN_NEURONS,
    KEY_THIN_SOURCE,
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
}
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
    """

    layers: tuple[int, ...]
    widths: tuple[int, ...]
    neurons: tuple[tuple[int, ...], ...]
    source: str | None = None

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
        return meta | ({KEY_THIN_SOURCE: self.source} if self.source is not None else {})

    def _index(self, layer: int) -> int:
        try:
            return self.layers.index(layer)
        except ValueError:
            raise KeyError(f"layer {layer} has no thinned FFN (thin layers {list(self.layers)})") from None


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
    if not present:
        if tensors:
            raise FormatError(f"{where}: thinned FFN tensor {next(iter(tensors))} without {KEY_THIN_LAYERS}")
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
    segments, start = [], 0
    for layer, width in zip(layers, widths):
        idx = neurons[start:start + width]
        start += width
        _check_layer(reader, where, tensors, layer, width, idx, n_embd, ffn_length(reader, arch, layer, where), deep)
        segments.append(tuple(int(i) for i in idx))
    source = meta.get(KEY_THIN_SOURCE)
    return ThinInfo(tuple(layers), tuple(widths), tuple(segments), None if source is None else str(source))


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


def _check_layer(reader: Any, where: str, tensors: dict[str, Any], layer: int, width: int, idx: np.ndarray,
                 n_embd: int, n_ff: int, deep: bool = True) -> None:
    """One listed layer: width, neurons, and its three tensors against the base FFN."""
    at = f"{where}: layer {layer}"
    base = base_ffn(reader, where, layer, n_embd, n_ff)
    block = block_size(base[THIN_DOWN].tensor_type)
    if not 0 < width < n_ff or width % block:
        raise FormatError(f"{at}: width {width} must be in 1..{n_ff - 1} and a multiple of {block} "
                          f"(the block of ffn_down's {base[THIN_DOWN].tensor_type.name})")
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
        if t.tensor_type != base[role].tensor_type:
            raise FormatError(f"{at}: {name} has type {t.tensor_type.name}, expected {base[role].tensor_type.name} "
                              f"(the type of {base_ffn_name(role, layer)})")
        if deep and role != THIN_DOWN and not np.array_equal(_row_bytes(base[role].data)[idx], _row_bytes(t.data)):
            raise FormatError(f"{at}: {name} is not the rows {KEY_THIN_NEURONS} of {base_ffn_name(role, layer)}")


def _row_bytes(data: np.ndarray) -> np.ndarray:
    """A 2-D tensor's rows as bytes (so NaN compares equal to itself)."""
    data = np.ascontiguousarray(data)
    return data.reshape(data.shape[0], -1).view(np.uint8)


def _pad4(shape: Any) -> tuple[int, ...]:
    shape = tuple(int(n) for n in shape)
    return shape + (1,) * (4 - len(shape)) if len(shape) <= 4 else shape


def thin_bytes(reader: Any, info: ThinInfo) -> tuple[int, int]:
    """(bytes of the thin FFNs, bytes of the full FFNs of the same layers)."""
    sizes = {t.name: int(t.n_bytes) for t in reader.tensors}
    thin = sum(sizes.get(thin_tensor_name(r, i), 0) for i in info.layers for r in THIN_TENSORS)
    full = sum(sizes.get(base_ffn_name(r, i), 0) for i in info.layers for r in THIN_TENSORS)
    return thin, full


def top_neurons(scores: np.ndarray, width: int) -> np.ndarray:
    """The ``width`` highest-scoring neurons of one layer, ascending (ties: the lower index)."""
    return np.sort(np.argsort(-np.asarray(scores, dtype=np.float64), kind="stable")[:width])


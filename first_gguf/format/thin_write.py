"""Write thinned FFNs into a FiRST-GGUF (``docs/FORMAT.md`` section 7): ``first-gguf thin``'s writer.

The FiRST-GGUF is rewritten byte for byte (``writer``), never in place: every key and tensor
as it is (a short output vocabulary too), but ``first.version`` (2, or 3 with a short vocabulary)
and any old ``first.thin.*`` keys and thin tensors, which are replaced. Per thinned layer, ``ffn_gate`` / ``ffn_up`` rows (one neuron each) are copied
as their stored bytes; ``ffn_down`` is dequantized (gguf-py), its neuron columns selected and
quantized again to its own type by ggml's quantizer (``ggml_quantize_chunk`` of the library
llama-cpp-python ships; F32 / F16 exactly with numpy). With a ``qtype`` (``first.thin.type``)
all three are dequantized, their neurons selected and quantized to that type instead, and the
width may be the whole FFN; with ``attn`` (``first.thin.attn``, version 4) each thin layer's
attention weights (q, k, v, output) are quantized to that type too, whole. Written to a
temporary file beside the output, read back and checked, renamed. numpy + gguf (+ ctypes) only, never torch.
"""

from __future__ import annotations

import ctypes
import functools
import importlib.util
import os
import types
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

from ..constants import (
    ATTN_COPY_TENSORS,
    BASE_ATTN_TENSORS,
    THIN_DOWN,
    THIN_KEY_PREFIX,
    THIN_TENSORS,
    first_version_for,
    is_thin_part,
    thin_tensor_name,
)
from ..errors import FirstError, FormatError
from ..paths import atomic_output, check_output_path
from .header import read_header
from .reader import Reader, first_parts_from_reader, model_dims
from .thin import ThinInfo, base_ffn, check_width, ffn_length, thin_qtype, top_neurons
from .writer import others_table, write_replacing_part

# Types numpy converts exactly (a selection of already-stored values); everything else goes
# through ggml's own quantizer.
_NUMPY_TYPES = {GGMLQuantizationType.F32: np.float32, GGMLQuantizationType.F16: np.float16}
_MIN_ROWS_PER_THREAD = 64  # below this a thread costs more than it saves


@functools.lru_cache(maxsize=1)
def ggml_quantizer() -> Any:
    """``ggml_quantize_chunk`` of the libggml-base that llama-cpp-python ships (or LLAMA_CPP_LIB_PATH's)."""
    lib_dir = os.environ.get("LLAMA_CPP_LIB_PATH")
    if not lib_dir:
        spec = importlib.util.find_spec("llama_cpp")
        if spec is None or spec.origin is None:
            raise FirstError("llama-cpp-python is not installed: its ggml quantizer requantizes ffn_down")
        lib_dir = str(Path(spec.origin).parent / "lib")
    path = Path(lib_dir) / "libggml-base.so"
    if not path.is_file():
        raise FirstError(f"{path}: no such library (ggml's quantizer requantizes ffn_down)")
    fn = ctypes.CDLL(str(path)).ggml_quantize_chunk
    fn.restype = ctypes.c_size_t
    fn.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64, ctypes.c_int64,
                   ctypes.c_int64, ctypes.c_void_p]
    return fn


def quantize(arr: np.ndarray, qtype: GGMLQuantizationType, threads: int | None = None) -> np.ndarray:
    """Rows of float values -> the GGUF data of a ``qtype`` tensor (float rows for F32 / F16, else
    uint8 rows of blocks), as ggml quantizes them (no importance matrix).

    ggml quantizes row by row, so the rows are split between ``threads`` (default: the cores this
    machine has) and the bytes are the same for any count; ctypes releases the GIL meanwhile.
    """
    arr = np.ascontiguousarray(arr, dtype=np.float32)
    if qtype in _NUMPY_TYPES:
        return arr.astype(_NUMPY_TYPES[qtype])
    rows, n = arr.shape
    block, size = GGML_QUANT_SIZES[qtype]
    if n % block:
        raise FormatError(f"a row of {n} values is not a multiple of {qtype.name}'s block of {block}")
    out = np.zeros((rows, n // block * size), dtype=np.uint8)
    fn = ggml_quantizer()
    threads = max(1, min(threads or os.cpu_count() or 1, rows // _MIN_ROWS_PER_THREAD or 1))
    bounds = np.linspace(0, rows, threads + 1).astype(int)

    def chunk(i: int) -> int:  # ggml places rows [r0, r1) at r0 * row size of the same output
        r0, r1 = int(bounds[i]), int(bounds[i + 1])
        return fn(int(qtype), arr.ctypes.data, out.ctypes.data, r0 * n, r1 - r0, n, None)

    if threads == 1:
        wrote = chunk(0)
    else:
        with ThreadPoolExecutor(threads) as pool:
            wrote = sum(pool.map(chunk, range(threads)))
    if wrote != out.nbytes:
        raise FormatError(f"ggml_quantize_chunk wrote an unexpected size for {qtype.name}")
    return out


def requantized(tensor: Any, idx: np.ndarray, qtype: GGMLQuantizationType, columns: bool) -> np.ndarray:
    """Rows (or columns: ``ne0`` positions) ``idx`` of a stored 2-D tensor, dequantized and quantized to
    ``qtype`` by ggml (F32 / F16 values convert exactly, so selecting them in their own type is exact)."""
    from gguf.quants import dequantize

    kind, data = tensor.tensor_type, np.asarray(tensor.data)
    if not columns:  # quantization is row-wise: pick the rows first, dequantize only those
        data, idx = data[idx], slice(None)
    values = data if kind in _NUMPY_TYPES else dequantize(data, kind)
    values = values.astype(np.float32, copy=False)
    return quantize(values[:, idx] if columns else values[idx], qtype)


def thin_tensors(reader: Reader, where: str, neurons: Mapping[int, np.ndarray],
                 qtype: GGMLQuantizationType | None = None) -> list[tuple[str, Any]]:
    """(name, tensor with ``data`` and ``tensor_type``) of the thin FFN of every layer in ``neurons``,
    in layer order, gate / up / down each (requantized to ``qtype`` when given)."""
    arch, _, n_embd = model_dims(reader, where)
    out = []
    for layer in sorted(neurons):
        idx = np.asarray(neurons[layer], dtype=np.int64)
        base = base_ffn(reader, where, layer, n_embd, ffn_length(reader, arch, layer, where))
        for role in THIN_TENSORS:
            t, down = base[role], role == THIN_DOWN
            kind = t.tensor_type if qtype is None else qtype
            if qtype is None and not down:  # gate / up rows: their stored bytes
                data = np.ascontiguousarray(np.asarray(t.data)[idx])
            else:
                data = requantized(t, idx, kind, down)
            out.append((thin_tensor_name(role, layer), types.SimpleNamespace(data=data, tensor_type=kind)))
    return out


def attn_copies(reader: Reader, where: str, layers: Sequence[int],
                qtype: GGMLQuantizationType) -> list[tuple[str, Any]]:
    """(name, tensor) of the attention copies of ``layers``: q, k, v and output each, whole, in ``qtype``."""
    tensors = {t.name: t for t in reader.tensors}
    out = []
    for layer in sorted(layers):
        for role, template in ATTN_COPY_TENSORS.items():
            base = tensors.get(BASE_ATTN_TENSORS[role].format(bid=layer))
            if base is None or len(base.shape) != 2:
                raise FirstError(f"{where}: layer {layer}: no 2-D {BASE_ATTN_TENSORS[role].format(bid=layer)}; "
                                 f"attention copies need separate q, k, v and output weights")
            if int(base.shape[0]) % GGML_QUANT_SIZES[qtype][0]:
                raise FirstError(f"{where}: layer {layer}: {qtype.name}'s block of {GGML_QUANT_SIZES[qtype][0]} "
                                 f"does not divide the rows of {int(base.shape[0])} values of its attention")
            data = requantized(base, np.arange(int(base.shape[1])), qtype, columns=False)
            out.append((template.format(bid=layer), types.SimpleNamespace(data=data, tensor_type=qtype)))
    return out


def check_neurons(reader: Reader, where: str, neurons: Mapping[int, Sequence[int]],
                  qtype: str | None = None) -> dict[int, np.ndarray]:
    """The kept neurons per layer (and ``qtype``), checked against the model before anything is written."""
    arch, n_layer, n_embd = model_dims(reader, where)
    if not neurons:
        raise FirstError(f"{where}: no layer to thin")
    try:
        kind = None if qtype is None else thin_qtype(where, qtype, n_embd)
    except FormatError as exc:
        raise FirstError(str(exc)) from None
    out = {}
    for layer in sorted(neurons):
        if not 0 <= layer < n_layer:
            raise FirstError(f"{where}: layer {layer} outside 0..{n_layer - 1}")
        n_ff = ffn_length(reader, arch, layer, where)
        base = base_ffn(reader, where, layer, n_embd, n_ff)
        idx = np.asarray(neurons[layer], dtype=np.int64)
        try:
            down_type = base[THIN_DOWN].tensor_type if kind is None else kind
            check_width(f"{where}: layer {layer}", len(idx), n_ff, down_type, kind is not None)
        except FormatError as exc:
            raise FirstError(str(exc)) from None
        if idx[0] < 0 or idx[-1] >= n_ff or np.any(np.diff(idx) <= 0):
            raise FirstError(f"{where}: layer {layer}: neurons must be ascending and distinct, in 0..{n_ff - 1}")
        out[layer] = idx
    return out


def write_thin(path: str | os.PathLike, neurons: Mapping[int, Sequence[int]], out_path: str | os.PathLike,
               source: str | None = None, force: bool = False, qtype: str | None = None,
               attn: bool = False) -> Path:
    """Write the FiRST-GGUF ``path`` with thinned FFNs for the layers of ``neurons``; the input is never modified.

    Args:
        path: A valid FiRST-GGUF (any quantization); thinned FFNs it already carries are replaced, a
            short output vocabulary is kept.
        neurons: Layer -> the kept neuron indices, ascending; a width a multiple of the block of
            that layer's ``ffn_down`` type (of ``qtype`` when given; then every neuron may be kept).
        out_path: Where to write; never the input.
        source: ``first.thin.source`` (how the neurons were chosen), or None.
        force: Overwrite an existing output.
        qtype: A ggml type name (``format.thin.THIN_TYPES``): every thin tensor is requantized to it.
        attn: Also write each thin layer's attention weights requantized to ``qtype`` (needs ``qtype``).

    Returns:
        The output path.
    """
    src, out = Path(path), Path(out_path)
    if attn and qtype is None:
        raise FirstError(f"{src}: attention copies need a type for the copies (first.thin.type)")
    check_output_path(out, force, inputs=(src,))
    reader = read_header(src)
    vocab = first_parts_from_reader(reader, str(src)).vocab
    arch, _, _ = model_dims(reader, str(src))
    kept = check_neurons(reader, str(src), neurons, qtype)
    info = ThinInfo(tuple(kept), tuple(len(v) for v in kept.values()),
                    tuple(tuple(int(i) for i in v) for v in kept.values()), source, qtype, attn)
    kind = None if qtype is None else GGMLQuantizationType[qtype]
    new = thin_tensors(reader, str(src), kept, kind)
    new += attn_copies(reader, str(src), list(kept), kind) if attn else []
    with atomic_output(out) as tmp:
        _write(reader, arch, info, new, first_version_for(thin=True, vocab=vocab is not None, attn=attn), tmp)
        _verify(tmp, reader, info, new, str(out))
    return out


def write_thin_from_scores(path: str | os.PathLike, scores: np.ndarray, width: int, out_path: str | os.PathLike,
                           layers: Sequence[int] | None = None, source: str | None = None,
                           force: bool = False, qtype: str | None = None, attn: bool = False) -> Path:
    """``write_thin`` keeping, in each of ``layers`` (None: every layer), the ``width`` highest-scoring
    neurons of ``scores`` (shape ``[n_layer, n_ff]``)."""
    scores, reader = np.asarray(scores), read_header(path)
    arch, n_layer, _ = model_dims(reader, str(path))
    chosen = range(n_layer) if layers is None else sorted(set(int(i) for i in layers))
    if any(not 0 <= i < n_layer for i in chosen):
        raise FirstError(f"{path}: layers {list(chosen)} outside 0..{n_layer - 1}")
    n_ff = {ffn_length(reader, arch, i, str(path)) for i in chosen}
    if scores.ndim != 2 or scores.shape[0] != n_layer or {scores.shape[1]} != n_ff:
        raise FirstError(f"scores of shape {list(scores.shape)} do not fit {path} ({n_layer} layers, "
                         f"feed_forward_length {sorted(n_ff)})")
    return write_thin(path, {i: top_neurons(scores[i], width) for i in chosen}, out_path, source=source, force=force,
                      qtype=qtype, attn=attn)


def _write(reader: Reader, arch: str, info: ThinInfo, new: list[tuple[str, Any]], version: int, path: Path) -> None:
    """Every key in order (first.version set to ``version``, old thin keys dropped), then the thin keys;
    every tensor but old thin ones, then the new."""
    write_replacing_part(reader, arch, path, version, THIN_KEY_PREFIX, _in_part, info.metadata(), new)


def _in_part(name: str) -> bool:
    return is_thin_part(name)


def _verify(path: Path, base: Reader, info: ThinInfo, new: list[tuple[str, Any]], where: str) -> None:
    """Read the new file back: valid, its thin part as planned, everything else as in the input."""
    out = read_header(path)
    if first_parts_from_reader(out, where).thin != info:
        raise FormatError(f"{where}: read-back check failed: the thinned FFNs differ from the plan")
    if others_table(out, THIN_KEY_PREFIX, _in_part) != others_table(base, THIN_KEY_PREFIX, _in_part):
        raise FormatError(f"{where}: read-back check failed: keys or tensors beside the thin part differ")
    got = {t.name: t for t in out.tensors}
    for name, t in new:
        if not np.array_equal(np.asarray(got[name].data).view(np.uint8).ravel(), t.data.view(np.uint8).ravel()):
            raise FormatError(f"{where}: read-back check failed: {name} differs from the planned bytes")

"""Attach routers to a GGUF, and the public API of FiRST-GGUF files (``shared/FIRST.md`` section 2).

numpy + gguf + safetensors only, never torch. Shapes: in memory and in router files the
tensors are NumPy / torch shaped (``constants.router_shape``: W1 is ``(hidden, n_embd)``);
the GGUF stores them with ``ne`` reversed (``constants.router_ne``: W1 is ``[n_embd, hidden]``).

``attach_routers`` rewrites the base GGUF as gguf-py's ``gguf_new_metadata.py`` does, but
copies every key/value byte for byte (so nested or empty arrays and odd string bytes survive)
and every tensor byte for byte with its GGML type, then adds the routers and first.* keys.
It writes a temporary file next to the output, reads it back and checks it, then renames it.

Where the rest lives (all re-exported here): ``router_set`` (RouterSet, the untrained recipe,
the format's rules), ``router_file`` (.safetensors router files), ``gguf_read`` (open,
validate, read and inspect a GGUF).
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

import gguf
import numpy as np
from gguf import GGMLQuantizationType, GGUFValueType

from .constants import FIRST_KEY_PREFIX, ROUTER_NAME_MARKER
from .errors import FormatError
from .gguf_header import read_header
from .gguf_read import (
    KEY_TYPES,
    field_type,
    format_inspect,
    inspect_gguf,
    int_key,
    is_first_gguf,
    model_dims,
    open_gguf,
    read_routers,
    routers_from_reader,
    validate_first_gguf,
)
from .router_file import (
    atomic_output,
    check_output_path,
    check_w1_dtype,
    load_router_file,
    router_arrays,
    save_router_file,
)
from .router_set import RouterSet, make_identity_routers, parse_router_name

__all__ = [
    "RouterSet", "make_identity_routers", "save_router_file", "load_router_file", "attach_routers",
    "read_routers", "validate_first_gguf", "inspect_gguf", "format_inspect", "open_gguf", "is_first_gguf",
]

logger = logging.getLogger(__name__)



class _RawValue(bytes):
    """A KV value (type tag and payload) copied byte for byte from the base GGUF."""


class _Writer(gguf.GGUFWriter):
    """GGUFWriter that also writes raw copied values and empty arrays (it refuses those).

    Hooks gguf-py's private ``_pack_val``; pyproject pins gguf, and the round-trip tests
    catch a change.
    """

    def _pack_val(self, val: Any, vtype: GGUFValueType, add_vtype: bool,
                  sub_type: GGUFValueType | None = None) -> bytes:
        if isinstance(val, _RawValue):
            return bytes(val)
        if vtype == GGUFValueType.ARRAY and sub_type is not None and len(val) == 0:
            head = self._pack("I", vtype) if add_vtype else b""
            return head + self._pack("I", sub_type) + self._pack("Q", 0)
        return super()._pack_val(val, vtype, add_vtype, sub_type)


def _raw_value(reader: gguf.GGUFReader, field: Any) -> _RawValue:
    """The bytes of a KV field after its key: type tag and value, exactly as in the file."""
    start = field.offset + sum(int(p.nbytes) for p in field.parts[:2])
    end = field.offset + sum(int(p.nbytes) for p in field.parts)
    return _RawValue(reader.data[start:end].tobytes())


def _copied_fields(reader: gguf.GGUFReader) -> list[Any]:
    """KV fields to copy: not the reader's GGUF.* entries, not the architecture (the writer
    adds it), not old first.* keys."""
    return [f for f in reader.fields.values() if not f.name.startswith("GGUF.")
            and f.name != gguf.Keys.General.ARCHITECTURE and not f.name.startswith(FIRST_KEY_PREFIX)]


def _base_tensors(reader: gguf.GGUFReader) -> list[Any]:
    return [t for t in reader.tensors if ROUTER_NAME_MARKER not in t.name]


def _write_gguf(reader: gguf.GGUFReader, arch: str, metadata: dict[str, object],
                new: list[tuple[str, np.ndarray]], path: Path) -> None:
    """Base KVs and tensors (bytes and types as they are), then the first.* keys and routers."""
    writer = _Writer(path, arch=arch, endianess=reader.endianess)
    try:
        alignment = reader.fields.get(gguf.Keys.General.ALIGNMENT)
        if alignment is not None:  # the key is copied below; the writer must also pad by it
            writer.data_alignment = int(alignment.contents())
        for field in _copied_fields(reader):
            writer.add_key_value(field.name, _raw_value(reader, field), field.types[0])
        for key, value in metadata.items():
            writer.add_key_value(key, value, KEY_TYPES[key][0], sub_type=KEY_TYPES[key][1])
        kept = _base_tensors(reader)
        for t in kept:  # quantized data is uint8 bytes; the writer turns the byte shape back into ne
            writer.add_tensor_info(t.name, t.data.shape, t.data.dtype, t.data.nbytes, raw_dtype=t.tensor_type)
        for name, arr in new:
            writer.add_tensor_info(name, arr.shape, arr.dtype, arr.nbytes)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_ti_data_to_file()
        for t in kept:
            writer.write_tensor_data(t.data, tensor_endianess=reader.endianess)
        for _, arr in new:
            writer.write_tensor_data(arr)
    finally:
        writer.close()


def _verify_written(path: Path, base: gguf.GGUFReader, new: list[tuple[str, np.ndarray]], where: str) -> None:
    """Read the new file back: valid FiRST-GGUF, every KV and tensor (name, type, shape) as planned."""
    out = read_header(path)
    back = routers_from_reader(out, where)
    want_kv = [(f.name, field_type(f)) for f in _copied_fields(base)]
    got_kv = [(f.name, field_type(f)) for f in _copied_fields(out)]
    if want_kv != got_kv:
        raise FormatError(f"{where}: read-back check failed: the key/value table differs from the base")
    ggml = {np.dtype(np.float16): GGMLQuantizationType.F16, np.dtype(np.float32): GGMLQuantizationType.F32}
    want = [(t.name, t.tensor_type, tuple(int(n) for n in t.shape), t.n_bytes) for t in _base_tensors(base)]
    want += [(name, ggml[arr.dtype], tuple(reversed(arr.shape)), arr.nbytes) for name, arr in new]
    got = [(t.name, t.tensor_type, tuple(int(n) for n in t.shape), t.n_bytes) for t in out.tensors]
    if want != got:
        i = next((i for i, (w, g) in enumerate(zip(want, got)) if w != g), min(len(want), len(got)))
        raise FormatError(f"{where}: read-back check failed at tensor #{i}: planned "
                          f"{want[i] if i < len(want) else None}, written {got[i] if i < len(got) else None}")
    for name, arr in new:
        bid, role = parse_router_name(name)
        if not np.array_equal(back.tensors[bid][role], arr.astype(np.float32)):
            raise FormatError(f"{where}: read-back check failed: {name} differs from the routers")


def attach_routers(base_path: str | os.PathLike, routers: RouterSet, out_path: str | os.PathLike,
                   force: bool = False, w1_dtype: str = "f32") -> Path:
    """Write ``base + routers`` as a FiRST-GGUF; the inputs are never modified.

    Every check runs before anything is written (base readable, routers valid and sized for
    the base, output path allowed); the file is written to a temporary name next to the
    output, read back and checked, then renamed. A base that is already a FiRST-GGUF has
    its routers and first.* keys replaced.

    Args:
        base_path: The base GGUF (any quantization).
        routers: Routers for exactly its ``block_count`` layers and ``embedding_length``.
        out_path: The FiRST-GGUF to write; never the base itself.
        force: Overwrite an existing output.
        w1_dtype: "f32" or "f16" for W1 (every other router tensor is F32).

    Returns:
        The output path.
    """
    base, out = Path(base_path), Path(out_path)
    check_w1_dtype(w1_dtype)
    check_output_path(out, force, inputs=(base,))
    reader = read_header(base)
    arch, n_layer, n_embd = model_dims(reader, str(base))
    if (int_key(reader, gguf.Keys.Split.LLM_KV_SPLIT_COUNT) or 1) > 1:
        raise FormatError(f"{base}: one shard of a split GGUF; merge it first (llama-gguf-split --merge)")
    for what, mine, theirs in (("layers", routers.n_layer, n_layer), ("n_embd", routers.n_embd, n_embd)):
        if mine != theirs:
            amount = f"{mine} layers" if what == "layers" else f"n_embd {mine}"
            raise FormatError(f"{routers.source}: routers are for {amount} but {base} has {theirs}")
    routers.check()
    new = router_arrays(routers, w1_dtype)
    old = [t.name for t in reader.tensors if ROUTER_NAME_MARKER in t.name]
    if old or any(name.startswith(FIRST_KEY_PREFIX) for name in reader.fields):
        logger.warning("%s is already a FiRST-GGUF: replacing its %d router tensors and first.* keys",
                       base, len(old))
    with atomic_output(out) as tmp:
        _write_gguf(reader, arch, routers.metadata(), new, tmp)
        _verify_written(tmp, reader, new, str(out))
    return out



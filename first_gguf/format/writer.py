"""Rewrite a GGUF byte for byte: the copy machinery that ``attach`` and ``prune`` share.

Like gguf-py's ``gguf_new_metadata.py``, but every key/value is copied as its exact bytes
(so nested or empty arrays and odd string bytes survive) and every tensor as its bytes with
its GGML type. numpy + gguf only, never torch.
"""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Any, Callable, Iterator

import gguf
import numpy as np
from gguf import GGUFValueType

from ..constants import FIRST_KEY_PREFIX, KEY_VERSION, ROUTER_NAME_MARKER
from .reader import KEY_TYPES, Reader


class RawValue(bytes):
    """A KV value (type tag and payload) copied byte for byte from the base GGUF."""


class CopyWriter(gguf.GGUFWriter):
    """GGUFWriter that also writes raw copied values and empty arrays (it refuses those).

    Hooks gguf-py's private ``_pack_val``; pyproject pins gguf, and the round-trip tests
    catch a change.
    """

    def _pack_val(self, val: Any, vtype: GGUFValueType, add_vtype: bool,
                  sub_type: GGUFValueType | None = None) -> bytes:
        if isinstance(val, RawValue):
            return bytes(val)
        if vtype == GGUFValueType.ARRAY and sub_type is not None and len(val) == 0:
            head = self._pack("I", vtype) if add_vtype else b""
            return head + self._pack("I", sub_type) + self._pack("Q", 0)
        return super()._pack_val(val, vtype, add_vtype, sub_type)

    def copy_field(self, reader: Reader, field: Any) -> None:
        """Add a KV field of ``reader`` exactly as the file stores it."""
        self.add_key_value(field.name, raw_value(reader, field), field.types[0])


def raw_value(reader: Reader, field: Any) -> RawValue:
    """The bytes of a KV field after its key: type tag and value, exactly as in the file."""
    start = field.offset + sum(int(p.nbytes) for p in field.parts[:2])
    end = field.offset + sum(int(p.nbytes) for p in field.parts)
    return RawValue(reader.data[start:end].tobytes())


def copied_fields(reader: Reader) -> list[Any]:
    """KV fields to copy: not the reader's GGUF.* entries, not the architecture (the writer
    adds it), not old first.* keys."""
    return [f for f in reader.fields.values() if not f.name.startswith("GGUF.")
            and f.name != gguf.Keys.General.ARCHITECTURE and not f.name.startswith(FIRST_KEY_PREFIX)]


def base_tensors(reader: Reader) -> list[Any]:
    """Every tensor but the routers."""
    return [t for t in reader.tensors if ROUTER_NAME_MARKER not in t.name]


@contextlib.contextmanager
def gguf_writer(reader: Reader, arch: str, path: Path) -> Iterator[CopyWriter]:
    """A CopyWriter to ``path`` with the byte order and alignment of ``reader``; closed on exit."""
    writer = CopyWriter(path, arch=arch, endianess=reader.endianess)
    try:
        alignment = reader.fields.get(gguf.Keys.General.ALIGNMENT)
        if alignment is not None:  # the key is copied by the caller; the writer must also pad by it
            writer.data_alignment = int(alignment.contents())
        yield writer
    finally:
        writer.close()


def write_tensors(writer: CopyWriter, reader: Reader, kept: list[tuple[str, Any]],
                  new: list[tuple[str, np.ndarray]] = ()) -> None:
    """After the KVs: the tensor infos, then the data of ``kept`` (name, tensor of ``reader``;
    bytes and types as they are) and of ``new`` (name, F32 / F16 array)."""
    for name, t in kept:  # quantized data is uint8 bytes; the writer turns the byte shape back into ne
        writer.add_tensor_info(name, t.data.shape, t.data.dtype, t.data.nbytes, raw_dtype=t.tensor_type)
    for name, arr in new:
        writer.add_tensor_info(name, arr.shape, arr.dtype, arr.nbytes)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_ti_data_to_file()
    for _, t in kept:
        writer.write_tensor_data(t.data, tensor_endianess=reader.endianess)
    for _, arr in new:
        writer.write_tensor_data(arr)


def kept_fields(reader: Reader, key_prefix: str) -> list[Any]:
    """The key/values a rewrite copies: all but GGUF's own, the architecture and the replaced part's keys."""
    return [f for f in reader.fields.values() if not f.name.startswith("GGUF.")
            and f.name != "general.architecture" and not f.name.startswith(key_prefix)]


def others_table(reader: Reader, key_prefix: str, in_part: Callable[[str], bool]) -> tuple[list, list]:
    """(key, type) and (tensor, type, bytes) of everything beside the part (``first.version`` left
    out): what a rewrite's read-back compares with its input."""
    return ([(f.name, f.types[0]) for f in kept_fields(reader, key_prefix) if f.name != KEY_VERSION],
            [(t.name, t.tensor_type, t.n_bytes) for t in reader.tensors if not in_part(t.name)])


def write_replacing_part(reader: Reader, arch: str, path: Path, version: int, key_prefix: str,
                         in_part: Callable[[str], bool], keys: dict[str, object], new: list[tuple[str, Any]]) -> None:
    """The thin and vocabulary writers' file: the kept keys in order (``first.version`` set to
    ``version``; the part's old keys, named by ``key_prefix``, dropped), then the part's ``keys``;
    every tensor but the part's old ones (``in_part(name)``), then the part's ``new`` tensors
    (name, object with ``data`` and ``tensor_type``)."""
    with gguf_writer(reader, arch, path) as writer:
        for field in kept_fields(reader, key_prefix):
            if field.name == KEY_VERSION:
                writer.add_uint32(KEY_VERSION, version)
            else:
                writer.copy_field(reader, field)
        for key, value in keys.items():
            writer.add_key_value(key, value, KEY_TYPES[key][0], sub_type=KEY_TYPES[key][1])
        write_tensors(writer, reader, [(t.name, t) for t in reader.tensors if not in_part(t.name)] + new)

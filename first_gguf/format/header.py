"""A fast, safe GGUF reader: keys, tensor infos and tensor data views (numpy + struct + mmap).

gguf-py's ``GGUFReader`` builds a NumPy array for every array item, so opening a real model
(~450,000 tokenizer strings and ids) takes seconds. ``read_header`` locates every key/value
in one pass instead: a string array is skipped by walking its lengths, a numeric array is
one ``np.frombuffer`` view, and values are decoded only when asked for (``contents()``).
Every count and length is checked against the bytes left before it is used, so a truncated
or corrupt file raises ``FormatError("PATH: not a readable GGUF file (...)")`` naming what
is wrong, fast and without allocating by a corrupt length.

The objects mirror the part of ``GGUFReader`` this package uses: ``fields[key]`` with
``.name .types .parts .offset .contents()``; ``tensors[i]`` with ``.name .tensor_type
.shape .n_elements .n_bytes .data_offset .data``; ``.alignment .data_offset .endianess
.byte_order .data``. So ``reader``'s helpers work on either reader. Differences: no
``GGUF.*`` pseudo-keys (see ``version``, ``tensor_count``), an array's ``parts`` end with
its whole payload as one segment, and a nested array's ``contents()`` is a list of lists
(GGUFReader flattens it). GGUF versions 2 and 3, either byte order, as GGUFReader.
"""

from __future__ import annotations

import math
import mmap
import os
import struct
import sys
from typing import Any

import numpy as np
from gguf import GGML_QUANT_SIZES, GGUF_DEFAULT_ALIGNMENT, GGMLQuantizationType, GGUFEndian, GGUFValueType

from ..errors import FormatError

SUPPORTED_VERSIONS = (2, 3)
GGML_MAX_DIMS = 4
MAX_NAME_BYTES = 1 << 16  # a key or tensor name longer than this is a corrupt length, not a name
MAX_ARRAY_DEPTH = 16      # arrays of arrays: bounds the recursion on a corrupt file
_MAGIC = b"GGUF"
_HEADER_BYTES = 24        # magic, version u32, tensor count u64, kv count u64
_MIN_KV_BYTES = 13        # key length u64, type u32, a 1-byte value
_MIN_TENSOR_INFO_BYTES = 24  # name length u64, n_dims u32, type u32, offset u64

# struct / NumPy type code of every fixed-size GGUF value type.
_CODES: dict[GGUFValueType, str] = {
    GGUFValueType.UINT8: "B", GGUFValueType.INT8: "b", GGUFValueType.UINT16: "H",
    GGUFValueType.INT16: "h", GGUFValueType.UINT32: "I", GGUFValueType.INT32: "i",
    GGUFValueType.FLOAT32: "f", GGUFValueType.BOOL: "?", GGUFValueType.UINT64: "Q",
    GGUFValueType.INT64: "q", GGUFValueType.FLOAT64: "d",
}
# Smallest encoding of one array item of each type (a string or an array may be empty).
_MIN_ITEM_BYTES = {**{t: struct.calcsize(c) for t, c in _CODES.items()},
                   GGUFValueType.STRING: 8, GGUFValueType.ARRAY: 12}
# GGML types whose data GGUFReader (and so this reader) shows as typed values; others as bytes.
_TENSOR_DTYPES = {
    GGMLQuantizationType.F16: np.float16, GGMLQuantizationType.F32: np.float32,
    GGMLQuantizationType.F64: np.float64, GGMLQuantizationType.I8: np.int8,
    GGMLQuantizationType.I16: np.int16, GGMLQuantizationType.I32: np.int32,
    GGMLQuantizationType.I64: np.int64,
}


class _Buffer:
    """The file's bytes and byte order, with reads that check bounds and name the file on failure."""

    def __init__(self, path: str, buf: Any, order: str):
        self.path, self.buf, self.size, self.order = path, buf, len(buf), order
        self.u32, self.u64 = struct.Struct(order + "I"), struct.Struct(order + "Q")

    def error(self, what: str) -> FormatError:
        return FormatError(f"{self.path}: not a readable GGUF file ({what})")

    def need(self, off: int, n: int, what: str) -> None:
        if n > self.size - off:
            raise self.error(f"{what} at byte {off} needs {n} bytes, past the end of the file "
                             f"({self.size} bytes)")

    def read(self, st: struct.Struct, off: int, what: str) -> int:
        self.need(off, st.size, what)
        return st.unpack_from(self.buf, off)[0]

    def string(self, off: int, what: str, limit: int | None = None) -> tuple[int, int]:
        """(start, end) of the bytes of the string at ``off``."""
        n = self.read(self.u64, off, f"{what} length")
        if limit is not None and n > limit:
            raise self.error(f"{what} at byte {off} claims {n} bytes (at most {limit})")
        self.need(off + 8, n, f"{what} of {n} bytes")
        return off + 8, off + 8 + n

    def name(self, off: int, what: str) -> tuple[str, int]:
        """A key or tensor name (UTF-8) and the offset after it."""
        start, end = self.string(off, what, MAX_NAME_BYTES)
        try:
            return str(self.buf[start:end], "utf-8"), end
        except UnicodeDecodeError:
            raise self.error(f"{what} at byte {off} is not UTF-8") from None

    def view(self, off: int, code: str, count: int) -> np.ndarray:
        return np.frombuffer(self.buf, np.dtype(self.order + code), count, off)

    def value_type(self, off: int, what: str) -> GGUFValueType:
        raw = self.read(self.u32, off, f"{what} type")
        try:
            return GGUFValueType(raw)
        except ValueError:
            raise self.error(f"{what} has unknown value type {raw}") from None

    def skip_value(self, off: int, vtype: GGUFValueType, what: str, depth: int = 0) -> int:
        """The offset after a value of type ``vtype`` at ``off``, every length checked."""
        code = _CODES.get(vtype)
        if code is not None:
            self.need(off, _MIN_ITEM_BYTES[vtype], what)
            return off + _MIN_ITEM_BYTES[vtype]
        if vtype == GGUFValueType.STRING:
            return self.string(off, what)[1]
        if depth >= MAX_ARRAY_DEPTH:
            raise self.error(f"{what}: arrays nested more than {MAX_ARRAY_DEPTH} deep")
        item = self.value_type(off, f"{what} array item")
        count = self.read(self.u64, off + 4, f"{what} array length")
        off += 12
        if count > (self.size - off) // _MIN_ITEM_BYTES[item]:
            raise self.error(f"{what}: array of {count} {item.name} items at byte {off - 12} cannot fit "
                             f"in the {self.size - off} bytes left")
        if item in _CODES:
            return off + count * _MIN_ITEM_BYTES[item]
        if item == GGUFValueType.STRING:
            return self._skip_strings(off, count, what)
        for i in range(count):
            off = self.skip_value(off, item, f"{what} item {i}", depth + 1)
        return off

    def _skip_strings(self, off: int, count: int, what: str) -> int:
        """The hot loop (a tokenizer's vocabulary and merges): one unpack per string."""
        unpack, buf, i = self.u64.unpack_from, self.buf, 0
        try:
            for i in range(count):
                off += 8 + unpack(buf, off)[0]
            if off <= self.size:
                return off
            i += 1
        except (struct.error, OverflowError):  # a length field past the end, or a wild offset
            pass
        bad = i - 1 if off > self.size else i  # the string that jumped past the end, or was cut
        raise self.error(f"{what}: string {bad} of the array of {count} runs past the end of the file "
                         f"({self.size} bytes)")

    def decode(self, off: int, vtype: GGUFValueType) -> tuple[Any, int]:
        """(Python value, offset after it) of an already checked value."""
        code = _CODES.get(vtype)
        if code is not None:
            return struct.unpack_from(self.order + code, self.buf, off)[0], off + _MIN_ITEM_BYTES[vtype]
        if vtype == GGUFValueType.STRING:
            n = self.u64.unpack_from(self.buf, off)[0]
            return str(self.buf[off + 8:off + 8 + n], "utf-8"), off + 8 + n
        item = GGUFValueType(self.u32.unpack_from(self.buf, off)[0])
        count, off = self.u64.unpack_from(self.buf, off + 4)[0], off + 12
        if item in _CODES:
            return self.view(off, _CODES[item], count).tolist(), off + count * _MIN_ITEM_BYTES[item]
        values = []
        for _ in range(count):
            value, off = self.decode(off, item)
            values.append(value)
        return values, off


class KeyValue:
    """One key/value of a GGUF, located but decoded only on demand."""

    __slots__ = ("_buf", "name", "offset", "type", "item_type", "count", "value_offset", "end")

    def __init__(self, buf: _Buffer, name: str, offset: int, value_offset: int, vtype: GGUFValueType, end: int):
        self._buf, self.name, self.offset, self.value_offset, self.type, self.end = (
            buf, name, offset, value_offset, vtype, end)
        is_array = vtype == GGUFValueType.ARRAY
        #: an array's item type and length (also of an empty array); None for other values
        self.item_type = GGUFValueType(buf.u32.unpack_from(buf.buf, value_offset)[0]) if is_array else None
        self.count = buf.u64.unpack_from(buf.buf, value_offset + 4)[0] if is_array else None

    def __repr__(self) -> str:
        kind = self.type.name if self.item_type is None else f"ARRAY[{self.item_type.name}] x{self.count}"
        return f"KeyValue({self.name!r}, {kind})"

    def contents(self) -> Any:
        """The value: int, float, bool, str, or a list of them (raises UnicodeDecodeError on bad text)."""
        return self._buf.decode(self.value_offset, self.type)[0]

    def array(self) -> np.ndarray:
        """A numeric array's values as a read-only NumPy view (no copy, no Python loop)."""
        if self.item_type not in _CODES:
            raise TypeError(f"{self.name} is not a numeric array")
        return self._buf.view(self.value_offset + 12, _CODES[self.item_type], self.count)

    @property
    def types(self) -> list[GGUFValueType]:
        """GGUFReader's ``types``: the type, then for an array the types of its first item."""
        types, off, vtype = [self.type], self.value_offset, self.type
        while vtype == GGUFValueType.ARRAY and self._buf.u64.unpack_from(self._buf.buf, off + 4)[0] > 0:
            vtype = GGUFValueType(self._buf.u32.unpack_from(self._buf.buf, off)[0])
            types.append(vtype)
            off += 12
        return types

    @property
    def parts(self) -> list[np.ndarray]:
        """GGUFReader's ``parts`` as byte views: key length, key, type, then the value's parts
        (an array's item type, length and its whole payload as one segment)."""
        buf, off, value = self._buf, self.offset, self.value_offset
        key_end = value - 4
        parts = [buf.view(off, "Q", 1), buf.view(off + 8, "B", key_end - off - 8), buf.view(key_end, "I", 1)]
        if self.type in _CODES:
            return parts + [buf.view(value, _CODES[self.type], 1)]
        if self.type == GGUFValueType.STRING:
            return parts + [buf.view(value, "Q", 1), buf.view(value + 8, "B", self.end - value - 8)]
        payload = (buf.view(value + 12, _CODES[self.item_type], self.count) if self.item_type in _CODES
                   else buf.view(value + 12, "B", self.end - value - 12))
        return parts + [buf.view(value, "I", 1), buf.view(value + 4, "Q", 1), payload]


class TensorInfo:
    """One tensor: ``ne`` innermost first (GGUFReader's ``shape``), GGML type, where its bytes are."""

    __slots__ = ("_header", "name", "ne", "tensor_type", "offset", "data_offset", "n_elements", "n_bytes")

    def __init__(self, header: GGUFHeader, name: str, ne: tuple[int, ...], tensor_type: GGMLQuantizationType,
                 offset: int):
        self._header, self.name, self.ne, self.tensor_type, self.offset = header, name, ne, tensor_type, offset
        block, type_size = GGML_QUANT_SIZES[tensor_type]
        self.n_elements = math.prod(ne)
        self.n_bytes = self.n_elements * type_size // block
        self.data_offset = -1  # set once the header knows where the data section starts

    def __repr__(self) -> str:
        return f"TensorInfo({self.name!r}, {self.tensor_type.name}, ne={list(self.ne)})"

    @property
    def shape(self) -> tuple[int, ...]:
        """GGUFReader's name for ``ne``."""
        return self.ne

    @property
    def data(self) -> np.ndarray:
        """The values as a read-only view on the file, shaped as GGUFReader shapes them: NumPy
        order (``ne`` reversed) for float and int types, else uint8 with rows of bytes."""
        dims = tuple(reversed(self.ne))
        dtype = _TENSOR_DTYPES.get(self.tensor_type)
        if dtype is None:
            block, type_size = GGML_QUANT_SIZES[self.tensor_type]
            dtype, dims = np.uint8, dims[:-1] + (dims[-1] // block * type_size,) if dims else dims
        raw = self._header.data[self.data_offset:self.data_offset + self.n_bytes]
        return raw.view(np.dtype(dtype).newbyteorder(self._header._buf.order)).reshape(dims)


class GGUFHeader:
    """A GGUF's keys (``fields``), tensor infos (``tensors``) and layout; see ``read_header``.

    Args:
        path: Named in error messages.
        buf: The file's bytes: ``read_header``'s read-only mmap, or ``bytes``.
    """

    def __init__(self, path: str, buf: Any):
        if len(buf) < _HEADER_BYTES:
            raise _Buffer(path, buf, "<").error(f"{len(buf)} bytes, too short for a GGUF header "
                                                f"({_HEADER_BYTES} bytes)")
        if bytes(buf[:4]) != _MAGIC:
            raise _Buffer(path, buf, "<").error(f"magic {bytes(buf[:4])!r}, expected {_MAGIC!r}")
        # A version with its low 16 bits 0 is a small number written in the other byte order.
        order = ">" if struct.unpack_from("<I", buf, 4)[0] & 0xFFFF == 0 else "<"
        self._buf = b = _Buffer(path, buf, order)
        self.path = path
        self.version, self.tensor_count, self.kv_count = struct.unpack_from(order + "IQQ", buf, 4)
        if self.version not in SUPPORTED_VERSIONS:
            raise b.error(f"GGUF version {self.version}; this reader reads versions "
                          f"{' and '.join(map(str, SUPPORTED_VERSIONS))}")
        self.endianess = GGUFEndian.LITTLE if order == "<" else GGUFEndian.BIG
        self.byte_order = "I" if (order == "<") == (sys.byteorder == "little") else "S"
        self.data = np.frombuffer(buf, np.uint8)
        off = self._read_fields(_HEADER_BYTES)
        off = self._read_tensor_infos(off)
        self.header_end = off  # end of the tensor infos; the data starts at the next alignment boundary
        self.alignment = self._alignment()
        self.data_offset = off + (-off % self.alignment)
        self._place_tensors()

    def _read_fields(self, off: int) -> int:
        b = self._buf
        if self.kv_count > (b.size - off) // _MIN_KV_BYTES:
            raise b.error(f"{self.kv_count} key/values cannot fit in the {b.size - off} bytes left")
        self.fields: dict[str, KeyValue] = {}
        for i in range(self.kv_count):
            start = off
            name, off = b.name(off, f"key #{i} name")
            if name in self.fields:
                raise b.error(f"key {name} appears twice")
            vtype = b.value_type(off, f"key {name}")
            end = b.skip_value(off + 4, vtype, f"key {name}")
            self.fields[name] = KeyValue(b, name, start, off + 4, vtype, end)
            off = end
        return off

    def _read_tensor_infos(self, off: int) -> int:
        b = self._buf
        if self.tensor_count > (b.size - off) // _MIN_TENSOR_INFO_BYTES:
            raise b.error(f"{self.tensor_count} tensor infos cannot fit in the {b.size - off} bytes left")
        self.tensors: list[TensorInfo] = []
        names = set()
        for i in range(self.tensor_count):
            name, off = b.name(off, f"tensor #{i} name")
            if name in names:
                raise b.error(f"tensor {name} appears twice")
            names.add(name)
            n_dims = b.read(b.u32, off, f"tensor {name} n_dims")
            if n_dims > GGML_MAX_DIMS:
                raise b.error(f"tensor {name} has {n_dims} dims (GGML allows at most {GGML_MAX_DIMS})")
            b.need(off + 4, 8 * n_dims + 12, f"tensor {name} info")
            ne = struct.unpack_from(f"{b.order}{n_dims}q", b.buf, off + 4)
            raw_type, offset = struct.unpack_from(b.order + "IQ", b.buf, off + 4 + 8 * n_dims)
            off += 4 + 8 * n_dims + 12
            if any(n < 0 for n in ne):
                raise b.error(f"tensor {name} has a negative dim, ne {list(ne)}")
            try:
                ggml_type = GGMLQuantizationType(raw_type)
            except ValueError:
                raise b.error(f"tensor {name} has unknown GGML type {raw_type}") from None
            block = GGML_QUANT_SIZES[ggml_type][0]
            if ne and ne[0] % block:
                raise b.error(f"tensor {name}: row of {ne[0]} is not a multiple of the "
                              f"{ggml_type.name} block size {block}")
            self.tensors.append(TensorInfo(self, name, ne, ggml_type, offset))
        return off

    def _alignment(self) -> int:
        field = self.fields.get("general.alignment")
        if field is None:
            return GGUF_DEFAULT_ALIGNMENT
        if field.type != GGUFValueType.UINT32:
            raise self._buf.error(f"general.alignment has type {field.type.name}, expected UINT32")
        alignment = field.contents()
        if alignment == 0 or alignment & (alignment - 1):
            raise self._buf.error(f"general.alignment is {alignment}, expected a power of two")
        return alignment

    def _place_tensors(self) -> None:
        b = self._buf
        for t in self.tensors:
            if t.offset % self.alignment:
                raise b.error(f"tensor {t.name}: data offset {t.offset} is not a multiple of the "
                              f"alignment {self.alignment}")
            t.data_offset = self.data_offset + t.offset
            if t.n_bytes > b.size - t.data_offset:
                raise b.error(f"tensor {t.name}: {t.n_bytes} bytes of data at byte {t.data_offset} "
                              f"run past the end of the file ({b.size} bytes)")


def read_header(path: str | os.PathLike) -> GGUFHeader:
    """Open a GGUF: every key located, every tensor info read and checked against the file size.

    Raises:
        FormatError: "PATH: no such file", or "PATH: not a readable GGUF file (what is wrong)".
    """
    try:
        with open(path, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            buf = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) if size else b""
    except FileNotFoundError:
        raise FormatError(f"{path}: no such file") from None
    except (OSError, ValueError) as exc:  # a directory, no permission, an unmappable file
        reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else exc
        raise FormatError(f"{path}: not a readable GGUF file ({reason})") from None
    return GGUFHeader(str(path), buf)

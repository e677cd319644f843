"""The fast GGUF reader (``format.header``): agrees with gguf.GGUFReader, fails fast on bad bytes.

Agreement is checked on the tiny GGUFs of tests/ggufs.py (every key's type, value and bytes,
every tensor's name, ne, type, offset and data) and, marked slow, on the default zoo model
and a FiRST-GGUF made from it. Corrupt files are good files cut or poked at known places.
Timings are printed, never asserted.
"""

from __future__ import annotations

import contextlib
import re
import struct
import time
from collections.abc import Callable
from pathlib import Path

import gguf
import numpy as np
import pytest
from gguf import GGUFValueType as T

import ggufs
from first_gguf import format as gr
from first_gguf.errors import FormatError
from first_gguf.format.header import GGUFHeader, read_header
from first_gguf.format.reader import field_type

UNREADABLE = r"^.*: not a readable GGUF file \("


def _flat(value):
    """GGUFReader flattens nested arrays; this reader keeps them nested."""
    if isinstance(value, list):
        return [x for item in value for x in (_flat(item) if isinstance(item, list) else [item])]
    return value


def _bytes(arr: np.ndarray) -> np.ndarray:
    return arr.reshape(-1).view(np.uint8)


def assert_agrees(path: Path) -> GGUFHeader:
    """Every key and tensor of ``path`` as read here equals gguf.GGUFReader's reading."""
    ref, got = gguf.GGUFReader(path), read_header(path)
    assert (got.version, got.tensor_count, got.kv_count) == tuple(
        int(ref.fields[k].contents()) for k in ("GGUF.version", "GGUF.tensor_count", "GGUF.kv_count"))
    assert (got.alignment, got.data_offset, got.endianess, got.byte_order) == (
        ref.alignment, ref.data_offset, ref.endianess, ref.byte_order)
    ref_fields = {k: f for k, f in ref.fields.items() if not k.startswith("GGUF.")}
    assert list(got.fields) == list(ref_fields)
    for key, want in ref_fields.items():
        field = got.fields[key]
        assert (field.name, field.offset, field.types) == (want.name, want.offset, want.types), key
        assert field_type(field) == field_type(want), key
        assert (field.type, field.item_type) == field_type(want), key
        assert ggufs.kv_raw(field) == ggufs.kv_raw(want), key
        assert sum(p.nbytes for p in field.parts) == sum(p.nbytes for p in want.parts) == field.end - field.offset
        assert _flat(field.contents()) == want.contents(), key
        if field.item_type in (T.INT32, T.FLOAT32, T.UINT8, T.INT64, T.BOOL):
            assert field.array().tolist() == want.contents(), key
    assert len(got.tensors) == len(ref.tensors)
    for t, want in zip(got.tensors, ref.tensors):
        assert (t.name, t.tensor_type, list(t.shape), t.n_elements, t.n_bytes, t.data_offset) == (
            want.name, want.tensor_type, list(want.shape), want.n_elements, want.n_bytes, want.data_offset), t.name
        data = t.data
        assert (data.dtype, data.shape, data.nbytes) == (want.data.dtype, want.data.shape, want.data.nbytes), t.name
        assert np.array_equal(_bytes(data), _bytes(want.data)), t.name
        assert not data.flags.writeable
    return got


# --- agreement with GGUFReader on tiny files ---------------------------------------------------

def _big_endian(path: Path) -> Path:
    writer = gguf.GGUFWriter(path, ggufs.ARCH, endianess=gguf.GGUFEndian.BIG)
    for key, (value, vtype, sub) in (ggufs.base_kv() | ggufs.first_kv()).items():
        writer.add_key_value(key, value, vtype, sub_type=sub)
    for name, (arr, raw) in (ggufs.base_tensors() | ggufs.router_tensors(ggufs.random_router_arrays())).items():
        writer.add_tensor(name, arr.copy(), raw_dtype=raw)  # the writer byte-swaps in place
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def _attached(tmp_path: Path) -> Path:
    """Written by attach: empty protected_layers, F16 W1."""
    routers = gr.make_identity_routers(ggufs.N_LAYER, ggufs.N_EMBD, hidden_size=ggufs.HIDDEN)
    routers.protected_layers = []
    base = ggufs.write_base(tmp_path / "base.gguf")
    return gr.attach_routers(base, routers, tmp_path / "attached.gguf", w1_dtype="f16")


TINY = {
    "base": lambda p: ggufs.write_base(p / "m.gguf"),
    "first": lambda p: ggufs.write_first(p / "m.gguf"),
    "alignment 64": lambda p: ggufs.write_base(p / "m.gguf", alignment=64),
    "big-endian": lambda p: _big_endian(p / "m.gguf"),
    "attached": _attached,
    "no tensors": lambda p: ggufs.write_gguf(p / "m.gguf", ggufs.base_kv(), {}),
}


@pytest.mark.parametrize("case", list(TINY))
def test_agrees_with_gguf_reader(tmp_path, case):
    header = assert_agrees(TINY[case](tmp_path))
    assert header.fields["general.architecture"].contents() == ggufs.ARCH


def test_values_and_views(tmp_path):
    header = read_header(ggufs.write_first(tmp_path / "m.gguf"))
    fields = header.fields
    assert fields["test.nested"].contents() == [[1, 2, 3], [4]]
    assert fields["test.int64"].contents() == -(2**40)
    assert fields["tokenizer.ggml.add_bos_token"].contents() is False
    tokens = fields["tokenizer.ggml.tokens"]
    assert (tokens.count, tokens.item_type, tokens.contents()[-1]) == (ggufs.N_VOCAB, T.STRING, "é✓")
    scores = fields["tokenizer.ggml.scores"].array()
    assert scores.dtype == np.float32 and np.array_equal(scores, np.float32([-i / 3 for i in range(ggufs.N_VOCAB)]))
    with pytest.raises(TypeError, match="not a numeric array"):
        fields["tokenizer.ggml.tokens"].array()
    norm = next(t for t in header.tensors if t.name == "blk.0.first_router_norm.weight")
    assert norm.data.shape == (ggufs.N_EMBD,) and norm.offset == norm.data_offset - header.data_offset


def test_is_first_gguf(tiny_base, tmp_path):
    assert gr.is_first_gguf(ggufs.write_first(tmp_path / "m.gguf"))
    assert not gr.is_first_gguf(tiny_base)
    kv = ggufs.base_kv() | {"first.version": (2, T.UINT32, None)}  # present but invalid still counts
    assert gr.is_first_gguf(ggufs.write_gguf(tmp_path / "bad.gguf", kv, ggufs.base_tensors()))
    with pytest.raises(FormatError, match="nope.gguf: no such file"):
        gr.is_first_gguf(tmp_path / "nope.gguf")
    (tmp_path / "cut.gguf").write_bytes(tiny_base.read_bytes()[:100])
    with pytest.raises(FormatError, match=UNREADABLE):
        gr.is_first_gguf(tmp_path / "cut.gguf")


# --- corrupt files --------------------------------------------------------------------------

def _layout(path: Path) -> tuple[bytes, GGUFHeader]:
    return path.read_bytes(), read_header(path)


def test_every_truncation_is_one_clear_error(tiny_base):
    """Cut at every byte of the header and every 97th of the data: FormatError, never another error."""
    data, header = _layout(tiny_base)
    end = max(t.data_offset + t.n_bytes for t in header.tensors)
    cuts = [*range(header.data_offset + 1), *range(header.data_offset, end, 97), end - 1]
    start = time.perf_counter()
    for cut in cuts:
        with pytest.raises(FormatError, match=UNREADABLE):
            GGUFHeader("cut.gguf", data[:cut])
    print(f"{len(cuts)} truncations rejected in {time.perf_counter() - start:.2f} s")
    GGUFHeader("whole.gguf", data[:end])  # the last tensor's padding is not needed


def test_random_header_damage_is_a_format_error_or_harmless(tiny_base):
    """Seeded byte flips in the header: either FormatError, or a file whose every value and
    tensor can be read (a value may still be bad UTF-8)."""
    data, header = _layout(tiny_base)
    rng = np.random.default_rng(0)
    outcomes = {"rejected": 0, "read": 0}
    for _ in range(3000):
        bad = bytearray(data)
        for at in rng.integers(4, header.data_offset, size=rng.integers(1, 4)):
            bad[at] = rng.integers(256) if rng.random() < 0.5 else bad[at] ^ 0x80
        try:
            damaged = GGUFHeader("damaged.gguf", bytes(bad))
        except FormatError as exc:
            assert re.match(UNREADABLE, str(exc)), exc
            outcomes["rejected"] += 1
            continue
        outcomes["read"] += 1
        for field in damaged.fields.values():
            with contextlib.suppress(UnicodeDecodeError):
                field.contents()
            assert sum(p.nbytes for p in field.parts) == field.end - field.offset
        for t in damaged.tensors:
            assert t.data.nbytes == t.n_bytes
    print(outcomes)


def test_truncated_file_names_the_problem(tiny_base, tmp_path):
    data, header = _layout(tiny_base)
    tokens = header.fields["tokenizer.ggml.tokens"].value_offset
    cases = {0: r"0 bytes, too short for a GGUF header", 20: r"20 bytes, too short",
             200: r"16 key/values cannot fit in the 176 bytes left",
             tokens + 312: rf"key tokenizer\.ggml\.tokens: string 23 of the array of 32 runs past the end of "
                           rf"the file \({tokens + 312} bytes\)",
             len(data) - 300: r"run past the end of the file"}
    for cut, message in cases.items():
        path = tmp_path / f"cut{cut}.gguf"
        path.write_bytes(data[:cut])
        with pytest.raises(FormatError, match=rf"^{path}: not a readable GGUF file \(.*{message}"):
            read_header(path)


def _poke(fmt: str, value: int, where: Callable[[bytes, GGUFHeader], int]) -> Callable:
    """A corruption: pack ``value`` at the offset ``where(data, header)``."""
    def corrupt(data: bytes, header: GGUFHeader) -> bytes:
        out = bytearray(data)
        struct.pack_into(fmt, out, where(data, header), value)
        return bytes(out)
    return corrupt


def _replace(old: bytes, new: bytes):
    return lambda data, header: data.replace(old, new)


def _value(key: str, delta: int = 0):
    """Offset of a key's value (after its type tag), plus ``delta``."""
    return lambda data, header: header.fields[key].value_offset + delta


def _tensor_info(name: str, delta: int):
    """Offset of a tensor info's field after the name: +0 n_dims, +4 ne, then type and offset."""
    def where(data: bytes, header: GGUFHeader) -> int:
        encoded = struct.pack("<Q", len(name)) + name.encode()
        return data.index(encoded, max(f.end for f in header.fields.values())) + len(encoded) + delta
    return where


TOKENS, NORM, Q8 = "tokenizer.ggml.tokens", "blk.0.attn_norm.weight", "blk.0.attn_q.weight"  # NORM: ne [64], F32
NORM_RE = re.escape(NORM)
# case -> (corruption of the tiny base GGUF written with alignment 64, message inside the parentheses)
CORRUPT = {
    "wrong magic": (lambda data, header: b"GGML" + data[4:], r"magic b'GGML', expected b'GGUF'"),
    "version 1": (_poke("<I", 1, lambda *_: 4), r"GGUF version 1; this reader reads versions 2 and 3"),
    "huge tensor count": (_poke("<Q", 2**60, lambda *_: 8), r"1152921504606846976 tensor infos cannot fit"),
    "huge kv count": (_poke("<Q", 2**62, lambda *_: 16),
                      r"4611686018427387904 key/values cannot fit in the \d+ bytes left"),
    "huge key length": (_poke("<Q", 2**63, lambda *_: 24),
                        r"key #0 name at byte 24 claims 9223372036854775808 bytes"),
    "huge string length": (_poke("<Q", 2**40, _value("general.name")),
                           r"key general\.name of 1099511627776 bytes at byte \d+ needs .* past the end"),
    "huge string in array": (_poke("<Q", 2**64 - 1, _value(TOKENS, 12 + 8 + len("tok0"))),  # the length of "tok1"
                             r"key tokenizer\.ggml\.tokens: string 1 of the array of 32 runs past the end "
                             r"of the file \(\d+ bytes\)"),
    "huge array length": (_poke("<Q", 2**61, _value(TOKENS, 4)),
                          r"key tokenizer\.ggml\.tokens: array of 2305843009213693952 STRING items .* cannot fit"),
    "unknown value type": (_poke("<I", 99, _value("general.name", -4)),
                           r"key general\.name has unknown value type 99"),
    "unknown item type": (_poke("<I", 77, _value(TOKENS)),
                          r"key tokenizer\.ggml\.tokens array item has unknown value type 77"),
    "duplicate key": (_replace(b"test.int64", b"test.uint8"), r"key test\.uint8 appears twice"),
    "key not UTF-8": (_replace(b"general.name", b"general.n\xffme"), r"key #\d+ name at byte \d+ is not UTF-8"),
    "alignment 48": (_poke("<I", 48, _value("general.alignment")),
                     r"general\.alignment is 48, expected a power of two"),
    "alignment 0": (_poke("<I", 0, _value("general.alignment")), r"general\.alignment is 0"),
    "alignment i32": (_poke("<I", int(T.INT32), _value("general.alignment", -4)),
                      r"general\.alignment has type INT32, expected UINT32"),
    "n_dims 5": (_poke("<I", 5, _tensor_info(NORM, 0)), rf"tensor {NORM_RE} has 5 dims \(GGML allows at most 4\)"),
    "negative ne": (_poke("<q", -64, _tensor_info(NORM, 4)), rf"tensor {NORM_RE} has a negative dim"),
    "huge ne": (_poke("<q", 2**62, _tensor_info(NORM, 4)), rf"tensor {NORM_RE}: 18446744073709551616 bytes"),
    "ggml type": (_poke("<I", 1000, _tensor_info(NORM, 12)), rf"tensor {NORM_RE} has unknown GGML type 1000"),
    "misaligned": (_poke("<Q", 32, _tensor_info(NORM, 16)),
                   rf"tensor {NORM_RE}: data offset 32 is not a multiple of the alignment 64"),
    "data past the end": (_poke("<Q", 2**40, _tensor_info(NORM, 16)),
                          rf"tensor {NORM_RE}: 256 bytes of data at byte \d+ run past the end"),
    "block size": (_poke("<q", 48, _tensor_info(Q8, 4)),
                   r"tensor blk\.0\.attn_q\.weight: row of 48 is not a multiple of the Q8_0 block size 32"),
    "duplicate tensor": (_replace(b"blk.1.attn_norm.weight", NORM.encode()), rf"tensor {NORM_RE} appears twice"),
}


@pytest.fixture(scope="module")
def aligned_base(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return ggufs.write_base(tmp_path_factory.mktemp("aligned") / "base.gguf", alignment=64)


@pytest.mark.parametrize("case", list(CORRUPT))
def test_corrupt_file_is_one_clear_error(aligned_base, tmp_path, case):
    corrupt, message = CORRUPT[case]
    path = tmp_path / "bad.gguf"
    path.write_bytes(corrupt(*_layout(aligned_base)))
    start = time.perf_counter()
    for call in (read_header, gr.read_routers, gr.inspect_gguf, gr.is_first_gguf, gr.open_gguf):
        with pytest.raises(FormatError, match=rf"^{re.escape(str(path))}: not a readable GGUF file \({message}"):
            call(path)
    print(f"{case}: rejected in {(time.perf_counter() - start) * 1000:.1f} ms")


def test_deeply_nested_array_is_refused():
    """An array of arrays of ... 1000 deep: refused at MAX_ARRAY_DEPTH, no RecursionError."""
    key = b"bomb"
    value = struct.pack("<IQ", int(T.ARRAY), 1) * 1000 + struct.pack("<IQ", int(T.UINT8), 0)
    data = (b"GGUF" + struct.pack("<IQQ", 3, 0, 1) + struct.pack("<Q", len(key)) + key
            + struct.pack("<I", int(T.ARRAY)) + value)
    with pytest.raises(FormatError, match=r"key bomb item 0 item 0 .* arrays nested more than 16 deep"):
        GGUFHeader("bomb.gguf", data)


def test_unreadable_paths(tmp_path):
    with pytest.raises(FormatError, match=rf"^{tmp_path}: not a readable GGUF file \("):
        read_header(tmp_path)
    with pytest.raises(FormatError, match="nope.gguf: no such file"):
        read_header(tmp_path / "nope.gguf")


# --- the real default model -----------------------------------------------------------------

def _timed(fn, *args, repeat: int = 3):
    best, result = float("inf"), None
    for _ in range(repeat):
        start = time.perf_counter()
        result = fn(*args)
        best = min(best, time.perf_counter() - start)
    return result, best


@pytest.mark.slow
def test_agrees_on_the_default_model(default_base, default_first, capsys):
    lines = []
    for label, path in (("base", default_base), ("FiRST-GGUF", default_first)):
        start = time.perf_counter()
        header = assert_agrees(path)
        _, t_header = _timed(read_header, path)
        _, t_ref = _timed(gguf.GGUFReader, path, repeat=1)
        _, t_inspect = _timed(gr.inspect_gguf, path)
        lines.append(f"{label}: read_header {t_header * 1000:.0f} ms, GGUFReader {t_ref:.1f} s, "
                     f"inspect_gguf {t_inspect * 1000:.0f} ms; whole check {time.perf_counter() - start:.1f} s")
        assert len(header.fields["tokenizer.ggml.tokens"].contents()) == header.fields["tokenizer.ggml.tokens"].count
    routers, t_read = _timed(gr.read_routers, default_first)
    _, t_is = _timed(gr.is_first_gguf, default_first)
    lines.append(f"FiRST-GGUF: read_routers {t_read * 1000:.0f} ms, is_first_gguf {t_is * 1000:.0f} ms")
    assert routers.n_layer == 24 and not gr.is_first_gguf(default_base)
    with capsys.disabled():
        print("\n" + "\n".join(lines))

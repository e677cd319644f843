"""Thinned FFNs (first.version 2, docs/FORMAT.md section 7): the writer on tiny GGUFs written by
tests/ggufs.py (F32, F16 and Q8_0 FFNs; no torch), every rule the reader applies, attach / stamp /
prune / inspect with a thin part, the ``first-gguf thin`` command; then the calibration on a tiny
seeded qwen2 (torch) against the statistic computed by hand.
"""

from __future__ import annotations

import json
from pathlib import Path

import gguf
import numpy as np
import pytest
from click.testing import CliRunner
from gguf import GGMLQuantizationType as Q
from gguf import GGUFValueType as T

import ggufs
from first_gguf import constants as C
from first_gguf import format as fmt
from first_gguf.cli import cli
from first_gguf.errors import FirstError, FormatError
from first_gguf.format.header import read_header
from first_gguf.format.thin_write import quantize

E, N_FF, N_LAYER = ggufs.N_EMBD, 128, ggufs.N_LAYER
# docs/FORMAT.md section 2: the first.thin.* GGUF types
THIN_TYPES = {C.KEY_THIN_LAYERS: (T.ARRAY, T.INT32), C.KEY_THIN_WIDTHS: (T.ARRAY, T.UINT32),
              C.KEY_THIN_NEURONS: (T.ARRAY, T.INT32), C.KEY_THIN_SOURCE: (T.STRING, None),
              C.KEY_THIN_TYPE: (T.STRING, None)}


def _ffn_tensors(seed: int = 2) -> ggufs.Tensors:
    """A gated FFN per layer: gate Q8_0, up F16, down F32 / Q8_0 / F16 in layers 0 / 1 / 2."""
    rng = np.random.default_rng(seed)
    out: ggufs.Tensors = {}
    for i in range(N_LAYER):
        down = rng.standard_normal((E, N_FF)).astype(np.float32)
        out[f"blk.{i}.ffn_gate.weight"] = (gguf.quants.quantize(rng.standard_normal((N_FF, E)).astype(np.float32),
                                                                Q.Q8_0), Q.Q8_0)
        out[f"blk.{i}.ffn_up.weight"] = (rng.standard_normal((N_FF, E)).astype(np.float16), None)
        out[f"blk.{i}.ffn_down.weight"] = [(down, None), (gguf.quants.quantize(down, Q.Q8_0), Q.Q8_0),
                                           (down.astype(np.float16), None)][i]
    return out


def _base_kv() -> ggufs.KV:
    return ggufs.base_kv() | {f"{ggufs.ARCH}.feed_forward_length": (N_FF, T.UINT32, None)}


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    """A tiny FiRST-GGUF (3 layers, n_embd 64, n_ff 128) with gated FFNs, attached by the code under test."""
    work = tmp_path_factory.mktemp("thin")
    plain = ggufs.write_gguf(work / "plain.gguf", _base_kv(), ggufs.base_tensors() | _ffn_tensors())
    return fmt.attach_routers(plain, fmt.make_identity_routers(N_LAYER, E, hidden_size=ggufs.HIDDEN),
                              work / "tiny.first.gguf")


@pytest.fixture(scope="module")
def scores() -> np.ndarray:
    return np.random.default_rng(5).random((N_LAYER, N_FF))


def _tensors(path: Path) -> dict:
    return {t.name: t for t in read_header(path).tensors}


def _kv_raw(path: Path, without: tuple[str, ...] = ()) -> list:
    r = gguf.GGUFReader(path)
    return [(f.name, ggufs.kv_raw(f)) for f in r.fields.values() if not f.name.startswith("GGUF.")
            and f.name not in without]


# --- writing -----------------------------------------------------------------------------------

def test_write_keeps_the_best_neurons_and_copies_everything_else(tiny, scores, tmp_path):
    before = ggufs.sha256(tiny)
    out = fmt.write_thin_from_scores(tiny, scores, 32, tmp_path / "t.gguf", source="tests")
    assert ggufs.sha256(tiny) == before
    thin = fmt.read_thin(out)
    want = [np.sort(np.argsort(-scores[i])[:32]) for i in range(N_LAYER)]
    assert thin.layers == (0, 1, 2) and thin.widths == (32, 32, 32) and thin.source == "tests"
    assert all(np.array_equal(thin.neurons_of(i), want[i]) for i in range(N_LAYER))
    fields = read_header(out).fields
    assert fields[C.KEY_VERSION].contents() == 2
    assert fields[C.KEY_THIN_NEURONS].contents() == [int(j) for w in want for j in w]
    base, got = _tensors(tiny), _tensors(out)
    for i, idx in enumerate(want):
        for role in ("gate", "up", "down"):
            t, b = got[C.thin_tensor_name(role, i)], base[C.base_ffn_name(role, i)]
            assert t.tensor_type == b.tensor_type
            assert tuple(t.shape) == ((32, E) if role == "down" else (E, 32))
        for role in ("gate", "up"):
            assert got[C.thin_tensor_name(role, i)].data.tobytes() == np.asarray(base[C.base_ffn_name(role, i)].data)[idx].tobytes()
    down = lambda f, i: f[f"blk.{i}.{'first_ffn_down' if f is got else 'ffn_down'}.weight"]  # noqa: E731
    assert np.array_equal(down(got, 0).data, down(base, 0).data[:, want[0]])            # F32: exact
    assert np.array_equal(down(got, 2).data, down(base, 2).data[:, want[2]])            # F16: exact
    full = gguf.quants.dequantize(down(base, 1).data, Q.Q8_0)[:, want[1]]                 # Q8_0: ggml's quantizer
    assert down(got, 1).data.tobytes() == quantize(full, Q.Q8_0).tobytes()
    assert np.abs(gguf.quants.dequantize(down(got, 1).data, Q.Q8_0) - full).max() < 0.05
    # every other key and tensor as it was, in order
    assert _kv_raw(out, C.THIN_KEYS + (C.KEY_VERSION,)) == _kv_raw(tiny, (C.KEY_VERSION,))
    kept = [(n, t.tensor_type, t.data.tobytes()) for n, t in got.items() if C.THIN_NAME_MARKER not in n]
    assert kept == [(n, t.tensor_type, t.data.tobytes()) for n, t in base.items()]


def test_a_second_write_replaces_the_thin_part(tiny, scores, tmp_path):
    first = fmt.write_thin_from_scores(tiny, scores, 32, tmp_path / "a.gguf", source="a")
    again = fmt.write_thin_from_scores(first, scores, 64, tmp_path / "b.gguf", layers=[1], source="b")
    direct = fmt.write_thin_from_scores(tiny, scores, 64, tmp_path / "c.gguf", layers=[1], source="b")
    assert ggufs.sha256(again) == ggufs.sha256(direct)
    assert fmt.read_thin(again).layers == (1,) and fmt.read_thin(again).widths == (64,)


def test_without_thin_the_file_stays_version_1(tiny):
    assert read_header(tiny).fields[C.KEY_VERSION].contents() == 1 and fmt.read_thin(tiny) is None


def _values(t) -> np.ndarray:
    """A stored tensor's values as float32 rows."""
    if t.tensor_type in (Q.F32, Q.F16):
        return np.asarray(t.data, dtype=np.float32)
    return gguf.quants.dequantize(t.data, t.tensor_type)


def test_requantized_copies_hold_ggml_quantization_of_the_base_values(tiny, scores, tmp_path):
    every = {i: np.arange(N_FF) for i in range(N_LAYER)}
    out = fmt.write_thin(tiny, every, tmp_path / "q.gguf", source="tests", qtype="Q8_0")
    thin = fmt.read_thin(out)
    assert thin.qtype == "Q8_0" and thin.widths == (N_FF,) * N_LAYER
    assert thin.neurons_of(1).tolist() == list(range(N_FF))
    assert read_header(out).fields[C.KEY_THIN_TYPE].contents() == "Q8_0"
    base, got = _tensors(tiny), _tensors(out)
    for i in range(N_LAYER):
        for role in ("gate", "up", "down"):
            b, t = base[C.base_ffn_name(role, i)], got[C.thin_tensor_name(role, i)]
            assert t.tensor_type == Q.Q8_0 and t.data.tobytes() == quantize(_values(b), Q.Q8_0).tobytes()
            assert np.abs(_values(t) - _values(b)).max() < 0.05  # the same weights, up to Q8_0's rounding
    # a thin subset may be requantized too; the kept neurons' rows and columns, then quantized
    part = fmt.write_thin_from_scores(tiny, scores, 32, tmp_path / "p.gguf", layers=[2], qtype="Q8_0")
    idx = fmt.read_thin(part).neurons_of(2)
    down = _tensors(part)[C.thin_tensor_name("down", 2)]
    assert down.data.tobytes() == quantize(_values(base["blk.2.ffn_down.weight"])[:, idx], Q.Q8_0).tobytes()
    assert _tensors(part)[C.thin_tensor_name("up", 2)].data.tobytes() == quantize(
        _values(base["blk.2.ffn_up.weight"])[idx], Q.Q8_0).tobytes()


@pytest.mark.parametrize("qtype", [Q.Q8_0, Q.IQ4_NL])
def test_quantize_splits_rows_between_threads_without_changing_a_byte(qtype):
    """Rows split between threads (uneven chunks too) give the one-thread bytes; Q8_0's equal gguf-py's
    own numpy quantizer, an implementation independent of ggml's."""
    rows = np.random.default_rng(7).standard_normal((389, 256)).astype(np.float32) * 0.1
    one = quantize(rows, qtype, threads=1)
    assert one.shape == (389, 256 // gguf.GGML_QUANT_SIZES[qtype][0] * gguf.GGML_QUANT_SIZES[qtype][1])
    for threads in (2, 3, 6):
        assert quantize(rows, qtype, threads=threads).tobytes() == one.tobytes()
    if qtype == Q.Q8_0:
        assert one.tobytes() == gguf.quants.quantize(rows, Q.Q8_0).tobytes()


def test_requantizing_refuses_bad_types_and_widths(tiny, scores, tmp_path):
    every = {0: np.arange(N_FF)}
    with pytest.raises(FirstError, match=r"layer 0: width 128 must be in 1\.\.127"):  # a plain copy of every neuron
        fmt.write_thin(tiny, every, tmp_path / "x.gguf")
    with pytest.raises(FirstError, match=r"first\.thin\.type 'Q9_9' is not one of F32, F16, Q8_0"):
        fmt.write_thin(tiny, every, tmp_path / "x.gguf", qtype="Q9_9")
    with pytest.raises(FirstError, match=r"first\.thin\.type Q4_K: its block of 256 does not divide the rows of 64"):
        fmt.write_thin(tiny, every, tmp_path / "x.gguf", qtype="Q4_K")
    with pytest.raises(FirstError, match=r"layer 0: width 16 must be in 1\.\.128 and a multiple of 32 \(the block "
                                         r"of the thin ffn_down's Q4_0\)"):
        fmt.write_thin_from_scores(tiny, scores, 16, tmp_path / "x.gguf", qtype="Q4_0")
    assert not list(tmp_path.iterdir())


def test_write_refuses_bad_requests_before_writing(tiny, scores, tmp_path):
    with pytest.raises(FirstError, match="would overwrite the input"):
        fmt.write_thin_from_scores(tiny, scores, 32, tiny)
    (tmp_path / "exists.gguf").write_bytes(b"x")
    with pytest.raises(FirstError, match="exists; pass --force"):
        fmt.write_thin_from_scores(tiny, scores, 32, tmp_path / "exists.gguf")
    with pytest.raises(FirstError, match=r"layer 1: width 16 must be in 1\.\.127 and a multiple of 32 \(the block "
                                         r"of the thin ffn_down's Q8_0\)"):
        fmt.write_thin_from_scores(tiny, scores, 16, tmp_path / "x.gguf")
    with pytest.raises(FirstError, match=r"layer 0: width 128 must be in 1\.\.127"):
        fmt.write_thin_from_scores(tiny, scores, 128, tmp_path / "x.gguf", layers=[0])
    with pytest.raises(FirstError, match=r"scores of shape \[3, 64\] do not fit"):
        fmt.write_thin_from_scores(tiny, scores[:, :64], 32, tmp_path / "x.gguf")
    with pytest.raises(FirstError, match=r"neurons must be ascending and distinct"):
        fmt.write_thin(tiny, {0: [3, 1] * 16}, tmp_path / "x.gguf")
    with pytest.raises(FormatError, match=r"plain\.gguf: not a FiRST-GGUF"):
        fmt.write_thin_from_scores(tiny.parent / "plain.gguf", scores, 32, tmp_path / "x.gguf")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["exists.gguf"]


def test_an_architecture_without_a_gated_ffn_is_refused(tmp_path):
    path = ggufs.write_gguf(tmp_path / "m.gguf", _base_kv() | ggufs.first_kv(),
                            ggufs.base_tensors() | ggufs.router_tensors(ggufs.random_router_arrays()))
    with pytest.raises(FormatError, match=r"layer 0: no blk\.0\.ffn_gate\.weight; thinned FFNs need a gated FFN"):
        fmt.write_thin(path, {0: list(range(32))}, tmp_path / "x.gguf")


# --- the rules ---------------------------------------------------------------------------------

THIN_LAYERS, WIDTH = [0, 2], 16
NEURONS = {0: list(range(0, 128, 8)), 2: list(range(5, 128, 8))}


def _thin_kv_and_tensors() -> tuple[ggufs.KV, ggufs.Tensors]:
    """A valid thin file's keys and tensors (layers 0 and 2, width 16), built here with numpy."""
    ffn = _ffn_tensors()
    kv = _base_kv() | ggufs.first_kv()
    kv[C.KEY_VERSION] = (2, T.UINT32, None)
    values = {C.KEY_THIN_LAYERS: THIN_LAYERS, C.KEY_THIN_WIDTHS: [WIDTH] * 2,
              C.KEY_THIN_NEURONS: NEURONS[0] + NEURONS[2], C.KEY_THIN_SOURCE: "tests"}
    kv |= {k: (v, *THIN_TYPES[k]) for k, v in values.items()}
    tensors = ggufs.base_tensors() | ffn | ggufs.router_tensors(ggufs.random_router_arrays())
    for i in THIN_LAYERS:
        idx = NEURONS[i]
        gate, up, down = (ffn[f"blk.{i}.ffn_{r}.weight"][0] for r in ("gate", "up", "down"))
        tensors[C.thin_tensor_name("gate", i)] = (np.ascontiguousarray(gate[idx]), Q.Q8_0)
        tensors[C.thin_tensor_name("up", i)] = (np.ascontiguousarray(up[idx]), None)
        tensors[C.thin_tensor_name("down", i)] = (np.ascontiguousarray(down[:, idx]), None)
    return kv, tensors


def _set(key, value, vtype=None, sub=None):
    def mutate(kv, tensors):
        kv[key] = (value, *(THIN_TYPES.get(key, (T.UINT32, None)) if vtype is None else (vtype, sub)))
    return mutate


def _drop(name):
    return lambda kv, tensors: (kv.pop(name, None), tensors.pop(name, None))


def _tensor(name, fn, raw=None):
    return lambda kv, tensors: tensors.__setitem__(name, (fn(tensors[name][0]), raw or tensors[name][1]))


def _drop_keys(kv, tensors):
    for key in C.THIN_KEYS:
        kv.pop(key, None)


BAD_THIN = {  # mutation -> message after "<file>: "
    "version 1": (_set(C.KEY_VERSION, 1), r"first\.thin\.layers in a first\.version 1 file \(thinned FFNs need "
                                          r"first\.version 2\)$"),
    "missing tensor": (_drop(C.thin_tensor_name("down", 2)), r"layer 2: missing blk\.2\.first_ffn_down\.weight$"),
    "extra tensor": (lambda kv, t: t.__setitem__(C.thin_tensor_name("gate", 1), t[C.thin_tensor_name("gate", 0)]),
                     r"layer 1: extra thinned FFN tensor blk\.1\.first_ffn_gate\.weight; the layer is not in "
                     r"first\.thin\.layers$"),
    "unknown tensor": (lambda kv, t: t.__setitem__("blk.0.first_ffn_norm.weight", (np.ones(E, np.float32), None)),
                       r"unknown thinned FFN tensor blk\.0\.first_ffn_norm\.weight$"),
    "tensors without keys": (_drop_keys, r"thinned FFN tensor blk\.0\.first_ffn_gate\.weight without "
                                         r"first\.thin\.layers$"),
    "missing neurons key": (_drop(C.KEY_THIN_NEURONS), r"missing key first\.thin\.neurons \(first\.thin\.layers, "
                                                       r"first\.thin\.widths, first\.thin\.neurons go together\)$"),
    "wrong shape": (_tensor(C.thin_tensor_name("down", 0), lambda a: np.ascontiguousarray(a.T)),
                    rf"layer 0: blk\.0\.first_ffn_down\.weight has shape \({E}, {WIDTH}\), expected \({WIDTH}, {E}\)$"),
    "wrong type": (_tensor(C.thin_tensor_name("up", 2), lambda a: a.astype(np.float32)),
                   r"layer 2: blk\.2\.first_ffn_up\.weight has type F32, expected F16 \(the type of "
                   r"blk\.2\.ffn_up\.weight\)$"),
    "gate rows differ": (_tensor(C.thin_tensor_name("gate", 0), lambda a: np.roll(a, 1, axis=0)),
                         r"layer 0: blk\.0\.first_ffn_gate\.weight is not the rows first\.thin\.neurons of "
                         r"blk\.0\.ffn_gate\.weight$"),
    "up rows differ": (_tensor(C.thin_tensor_name("up", 2), lambda a: a + np.float16(1)),
                       r"layer 2: blk\.2\.first_ffn_up\.weight is not the rows"),
    "width not a multiple of the block": (
        lambda kv, t: kv.update({C.KEY_THIN_LAYERS: ([0, 1, 2], T.ARRAY, T.INT32),
                                 C.KEY_THIN_WIDTHS: ([16] * 3, T.ARRAY, T.UINT32),
                                 C.KEY_THIN_NEURONS: (NEURONS[0] + NEURONS[0] + NEURONS[2], T.ARRAY, T.INT32)}),
        r"layer 1: width 16 must be in 1\.\.127 and a multiple of 32 \(the block of the thin ffn_down's Q8_0\)$"),
    "neurons not ascending": (_set(C.KEY_THIN_NEURONS, NEURONS[0][::-1] + NEURONS[2]),
                              r"layer 0: first\.thin\.neurons must be ascending and distinct, in 0\.\.127$"),
    "neuron out of range": (_set(C.KEY_THIN_NEURONS, NEURONS[0] + NEURONS[2][:-1] + [128]),
                            r"layer 2: first\.thin\.neurons must be ascending and distinct, in 0\.\.127$"),
    "widths and layers differ in length": (_set(C.KEY_THIN_WIDTHS, [WIDTH]),
                                           r"first\.thin\.widths has 1 values for 2 first\.thin\.layers$"),
    "too few neurons": (_set(C.KEY_THIN_NEURONS, NEURONS[0]), r"first\.thin\.neurons has 16 values; the widths "
                                                              r"add up to 32$"),
    "layers descending": (_set(C.KEY_THIN_LAYERS, [2, 0]), r"first\.thin\.layers \[2, 0\] must be ascending and "
                                                          r"distinct$"),
    "layer out of range": (_set(C.KEY_THIN_LAYERS, [0, 3]), r"first\.thin\.layers has layer 3, outside 0\.\.2$"),
    "width n_ff": (lambda kv, t: kv.update({C.KEY_THIN_WIDTHS: ([WIDTH, N_FF], T.ARRAY, T.UINT32),
                                            C.KEY_THIN_NEURONS: (NEURONS[0] + list(range(N_FF)), T.ARRAY, T.INT32)}),
                   r"layer 2: width 128 must be in 1\.\.127 and a multiple of 1 "),
    "type unknown": (_set(C.KEY_THIN_TYPE, "Q4_X"), r"first\.thin\.type 'Q4_X' is not one of F32, F16, "),
    "type not the tensors'": (_set(C.KEY_THIN_TYPE, "F32"),
                              r"layer 0: blk\.0\.first_ffn_gate\.weight has type Q8_0, expected F32 "
                              r"\(first\.thin\.type\)$"),
    "width not a multiple of the type's block": (_set(C.KEY_THIN_TYPE, "Q8_0"),
                                                 r"layer 0: width 16 must be in 1\.\.128 and a multiple of 32 "
                                                 r"\(the block of the thin ffn_down's Q8_0\)$"),
    "type a u32": (_set(C.KEY_THIN_TYPE, 8, T.UINT32), r"first\.thin\.type has type UINT32, expected STRING$"),
    "widths i32": (_set(C.KEY_THIN_WIDTHS, [WIDTH] * 2, T.ARRAY, T.INT32),
                   r"first\.thin\.widths has type ARRAY\[INT32\], expected ARRAY\[UINT32\]$"),
    "unknown thin key": (_set("first.thin.width", 16, T.UINT32), r"unknown key first\.thin\.width "),
    "no feed_forward_length": (_drop(f"{ggufs.ARCH}.feed_forward_length"),
                               r"no key qwen2\.feed_forward_length; cannot size thinned FFNs$"),
    "base gate missing": (_drop("blk.2.ffn_gate.weight"), r"layer 2: no blk\.2\.ffn_gate\.weight; thinned FFNs need"),
}


def test_the_hand_built_thin_file_is_valid(tmp_path):
    path = ggufs.write_gguf(tmp_path / "m.gguf", *_thin_kv_and_tensors())
    thin = fmt.read_thin(path)
    assert thin.layers == (0, 2) and thin.widths == (16, 16) and thin.source == "tests"
    assert thin.neurons == (tuple(NEURONS[0]), tuple(NEURONS[2])) and thin.mask(3) == [True, False, True]
    assert fmt.read_first_parts(path).thin == thin and thin.width(2) == 16
    with pytest.raises(KeyError):
        thin.width(1)


def test_a_hand_built_requantized_file_is_valid_without_the_row_comparison(tmp_path):
    """With first.thin.type the rows are the type's own values, not the base's bytes, and the
    width may be n_ff."""
    kv, tensors = _thin_kv_and_tensors()
    ffn = _ffn_tensors()
    kv |= {C.KEY_THIN_TYPE: ("F32", T.STRING, None), C.KEY_THIN_WIDTHS: ([WIDTH, N_FF], T.ARRAY, T.UINT32),
           C.KEY_THIN_NEURONS: (NEURONS[0] + list(range(N_FF)), T.ARRAY, T.INT32)}
    for i, idx in ((0, NEURONS[0]), (2, list(range(N_FF)))):
        for role in ("gate", "up", "down"):
            values, raw = ffn[f"blk.{i}.ffn_{role}.weight"]
            values = gguf.quants.dequantize(values, raw) if raw is not None else np.asarray(values, np.float32)
            cut = values[:, idx] if role == "down" else values[idx]
            tensors[C.thin_tensor_name(role, i)] = (np.ascontiguousarray(cut + np.float32(1e-3)), None)
    thin = fmt.read_thin(ggufs.write_gguf(tmp_path / "m.gguf", kv, tensors))
    assert thin.qtype == "F32" and thin.widths == (WIDTH, N_FF)


@pytest.mark.parametrize("case", list(BAD_THIN))
def test_validation_rejects(tmp_path, case):
    path = ggufs.assert_refused(tmp_path, *_thin_kv_and_tensors(), *BAD_THIN[case])
    assert fmt.inspect_gguf(path)["first"]["valid"].startswith(str(path))


def test_a_version_2_file_without_thin_is_valid(tmp_path):
    kv = ggufs.base_kv() | ggufs.first_kv()
    kv[C.KEY_VERSION] = (2, T.UINT32, None)
    path = ggufs.write_gguf(tmp_path / "m.gguf", kv, ggufs.base_tensors() | ggufs.router_tensors(
        ggufs.random_router_arrays()))
    assert fmt.read_first_parts(path).thin is None


# --- attach, stamp, prune, inspect -------------------------------------------------------------

THIN_POINTS = {"default": "lean", "points": {"lean": {"thin": [0, 2]}, "fast": {"threshold": 0.5, "thin": [2]},
                                            "mid": {"skip": [1], "thin": [0, 2]}}}


@pytest.fixture(scope="module")
def thin_file(tiny, scores, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("thin-file") / "t.gguf"
    return fmt.write_thin_from_scores(tiny, scores, 32, out, layers=[0, 2], source="tests")


def _thin_tensor_bytes(path: Path) -> list:
    return [(n, t.tensor_type, t.data.tobytes()) for n, t in _tensors(path).items() if C.THIN_NAME_MARKER in n]


def test_stamp_points_keeps_the_thin_part(thin_file, tmp_path):
    stamped = fmt.stamp_points(thin_file, THIN_POINTS, tmp_path / "s.gguf")
    parts = fmt.read_first_parts(stamped)
    assert parts.points.as_json() == THIN_POINTS and parts.thin == fmt.read_thin(thin_file)
    assert parts.points.get("mid").thin_mask(3) == [True, False, True]
    assert _thin_tensor_bytes(stamped) == _thin_tensor_bytes(thin_file)
    cleared = fmt.stamp_points(stamped, None, tmp_path / "c.gguf")
    assert ggufs.sha256(cleared) == ggufs.sha256(thin_file)
    with pytest.raises(FormatError, match=r"^points: point 'x=thin:1': thin layers \[1\] carry no thinned FFN "
                                          r"\(first\.thin\.layers \[0, 2\]\)$"):
        fmt.stamp_points(thin_file, {"points": {"x": {"thin": [1]}}}, tmp_path / "x.gguf")


def test_reattaching_routers_keeps_the_thin_part(thin_file, tiny, tmp_path):
    routers = fmt.make_identity_routers(N_LAYER, E, hidden_size=16, seed=3)
    out = fmt.attach_routers(thin_file, routers, tmp_path / "a.gguf", points=THIN_POINTS)
    parts = fmt.read_first_parts(out)
    assert parts.routers.hidden_size == 16 and parts.thin == fmt.read_thin(thin_file)
    assert parts.points.as_json() == THIN_POINTS
    assert read_header(out).fields[C.KEY_VERSION].contents() == 2
    assert _thin_tensor_bytes(out) == _thin_tensor_bytes(thin_file)
    with pytest.raises(FormatError, match=r"thin layers \[0\] carry no thinned FFN \(first\.thin\.layers absent\)"):
        fmt.attach_routers(tiny, routers, tmp_path / "b.gguf", points={"points": {"x": {"thin": [0]}}})


def test_prune_drops_the_thin_part(thin_file, tmp_path):
    out = fmt.prune_gguf(thin_file, [1], tmp_path / "p.gguf")
    assert not any(C.THIN_NAME_MARKER in t.name or t.name.startswith("first.") for t in read_header(out).tensors)
    assert not fmt.is_first_gguf(out)


def test_inspect_shows_the_thin_part(thin_file, tiny):
    info = json.loads(json.dumps(fmt.inspect_gguf(thin_file)))
    thin = info["first"]["thin"]
    assert thin["layers"] == [0, 2] and thin["widths"] == [32, 32] and thin["source"] == "tests"
    sizes = {t.name: t.n_bytes for t in read_header(thin_file).tensors}
    assert thin["thin_bytes"] == sum(v for n, v in sizes.items() if C.THIN_NAME_MARKER in n)
    assert thin["full_bytes"] == sum(sizes[f"blk.{i}.ffn_{r}.weight"] for i in (0, 2) for r in ("gate", "up", "down"))
    text = fmt.format_inspect(info)
    assert "thin FFNs     layers [0, 2], width 32" in text and "MB full FFN (25.0%)" in text
    assert fmt.inspect_gguf(tiny)["first"]["thin"] is None and "thin FFNs" not in fmt.format_inspect(
        fmt.inspect_gguf(tiny))


# --- the command -------------------------------------------------------------------------------

def _run(*args) -> tuple[int, str, str]:
    res = CliRunner().invoke(cli, [str(a) for a in args])
    return res.exit_code, res.stdout, res.stderr


def test_cli_thin_from_a_scores_file(tiny, scores, tmp_path):
    from first_gguf.train.thin import save_scores

    save_scores(tmp_path / "s.npz", scores, "hand-made scores")
    code, out, err = _run("thin", tiny, "-o", tmp_path / "t.gguf", "--width", 64, "--layers", "1-2",
                          "--scores", tmp_path / "s.npz")
    assert code == 0, err
    assert Path(out.strip()) == tmp_path / "t.gguf" and "calibration" not in err
    thin = fmt.read_thin(tmp_path / "t.gguf")
    assert thin.layers == (1, 2) and thin.widths == (64, 64)
    assert thin.source == "hand-made scores; top 64 per layer"
    assert np.array_equal(thin.neurons_of(1), np.sort(np.argsort(-scores[1])[:64]))
    code, out, err = _run("thin", tiny, "-o", tmp_path / "t.gguf", "--width", 64, "--scores", tmp_path / "s.npz")
    assert code == 1 and "exists; pass --force" in err
    code, out, err = _run("thin", tiny, "-o", tmp_path / "u.gguf", "--width", 48, "--scores", tmp_path / "s.npz")
    assert code == 1 and "layer 1: width 48 must be in 1..127 and a multiple of 32" in err
    code, out, err = _run("thin", "--help")
    assert code == 0 and "--width" in out


def test_cli_thin_every_neuron_requantized_needs_no_scores(tiny, tmp_path):
    code, out, err = _run("thin", tiny, "-o", tmp_path / "q.gguf", "--width", "all", "--type", "Q8_0")
    assert code == 0, err
    thin = fmt.read_thin(Path(out.strip()))
    assert thin.qtype == "Q8_0" and thin.widths == (N_FF,) * N_LAYER and "calibration" not in err
    assert thin.source == "every neuron, requantized to Q8_0"
    code, _, err = _run("thin", tiny, "-o", tmp_path / "r.gguf", "--width", "all")
    assert code == 1 and "every neuron (width 'all') needs a type to requantize to (--type)" in err
    code, _, err = _run("thin", tiny, "-o", tmp_path / "r.gguf", "--width", "most", "--type", "Q8_0")
    assert code == 2 and "'most' is neither a neuron count nor 'all'" in err
    assert not (tmp_path / "r.gguf").exists()


# --- calibration (torch) -----------------------------------------------------------------------

@pytest.fixture(scope="module")
def tiny_hf_first(tmp_path_factory):
    """(HF model, FiRST-GGUF f32) of a tiny seeded qwen2 with the zoo tokenizer."""
    pytest.importorskip("torch")
    import torch

    import tiny_ckpt
    from first_gguf.convert import convert_hf

    torch.set_num_threads(1)
    work = tmp_path_factory.mktemp("thin-hf")
    model, hf_dir = tiny_ckpt.checkpoint_dir("qwen2", work)
    n_layer, n_embd = model.config.num_hidden_layers, model.config.hidden_size
    path = convert_hf(hf_dir, work / "tiny.first.gguf", routers=fmt.make_identity_routers(n_layer, n_embd),
                      outtype="f32")
    return model, path


def _by_hand(model, path: Path, examples: int) -> np.ndarray:
    """contrib computed from each MLP's input: z = silu(gate x) * up x, per example normalised."""
    import torch

    from first_gguf.train.base import load_base
    from first_gguf.train.data import Limits, build_examples
    from first_gguf.train.thin import MAX_PROMPT, MAX_RESPONSE

    _, tokenizer = load_base(str(path))
    data = build_examples(tokenizer, Limits(MAX_PROMPT, MAX_RESPONSE, 256), tasks=("code", "instruct", "prose"),
                          n_examples=examples, seed=0, split="train")
    mlps = [layer.mlp for layer in model.model.layers]
    inputs: dict[int, torch.Tensor] = {}
    hooks = [m.register_forward_pre_hook(lambda mod, args, i=i: inputs.__setitem__(i, args[0][0]))
             for i, m in enumerate(mlps)]
    total = np.zeros((len(mlps), mlps[0].down_proj.weight.shape[1]))
    try:
        with torch.no_grad():
            for ex in data:
                model(torch.tensor([list(ex.prompt) + list(ex.response)]))
                for i, m in enumerate(mlps):
                    x = inputs[i]
                    z = torch.nn.functional.silu(x @ m.gate_proj.weight.T) * (x @ m.up_proj.weight.T)
                    c = (z.double() ** 2).mean(0) * (m.down_proj.weight.double() ** 2).sum(0)
                    total[i] += (c / c.sum()).numpy()
    finally:
        for h in hooks:
            h.remove()
    return total


def test_calibration_matches_the_statistic_by_hand(tiny_hf_first):
    from first_gguf.train.thin import calibrate

    model, path = tiny_hf_first
    got, source = calibrate(path, examples=3, threads=1)
    want = _by_hand(model, path, 3)
    assert got.shape == (4, 128) and np.allclose(got.sum(1), 3.0)
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-7)
    assert source.startswith("contrib: ") and "3 train examples of code,instruct,prose" in source


def test_cli_thin_calibrates_once_per_scores_file(tiny_hf_first, tmp_path):
    _, path = tiny_hf_first
    args = ("--examples", 3, "--threads", 1, "--scores", tmp_path / "s.npz")
    code, out, err = _run("thin", path, "-o", tmp_path / "a.gguf", "--width", 96, *args)
    assert code == 0 and "calibration: 3/3 examples" in err, err
    code, out, err = _run("thin", path, "-o", tmp_path / "b.gguf", "--width", 64, "--layers", "1,2", *args)
    assert code == 0 and "calibration" not in err, err
    a, b = fmt.read_thin(tmp_path / "a.gguf"), fmt.read_thin(tmp_path / "b.gguf")
    assert a.layers == (0, 1, 2, 3) and a.widths == (96,) * 4 and b.layers == (1, 2)
    assert set(b.neurons[0]) <= set(a.neurons[1])  # the best 64 are among the best 96
    assert a.source.endswith("top 96 per layer") and b.source.endswith("top 64 per layer")

"""FiRST-GGUF files: attach round trips, every validation rule, router files, inspect.

Real files throughout, written with gguf.GGUFWriter by tests/ggufs.py (bad files are
written as such, never patched by hand, except truncated / wrong-magic copies). The slow
test repeats the round trip on the default zoo model.
"""

from __future__ import annotations

import dataclasses
import json
import re
import subprocess
import sys
from pathlib import Path

import gguf
import numpy as np
import pytest
import safetensors
from gguf import GGMLQuantizationType as Q
from gguf import GGUFValueType as T
from safetensors.numpy import save_file

import ggufs
from first_gguf import constants as C
from first_gguf import format as gr
from first_gguf.errors import FirstError, FormatError
from first_gguf.paths import atomic_output

W1_0 = C.router_tensor_name(C.ROUTER_IN_WEIGHT, 0)


def _routers(seed: int = 1, n_layer: int = ggufs.N_LAYER, n_embd: int = ggufs.N_EMBD) -> gr.RouterSet:
    """Valid routers with every tensor random, so a swapped or zeroed tensor shows."""
    r = gr.make_identity_routers(n_layer, n_embd, hidden_size=ggufs.HIDDEN, train_source=f"random seed {seed}")
    r.tensors = ggufs.random_router_arrays(n_layer, n_embd, ggufs.HIDDEN, seed)
    r.threshold, r.norm_eps = 0.375, 1e-5
    return r


def _f32(x: float) -> float:
    return float(np.float32(x))


def _assert_base_copied(base: Path, out: Path) -> None:
    """Every tensor of base in out, same GGML type, ne and bytes; every KV same type and bytes."""
    b, o = gguf.GGUFReader(base), gguf.GGUFReader(out)
    out_tensors = {t.name: t for t in o.tensors}
    for t in b.tensors:
        got = out_tensors[t.name]
        assert (got.tensor_type, list(got.shape)) == (t.tensor_type, list(t.shape)), t.name
        assert got.data.tobytes() == t.data.tobytes(), t.name
    for name, field in b.fields.items():
        if name.startswith("GGUF."):
            continue
        assert o.fields[name].types == field.types, name
        assert ggufs.kv_raw(o.fields[name]) == ggufs.kv_raw(field), name
    assert o.alignment == b.alignment


# --- the untrained recipe ------------------------------------------------------------------

def test_identity_routers_follow_the_documented_recipe():
    r = gr.make_identity_routers(4, 32, hidden_size=16, seed=7, keep_prob=0.8)
    rng = np.random.default_rng(7)
    for bid in range(4):
        w1 = (rng.standard_normal((16, 32)) * 32 ** -0.5).astype(np.float32)
        assert np.array_equal(r.tensors[bid][C.ROUTER_IN_WEIGHT], w1)
        assert np.array_equal(r.tensors[bid][C.ROUTER_NORM], np.ones(32, np.float32))
        assert not r.tensors[bid][C.ROUTER_IN_BIAS].any() and not r.tensors[bid][C.ROUTER_OUT_WEIGHT].any()
        b2 = r.tensors[bid][C.ROUTER_OUT_BIAS]
        assert b2.shape == (1,) and abs(1 / (1 + np.exp(-float(b2[0]))) - 0.8) < 1e-6
        for role, arr in r.tensors[bid].items():
            assert arr.dtype == np.float32 and arr.shape == C.router_shape(role, 32, 16)
    assert (r.threshold, r.protected_layers, r.aggregation, r.prefill) == (0.5, [0, 3], "mean", "full")
    r.check()


def test_identity_routers_are_deterministic_per_seed():
    a, b, c = (gr.make_identity_routers(3, 64, seed=s) for s in (0, 0, 1))
    assert a == b
    assert all(a.tensors[i][C.ROUTER_IN_WEIGHT].tobytes() == b.tensors[i][C.ROUTER_IN_WEIGHT].tobytes()
               for i in range(3))
    assert not np.array_equal(a.tensors[0][C.ROUTER_IN_WEIGHT], c.tensors[0][C.ROUTER_IN_WEIGHT])
    assert a != c


def test_metadata_names_every_first_key():
    meta = _routers().metadata()
    assert set(meta) == set(C.REQUIRED_KEYS + C.OPTIONAL_KEYS)
    assert meta[C.KEY_VERSION] == C.FIRST_VERSION_PLAIN and meta[C.KEY_ROUTER_HIDDEN_SIZE] == ggufs.HIDDEN
    assert meta[C.KEY_ROUTER_THRESHOLD] == 0.375 and meta[C.KEY_PROTECTED_LAYERS] == [0, 2]


# --- attach ------------------------------------------------------------------------------

@pytest.mark.parametrize("w1_dtype", ["f32", "f16"])
def test_attach_round_trip(tiny_base, tmp_path, w1_dtype):
    routers = _routers()
    router_file = gr.save_router_file(routers, tmp_path / "routers.safetensors")
    hashes = ggufs.sha256(tiny_base), ggufs.sha256(router_file)
    out = gr.attach_routers(tiny_base, gr.load_router_file(router_file), tmp_path / "m.gguf", w1_dtype=w1_dtype)

    assert (ggufs.sha256(tiny_base), ggufs.sha256(router_file)) == hashes
    _assert_base_copied(tiny_base, out)
    reader = gguf.GGUFReader(out)
    assert len(reader.tensors) == len(gguf.GGUFReader(tiny_base).tensors) + 5 * ggufs.N_LAYER
    types = {t.name: t.tensor_type for t in reader.tensors}
    back = gr.read_routers(out)
    for bid in range(ggufs.N_LAYER):
        for role, want in routers.tensors[bid].items():
            name = C.router_tensor_name(role, bid)
            f16 = role == C.ROUTER_IN_WEIGHT and w1_dtype == "f16"
            assert types[name] == (Q.F16 if f16 else Q.F32), name
            expected = want.astype(np.float16).astype(np.float32) if f16 else want
            assert np.array_equal(back.tensors[bid][role], expected), name
    assert back.norm_eps == _f32(1e-5) and back.threshold == 0.375
    assert (back.protected_layers, back.aggregation, back.prefill) == ([0, 2], "mean", "full")
    assert back.train_source == "random seed 1" and back.hidden_size == ggufs.HIDDEN
    fields = reader.fields
    for key, (vtype, sub) in ggufs.FIRST_TYPES.items():
        assert fields[key].types == [vtype] + ([sub] if sub else []), key


def test_attach_keeps_custom_alignment(tmp_path):
    base = ggufs.write_base(tmp_path / "base.gguf", alignment=64)
    out = gr.attach_routers(base, _routers(), tmp_path / "m.gguf")
    reader = gguf.GGUFReader(out)
    assert reader.alignment == 64 and all(t.data_offset % 64 == 0 for t in reader.tensors)
    _assert_base_copied(base, out)


def test_attach_replaces_existing_routers(tiny_base, tmp_path, caplog):
    first = gr.attach_routers(tiny_base, _routers(seed=1), tmp_path / "a.gguf")
    second = _routers(seed=2)
    second.protected_layers, second.train_source = [], "second"
    out = gr.attach_routers(first, second, tmp_path / "b.gguf")

    assert "replacing its 15 router tensors" in caplog.text
    assert gr.read_routers(out) == dataclasses.replace(second, norm_eps=_f32(1e-5))
    names = [t.name for t in gguf.GGUFReader(out).tensors]
    assert len(names) == len(set(names)) == len(gguf.GGUFReader(first).tensors)
    _assert_base_copied(tiny_base, out)


def test_attach_refuses_routers_for_another_model_before_writing(tmp_path):
    base = ggufs.write_base(tmp_path / "base.gguf", n_layer=4)
    with pytest.raises(FormatError, match=r"^routers: routers are for 3 layers but .*base.gguf has 4$"):
        gr.attach_routers(base, _routers(n_layer=3), tmp_path / "m.gguf")
    with pytest.raises(FormatError, match="routers are for n_embd 32 but .* has 64"):
        gr.attach_routers(base, _routers(n_layer=4, n_embd=32), tmp_path / "m.gguf")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["base.gguf"]


def test_attach_names_the_router_file_in_a_mismatch(tmp_path):
    base = ggufs.write_base(tmp_path / "base.gguf", n_layer=4)
    router_file = gr.save_router_file(_routers(n_layer=3), tmp_path / "r.safetensors")
    with pytest.raises(FormatError, match=r"r\.safetensors: routers are for 3 layers but"):
        gr.attach_routers(base, gr.load_router_file(router_file), tmp_path / "m.gguf")


def test_attach_refuses_a_shard_of_a_split_gguf(tmp_path):
    kv = ggufs.base_kv() | {"split.count": (2, T.UINT16, None), "split.no": (0, T.UINT16, None)}
    base = ggufs.write_gguf(tmp_path / "base-00001-of-00002.gguf", kv, ggufs.base_tensors())
    with pytest.raises(FormatError, match="one shard of a split GGUF"):
        gr.attach_routers(base, _routers(), tmp_path / "m.gguf")
    assert [p.name for p in tmp_path.iterdir()] == [base.name]


def test_attach_refuses_an_existing_output_unless_forced(tiny_base, tmp_path):
    out = tmp_path / "m.gguf"
    out.write_bytes(b"precious")
    with pytest.raises(FirstError, match="m.gguf exists; pass --force"):
        gr.attach_routers(tiny_base, _routers(), out)
    assert out.read_bytes() == b"precious"
    gr.attach_routers(tiny_base, _routers(), out, force=True)
    assert gr.read_routers(out).train_source == "random seed 1"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.gguf"]


def test_attach_never_overwrites_its_base(tmp_path):
    base = ggufs.write_base(tmp_path / "base.gguf")
    before = ggufs.sha256(base)
    (tmp_path / "link.gguf").symlink_to(base)
    for out in (base, tmp_path / "link.gguf", tmp_path / "sub" / ".." / "base.gguf"):
        with pytest.raises(FirstError, match="would overwrite the input"):
            gr.attach_routers(base, _routers(), out, force=True)
    assert ggufs.sha256(base) == before


def test_router_file_with_f16_w1(tiny_base, tmp_path):
    """W1 stored as F16 loads as float32 (the rounded values) and attaches to the same F16 GGUF."""

    routers = _routers()
    half = gr.save_router_file(routers, tmp_path / "half.safetensors", w1_dtype="f16")
    full = gr.save_router_file(routers, tmp_path / "full.safetensors")
    assert (gr.stored_w1_dtype(half), gr.stored_w1_dtype(full)) == ("f16", "f32")
    assert half.stat().st_size < full.stat().st_size
    back = gr.load_router_file(half)
    for bid in range(ggufs.N_LAYER):
        for role, want in routers.tensors[bid].items():
            rounded = want.astype(np.float16).astype(np.float32) if role == C.ROUTER_IN_WEIGHT else want
            assert back.tensors[bid][role].dtype == np.float32 and np.array_equal(back.tensors[bid][role], rounded)
    a = gr.attach_routers(tiny_base, back, tmp_path / "a.gguf", w1_dtype="f16")
    b = gr.attach_routers(tiny_base, gr.load_router_file(full), tmp_path / "b.gguf", w1_dtype="f16")
    assert a.read_bytes() == b.read_bytes()
    huge = _routers()
    huge.tensors[2][C.ROUTER_IN_WEIGHT][0, 0] = 1e6
    with pytest.raises(FormatError, match=r"layer 2: blk\.2\.first_router_in\.weight overflows F16"):
        gr.save_router_file(huge, tmp_path / "huge.safetensors", w1_dtype="f16")
    assert not (tmp_path / "huge.safetensors").exists()


def test_attach_rejects_invalid_routers_and_dtype(tiny_base, tmp_path):
    bad = _routers()
    bad.tensors[1][C.ROUTER_OUT_BIAS] = np.array([np.nan], np.float32)
    with pytest.raises(FormatError, match=r"^routers: layer 1: blk\.1\.first_router_out\.bias has non-finite"):
        gr.attach_routers(tiny_base, bad, tmp_path / "m.gguf")
    huge = _routers()
    huge.tensors[2][C.ROUTER_IN_WEIGHT][0, 0] = 1e6
    with pytest.raises(FormatError, match=r"layer 2: blk\.2\.first_router_in\.weight overflows F16"):
        gr.attach_routers(tiny_base, huge, tmp_path / "m.gguf", w1_dtype="f16")
    with pytest.raises(FirstError, match="w1_dtype"):
        gr.attach_routers(tiny_base, _routers(), tmp_path / "m.gguf", w1_dtype="q8_0")
    assert not list(tmp_path.iterdir())


def test_atomic_output_leaves_nothing_on_interrupt(tmp_path):
    out = tmp_path / "m.gguf"
    out.write_bytes(b"old")
    with pytest.raises(KeyboardInterrupt):
        with atomic_output(out) as tmp:
            tmp.write_bytes(b"half a file")
            raise KeyboardInterrupt
    assert out.read_bytes() == b"old" and sorted(tmp_path.iterdir()) == [out]
    with atomic_output(out) as tmp:
        tmp.write_bytes(b"new")
    assert out.read_bytes() == b"new" and sorted(tmp_path.iterdir()) == [out]


# --- unreadable files --------------------------------------------------------------------

def _truncated(src: Path, dst: Path) -> Path:
    dst.write_bytes(src.read_bytes()[: src.stat().st_size * 2 // 3])
    return dst


def _wrong_magic(src: Path, dst: Path) -> Path:
    dst.write_bytes(b"GGML" + src.read_bytes()[4:])
    return dst


def _empty(src: Path, dst: Path) -> Path:
    dst.write_bytes(b"")
    return dst


@pytest.mark.parametrize("spoil", [_truncated, _wrong_magic, _empty])
def test_unreadable_gguf_is_one_clear_error(tiny_base, tmp_path, spoil):
    bad = spoil(tiny_base, tmp_path / "bad.gguf")
    pattern = r"^.*bad\.gguf: not a readable GGUF file \("
    for call in (gr.validate_first_gguf, gr.read_routers, gr.inspect_gguf):
        with pytest.raises(FormatError, match=pattern):
            call(bad)
    with pytest.raises(FormatError, match=pattern):
        gr.attach_routers(bad, _routers(), tmp_path / "m.gguf")
    assert not (tmp_path / "m.gguf").exists()


def test_missing_file_is_one_clear_error(tmp_path):
    with pytest.raises(FormatError, match="nope.gguf: no such file"):
        gr.inspect_gguf(tmp_path / "nope.gguf")


# --- validation: every rule of docs/FORMAT.md section 2 -------------------------------------------

def _drop_layer(kv, tensors):
    for role in C.ROUTER_TENSORS:
        del tensors[C.router_tensor_name(role, 1)]


def _add_layer(kv, tensors):
    tensors.update(ggufs.router_tensors({3: ggufs.random_router_arrays(4)[3]}))


def _set_kv(key, value, vtype=None, sub=None):
    def mutate(kv, tensors):
        t, s = ggufs.FIRST_TYPES.get(key, (None, None))
        kv[key] = (value, vtype or t, sub if vtype else s)
    return mutate


def _del_kv(key):
    return lambda kv, tensors: kv.pop(key)


def _set_tensor(role, bid, fn, raw=None):
    def mutate(kv, tensors):
        name = C.router_tensor_name(role, bid)
        tensors[name] = (fn(tensors[name][0].copy()), raw)
    return mutate


def _poke(value, index=0):
    def fn(arr):
        arr.flat[index] = value
        return arr
    return fn


def _all_hidden(hidden):
    def mutate(kv, tensors):
        tensors.update(ggufs.router_tensors(ggufs.random_router_arrays(hidden=hidden)))
    return mutate


def _both(*mutations):
    def mutate(kv, tensors):
        for m in mutations:
            m(kv, tensors)
    return mutate


def _add_tensor(name, arr):
    return lambda kv, tensors: tensors.update({name: (arr, None)})


H, E = ggufs.HIDDEN, ggufs.N_EMBD
W1, NORM, B1, W2, B2 = (C.ROUTER_IN_WEIGHT, C.ROUTER_NORM, C.ROUTER_IN_BIAS, C.ROUTER_OUT_WEIGHT,
                        C.ROUTER_OUT_BIAS)
# case -> (mutation of a valid file's kv and tensors, the message after "<file>: ")
BAD_FILES = {
    "missing layer": (_drop_layer, r"layer 1: missing blk\.1\.first_router_norm\.weight$"),
    "missing tensor": (lambda kv, t: t.pop(C.router_tensor_name(B2, 2)),
                       r"layer 2: missing blk\.2\.first_router_out\.bias$"),
    "extra layer": (_add_layer,
                    r"extra router layer 3 \(blk\.3\.first_router_norm\.weight\); the model has 3 layers"),
    "unknown router tensor": (_add_tensor("blk.0.first_router_gate.weight", np.ones(4, np.float32)),
                              r"unknown router tensor blk\.0\.first_router_gate\.weight$"),
    "wrong shape": (_set_tensor(W1, 2, lambda a: np.zeros((2 * H, E), np.float32)),
                    rf"layer 2: blk\.2\.first_router_in\.weight has shape \({E}, {2 * H}\), "
                    rf"expected \({E}, {H}\)$"),
    "transposed W1": (_set_tensor(W1, 0, lambda a: np.ascontiguousarray(a.T)),
                      rf"layer 0: blk\.0\.first_router_in\.weight has shape \({H}, {E}\), expected \({E}, {H}\)$"),
    "wrong norm size": (_set_tensor(NORM, 1, lambda a: a[:-1].copy()),
                        rf"layer 1: blk\.1\.first_router_norm\.weight has shape \({E - 1},\), expected \({E},\)$"),
    "hidden_size mismatch": (_all_hidden(2 * H),
                             rf"first\.router\.hidden_size is {H} but the router tensors have hidden size {2 * H}"),
    "NaN": (_set_tensor(B1, 1, _poke(np.nan, 3)),
            r"layer 1: blk\.1\.first_router_in\.bias has non-finite values \(1 NaN, 0 inf\)$"),
    "inf": (_set_tensor(W2, 0, _poke(np.inf)),
            r"layer 0: blk\.0\.first_router_out\.weight has non-finite values \(0 NaN, 1 inf\)$"),
    "-inf in F16 W1": (_set_tensor(W1, 2, lambda a: _poke(-np.inf)(a.astype(np.float16))),
                       r"layer 2: blk\.2\.first_router_in\.weight has non-finite values \(0 NaN, 1 inf\)$"),
    "F16 norm": (_set_tensor(NORM, 0, lambda a: a.astype(np.float16)),
                 r"layer 0: blk\.0\.first_router_norm\.weight has type F16, expected F32$"),
    "Q8_0 W1": (_set_tensor(W1, 1, lambda a: gguf.quants.quantize(a, Q.Q8_0), raw=Q.Q8_0),
                r"layer 1: blk\.1\.first_router_in\.weight has type Q8_0, expected F32 or F16$"),
    "unknown version": (_set_kv(C.KEY_VERSION, 5), r"unknown first\.version 5 \(this first-gguf reads 1, 2, 3 and 4\)$"),
    "newer version, new key": (_both(_set_kv(C.KEY_VERSION, 5), _set_kv("first.new", 1, T.UINT32)),
                               r"unknown first\.version 5 "),
    "prefill masked": (_set_kv(C.KEY_PREFILL, "masked"),
                       r"first\.prefill is 'masked'; first\.version 1 allows only 'full'$"),
    "aggregation max": (_set_kv(C.KEY_AGGREGATION, "max"), r"first\.aggregation is 'max'; .* allows only 'mean'$"),
    "missing key": (_del_kv(C.KEY_ROUTER_THRESHOLD), r"missing key first\.router\.threshold$"),
    "missing version": (_del_kv(C.KEY_VERSION), r"missing key first\.version$"),
    "unknown key": (_set_kv("first.router.treshold", 0.5, T.FLOAT32), r"unknown key first\.router\.treshold "),
    "hidden_size i32": (_set_kv(C.KEY_ROUTER_HIDDEN_SIZE, H, T.INT32),
                        r"first\.router\.hidden_size has type INT32, expected UINT32$"),
    "threshold f64": (_set_kv(C.KEY_ROUTER_THRESHOLD, 0.5, T.FLOAT64),
                      r"first\.router\.threshold has type FLOAT64, expected FLOAT32$"),
    "protected u32": (_set_kv(C.KEY_PROTECTED_LAYERS, [0, 2], T.ARRAY, T.UINT32),
                      r"first\.router\.protected_layers has type ARRAY\[UINT32\], expected ARRAY\[INT32\]$"),
    "prefill u32": (_set_kv(C.KEY_PREFILL, 1, T.UINT32), r"first\.prefill has type UINT32, expected STRING$"),
    "threshold 1.5": (_set_kv(C.KEY_ROUTER_THRESHOLD, 1.5),
                      r"first\.router\.threshold is 1\.5, expected within \[0, 1\]$"),
    "threshold -0.25": (_set_kv(C.KEY_ROUTER_THRESHOLD, -0.25), r"first\.router\.threshold is -0\.25, expected"),
    "threshold NaN": (_set_kv(C.KEY_ROUTER_THRESHOLD, float("nan")), r"first\.router\.threshold is nan, expected"),
    "norm_eps 0": (_set_kv(C.KEY_ROUTER_NORM_EPS, 0.0),
                   r"first\.router\.norm_eps is 0\.0, expected a finite value > 0$"),
    "protected out of range": (_set_kv(C.KEY_PROTECTED_LAYERS, [0, 3]),
                               r"first\.router\.protected_layers has layer 3, outside 0\.\.2$"),
    "protected negative": (_set_kv(C.KEY_PROTECTED_LAYERS, [-1]),
                           r"first\.router\.protected_layers has layer -1, outside 0\.\.2$"),
    "protected twice": (_set_kv(C.KEY_PROTECTED_LAYERS, [2, 2]),
                        r"first\.router\.protected_layers \[2, 2\] lists a layer twice$"),
    "hidden_size 0": (_set_kv(C.KEY_ROUTER_HIDDEN_SIZE, 0), r"first\.router\.hidden_size is 0, expected >= 1$"),
    "no block_count": (_del_kv(f"{ggufs.ARCH}.block_count"), r"no integer key qwen2\.block_count"),
}


@pytest.mark.parametrize("case", list(BAD_FILES))
def test_validation_rejects(tmp_path, case):
    mutate, message = BAD_FILES[case]
    kv, tensors = ggufs.base_kv() | ggufs.first_kv(), ggufs.base_tensors() | ggufs.router_tensors(
        ggufs.random_router_arrays())
    mutate(kv, tensors)
    path = ggufs.write_gguf(tmp_path / "m.gguf", kv, tensors)
    with pytest.raises(FormatError, match=rf"^{re.escape(str(path))}: {message}"):
        gr.validate_first_gguf(path)
    with pytest.raises(FormatError, match=message):
        gr.read_routers(path)
    info = gr.inspect_gguf(path)
    json.dumps(info, allow_nan=False)
    if case != "no block_count":
        assert isinstance(info["first"]["valid"], str) and info["first"]["valid"].startswith(str(path))
        assert "INVALID" in gr.format_inspect(info)


def test_the_valid_file_of_the_bad_cases_passes(tmp_path):
    arrays = ggufs.random_router_arrays()
    path = ggufs.write_first(tmp_path / "m.gguf", arrays)
    routers = gr.validate_first_gguf(path)
    assert all(np.array_equal(routers.tensors[b][r], arrays[b][r]) for b in arrays for r in arrays[b])
    assert routers.train_source == "tests" and routers.protected_layers == [0, 2]


def test_trailing_unit_dims_are_ggml_equivalent(tmp_path):
    """llama.cpp's writers drop trailing 1s from ne; w2 as ne [hidden] is the same tensor."""
    arrays = ggufs.random_router_arrays()
    arrays[1][C.ROUTER_OUT_WEIGHT] = arrays[1][C.ROUTER_OUT_WEIGHT].reshape(-1)
    routers = gr.validate_first_gguf(ggufs.write_first(tmp_path / "m.gguf", arrays))
    assert routers.tensors[1][C.ROUTER_OUT_WEIGHT].shape == (1, ggufs.HIDDEN)


def test_train_source_is_optional(tmp_path):
    kv = ggufs.base_kv() | ggufs.first_kv()
    del kv[C.KEY_TRAIN_SOURCE]
    path = ggufs.write_gguf(tmp_path / "m.gguf", kv, ggufs.base_tensors() | ggufs.router_tensors(
        ggufs.random_router_arrays()))
    assert gr.read_routers(path).train_source == ""


def test_plain_gguf_is_not_a_first_gguf(tiny_base):
    with pytest.raises(FormatError, match=r"base\.gguf: not a FiRST-GGUF \(no first\.\* keys\)$"):
        gr.read_routers(tiny_base)
    info = gr.inspect_gguf(tiny_base)
    assert info["first"] is None
    assert gr.format_inspect(info).splitlines()[-1] == "not a FiRST-GGUF"


# --- inspect -----------------------------------------------------------------------------

def test_inspect_first_gguf(tiny_base, tmp_path):
    routers = _routers()
    out = gr.attach_routers(tiny_base, routers, tmp_path / "m.gguf", w1_dtype="f16")
    info = json.loads(json.dumps(gr.inspect_gguf(out)))
    assert (info["architecture"], info["n_layer"], info["n_embd"]) == ("qwen2", 3, 64)
    assert info["size_bytes"] == out.stat().st_size and info["n_tensors"] == 15 + 15
    assert info["quantization"] == {"file_type": "Q8_0",
                                    "tensor_types": {"F32": 19, "F16": 7, "Q8_0": 3, "Q4_0": 1}}
    first = info["first"]
    assert first["valid"] is True and first["version"] == 1 and first["hidden_size"] == H
    assert first["protected_layers"] == [0, 2] and first["threshold"] == 0.375
    assert first["router"]["dtypes"] == {"norm": "F32", "in_weight": "F16", "in_bias": "F32",
                                         "out_weight": "F32", "out_bias": "F32"}
    assert first["router"]["shapes"]["in_weight"] == [E, H]
    assert first["router"]["shapes"]["out_weight"] == [H, 1]
    for stats in first["router"]["layers"]:
        bid = stats["layer"]
        b2 = float(routers.tensors[bid][C.ROUTER_OUT_BIAS][0])
        w1 = routers.tensors[bid][C.ROUTER_IN_WEIGHT].astype(np.float16).astype(np.float64)
        assert stats["b2"] == pytest.approx(b2) and stats["p_bias"] == pytest.approx(1 / (1 + np.exp(-b2)))
        assert stats["w1_norm"] == pytest.approx(np.linalg.norm(w1))
    assert [s["layer"] for s in first["router"]["layers"]] == [0, 1, 2]
    text = gr.format_inspect(info)
    assert "qwen2, 3 layers, n_embd 64" in text and "in_weight F16 [64, 8]" in text
    assert text.splitlines()[-1] == "valid         yes"


# --- router files (.safetensors) ----------------------------------------------------------

def test_router_file_round_trip(tmp_path):
    routers = _routers()
    routers.protected_layers = []
    path = gr.save_router_file(routers, tmp_path / "r.safetensors")
    back = gr.load_router_file(path)
    assert back == routers and back.norm_eps == 1e-5 and back.source == str(path)
    reference = tmp_path / "reference"
    reference.write_bytes(b"")
    assert path.stat().st_mode == reference.stat().st_mode  # the umask's mode, not a temp file's 0600
    with safetensors.safe_open(path, framework="np") as f:
        header = f.metadata()
        assert f.get_slice(W1_0).get_shape() == [H, E]
    assert header[C.KEY_ROUTER_THRESHOLD] == "0.375" and header[C.KEY_PROTECTED_LAYERS] == "[]"
    assert json.loads(header[C.KEY_TRAIN_SOURCE]) == "random seed 1"
    with pytest.raises(FirstError, match="exists; pass --force"):
        gr.save_router_file(routers, path)
    gr.save_router_file(_routers(seed=3), path, force=True)
    assert gr.load_router_file(path) == _routers(seed=3)


def test_router_file_with_empty_protected_layers_attaches(tiny_base, tmp_path):
    routers = _routers()
    routers.protected_layers = []
    out = gr.attach_routers(tiny_base, routers, tmp_path / "m.gguf")
    assert gr.read_routers(out).protected_layers == []


def _router_file(path, mutate_tensors=None, mutate_meta=None) -> Path:
    routers = _routers()
    tensors = {C.router_tensor_name(r, b): a for b in routers.tensors for r, a in routers.tensors[b].items()}
    meta = {k: json.dumps(v) for k, v in routers.metadata().items()} | {"format": "pt"}
    if mutate_tensors:
        mutate_tensors(tensors)
    if mutate_meta:
        mutate_meta(meta)
    save_file(tensors, path, metadata=meta)
    return path


BAD_ROUTER_FILES = {
    "wrong shape": (lambda t: t.update({W1_0: np.zeros((E, H), np.float32)}), None,
                    rf"layer 0: {W1_0} has shape \({E}, {H}\), expected \({H}, {E}\)$"),
    "missing tensor": (lambda t: t.pop(C.router_tensor_name(C.ROUTER_IN_BIAS, 1)), None,
                       r"layer 1: missing blk\.1\.first_router_in\.bias$"),
    "missing layer 0": (lambda t: [t.pop(C.router_tensor_name(r, 0)) for r in C.ROUTER_TENSORS], None,
                        r"layer 0: missing blk\.0\.first_router_norm\.weight$"),
    "NaN": (lambda t: t[C.router_tensor_name(C.ROUTER_OUT_BIAS, 2)].__setitem__(0, np.nan), None,
            r"layer 2: blk\.2\.first_router_out\.bias has non-finite values \(1 NaN, 0 inf\)$"),
    "int W1": (lambda t: t.update({W1_0: t[W1_0].astype(np.int32)}), None,
               rf"layer 0: {W1_0} has type I32, expected F32 or F16$"),
    "not a router tensor": (lambda t: t.update({"token_embd.weight": np.ones(3, np.float32)}), None,
                            r"unknown router tensor token_embd\.weight$"),
    "no router tensors": (lambda t: t.clear() or t.update({"x": np.ones(1, np.float32)}), None,
                          r"no router tensors"),
    "prefill masked": (None, lambda m: m.update({C.KEY_PREFILL: '"masked"'}), r"first\.prefill is 'masked'"),
    "missing key": (None, lambda m: m.pop(C.KEY_VERSION), r"missing key first\.version$"),
    "newer version": (None, lambda m: m.update({C.KEY_VERSION: "5", "first.new": "1"}),
                      r"unknown first\.version 5 "),
    "not JSON": (None, lambda m: m.update({C.KEY_ROUTER_THRESHOLD: "half"}),
                 r"metadata first\.router\.threshold is not JSON: 'half'$"),
    "wrong JSON type": (None, lambda m: m.update({C.KEY_ROUTER_HIDDEN_SIZE: '"8"'}),
                        r"first\.router\.hidden_size is '8', expected int$"),
    "bool layer": (None, lambda m: m.update({C.KEY_PROTECTED_LAYERS: "[true]"}),
                   r"first\.router\.protected_layers is \[True\], expected a list of integers$"),
    "hidden mismatch": (None, lambda m: m.update({C.KEY_ROUTER_HIDDEN_SIZE: "16"}),
                        r"first\.router\.hidden_size is 16 but the router tensors have hidden size 8"),
    "protected out of range": (None, lambda m: m.update({C.KEY_PROTECTED_LAYERS: "[5]"}),
                               r"first\.router\.protected_layers has layer 5, outside 0\.\.2$"),
}


@pytest.mark.parametrize("case", list(BAD_ROUTER_FILES))
def test_load_router_file_rejects(tmp_path, case):
    mutate_tensors, mutate_meta, message = BAD_ROUTER_FILES[case]
    path = _router_file(tmp_path / "r.safetensors", mutate_tensors, mutate_meta)
    with pytest.raises(FormatError, match=rf"^{re.escape(str(path))}: {message}"):
        gr.load_router_file(path)


def test_load_router_file_rejects_a_non_safetensors_file(tiny_base, tmp_path):
    with pytest.raises(FormatError, match=r"base\.gguf: not a readable safetensors file"):
        gr.load_router_file(tiny_base)
    with pytest.raises(FormatError, match="nope.safetensors: no such file"):
        gr.load_router_file(tmp_path / "nope.safetensors")


def test_save_router_file_rejects_invalid_routers(tmp_path):
    routers = _routers()
    routers.tensors[0][C.ROUTER_NORM] = routers.tensors[0][C.ROUTER_NORM].astype(np.float64)
    with pytest.raises(FormatError, match=r"blk\.0\.first_router_norm\.weight is float64, expected float32"):
        gr.save_router_file(routers, tmp_path / "r.safetensors")
    routers = _routers()
    routers.prefill = "masked"
    with pytest.raises(FormatError, match=r"^routers: first\.prefill is 'masked'"):
        gr.save_router_file(routers, tmp_path / "r.safetensors")
    assert not list(tmp_path.iterdir())


# --- boundaries --------------------------------------------------------------------------

def test_format_imports_without_torch():
    code = ("import sys; sys.modules['torch'] = None\n"
            "import first_gguf.format\n"
            "assert 'torch' not in {m.split('.')[0] for m, v in sys.modules.items() if v is not None}")
    subprocess.run([sys.executable, "-c", code], check=True, cwd=Path(__file__).parent.parent)


# --- the real default model --------------------------------------------------------------

@pytest.mark.slow
def test_attach_round_trip_on_the_default_model(tmp_path):
    try:
        from first_gguf import models
    except ImportError as exc:
        pytest.skip(f"first_gguf.models cannot be imported yet ({exc})")
    name = "qwen2.5-coder-0.5b-instruct"
    base = models.fetch(name)
    routers = gr.make_identity_routers(24, 896)
    out = tmp_path / "m.gguf"  # ~500 MB: removed however the test ends
    try:
        gr.attach_routers(base, routers, out)
        _assert_base_copied(base, out)
        back = gr.read_routers(out)
        assert back == dataclasses.replace(routers, norm_eps=_f32(routers.norm_eps))
        info = gr.inspect_gguf(out)
        assert info["first"]["valid"] is True and (info["n_layer"], info["n_embd"]) == (24, 896)
        assert ggufs.sha256(base) == models.get_spec(name).sha256
    finally:
        out.unlink(missing_ok=True)

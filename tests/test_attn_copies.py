"""Attention copies (first.thin.attn, first.version 4, docs/FORMAT.md section 7): the writer and
every rule the reader applies on tiny GGUFs written by tests/ggufs.py; then the patched runtime
on a tiny seeded qwen2 (f32) converted by the real converter: the prompt and ``full`` read the
base's attention bit for bit, decode reads the copies, and a masked prefill equals a plain GGUF
with the copies physically in place (every layer, and a subset). Real library, no mocks.
"""

from __future__ import annotations

from pathlib import Path

import gguf
import numpy as np
import pytest
from gguf import GGMLQuantizationType as Q
from gguf import GGUFValueType as T

import ggufs
import tiny_ckpt
from first_gguf import constants as C
from first_gguf import format as fmt
from first_gguf.errors import FirstError
from first_gguf.format.header import read_header
from first_gguf.format.thin_write import quantize
from llama_worker import compare

E, N_FF, N_LAYER, N_KV = ggufs.N_EMBD, 128, ggufs.N_LAYER, 32
ROLES = ("q", "k", "v", "output")


def _model_tensors(seed: int = 3) -> ggufs.Tensors:
    """A gated FFN (F32) and separate attention weights (q Q8_0 from ggufs, k F16, v F32, output Q8_0) per layer."""
    rng = np.random.default_rng(seed)
    f32 = lambda *shape: rng.standard_normal(shape).astype(np.float32)  # noqa: E731
    out = ggufs.base_tensors()
    for i in range(N_LAYER):
        out |= {f"blk.{i}.ffn_gate.weight": (f32(N_FF, E), None), f"blk.{i}.ffn_up.weight": (f32(N_FF, E), None),
                f"blk.{i}.ffn_down.weight": (f32(E, N_FF), None),
                f"blk.{i}.attn_k.weight": (f32(N_KV, E).astype(np.float16), None),
                f"blk.{i}.attn_v.weight": (f32(N_KV, E), None),
                f"blk.{i}.attn_output.weight": (gguf.quants.quantize(f32(E, E), Q.Q8_0), Q.Q8_0)}
    return out


def _base_kv() -> ggufs.KV:
    return ggufs.base_kv() | {f"{ggufs.ARCH}.feed_forward_length": (N_FF, T.UINT32, None)}


def _values(t) -> np.ndarray:
    if t.tensor_type in (Q.F32, Q.F16):
        return np.asarray(t.data, dtype=np.float32)
    return gguf.quants.dequantize(t.data, t.tensor_type)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    work = tmp_path_factory.mktemp("attn")
    plain = ggufs.write_gguf(work / "plain.gguf", _base_kv(), _model_tensors())
    return fmt.attach_routers(plain, fmt.make_identity_routers(N_LAYER, E, hidden_size=ggufs.HIDDEN),
                              work / "tiny.first.gguf")


EVERY = {i: np.arange(N_FF) for i in range(N_LAYER)}


def test_the_copies_hold_ggml_quantization_of_the_base_attention(tiny, tmp_path):
    out = fmt.write_thin(tiny, EVERY, tmp_path / "a.gguf", source="tests", qtype="Q8_0", attn=True)
    thin = fmt.read_thin(out)
    assert thin.attn and thin.qtype == "Q8_0" and thin.layers == (0, 1, 2)
    fields = read_header(out).fields
    assert fields[C.KEY_VERSION].contents() == C.FIRST_VERSION_ATTN == 4 and fields[C.KEY_THIN_ATTN].contents() is True
    base, got = {t.name: t for t in read_header(tiny).tensors}, {t.name: t for t in read_header(out).tensors}
    for i in range(N_LAYER):
        for role in ROLES:
            b, t = base[C.BASE_ATTN_TENSORS[role].format(bid=i)], got[C.ATTN_COPY_TENSORS[role].format(bid=i)]
            assert t.tensor_type == Q.Q8_0 and tuple(t.shape) == tuple(b.shape)
            assert t.data.tobytes() == quantize(_values(b), Q.Q8_0).tobytes()
    # without attn: the same file but for the version, the key and the copies
    ffn_only = fmt.write_thin(tiny, EVERY, tmp_path / "f.gguf", source="tests", qtype="Q8_0")
    assert not fmt.read_thin(ffn_only).attn and read_header(ffn_only).fields[C.KEY_VERSION].contents() == 2
    plain_part = {t.name: t.data.tobytes() for t in read_header(ffn_only).tensors}
    assert plain_part == {n: t.data.tobytes() for n, t in got.items() if C.ATTN_COPY_MARKER not in n}
    info = fmt.inspect_gguf(out)
    assert info["first"]["thin"]["attn"] is True and info["first"]["thin"]["attn_bytes"] == sum(
        int(t.n_bytes) for n, t in got.items() if C.ATTN_COPY_MARKER in n)
    assert any("attention copies" in line for line in fmt.format_inspect(info).splitlines())


def test_the_copies_travel_with_the_thin_part(tiny, tmp_path):
    out = fmt.write_thin(tiny, EVERY, tmp_path / "a.gguf", qtype="Q8_0", attn=True)
    def copies(path: Path) -> dict[str, bytes]:
        return {t.name: t.data.tobytes() for t in read_header(path).tensors if C.ATTN_COPY_MARKER in t.name}

    want = copies(out)
    assert len(want) == 4 * N_LAYER
    stamped = fmt.stamp_points(out, {"default": "fast", "points": {"fast": {"thin": [0, 1, 2]}}}, tmp_path / "s.gguf")
    reattached = fmt.attach_routers(out, fmt.make_identity_routers(N_LAYER, E, hidden_size=ggufs.HIDDEN),
                                    tmp_path / "r.gguf")
    vocab = fmt.write_vocab(out, [9, 3, 5], tmp_path / "v.gguf")
    for path in (stamped, reattached, vocab):
        assert copies(path) == want and read_header(path).fields[C.KEY_VERSION].contents() == 4, path
        assert fmt.read_thin(path).attn
    # a second write without attn drops them, and the version falls back
    again = fmt.write_thin(out, EVERY, tmp_path / "b.gguf", qtype="Q8_0")
    assert copies(again) == {} and read_header(again).fields[C.KEY_VERSION].contents() == 2
    pruned = fmt.prune_gguf(out, [1], tmp_path / "p.gguf")
    assert copies(pruned) == {}


def test_the_writer_refuses_bad_requests_before_writing(tiny, tmp_path):
    with pytest.raises(FirstError, match=r"attention copies need a type for the copies \(first\.thin\.type\)"):
        fmt.write_thin(tiny, EVERY, tmp_path / "x.gguf", attn=True)
    no_k = ggufs.write_gguf(tmp_path / "nok.gguf", _base_kv(),
                            {n: v for n, v in _model_tensors().items() if n != "blk.1.attn_k.weight"})
    no_k = fmt.attach_routers(no_k, fmt.make_identity_routers(N_LAYER, E, hidden_size=ggufs.HIDDEN),
                              tmp_path / "nok.first.gguf")
    with pytest.raises(FirstError, match=r"layer 1: no 2-D blk\.1\.attn_k\.weight; attention copies need separate"):
        fmt.write_thin(no_k, EVERY, tmp_path / "x.gguf", qtype="Q8_0", attn=True)
    assert not (tmp_path / "x.gguf").exists()


# --- the reader's rules, on a hand-built file -----------------------------------------------------

def _attn_kv_and_tensors() -> tuple[ggufs.KV, ggufs.Tensors]:
    """A valid version 4 file: every layer thin (every neuron, F32 copies) with F32 attention copies."""
    kv = _base_kv() | ggufs.first_kv()
    kv[C.KEY_VERSION] = (4, T.UINT32, None)
    kv |= {C.KEY_THIN_LAYERS: ([0, 1, 2], T.ARRAY, T.INT32), C.KEY_THIN_WIDTHS: ([N_FF] * 3, T.ARRAY, T.UINT32),
           C.KEY_THIN_NEURONS: (list(range(N_FF)) * 3, T.ARRAY, T.INT32), C.KEY_THIN_TYPE: ("F32", T.STRING, None),
           C.KEY_THIN_ATTN: (True, T.BOOL, None)}
    base = _model_tensors()
    tensors = base | ggufs.router_tensors(ggufs.random_router_arrays())
    for i in range(N_LAYER):
        for role in ("gate", "up", "down"):
            tensors[C.thin_tensor_name(role, i)] = base[f"blk.{i}.ffn_{role}.weight"]
        for role in ROLES:
            arr, raw = base[C.BASE_ATTN_TENSORS[role].format(bid=i)]
            values = gguf.quants.dequantize(arr, raw) if raw is not None else np.asarray(arr, np.float32)
            tensors[C.ATTN_COPY_TENSORS[role].format(bid=i)] = (np.ascontiguousarray(values), None)
    return kv, tensors


def _kv(key, value, vtype, sub=None):
    return lambda kv, tensors: kv.__setitem__(key, (value, vtype, sub))


def _drop(name):
    return lambda kv, tensors: (kv.pop(name, None), tensors.pop(name, None))


BAD_ATTN = {  # mutation -> message after "<file>: "
    "version 3": (_kv(C.KEY_VERSION, 3, T.UINT32), r"first\.thin\.attn in a first\.version 3 file \(attention "
                                                   r"copies need first\.version 4\)$"),
    "false": (_kv(C.KEY_THIN_ATTN, False, T.BOOL), r"first\.thin\.attn must be true; leave it out for no attention"),
    "a u8": (_kv(C.KEY_THIN_ATTN, 1, T.UINT8), r"first\.thin\.attn has type UINT8, expected BOOL$"),
    "no type": (_drop(C.KEY_THIN_TYPE), r"first\.thin\.attn needs first\.thin\.type \(the copies' type\)$"),
    "missing copy": (_drop("blk.2.first_attn_v.weight"), r"layer 2: missing blk\.2\.first_attn_v\.weight "
                                                         r"\(first\.thin\.attn is set\)$"),
    "copies without the key": (_drop(C.KEY_THIN_ATTN), r"attention copy blk\.0\.first_attn_q\.weight without "
                                                       r"first\.thin\.attn$"),
    "unknown copy": (lambda kv, t: t.__setitem__("blk.0.first_attn_norm.weight", (np.ones(E, np.float32), None)),
                     r"unknown or extra attention copy blk\.0\.first_attn_norm\.weight"),
    "wrong shape": (lambda kv, t: t.__setitem__("blk.1.first_attn_k.weight",
                                                (np.zeros((E, E), np.float32), None)),
                    rf"layer 1: blk\.1\.first_attn_k\.weight has shape \({E}, {E}\), expected \({E}, {N_KV}\)"),
    "wrong type": (lambda kv, t: t.__setitem__("blk.0.first_attn_output.weight",
                                               (t["blk.0.first_attn_output.weight"][0].astype(np.float16), None)),
                   r"layer 0: blk\.0\.first_attn_output\.weight has type F16, expected F32 \(first\.thin\.type\)$"),
    "base without attn_v": (_drop("blk.1.attn_v.weight"), r"layer 1: no blk\.1\.attn_v\.weight; attention copies "
                                                          r"need separate"),
    "copies without thin layers": (
        lambda kv, t: [kv.pop(k) for k in (C.KEY_THIN_LAYERS, C.KEY_THIN_WIDTHS, C.KEY_THIN_NEURONS, C.KEY_THIN_TYPE,
                                           C.KEY_THIN_ATTN)] + [t.pop(n) for n in list(t) if C.THIN_NAME_MARKER in n],
        r"attention copy blk\.0\.first_attn_q\.weight without first\.thin\.layers$"),
}


def test_the_hand_built_file_is_valid(tmp_path):
    thin = fmt.read_thin(ggufs.write_gguf(tmp_path / "m.gguf", *_attn_kv_and_tensors()))
    assert thin.attn and thin.qtype == "F32" and thin.widths == (N_FF,) * N_LAYER


@pytest.mark.parametrize("case", list(BAD_ATTN))
def test_validation_rejects(tmp_path, case):
    ggufs.assert_refused(tmp_path, *_attn_kv_and_tensors(), *BAD_ATTN[case])


# --- the patched runtime --------------------------------------------------------------------------

GGML_TYPE_F32 = 0
PROMPT_TEXT = "def fibonacci(n):\n    if n < 2:\n        return n\n"
CONT_TEXT = " and the answer is forty-two, of course."
pytestmark = pytest.mark.usefixtures("torch_one_thread")


@pytest.fixture(scope="module")
def tiny_qwen2(tmp_path_factory):
    """(FiRST-GGUF f32, n_layer, n_ff, prompt, continuation) of a tiny seeded qwen2."""
    from first_gguf.convert import convert_hf
    from first_gguf.runtime import FirstModel

    work = tmp_path_factory.mktemp("attn-rt")
    model, hf_dir = tiny_ckpt.checkpoint_dir("qwen2", work)
    n_layer, n_embd = model.config.num_hidden_layers, model.config.hidden_size
    plain = convert_hf(hf_dir, work / "tiny.first.gguf", routers=fmt.make_identity_routers(n_layer, n_embd),
                       outtype="f32")
    llm = FirstModel(plain, n_ctx=128, n_threads=1)
    prompt, cont = llm.tokenize(PROMPT_TEXT.encode()), llm.tokenize(CONT_TEXT.encode(), add_bos=False)
    llm.close()
    return plain, n_layer, model.config.intermediate_size, prompt, cont


def _runtime(path: Path, prompt, cont, **kw) -> np.ndarray:
    from first_gguf.runtime import FirstModel

    llm = FirstModel(path, logits_all=True, n_threads=1, n_ctx=128, type_k=GGML_TYPE_F32, type_v=GGML_TYPE_F32, **kw)
    try:
        return llm.teacher_forced_logits(prompt, cont)
    finally:
        llm.close()


@pytest.mark.parametrize("qtype, rounding", [("Q8_0", 1e-2), ("IQ4_NL", 0.5)])  # seen: 0.0015 and 0.16
def test_decode_reads_the_copies_and_the_prompt_and_full_the_base(tiny_qwen2, tmp_path, qtype, rounding):
    from first_gguf.runtime import FirstModel

    plain, n_layer, n_ff, prompt, cont = tiny_qwen2
    every = {i: np.arange(n_ff) for i in range(n_layer)}
    ffn = fmt.write_thin(plain, every, tmp_path / "ffn.gguf", qtype=qtype)
    attn = fmt.write_thin(plain, every, tmp_path / "attn.gguf", qtype=qtype, attn=True)
    llm = FirstModel(attn, n_ctx=64, n_threads=1)
    assert llm.thin_attn and llm.thin_layers == tuple(range(n_layer))
    llm.close()
    llm = FirstModel(ffn, n_ctx=64, n_threads=1)
    assert not llm.thin_attn
    llm.close()
    everything, run = range(n_layer), [True] * n_layer
    full_plain = _runtime(plain, prompt, cont, mode="full")
    assert np.array_equal(_runtime(attn, prompt, cont, mode="full", thin=everything), full_plain)
    got = _runtime(attn, prompt, cont, mode="mask", mask=run, thin=everything)
    ffn_only = _runtime(ffn, prompt, cont, mode="mask", mask=run, thin=everything)
    n = len(prompt)
    assert np.array_equal(got[:n], full_plain[:n])  # the prompt reads the base's attention
    _, apart = compare(f"{qtype} attention copies vs FFN copies alone, decode", got[n:], ffn_only[n:])
    assert 0 < apart < rounding  # the copies act on decode, by the type's rounding
    # no thin set: neither the copies nor the thin FFNs are read
    assert np.array_equal(_runtime(attn, prompt, cont, mode="mask", mask=run), _runtime(plain, prompt, cont,
                                                                                         mode="mask", mask=run))
    physical = fmt.prune_gguf(attn, [], tmp_path / "physical.gguf", thin=True)
    want = _runtime(physical, prompt, cont, mode="full")
    masked = _runtime(attn, prompt, cont, mode="mask", mask=run, prefill="masked", thin=everything)
    assert compare(f"masked prefill with {qtype} attention copies vs them in place", masked, want)[0] == 0.0


def test_only_the_thin_layers_read_their_copies(tiny_qwen2, tmp_path):
    """Copies in layers 1 and 2 of 3, decoded with the thin set (1,) and then (1, 2): each equals a plain
    GGUF with exactly those layers' FFN and attention copies in place (masked prefill, bit for bit)."""
    plain, n_layer, n_ff, prompt, cont = tiny_qwen2
    some = fmt.write_thin(plain, {i: np.arange(n_ff) for i in (1, 2)}, tmp_path / "some.gguf", qtype="Q8_0",
                          attn=True)
    run = [True] * n_layer
    one = fmt.write_thin(plain, {1: np.arange(n_ff)}, tmp_path / "one.gguf", qtype="Q8_0", attn=True)
    for thin_set, source in (((1,), one), ((1, 2), some)):
        want = _runtime(fmt.prune_gguf(source, [], tmp_path / f"p{len(thin_set)}.gguf", thin=True), prompt, cont,
                        mode="full")
        got = _runtime(some, prompt, cont, mode="mask", mask=run, prefill="masked", thin=thin_set)
        assert compare(f"thin set {thin_set} vs its copies in place", got, want)[0] == 0.0, thin_set

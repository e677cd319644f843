"""Short output vocabulary (first.version 3, docs/FORMAT.md section 8): every rule the reader applies
on tiny GGUFs written by tests/ggufs.py, the points grammar, the writer, attach / stamp / prune /
inspect with a short vocabulary (and with thinned FFNs beside it), the ``first-gguf vocab`` command,
and the token counting with the default model's tokenizer.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from gguf import GGUFValueType as T

import ggufs
from first_gguf import constants as C
from first_gguf import format as fmt
from first_gguf.cli import cli
from first_gguf.errors import FirstError, FormatError
from first_gguf.format.header import read_header
from first_gguf.format.points import Point, Points, parse_spec

N_VOCAB, E = ggufs.N_VOCAB, ggufs.N_EMBD
# docs/FORMAT.md section 2: the first.vocab.* GGUF types
VOCAB_TYPES = {C.KEY_VOCAB_TOKENS: (T.ARRAY, T.INT32), C.KEY_VOCAB_SOURCE: (T.STRING, None),
               C.KEY_VOCAB_TYPE: (T.STRING, None)}
CONTROL = [0, 30]  # tokens of a type other than normal in these files
TOKENS = [0, 3, 4, 9, 17, 30]


def _base_kv() -> ggufs.KV:
    kv = ggufs.base_kv()
    types = [1] * N_VOCAB
    for i in CONTROL:
        types[i] = 3
    return kv | {C.KEY_TOKEN_TYPE: (types, T.ARRAY, T.INT32)}


def _vocab_kv_and_tensors(tokens: list[int] = TOKENS, tied: bool = False) -> tuple[ggufs.KV, ggufs.Tensors]:
    """A valid file with a short vocabulary (its rows cut here with numpy); ``tied``: no output.weight."""
    kv = _base_kv() | ggufs.first_kv()
    kv[C.KEY_VERSION] = (3, T.UINT32, None)
    kv |= {C.KEY_VOCAB_TOKENS: (tokens, *VOCAB_TYPES[C.KEY_VOCAB_TOKENS]),
           C.KEY_VOCAB_SOURCE: ("tests", *VOCAB_TYPES[C.KEY_VOCAB_SOURCE])}
    tensors = ggufs.base_tensors() | ggufs.router_tensors(ggufs.random_router_arrays())
    if tied:
        del tensors["output.weight"]
    arr, raw = tensors["output.weight" if not tied else "token_embd.weight"]
    tensors[C.VOCAB_TENSOR] = (np.ascontiguousarray(arr[tokens]), raw)
    return kv, tensors


def _set(key, value, vtype=None, sub=None):
    def mutate(kv, tensors):
        kv[key] = (value, *(VOCAB_TYPES.get(key, (T.UINT32, None)) if vtype is None else (vtype, sub)))
    return mutate


def _drop(name):
    return lambda kv, tensors: (kv.pop(name, None), tensors.pop(name, None))


def _tensor(fn, raw=None):
    return lambda kv, t: t.__setitem__(C.VOCAB_TENSOR, (fn(t[C.VOCAB_TENSOR][0]), raw or t[C.VOCAB_TENSOR][1]))


def _both(*fns):
    return lambda kv, tensors: [fn(kv, tensors) for fn in fns]


# --- the rules ---------------------------------------------------------------------------------

BAD_VOCAB = {  # mutation -> message after "<file>: "
    "version 2": (_set(C.KEY_VERSION, 2), r"first\.vocab\.tokens in a first\.version 2 file \(a short output "
                                          r"vocabulary needs first\.version 3\)$"),
    "version 1": (_set(C.KEY_VERSION, 1), r"first\.vocab\.tokens in a first\.version 1 file"),
    "source only, version 2": (_both(_drop(C.KEY_VOCAB_TOKENS), _drop(C.VOCAB_TENSOR), _set(C.KEY_VERSION, 2)),
                               r"first\.vocab\.source in a first\.version 2 file"),
    "source without tokens": (_both(_drop(C.KEY_VOCAB_TOKENS), _drop(C.VOCAB_TENSOR)),
                              r"first\.vocab\.source without first\.vocab\.tokens$"),
    "tensor without key": (_both(_drop(C.KEY_VOCAB_TOKENS), _drop(C.KEY_VOCAB_SOURCE)),
                           r"tensor first_output\.weight without first\.vocab\.tokens$"),
    "key without tensor": (_drop(C.VOCAB_TENSOR), r"first\.vocab\.tokens without the tensor first_output\.weight$"),
    "empty": (_set(C.KEY_VOCAB_TOKENS, []), r"first\.vocab\.tokens is empty; leave the first\.vocab\.\* keys out"),
    "descending": (_set(C.KEY_VOCAB_TOKENS, [0, 4, 3, 9, 17, 30]),
                   r"first\.vocab\.tokens must be ascending and distinct \(4 then 3 at 1, 2\)$"),
    "twice": (_set(C.KEY_VOCAB_TOKENS, [0, 3, 3, 9, 17, 30]), r"first\.vocab\.tokens must be ascending and distinct"),
    "out of range": (_set(C.KEY_VOCAB_TOKENS, [0, 3, 4, 9, 30, 32]),
                     r"first\.vocab\.tokens has token 32, outside 0\.\.31$"),
    "negative": (_set(C.KEY_VOCAB_TOKENS, [-1, 0, 4, 9, 17, 30]), r"first\.vocab\.tokens has token -1, outside"),
    "every token": (_both(_set(C.KEY_VOCAB_TOKENS, list(range(N_VOCAB))),
                          _tensor(lambda a: np.concatenate([a, a, a, a, a, a])[:N_VOCAB])),
                    r"first\.vocab\.tokens lists all 32 tokens; a short vocabulary has fewer$"),
    "a control token missing": (_set(C.KEY_VOCAB_TOKENS, [0, 3, 4, 9, 17, 29]),
                                r"first\.vocab\.tokens lacks 1 tokens of a type other than normal "
                                r"\(tokenizer\.ggml\.token_type != 1\): 30$"),
    "tokens i32 wanted": (_set(C.KEY_VOCAB_TOKENS, TOKENS, T.ARRAY, T.UINT32),
                          r"first\.vocab\.tokens has type ARRAY\[UINT32\], expected ARRAY\[INT32\]$"),
    "source a number": (_set(C.KEY_VOCAB_SOURCE, 1, T.UINT32), r"first\.vocab\.source has type UINT32, expected "
                                                               r"STRING$"),
    "unknown vocab key": (_set("first.vocab.size", 6, T.UINT32), r"unknown key first\.vocab\.size "),
    "too few rows": (_tensor(lambda a: a[:-1]), r"first_output\.weight has shape \(64, 5\), expected \(64, 6\) "
                                                r"\(n_embd of output\.weight, 6 tokens\)$"),
    "wrong type": (lambda kv, t: t.__setitem__(C.VOCAB_TENSOR, (np.ones((6, E), np.float16), None)),
                   r"first_output\.weight has type F16, expected Q4_0 \(the type of output\.weight\)$"),
    "type unknown": (_set(C.KEY_VOCAB_TYPE, "Q9_9"), r"first\.vocab\.type 'Q9_9' is not one of F32, F16, "),
    "type not the tensor's": (_set(C.KEY_VOCAB_TYPE, "Q8_0"), r"first_output\.weight has type Q4_0, expected "
                                                               r"Q8_0 \(first\.vocab\.type\)$"),
    "type without tokens": (_both(_drop(C.KEY_VOCAB_TOKENS), _drop(C.KEY_VOCAB_SOURCE), _drop(C.VOCAB_TENSOR),
                                  _set(C.KEY_VOCAB_TYPE, "Q8_0")),
                            r"first\.vocab\.type without first\.vocab\.tokens$"),
    "rows differ": (_tensor(lambda a: np.roll(a, 1, axis=0)),
                    r"first_output\.weight is not the rows first\.vocab\.tokens of output\.weight$"),
    "no output matrix": (_both(_drop("output.weight"), _drop("token_embd.weight")),
                         r"no output\.weight or token_embd\.weight; a short vocabulary needs the output matrix$"),
}


def test_the_hand_built_vocab_file_is_valid(tmp_path):
    path = ggufs.write_gguf(tmp_path / "m.gguf", *_vocab_kv_and_tensors())
    vocab = fmt.read_vocab(path)
    assert vocab == fmt.VocabInfo(tuple(TOKENS), "tests") and vocab.size == 6
    parts = fmt.read_first_parts(path)
    assert parts.vocab == vocab and parts.thin is None
    assert vocab.metadata() == {C.KEY_VOCAB_TOKENS: TOKENS, C.KEY_VOCAB_SOURCE: "tests"}


def test_a_tied_output_takes_the_embedding_rows(tmp_path):
    path = ggufs.write_gguf(tmp_path / "m.gguf", *_vocab_kv_and_tensors(tied=True))
    assert fmt.read_vocab(path).tokens == tuple(TOKENS)
    kv, tensors = _vocab_kv_and_tensors(tied=True)
    tensors[C.VOCAB_TENSOR] = (np.ascontiguousarray(tensors[C.VOCAB_TENSOR][0][::-1]), None)
    path = ggufs.write_gguf(tmp_path / "b.gguf", kv, tensors)
    with pytest.raises(FormatError, match=r"first_output\.weight is not the rows first\.vocab\.tokens of "
                                          r"token_embd\.weight$"):
        fmt.validate_first_gguf(path)


@pytest.mark.parametrize("case", list(BAD_VOCAB))
def test_validation_rejects(tmp_path, case):
    mutate, message = BAD_VOCAB[case]
    kv, tensors = _vocab_kv_and_tensors()
    mutate(kv, tensors)
    from first_gguf.format.writer import CopyWriter

    with pytest.MonkeyPatch.context() as mp:  # gguf-py's writer refuses empty arrays; the copy writer writes them
        mp.setattr(ggufs.gguf, "GGUFWriter", CopyWriter)
        path = ggufs.write_gguf(tmp_path / "m.gguf", kv, tensors)
    with pytest.raises(FormatError, match=rf"^{re.escape(str(path))}: {message}"):
        fmt.validate_first_gguf(path)
    assert fmt.inspect_gguf(path)["first"]["valid"].startswith(str(path))


def test_the_row_comparison_is_left_out_when_shallow(tmp_path):
    kv, tensors = _vocab_kv_and_tensors()
    BAD_VOCAB["rows differ"][0](kv, tensors)
    path = ggufs.write_gguf(tmp_path / "m.gguf", kv, tensors)
    assert fmt.read_first_parts(path, deep=False).vocab.tokens == tuple(TOKENS)
    assert fmt.read_points(path) == Points()
    with pytest.raises(FormatError, match="is not the rows"):
        fmt.read_first_parts(path)


def test_a_version_3_file_needs_no_vocab(tmp_path):
    kv = ggufs.base_kv() | ggufs.first_kv()
    kv[C.KEY_VERSION] = (3, T.UINT32, None)
    path = ggufs.write_gguf(tmp_path / "m.gguf", kv, ggufs.base_tensors() | ggufs.router_tensors(
        ggufs.random_router_arrays()))
    parts = fmt.read_first_parts(path)
    assert parts.vocab is None and parts.thin is None and fmt.read_vocab(path) is None


# --- the points --------------------------------------------------------------------------------

@pytest.mark.parametrize("spec, point", [
    ("short=vocab", Point("short", vocab=True)),
    ("quick=skip:4;vocab", Point("quick", skip=(4,), vocab=True)),
    ("fast=threshold:0.5;vocab", Point("fast", threshold=0.5, vocab=True)),
    ("lean=thin:0,1;vocab", Point("lean", thin=(0, 1), vocab=True)),
    ("mid=skip:4;thin:0,1;vocab", Point("mid", skip=(4,), thin=(0, 1), vocab=True)),
    ("ft=threshold:0.35;thin:2;vocab", Point("ft", threshold=0.35, thin=(2,), vocab=True)),
])
def test_vocab_specs_parse_and_write_back(spec, point):
    assert parse_spec(spec, "f") == point and point.spec() == spec
    assert point.as_json()["vocab"] is True
    assert fmt.load_points({"points": {point.name: point.as_json()}}, 24, [0, 23], has_vocab=True).items == (point,)
    assert fmt.load_points(Points((point,)), 24, [0, 23], thin_layers=range(24), has_vocab=True).items == (point,)


def test_vocab_point_kinds_masks_and_descriptions():
    short, quick = Point("short", vocab=True), Point("quick", skip=(1,), vocab=True)
    assert (short.kind, quick.kind, Point("t", thin=(1,), vocab=True).kind) == ("vocab", "skip", "thin")
    assert short.mask(3) == [True, True, True] and short.thin_mask(3) is None  # mask mode, nothing skipped
    assert quick.mask(3) == [True, False, True]
    assert short.describe() == "short vocabulary" and quick.describe() == "skip [1], short vocabulary"
    assert Point("x", skip=(1,)).vocab is False and "vocab" not in Point("x", skip=(1,)).as_json()
    spec_json = {"default": "short", "points": {"short": {"vocab": True}, "quick": {"skip": [1], "vocab": True}}}
    assert fmt.load_points(spec_json, 3, [0], has_vocab=True).as_json() == spec_json


BAD_SPECS = {
    "vocab twice": ("x=vocab;vocab", r"expected NAME=threshold:T"),
    "vocab first": ("x=vocab;skip:1", r"expected NAME=threshold:T"),
    "vocab before thin": ("x=skip:1;vocab;thin:2", r"unexpected 'vocab': .* then ';vocab' last$"),
    "vocab with a value": ("x=skip:1;vocab:1", r"unexpected 'vocab:1'"),
    "healed": ("x=skip:1;heal:h.gguf;vocab", r"point 'x=skip:1;heal:h\.gguf;vocab': a healed point takes no "
                                              r"short vocabulary$"),
}


@pytest.mark.parametrize("case", list(BAD_SPECS))
def test_bad_vocab_specs(case):
    spec, message = BAD_SPECS[case]
    with pytest.raises(FormatError, match=message):
        points = Points((parse_spec(spec, "f"),))
        fmt.load_points(points, 3, [0], has_vocab=True)


BAD_JSON = {
    "vocab false": ({"points": {"q": {"skip": [1], "vocab": False}}}, r"point 'q': vocab False must be true"),
    "vocab a string": ({"points": {"q": {"vocab": "yes"}}}, r"point 'q': vocab 'yes' must be true"),
    "vocab with heal": ({"points": {"q": {"skip": [1], "heal": "h.gguf", "vocab": True}}},
                        r"point 'q=skip:1;heal:h\.gguf;vocab': a healed point takes no short vocabulary$"),
    "vocab with an unknown key": ({"points": {"q": {"vocab": True, "fast": 1}}}, r"point 'q': expected"),
    "empty point": ({"points": {"q": {}}}, r"point 'q': expected"),
}


@pytest.mark.parametrize("case", list(BAD_JSON))
def test_bad_vocab_json(case):
    data, message = BAD_JSON[case]
    with pytest.raises(FormatError, match=rf"^points: {message}"):
        fmt.load_points(data, 3, [0], has_vocab=True)


def test_a_vocab_point_needs_a_vocabulary_in_the_file(tmp_path):
    with pytest.raises(FormatError, match=r"^points: point 'q=skip:1;vocab': decodes with the short vocabulary but "
                                          r"the file has none \(first\.vocab\.tokens absent\)$"):
        fmt.load_points({"points": {"q": {"skip": [1], "vocab": True}}}, 3, [0], has_vocab=False)
    assert len(fmt.load_points({"points": {"q": {"vocab": True}}}, 3, [0])) == 1  # None: not checked
    kv = ggufs.base_kv() | ggufs.first_kv() | {C.KEY_POINTS: (["q=vocab"], T.ARRAY, T.STRING)}
    path = ggufs.write_gguf(tmp_path / "m.gguf", kv, ggufs.base_tensors() | ggufs.router_tensors(
        ggufs.random_router_arrays()))
    with pytest.raises(FormatError, match=rf"^{re.escape(str(path))}: point 'q=vocab': decodes with the short "
                                          r"vocabulary but the file has none"):
        fmt.read_points(path)
    kv, tensors = _vocab_kv_and_tensors()
    kv[C.KEY_POINTS] = (["q=vocab", "r=skip:1;vocab"], T.ARRAY, T.STRING)
    path = ggufs.write_gguf(tmp_path / "v.gguf", kv, tensors)
    assert [p.spec() for p in fmt.read_points(path)] == ["q=vocab", "r=skip:1;vocab"]


# --- writing -----------------------------------------------------------------------------------

N_FF, N_LAYER = 128, ggufs.N_LAYER


def _ffn_tensors(seed: int = 2) -> ggufs.Tensors:
    """A gated F32 FFN per layer (thinned FFNs beside the short vocabulary)."""
    rng = np.random.default_rng(seed)
    return {f"blk.{i}.ffn_{r}.weight": (rng.standard_normal((E, N_FF) if r == "down" else (N_FF, E)).astype(np.float32),
                                        None) for i in range(N_LAYER) for r in ("gate", "up", "down")}


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    """A tiny FiRST-GGUF (control tokens 0 and 30, Q4_0 output matrix, gated FFNs), attached by the code under test."""
    work = tmp_path_factory.mktemp("vocab")
    kv = _base_kv() | {f"{ggufs.ARCH}.feed_forward_length": (N_FF, T.UINT32, None)}
    plain = ggufs.write_gguf(work / "plain.gguf", kv, ggufs.base_tensors() | _ffn_tensors())
    return fmt.attach_routers(plain, fmt.make_identity_routers(N_LAYER, E, hidden_size=ggufs.HIDDEN),
                              work / "tiny.first.gguf")


@pytest.fixture(scope="module")
def vocab_file(tiny, tmp_path_factory) -> Path:
    return fmt.write_vocab(tiny, [9, 3, 5, 3], tmp_path_factory.mktemp("vocab-file") / "v.gguf", source="tests")


def _tensors(path: Path) -> dict:
    return {t.name: t for t in read_header(path).tensors}


def _kv_raw(path: Path, without: tuple[str, ...] = ()) -> list:
    import gguf

    r = gguf.GGUFReader(path)
    return [(f.name, ggufs.kv_raw(f)) for f in r.fields.values() if not f.name.startswith("GGUF.")
            and f.name not in without]


def _version(path: Path) -> int:
    return read_header(path).fields[C.KEY_VERSION].contents()


def _part_bytes(path: Path, marker: str) -> list:
    return [(n, t.tensor_type, t.data.tobytes()) for n, t in _tensors(path).items() if marker in n]


def test_write_lists_the_tokens_and_copies_everything_else(tiny, vocab_file):
    before = ggufs.sha256(tiny)
    vocab = fmt.read_vocab(vocab_file)
    assert ggufs.sha256(tiny) == before
    assert vocab == fmt.VocabInfo((0, 3, 5, 9, 30), "tests")  # sorted, once each, the control tokens added
    assert _version(vocab_file) == 3 and _version(tiny) == 1
    h = read_header(vocab_file)
    assert list(h.fields)[-2:] == [C.KEY_VOCAB_TOKENS, C.KEY_VOCAB_SOURCE]
    assert h.tensors[-1].name == C.VOCAB_TENSOR and h.tensors[-1].tensor_type.name == "Q4_0"
    assert tuple(h.tensors[-1].shape) == (E, 5)
    out = _tensors(tiny)["output.weight"]
    assert h.tensors[-1].data.tobytes() == np.asarray(out.data)[[0, 3, 5, 9, 30]].tobytes()
    assert _kv_raw(vocab_file, C.VOCAB_KEYS + (C.KEY_VERSION,)) == _kv_raw(tiny, (C.KEY_VERSION,))
    kept = [(n, t.tensor_type, t.data.tobytes()) for n, t in _tensors(vocab_file).items() if n != C.VOCAB_TENSOR]
    assert kept == [(n, t.tensor_type, t.data.tobytes()) for n, t in _tensors(tiny).items()]


def test_write_requantizes_the_listed_rows_to_a_type(tiny, tmp_path):
    from gguf.quants import dequantize

    from first_gguf.format.thin_write import quantize

    typed = fmt.write_vocab(tiny, [9, 3, 5], tmp_path / "q8.gguf", source="tests", qtype="Q8_0")
    assert fmt.read_vocab(typed) == fmt.VocabInfo((0, 3, 5, 9, 30), "tests", "Q8_0")
    assert list(read_header(typed).fields)[-1] == C.KEY_VOCAB_TYPE
    got, out = _tensors(typed)[C.VOCAB_TENSOR], _tensors(tiny)["output.weight"]
    assert got.tensor_type.name == "Q8_0" and tuple(got.shape) == (E, 5)
    rows = dequantize(np.asarray(out.data), out.tensor_type)[[0, 3, 5, 9, 30]]
    assert got.data.tobytes() == quantize(rows, got.tensor_type).tobytes()  # ggml's quantizer, the listed rows
    kept = [(n, t.tensor_type, t.data.tobytes()) for n, t in _tensors(typed).items() if n != C.VOCAB_TENSOR]
    assert kept == [(n, t.tensor_type, t.data.tobytes()) for n, t in _tensors(tiny).items()]
    assert "5 tokens of 32, requantized to Q8_0" in fmt.format_inspect(fmt.inspect_gguf(typed))
    plain = fmt.write_vocab(typed, [9, 3, 5], tmp_path / "plain.gguf", source="tests")  # replaced, type gone
    assert fmt.read_vocab(plain).qtype is None and _tensors(plain)[C.VOCAB_TENSOR].tensor_type.name == "Q4_0"
    with pytest.raises(FormatError, match=r"first\.vocab\.type 'Q7' is not one of"):
        fmt.write_vocab(tiny, [1], tmp_path / "x.gguf", qtype="Q7")
    assert not (tmp_path / "x.gguf").exists()


def test_write_from_counts_takes_the_most_frequent(tiny, tmp_path):
    counts = np.zeros(N_VOCAB, dtype=np.int64)
    counts[[7, 2, 12, 4]] = [5, 9, 5, 5]  # a tie at 5: the lower ids win
    out = fmt.write_vocab_from_counts(tiny, counts, 3, tmp_path / "c.gguf", source="counted")
    assert fmt.read_vocab(out) == fmt.VocabInfo((0, 2, 4, 7, 30), "counted")
    from first_gguf.format.vocab_write import top_tokens

    assert list(top_tokens(counts, 5)) == [0, 2, 4, 7, 12]


def test_a_second_write_replaces_the_vocabulary(tiny, vocab_file, tmp_path):
    again = fmt.write_vocab(vocab_file, [1, 2], tmp_path / "a.gguf", source="b")
    direct = fmt.write_vocab(tiny, [2, 1], tmp_path / "d.gguf", source="b")
    assert ggufs.sha256(again) == ggufs.sha256(direct)
    assert fmt.read_vocab(again).tokens == (0, 1, 2, 30)


def test_write_refuses_bad_requests_before_writing(tiny, tmp_path):
    counts = np.ones(N_VOCAB, dtype=np.int64)
    with pytest.raises(FirstError, match="would overwrite the input"):
        fmt.write_vocab(tiny, [1], tiny)
    (tmp_path / "exists.gguf").write_bytes(b"x")
    with pytest.raises(FirstError, match="exists; pass --force"):
        fmt.write_vocab(tiny, [1], tmp_path / "exists.gguf")
    with pytest.raises(FirstError, match=r"token 32 outside 0\.\.31$"):
        fmt.write_vocab(tiny, [1, 32], tmp_path / "x.gguf")
    with pytest.raises(FirstError, match=r"first\.vocab\.tokens lists all 32 tokens; a short vocabulary has fewer"):
        fmt.write_vocab(tiny, range(1, 32), tmp_path / "x.gguf")
    with pytest.raises(FirstError, match=r"tokens must be integer ids"):
        fmt.write_vocab(tiny, [1.5], tmp_path / "x.gguf")
    with pytest.raises(FirstError, match=r"token counts of shape \[31\] \(int64\) do not fit"):
        fmt.write_vocab_from_counts(tiny, counts[:-1], 4, tmp_path / "x.gguf")
    with pytest.raises(FirstError, match=r"a short vocabulary of 32 tokens must have 1\.\.31$"):
        fmt.write_vocab_from_counts(tiny, counts, 32, tmp_path / "x.gguf")
    with pytest.raises(FormatError, match=r"plain\.gguf: not a FiRST-GGUF"):
        fmt.write_vocab(tiny.parent / "plain.gguf", [1], tmp_path / "x.gguf")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["exists.gguf"]
    assert fmt.write_vocab(tiny, [1], tmp_path / "exists.gguf", force=True) == tmp_path / "exists.gguf"


def test_thin_and_vocab_together(tiny, vocab_file, tmp_path):
    scores = np.random.default_rng(5).random((N_LAYER, N_FF))
    both = fmt.write_thin_from_scores(vocab_file, scores, 32, tmp_path / "b.gguf", layers=[0, 2], source="t")
    parts = fmt.read_first_parts(both)
    assert _version(both) == 3 and parts.vocab == fmt.read_vocab(vocab_file) and parts.thin.layers == (0, 2)
    assert _part_bytes(both, C.VOCAB_TENSOR) == _part_bytes(vocab_file, C.VOCAB_TENSOR)
    thin_only = fmt.write_thin_from_scores(tiny, scores, 32, tmp_path / "t.gguf", layers=[0, 2], source="t")
    assert _version(thin_only) == 2
    other = fmt.write_vocab(thin_only, [4], tmp_path / "o.gguf")  # the vocabulary written after the thin FFNs
    assert _version(other) == 3 and fmt.read_first_parts(other).thin == parts.thin
    assert _part_bytes(other, C.THIN_NAME_MARKER) == _part_bytes(thin_only, C.THIN_NAME_MARKER)
    rethin = fmt.write_thin_from_scores(both, scores, 64, tmp_path / "r.gguf", layers=[1], source="r")
    assert _version(rethin) == 3 and fmt.read_vocab(rethin) == parts.vocab
    revocab = fmt.write_vocab(both, [4], tmp_path / "v.gguf")
    assert _version(revocab) == 3 and fmt.read_first_parts(revocab).thin == parts.thin
    assert _part_bytes(revocab, C.THIN_NAME_MARKER) == _part_bytes(both, C.THIN_NAME_MARKER)


VOCAB_POINTS = {"default": "short", "points": {"short": {"vocab": True}, "quick": {"skip": [1], "vocab": True},
                                              "plain": {"skip": [1]}}}


def test_stamp_points_keeps_the_vocabulary(vocab_file, tiny, tmp_path):
    stamped = fmt.stamp_points(vocab_file, VOCAB_POINTS, tmp_path / "s.gguf")
    parts = fmt.read_first_parts(stamped)
    assert parts.points.as_json() == VOCAB_POINTS and parts.vocab == fmt.read_vocab(vocab_file)
    assert _version(stamped) == 3 and _part_bytes(stamped, C.VOCAB_TENSOR) == _part_bytes(vocab_file, C.VOCAB_TENSOR)
    cleared = fmt.stamp_points(stamped, None, tmp_path / "c.gguf")
    assert ggufs.sha256(cleared) == ggufs.sha256(vocab_file)
    with pytest.raises(FormatError, match=r"^points: point 'short=vocab': decodes with the short vocabulary but "
                                          r"the file has none"):
        fmt.stamp_points(tiny, VOCAB_POINTS, tmp_path / "x.gguf")


def test_reattaching_routers_keeps_the_vocabulary(vocab_file, tiny, tmp_path):
    routers = fmt.make_identity_routers(N_LAYER, E, hidden_size=16, seed=3)
    out = fmt.attach_routers(vocab_file, routers, tmp_path / "a.gguf", points=VOCAB_POINTS)
    parts = fmt.read_first_parts(out)
    assert parts.routers.hidden_size == 16 and parts.vocab == fmt.read_vocab(vocab_file)
    assert parts.points.as_json() == VOCAB_POINTS and _version(out) == 3
    assert _part_bytes(out, C.VOCAB_TENSOR) == _part_bytes(vocab_file, C.VOCAB_TENSOR)
    both = fmt.write_thin(vocab_file, {1: list(range(0, 128, 2))}, tmp_path / "b.gguf")
    again = fmt.attach_routers(both, routers, tmp_path / "c.gguf")
    assert _version(again) == 3 and fmt.read_first_parts(again)[2:] == fmt.read_first_parts(both)[2:]
    with pytest.raises(FormatError, match=r"decodes with the short vocabulary but the file has none"):
        fmt.attach_routers(tiny, routers, tmp_path / "x.gguf", points=VOCAB_POINTS)


def test_prune_drops_the_vocabulary(vocab_file, tmp_path):
    out = fmt.prune_gguf(vocab_file, [1], tmp_path / "p.gguf")
    assert C.VOCAB_TENSOR not in _tensors(out) and not fmt.is_first_gguf(out)
    assert "output.weight" in _tensors(out)


def test_inspect_shows_the_vocabulary(vocab_file, tiny):
    info = json.loads(json.dumps(fmt.inspect_gguf(vocab_file)))
    vocab = info["first"]["vocab"]
    sizes = {t.name: t.n_bytes for t in read_header(vocab_file).tensors}
    assert vocab == {"size": 5, "n_vocab": 32, "source": "tests", "type": None, "output": "output.weight",
                     "vocab_bytes": sizes[C.VOCAB_TENSOR], "output_bytes": sizes["output.weight"]}
    text = fmt.format_inspect(info)
    assert "vocabulary    5 tokens of 32" in text and "MB output.weight (15.6%); tests" in text
    assert fmt.inspect_gguf(tiny)["first"]["vocab"] is None and "vocabulary" not in fmt.format_inspect(
        fmt.inspect_gguf(tiny))


# --- the command -------------------------------------------------------------------------------

def _run(*args) -> tuple[int, str, str]:
    res = CliRunner().invoke(cli, [str(a) for a in args])
    return res.exit_code, res.stdout, res.stderr


def test_cli_vocab_from_a_counts_file(tiny, tmp_path):
    from first_gguf.train.vocab import save_counts

    counts = np.arange(N_VOCAB, dtype=np.int64) % 7  # 6, 13, 20 and 27 count most: 6
    save_counts(tmp_path / "c.npz", counts, "hand-made text")
    code, out, err = _run("vocab", tiny, "-o", tmp_path / "v.gguf", "--size", 4, "--counts", tmp_path / "c.npz")
    assert code == 0, err
    assert Path(out.strip()) == tmp_path / "v.gguf" and "counts from" in err
    assert fmt.read_vocab(tmp_path / "v.gguf") == fmt.VocabInfo((0, 6, 13, 20, 27, 30),
                                                               "tokens of hand-made text, top 4 + 2 non-normal")
    code, out, err = _run("vocab", tiny, "-o", tmp_path / "v.gguf", "--size", 4, "--counts", tmp_path / "c.npz")
    assert code == 1 and "exists; pass --force" in err
    code, out, err = _run("vocab", tiny, "-o", tmp_path / "w.gguf", "--size", 32, "--counts", tmp_path / "c.npz")
    assert code == 1 and "a short vocabulary of 32 tokens must have 1..31" in err
    code, out, err = _run("vocab", "--help")
    assert code == 0 and "--size" in out and "--limit-mb" in out


def test_cli_vocab_counts_once_per_counts_file(tiny, tmp_path, monkeypatch):
    import first_gguf.train.vocab as tv

    calls = []

    def fake_count(model, roots, limit_bytes, exts=tv.DEFAULT_EXTS):
        calls.append((Path(model), roots, limit_bytes))
        return np.arange(N_VOCAB, dtype=np.int64), 3_000_000

    monkeypatch.setattr(tv, "count_text", fake_count)
    args = ("--size", 3, "--text", tmp_path, "--limit-mb", 3, "--counts", tmp_path / "c.npz")
    code, out, err = _run("vocab", tiny, "-o", tmp_path / "a.gguf", *args)
    assert code == 0, err
    assert calls == [(tiny, [tmp_path], 3_000_000)]
    source = f"tokens of 3 MB of local text ({tmp_path}), top 3 + 1 non-normal"
    assert fmt.read_vocab(tmp_path / "a.gguf") == fmt.VocabInfo((0, 29, 30, 31), source)
    code, out, err = _run("vocab", tiny, "-o", tmp_path / "b.gguf", *args)
    assert code == 0 and len(calls) == 1 and "counts from" in err
    assert fmt.read_vocab(tmp_path / "b.gguf") == fmt.read_vocab(tmp_path / "a.gguf")
    code, out, err = _run("vocab", tiny, "-o", tmp_path / "c.gguf", "--size", 3)
    assert code == 0 and calls[-1][1] is None  # no --text: the default roots


# --- counting (the default model's tokenizer, vocab only) --------------------------------------

DEFAULT_GGUF = Path.home() / ".cache/first-gguf/models/qwen2.5-coder-0.5b-instruct.gguf"
TEXT = "def add(a, b):\n    return a + b  # sum\n"


@pytest.fixture(scope="module")
def tokenizer():
    if not DEFAULT_GGUF.is_file():
        pytest.skip(f"{DEFAULT_GGUF} not fetched")
    from llama_cpp import Llama

    return Llama(str(DEFAULT_GGUF), vocab_only=True, verbose=False)


def test_count_tokens_of_a_text_tree(tokenizer, tmp_path):
    from first_gguf.train.vocab import count_tokens, text_files

    for rel in ("a.py", "b/c.md", "b/d/e.txt"):
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_text(TEXT)
    (tmp_path / "b" / "bad.txt").write_bytes(TEXT.encode() + b"\xff\xfe")  # bad UTF-8 bytes are dropped
    for skipped in ("human_eval/x.py", "b/human-eval.py", "HumanEval/y.py", "z.gz", "w.bin"):
        (tmp_path / skipped).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / skipped).write_text("never counted")
    (tmp_path / "big.py").write_text("x = 1\n" * 400_000)  # over 2 MB: skipped
    ids = tokenizer.tokenize(TEXT.encode(), add_bos=False, special=False)
    assert ids == [750, 912, 2877, 11, 293, 982, 262, 470, 264, 488, 293, 220, 671, 2629, 198]  # " b" twice
    counts = count_tokens(DEFAULT_GGUF, [tmp_path])
    assert counts[293] == 8 and counts[750] == 4 and counts.sum() == 4 * 15
    assert counts.dtype == np.int64 and counts.shape == (tokenizer.n_vocab(),)
    assert np.array_equal(counts, 4 * np.bincount(ids, minlength=tokenizer.n_vocab()))
    files = text_files([tmp_path])
    assert sorted(p.relative_to(tmp_path).as_posix() for p in files) == ["a.py", "b/bad.txt", "b/c.md", "b/d/e.txt",
                                                                          "big.py"]
    assert files == text_files([tmp_path, tmp_path / "a.py"])  # each file once, the same shuffle
    same = tmp_path / "same"
    for name in ("1.py", "2.py", "3.py"):
        (same / name).parent.mkdir(exist_ok=True)
        (same / name).write_text(TEXT)
    two = count_tokens(DEFAULT_GGUF, [same], limit_bytes=len(TEXT) + 1)  # stops after the file that passes it
    assert np.array_equal(two, 2 * np.bincount(ids, minlength=tokenizer.n_vocab()))
    with pytest.raises(FirstError, match=r"no such text file or directory: .*nowhere"):
        count_tokens(DEFAULT_GGUF, [tmp_path / "nowhere"])


def test_the_default_roots():
    import sysconfig

    from first_gguf.train.vocab import default_roots

    roots = default_roots()
    assert roots["stdlib"] == Path(sysconfig.get_paths()["stdlib"])
    assert roots["site-packages"] == Path(sysconfig.get_paths()["purelib"])
    assert ("docs" in roots) == Path("/usr/share/doc").is_dir()

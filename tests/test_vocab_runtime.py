"""The short output vocabulary in the patched runtime (docs/FORMAT.md sections 3 and 8), on a
tiny seeded qwen2 (f32) converted by the real converter: decode logits equal to the full
vocabulary's on the listed and the context's tokens and -inf everywhere else, the prompt's row
and ``full`` untouched, graph reuse across vocabulary settings and prompts, generation never
leaving the allowed tokens, points and bad input. Real converter, real library, no mocks.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

import tiny_ckpt
from first_gguf.convert import convert_hf
from first_gguf.errors import FirstError
from first_gguf.format import make_identity_routers, stamp_points, write_thin, write_vocab

GGML_TYPE_F32 = 0
PROMPT_TEXT = "def fibonacci(n):\n    if n < 2:\n        return n\n"
OTHER_TEXT = "class Stack:\n    def push(self, item):\n"
CONT_TEXT = " and the answer is forty-two, of course."
ATOL = 1e-5


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory):
    """(FiRST-GGUF f32, the same with a short vocabulary, the listed tokens, prompt, other prompt, continuation)."""
    work = tmp_path_factory.mktemp("vocab")
    model, hf_dir = tiny_ckpt.checkpoint_dir("qwen2", work)
    n_layer, n_embd = model.config.num_hidden_layers, model.config.hidden_size
    plain = convert_hf(hf_dir, work / "tiny.first.gguf", routers=make_identity_routers(n_layer, n_embd), outtype="f32")
    from first_gguf.runtime import FirstModel

    llm = FirstModel(plain, n_ctx=128, n_threads=1)
    prompt, other = llm.tokenize(PROMPT_TEXT.encode()), llm.tokenize(OTHER_TEXT.encode())
    cont = llm.tokenize(CONT_TEXT.encode(), add_bos=False)
    n_vocab = llm.n_vocab()
    llm.close()
    rng = np.random.default_rng(7)
    # half the vocabulary, leaving out some of each prompt's tokens so that extras are exercised
    listed = set(rng.choice(n_vocab, n_vocab // 2, replace=False).tolist()) - set(prompt[1::2]) - set(other[1::2])
    short = write_vocab(plain, sorted(listed), work / "tiny.vocab.gguf", source="tests: random half")
    from first_gguf.format import read_vocab

    return plain, short, read_vocab(short).tokens, prompt, other, cont


def _runtime(path: Path, prompt, cont, **kw) -> tuple[np.ndarray, object]:
    from first_gguf.runtime import FirstModel

    llm = FirstModel(path, logits_all=True, n_threads=1, n_ctx=128, type_k=GGML_TYPE_F32, type_v=GGML_TYPE_F32, **kw)
    try:
        return llm.teacher_forced_logits(prompt, cont), llm.last_prefill
    finally:
        llm.close()


def _allowed(n_vocab: int, listed, *contexts) -> np.ndarray:
    ok = np.zeros(n_vocab, dtype=bool)
    ok[list(listed)] = True
    for c in contexts:
        ok[list(c)] = True
    return ok


@pytest.mark.parametrize("skip", [(), (2,)], ids=["every-layer", "skip-2"])
def test_short_vocabulary_decode_is_the_full_rows_on_allowed_tokens(skip, tiny):
    plain, short, listed, prompt, _, cont = tiny
    n = len(prompt)
    mask = [i not in skip for i in range(4)]
    got, rep = _runtime(short, prompt, cont, mode="mask", mask=mask, vocab=True)
    want, _ = _runtime(plain, prompt, cont, mode="mask", mask=mask)
    ok = _allowed(got.shape[1], listed, prompt)
    assert rep.vocab == len(set(prompt) - set(listed)) > 0 and rep.skipped == skip
    assert np.array_equal(got[:n], want[:n])  # the prompt's rows (and the first token's logits): full vocabulary
    dec, ref = got[n:], want[n:]
    assert np.all(np.isneginf(dec[:, ~ok]))  # every other token is impossible
    # f32: listed and extra tokens as full's up to float rounding (another product shape can
    # take another ggml kernel, which sums in another order)
    np.testing.assert_allclose(dec[:, ok], ref[:, ok], rtol=0, atol=ATOL)
    off, _ = _runtime(short, prompt, cont, mode="mask", mask=mask)
    assert np.array_equal(off, want)  # vocabulary off: the file's extra tensor is never read


@pytest.mark.parametrize("qtype, rounding", [("Q8_0", 1e-3), ("IQ4_NL", 0.2)])
def test_a_requantized_short_vocabulary_rounds_only_the_listed_tokens(tiny, tmp_path, qtype, rounding):
    """first.vocab.type: the listed rows decode from their requantized copy (off by the type's
    rounding), the extra tokens from the output matrix (as without the type), the prompt's row
    and `full` bit for bit."""
    from first_gguf.format import read_vocab

    plain, short, listed, prompt, _, cont = tiny
    typed = write_vocab(plain, listed, tmp_path / f"{qtype}.gguf", source="tests: random half", qtype=qtype)
    assert read_vocab(typed).qtype == qtype and read_vocab(typed).tokens == listed
    n, mask = len(prompt), [True, True, False, True]
    got, rep = _runtime(typed, prompt, cont, mode="mask", mask=mask, vocab=True)
    want, _ = _runtime(short, prompt, cont, mode="mask", mask=mask, vocab=True)
    assert rep.vocab == len(set(prompt) - set(listed)) and np.array_equal(got[:n], want[:n])
    assert np.array_equal(np.isneginf(got), np.isneginf(want))  # the same tokens possible
    on = np.zeros(got.shape[1], dtype=bool)
    on[list(listed)] = True
    extra = np.isfinite(want[n]) & ~on
    np.testing.assert_allclose(got[n:][:, extra], want[n:][:, extra], rtol=0, atol=ATOL)
    dec, ref = got[n:][:, on], want[n:][:, on]
    nmse = float(np.sum((dec - ref) ** 2) / np.sum(ref ** 2))
    assert 0 < nmse < rounding, nmse  # the type's rounding, nothing more
    full, _ = _runtime(typed, prompt, cont, mode="full", vocab=True)
    assert np.array_equal(full, _runtime(plain, prompt, cont, mode="full")[0])


def test_full_mode_and_first_mode(tiny):
    plain, short, listed, prompt, _, cont = tiny
    full, rep = _runtime(short, prompt, cont, mode="full", vocab=True)
    want, _ = _runtime(plain, prompt, cont, mode="full")
    assert np.array_equal(full, want) and rep.vocab is None  # full never uses it
    first, rep = _runtime(short, prompt, cont, mode="first", vocab=True)  # identity routers: every layer
    masked, _ = _runtime(short, prompt, cont, mode="mask", mask=[True] * 4, vocab=True)
    assert rep.skipped == () and rep.vocab is not None and np.array_equal(first, masked)


def test_graph_reuse_never_serves_another_vocabulary_or_other_extras(tiny):
    from first_gguf.runtime import FirstModel

    _, short, _, prompt, other, cont = tiny
    runs = [(True, prompt), (False, prompt), (True, other), (True, prompt), (False, other)]
    fresh = {(v, tuple(p)): _runtime(short, p, cont, mode="mask", mask=[True] * 4, vocab=v)[0] for v, p in runs}
    llm = FirstModel(short, logits_all=True, n_threads=1, n_ctx=128, type_k=GGML_TYPE_F32, type_v=GGML_TYPE_F32,
                     mode="mask", mask=[True] * 4)
    try:
        for v, p in runs:  # one context, switching between sequences
            llm.configure(vocab=v)
            assert np.array_equal(llm.teacher_forced_logits(p, cont), fresh[(v, tuple(p))]), (v, p)
    finally:
        llm.close()


def test_generation_stays_in_the_allowed_tokens_across_turns(tiny):
    from first_gguf.runtime import FirstModel

    _, short, listed, prompt, other, _ = tiny
    llm = FirstModel(short, n_threads=1, n_ctx=128, mode="mask", mask=[True] * 4, vocab=True)
    try:
        out = [int(t) for _, t in zip(range(12), llm.generate(list(prompt), temp=0.0))]
        turn2 = list(prompt) + out + list(other)
        out2 = [int(t) for _, t in zip(range(12), llm.generate(turn2, temp=0.0))]
        rep = llm.last_prefill
    finally:
        llm.close()
    # the first token comes from the prompt's full-vocabulary row; every later one is allowed
    assert set(out[1:]) <= set(listed) | set(prompt)
    assert set(out2[1:]) <= set(listed) | set(turn2)
    assert rep.vocab == len(set(turn2) - set(listed))  # the whole conversation's tokens join


def test_vocab_points_and_bad_input(tiny, tmp_path):
    from first_gguf.runtime import FirstModel

    plain, short, _, prompt, _, cont = tiny
    pts = stamp_points(short, {"default": "short", "points": {"short": {"vocab": True},
                                                               "quick": {"skip": [2], "vocab": True}}},
                       tmp_path / "p.gguf")
    got, rep = _runtime(pts, prompt, cont)  # the default point
    want, _ = _runtime(short, prompt, cont, mode="mask", mask=[True] * 4, vocab=True)
    assert rep.point == "short" and rep.vocab is not None and np.array_equal(got, want)
    got, rep = _runtime(pts, prompt, cont, point="quick")
    want, _ = _runtime(short, prompt, cont, mode="mask", mask=[True, True, False, True], vocab=True)
    assert rep.skipped == (2,) and np.array_equal(got, want)
    with pytest.raises(FirstError, match="point 'quick' sets"):
        FirstModel(pts, point="quick", vocab=False, n_ctx=64)
    with pytest.raises(FirstError, match="no short output vocabulary in this file"):
        FirstModel(plain, mode="mask", mask=[True] * 4, vocab=True, n_ctx=64)
    # thin FFNs and the short vocabulary together (version 3): both act on decode
    both = write_thin(short, {1: np.arange(8)}, tmp_path / "both.gguf")
    got, rep = _runtime(both, prompt, cont, mode="mask", mask=[True] * 4, thin=(1,), vocab=True)
    thin_only, _ = _runtime(both, prompt, cont, mode="mask", mask=[True] * 4, thin=(1,))
    ok = np.isfinite(got[len(prompt)])
    assert rep.thin == (1,) and rep.vocab is not None and not ok.all()
    np.testing.assert_allclose(got[len(prompt):][:, ok], thin_only[len(prompt):][:, ok], rtol=0, atol=ATOL)

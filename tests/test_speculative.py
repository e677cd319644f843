"""Speculative decoding with a FiRST draft (``first_gguf.runtime.speculative``), on the real default model.

The target is the default model at full depth, the draft the same model with spread routers
(a FiRST-GGUF whose routers skip layers in decode), so the draft disagrees now and then and
both branches of the verification run. What must hold: every token of a drafted answer is the
target's own greedy choice given the answer so far (up to the float differences between one
batched evaluation and one token at a time), the statistics count what the target kept, and a
draft with another vocabulary is refused before anything runs.
"""

from __future__ import annotations

import numpy as np
import pytest

from first_gguf.errors import FirstError

pytestmark = pytest.mark.slow

PROMPTS = ("def is_prime(n):\n    \"\"\"Return True if n is a prime number.\"\"\"\n",
           "Write a Python function that returns the squares of a list of numbers.",
           "The capital of France is")


@pytest.fixture(scope="module")
def pair(default_base, default_first):
    from first_gguf.runtime import FirstModel
    from first_gguf.runtime.speculative import FirstDraft

    draft = FirstDraft.open(default_first, mode="first", n_ctx=1024, n_threads=2, max_tokens=4, p_min=0.0)
    target = FirstModel(default_base, mode="full", n_ctx=1024, n_threads=2, draft_model=draft)
    plain = FirstModel(default_base, mode="full", n_ctx=1024, n_threads=2, logits_all=True)
    yield target, draft, plain
    for m in (target, draft.model, plain):
        m.close()


def _generate(llm, prompt: list[int], n: int) -> list[int]:
    out = []
    for tok in llm.generate(prompt, temp=0.0, reset=True):
        if llm.is_eog(tok) or len(out) >= n:
            break
        out.append(tok)
    return out


def test_a_drafted_answer_is_the_targets_greedy_answer(pair):
    target, draft, plain = pair
    draft.reset()
    for text in PROMPTS:
        prompt = target.tokenize(text.encode(), add_bos=True)
        answer = _generate(target, prompt, 48)
        assert len(answer) >= 8
        # the target's logits along the drafted answer, one token at a time (no draft)
        logits = plain.teacher_forced_logits(prompt, answer)[len(prompt) - 1:len(prompt) - 1 + len(answer)]
        chosen = logits[np.arange(len(answer)), answer]
        gap = logits.max(axis=1) - chosen
        assert gap.max() < 0.25, f"{text!r}: token {int(gap.argmax())} is {gap.max():.3f} below the target's best"
        assert (gap == 0).mean() > 0.9
    st = draft.stats
    assert st.calls > 0 and 0 < st.accepted < st.drafted  # some drafts kept, some refused
    assert st.drafted <= 4 * st.calls


def test_the_draft_follows_the_targets_tokens_in_its_cache(pair):
    target, draft, _ = pair
    prompt = target.tokenize(PROMPTS[0].encode(), add_bos=True)
    answer = _generate(target, prompt, 24)
    m = draft.model
    # the draft's cache holds the prompt and the answer up to the last verified step (its drafts beyond)
    cached = [int(t) for t in m.input_ids[:m.n_tokens]]
    full = prompt + answer
    same = next((i for i, (a, b) in enumerate(zip(cached, full)) if a != b), min(len(cached), len(full)))
    assert same >= len(prompt) + len(answer) - 4 - 1
    assert m.last_prefill is not None and m.last_prefill.mode == "first"


def test_a_warmup_under_a_draft_ends_at_a_verified_batch(pair, default_first):
    """A target with a warm-up verifies drafts too: llama.cpp's sampler reads a batch's logits from
    one evaluation, so a batch that crosses the warm-up's end runs at full depth whole; every
    position from the prompt to there has complete KV, the positions after it the mask's."""
    from first_gguf.runtime import FirstModel
    from first_gguf.runtime.kvcache import _kv_key

    _, draft, _ = pair
    mask = [i != 4 for i in range(24)]
    target = FirstModel(default_first, mode="mask", mask=mask, warmup=3, n_ctx=1024, n_threads=2, draft_model=draft)
    try:
        prompt = target.tokenize(PROMPTS[1].encode(), add_bos=True)
        answer = _generate(target, prompt, 32)
        assert len(answer) >= 16 and target.last_prefill.warmup == 3
        first, *rest = target._segments
        assert first.start == 0 and first.kv is None and len(prompt) + 3 <= first.end <= len(prompt) + 3 + 4
        assert rest and all(seg.kv == _kv_key(mask) for seg in rest)
    finally:
        target.close()


def test_a_draft_with_another_vocabulary_is_refused(default_base):
    from first_gguf import models
    from first_gguf.runtime import FirstModel
    from first_gguf.runtime.speculative import FirstDraft

    other = models.fetch("gemma-3-270m")  # 262,144 tokens against the default model's 151,936
    draft = FirstDraft.open(other, mode="full", n_ctx=256)
    try:
        with pytest.raises(FirstError, match="vocabulary") as err:
            FirstModel(default_base, mode="full", n_ctx=256, draft_model=draft)
        assert other.name in str(err.value) and default_base.name in str(err.value)
    finally:
        draft.model.close()


def test_a_draft_with_a_shorter_context_is_refused(default_base):
    from first_gguf.runtime import FirstModel
    from first_gguf.runtime.speculative import FirstDraft

    draft = FirstDraft.open(default_base, mode="full", n_ctx=256)
    try:
        with pytest.raises(FirstError, match="context"):
            FirstModel(default_base, mode="full", n_ctx=512, draft_model=draft)
    finally:
        draft.model.close()


@pytest.mark.parametrize("kwargs, what", [({"max_tokens": 0}, "max_tokens"), ({"p_min": 1.0}, "p_min")])
def test_bad_draft_settings_are_refused(kwargs, what):
    from first_gguf.runtime.speculative import FirstDraft

    with pytest.raises(FirstError, match=what):
        FirstDraft(object(), **kwargs)


def test_draft_point_needs_draft():
    from first_gguf.shipped import open_draft

    with pytest.raises(FirstError, match="--draft-point needs --draft"):
        open_draft(None, "fast", 4)

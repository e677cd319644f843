"""Thin FFN stand-ins in the patched runtime (docs/FORMAT.md sections 3 and 7), on a tiny seeded
qwen2 (f32) converted by the real converter: decode with thin layers against the PyTorch
reference (the prompt at full width, decode with the other neurons of those layers removed),
the prompt and ``full`` bit-identical to the file without thin FFNs, a masked prefill equal to
a plain GGUF whose FFNs were physically thinned, graph reuse across thin sets, KV reuse, points
and bad input. Real converter, real library, no mocks.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

import tiny_ckpt
from first_gguf.convert import convert_hf
from first_gguf.errors import FirstError, FormatError
from first_gguf.format import make_identity_routers, prune_gguf, read_thin, stamp_points, write_thin
from first_gguf.router import decode_hard, prefill
from llama_worker import compare

GGML_TYPE_F32 = 0
PROMPT_TEXT = "def fibonacci(n):\n    if n < 2:\n        return n\n"
CONT_TEXT = " and the answer is forty-two, of course."
NMSE_MAX = 1e-6
THIN = (1, 2)

pytestmark = pytest.mark.usefixtures("torch_one_thread")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory):
    """(HF model, FiRST-GGUF f32, the same with thin FFNs in every layer, kept neurons, prompt, continuation)."""
    work = tmp_path_factory.mktemp("thin")
    model, hf_dir = tiny_ckpt.checkpoint_dir("qwen2", work)
    n_layer, n_embd = model.config.num_hidden_layers, model.config.hidden_size
    n_ff = model.config.intermediate_size
    plain = convert_hf(hf_dir, work / "tiny.first.gguf", routers=make_identity_routers(n_layer, n_embd), outtype="f32")
    rng = np.random.default_rng(5)
    width = n_ff * 3 // 4
    neurons = {i: np.sort(rng.choice(n_ff, width, replace=False)) for i in range(n_layer)}
    thin = write_thin(plain, neurons, work / "tiny.thin.gguf", source="tests: random neurons")
    from first_gguf.runtime import FirstModel

    llm = FirstModel(plain, n_ctx=128, n_threads=1)
    prompt, cont = llm.tokenize(PROMPT_TEXT.encode()), llm.tokenize(CONT_TEXT.encode(), add_bos=False)
    llm.close()
    return model, plain, thin, neurons, prompt, cont


def _runtime(path: Path, prompt, cont, **kw) -> tuple[np.ndarray, object]:
    from first_gguf.runtime import FirstModel

    llm = FirstModel(path, logits_all=True, n_threads=1, n_ctx=128, type_k=GGML_TYPE_F32, type_v=GGML_TYPE_F32, **kw)
    try:
        return llm.teacher_forced_logits(prompt, cont), llm.last_prefill
    finally:
        llm.close()


def _reference(model, neurons: dict, thin: tuple[int, ...], prompt, cont, keep: list[bool]) -> np.ndarray:
    """Rows len(prompt)-1 ...: the prompt at full width, decode with only ``neurons`` in the ``thin`` layers."""
    layers = model.model.layers
    originals = {i: layers[i].mlp.forward for i in thin}

    def thinned(mlp, idx):
        def forward(x):
            z = mlp.act_fn(mlp.gate_proj(x)) * mlp.up_proj(x)
            return torch.nn.functional.linear(z[..., idx], mlp.down_proj.weight[:, idx])
        return forward

    with torch.no_grad():
        pre = prefill(model, None, torch.tensor(prompt))
        try:
            for i in thin:
                layers[i].mlp.forward = thinned(layers[i].mlp, torch.as_tensor(neurons[i]))
            rows = decode_hard(model, pre, torch.tensor(cont[:-1]), keep)[0]
        finally:
            for i, f in originals.items():
                layers[i].mlp.forward = f
    return torch.cat([pre.last_logits, rows]).numpy()


def _decode_rows(logits: np.ndarray, prompt, cont) -> np.ndarray:
    return logits[len(prompt) - 1: len(prompt) - 1 + len(cont)]


@pytest.mark.parametrize("skip", [(), (2,)], ids=["thin-only", "thin-and-skip"])
def test_thin_decode_matches_reference_and_prompt_stays_exact(skip, tiny):
    model, plain, thin, neurons, prompt, cont = tiny
    n_layer = model.config.num_hidden_layers
    keep = [i not in skip for i in range(n_layer)]
    got, rep = _runtime(thin, prompt, cont, mode="mask", mask=keep, thin=THIN)
    assert rep.thin == tuple(i for i in THIN if keep[i]) and rep.skipped == skip
    want = _reference(model, neurons, THIN, prompt, cont, keep)
    _, nmse = compare(f"thin {THIN} skip {skip} vs reference", _decode_rows(got, prompt, cont), want)
    assert nmse < NMSE_MAX
    unthinned, _ = _runtime(thin, prompt, cont, mode="mask", mask=keep)
    plain_skip, _ = _runtime(plain, prompt, cont, mode="mask", mask=keep)
    assert np.array_equal(unthinned, plain_skip)  # no thin set: the file's thin tensors are never read
    n = len(prompt)
    assert np.array_equal(got[:n], unthinned[:n])  # the prompt at full width
    _, apart = compare("thin vs not thin", got[n:], unthinned[n:])
    assert apart > 100 * NMSE_MAX  # the thin FFN really acts on decode


def test_full_and_first_modes(tiny):
    _, plain, thin, _, prompt, cont = tiny
    full_thin, rep = _runtime(thin, prompt, cont, mode="full", thin=THIN)
    full_plain, _ = _runtime(plain, prompt, cont, mode="full")
    assert np.array_equal(full_thin, full_plain) and rep.thin == ()
    # identity routers run every layer: `first` with thin layers decodes as mask mode does
    first, rep_first = _runtime(thin, prompt, cont, mode="first", thin=THIN)
    masked, _ = _runtime(thin, prompt, cont, mode="mask", mask=[True] * len(rep_first.mask), thin=THIN)
    assert rep_first.skipped == () and rep_first.thin == THIN and np.array_equal(first, masked)


def test_masked_prefill_with_every_layer_thin_equals_a_physically_thinned_gguf(tiny, tmp_path):
    _, plain, thin, neurons, prompt, cont = tiny
    n_layer = len(neurons)
    physical = prune_gguf(thin, [], tmp_path / "thinned.gguf", thin=True)
    want, _ = _runtime(physical, prompt, cont, mode="full")
    got, rep = _runtime(thin, prompt, cont, mode="mask", mask=[True] * n_layer, prefill="masked",
                        thin=range(n_layer))
    assert rep.thin == tuple(range(n_layer))
    assert compare("masked prefill, every layer thin vs thinned GGUF", got, want)[0] == 0.0
    # thin layers beside full ones: two FFN widths, which llama.cpp's loaders cannot take
    some = write_thin(plain, {i: neurons[i] for i in THIN}, tmp_path / "some.thin.gguf")
    with pytest.raises(FormatError, match="widths would differ once thinned"):
        prune_gguf(some, [], tmp_path / "mixed.gguf", thin=True)
    assert not (tmp_path / "mixed.gguf").exists()


@pytest.mark.parametrize("qtype, rounding", [("Q8_0", 1e-3), ("IQ4_NL", 0.2)])  # IQ4_NL: 0.095 here
def test_requantized_copies_of_every_neuron_run_only_where_the_reduced_graph_does(tiny, tmp_path, qtype, rounding):
    """first.thin.type with width n_ff (patch 0007 takes w = n_ff): the prompt and `full` read the
    base FFNs bit for bit, decode reads the copies (Q8_0; IQ4_NL, which ggml's CPU backend repacks
    at load, as the default model ships them), and a masked prefill with every layer's copy equals
    a plain GGUF with the copies physically in place."""
    model, plain, _, neurons, prompt, cont = tiny
    n_layer, n_ff = len(neurons), model.config.intermediate_size
    every = {i: np.arange(n_ff) for i in range(n_layer)}
    fast = write_thin(plain, every, tmp_path / "fast.gguf", source="tests: every neuron", qtype=qtype)
    assert read_thin(fast).widths == (n_ff,) * n_layer
    full_fast, _ = _runtime(fast, prompt, cont, mode="full", thin=range(n_layer))
    full_plain, _ = _runtime(plain, prompt, cont, mode="full")
    assert np.array_equal(full_fast, full_plain)
    got, rep = _runtime(fast, prompt, cont, mode="mask", mask=[True] * n_layer, thin=range(n_layer))
    n = len(prompt)
    assert rep.thin == tuple(range(n_layer)) and np.array_equal(got[:n], full_plain[:n])
    _, apart = compare(f"{qtype} copies vs the f32 FFNs in decode", got[n:], full_plain[n:])
    assert 0 < apart < rounding  # the type's rounding, nothing more
    physical = prune_gguf(fast, [], tmp_path / "physical.gguf", thin=True)
    want, _ = _runtime(physical, prompt, cont, mode="full")
    masked, _ = _runtime(fast, prompt, cont, mode="mask", mask=[True] * n_layer, prefill="masked", thin=range(n_layer))
    assert compare(f"masked prefill with the {qtype} copies vs them in place", masked, want)[0] == 0.0


def test_graph_reuse_never_serves_another_thin_set(tiny):
    from first_gguf.runtime import FirstModel

    _, _, thin, neurons, prompt, cont = tiny
    run = [True] * len(neurons)
    sets = [THIN, (), (0,), THIN]
    fresh = {s: _runtime(thin, prompt, cont, mode="mask", mask=run, thin=s)[0] for s in set(sets)}
    llm = FirstModel(thin, logits_all=True, n_threads=1, n_ctx=128, type_k=GGML_TYPE_F32, type_v=GGML_TYPE_F32,
                     mode="mask", mask=run)
    try:
        for s in sets:  # one context, switching sets between sequences
            llm.configure(thin=s)
            assert np.array_equal(llm.teacher_forced_logits(prompt, cont), fresh[s]), s
    finally:
        llm.close()


def _greedy(llm, tokens: list[int], n: int) -> list[int]:
    out = []
    for t in llm.generate(tokens, temp=0.0):
        out.append(int(t))
        if len(out) == n:
            break
    return out


def test_thin_positions_are_recomputed_before_the_next_prefill(tiny):
    from first_gguf.runtime import FirstModel

    _, _, thin, neurons, prompt, _ = tiny
    n_layer = len(neurons)
    # one token per ubatch: a reused prefix and a recomputed one are then bit-identical
    kw = dict(n_threads=1, n_ctx=128, n_ubatch=1, mode="mask", mask=[True] * n_layer, thin=THIN)
    llm = FirstModel(thin, **kw)
    try:
        first = _greedy(llm, list(prompt), 6)  # decoded with thin layers: not the full model's KV
        turn2 = list(prompt) + first + list(prompt)
        second = _greedy(llm, turn2, 6)
        rep = llm.last_prefill
    finally:
        llm.close()
    assert rep.n_evaluated == len(turn2) - len(prompt)  # the prompt reused, the thin positions recomputed
    fresh = FirstModel(thin, **kw)
    try:
        assert second == _greedy(fresh, turn2, 6)
    finally:
        fresh.close()


def test_thin_points_and_bad_input(tiny, tmp_path):
    from first_gguf.runtime import FirstModel

    _, plain, thin, neurons, prompt, cont = tiny
    run = [True] * len(neurons)
    pts = stamp_points(thin, {"default": "lean", "points": {"lean": {"thin": list(THIN)},
                                                             "mid": {"skip": [2], "thin": [1]}}}, tmp_path / "p.gguf")
    got, rep = _runtime(pts, prompt, cont)  # the default point
    want, _ = _runtime(thin, prompt, cont, mode="mask", mask=run, thin=THIN)
    assert rep.point == "lean" and rep.thin == THIN and np.array_equal(got, want)
    got, rep = _runtime(pts, prompt, cont, point="mid")
    want, _ = _runtime(thin, prompt, cont, mode="mask", mask=[i != 2 for i in range(len(run))], thin=(1,))
    assert rep.skipped == (2,) and rep.thin == (1,) and np.array_equal(got, want)
    with pytest.raises(FirstError, match="point 'mid' sets"):
        FirstModel(pts, point="mid", thin=(1,), n_ctx=64)
    with pytest.raises(FirstError, match=r"layers \[1\] have no thin FFN in this file \(it has none\)"):
        FirstModel(plain, mode="mask", mask=run, thin=(1,), n_ctx=64)
    with pytest.raises(FirstError, match=r"thin layers \[\d+\] out of range"):
        FirstModel(thin, mode="mask", mask=run, thin=(len(run) + 3,), n_ctx=64)

"""The patched runtime on the real default model: stock parity, the reduced graph against a
physically pruned GGUF, router decisions against NumPy on llama.cpp's own hidden states,
ubatch splitting, thresholds, multi-turn KV consistency and bad input."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from conftest import spread_routers
from first_gguf.errors import FirstError
from first_gguf.format import prune_gguf
from llama_worker import compare, run_in_subprocess, run_spec

pytestmark = pytest.mark.slow

SKIP = (9, 10, 11, 12, 13, 14)  # the middle block docs/FORMAT.md measures (6 of 24)


def _mask(n_layer: int, skip=SKIP) -> list[bool]:
    return [i not in skip for i in range(n_layer)]


def test_patched_library_on_stock_gguf_equals_stock(default_base, default_tokens, stock_lib, tmp_path):
    prompt, cont = default_tokens
    spec = {"path": str(default_base), "prompt": prompt, "continuation": cont}
    stock = run_in_subprocess(spec, tmp_path, lib_path=stock_lib)["logits"]
    patched = run_spec(spec)["logits"]
    assert compare("patched vs stock, stock GGUF", patched, stock)[0] == 0.0


def test_full_mode_on_first_gguf_equals_stock(default_base, default_first, default_tokens, stock_lib, tmp_path):
    prompt, cont = default_tokens
    stock = run_in_subprocess({"path": str(default_base), "prompt": prompt, "continuation": cont},
                              tmp_path, lib_path=stock_lib)["logits"]
    full = run_spec({"path": str(default_first), "engine": "first", "mode": "full", "prompt": prompt,
                     "continuation": cont})
    assert compare("full mode on FiRST-GGUF vs stock", full["logits"], stock)[0] == 0.0
    assert full["mask"].all()


@pytest.mark.parametrize("skip", [SKIP, (23,), (1, 5, 22)], ids=["middle6", "last", "scattered"])
def test_masked_prefill_equals_pruned_gguf(skip, default_first, default_tokens, stock_lib, tmp_path):
    prompt, cont = default_tokens
    pruned = prune_gguf(default_first, skip, tmp_path / "pruned.gguf")
    want = run_in_subprocess({"path": str(pruned), "prompt": prompt, "continuation": cont},
                             tmp_path, lib_path=stock_lib)["logits"]
    got = run_spec({"path": str(default_first), "engine": "first", "mode": "mask", "mask": _mask(24, skip),
                    "prefill": "masked", "prompt": prompt, "continuation": cont})["logits"]
    assert compare(f"mask {skip} prefill=masked vs stock on pruned GGUF", got, want)[0] == 0.0


def test_mask_prefill_full_keeps_prompt_exact_and_skips_in_decode(default_first, default_tokens):
    prompt, cont = default_tokens
    full = run_spec({"path": str(default_first), "engine": "first", "mode": "full", "prompt": prompt,
                     "continuation": cont})["logits"]
    masked = run_spec({"path": str(default_first), "engine": "first", "mode": "mask", "mask": _mask(24),
                       "prompt": prompt, "continuation": cont})["logits"]
    n = len(prompt)
    assert compare("prompt rows, mask prefill=full vs full", masked[:n], full[:n])[0] == 0.0
    _, nmse = compare("decode rows, mask prefill=full vs full", masked[n:], full[n:])
    assert nmse > 1e-4  # six skipped layers change the continuation's logits


def _layer_inputs(path: Path, prompt: list[int], n_layer: int, n_ubatch: int = 512) -> list[np.ndarray]:
    """Hidden state entering each layer for every prompt token, from llama.cpp itself."""
    from llama_cpp import Llama

    from first_gguf.runtime._lib import layer_input_fns

    set_inp, get_inp = layer_input_fns()
    llm = Llama(str(path), n_ctx=512, n_threads=2, verbose=False, n_batch=512, n_ubatch=n_ubatch)
    for il in range(n_layer):
        set_inp(llm._ctx.ctx, il, True)
    llm.eval(prompt)
    n_embd = llm.n_embd()
    return [np.ctypeslib.as_array(get_inp(llm._ctx.ctx, il), shape=(len(prompt) * n_embd,))
            .reshape(len(prompt), n_embd).copy() for il in range(n_layer)]


def _numpy_probs(routers, hidden: list[np.ndarray]) -> np.ndarray:
    out = []
    for il, h in enumerate(hidden):
        t = routers.tensors[il]
        x = h.astype(np.float64)
        x = x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + routers.norm_eps) * t["norm"]
        z = x @ t["in_weight"].T.astype(np.float64) + t["in_bias"]
        z = z / (1.0 + np.exp(-z))
        logit = z @ t["out_weight"].T.astype(np.float64) + t["out_bias"]
        out.append(np.mean(1.0 / (1.0 + np.exp(-logit))))
    return np.array(out)


def test_router_probs_equal_numpy_on_llama_hidden_states(default_first, default_tokens):
    prompt, _ = default_tokens
    routers = spread_routers(24, 896)
    want = _numpy_probs(routers, _layer_inputs(default_first, prompt, 24))
    got = run_spec({"path": str(default_first), "engine": "first", "mode": "first", "prompt": prompt})
    err = np.abs(got["probs"] - want)
    print("p_i (llama.cpp):", np.round(got["probs"], 4), "\nmax |diff| vs NumPy:", err.max())
    assert err.max() < 1e-4
    expected_mask = (want >= 0.5) | np.isin(np.arange(24), [0, 23])
    near = np.abs(want - 0.5) < 1e-3
    assert np.array_equal(got["mask"][~near], expected_mask[~near])
    assert 0 < (~expected_mask).sum() < 22, "the spread routers should skip some but not all layers"


@pytest.mark.parametrize("n_ubatch", [1, 7, 16])
def test_mask_is_the_same_however_the_prompt_is_split(n_ubatch, default_first, default_tokens):
    # The router sums must run over every ubatch and every llama_decode call of the prefill
    # (n_batch splits the prompt into several calls). llama.cpp's own hidden states differ
    # slightly with the ubatch size (other matmul kernels), so p is checked against NumPy on
    # the hidden states of the same split, and the mask against the unsplit one.
    prompt, _ = default_tokens
    routers = spread_routers(24, 896)
    whole = run_spec({"path": str(default_first), "engine": "first", "mode": "first", "prompt": prompt})
    split = run_spec({"path": str(default_first), "engine": "first", "mode": "first", "prompt": prompt,
                      "n_ubatch": n_ubatch, "n_batch": max(n_ubatch, 5)})
    want = _numpy_probs(routers, _layer_inputs(default_first, prompt, 24, n_ubatch=n_ubatch))
    err = np.abs(split["probs"] - want).max()
    drift = np.abs(split["probs"] - whole["probs"])
    print(f"n_ubatch={n_ubatch}: max |p - NumPy(same split)| {err:.2e}, max |p - p(unsplit)| {drift.max():.2e}")
    assert err < 1e-4
    near = np.abs(whole["probs"] - 0.5) < 1e-2
    assert np.array_equal(split["mask"][~near], whole["mask"][~near])


def test_one_token_prompt(default_first):
    from first_gguf.runtime import FirstModel

    llm = FirstModel(default_first, n_ctx=256, n_threads=2)
    out = llm.create_completion(" ", max_tokens=4, temperature=0.0)
    rep = llm.last_prefill
    assert rep.n_tokens >= 1 and rep.probs is not None and rep.mask[0] and rep.mask[-1]
    assert out["usage"]["completion_tokens"] >= 1


def test_thresholds_0_1_and_p_itself(default_first, default_tokens):
    from first_gguf.runtime import FirstModel

    prompt, _ = default_tokens
    llm = FirstModel(default_first, n_ctx=512, n_threads=2, logits_all=True)
    llm.teacher_forced_logits(prompt, [])
    probs = np.array(llm.last_prefill.probs)
    llm.configure(threshold=0.0)
    llm.teacher_forced_logits(prompt, [])
    assert all(llm.last_prefill.mask)
    llm.configure(threshold=1.0)
    llm.teacher_forced_logits(prompt, [])
    assert llm.last_prefill.skipped == tuple(i for i in range(24) if i not in (0, 23) and probs[i] < 1.0)
    k = int(np.argsort(probs[1:23])[11]) + 1  # a middle layer; threshold = its own p: it runs (>=)
    llm.configure(threshold=float(np.float32(probs[k])))
    llm.teacher_forced_logits(prompt, [])
    rep = llm.last_prefill
    assert rep.mask[k] and rep.threshold == pytest.approx(probs[k])
    assert all(rep.mask[i] == (probs[i] >= probs[k] or i in (0, 23)) for i in range(24))
    llm.reset_threshold()
    llm.teacher_forced_logits(prompt, [])
    assert llm.last_prefill.threshold == pytest.approx(0.5)


@pytest.mark.parametrize("mode", ["full", "mask", "first"])
def test_continuation_logits_equal_teacher_forced_rows(mode, default_first, default_tokens):
    from first_gguf.runtime import FirstModel

    prompt, cont = default_tokens
    llm = FirstModel(default_first, n_ctx=512, n_threads=2, logits_all=True, mode=mode,
                     mask=_mask(24) if mode == "mask" else None)
    want = llm.teacher_forced_logits(prompt, cont)[len(prompt) - 1: len(prompt) - 1 + len(cont)]
    got = llm.continuation_logits(prompt, cont)
    assert got.shape == (len(cont), llm.n_vocab())
    assert compare(f"continuation_logits vs teacher_forced rows ({mode})", got, want)[0] == 0.0
    assert llm.continuation_logits(prompt, cont[:1]).shape == (1, llm.n_vocab())


def test_branches_of_one_fork_equal_their_own_prefill(default_first, default_tokens):
    """One full-depth prefill scores every full-depth strategy: each branch equals that
    strategy's own prefill + decode, bit for bit, in any order, configuration untouched."""
    from first_gguf.runtime import FirstModel

    prompt, cont = default_tokens
    llm = FirstModel(default_first, n_ctx=512, n_threads=2, logits_all=True)
    probs = np.array(llm.fork(prompt).probs)
    thr = float(np.float32(np.sort(probs[1:23])[8]))  # cuts the middle of the spread: skips some layers
    got = {"router@file": llm.branch_logits(cont), "block": llm.branch_logits(cont, _mask(24)),
           "full": llm.branch_logits(cont, [True] * 24), "router@thr": llm.branch_logits(cont, llm.router_mask(thr))}
    again = llm.branch_logits(cont, _mask(24))
    assert llm.mode == "first" and llm.mask is None
    assert compare("branch repeated", again, got["block"])[0] == 0.0
    masks = {"router@file": llm.last_prefill.mask, "router@thr": llm.router_mask(thr)}
    assert 0 < masks["router@thr"].count(False) and masks["router@thr"] != masks["router@file"]

    want = {"router@file": llm.continuation_logits(prompt, cont)}
    llm.configure(threshold=thr)
    want["router@thr"] = llm.continuation_logits(prompt, cont)
    assert llm.last_prefill.mask == masks["router@thr"]  # router_mask is the runtime's own rule
    llm.configure(mode="mask", mask=_mask(24))
    want["block"] = llm.continuation_logits(prompt, cont)
    llm.configure(mode="full")
    want["full"] = llm.continuation_logits(prompt, cont)
    for name in want:
        assert compare(f"branch vs own prefill ({name})", got[name], want[name])[0] == 0.0
    assert np.abs(got["block"] - got["full"]).max() > 0.1  # the masks do change the logits


GEMMA_BRANCHES = """
import json, sys
import numpy as np
from first_gguf.runtime import FirstModel
from first_gguf.runtime.greedy import greedy
llm = FirstModel(sys.argv[1], mode="full", logits_all=True, n_ctx=128, n_threads=2)
prompt = llm.tokenize(b"def add(a, b):\\n    return", add_bos=True)
cont = greedy(llm, prompt, 24, eog=False).tokens
n = llm.n_layer
llm.fork(prompt)
got = {sk: llm.branch_logits(cont, [i != sk for i in range(n)]) for sk in (1, 5, 2, 11)}
out = {}
for sk, x in got.items():
    llm.configure(mode="mask", mask=[i != sk for i in range(n)], prefill="full")
    ref = llm.teacher_forced_logits(prompt, cont[:-1])[len(prompt) - 1:]
    out[sk] = float(np.abs(ref - x).max())
print(json.dumps(out))
"""


def test_branches_across_local_and_global_layers_of_gemma3():
    """Gemma 3 interleaves sliding-window and global layers: reduced graphs of one size with
    another skipped layer differ in topology, not in node count. Branches of one fork across
    such masks (a local layer, then a global one, and back) equal their own prefill and decode
    bit for bit (the allocator once kept a stale plan there and crashed: patch 0010). In a
    subprocess, so that a crash fails this test alone."""
    import json
    import subprocess
    import sys

    from first_gguf import models

    run = subprocess.run([sys.executable, "-c", GEMMA_BRANCHES, str(models.fetch("gemma-3-270m"))],
                         capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-2000:]
    diffs = json.loads(run.stdout.strip().splitlines()[-1])
    assert diffs == {"1": 0.0, "5": 0.0, "2": 0.0, "11": 0.0}


def test_branch_of_masked_fork_and_bad_branches(default_first, default_tokens):
    from first_gguf.runtime import FirstModel

    prompt, cont = default_tokens
    llm = FirstModel(default_first, n_ctx=512, n_threads=2, logits_all=True, mode="mask", mask=_mask(24),
                     prefill="masked")
    with pytest.raises(FirstError, match="fork"):
        llm.branch_logits(cont)
    llm.fork(prompt)
    pruned = llm.branch_logits(cont)
    with pytest.raises(FirstError, match=r"only the layers it ran \(it skipped \[9, 10, 11, 12, 13, 14\]\)"):
        llm.branch_logits(cont, [True] * 24)
    assert compare("masked fork vs own prefill", pruned, llm.continuation_logits(prompt, cont))[0] == 0.0
    with pytest.raises(FirstError, match="25 entries"):
        llm.branch_logits(cont, [True] * 25)
    with pytest.raises(FirstError, match="router_mask needs a prefill in 'first' mode"):
        llm.router_mask(0.5)
    llm.configure(mode="full")
    llm.prefill(prompt[:5])  # another sequence since the fork
    with pytest.raises(FirstError, match="no longer holds the fork's prompt"):
        llm.branch_logits(cont)
    with pytest.raises(FirstError, match=r"logits_all=True"):
        FirstModel(default_first, n_ctx=256, n_threads=2).fork(prompt)


def _chat(llm, turns: list[str], fresh) -> list[str]:
    msgs, answers = [], []
    for text in turns:
        msgs.append({"role": "user", "content": text})
        model = fresh() if fresh else llm
        r = model.create_chat_completion(msgs, max_tokens=24, temperature=0.0, seed=0)
        answer = r["choices"][0]["message"]["content"]
        answers.append((answer, model.last_prefill.mask))
        msgs.append({"role": "assistant", "content": answer})
    return answers


def test_three_turn_chat_equals_recomputing_the_conversation(default_first):
    from first_gguf.runtime import FirstModel

    # llama.cpp's numerics depend on how tokens are grouped into ubatches (other kernels), so
    # one token per ubatch makes a reused prefix and a recomputed one bit-identical; what is
    # left to differ is exactly what this test is about: masks, router means and KV reuse.
    turns = ["Write a Python function that reverses a string.", "Now make it recursive.", "Add a docstring."]
    kw = dict(n_ctx=2048, n_threads=2, n_batch=64, n_ubatch=1)
    llm = FirstModel(default_first, **kw)
    incremental = _chat(llm, turns, None)
    recomputed = _chat(None, turns, lambda: FirstModel(default_first, **kw))
    for i, ((a, ma), (b, mb)) in enumerate(zip(incremental, recomputed)):
        print(f"turn {i}: skipped {[j for j, m in enumerate(ma) if not m]}")
        assert ma == mb, f"turn {i}: masks differ"
        assert a == b, f"turn {i}: {a!r} != {b!r}"
    # the cache was reused: the last prefill evaluated fewer positions than it routed over
    assert llm.last_prefill.n_evaluated < llm.last_prefill.n_tokens
    # and no position decoded under a mask survived into the next prefill
    kept = [s for s in llm._segments if s.sums is not None]
    assert all(s.kv is None for s in kept)


def test_bad_input_is_a_clear_error(default_base, default_first, tmp_path):
    from first_gguf.format import attach_routers
    from first_gguf.runtime import FirstModel

    llm = FirstModel(default_first, n_ctx=256, n_threads=2)
    with pytest.raises(FirstError, match="mask has 23 entries; the model has 24 layers"):
        llm.configure(mode="mask", mask=[True] * 23)
    with pytest.raises(FirstError, match="skips every layer"):
        llm.configure(mode="mask", mask=[False] * 24)
    with pytest.raises(FirstError, match=r"threshold 1.5 outside \[0, 1\]"):
        llm.configure(threshold=1.5)
    with pytest.raises(FirstError, match="unknown mode"):
        llm.configure(mode="fast")
    plain = FirstModel(default_base, n_ctx=256, n_threads=2)
    assert plain.mode == "full" and not plain.has_routers
    with pytest.raises(FirstError, match="not a FiRST-GGUF"):
        plain.configure(mode="first")
    nan = spread_routers(24, 896)
    nan.tensors[5]["in_weight"][0, 0] = np.nan
    bad = tmp_path / "nan.first.gguf"
    with pytest.raises(FirstError, match="layer 5"):
        attach_routers(default_base, nan, bad)
    assert not bad.exists()


def _write_unchecked(base: Path, routers, out: Path) -> Path:
    """A FiRST-GGUF written without attach's validation: how a broken file reaches a user."""
    from first_gguf.format import read_header
    from first_gguf.format.attach import write_gguf
    from first_gguf.format.routers import router_arrays

    reader = read_header(base)
    arch = reader.fields["general.architecture"].contents()
    write_gguf(reader, arch, routers.metadata(), router_arrays(routers, "f32"), out)
    return out


@pytest.mark.parametrize("kind", ["nan", "shape"])
def test_broken_router_tensors_are_refused_before_loading(kind, default_base, tmp_path):
    from first_gguf.runtime import FirstModel

    routers = spread_routers(24, 896)
    if kind == "nan":
        routers.tensors[5]["in_weight"][0, 0] = np.nan
        pattern = r"layer 5.*first_router_in.weight.*(NaN|non-finite)"
    else:
        routers.tensors[7]["in_bias"] = np.zeros(32, dtype=np.float32)
        pattern = r"layer 7.*first_router_in.bias.*shape"
    bad = _write_unchecked(default_base, routers, tmp_path / f"{kind}.first.gguf")
    with pytest.raises(FirstError, match=pattern) as err:
        FirstModel(bad, n_ctx=256, n_threads=2)
    assert bad.name in str(err.value)


def _stepwise(llm, prompt, cont) -> np.ndarray:
    llm.prefill(prompt)
    for t in cont:  # one token per decode: the graph of the previous step is reused when allowed
        llm.eval([t])
    return np.array(llm.scores[: llm.n_tokens], dtype=np.float32)


def test_graph_reuse_never_serves_another_mask(default_first, default_tokens):
    from first_gguf.runtime import FirstModel

    prompt, cont = default_tokens
    cont = cont[:6]
    a, b = _mask(24, (9, 10)), _mask(24, (15, 16, 17))
    kw = dict(n_ctx=512, n_threads=2, logits_all=True)
    shared = FirstModel(default_first, mode="mask", mask=a, **kw)
    got_a = _stepwise(shared, prompt, cont)
    shared.configure(mask=b)
    got_b = _stepwise(shared, prompt, cont)
    shared.configure(mode="first")
    got_first = _stepwise(shared, prompt, cont)
    want_a = _stepwise(FirstModel(default_first, mode="mask", mask=a, **kw), prompt, cont)
    want_b = _stepwise(FirstModel(default_first, mode="mask", mask=b, **kw), prompt, cont)
    want_first = _stepwise(FirstModel(default_first, mode="first", **kw), prompt, cont)
    assert compare("mask A, shared context", got_a, want_a)[0] == 0.0
    assert compare("mask B after A, shared context", got_b, want_b)[0] == 0.0
    assert compare("first after masks, shared context", got_first, want_first)[0] == 0.0
    assert compare("A vs B (must differ)", got_a[len(prompt):], got_b[len(prompt):])[1] > 1e-4


def test_bench_json_has_every_strategy(default_first):
    from first_gguf.bench import run_bench

    res = run_bench(default_first, skip_count=6, repeats=1, ctx=[16], decode_tokens=4, threads=[2])
    (cell,) = res["cells"]
    strategies = cell["strategies"]
    assert {"full", "first", "mask", "pruned", "pruned_patched", "stock", "patched_plain"} == set(strategies)
    for name, r in strategies.items():
        assert r["decode_tok_s"] > 0 and r["prefill_tok_s"] > 0 and r["peak_rss_mb"] > 0, name
    assert strategies["mask"]["skipped_layers"] == list(SKIP)
    assert strategies["pruned"]["skipped_layers"] == list(SKIP)
    assert strategies["full"]["skipped_layers"] == []
    assert set(cell["pairs"]) == {"mask/pruned", "full/stock", "patched_plain/stock", "pruned_patched/pruned"}
    routed = strategies["first"]["skipped_layers"]
    assert routed and 0 not in routed and 23 not in routed  # the spread routers skip some layers

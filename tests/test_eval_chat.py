"""``humaneval-chat``: HumanEval through the model's chat template, code extracted from the answer.

Units: the stop rule and the extraction on answers shaped like a chat model's, each scored in
the sandbox against the real problem. Slow: ``first-gguf eval --tasks humaneval-chat`` on the
default model, alone and beside raw HumanEval.
"""

from __future__ import annotations

import json

import pytest

from first_gguf.evaluation import humaneval
from first_gguf.evaluation.humaneval_chat import block_closed, extract_code, program, user_message

PROBLEMS = {p.task_id: p for p in humaneval.load_problems(11)}
P0, P10 = PROBLEMS["HumanEval/0"], PROBLEMS["HumanEval/10"]
BODY0 = P0.canonical_solution
FULL0 = P0.prompt + BODY0  # with its `from typing import List`
BARE0 = FULL0.replace("from typing import List\n", "")  # the def alone: uses List, imports nothing


def _outcomes(problem, answers):
    codes = [extract_code(a) for a in answers]
    return [o.status for o in humaneval.score([problem] * len(codes), codes, build=program)]


def test_user_message_fences_the_prompt():
    msg = user_message(P0)
    assert msg.startswith("Please provide a self-contained Python script that solves the following problem "
                          "in a markdown code block:\n```python\nfrom typing import List")
    assert msg.endswith('    """\n```\n')


@pytest.mark.parametrize("answer, code", [
    ("Sure:\n```python\nx = 1\n```\nIt sets x.", "x = 1\n"),
    ("```\nx = 1\n```", "x = 1\n"),                              # no language tag
    ("```Python3 title\nx = 1\n```\n", "x = 1\n"),               # tag case and extra words
    ("x = 1\n", "x = 1\n"),                                      # no fence: the whole answer
    ("Install:\n```bash\npip install y\n```\nThen:\n```python\nx = 1\n```", "x = 1\n"),  # another language first
    ("```python\nx = 1\n```\nor\n```python\nx = 2\n```", "x = 1\n"),   # the first block only
    ("```python\nx = 1\ny =", "x = 1\ny ="),                     # never closed (budget spent): to the end
    ("```text\nno code\n```", "```text\nno code\n```"),          # no Python block: the whole answer
])
def test_extract_code(answer, code):
    assert extract_code(answer) == code


def test_stop_rule_fires_when_the_first_python_block_closes():
    answer = "Run:\n```bash\npip install y\n```\nCode:\n```python\nx = 1\n```\nMore text"
    closes = answer.index("```\nMore") + 3
    assert [n for n in range(len(answer) + 1) if block_closed(answer[:n])][0] == closes
    assert not block_closed("```python\nx = 1\n``")
    assert block_closed("```python\nx = 1\n```\n\n")  # a closing token that carries newlines


def test_extracted_answers_run_against_the_tests():
    answers = [
        f"Here is the function:\n\n```python\n{FULL0}```\n\nIt compares every pair.",   # tagged fence
        f"```\n{FULL0}```",                                                              # untagged fence
        FULL0,                                                                           # no fence at all
        f"```python\n{BARE0}```",                       # omits the import: the prompt's header supplies it
        f"```python\n{BODY0}```",                       # the body alone: it follows the whole prompt
        f"```python\n{BARE0}\nprint(has_close_elements([1.0, 2.0], 0.5))\n```",  # example usage runs too
        "```python\ndef has_close_elements(numbers, threshold):\n    return False\n```",  # wrong: fails
        "```python\ndef has_close_elements(numbers, threshold):\n    return (\n```",     # unfinished: fails
    ]
    assert _outcomes(P0, answers) == ["passed"] * 6 + ["failed"] * 2


def test_helpers_the_prompt_gives_or_the_answer_redefines():
    """HumanEval/10's prompt defines is_palindrome before make_palindrome: an answer may use it or
    redefine it (here with a wrong one, which then is the one that runs)."""
    body = P10.canonical_solution
    make = P10.prompt[P10.prompt.index("def make_palindrome"):] + body
    helper = P10.prompt[:P10.prompt.index("def make_palindrome")]
    wrong = "def is_palindrome(string: str) -> bool:\n    return True\n\n\n"
    answers = [f"```python\n{make}```", f"```python\n{helper}{make}```", f"```python\n{wrong}{make}```"]
    assert _outcomes(P10, answers) == ["passed", "passed", "failed"]


def test_every_canonical_solution_passes_as_a_chat_answer():
    """All 164: the entry point's def is found in every prompt, and the header before it suffices."""
    problems = humaneval.load_problems()
    codes = [extract_code(f"Solution:\n```python\n{p.prompt}{p.canonical_solution}```\n") for p in problems]
    assert all(o.passed for o in humaneval.score(problems, codes, build=program))

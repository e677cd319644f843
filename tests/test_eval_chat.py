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


def test_summary_and_report_carry_the_chat_task():
    """pass@1 per strategy in the summary, a "pass@1 (chat)" column, the sign tests of the chat task."""
    from first_gguf.evaluation import runner
    from first_gguf.evaluation.results import format_report
    from first_gguf.evaluation.strategies import Strategy
    from first_gguf.evaluation.summary import SCORED, summarize

    assert tuple(runner.SCORED_TASKS) == SCORED and "humaneval-chat" in runner.TASKS
    assert runner.EvalConfig(model="m").tasks == ("humaneval", "tf", "chat")  # the default stays

    def row(pid, strategy, status):
        return {"task": "humaneval-chat", "id": pid, "strategy": strategy, "family": "humaneval-chat", "run": "a",
                "n_prompt": 150, "t_prefill": 1.0, "n_decode": 100, "t_decode": 5.0, "skipped": [],
                "status": status}

    strategies = [Strategy("full", "full", "full"), Strategy("first@0.5", "first", "first", threshold=0.5)]
    rows = [row("p0", "full", "passed"), row("p1", "full", "passed"), row("p2", "full", "failed"),
            row("p0", "first@0.5", "passed"), row("p1", "first@0.5", "failed"), row("p2", "first@0.5", "failed")]
    meta = {"model": "m.gguf", "config": {"max_new_tokens": 384, "timeout": 10.0, "n_per_family": 1,
                                          "max_prompt_tokens": 96, "cont_tokens": 8, "n_chat": 1, "chat_tokens": 8},
            "n_layer": 4, "protected": [0, 3], "threads": 1, "machine": "m", "date": "d", "static_order": [1, 2],
            "strategies": {s.name: {"kind": s.kind, "skip": list(s.skip)} for s in strategies}}
    result = summarize(rows, strategies, meta)
    chat = result["summary"]["first@0.5"]["humaneval-chat"]
    assert chat["pass@1"] == pytest.approx(1 / 3) and chat["passed"] == {"first@0.5": ["p0"]}
    assert "humaneval" not in result["summary"]["full"]
    assert result["summary"]["first@0.5"]["speed"]["decode_x"] == 1.0  # chat rows pair with full's for speeds
    report = format_report(result)
    assert "| pass@1 (chat) | of full |" in report
    assert "| full | 0.00 / - | - | - | 0.667 (2/3) | 100% |" in report
    assert "| first@0.5 | 0.00 / - | - | - | 0.333 (1/3) | 50% |" in report
    assert "HumanEval (chat) problem by problem" in report and "| first@0.5 | full | 0 | 1 | 1.000 |" in report
    assert "HumanEval: " not in report  # no raw HumanEval rows, no line about them


# --- the real default model ------------------------------------------------------------------

@pytest.mark.slow
def test_chat_prompt_is_the_models_own_template():
    """Qwen2.5-Coder's template supplies its card's system prompt when the request brings none."""
    from first_gguf import models, shipped
    from first_gguf.evaluation.items import humaneval_chat_items
    from first_gguf.runtime import FirstModel

    llm = FirstModel(str(shipped.first_gguf_path(models.DEFAULT_MODEL)), n_ctx=512, n_threads=1)
    try:
        item = humaneval_chat_items(llm, 1)[0]
        text = llm.detokenize(item.prompt, special=True).decode()
        assert item.restated == len(llm.tokenize(P0.prompt.encode(), add_bos=False))
    finally:
        llm.close()
    assert text == ("<|im_start|>system\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant."
                    f"<|im_end|>\n<|im_start|>user\n{user_message(P0)}<|im_end|>\n<|im_start|>assistant\n")


@pytest.mark.slow
def test_eval_humaneval_chat_alone_then_beside_raw_humaneval(tmp_path):
    """`first-gguf eval --tasks humaneval-chat --limit 2 --strategies full --threads 1` on the default
    model: the answers stop at their code block's close, the extracted programs run in the sandbox;
    a later command adds raw HumanEval to the same directory and reuses the chat rows."""
    from first_gguf.evaluation.runner import run_eval

    out = tmp_path / "run"
    opts = dict(limit=2, kinds=("full",), threads=1, n_static=1)
    result, report = run_eval(None, out, tasks=("humaneval-chat",), **opts)
    rows = [json.loads(line) for line in (out / "rows.jsonl").read_text().splitlines()]
    scored = [r for r in rows if "status" in r]
    assert sorted((r["task"], r["id"], r["strategy"]) for r in scored) == [
        ("humaneval-chat", "HumanEval/0", "full"), ("humaneval-chat", "HumanEval/1", "full")]
    for r in scored:
        problem = PROBLEMS[r["id"]]
        assert r["status"] in ("passed", "failed"), r
        assert r["text"].rstrip().endswith("```") and block_closed(r["text"])  # stopped at the close
        assert "```" not in r["completion"] and f"def {problem.entry_point}(" in r["completion"]
        compile(program(problem, r["completion"]), r["id"], "exec")  # a real program, not an extraction error
    chat = result["summary"]["full"]["humaneval-chat"]
    assert chat["n"] == 2 and "humaneval" not in result["summary"]["full"]
    assert "| pass@1 (chat) |" in report.read_text()

    result, _ = run_eval(None, out, tasks=("humaneval", "humaneval-chat"), **opts)
    now = [json.loads(line) for line in (out / "rows.jsonl").read_text().splitlines()]
    assert now[:len(rows)] == rows and {r["task"] for r in now[len(rows):]} == {"humaneval"}
    full = result["summary"]["full"]
    assert full["humaneval"]["n"] == 2 and full["humaneval-chat"] == chat

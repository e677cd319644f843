"""HumanEval as users run an instruct model: the chat template, a request, a code block back.

The request is evalplus's instruction (``evalplus/codegen.py``, ``instruction_prefix``) with the
problem's prompt in a ```python fence, as OpenCodeEval's chat HumanEval runs it (its
``--prompt_prefix``/``--prompt_suffix``; evalplus's own bare fence made the 0.5B coder echo a
stray ``python`` line into its code). It is the only user message, through the GGUF's own chat
template with the generation prompt. No system message: the template's default applies, and
Qwen2.5's is its model card's ("You are Qwen, created by Alibaba Cloud. You are a helpful
assistant."). Unlike evalplus, nothing is forced into the assistant turn: the model answers as
it would in a chat.

Generation stops when the first Python code block closes (:func:`block_closed`); the code
scored is that block (:func:`extract_code`), run with the problem's tests by :func:`program`.
The answer restates the signature and docstring that raw completion gets in its prompt, so its
budget is the raw budget plus the prompt's tokens (the runner's ``budget``).
"""

from __future__ import annotations

import re

from . import humaneval
from .humaneval import Problem

INSTRUCTION = ("Please provide a self-contained Python script that solves the following problem "
               "in a markdown code block:")

# A fence opens a block: ``` and an info string, whose first word picks the language. Blocks
# tagged with another language (```bash, ```text) are passed over; untagged ones count as Python.
_FENCE = re.compile(r"^[ \t]*```[ \t]*([\w+-]*)[^\n]*$", re.M)
_PYTHON = {"", "python", "python3", "py"}


def user_message(problem: Problem) -> str:
    """The request for ``problem``: the instruction, then its prompt in a Python fence."""
    return f"{INSTRUCTION}\n```python\n{problem.prompt.strip()}\n```\n"


def _python_block(text: str) -> tuple[str, bool] | None:
    """The first Python block of ``text`` and whether it closed; None when no Python block opens.

    Fences pair up in order (open, close, open, ...), as Markdown reads them.
    """
    fences = list(_FENCE.finditer(text))
    for i in range(0, len(fences), 2):
        if fences[i].group(1).lower() in _PYTHON:
            start = fences[i].end() + 1
            if i + 1 < len(fences):
                return text[start:fences[i + 1].start()], True
            return text[start:], False
    return None


def block_closed(text: str) -> bool:
    """The stop rule: True once the first Python code block of an answer has closed."""
    block = _python_block(text)
    return block is not None and block[1]


def extract_code(answer: str) -> str:
    """The code of an answer: its first Python code block (to the end if the block never closed),
    else the whole answer (a model that replied with bare code)."""
    block = _python_block(answer)
    return answer if block is None else block[0]


def _def(name: str, code: str) -> re.Match | None:
    return re.search(rf"^def[ \t]+{re.escape(name)}[ \t]*\(", code, re.M)


def program(problem: Problem, code: str) -> str:
    """The script that passes iff the extracted ``code`` solves ``problem``.

    Code that defines the entry point at top level runs after the prompt's header (what precedes
    the entry point's ``def`` there: its imports and any helper the problem gives), which the code
    may redefine. Code that does not is taken as the function's body and follows the whole prompt,
    as a raw completion would. Both as DeepSeek-Coder's instruct HumanEval does
    (``Evaluation/HumanEval/utils/utils.py``, ``extract_generation_code``).
    """
    if _def(problem.entry_point, code) is None:
        return humaneval.program(problem, code)
    given = _def(problem.entry_point, problem.prompt)
    header = problem.prompt[:given.start()] if given else ""
    return humaneval.with_tests(problem, header + code)

"""The items of each evaluation task: HumanEval problems and built-in prompts on llama.cpp's tokenizer.

The prompts are ``first_gguf.prompts``' built-in families (never HumanEval): held-out ones
for the ``tf`` and ``chat`` tasks, training ones for the static strategy's block influence.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Sequence

from ..errors import FirstError
from ..prompts import FAMILIES, Example, Limits, builtin_examples
from . import doctests, humaneval, humaneval_chat


@dataclass
class Item:
    """One unit of work of a task: a prompt (and what is compared on it)."""

    task: str
    id: str
    prompt: list[int]
    family: str = ""
    response: list[int] = field(default_factory=list)   # tf: the real continuation (perplexity)
    problem: Any = None                                  # humaneval tasks: the Problem
    restated: int = 0                                    # humaneval-chat: the problem prompt's tokens, which
                                                         # the answer restates: added to the budget


class LlamaTokenizer:
    """The slice of the HF tokenizer interface ``prompts.py`` uses, on a ``FirstModel``."""

    def __init__(self, llm) -> None:
        from llama_cpp.llama_chat_format import Jinja2ChatFormatter

        self.llm = llm
        template = llm.metadata.get("tokenizer.chat_template")
        self.chat_template = template
        self._chat = None
        if template:
            eos = llm.token_text(llm.token_eos()) if llm.token_eos() >= 0 else ""
            bos = llm.token_text(llm.token_bos()) if llm.token_bos() >= 0 else ""
            self._chat = Jinja2ChatFormatter(template, eos_token=eos, bos_token=bos, add_generation_prompt=True)

    def __call__(self, text: str, add_special_tokens: bool = True) -> dict:
        return {"input_ids": self.llm.tokenize(text.encode(), add_bos=add_special_tokens, special=True)}

    def apply_chat_template(self, messages: list[dict], tokenize: bool = False,
                            add_generation_prompt: bool = True) -> str:
        if self._chat is None:
            raise FirstError(f"{self.llm.model_path}: the GGUF has no chat template")
        return self._chat(messages=messages).prompt


def training_prompts(llm, n_per_family: int, max_prompt: int, seed: int) -> list[Example]:
    """Training prompts of every family (the static strategy's block influence is measured on them)."""
    limits = Limits(max_prompt, 2, llm.n_ctx())
    return builtin_examples(LlamaTokenizer(llm), limits, FAMILIES, n_per_family, seed=seed, split="train")


def humaneval_items(llm, limit: int | None) -> list[Item]:
    """The first ``limit`` HumanEval problems (all when None), prompts tokenized by ``llm``."""
    return [Item("humaneval", p.task_id, llm.tokenize(p.prompt.encode(), add_bos=True), "humaneval", problem=p)
            for p in humaneval.load_problems(limit)]


def doctest_items(llm, limit: int | None) -> list[Item]:
    """The first ``limit`` checked standard-library doctest problems (all when None; ``doctests``)."""
    return [Item("doctest", p.task_id, llm.tokenize(p.prompt.encode(), add_bos=True), "doctest", problem=p)
            for p in doctests.load_problems(limit)]


def humaneval_chat_items(llm, limit: int | None) -> list[Item]:
    """The first ``limit`` HumanEval problems as chat requests (``humaneval_chat``) in the GGUF's template."""
    tok = LlamaTokenizer(llm)
    out = []
    for p in humaneval.load_problems(limit):
        text = tok.apply_chat_template([{"role": "user", "content": humaneval_chat.user_message(p)}])
        out.append(Item("humaneval-chat", p.task_id, tok(text)["input_ids"], "humaneval-chat", problem=p,
                        restated=len(llm.tokenize(p.prompt.encode(), add_bos=False))))
    return out


def _heldout(tok, families: Sequence[str], n: int, max_prompt: int, max_response: int, seed: int) -> list[Example]:
    limits = Limits(max_prompt, max_response, 4096)
    return builtin_examples(tok, limits, families, n, seed=seed, split="heldout")


def chat_items(tok, n: int, max_prompt: int, seed: int) -> list[Item]:
    """``n`` held-out chat-formatted requests (the ``instruct`` family's prompts)."""
    exs = _heldout(tok, ["instruct"], n, max_prompt, 8, seed)
    return [Item("chat", f"chat/{i}", list(ex.prompt), "chat") for i, ex in enumerate(exs)]


def tf_items(tok, n_per_family: int, max_prompt: int, cont_tokens: int, seed: int,
             families: Sequence[str] = FAMILIES) -> list[Item]:
    """Held-out prompts of each family (every one by default), each with the real text that follows it."""
    exs = _heldout(tok, families, n_per_family, max_prompt, cont_tokens, seed)
    return [Item("tf", f"{ex.family}/{i}", list(ex.prompt), ex.family, list(ex.response))
            for i, ex in enumerate(exs)]

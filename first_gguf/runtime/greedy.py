"""The one timed greedy loop that ``eval``, ``bench`` and ``demo`` measure with.

Prefill time is the ``prefill`` call alone; decode time runs from its end until the loop
stops, so it holds every decode step and the per-token choice (argmax) and detokenization.
The last token chosen is never evaluated (nothing would read its logits).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Callable, Sequence

import numpy as np
from llama_cpp import Llama

from .scoring import Scoring


@dataclass(frozen=True)
class Generation:
    """A greedy generation and its timing.

    Attributes:
        tokens: the generated ids (an end-of-generation token is not included).
        text: their text.
        t_prefill: seconds of the prefill.
        t_decode: seconds from the end of the prefill to the end of the loop.
        n_decode: decode steps (evaluated tokens) in ``t_decode``.
        report: the prefill's ``PrefillReport`` (None on a ``PlainModel``).
    """

    tokens: list[int]
    text: str
    t_prefill: float
    t_decode: float
    n_decode: int
    report: object | None = None

    @property
    def skipped(self) -> list[int]:
        return list(self.report.skipped) if self.report is not None else []

    def row(self) -> dict:
        """The fields an evaluation row stores, in its order."""
        row = {"tokens": self.tokens, "text": self.text, "t_prefill": self.t_prefill, "t_decode": self.t_decode,
               "n_decode": self.n_decode, "skipped": self.skipped}
        if getattr(self.report, "healed", False):
            row["healed"] = True
        return row


def greedy(llm, prompt_tokens: Sequence[int], max_new: int, stop: Callable[[str], bool] | None = None,
           eog: bool = True) -> Generation:
    """Prefill ``prompt_tokens`` as a new sequence, then decode greedily one token at a time.

    Args:
        llm: A configured ``FirstModel`` (or a ``PlainModel``).
        prompt_tokens: Token ids.
        max_new: At most this many new tokens (``max_new - 1`` decode steps).
        stop: ``f(text) -> bool`` called on the text after each new token; True stops.
        eog: Stop at an end-of-generation token (False: always ``max_new`` tokens, as a benchmark wants).

    Returns:
        The ``Generation``.
    """
    t0 = time.perf_counter()
    report = llm.prefill(list(prompt_tokens))
    t1 = time.perf_counter()
    tokens, text, n_decode, t_decode = decode(llm, max_new, stop, eog)
    return Generation(tokens, text, t1 - t0, t_decode, n_decode, report)


def decode(llm, max_new: int, stop: Callable[[str], bool] | None = None,
           eog: bool = True) -> tuple[list[int], str, int, float]:
    """Decode greedily from the logits of the last evaluated position (``greedy`` after its
    prefill); returns the tokens, their text, the decode steps and their seconds."""
    t1 = time.perf_counter()
    tokens: list[int] = []
    n_decode = 0
    text = ""
    while True:
        tok = int(np.argmax(llm.last_logits(copy=False)))
        if eog and llm.is_eog(tok):
            break
        tokens.append(tok)
        text = llm.detokenize(tokens).decode("utf-8", errors="ignore")
        if len(tokens) >= max_new or (stop and stop(text)):
            break
        llm.eval([tok])
        n_decode += 1
    return tokens, text, n_decode, time.perf_counter() - t1


def drafted(llm, prompt_tokens: Sequence[int], max_new: int, stop: Callable[[str], bool] | None = None,
            eog: bool = True) -> Generation:
    """``greedy`` through ``Llama.generate`` on a model with a draft (``FirstModel.use_draft``):
    the draft proposes, the model verifies. The prefill time runs to the first token (its
    sampling included); ``n_decode`` counts the tokens after it, however many one step verified.
    The prompt runs whole, as ``greedy``'s does (no prefix of an earlier generation reused)."""
    llm.reset()
    t0 = time.perf_counter()
    t1 = None
    tokens: list[int] = []
    text = ""
    for tok in llm.generate(list(prompt_tokens), temp=0.0, reset=True):
        if t1 is None:
            t1 = time.perf_counter()
        if eog and llm.is_eog(tok):
            break
        tokens.append(int(tok))
        text = llm.detokenize(tokens).decode("utf-8", errors="ignore")
        if len(tokens) >= max_new or (stop and stop(text)):
            break
    t2 = time.perf_counter()
    return Generation(tokens, text, t1 - t0, t2 - t1, max(0, len(tokens) - 1), llm.last_prefill)


class PlainModel(Llama):
    """A ``llama_cpp.Llama`` (on any build, the stock library too) that ``greedy`` can drive."""

    last_logits = Scoring.last_logits
    is_eog = Scoring.is_eog

    def prefill(self, prompt: Sequence[int]) -> None:
        """Start a new sequence with ``prompt``."""
        self.reset()
        self.eval(list(prompt))

    def extend(self, tokens: Sequence[int]) -> None:
        """Evaluate ``tokens`` after the cached positions."""
        self.eval(list(tokens))

    def restored_full_depth(self, n: int) -> None:
        """Cache positions [0, n) were loaded from a sequence state."""
        self.n_tokens = n

"""Speculative decoding with a small model at a FiRST point drafting for a larger one.

llama-cpp-python verifies a draft in ``Llama.generate``: the target evaluates its last
sampled token and the draft in one batch, samples every position from its own logits and
keeps the draft up to the first token it would not have sampled. The answer is the
target's, for any sampler (up to the float differences between one batched evaluation and
token-by-token decoding); the draft only decides how many tokens one target evaluation
yields. ``FirstDraft`` is that draft: a ``FirstModel`` (e.g. the 0.5B at its fast point,
its prompt at full depth, its decode reduced) that follows the target's tokens in its own
KV cache and proposes greedy tokens until it is unsure.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from ..errors import FirstError

try:
    from llama_cpp.llama_speculative import LlamaDraftModel
except ImportError:  # pragma: no cover - the runtime is imported only with llama_cpp installed
    LlamaDraftModel = object  # type: ignore[misc,assignment]


@dataclass
class DraftStats:
    """What the draft proposed and the target kept, since the draft was made (or ``reset``)."""

    calls: int = 0       # target evaluations that asked for a draft
    drafted: int = 0     # tokens proposed
    accepted: int = 0    # proposed tokens the target sampled too

    @property
    def acceptance(self) -> float | None:
        return self.accepted / self.drafted if self.drafted else None

    def row(self) -> dict:
        return {"calls": self.calls, "drafted": self.drafted, "accepted": self.accepted,
                "acceptance": self.acceptance}


class FirstDraft(LlamaDraftModel):
    """Drafts tokens for ``Llama(..., draft_model=FirstDraft(small))`` (any ``Llama``, a ``FirstModel`` too).

    Args:
        model: the drafting ``FirstModel``, configured at the point it should draft with.
            Its vocabulary must be the target's (``check``) and its context at least as long.
        max_tokens: at most this many tokens per draft.
        p_min: stop drafting at a token whose greedy probability under the draft is below this
            (llama.cpp's speculative example does the same); 0 always drafts ``max_tokens``.
        prefill_above: a step adding more tokens than this (a new prompt or chat turn) runs as
            the draft's prefill (full depth, its routers), shorter ones as its decode.
    """

    def __init__(self, model: Any, *, max_tokens: int = 4, p_min: float = 0.5, prefill_above: int = 16) -> None:
        if max_tokens < 1:
            raise FirstError(f"a draft needs max_tokens >= 1, got {max_tokens}")
        if not 0.0 <= p_min < 1.0:
            raise FirstError(f"p_min must lie in [0, 1), got {p_min}")
        self.model = model
        self.max_tokens = max_tokens
        self.p_min = p_min
        self.prefill_above = max(prefill_above, max_tokens + 1)
        self.stats = DraftStats()
        self._proposal: tuple[int, list[int]] | None = None  # (position of its first token, tokens)
        self._checked: Any = None  # the last target that passed ``check`` (use_draft checks at every switch)

    @classmethod
    def open(cls, model_path: Any, *, point: str | None = None, max_tokens: int = 4, p_min: float = 0.5,
             **kwargs: Any) -> "FirstDraft":
        """A draft on a new ``FirstModel(model_path, point=point, **kwargs)`` (its default point when None)."""
        from .engine import FirstModel

        return cls(FirstModel(model_path, point=point, **kwargs), max_tokens=max_tokens, p_min=p_min)

    def describe(self) -> str:
        """One line for a user: the draft file, its point and what it has drafted so far."""
        from pathlib import Path

        m, st = self.model, self.stats
        at = f" at {m.point}" if m.point else f" ({m.mode})"
        kept = f", {st.accepted} of {st.drafted} drafted tokens kept" if st.drafted else ""
        return f"draft {Path(m.model_path).name}{at}, up to {self.max_tokens} tokens{kept}"

    def check(self, target: Any) -> None:
        """Raise ``FirstError`` unless ``target`` has the draft's vocabulary, token for token."""
        if target is self._checked:
            return
        a, b = self.model, target
        if a.n_vocab() != b.n_vocab():
            raise FirstError(f"the draft {a.model_path} has {a.n_vocab()} tokens, the target {b.model_path} "
                             f"{b.n_vocab()}: a draft must share the target's vocabulary")
        va, vb = a._model.vocab, b._model.vocab
        import llama_cpp

        for t in range(a.n_vocab()):
            if llama_cpp.llama_vocab_get_text(va, t) != llama_cpp.llama_vocab_get_text(vb, t):
                raise FirstError(f"token {t} differs between the draft {a.model_path} and the target "
                                 f"{b.model_path}: a draft must share the target's vocabulary")
        if a.n_ctx() < b.n_ctx():
            raise FirstError(f"the draft's context ({a.n_ctx()}) is shorter than the target's ({b.n_ctx()})")
        self._checked = target

    def reset(self) -> None:
        """Zero the statistics."""
        self.stats = DraftStats()

    def __call__(self, input_ids: np.ndarray, /, **kwargs: Any) -> np.ndarray:
        ids = [int(t) for t in input_ids]
        self._score(ids)
        m = self.model
        if len(ids) + self.max_tokens >= m.n_ctx():
            self._proposal = None
            return np.array([], dtype=np.intc)
        self._follow(ids)
        out: list[int] = []
        for i in range(self.max_tokens):
            logits = m.last_logits(copy=False)
            tok = int(np.argmax(logits))
            if self.p_min > 0 and _top_probability(logits, tok) < self.p_min:
                break
            out.append(tok)
            if m.is_eog(tok) or i == self.max_tokens - 1:
                break
            m.eval([tok])
        self.stats.calls += 1
        self.stats.drafted += len(out)
        self._proposal = (len(ids), out)
        return np.array(out, dtype=np.intc)

    def _score(self, ids: list[int]) -> None:
        """Count how much of the last proposal the target kept (it is in ``ids`` up to the first miss)."""
        if self._proposal is None:
            return
        start, prop = self._proposal
        self._proposal = None
        kept = 0
        for tok, got in zip(prop, ids[start:]):
            if tok != got:
                break
            kept += 1
        self.stats.accepted += kept

    def _follow(self, ids: list[int]) -> None:
        """Bring the draft's cache to ``ids``, with the logits of its last token computed."""
        m = self.model
        cached = m.input_ids[:m.n_tokens]
        n = min(len(cached), len(ids) - 1)  # the last token is evaluated again for its logits
        same = int(np.argmin(np.append(cached[:n] == np.asarray(ids[:n]), False)))
        new = ids[same:]
        if same == 0:
            m.prefill(ids)
        elif len(new) > self.prefill_above:
            m.n_tokens = same
            m.extend(new)
        else:
            m.n_tokens = same
            m.eval(new)


def _top_probability(logits: np.ndarray, tok: int) -> float:
    top = float(logits[tok])
    with np.errstate(over="ignore", under="ignore"):
        return 1.0 / float(np.exp(logits - top, dtype=np.float64).sum())

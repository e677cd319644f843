"""What evaluation reads off a ``FirstModel`` besides generation: logits and hidden states.

``Scoring`` is a mixin of ``FirstModel`` (``engine.py`` keeps the chat and KV rules):

- ``fork`` / ``branch_logits`` score any number of continuations and masks on one prefill,
  each bit for bit what that strategy's own prefill and decode give;
- ``teacher_forced_logits`` / ``continuation_logits``: one continuation, one configuration;
- ``router_mask``: the mask the routers choose at any threshold for the last prefill;
- ``last_logits``, ``is_eog``, ``token_text``: what a greedy loop and a chat template need;
- ``layer_inputs``: the hidden state entering each layer (llama.cpp's own capture).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Sequence

import numpy as np
from llama_cpp import llama_cpp

from ..errors import FirstError
from . import _lib

if TYPE_CHECKING:
    from .engine import PrefillReport


class Scoring:
    """Scoring methods of ``FirstModel``; ``last_logits``, ``is_eog`` and ``token_text`` work on any ``Llama``."""

    def last_logits(self, copy: bool = True) -> np.ndarray:
        """[n_vocab]: the logits of the last evaluated token.

        ``copy=False`` returns a view of llama.cpp's buffer, valid until the next evaluation.
        """
        ptr = llama_cpp.llama_get_logits_ith(self._ctx.ctx, -1)
        row = np.ctypeslib.as_array(ptr, shape=(self.n_vocab(),))
        return row.copy() if copy else row

    def is_eog(self, token: int) -> bool:
        """True for a token that ends a generation (EOS, EOT, ...)."""
        return bool(llama_cpp.llama_vocab_is_eog(self._model.vocab, int(token)))

    def token_text(self, token: int) -> str:
        """The vocabulary's text of ``token`` (e.g. ``<|im_end|>``), as chat templates spell it."""
        return self._model.token_get_text(int(token))

    def layer_inputs(self, prompt: Sequence[int]) -> np.ndarray:
        """[n_layer, n_tokens, n_embd]: the hidden state entering each layer, at full depth.

        Leaves the model in ``full`` mode.
        """
        set_inp, get_inp = _lib.layer_input_fns()
        n_layer, n_embd = self.n_layer, self.n_embd()
        self.configure(mode="full")
        for il in range(n_layer):
            set_inp(self.ctx, il, True)
        try:
            self.prefill(list(prompt))
            n = len(prompt)
            return np.stack([np.ctypeslib.as_array(get_inp(self.ctx, il), shape=(n * n_embd,))
                             .reshape(n, n_embd).copy() for il in range(n_layer)])
        finally:
            for il in range(n_layer):
                set_inp(self.ctx, il, False)

    def teacher_forced_logits(self, prompt: Sequence[int], continuation: Sequence[int]) -> np.ndarray:
        """Logits of every position: the prompt as a prefill, then ``continuation`` as decode.

        Needs ``logits_all=True``. Returns an array [len(prompt) + len(continuation), n_vocab];
        row t predicts token t + 1.
        """
        if not self._prompt_logits:  # asked for (a draft alone turns _logits_all on)
            raise FirstError("teacher_forced_logits needs FirstModel(..., logits_all=True)")
        self.prefill(prompt)
        if continuation:
            self.eval(list(continuation))
        return np.array(self.scores[: self.n_tokens], dtype=np.float32)

    def continuation_logits(self, prompt: Sequence[int], continuation: Sequence[int]) -> np.ndarray:
        """The logits that predict each token of ``continuation`` (teacher-forced), and no others.

        ``teacher_forced_logits`` without the prompt rows: the prefill computes the output
        layer for its last token only, so this is several times cheaper on long prompts.
        Needs ``logits_all=True`` (for the continuation's rows). Returns [len(continuation), n_vocab].
        """
        self.fork(prompt)
        return self.branch_logits(continuation)

    def fork(self, prompt: Sequence[int]) -> PrefillReport:
        """Prefill ``prompt`` as the common start of later ``branch_logits`` calls.

        Only the last prompt row goes through the output layer. Every strategy whose prompt
        runs at full depth (``full``, ``first`` at any threshold, ``mask`` with
        ``prefill="full"``) shares this prompt KV, so one fork in ``first`` mode scores
        them all: ``router_mask`` gives the mask of any threshold.
        Needs ``logits_all=True`` (for the branches' rows).
        """
        if not self._prompt_logits:
            raise FirstError("fork/branch_logits need FirstModel(..., logits_all=True)")
        self._fork = None
        self._logits_all = False  # the prefill: logits of the last prompt token only
        try:
            report = self.prefill(prompt)
        finally:
            self._logits_all = True
        self._fork = _Fork(tuple(int(t) for t in prompt), report, self.last_logits(), self._prefill_kv())
        return report

    def router_mask(self, threshold: float | None = None) -> tuple[bool, ...]:
        """The run mask the routers choose at ``threshold`` for the last ``first``-mode prefill.

        The runtime's own rule (docs/FORMAT.md section 1): p_i >= threshold in float32, protected
        layers always run. ``None``: the threshold that prefill used.
        """
        rep = self.last_prefill
        if rep is None or rep.probs is None:
            raise FirstError("router_mask needs a prefill in 'first' mode first")
        thr = np.float32(rep.threshold if threshold is None else threshold)
        if not 0.0 <= thr <= 1.0:
            raise FirstError(f"threshold {threshold} outside [0, 1]")
        protected = set(self.routers.protected_layers)
        return tuple(bool(i in protected or np.float32(p) >= thr) for i, p in enumerate(rep.probs))

    def branch_logits(self, continuation: Sequence[int], mask: Sequence[bool] | None = None,
                      heal: bool | None = None) -> np.ndarray:
        """Teacher-forced logits of ``continuation`` decoded after the last ``fork`` under ``mask``.

        The cache is cut back to the fork's prompt first, so any number of continuations and
        masks can be scored on one prefill; each call equals a prefill of that prompt followed
        by the decode of ``continuation`` under ``mask`` (None: the mask the fork's prefill
        chose; a healing adapter runs when the branch's mask is its set), the configured
        warm-up included (its first ``warmup`` decode steps at full depth, after a full-depth fork). Row 0 is the prefill's last row (the prompt's own prediction). After a
        ``prefill="masked"`` fork, ``mask`` may run only layers that prefill ran. The
        configuration (mode, mask) is left as it was. ``heal``: whether a healing adapter may run
        (None: the model's setting). Returns [len(continuation), n_vocab].
        """
        fork = self._fork
        if fork is None:
            raise FirstError("branch_logits needs a fork(prompt) first")
        end = len(fork.prompt)
        if (self.n_tokens < end or any(int(t) != u for t, u in zip(self.input_ids[:end], fork.prompt))
                or any(seg.kv != fork.kv for seg in self._segments if seg.start < end)):
            raise FirstError("the cache no longer holds the fork's prompt (another generation ran since fork)")
        run = tuple(bool(m) for m in (fork.report.mask if mask is None else mask))
        if len(run) != self.n_layer:
            raise FirstError(f"mask has {len(run)} entries; the model has {self.n_layer} layers")
        if fork.kv is not None and any(m and not p for m, p in zip(run, fork.report.mask)):
            raise FirstError("the fork's prefill was masked: a branch may run only the layers it ran "
                             f"(it skipped {list(fork.report.skipped)})")
        if not continuation:
            return np.zeros((0, self.n_vocab()), dtype=np.float32)
        saved_mode, saved_mask, saved_heal, saved_warm = self.mode, self.mask, self.heal_on, self._warm_end
        self.n_tokens = end
        self._warm_end = end + (self.warmup if fork.kv is None else 0)  # no warm-up after a masked prompt
        try:
            self._set_mask(run)
            self._set_mode("mask")
            self.heal_on = saved_heal if heal is None else bool(heal)
            self._use_heal(run if fork.kv is None else None)
            self.eval(list(continuation[:-1]))
            rows = np.array(self.scores[end: self.n_tokens], dtype=np.float32)
        finally:
            self._warm_end = saved_warm
            self.heal_on = True
            self._use_heal(fork.report.mask if fork.report.healed else None)
            self.heal_on = saved_heal
            self._set_mask(fork.report.mask)  # mask mode, outside a prefill: the decode mask is the fork's again
            self._set_mode(saved_mode)
            if saved_mask is not None:
                self._set_mask(saved_mask)
            self.mask = saved_mask
        return np.concatenate([fork.last[None, :], rows])


@dataclass(frozen=True)
class _Fork:
    prompt: tuple[int, ...]
    report: PrefillReport
    last: np.ndarray  # the prefill's last row of logits
    kv: bytes | None  # how the prompt's KV was computed (None: every layer)

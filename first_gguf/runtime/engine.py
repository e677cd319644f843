"""``FirstModel``: a llama-cpp-python ``Llama`` whose decode skips the layers its routers drop.

Everything llama-cpp-python offers (completion, streaming, chat templates, sampling
options) works unchanged; FirstModel only decides, at every generation, which evaluation
is the prefill (the first one) and keeps the KV cache consistent with docs/FORMAT.md section 3:

- the prompt runs every layer (``first`` mode: with the routers in the same graph); the
  mask the routers choose holds for every decode step of that generation;
- positions decoded under a mask lack KV in the layers it skipped, so before the next
  prefill they are removed and evaluated again at full depth;
- p_i is the mean over every prompt position of the sequence, however much of it the
  cache reused: the router sums of reused positions are kept per evaluated segment, so
  a multi-turn chat routes exactly as if the whole conversation were evaluated anew;
- with a warm-up of W steps, the first W decode positions after a prefill run every layer
  (and so have complete KV); the reduced decode takes over from the next one.

The scoring methods (``fork``, ``branch_logits``, ``layer_inputs``, ...) are ``scoring.py``'s, the
healing adapters' ``healing.py``'s. A FiRST-GGUF's named operating points (``points``) are
configurations by name: ``FirstModel(path, point="balanced")``, ``configure(point=...)``.
"""

from __future__ import annotations

import ctypes
import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Sequence

import numpy as np
from llama_cpp import Llama
from llama_cpp import llama_cpp

from ..errors import FirstError
from . import _lib
from .healing import Healing
from .kvcache import KvSegments, _Segment
from .scoring import Scoring, _Fork

MODES = {"full": _lib.MODE_FULL, "first": _lib.MODE_FIRST, "mask": _lib.MODE_MASK}
PREFILLS = {"full": _lib.PREFILL_FULL, "masked": _lib.PREFILL_MASKED}


@dataclass(frozen=True)
class PrefillReport:
    """What the last prefill decided.

    Attributes:
        mode: "first", "full" or "mask".
        mask: per layer, True when decode runs it.
        probs: p_i per layer ("first" mode), else None.
        threshold: the threshold the mask was cut at ("first" mode), else None.
        n_tokens: prompt positions the mean ran over (reused ones included).
        n_evaluated: positions this prefill evaluated.
        healed: whether the decode that follows runs a healing adapter.
        point: the named operating point configured, None when configured otherwise.
        thin: layers the decode runs with their thin FFN (docs/FORMAT.md section 7).
        vocab: the extra tokens (the context's, outside the list) when the decode that follows
            runs with the short output vocabulary (docs/FORMAT.md section 8), else None.
        warmup: decode steps after this prefill that run every layer before the reduced decode.
    """

    mode: str
    mask: tuple[bool, ...]
    probs: tuple[float, ...] | None
    threshold: float | None
    n_tokens: int
    n_evaluated: int
    healed: bool = False
    point: str | None = None
    thin: tuple[int, ...] = ()
    vocab: int | None = None
    warmup: int = 0

    @property
    def skipped(self) -> tuple[int, ...]:
        return tuple(i for i, run in enumerate(self.mask) if not run)


def mask_from_skip(n_layer: int, skip: Iterable[int]) -> list[bool]:
    """Run mask (True = the layer runs) that skips the given layer indices."""
    skip = set(skip)
    if bad := sorted(i for i in skip if not 0 <= i < n_layer):
        raise FirstError(f"layers {bad} out of range for a {n_layer}-layer model")
    return [i not in skip for i in range(n_layer)]


class FirstModel(KvSegments, Scoring, Healing, Llama):
    """A GGUF on the patched llama.cpp, with FiRST layer skipping.

    Args:
        model_path: a FiRST-GGUF (routers: every mode) or a plain GGUF (``full``/``mask``).
        point: a named operating point of the file (``points``): its threshold in "first" mode,
            or its skip set in "mask" mode with the prompt at full depth. Not with mode, mask,
            prefill or threshold. With none of these five given, the file's default point
            applies; a FiRST-GGUF without one runs "first" at the file's threshold.
        mode: "first" (default for a FiRST-GGUF), "full" (default otherwise) or "mask".
        mask: run mask for "mask" mode (one bool per layer).
        prefill: "full" (the default: the prompt runs every layer) or "masked" (the mask applies
            to the prompt too, as in a GGUF with the skipped blocks removed); "mask" mode only.
        threshold: overrides the file's router threshold, in [0, 1].
        thin: layers whose decode (in "first" and "mask" modes) uses the file's thin FFN in place
            of the full one (docs/FORMAT.md section 7); the prompt and "full" never do.
        vocab: decode (in "first" and "mask" modes) with the file's short output vocabulary and
            the context's own tokens (docs/FORMAT.md section 8); the prompt and "full" never do.
        heal: healing adapters (``first-gguf heal``, docs/FORMAT.md section 6), one path or
            several (one per skip set): llama.cpp's LoRA support applies an adapter while a
            decode mask that skips exactly its set runs, never to a prefill or to ``full``.
        warmup: decode steps after each prefill that run at full depth (every layer, no thin
            FFN, adapter or short vocabulary) before the reduced decode ("first" mode, and "mask"
            with ``prefill="full"``); 0 (the default) for none.
        **kwargs: passed to ``llama_cpp.Llama`` (n_ctx, n_threads, n_batch, chat_format, ...).

    Attributes:
        points: the file's operating points (``format.Points``: iterable, ``names``, ``default``).
        point: the point configured now, None when configured otherwise.
    """

    def __init__(self, model_path: str | Path, *, point: str | None = None, mode: str | None = None,
                 mask: Sequence[bool] | None = None, prefill: str | None = None, threshold: float | None = None,
                 heal: str | Path | Sequence[str | Path] | None = None, thin: Sequence[int] | None = None,
                 vocab: bool | None = None, warmup: int | None = None, **kwargs: Any) -> None:
        from ..format import Points, is_first_gguf, read_first

        self._flib = _lib.load()  # a clear error on a stock llama-cpp-python, before loading
        path = Path(model_path)
        # every rule but the byte comparison of thin rows, which would page in most FFN weights twice
        self.routers, self.points = read_first(path, deep=False) if is_first_gguf(path) else (None, Points())
        if kwargs.get("n_seq_max", 1) != 1:
            raise FirstError("FiRST decisions are per sequence: use one context per sequence (n_seq_max=1)")
        kwargs.setdefault("verbose", False)
        self._segments: list[_Segment] = []
        self._pending_prefill = False
        self._fork: _Fork | None = None
        self.last_prefill: PrefillReport | None = None
        self.heals: list = []  # HealInfo of each loaded adapter
        self._healing: int | None = None  # the adapter on the context now
        self.heal_on = True
        self._prompt_logits = bool(kwargs.get("logits_all", False))  # a draft model turns logits_all on
        self._warm_end = 0  # decode positions below this run at full depth (the warm-up)
        try:
            super().__init__(model_path=str(path), **kwargs)
        except ValueError as exc:  # llama-cpp-python's "Failed to load model from file: ..."
            if "Failed to load model" not in str(exc):
                raise
            raise FirstError(f"{path}: llama.cpp cannot load it ({exc}; FirstModel(..., verbose=True) shows "
                             f"the library's log)") from None
        self.n_layer = int(llama_cpp.llama_model_n_layer(self._model.model))
        heal_paths = [] if heal is None else [heal] if isinstance(heal, (str, Path)) else list(heal)
        self._adapters = self._load_heals(heal_paths)
        self.mode, self.mask, self.prefill_kind, self.threshold, self.point = "full", None, "full", None, None
        self.thin: tuple[int, ...] = ()
        self.vocab = False
        self.warmup = 0
        settings = (mode, mask, prefill, threshold, thin, vocab, warmup)
        if point is None and all(v is None for v in settings):
            point = self.points.default
        if point is None:
            mode = mode or ("first" if self.has_routers else "full")
        self.configure(mode=mode, mask=mask, prefill=prefill, threshold=threshold, point=point, thin=thin,
                       vocab=vocab, warmup=warmup)
        if self.draft_model is not None:  # a FirstDraft: the same vocabulary, a long enough context
            self.use_draft(self.draft_model)

    @property
    def has_routers(self) -> bool:
        return self._flib.model_router_hidden(self._model.model) > 0

    @property
    def thin_layers(self) -> tuple[int, ...]:
        """Layers that carry a thin FFN in this file (format version 2)."""
        return tuple(i for i in range(self.n_layer) if self._flib.model_thin_width(self._model.model, i) > 0)

    @property
    def thin_attn(self) -> bool:
        """Whether the thin layers also carry attention copies (format version 4), read by the same graphs."""
        return bool(self._flib.model_thin_attn(self._model.model))

    @property
    def vocab_size(self) -> int:
        """Tokens in this file's short output vocabulary (format version 3), 0 without one."""
        return int(self._flib.model_vocab_size(self._model.model))

    # --- configuration ---------------------------------------------------------------

    def configure(self, mode: str | None = None, mask: Sequence[bool] | None = None,
                  prefill: str | None = None, threshold: float | None = None, heal: bool | None = None,
                  point: str | None = None, thin: Sequence[int] | None = None, vocab: bool | None = None,
                  warmup: int | None = None) -> None:
        """Set the mode, mask, prefill kind, threshold and whether healing adapters apply
        (``heal``; on by default when adapters are loaded), the layers decoded with their
        thin FFN (``thin``; ``()`` for none; None leaves them), whether the decode uses the
        short output vocabulary (``vocab``; None leaves it) and the decode steps after each
        prefill that run at full depth (``warmup``; 0 for none; None leaves it), or all of them
        by naming an operating point of the file (``point``, alone); the next generation uses them.

        A threshold point is "first" mode at its threshold; a skip point is "mask" mode with
        ``prefill="full"`` and its mask. A point decodes healed exactly when it names an
        adapter (loaded from the GGUF's directory on first use).

        Raises:
            FirstError: unknown mode/prefill/point, a point given with any other setting, a
                mask of the wrong length or skipping every layer, a threshold outside [0, 1],
                "first" mode without routers, a point's adapter missing or for another set,
                a thin layer without a thin FFN in the file, ``vocab`` without a short
                vocabulary in the file, a warm-up that is not a whole number in 0..4096.
        """
        if point is not None:
            given = [k for k, v in (("mode", mode), ("mask", mask), ("prefill", prefill), ("threshold", threshold),
                                    ("heal", heal), ("thin", thin), ("vocab", vocab), ("warmup", warmup))
                     if v is not None]
            if given:
                raise FirstError(f"point {point!r} sets the mode, mask, prefill, threshold and healing itself; "
                                 f"give either the point or {', '.join(given)}")
            self._configure_point(point)
            return
        if warmup is not None:
            self._check_warmup(warmup)
        self._configure(mode, mask, prefill, threshold, heal)
        if thin is not None:
            self._set_thin(thin)
        if vocab is not None:
            self._set_vocab(vocab)
        if warmup is not None:
            self.warmup = int(warmup)
        self.point = None

    def _configure_point(self, name: str) -> None:
        p = self.points.get(name)
        if p is None:
            have = ", ".join(self.points.names)
            raise FirstError(f"{self.model_path}: no operating point {name!r}; "
                             + (f"it has {have}" if have else "it has no named points"))
        if p.threshold is not None:
            self._configure("first", None, "full", p.threshold, False)
        else:
            if p.heal is not None:
                self._load_point_heal(p)
            self._configure("mask", p.mask(self.n_layer) or [True] * self.n_layer, "full", None, p.heal is not None)
        self._set_thin(p.thin or ())
        self._set_vocab(p.vocab)
        self.warmup = p.warmup
        self.point = p.name

    @staticmethod
    def _check_warmup(warmup: Any) -> None:
        from ..constants import MAX_WARMUP

        if isinstance(warmup, bool) or not isinstance(warmup, (int, np.integer)) or not 0 <= warmup <= MAX_WARMUP:
            raise FirstError(f"warmup {warmup!r} must be a whole number of decode steps in 0..{MAX_WARMUP}")

    def _configure(self, mode: str | None, mask: Sequence[bool] | None, prefill: str | None,
                   threshold: float | None, heal: bool | None) -> None:
        mode = mode or self.mode
        if mode not in MODES:
            raise FirstError(f"unknown mode {mode!r}; choose one of {sorted(MODES)}")
        if mode == "first" and not self.has_routers:
            raise FirstError(f"{self.model_path}: not a FiRST-GGUF (no routers): "
                             f"'first' mode needs routers; use 'full' or 'mask'")
        prefill = prefill or self.prefill_kind
        if prefill not in PREFILLS:
            raise FirstError(f"unknown prefill {prefill!r}; choose one of {sorted(PREFILLS)}")
        if mask is not None:
            self._set_mask(mask)
        elif mode == "mask" and self.mask is None:
            raise FirstError("'mask' mode needs a mask (one bool per layer)")
        if threshold is not None:
            if not 0.0 <= float(threshold) <= 1.0:
                raise FirstError(f"threshold {threshold} outside [0, 1]")
            self._check(self._flib.set_threshold(self.ctx, float(threshold)), "set_threshold")
            self.threshold = float(threshold)
        self._check(self._flib.set_prefill(self.ctx, PREFILLS[prefill]), "set_prefill")
        self._check(self._flib.set_mode(self.ctx, MODES[mode]), "set_mode")
        self.mode, self.prefill_kind = mode, prefill
        if heal is not None:
            self.heal_on = bool(heal)

    def reset_threshold(self) -> None:
        """Use the file's threshold again (leaving a threshold point)."""
        self._check(self._flib.set_threshold(self.ctx, -1.0), "set_threshold")
        self.threshold = None
        if self.mode == "first":
            self.point = None

    def _set_mask(self, mask: Sequence[bool]) -> None:
        mask = [bool(m) for m in mask]
        if len(mask) != self.n_layer:
            raise FirstError(f"mask has {len(mask)} entries; the model has {self.n_layer} layers")
        if not any(mask):
            raise FirstError("the mask skips every layer; at least one layer must run")
        buf = (ctypes.c_uint8 * self.n_layer)(*mask)
        self._check(self._flib.set_mask(self.ctx, buf, self.n_layer), "set_mask")
        self.mask = tuple(mask)

    def _set_thin(self, thin: Iterable[int]) -> None:
        thin = tuple(sorted({int(i) for i in thin}))
        if bad := [i for i in thin if not 0 <= i < self.n_layer]:
            raise FirstError(f"thin layers {bad} out of range for a {self.n_layer}-layer model")
        have = self.thin_layers
        if missing := [i for i in thin if i not in have]:
            raise FirstError(f"{self.model_path}: layers {missing} have no thin FFN in this file"
                             + (f" (it has {list(have)})" if have else " (it has none)"))
        buf = (ctypes.c_uint8 * self.n_layer)(*[i in thin for i in range(self.n_layer)])
        self._check(self._flib.set_thin(self.ctx, buf, self.n_layer), "set_thin")
        self.thin = thin

    def _set_vocab(self, on: bool) -> None:
        if on and not self.vocab_size:
            raise FirstError(f"{self.model_path}: no short output vocabulary in this file (docs/FORMAT.md section 8)")
        self._check(self._flib.set_vocab(self.ctx, int(bool(on)), None, 0), "set_vocab")
        self.vocab = bool(on)

    def _vocab_extra(self, tokens: Sequence[int]) -> None:
        """The context's tokens (``tokens`` after the reused positions) join the short vocabulary."""
        ids = np.unique(np.concatenate([np.asarray(self.input_ids[:self.n_tokens], dtype=np.int32),
                                        np.asarray(tokens, dtype=np.int32)]))
        ptr = ids.ctypes.data_as(ctypes.POINTER(ctypes.c_int32))
        self._check(self._flib.set_vocab(self.ctx, 1, ptr, len(ids)), "set_vocab")

    def _set_mode(self, mode: str) -> None:
        self._check(self._flib.set_mode(self.ctx, MODES[mode]), "set_mode")
        self.mode = mode

    def _check(self, rc: int, what: str) -> None:
        if rc < 0:
            raise FirstError(f"llama_first_{what} failed (code {rc}); see the library log")

    @property
    def ctx(self) -> int:
        return self._ctx.ctx

    # --- the llama-cpp-python hooks -----------------------------------------------------

    def generate(self, tokens: Sequence[int], *args: Any, **kwargs: Any):  # type: ignore[override]
        """``Llama.generate`` whose first evaluation is the FiRST prefill."""
        self._truncate_segments(self.n_tokens)
        keep = self._compatible_upto(self.n_tokens)
        if keep < self.n_tokens:  # positions without the KV (or router sums) the prefill needs
            self.n_tokens = keep
            self._requires_eval = True
        self._pending_prefill = True
        try:
            yield from super().generate(tokens, *args, **kwargs)
        finally:
            self._pending_prefill = False

    def eval(self, tokens: Sequence[int]) -> None:
        """``Llama.eval``: the first call of a generation is the prefill, the rest decode."""
        self._truncate_segments(self.n_tokens)
        if not self._pending_prefill:
            warm = min(max(self._warm_end - self.n_tokens, 0), len(tokens))
            if 0 < warm < len(tokens) and self.draft_model is not None:
                warm = len(tokens)  # the sampler reads a verified batch's logits from one evaluation
            if warm:
                self._decode_full_depth(tokens[:warm])
            if warm < len(tokens):
                start = self.n_tokens
                self._decode(tokens[warm:])
                self._record(start, self.n_tokens, self._decode_kv(), None)
            return
        self._pending_prefill = False
        self._prefill(list(tokens))

    def _decode(self, tokens: Sequence[int]) -> None:
        if not self.logprobs_ok:
            self._verify(tokens)
        else:
            super().eval(tokens)

    def _decode_full_depth(self, tokens: Sequence[int]) -> None:
        """Decode ``tokens`` with every layer (a warm-up): ``full`` mode in the library for these
        positions, no adapter; the configured decode comes back for the next ones."""
        start, adapter = self.n_tokens, self._healing
        self._check(self._flib.set_mode(self.ctx, _lib.MODE_FULL), "set_mode")
        try:
            self._set_adapter(None)
            self._decode(tokens)
        finally:
            self._check(self._flib.set_mode(self.ctx, MODES[self.mode]), "set_mode")
            self._set_adapter(adapter)
        self._record(start, self.n_tokens, None, None)

    def _verify(self, tokens: Sequence[int]) -> None:
        """``Llama.eval`` with every position's logits computed for the sampler but not copied into
        ``scores`` (a draft's verification: a row per position would cost n_ctx x n_vocab floats)."""
        self._ctx.kv_cache_seq_rm(-1, self.n_tokens, -1)
        for i in range(0, len(tokens), self.n_batch):
            batch = list(tokens[i:i + self.n_batch])
            self._batch.set_batch(batch=batch, n_past=self.n_tokens, logits_all=True)
            self._ctx.decode(self._batch)
            self.input_ids[self.n_tokens:self.n_tokens + len(batch)] = batch
            self.n_tokens += len(batch)
            self._requires_eval = False

    def use_draft(self, draft: Any) -> None:
        """Decode with ``draft`` (a ``FirstDraft``, checked against this model) from the next
        generation on, or without one (None)."""
        if hasattr(draft, "check"):
            draft.check(self)
        self.draft_model = draft
        self._logits_all = self._prompt_logits or draft is not None

    @property
    def logprobs_ok(self) -> bool:
        """False while a draft verifies tokens without keeping every position's logits (no ``logits_all``)."""
        return self.draft_model is None or self._prompt_logits

    def create_completion(self, prompt: Any, *args: Any, **kwargs: Any):  # noqa: D102
        if kwargs.get("logprobs") is not None and not self.logprobs_ok:
            raise FirstError("logprobs with a draft model need FirstModel(..., logits_all=True)")
        return super().create_completion(prompt, *args, **kwargs)

    def _prefill(self, tokens: list[int]) -> None:
        keep = self._compatible_upto(self.n_tokens)
        if keep < self.n_tokens:
            tokens = [int(t) for t in self.input_ids[keep:self.n_tokens]] + tokens
            self.n_tokens = keep
            self._truncate_segments(keep)
        self._use_heal(None)  # a prefill never runs the adapter
        if self.vocab:  # before the prompt: a masked prefill is a reduced graph too
            self._vocab_extra(tokens)
        self._check(self._flib.begin_prefill(self.ctx), "begin_prefill")
        if self.mode == "first":
            prior = [s for s in self._segments if s.sums is not None]
            if prior:
                sums = np.sum([s.sums for s in prior], axis=0).astype(np.float64)
                count = sum(s.end - s.start for s in prior)
                self._check(self._flib.add_prior(self.ctx, _f64p(sums), self.n_layer, count), "add_prior")
        start = self.n_tokens
        all_rows, self._logits_all = self._logits_all, self._logits_all and self._prompt_logits
        try:  # a draft's verification needs every decode row, not the prompt's
            super().eval(tokens)
        finally:
            self._logits_all = all_rows
        sums = None
        if self.mode == "first":
            sums = np.zeros(self.n_layer, dtype=np.float64)
            got = self._flib.get_sums(self.ctx, _f64p(sums), self.n_layer)
            if got != self.n_tokens - start:
                raise FirstError(f"router sums cover {got} tokens, the prefill evaluated {self.n_tokens - start}")
        self._check(self._flib.end_prefill(self.ctx), "end_prefill")
        self._record(start, self.n_tokens, self._prefill_kv(), sums)
        report = self._report(self.n_tokens - start)
        healable = self.mode != "full" and self.prefill_kind == "full" and not self.thin and not self.vocab
        # a masked prompt lacks the skipped layers' KV, which a full-depth step would read
        warmup = self.warmup if self.mode != "full" and self.prefill_kind == "full" else 0
        self._warm_end = self.n_tokens + warmup
        self.last_prefill = dataclasses.replace(report, healed=self._use_heal(report.mask if healable else None),
                                                point=self.point, warmup=warmup)

    def _report(self, n_evaluated: int) -> PrefillReport:
        buf = (ctypes.c_uint8 * self.n_layer)()
        self._check(self._flib.get_mask(self.ctx, buf, self.n_layer), "get_mask")
        probs = threshold = None
        n_tokens = n_evaluated
        if self.mode == "first":
            p = (ctypes.c_float * self.n_layer)()
            self._check(self._flib.get_probs(self.ctx, p, self.n_layer), "get_probs")
            probs, threshold = tuple(float(x) for x in p), float(self._flib.get_threshold(self.ctx))
            n_tokens = int(self._flib.get_prefill_tokens(self.ctx))
        mask = tuple(bool(m) for m in buf)
        thin = tuple(i for i in self.thin if mask[i]) if self.mode != "full" else ()
        vocab = int(self._flib.get_vocab(self.ctx)) if self.vocab and self.mode != "full" else None
        return PrefillReport(self.mode, mask, probs, threshold, n_tokens, n_evaluated, thin=thin, vocab=vocab)

    def __del__(self) -> None:
        if hasattr(self, "_stack"):  # __init__ may fail before Llama's own
            super().__del__()

    def set_cache(self, cache: Any) -> None:  # noqa: D102
        if cache is not None:
            raise FirstError("FirstModel keeps its own KV-cache rules; llama-cpp-python prompt caches "
                             "(set_cache) are not supported")
        super().set_cache(cache)

    def load_state(self, state: Any) -> None:  # noqa: D102
        super().load_state(state)
        self._segments = []  # unknown provenance: the next prefill recomputes everything

    # --- a new sequence ----------------------------------------------------------------

    def prefill(self, prompt: Sequence[int]) -> PrefillReport:
        """Start a new sequence with ``prompt`` as its prefill; later ``eval`` calls decode."""
        self.reset()
        self._segments = []
        return self.extend(prompt)

    def extend(self, tokens: Sequence[int]) -> PrefillReport:
        """Prefill ``tokens`` after the cached positions: the sequence goes on, and the prefill
        reuses what docs/FORMAT.md section 3 allows; later ``eval`` calls decode."""
        self._pending_prefill = True
        self.eval(list(tokens))
        return self.last_prefill


def _f64p(arr: np.ndarray) -> Any:
    return arr.ctypes.data_as(ctypes.POINTER(ctypes.c_double))

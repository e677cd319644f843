"""The strategies ``first-gguf eval`` compares, as configurations of one runtime context.

- ``full``: every layer.
- ``first@T``: the routers at threshold T (the prompt at full depth, docs/FORMAT.md section 1).
- ``static-K``: the best input-agnostic mask of K layers under the same full-depth prompt,
  chosen on training prompts only: the K non-protected layers of least block influence
  (ShortGPT: BI_i = 1 - cos(h_i, h_i+1), the hidden states entering layer i and i + 1, mean
  over tokens). The last layer has no next input here; it is protected anyway.
- ``random-K/sS``: K non-protected layers drawn with seed S (reported as a mean over seeds).
- ``early-exit-K``: the last K non-protected layers.
- ``pruned-K``: the ``static-K`` mask with ``prefill=masked``: what a GGUF with those blocks
  physically removed computes.

Controls that credit input adaptivity (``CONTROL_KINDS``, asked for by name):

- ``static-kl-K``: the K non-protected layers of least measured damage (mean KL to the full
  model when each is skipped alone, over training prompts: ``first_gguf.damage``).
- ``modal`` / ``modal@T``: the routers' most frequent mask on training prompts at the file's
  threshold (or T), used as one fixed mask for every input.

Fixed sets given by hand (``mask:A+B``, one per ``--mask A,B`` of the run): those layers skipped
in decode for every input, the prompt at full depth, as ``static-K`` does with its own set.

Healed strategies (``heal-K``, one per healing adapter given to the run): the adapter's skip
set as a fixed mask, decoded with the adapter on (``first-gguf heal``); compare with the same
set unhealed (``static-kl-K`` when the adapter was trained for the measured-damage set).

Speculative decoding (``draft:FILE@POINT``, one per ``--draft`` of the run): ``full``'s answers,
decoded with a smaller model of the same vocabulary at one of its points drafting tokens that
the file verifies (``runtime.speculative``); what it changes is speed, and the float details of
a batched verification. ``draft:FILE@POINT+TARGET`` (``--draft-on TARGET``): the file's
operating point TARGET's answers, verified the same way.

Named operating points of the file (``point:NAME``, asked for by name, or every one of them
with the kind ``points``): ``FirstModel.configure(point=NAME)``, a threshold or a fixed skip set
(docs/FORMAT.md section 2).
"""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass
from typing import Sequence

import numpy as np

from ..errors import FirstError

KINDS = ("full", "first", "static", "random", "early-exit", "pruned")
CONTROL_KINDS = ("static-kl", "modal", "heal")
ALL_KINDS = KINDS + CONTROL_KINDS
POINTS = "points"  # the kind that asks for every operating point of the file (the runner expands it)


@dataclass(frozen=True)
class Controls:
    """What the control strategies are built from.

    kl_order: non-protected layers, least measured damage first (None: no damage labels).
    modal: the routers' modal skip set on training prompts per threshold key (``threshold_key``).
    """

    kl_order: tuple[int, ...] | None = None
    modal: dict[str, tuple[int, ...]] | None = None
    heal: dict[int, tuple[int, ...]] | None = None  # skip count -> the skip set its adapter heals
    points: dict | None = None  # operating point name -> ``format.Point``


def threshold_key(threshold: float | None) -> str:
    """How a threshold names a ``modal`` strategy and keys its mask: "file" or e.g. "0.25"."""
    return "file" if threshold is None else f"{threshold:g}"


@dataclass(frozen=True)
class Strategy:
    """One runtime configuration; ``apply`` sets it on a ``FirstModel``."""

    name: str
    kind: str
    mode: str
    skip: tuple[int, ...] = ()
    prefill: str = "full"
    threshold: float | None = None
    seed: int | None = None
    heal: bool = False          # the decode runs a healing adapter
    point: str | None = None    # a named operating point of the file
    thin: tuple[int, ...] = ()  # layers decoded with their thin FFN (a point's)
    vocab: bool = False         # decoded with the short output vocabulary (a point's)
    draft: bool = False         # decoded with the run's draft of this name (before any +TARGET) verifying

    @property
    def family(self) -> str:
        """The name without the random seed: the row a strategy is reported under."""
        return self.name.split("/")[0]

    def mask(self, n_layer: int) -> list[bool] | None:
        return None if self.mode != "mask" else [i not in self.skip for i in range(n_layer)]

    def apply(self, llm) -> None:
        """Configure ``llm`` (a ``FirstModel``) for this strategy."""
        if self.point is not None:
            llm.configure(point=self.point)
            return
        llm.configure(mode=self.mode, mask=self.mask(llm.n_layer), prefill=self.prefill,
                      threshold=self.threshold, heal=self.heal, thin=(), vocab=False, warmup=0)  # nothing left from a point
        if self.mode == "first" and self.threshold is None:
            llm.reset_threshold()


def block_influence(layer_inputs: Sequence[np.ndarray]) -> np.ndarray:
    """ShortGPT's block influence of each layer but the last (which gets +inf).

    Args:
        layer_inputs: Per prompt, an array [n_layer, n_tokens, n_embd] of the hidden states
            entering each layer.

    Returns:
        [n_layer] mean over every token of every prompt of 1 - cos(h_i, h_i+1).
    """
    total, count = None, 0
    for h in layer_inputs:
        h = np.asarray(h, dtype=np.float64)
        a, b = h[:-1], h[1:]
        cos = (a * b).sum(-1) / (np.linalg.norm(a, axis=-1) * np.linalg.norm(b, axis=-1) + 1e-12)
        part = (1.0 - cos).sum(-1)
        total = part if total is None else total + part
        count += h.shape[1]
    if total is None or count == 0:
        raise FirstError("block influence needs at least one prompt with one token")
    return np.append(total / count, np.inf)


def static_order(influence: np.ndarray, protected: Sequence[int]) -> list[int]:
    """Non-protected layers, least influential first (ties: lower index first)."""
    return [int(i) for i in np.argsort(influence, kind="stable")
            if int(i) not in set(protected) and np.isfinite(influence[i])]


def candidates(n_layer: int, protected: Sequence[int]) -> list[int]:
    return [i for i in range(n_layer) if i not in set(protected)]


def random_skip(n_layer: int, protected: Sequence[int], k: int, seed: int) -> tuple[int, ...]:
    rng = np.random.default_rng([seed, k])
    return tuple(sorted(int(i) for i in rng.choice(candidates(n_layer, protected), size=k, replace=False)))


def early_exit_skip(n_layer: int, protected: Sequence[int], k: int) -> tuple[int, ...]:
    return tuple(candidates(n_layer, protected)[-k:]) if k else ()


def build_strategies(n_layer: int, protected: Sequence[int], order: Sequence[int], ks: Sequence[int],
                     thresholds: Sequence[float | None], random_seeds: int, kinds: Sequence[str] = KINDS,
                     controls: Controls = Controls(), points: Sequence[str] = (),
                     masks: Sequence[Sequence[int]] = ()) -> list[Strategy]:
    """Every strategy of a run, ``full`` first.

    Args:
        n_layer: Layers of the model.
        protected: Layers that always run.
        order: Non-protected layers, least influential first (``static_order``).
        ks: Skip counts of the input-agnostic strategies.
        thresholds: FiRST thresholds (None: the file's own).
        random_seeds: Seeds of each ``random-K``.
        kinds: Which kinds to include (``full`` always is).
        controls: What ``static-kl``, ``modal``, ``heal`` and the points are built from.
        points: Operating points to include (``point:NAME``), by name (``controls.points``).
        masks: Fixed skip sets to include (``mask:A+B``).
    """
    unknown = set(kinds) - set(ALL_KINDS)
    if unknown:
        raise FirstError(f"unknown strategies {sorted(unknown)}; choose from {', '.join(ALL_KINDS)}")
    if "static-kl" in kinds and controls.kl_order is None:
        raise FirstError("static-kl needs damage labels for this model (first-gguf damage; eval --labels)")
    if "modal" in kinds and controls.modal is None:
        raise FirstError("modal needs the routers' masks on training prompts")
    if "heal" in kinds and not controls.heal:
        raise FirstError("heal needs healing adapters (first-gguf heal; eval --heal FILE)")
    n_free = len(candidates(n_layer, protected))
    for k in ks:
        if not 1 <= k <= n_free:
            raise FirstError(f"skip count {k} outside 1..{n_free} (the non-protected layers of this model)")
    out = [Strategy("full", "full", "full")]
    if "first" in kinds:
        out += [Strategy("first" if t is None else f"first@{t:g}", "first", "first", threshold=t)
                for t in thresholds]
    for k in ks:
        static = tuple(sorted(order[:k]))
        if "static" in kinds:
            out.append(Strategy(f"static-{k}", "static", "mask", static))
        if "random" in kinds:
            out += [Strategy(f"random-{k}/s{s}", "random", "mask", random_skip(n_layer, protected, k, s), seed=s)
                    for s in range(random_seeds)]
        if "early-exit" in kinds:
            out.append(Strategy(f"early-exit-{k}", "early-exit", "mask", early_exit_skip(n_layer, protected, k)))
        if "pruned" in kinds:
            out.append(Strategy(f"pruned-{k}", "pruned", "mask", static, prefill="masked"))
        if "static-kl" in kinds:
            out.append(Strategy(f"static-kl-{k}", "static-kl", "mask", tuple(sorted(controls.kl_order[:k]))))
    if "modal" in kinds:
        for t in thresholds:
            skip = controls.modal.get(threshold_key(t))
            if skip is None:
                raise FirstError(f"no modal mask measured at threshold {threshold_key(t)}")
            if skip:  # a modal mask that skips nothing is ``full``
                out.append(Strategy("modal" if t is None else f"modal@{t:g}", "modal", "mask", tuple(skip),
                                    threshold=t))
    if "heal" in kinds:
        out += [Strategy(f"heal-{k}", "heal", "mask", tuple(skip), heal=True)
                for k, skip in sorted(controls.heal.items())]
    out += [mask_strategy(skip, n_layer, protected) for skip in masks]
    return out + [_point_strategy(name, controls.points or {}) for name in points]


def mask_strategy(skip: Sequence[int], n_layer: int, protected: Sequence[int]) -> Strategy:
    """``mask:A+B``: the layers ``skip`` skipped in decode for every input.

    Raises:
        FirstError: an empty set, a repeated layer, or a layer that is protected or out of range.
    """
    free = set(candidates(n_layer, protected))
    layers = tuple(sorted(int(i) for i in skip))
    if not layers or len(set(layers)) != len(layers) or not free.issuperset(layers):
        raise FirstError(f"mask {list(skip)}: give distinct non-protected layers of the model's {n_layer} "
                         f"(protected: {sorted(protected)})")
    return Strategy("mask:" + "+".join(map(str, layers)), "mask", "mask", layers)


def _point_strategy(name: str, points: dict) -> Strategy:
    p = points.get(name)
    if p is None:
        raise FirstError(f"no operating point {name!r}; the model has {', '.join(points) or 'none'}")
    return Strategy(f"point:{name}", "point", "first" if p.threshold is not None else "mask", p.skip or (),
                    threshold=p.threshold, heal=p.heal is not None, point=name, thin=p.thin or (),
                    vocab=p.vocab)


DRAFT_NAME = re.compile(r"(draft:[A-Za-z0-9._-]+@[a-z0-9][a-z0-9-]*)(?:\+([a-z0-9][a-z0-9-]*))?")


def draft_strategy(name: str, points: dict | None = None) -> Strategy:
    """The strategy named ``draft:FILE@POINT`` (``FILE`` the draft's file name): the file at full
    depth decoding with that draft; with ``+TARGET``, the file at its point TARGET instead."""
    m = DRAFT_NAME.fullmatch(name)
    if not m:
        raise FirstError(f"unknown strategy name {name!r}")
    if m.group(2) is None:
        return Strategy(name, "draft", "full", draft=True)
    return dataclasses.replace(_point_strategy(m.group(2), points or {}), name=name, kind="draft", draft=True)


def draft_of(name: str) -> str:
    """The draft a ``draft:`` strategy decodes with (its name without ``+TARGET``)."""
    return name.split("+")[0]


_NAME = re.compile(r"(?:(full)|(first|modal)(?:@([0-9.e+-]+))?|(static-kl|static|early-exit|pruned|heal)-(\d+)"
                   r"|random-(\d+)/s(\d+)|point:([a-z0-9][a-z0-9-]*)|mask:(\d+(?:\+\d+)*))")


def strategy_from_name(name: str, n_layer: int, protected: Sequence[int], order: Sequence[int],
                       controls: Controls = Controls()) -> Strategy:
    """The strategy ``build_strategies`` names ``name`` (rows of an earlier run carry only names).

    Raises:
        FirstError: a name ``build_strategies`` never writes.
    """
    if name.startswith("draft:"):
        return draft_strategy(name, controls.points)
    m = _NAME.fullmatch(name)
    if not m:
        raise FirstError(f"unknown strategy name {name!r}")
    full, by_threshold, threshold, kind, k, rk, seed, point, mask = m.groups()
    if mask:
        return mask_strategy([int(i) for i in mask.split("+")], n_layer, protected)
    if full:
        return build_strategies(n_layer, protected, order, (), (), 0, ("full",))[0]
    if point:
        return _point_strategy(point, controls.points or {})
    if kind == "heal":
        ks, kinds, seeds = (), (kind,), 0
    elif kind:
        ks, kinds, seeds = (int(k),), (kind,), 0
    elif rk:
        ks, kinds, seeds = (int(rk),), ("random",), int(seed) + 1
    else:
        ks, kinds, seeds = (), (by_threshold,), 0
    built = build_strategies(n_layer, protected, order, ks, (None if threshold is None else float(threshold),),
                             seeds, kinds, controls)
    return next(s for s in built if s.name == name)

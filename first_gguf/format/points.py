"""Named operating points of a FiRST-GGUF (``docs/FORMAT.md`` section 2): parse, check, write back.

A point names one way to run the file: a router threshold (``first`` mode at T) or a fixed
decode skip set (``mask`` mode, the prompt at full depth), the latter optionally healed by an
adapter file that lives beside the GGUF; either, or neither (``mask`` mode skipping nothing),
may decode some layers with their thinned FFN (first.version 2, section 7), and any but a healed
one with the short output vocabulary (first.version 3, section 8; ``vocab`` alone is ``mask`` mode
skipping nothing); any but ``vocab`` alone may run its first decode steps at full depth
(``warmup``, section 3). The GGUF stores each point as one string of ``first.points`` and the
default's name in ``first.points.default``; a JSON file (``first-gguf attach --points``,
``first-gguf points --set``; read by ``points_json.load_points``) says the same as an object.
Every path checks the same rules here, and messages name the file and the entry.
Imports only the standard library, ``constants`` and ``errors``.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Sequence

from ..constants import (KEY_POINTS, KEY_POINTS_DEFAULT, KEY_THIN_LAYERS, KEY_VOCAB_TOKENS, MAX_WARMUP, POINT_HEAL,
                         POINT_KEYS, POINT_SKIP, POINT_THIN, POINT_THRESHOLD, POINT_VOCAB, POINT_WARMUP)
from ..errors import FormatError

NAME = re.compile(r"[a-z0-9][a-z0-9-]{0,31}")
_THRESHOLD = re.compile(r"[01](\.[0-9]+)?")
_LAYERS = re.compile(r"(0|[1-9][0-9]*)(,(0|[1-9][0-9]*))*")
_HEAL_FILE = re.compile(r"[A-Za-z0-9_][A-Za-z0-9._+-]*\.gguf")
_COUNT = re.compile(r"[1-9][0-9]*")
GRAMMAR = ("NAME=threshold:T or NAME=skip:I,J,... or NAME=thin:I,J,... (the first two optionally followed by "
           ";thin:I,J,..., a skip without thin by ;heal:FILE.gguf), then optionally ;warmup:N, any but a healed "
           "one ending in ;vocab, or NAME=vocab")


@dataclass(frozen=True)
class Point:
    """One operating point: at most one of ``threshold`` and ``skip``, and ``thin`` or ``vocab`` when
    neither; ``heal`` only with ``skip`` and never with ``thin`` or ``vocab``.

    Attributes:
        name: [a-z0-9][a-z0-9-]*, at most 32 characters.
        threshold: ``first`` mode at this router threshold, in [0, 1].
        skip: ``mask`` mode skipping these layers in decode (ascending, distinct).
        thin: layers decoded with their thinned FFN (ascending, distinct, in the file's
            first.thin.layers, none skipped); alone: ``mask`` mode skipping nothing.
        heal: file name of a healing adapter for ``skip``, in the GGUF's directory.
        vocab: decode with the file's short output vocabulary (first.vocab.tokens); alone:
            ``mask`` mode skipping nothing.
        warmup: decode steps after each prefill that run every layer (full depth, no thin FFN,
            adapter or short vocabulary) before the point's decode takes over; 0: none.
    """

    name: str
    threshold: float | None = None
    skip: tuple[int, ...] | None = None
    heal: str | None = None
    thin: tuple[int, ...] | None = None
    vocab: bool = False
    warmup: int = 0

    @property
    def kind(self) -> str:
        """``threshold`` (first mode), ``skip`` (mask mode), or ``thin`` / ``vocab`` (mask mode, nothing
        skipped: thin layers, else only the short vocabulary)."""
        if self.threshold is not None:
            return POINT_THRESHOLD
        if self.skip is not None:
            return POINT_SKIP
        return POINT_THIN if self.thin is not None else POINT_VOCAB

    def describe(self) -> str:
        """For people: "threshold 0.5", "skip [4, 9] healed", "skip [4], thin [0, 1, 2], short vocabulary"."""
        parts = [f"threshold {self.threshold}"] if self.threshold is not None else []
        parts += [f"skip {list(self.skip)}"] if self.skip else []
        parts += [f"thin {list(self.thin)}"] if self.thin else []
        parts += ["short vocabulary"] if self.vocab else []
        text = ", ".join(parts) + (" healed" if self.heal else "")
        return text + (f", first {self.warmup} decode steps at full depth" if self.warmup else "")

    def spec(self) -> str:
        """The ``first.points`` entry (canonical: ``parse_spec(p.spec()) == p``)."""
        parts = []
        if self.threshold is not None:
            parts.append(f"{POINT_THRESHOLD}:{_threshold_text(self.threshold)}")
        if self.skip is not None:
            parts.append(f"{POINT_SKIP}:{_layers_text(self.skip)}")
        if self.thin is not None:
            parts.append(f"{POINT_THIN}:{_layers_text(self.thin)}")
        if self.heal:
            parts.append(f"{POINT_HEAL}:{self.heal}")
        if self.warmup:
            parts.append(f"{POINT_WARMUP}:{self.warmup}")
        if self.vocab:
            parts.append(POINT_VOCAB)
        return f"{self.name}={';'.join(parts)}"

    def mask(self, n_layer: int) -> list[bool] | None:
        """Run mask of a mask-mode point (True = the layer runs; a thin-only or vocab-only point
        runs every layer); None for a threshold point."""
        if self.threshold is not None:
            return None
        return [i not in (self.skip or ()) for i in range(n_layer)]

    def thin_mask(self, n_layer: int) -> list[bool] | None:
        """True where the layer decodes with its thinned FFN; None for a point without thin."""
        return None if self.thin is None else [i in self.thin for i in range(n_layer)]

    def as_json(self) -> dict:
        out: dict[str, object] = {}
        if self.threshold is not None:
            out[POINT_THRESHOLD] = self.threshold
        if self.skip is not None:
            out[POINT_SKIP] = list(self.skip)
        if self.thin is not None:
            out[POINT_THIN] = list(self.thin)
        out |= {POINT_HEAL: self.heal} if self.heal else {}
        out |= {POINT_WARMUP: self.warmup} if self.warmup else {}
        return out | ({POINT_VOCAB: True} if self.vocab else {})


@dataclass(frozen=True)
class Points:
    """A file's operating points, in file order, and the default's name (None: no default)."""

    items: tuple[Point, ...] = ()
    default: str | None = None

    def __iter__(self) -> Iterator[Point]:
        return iter(self.items)

    def __len__(self) -> int:
        return len(self.items)

    @property
    def names(self) -> list[str]:
        return [p.name for p in self.items]

    def get(self, name: str) -> Point | None:
        return next((p for p in self.items if p.name == name), None)

    def metadata(self) -> dict[str, object]:
        """The first.points keys of a FiRST-GGUF carrying these points (none when there are none)."""
        if not self.items:
            return {}
        meta: dict[str, object] = {KEY_POINTS: [p.spec() for p in self.items]}
        return meta | ({KEY_POINTS_DEFAULT: self.default} if self.default is not None else {})

    def as_json(self) -> dict:
        """The JSON form ``load_points`` reads."""
        out: dict[str, object] = {"default": self.default} if self.default is not None else {}
        return out | {"points": {p.name: p.as_json() for p in self.items}}


def _threshold_text(t: float) -> str:
    """Positional decimal, shortest round trip (``0.35``, ``0.5``, ``1``), never an exponent."""
    text = repr(float(t))
    if "e" in text:
        from decimal import Decimal

        text = format(Decimal(text), "f")
    return text.rstrip("0").rstrip(".") if "." in text else text


def _layers_text(layers: Sequence[int]) -> str:
    return ",".join(map(str, layers))


def parse_spec(spec: str, where: str) -> Point:
    """One ``first.points`` entry -> Point (syntax only; ``check_points`` applies the rules)."""
    at = f"{where}: {KEY_POINTS} entry {spec!r}"
    name, eq, body = spec.partition("=")
    if not eq:
        raise FormatError(f"{at}: expected {GRAMMAR}")
    parts = body.split(";")
    vocab = len(parts) > 0 and parts[-1] == POINT_VOCAB  # ";vocab" last, or "vocab" alone
    if vocab:
        parts.pop()
        if not parts:
            return Point(name, vocab=True)
    first, *rest = parts
    kind, colon, arg = first.partition(":")
    if not colon or kind not in (POINT_THRESHOLD, POINT_SKIP, POINT_THIN):
        raise FormatError(f"{at}: expected {GRAMMAR}")
    values: dict[str, str] = {kind: arg}
    for part in rest:
        tag, colon, value = part.partition(":")
        if tag == POINT_HEAL and colon and kind != POINT_SKIP:
            raise FormatError(f"{at}: only a skip point takes ';{POINT_HEAL}:FILE.gguf'")
        order, last = [POINT_THIN, POINT_HEAL, POINT_WARMUP], list(values)[-1]  # each once, in this order
        allowed = order[order.index(last) + 1:] if last in order else order
        if not colon or tag not in allowed or (tag == POINT_HEAL and POINT_THIN in values):
            raise FormatError(f"{at}: unexpected {part!r}: the main part may be followed by ';{POINT_THIN}:I,J,...'"
                              f" (not after thin:) or, for a skip point without thin, ';{POINT_HEAL}:FILE.gguf', "
                              f"then ';{POINT_WARMUP}:N', then ';{POINT_VOCAB}' last")
        values[tag] = value
    threshold = None
    if POINT_THRESHOLD in values:
        if not _THRESHOLD.fullmatch(arg):
            raise FormatError(f"{at}: threshold {arg!r} is not a decimal in [0, 1] (e.g. 0.35)")
        threshold = float(arg)
    layers = {}
    for tag in (POINT_SKIP, POINT_THIN):
        if tag in values:
            if not _LAYERS.fullmatch(values[tag]):
                raise FormatError(f"{at}: {tag} {values[tag]!r} is not a comma-separated list of layer numbers "
                                  f"(e.g. 4,9)")
            layers[tag] = tuple(int(i) for i in values[tag].split(","))
    warmup = 0
    if POINT_WARMUP in values:
        if not _COUNT.fullmatch(values[POINT_WARMUP]):
            raise FormatError(f"{at}: warmup {values[POINT_WARMUP]!r} is not a whole number of decode steps "
                              f"from 1 (e.g. 3)")
        warmup = int(values[POINT_WARMUP])
    return Point(name, threshold=threshold, skip=layers.get(POINT_SKIP), heal=values.get(POINT_HEAL),
                 thin=layers.get(POINT_THIN), vocab=vocab, warmup=warmup)


def check_points(points: Points, where: str, n_layer: int, protected: Sequence[int],
                 thin_layers: Sequence[int] | None = None, has_vocab: bool | None = None) -> None:
    """The rules of docs/FORMAT.md section 2 for operating points; FormatError names ``where`` and the point.

    Names match [a-z0-9][a-z0-9-]* (at most 32) and are unique; a point has a threshold or a
    skip set (not both) or only thin layers; a threshold lies in [0, 1]; a skip set is non-empty,
    ascending, distinct, in 0..n_layer-1, leaves a layer running and skips no protected layer; a
    heal file is a plain ``*.gguf`` name on a skip point without thin; thin layers are
    non-empty, ascending, distinct, in range, none skipped, and (``thin_layers`` given: the
    file's first.thin.layers) each carries a thinned FFN; a vocab point is not healed and
    (``has_vocab`` given: whether the file carries first.vocab.tokens) needs a short vocabulary;
    a warm-up is 1..MAX_WARMUP steps on a point that is more than the short vocabulary alone;
    the default names a point.
    """
    seen: set[str] = set()
    for p in points:
        if p.threshold is not None and p.skip is not None:
            raise FormatError(f"{where}: point {p.name!r}: a point is a threshold or a skip set, not both")
        if p.threshold is None and p.skip is None and p.thin is None and not p.vocab:
            raise FormatError(f"{where}: point {p.name!r}: a point is a threshold, a skip set, thin layers or "
                              f"the short vocabulary")
        at = f"{where}: point {p.spec()!r}"
        if not NAME.fullmatch(p.name):
            raise FormatError(f"{at}: name {p.name!r} must match [a-z0-9][a-z0-9-]* (at most 32 characters)")
        if p.name in seen:
            raise FormatError(f"{at}: a second point named {p.name!r}")
        seen.add(p.name)
        if p.threshold is not None and not 0.0 <= p.threshold <= 1.0:  # also rejects NaN
            raise FormatError(f"{at}: threshold {p.threshold} outside [0, 1]")
        if p.skip is not None:
            _check_skip(at, p, n_layer, protected)
        elif p.heal is not None:
            raise FormatError(f"{at}: only a skip point takes a healing adapter")
        if p.thin is not None:
            _check_thin(at, p, n_layer, thin_layers)
        if p.vocab:
            _check_vocab(at, p, has_vocab)
        if p.warmup:
            _check_warmup(at, p)
    if points.default is not None and points.default not in seen:
        raise FormatError(f"{where}: {KEY_POINTS_DEFAULT} is {points.default!r}, not one of the points "
                          f"({', '.join(points.names) or 'none'})")


def _check_skip(at: str, p: Point, n_layer: int, protected: Sequence[int]) -> None:
    skip = list(p.skip)
    if not skip:
        raise FormatError(f"{at}: skips no layer (that is mode full)")
    if skip != sorted(set(skip)):
        raise FormatError(f"{at}: layers {skip} must be ascending and distinct")
    if skip[0] < 0 or skip[-1] >= n_layer:
        raise FormatError(f"{at}: layer {skip[0] if skip[0] < 0 else skip[-1]} outside 0..{n_layer - 1}")
    if len(skip) >= n_layer:
        raise FormatError(f"{at}: skips every layer; at least one must run")
    if hit := sorted(set(skip) & set(protected)):
        raise FormatError(f"{at}: skips protected layers {hit} (first.router.protected_layers always run)")
    if p.heal is not None and not _HEAL_FILE.fullmatch(p.heal):
        raise FormatError(f"{at}: heal {p.heal!r} is not a file name ending in .gguf (the adapter lives "
                          f"beside the GGUF; no directories)")


def _check_thin(at: str, p: Point, n_layer: int, thin_layers: Sequence[int] | None) -> None:
    thin = list(p.thin)
    if not thin:
        raise FormatError(f"{at}: thins no layer; leave thin out instead")
    if thin != sorted(set(thin)):
        raise FormatError(f"{at}: thin layers {thin} must be ascending and distinct")
    if thin[0] < 0 or thin[-1] >= n_layer:
        raise FormatError(f"{at}: thin layer {thin[0] if thin[0] < 0 else thin[-1]} outside 0..{n_layer - 1}")
    if hit := sorted(set(thin) & set(p.skip or ())):
        raise FormatError(f"{at}: layers {hit} are both skipped and thinned")
    if p.heal is not None:
        raise FormatError(f"{at}: a point with thin layers takes no healing adapter")
    if thin_layers is not None and (missing := sorted(set(thin) - set(thin_layers))):
        raise FormatError(f"{at}: thin layers {missing} carry no thinned FFN ({KEY_THIN_LAYERS} "
                          f"{list(thin_layers) or 'absent'})")


def _check_vocab(at: str, p: Point, has_vocab: bool | None) -> None:
    if p.heal is not None:
        raise FormatError(f"{at}: a healed point takes no short vocabulary")
    if has_vocab is False:
        raise FormatError(f"{at}: decodes with the short vocabulary but the file has none "
                          f"({KEY_VOCAB_TOKENS} absent)")


def _check_warmup(at: str, p: Point) -> None:
    if isinstance(p.warmup, bool) or not isinstance(p.warmup, int) or not 1 <= p.warmup <= MAX_WARMUP:
        raise FormatError(f"{at}: warmup {p.warmup!r} must be a whole number of decode steps in 1..{MAX_WARMUP}")
    if p.threshold is None and p.skip is None and p.thin is None:
        raise FormatError(f"{at}: a warm-up needs a threshold, skip set or thin layers to follow it")


def points_from_metadata(meta: dict[str, object], where: str, n_layer: int, protected: Sequence[int],
                         thin_layers: Sequence[int] = (), has_vocab: bool = False) -> Points:
    """The checked points of a FiRST-GGUF's first.* values (types already checked); none when absent.

    ``thin_layers``: the file's first.thin.layers (empty: it has none); ``has_vocab``: whether it
    carries a short vocabulary (first.vocab.tokens).
    """
    specs, default = meta.get(KEY_POINTS), meta.get(KEY_POINTS_DEFAULT)
    if specs is None:
        if default is not None:
            raise FormatError(f"{where}: {KEY_POINTS_DEFAULT} without {KEY_POINTS}")
        return Points()
    if not specs:
        raise FormatError(f"{where}: {KEY_POINTS} is empty; leave the key out instead")
    points = Points(tuple(parse_spec(s, where) for s in specs), default)
    check_points(points, where, n_layer, protected, thin_layers, has_vocab)
    return points


def size_without_points(path: str | os.PathLike) -> int:
    """The byte size ``path`` would have without its ``first.points*`` keys (what ``stamp_points``
    with no points writes): a file's identity for results that do not depend on its points."""
    from .header import read_header

    h = read_header(path)
    drop = sum(kv.end - kv.offset for name, kv in h.fields.items() if name in POINT_KEYS)
    end = h.header_end - drop
    return end + (-end % h.alignment) + (Path(path).stat().st_size - h.data_offset)

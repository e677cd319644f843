"""Named operating points of a FiRST-GGUF (``docs/FORMAT.md`` section 2): parse, check, write back.

A point names one way to run the file: a router threshold (``first`` mode at T) or a fixed
decode skip set (``mask`` mode, the prompt at full depth), the latter optionally healed by an
adapter file that lives beside the GGUF. The GGUF stores each point as one string of
``first.points`` and the default's name in ``first.points.default``; a JSON file
(``first-gguf attach --points``, ``first-gguf points --set``) says the same as an object.
Every path checks the same rules here, and messages name the file and the entry.
Imports only the standard library, ``constants`` and ``errors``.
"""

from __future__ import annotations

import json
import math
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Sequence

from ..constants import KEY_POINTS, KEY_POINTS_DEFAULT, POINT_HEAL, POINT_KEYS, POINT_SKIP, POINT_THRESHOLD
from ..errors import FormatError

NAME = re.compile(r"[a-z0-9][a-z0-9-]{0,31}")
_THRESHOLD = re.compile(r"[01](\.[0-9]+)?")
_LAYERS = re.compile(r"(0|[1-9][0-9]*)(,(0|[1-9][0-9]*))*")
_HEAL_FILE = re.compile(r"[A-Za-z0-9_][A-Za-z0-9._+-]*\.gguf")
GRAMMAR = "NAME=threshold:T or NAME=skip:I,J,... (optionally ;heal:FILE.gguf)"


@dataclass(frozen=True)
class Point:
    """One operating point: exactly one of ``threshold`` and ``skip``; ``heal`` only with ``skip``.

    Attributes:
        name: [a-z0-9][a-z0-9-]*, at most 32 characters.
        threshold: ``first`` mode at this router threshold, in [0, 1].
        skip: ``mask`` mode skipping these layers in decode (ascending, distinct).
        heal: file name of a healing adapter for ``skip``, in the GGUF's directory.
    """

    name: str
    threshold: float | None = None
    skip: tuple[int, ...] | None = None
    heal: str | None = None

    @property
    def kind(self) -> str:
        return POINT_THRESHOLD if self.skip is None else POINT_SKIP

    def spec(self) -> str:
        """The ``first.points`` entry (canonical: ``parse_spec(p.spec()) == p``)."""
        if self.skip is None:
            return f"{self.name}={POINT_THRESHOLD}:{_threshold_text(self.threshold)}"
        heal = f";{POINT_HEAL}:{self.heal}" if self.heal else ""
        return f"{self.name}={POINT_SKIP}:{','.join(map(str, self.skip))}{heal}"

    def mask(self, n_layer: int) -> list[bool] | None:
        """Run mask of a skip point (True = the layer runs); None for a threshold point."""
        return None if self.skip is None else [i not in self.skip for i in range(n_layer)]

    def as_json(self) -> dict:
        if self.skip is None:
            return {POINT_THRESHOLD: self.threshold}
        return {POINT_SKIP: list(self.skip), **({POINT_HEAL: self.heal} if self.heal else {})}


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


def parse_spec(spec: str, where: str) -> Point:
    """One ``first.points`` entry -> Point (syntax only; ``check_points`` applies the rules)."""
    at = f"{where}: {KEY_POINTS} entry {spec!r}"
    name, eq, body = spec.partition("=")
    if not eq:
        raise FormatError(f"{at}: expected {GRAMMAR}")
    main, semi, extra = body.partition(";")
    kind, colon, arg = main.partition(":")
    if not colon or kind not in (POINT_THRESHOLD, POINT_SKIP):
        raise FormatError(f"{at}: expected {GRAMMAR}")
    heal = None
    if semi:
        tag, colon, heal = extra.partition(":")
        if kind != POINT_SKIP or tag != POINT_HEAL or not colon:
            raise FormatError(f"{at}: only a skip point takes ';{POINT_HEAL}:FILE.gguf'")
    if kind == POINT_THRESHOLD:
        if not _THRESHOLD.fullmatch(arg):
            raise FormatError(f"{at}: threshold {arg!r} is not a decimal in [0, 1] (e.g. 0.35)")
        return Point(name, threshold=float(arg))
    if not _LAYERS.fullmatch(arg):
        raise FormatError(f"{at}: skip {arg!r} is not a comma-separated list of layer numbers (e.g. 4,9)")
    return Point(name, skip=tuple(int(i) for i in arg.split(",")), heal=heal)


def check_points(points: Points, where: str, n_layer: int, protected: Sequence[int]) -> None:
    """The rules of docs/FORMAT.md section 2 for operating points; FormatError names ``where`` and the point.

    Names match [a-z0-9][a-z0-9-]* (at most 32) and are unique; a threshold lies in [0, 1]; a
    skip set is non-empty, ascending, distinct, in 0..n_layer-1, leaves a layer running and
    skips no protected layer; a heal file is a plain ``*.gguf`` name; the default names a point.
    """
    seen: set[str] = set()
    for p in points:
        if (p.threshold is None) == (p.skip is None):
            raise FormatError(f"{where}: point {p.name!r}: a point is a threshold or a skip set, exactly one")
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


def points_from_metadata(meta: dict[str, object], where: str, n_layer: int, protected: Sequence[int]) -> Points:
    """The checked points of a FiRST-GGUF's first.* values (types already checked); none when absent."""
    specs, default = meta.get(KEY_POINTS), meta.get(KEY_POINTS_DEFAULT)
    if specs is None:
        if default is not None:
            raise FormatError(f"{where}: {KEY_POINTS_DEFAULT} without {KEY_POINTS}")
        return Points()
    if not specs:
        raise FormatError(f"{where}: {KEY_POINTS} is empty; leave the key out instead")
    points = Points(tuple(parse_spec(s, where) for s in specs), default)
    check_points(points, where, n_layer, protected)
    return points


def load_points(source: Points | dict | str | os.PathLike, n_layer: int, protected: Sequence[int]) -> Points:
    """Checked points from a Points, a JSON object, or a JSON file.

    The JSON form: ``{"default": "balanced", "points": {"quality": {"skip": [4]},
    "fast": {"threshold": 0.5}, "healed": {"skip": [4, 9], "heal": "h.gguf"}}}`` ("default"
    optional; the points in file order).
    """
    if isinstance(source, Points):
        check_points(source, "points", n_layer, protected)
        return source
    where = "points"
    if not isinstance(source, dict):
        where = str(source)
        try:
            source = json.loads(Path(source).read_text())
        except FileNotFoundError:
            raise FormatError(f"{where}: no such file") from None
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise FormatError(f"{where}: not a JSON file ({exc})") from None
    points = _from_json(source, where)
    check_points(points, where, n_layer, protected)
    return points


def _from_json(data: object, where: str) -> Points:
    if not isinstance(data, dict) or not isinstance(data.get("points"), dict) or set(data) - {"default", "points"}:
        raise FormatError(f'{where}: expected {{"default": NAME, "points": {{NAME: {{"skip": [..]}} or '
                          f'{{"threshold": T}}, ...}}}}')
    default = data.get("default")
    if default is not None and not isinstance(default, str):
        raise FormatError(f"{where}: default is {default!r}, expected a point's name")
    return Points(tuple(_point_from_json(name, body, where) for name, body in data["points"].items()), default)


def _point_from_json(name: str, body: object, where: str) -> Point:
    at = f"{where}: point {name!r}"
    keys = set(body) if isinstance(body, dict) else None
    if keys not in ({POINT_THRESHOLD}, {POINT_SKIP}, {POINT_SKIP, POINT_HEAL}):
        raise FormatError(f'{at}: expected {{"threshold": T}} or {{"skip": [I, J, ...]}} (optionally with '
                          f'"heal": FILE.gguf), got {body!r}')
    if POINT_THRESHOLD in body:
        t = body[POINT_THRESHOLD]
        if isinstance(t, bool) or not isinstance(t, (int, float)) or not math.isfinite(t):
            raise FormatError(f"{at}: threshold {t!r} is not a number")
        return Point(name, threshold=float(t))
    skip, heal = body[POINT_SKIP], body.get(POINT_HEAL)
    if not isinstance(skip, list) or any(isinstance(i, bool) or not isinstance(i, int) for i in skip):
        raise FormatError(f"{at}: skip {skip!r} is not a list of layer numbers")
    if heal is not None and not isinstance(heal, str):
        raise FormatError(f"{at}: heal {heal!r} is not a file name")
    return Point(name, skip=tuple(skip), heal=heal)


def size_without_points(path: str | os.PathLike) -> int:
    """The byte size ``path`` would have without its ``first.points*`` keys (what ``stamp_points``
    with no points writes): a file's identity for results that do not depend on its points."""
    from .header import read_header

    h = read_header(path)
    drop = sum(kv.end - kv.offset for name, kv in h.fields.items() if name in POINT_KEYS)
    end = h.header_end - drop
    return end + (-end % h.alignment) + (Path(path).stat().st_size - h.data_offset)

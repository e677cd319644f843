"""Operating points as JSON (``docs/FORMAT.md`` section 2): ``load_points`` reads and checks them.

The JSON form is what ``first-gguf attach --points``, ``first-gguf points --set`` and the shipped
``first_gguf/data/<model>.points.json`` use; the grammar of ``first.points`` and the rules are
``points``'. Imports only the standard library, ``constants``, ``errors`` and ``points``.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Sequence

from ..constants import POINT_HEAL, POINT_SKIP, POINT_THIN, POINT_THRESHOLD, POINT_VOCAB, POINT_WARMUP
from ..errors import FormatError
from .points import Point, Points, check_points


def load_points(source: Points | dict | str | os.PathLike, n_layer: int, protected: Sequence[int],
                thin_layers: Sequence[int] | None = None, has_vocab: bool | None = None) -> Points:
    """Checked points from a Points, a JSON object, or a JSON file.

    The JSON form: ``{"default": "balanced", "points": {"quality": {"skip": [4]},
    "fast": {"threshold": 0.5}, "healed": {"skip": [4, 9], "heal": "h.gguf"},
    "lean": {"thin": [0, 1, 2]}, "fast-thin": {"threshold": 0.5, "thin": [1, 2]},
    "short": {"vocab": true}, "quick": {"skip": [4], "vocab": true}}}``
    ("default" optional; the points in file order; "vocab" true or absent).

    ``thin_layers``: the first.thin.layers of the file the points are for (empty: it has none);
    None: thin layers are checked for range only. ``has_vocab``: whether that file carries a
    short vocabulary (first.vocab.tokens); None: not checked.
    """
    if isinstance(source, Points):
        check_points(source, "points", n_layer, protected, thin_layers, has_vocab)
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
    check_points(points, where, n_layer, protected, thin_layers, has_vocab)
    return points


def _from_json(data: object, where: str) -> Points:
    if not isinstance(data, dict) or not isinstance(data.get("points"), dict) or set(data) - {"default", "points"}:
        raise FormatError(f'{where}: expected {{"default": NAME, "points": {{NAME: {{"skip": [..]}} or '
                          f'{{"threshold": T}}, ...}}}}')
    default = data.get("default")
    if default is not None and not isinstance(default, str):
        raise FormatError(f"{where}: default is {default!r}, expected a point's name")
    return Points(tuple(_point_from_json(name, body, where) for name, body in data["points"].items()), default)


# The key sets of a point's JSON object, each also with "vocab" and / or "warmup" (and "vocab" alone).
_JSON_KEYS = ({POINT_THRESHOLD}, {POINT_SKIP}, {POINT_SKIP, POINT_HEAL}, {POINT_THIN}, {POINT_THRESHOLD, POINT_THIN},
              {POINT_SKIP, POINT_THIN}, set())


def _point_from_json(name: str, body: object, where: str) -> Point:
    at = f"{where}: point {name!r}"
    keys = set(body) if isinstance(body, dict) else None
    if not keys or keys - {POINT_VOCAB, POINT_WARMUP} not in _JSON_KEYS:
        raise FormatError(f'{at}: expected {{"threshold": T}} or {{"skip": [I, J, ...]}} (optionally with '
                          f'"heal": FILE.gguf), either optionally with "thin": [I, J, ...], or {{"thin": [I, J, ...]}}, '
                          f'each optionally with "warmup": N and "vocab": true, or {{"vocab": true}}, got {body!r}')
    threshold = None
    if POINT_THRESHOLD in body:
        t = body[POINT_THRESHOLD]
        if isinstance(t, bool) or not isinstance(t, (int, float)) or not math.isfinite(t):
            raise FormatError(f"{at}: threshold {t!r} is not a number")
        threshold = float(t)
    layers = {}
    for tag in (POINT_SKIP, POINT_THIN):
        if tag not in body:
            layers[tag] = None
            continue
        value = body[tag]
        if not isinstance(value, list) or any(isinstance(i, bool) or not isinstance(i, int) for i in value):
            raise FormatError(f"{at}: {tag} {value!r} is not a list of layer numbers")
        layers[tag] = tuple(value)
    heal = body.get(POINT_HEAL)
    if heal is not None and not isinstance(heal, str):
        raise FormatError(f"{at}: heal {heal!r} is not a file name")
    if POINT_VOCAB in body and body[POINT_VOCAB] is not True:
        raise FormatError(f"{at}: vocab {body[POINT_VOCAB]!r} must be true (or left out)")
    warmup = body.get(POINT_WARMUP, 0)
    if isinstance(warmup, bool) or not isinstance(warmup, int) or (POINT_WARMUP in body and warmup < 1):
        raise FormatError(f"{at}: warmup {warmup!r} is not a whole number of decode steps from 1 (or left out)")
    return Point(name, threshold=threshold, skip=layers[POINT_SKIP], heal=heal, thin=layers[POINT_THIN],
                 vocab=POINT_VOCAB in body, warmup=warmup)

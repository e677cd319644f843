"""What the control strategies are made of: the measured-damage order and the routers' modal masks,
and what a run directory binds the healed and named-point strategies to.

``static-kl`` and ``modal`` answer "is it the input adaptivity that helps?": ``static-kl`` is the
best fixed mask the same damage measure the new routers learn from can choose, ``modal`` is the
mask the routers themselves pick most often, applied to every input. ``heal.json`` and
``points.json`` in a run directory bind ``heal-K`` and ``point:NAME`` rows to what produced them.
"""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path
from typing import Sequence

from ..errors import FirstError
from .strategies import threshold_key


def kl_order_from_labels(labels: Path, n_layer: int, protected: Sequence[int]) -> list[int]:
    """Non-protected layers, least mean measured damage first, from a damage label file."""
    from ..damage import damage_order, read_labels

    _, rows = read_labels(labels)
    return damage_order(rows, n_layer, protected)


def modal_masks(llm, examples: Sequence, thresholds: Sequence[float | None]) -> dict[str, list[int]]:
    """The routers' most frequent skip set over ``examples`` (first-mode prefills), per threshold.

    Ties go to the set seen first. Leaves ``llm`` in ``first`` mode at the file's threshold.
    """
    llm.configure(mode="first")
    llm.reset_threshold()
    counts: dict[str, Counter] = {threshold_key(t): Counter() for t in thresholds}
    for ex in examples:
        llm.prefill(ex.prompt)
        for t in thresholds:
            mask = llm.router_mask(t)
            counts[threshold_key(t)][tuple(i for i, m in enumerate(mask) if not m)] += 1
    return {key: list(c.most_common(1)[0][0]) for key, c in counts.items()}


def heal_sets(out: Path, heals: Sequence[str]) -> dict[int, tuple[int, ...]] | None:
    """Skip count -> skip set of each ``heal-K``: the adapters given, and those of earlier commands
    (``out/heal.json`` binds each K to one adapter file by name and size)."""
    from ..format import read_heal

    path = out / "heal.json"
    known = json.loads(path.read_text()) if path.is_file() else {}
    for file in heals:
        info = read_heal(file)
        entry = {"file": Path(file).name, "bytes": Path(file).stat().st_size, "skip": list(info.skip)}
        k = str(len(info.skip))
        if known.get(k, entry) != entry:
            raise FirstError(f"{out}: heal-{k} rows come from {known[k]['file']} ({known[k]['bytes']} bytes); "
                             f"{file} differs: use another --out directory")
        known[k] = entry
    if heals:
        path.write_text(json.dumps(known, indent=1) + "\n")
    return {int(k): tuple(v["skip"]) for k, v in known.items()} or None


def bind_points(out: Path, model: str, points, names: Sequence[str]) -> dict:
    """Name -> Point of the operating points a run evaluates (``names``, of the file's ``points``)
    and of those earlier commands did: ``out/points.json`` binds each name to the entry its rows
    ran, so a file whose point changed under the same name is refused, never mixed into old rows."""
    from ..format.points import parse_spec

    path = out / "points.json"
    known = json.loads(path.read_text()) if path.is_file() else {}
    for name in names:
        p = points.get(name)
        if p is None:
            raise FirstError(f"{Path(model).name}: no operating point {name!r}; "
                             f"it has {', '.join(points.names) or 'none'}")
        if known.get(name, p.spec()) != p.spec():
            raise FirstError(f"{out}: point:{name} rows ran {known[name]!r}, the file now says {p.spec()!r}: "
                             f"use another --out directory")
        known[name] = p.spec()
    if names:
        path.write_text(json.dumps(known, indent=1) + "\n")
    return {name: parse_spec(spec, str(path)) for name, spec in known.items()}

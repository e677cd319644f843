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
from typing import Callable, Sequence

from ..errors import FirstError
from .items import training_prompts
from .strategies import Controls, threshold_key


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


def load_controls(out: Path, cfg, llm, protected: list[int], log: Callable[[str], None]) -> Controls:
    """The controls of run directory ``out`` for ``cfg`` (an ``EvalConfig``), measured where missing."""
    kl_path, modal_path = out / "static-kl.json", out / "modal.json"
    kl_order = json.loads(kl_path.read_text())["order"] if kl_path.is_file() else None
    if kl_order is None and "static-kl" in cfg.kinds:
        labels = labels_path(cfg.model, cfg.labels)
        kl_order = kl_order_from_labels(labels, llm.n_layer, protected)
        kl_path.write_text(json.dumps({"labels": labels.name, "order": kl_order}, indent=1) + "\n")
    modal = json.loads(modal_path.read_text()) if modal_path.is_file() else {}
    missing = [t for t in cfg.thresholds if threshold_key(t) not in modal]
    if missing and "modal" in cfg.kinds:
        examples = training_prompts(llm, cfg.n_static * 4, cfg.max_prompt_tokens, cfg.seed + 1)
        log(f"the routers' masks on {len(examples)} training prompts")
        modal.update(modal_masks(llm, examples, missing))
        modal_path.write_text(json.dumps(modal, indent=1) + "\n")
    return Controls(tuple(kl_order) if kl_order is not None else None,
                    {k: tuple(v) for k, v in modal.items()} if modal else None, heal_sets(out, cfg.heals))


def heal_sets(out: Path, heals: Sequence[str]) -> dict[int, tuple[int, ...]] | None:
    """Skip count -> skip set of each ``heal-K``: the adapters given, and those of earlier commands
    (``heal.json`` binds each K to one adapter file by name and size)."""
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


def labels_path(model: str, labels: str | None) -> Path:
    """The damage labels of ``model``: ``labels``, else those shipped for its zoo name."""
    from .. import shipped

    name = Path(model).name.removesuffix(".gguf").removesuffix(".first")
    path = Path(labels) if labels else shipped.shipped_labels_path(name)
    if path is None:
        raise FirstError(f"static-kl needs damage labels for {Path(model).name}: measure them with "
                         "`first-gguf damage` and pass --labels")
    return path


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

"""What the control strategies are made of: the measured-damage order and the routers' modal masks.

Both answer "is it the input adaptivity that helps?": ``static-kl`` is the best fixed mask
the same damage measure the new routers learn from can choose, ``modal`` is the mask the
routers themselves pick most often, applied to every input.
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import Sequence

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

"""Router training (and LoRA healing) for Hugging Face causal LMs: ``docs/FORMAT.md`` section 1.

``train_routers`` is what ``first-gguf train`` runs; ``evaluate_routers`` (``quality.py``)
measures routers teacher-forced under the hard rule (``format_training_report`` prints its
tables). They import torch, so this package loads them on first use.
"""

from __future__ import annotations

__all__ = ["train_routers", "evaluate_routers", "format_training_report"]


def __getattr__(name: str):
    if name == "train_routers":
        from .trainer import train_routers

        return train_routers
    if name == "evaluate_routers":
        from .quality import evaluate_routers

        return evaluate_routers
    if name == "format_training_report":
        from .report import format_training_report

        return format_training_report
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")

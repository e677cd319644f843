"""Argument helpers shared by the command modules (no heavy imports)."""

from __future__ import annotations

from pathlib import Path

import click

PathArg = click.Path(dir_okay=False, path_type=Path)


def gguf_path(model: str) -> Path:
    """A GGUF path, or the base GGUF of a zoo model (fetched if needed)."""
    from . import models as zoo

    path = Path(model)
    if path.exists() or model not in zoo.MODELS:
        return path
    return zoo.fetch(model)


def csv_values(value: str | None, cast, option: str):
    try:
        return tuple(cast(v) for v in value.split(",") if v) if value else None
    except ValueError:
        raise click.BadParameter(f"expected comma-separated {cast.__name__} values, got {value!r}",
                                 param_hint=option) from None

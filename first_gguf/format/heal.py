"""Healing adapters: a LoRA GGUF (llama.cpp's adapter format) plus the skip set it heals.

``convert_lora_to_gguf.py`` (llama.cpp's own) writes the adapter; ``stamp_heal`` copies it
byte for byte and adds the ``first.heal.*`` keys of docs/FORMAT.md section 6; ``read_heal``
checks a file against those rules. numpy + gguf only.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

from gguf import GGUFValueType

from ..errors import FormatError
from ..paths import atomic_output, check_output_path
from .header import read_header
from .reader import architecture
from .writer import copied_fields, gguf_writer, write_tensors

HEAL_VERSION = 1
KEY_HEAL_VERSION = "first.heal.version"  # u32
KEY_HEAL_SKIP = "first.heal.skip"        # array[i32], ascending: the decode skip set the adapter heals
KEY_HEAL_N_LAYER = "first.heal.n_layer"  # u32, the base model's layer count
KEY_HEAL_SOURCE = "first.heal.source"    # string, how it was trained (free text)
GENERAL_TYPE = "general.type"
ADAPTER_TYPE = "adapter.type"


@dataclass(frozen=True)
class HealInfo:
    """What a healing adapter file declares."""

    path: Path
    arch: str
    skip: tuple[int, ...]
    n_layer: int
    source: str

    def heals(self, mask: Sequence[bool]) -> bool:
        """True when ``mask`` (one bool per layer, True = run) skips exactly this adapter's set."""
        return len(mask) == self.n_layer and tuple(i for i, run in enumerate(mask) if not run) == self.skip


def _string(reader, key: str) -> str | None:
    field = reader.fields.get(key)
    if field is None or field.types[0] != GGUFValueType.STRING:
        return None
    return bytes(field.parts[-1]).decode("utf-8", "replace")


def read_heal(path: str | os.PathLike) -> HealInfo:
    """Check a healing adapter (docs/FORMAT.md section 6) and return what it declares.

    Raises:
        FormatError: not a GGUF, not a LoRA adapter, or missing / malformed ``first.heal.*`` keys
            (the message names the file).
    """
    where = str(path)
    reader = read_header(path)
    if _string(reader, GENERAL_TYPE) != "adapter" or _string(reader, ADAPTER_TYPE) != "lora":
        raise FormatError(f"{where}: not a LoRA adapter GGUF (general.type 'adapter', adapter.type 'lora' expected)")
    fields = reader.fields
    missing = [k for k in (KEY_HEAL_VERSION, KEY_HEAL_SKIP, KEY_HEAL_N_LAYER) if k not in fields]
    if missing:
        raise FormatError(f"{where}: a LoRA adapter without {', '.join(missing)}: not a healing adapter "
                          f"(first-gguf heal writes them)")
    version = int(fields[KEY_HEAL_VERSION].contents())
    if version != HEAL_VERSION:
        raise FormatError(f"{where}: {KEY_HEAL_VERSION} = {version}; this reader knows version {HEAL_VERSION}")
    n_layer = int(fields[KEY_HEAL_N_LAYER].contents())
    skip_field = fields[KEY_HEAL_SKIP]
    if skip_field.types != [GGUFValueType.ARRAY, GGUFValueType.INT32]:
        raise FormatError(f"{where}: {KEY_HEAL_SKIP} must be an array of int32")
    skip = tuple(int(i) for i in skip_field.contents())
    _check_skip(where, skip, n_layer)
    return HealInfo(Path(path), architecture(reader) or "", skip, n_layer, _string(reader, KEY_HEAL_SOURCE) or "")


def _check_skip(where: str, skip: Sequence[int], n_layer: int) -> None:
    if not skip or list(skip) != sorted(set(skip)) or skip[0] < 0 or skip[-1] >= n_layer or len(skip) >= n_layer:
        raise FormatError(f"{where}: {KEY_HEAL_SKIP} = {list(skip)} is not an ascending set of distinct layers "
                          f"in 0..{n_layer - 1} leaving one")


def stamp_heal(adapter: str | os.PathLike, skip: Sequence[int], n_layer: int, source: str,
               out: str | os.PathLike, force: bool = False) -> HealInfo:
    """Copy the LoRA GGUF ``adapter`` to ``out`` with the ``first.heal.*`` keys; returns what ``out`` declares."""
    out = Path(out)
    _check_skip(str(out), tuple(int(i) for i in skip), n_layer)
    check_output_path(out, force, (Path(adapter),))
    reader = read_header(adapter)
    if _string(reader, GENERAL_TYPE) != "adapter":
        raise FormatError(f"{adapter}: not a LoRA adapter GGUF")
    with atomic_output(out) as tmp, gguf_writer(reader, architecture(reader) or "", tmp) as writer:
        for field in copied_fields(reader):
            writer.copy_field(reader, field)
        writer.add_uint32(KEY_HEAL_VERSION, HEAL_VERSION)
        writer.add_array(KEY_HEAL_SKIP, [int(i) for i in skip])
        writer.add_uint32(KEY_HEAL_N_LAYER, int(n_layer))
        writer.add_string(KEY_HEAL_SOURCE, source)
        write_tensors(writer, reader, [(t.name, t) for t in reader.tensors])
    return read_heal(out)

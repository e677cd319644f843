"""A GGUF with some blocks physically removed: the speed limit of layer skipping and the
reference that ``mask`` mode with ``prefill=masked`` must match (docs/FORMAT.md section 3).

Like ``llama-quantize --prune-layers``: the kept blocks are renumbered 0..k-1, the block
count and any per-layer array key are cut to them, every other key and tensor is copied
byte for byte. Router tensors, thinned FFNs, the short output vocabulary and ``first.*`` keys are
dropped (the result is a plain GGUF). With ``thin``, a FiRST-GGUF's thinned FFNs (docs/FORMAT.md
section 7) replace the full ones of their layers (and its attention copies the attention weights)
and ``feed_forward_length`` follows: the reference for ``mask`` mode with thin layers and
``prefill=masked``. Every kept layer must then have the same FFN width (llama.cpp's loaders for
qwen2, llama, qwen3 and gemma3 take one width for every layer).
numpy + gguf only.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any, Iterable

from gguf import GGUFValueType

from ..constants import FIRST_KEY_PREFIX, ROUTER_NAME_MARKER, VOCAB_TENSOR, is_thin_part
from ..errors import FormatError
from ..paths import atomic_output, check_output_path
from .header import read_header
from .reader import Reader, model_dims
from .writer import CopyWriter, copied_fields, gguf_writer, write_tensors

_BLOCK = re.compile(r"^blk\.(\d+)\.(.+)$")
# tensors a thin layer carries a stand-in of: its FFN, and with attention copies its attention weights
_FFN = ("ffn_gate", "ffn_up", "ffn_down", "attn_q", "attn_k", "attn_v", "attn_output")


def prune_gguf(base_path: str | os.PathLike, skip: Iterable[int], out_path: str | os.PathLike,
               force: bool = False, thin: bool = False) -> Path:
    """Write ``base`` without the blocks in ``skip``.

    Args:
        base_path: Any GGUF (a FiRST-GGUF loses its routers).
        skip: Layer indices to remove; at least one layer must stay.
        out_path: Where to write (never the base).
        force: Overwrite an existing output.
        thin: Physically thin the FFNs of the layers with thinned FFNs (the file must have some).

    Returns:
        The output path.
    """
    base, out = Path(base_path), Path(out_path)
    check_output_path(out, force, inputs=(base,))
    reader = read_header(base)
    arch, n_layer, _ = model_dims(reader, str(base))
    skip = sorted(set(int(i) for i in skip))
    if bad := [i for i in skip if not 0 <= i < n_layer]:
        raise FormatError(f"{base}: layers {bad} out of range (it has {n_layer})")
    keep = [i for i in range(n_layer) if i not in skip]
    if not keep:
        raise FormatError(f"{base}: pruning every layer leaves no model")
    widths = _thin_widths(reader, str(base), arch, n_layer) if thin else {}
    if len({widths[i] for i in keep if i in widths}) > 1:
        raise FormatError(f"{base}: the kept layers' FFN widths would differ once thinned "
                          f"({sorted({widths[i] for i in keep})}); llama.cpp takes one width for every layer")
    with atomic_output(out) as tmp:
        with gguf_writer(reader, arch, tmp) as writer:
            _copy_fields(writer, reader, arch, n_layer, keep, widths)
            write_tensors(writer, reader, _kept_tensors(reader, keep, bool(widths)))
        _, got_layers, _ = model_dims(read_header(tmp), str(out))
        if got_layers != len(keep):
            raise FormatError(f"{out}: read-back check failed: {got_layers} layers, expected {len(keep)}")
    return out


def _thin_widths(reader: Reader, where: str, arch: str, n_layer: int) -> dict[int, int]:
    """Per layer, its FFN width once thinned (the base's where it has no thinned FFN)."""
    from .reader import first_parts_from_reader
    from .thin import ffn_length

    info = first_parts_from_reader(reader, where).thin
    if info is None:
        raise FormatError(f"{where}: has no thinned FFNs to thin with")
    return {i: info.width(i) if i in info.layers else ffn_length(reader, arch, i, where) for i in range(n_layer)}


def _copy_fields(writer: CopyWriter, reader: Reader, arch: str, n_layer: int, keep: list[int],
                 widths: dict[int, int]) -> None:
    """Every key byte for byte, except the block count and per-layer arrays, cut to ``keep``,
    and with ``widths``, the FFN width."""
    block_count, ffn = f"{arch}.block_count", f"{arch}.feed_forward_length"
    for field in copied_fields(reader):
        if field.name == block_count:
            writer.add_uint32(block_count, len(keep))
        elif field.name == ffn and widths:
            writer.add_uint32(ffn, widths[keep[0]])
        elif _per_layer_array(field, arch, n_layer):
            values = field.contents()
            writer.add_array(field.name, [values[i] for i in keep])
        else:
            writer.copy_field(reader, field)


def _kept_tensors(reader: Reader, keep: list[int], thin: bool = False) -> list[tuple[str, Any]]:
    """(new name, tensor) of every tensor but the routers, thinned FFNs, the short vocabulary and removed blocks; blocks
    renumbered; with ``thin``, a layer's thinned FFN (and attention copies) in place of its own."""
    renumber = {old: new for new, old in enumerate(keep)}
    by_name = {t.name: t for t in reader.tensors}
    kept = []
    for t in reader.tensors:
        m = _BLOCK.match(t.name)
        if (ROUTER_NAME_MARKER in t.name or is_thin_part(t.name) or t.name == VOCAB_TENSOR
                or (m and int(m.group(1)) not in renumber)):
            continue
        if thin and m and m.group(2).split(".")[0] in _FFN:
            t = by_name.get(t.name.replace(f".{m.group(2)}", f".first_{m.group(2)}"), t)
        kept.append((f"blk.{renumber[int(m.group(1))]}.{m.group(2)}" if m else t.name, t))
    return kept


def parse_layers(text: str) -> list[int]:
    """``"9,10,12-14"`` -> [9, 10, 12, 13, 14]."""
    out = []
    for part in filter(None, (p.strip() for p in text.split(","))):
        lo, _, hi = part.partition("-")
        try:
            out += list(range(int(lo), int(hi or lo) + 1))
        except ValueError:
            raise FormatError(f"layer list {text!r}: {part!r} is not a layer or a range") from None
    return out


def _per_layer_array(field, arch: str, n_layer: int) -> bool:
    # e.g. per-layer head counts; a FiRST key never reaches here (copied_fields drops them)
    return (field.name.startswith(f"{arch}.") and field.types[0] == GGUFValueType.ARRAY
            and len(field.contents()) == n_layer and not field.name.startswith(FIRST_KEY_PREFIX))

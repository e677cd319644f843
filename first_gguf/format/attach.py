"""Attach routers to a GGUF: base + routers -> FiRST-GGUF (``docs/FORMAT.md`` section 2).

numpy + gguf + safetensors only, never torch. Shapes: in memory and in router files the
tensors are NumPy / torch shaped (``constants.router_shape``: W1 is ``(hidden, n_embd)``);
the GGUF stores them with ``ne`` reversed (``constants.router_ne``: W1 is ``[n_embd, hidden]``).

``attach_routers`` rewrites the base GGUF byte for byte (``writer``), then adds the routers
and first.* keys (and the operating points, ``points``). It writes a temporary file next to
the output, reads it back and checks it, then renames it. The routers are checked once, where
they come in (``checked_routers``); ``attach_checked`` is the same write for routers a caller
has already checked (``convert`` checks them before its long stages). ``stamp_points`` copies
a FiRST-GGUF byte for byte with other operating points.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import gguf
import numpy as np
from gguf import GGMLQuantizationType

from ..constants import (FIRST_KEY_PREFIX, FIRST_VERSION, KEY_VERSION, POINT_KEYS, ROUTER_NAME_MARKER, THIN_KEY_PREFIX,
                         VOCAB_KEY_PREFIX, first_version_for)
from ..errors import FormatError
from ..paths import atomic_output, check_output_path
from .header import read_header
from .points import Points
from .points_json import load_points
from .reader import KEY_TYPES, Reader, field_type, first_from_reader, first_parts_from_reader, int_key, model_dims
from .router_file import checked_routers
from .routers import RouterSet, check_w1_dtype, router_arrays
from .rules import parse_router_name
from .thin import ThinInfo, thin_from_reader
from .vocab import VocabInfo, vocab_from_reader
from .writer import base_tensors, copied_fields, gguf_writer, write_tensors

PointsArg = Points | dict | str | os.PathLike | None

logger = logging.getLogger(__name__)


def write_gguf(reader: Reader, arch: str, metadata: dict[str, object],
               new: list[tuple[str, np.ndarray]], path: Path, raw_fields: list = ()) -> None:
    """Base KVs and tensors (bytes and types as they are), then the first.* keys, ``raw_fields``
    of ``reader`` byte for byte (the thinned FFNs' and short vocabulary's keys), and the routers.

    No check of any kind: ``attach_checked`` checks before and reads back after.
    """
    with gguf_writer(reader, arch, path) as writer:
        for field in copied_fields(reader):
            writer.copy_field(reader, field)
        for key, value in metadata.items():
            writer.add_key_value(key, value, KEY_TYPES[key][0], sub_type=KEY_TYPES[key][1])
        for field in raw_fields:
            writer.copy_field(reader, field)
        write_tensors(writer, reader, [(t.name, t) for t in base_tensors(reader)], new)


def base_parts(reader: Reader, where: str) -> tuple[list, ThinInfo | None, VocabInfo | None]:
    """(first.thin.* and first.vocab.* fields in file order, checked ThinInfo, checked VocabInfo) of a
    base; ([], None, None) for a base without thinned FFNs and short vocabulary.

    Only these parts are checked (their keys' types, tensors and their agreement): a base's old
    routers are replaced, whatever they were.
    """
    fields = [f for f in reader.fields.values() if f.name.startswith((THIN_KEY_PREFIX, VOCAB_KEY_PREFIX))]
    meta: dict[str, object] = {KEY_VERSION: FIRST_VERSION}  # the parts are kept, so the base's version is not
    for field in fields:
        want = KEY_TYPES.get(field.name)
        if want is None:
            raise FormatError(f"{where}: unknown key {field.name}")
        if field_type(field) != want:
            raise FormatError(f"{where}: {field.name} has type {field_type(field)[0].name}, expected "
                              f"{want[0].name}" + (f"[{want[1].name}]" if want[1] else ""))
        meta[field.name] = field.contents()
    arch, n_layer, n_embd = model_dims(reader, where)
    return fields, thin_from_reader(reader, where, meta, arch, n_layer, n_embd), vocab_from_reader(reader, where, meta)


def _verify_written(path: Path, base: Reader, new: list[tuple[str, np.ndarray]], points: Points,
                    where: str) -> None:
    """Read the new file back: valid FiRST-GGUF, every KV and tensor (name, type, shape) as planned."""
    out = read_header(path)
    back, back_points = first_from_reader(out, where)
    if back_points != points:
        raise FormatError(f"{where}: read-back check failed: the operating points differ")
    want_kv = [(f.name, field_type(f)) for f in copied_fields(base)]
    got_kv = [(f.name, field_type(f)) for f in copied_fields(out)]
    if want_kv != got_kv:
        raise FormatError(f"{where}: read-back check failed: the key/value table differs from the base")
    ggml = {np.dtype(np.float16): GGMLQuantizationType.F16, np.dtype(np.float32): GGMLQuantizationType.F32}
    want = [(t.name, t.tensor_type, tuple(int(n) for n in t.shape), t.n_bytes) for t in base_tensors(base)]
    want += [(name, ggml[arr.dtype], tuple(reversed(arr.shape)), arr.nbytes) for name, arr in new]
    got = [(t.name, t.tensor_type, tuple(int(n) for n in t.shape), t.n_bytes) for t in out.tensors]
    if want != got:
        i = next((i for i, (w, g) in enumerate(zip(want, got)) if w != g), min(len(want), len(got)))
        raise FormatError(f"{where}: read-back check failed at tensor #{i}: planned "
                          f"{want[i] if i < len(want) else None}, written {got[i] if i < len(got) else None}")
    for name, arr in new:
        bid, role = parse_router_name(name)
        if not np.array_equal(back.tensors[bid][role], arr.astype(np.float32)):
            raise FormatError(f"{where}: read-back check failed: {name} differs from the routers")


def attach_routers(base_path: str | os.PathLike, routers: RouterSet | str | os.PathLike,
                   out_path: str | os.PathLike, force: bool = False, w1_dtype: str = "f32",
                   points: PointsArg = None) -> Path:
    """Write ``base + routers`` as a FiRST-GGUF; the inputs are never modified.

    Every check runs before anything is written (routers valid, base readable, routers sized
    for the base, output path allowed); the file is written to a temporary name next to the
    output, read back and checked, then renamed. A base that is already a FiRST-GGUF has
    its routers and first.* keys replaced; its thinned FFNs (first.thin.* keys and tensors,
    docs/FORMAT.md section 7) and short output vocabulary (first.vocab.* keys and tensor,
    section 8) are kept as they are.

    Args:
        base_path: The base GGUF (any quantization).
        routers: A RouterSet, or a router file (.safetensors), for exactly the base's
            ``block_count`` layers and ``embedding_length``; checked once, here.
        out_path: The FiRST-GGUF to write; never the base itself.
        force: Overwrite an existing output.
        w1_dtype: "f32" or "f16" for W1 (every other router tensor is F32).
        points: Operating points to carry (``first.points``): a ``Points``, their JSON object or a
            JSON file (``points.load_points``); None: none.

    Returns:
        The output path.
    """
    return attach_checked(base_path, checked_routers(routers), out_path, force=force, w1_dtype=w1_dtype,
                          points=points)


def attach_checked(base_path: str | os.PathLike, routers: RouterSet, out_path: str | os.PathLike,
                   force: bool = False, w1_dtype: str = "f32", points: PointsArg = None) -> Path:
    """``attach_routers`` for routers already checked (``checked_routers``, ``load_router_file``).

    The routers' rules are not checked again; everything else is (base, sizes, output).
    """
    base, out = Path(base_path), Path(out_path)
    check_w1_dtype(w1_dtype)
    check_output_path(out, force, inputs=(base,))
    reader = read_header(base)
    arch, n_layer, n_embd = model_dims(reader, str(base))
    if (int_key(reader, gguf.Keys.Split.LLM_KV_SPLIT_COUNT) or 1) > 1:
        raise FormatError(f"{base}: one shard of a split GGUF; merge it first (llama-gguf-split --merge)")
    for what, mine, theirs in (("layers", routers.n_layer, n_layer), ("n_embd", routers.n_embd, n_embd)):
        if mine != theirs:
            amount = f"{mine} layers" if what == "layers" else f"n_embd {mine}"
            raise FormatError(f"{routers.source}: routers are for {amount} but {base} has {theirs}")
    kept_fields, thin, vocab = base_parts(reader, str(base))
    thin_layers = thin.layers if thin else ()
    points = (Points() if points is None else
              load_points(points, n_layer, routers.protected_layers, thin_layers, vocab is not None))
    new = router_arrays(routers, w1_dtype)
    old = [t.name for t in reader.tensors if ROUTER_NAME_MARKER in t.name]
    if old or any(name.startswith(FIRST_KEY_PREFIX) for name in reader.fields):
        kept = " and ".join(what for what, part in (("thinned FFNs", thin), ("short vocabulary", vocab)) if part)
        logger.warning("%s is already a FiRST-GGUF: replacing its %d router tensors and first.* keys%s",
                       base, len(old), f" (keeping its {kept})" if kept else "")
    with atomic_output(out) as tmp:
        version = {KEY_VERSION: first_version_for(thin=thin is not None, vocab=vocab is not None,
                                                  attn=thin is not None and thin.attn)}
        write_gguf(reader, arch, routers.metadata() | points.metadata() | version, new, tmp, kept_fields)
        _verify_written(tmp, reader, new, points, str(out))
    return out


def stamp_points(path: str | os.PathLike, points: PointsArg, out_path: str | os.PathLike,
                 force: bool = False) -> Path:
    """Copy the FiRST-GGUF ``path`` to ``out_path`` with other operating points; the input is never modified.

    Every key/value and tensor but the old ``first.points*`` keys is copied byte for byte, in
    order (first.version, the thinned FFNs and short vocabulary too); the new keys follow (none
    for no points). The copy is read back and checked.

    Args:
        path: A valid FiRST-GGUF.
        points: A ``Points``, their JSON object or a JSON file; None or no points: remove them.
        out_path: Where to write; never the input.
        force: Overwrite an existing output.
    """
    src, out = Path(path), Path(out_path)
    check_output_path(out, force, inputs=(src,))
    reader = read_header(src)
    routers, _, thin, vocab = first_parts_from_reader(reader, str(src))
    arch, n_layer, _ = model_dims(reader, str(src))
    points = (Points() if points is None else
              load_points(points, n_layer, routers.protected_layers, thin.layers if thin else (), vocab is not None))
    kept = [f for f in reader.fields.values() if not f.name.startswith("GGUF.")
            and f.name != gguf.Keys.General.ARCHITECTURE and f.name not in POINT_KEYS]
    with atomic_output(out) as tmp:
        with gguf_writer(reader, arch, tmp) as writer:
            for field in kept:
                writer.copy_field(reader, field)
            for key, value in points.metadata().items():
                writer.add_key_value(key, value, KEY_TYPES[key][0], sub_type=KEY_TYPES[key][1])
            write_tensors(writer, reader, [(t.name, t) for t in reader.tensors])
        back = read_header(tmp)
        if first_from_reader(back, str(out))[1] != points or _table(back, POINT_KEYS) != _table(reader, POINT_KEYS):
            raise FormatError(f"{out}: read-back check failed: the copy differs from {src} beyond its points")
    return out


def _table(reader: Reader, skip_keys: tuple[str, ...]) -> tuple[list, list]:
    """(KV names and types, tensor names, types, shapes and sizes) of a GGUF, without ``skip_keys``."""
    kv = [(f.name, field_type(f)) for f in reader.fields.values()
          if f.name not in skip_keys and not f.name.startswith("GGUF.")]
    return kv, [(t.name, t.tensor_type, tuple(int(n) for n in t.shape), t.n_bytes) for t in reader.tensors]

"""Router files (.safetensors): what training writes and ``attach`` reads.

Layout: the tensors carry the GGUF names (``blk.{i}.first_router_in.weight``, ...) in NumPy /
torch shape, ``constants.router_shape`` (W1 is ``(hidden, n_embd)``, w2 ``(1, hidden)``, b2
``(1,)``), float32 (W1 may be float16). The ``__metadata__`` header maps each first.* key to
its value as JSON (``"first.router.threshold": "0.5"``, ``"first.router.protected_layers":
"[0, 23]"``); other metadata entries (e.g. torch's ``format``) are ignored. n_layer and
n_embd are not stored: they follow from the tensors (layers 0..max, the length of g).
Loading applies the FiRST-GGUF rules of ``rules``; messages name the file.

``checked_routers`` is where routers enter a write path: a file is checked as it loads, a
``RouterSet`` by ``RouterSet.check``; after that the RouterSet is trusted.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import safetensors
from safetensors.numpy import save_file

from ..constants import (
    FIRST_KEY_PREFIX,
    KEY_ROUTER_HIDDEN_SIZE,
    KEY_VERSION,
    ROUTER_F16_ROLES,
    ROUTER_NORM,
    router_tensor_name,
)
from ..errors import FormatError
from ..paths import atomic_output, check_output_path
from .routers import RouterSet, check_w1_dtype, router_arrays, routers_from_metadata
from .rules import (
    StoredTensor,
    check_keys_present,
    check_metadata,
    check_value_types,
    check_version,
    collect_layers,
    parse_router_name,
)


def save_router_file(routers: RouterSet, path: str | os.PathLike, force: bool = False,
                     w1_dtype: str = "f32") -> Path:
    """Write routers as a .safetensors router file (layout in the module docstring).

    Args:
        routers: The routers; checked against the format's rules first.
        path: File to write.
        force: Overwrite an existing file.
        w1_dtype: "f32", or "f16" to store W1 as float16 (half the size; loads as float32).

    Returns:
        The path written.

    Raises:
        FormatError: W1 overflows float16.
    """
    out = Path(path)
    routers.check()
    check_w1_dtype(w1_dtype)
    check_output_path(out, force)
    tensors = dict(router_arrays(routers, w1_dtype))
    meta = {key: json.dumps(value) for key, value in routers.metadata().items()}
    with atomic_output(out) as tmp:
        save_file(tensors, tmp, metadata=meta)
    return out


def stored_w1_dtype(path: str | os.PathLike) -> str:
    """"f16" when the router file stores W1 as float16, else "f32" (reads the header only)."""
    try:
        with safetensors.safe_open(Path(path), framework="np") as f:
            w1 = [f.get_slice(name).get_dtype() for name in f.keys()
                  if (parsed := parse_router_name(name)) and parsed[1] in ROUTER_F16_ROLES]
    except (OSError, ValueError, safetensors.SafetensorError) as exc:
        raise FormatError(f"{path}: not a readable safetensors file ({exc})") from None
    return "f16" if w1 and all(d == "F16" for d in w1) else "f32"


def load_router_file(path: str | os.PathLike) -> RouterSet:
    """Read and validate a .safetensors router file.

    Raises:
        FormatError: naming the file, on an unreadable file or any broken rule.
    """
    where = str(path)
    stored, header = _read_safetensors(Path(path))
    meta = _decode_metadata(where, header)
    layers = [parsed[0] for parsed in map(parse_router_name, stored) if parsed is not None]
    if not layers:
        example = router_tensor_name(ROUTER_NORM, 0)
        raise FormatError(f"{where}: no router tensors (expected names like {example})")
    n_layer = max(layers) + 1
    norm_name = router_tensor_name(ROUTER_NORM, 0)
    if norm_name not in stored:
        raise FormatError(f"{where}: layer 0: missing {norm_name}")
    shape = stored[norm_name].shape
    if len(shape) != 1:  # n_embd comes from this tensor
        raise FormatError(f"{where}: layer 0: {norm_name} has shape {shape}, expected (n_embd,)")
    n_embd = shape[0]
    check_metadata(where, meta, n_layer)
    tensors = collect_layers(where, stored, n_layer, n_embd, meta[KEY_ROUTER_HIDDEN_SIZE], gguf_ne=False)
    return routers_from_metadata(meta, n_layer, n_embd, tensors, where)


def checked_routers(routers: RouterSet | str | os.PathLike) -> RouterSet:
    """The routers, checked once: a router file as it loads, a RouterSet by ``RouterSet.check``.

    Every write path (attach, convert) calls this where routers come in and trusts the result.

    Raises:
        FormatError: naming the file (or the RouterSet's ``source``) and the broken rule.
    """
    if isinstance(routers, RouterSet):
        routers.check()
        return routers
    return load_router_file(routers)


def _read_safetensors(path: Path) -> tuple[dict[str, StoredTensor], dict[str, str]]:
    """Every tensor (float32 / float16 loaded, others described only) and the metadata."""
    stored = {}
    try:
        with safetensors.safe_open(path, framework="np") as f:
            header = f.metadata() or {}
            for name in f.keys():
                piece = f.get_slice(name)
                dtype, shape = piece.get_dtype(), tuple(piece.get_shape())
                data = f.get_tensor(name) if dtype in ("F32", "F16") else np.empty(0)
                stored[name] = StoredTensor(name, shape, dtype, data)
    except FileNotFoundError:
        raise FormatError(f"{path}: no such file") from None
    except (OSError, ValueError, safetensors.SafetensorError) as exc:
        raise FormatError(f"{path}: not a readable safetensors file ({exc})") from None
    return stored, header


def _decode_metadata(where: str, header: dict[str, str]) -> dict[str, object]:
    """The first.* entries of the header, JSON-decoded and type-checked."""
    meta = {}
    for key, text in header.items():
        if not key.startswith(FIRST_KEY_PREFIX):
            continue
        try:
            meta[key] = json.loads(text)
        except json.JSONDecodeError:
            raise FormatError(f"{where}: metadata {key} is not JSON: {text!r}") from None
    if isinstance(meta.get(KEY_VERSION), int):
        check_version(where, meta[KEY_VERSION])
    check_keys_present(where, list(meta))
    check_value_types(where, meta)
    return meta

"""Router files (.safetensors): what training writes and ``attach`` reads.

Layout: the tensors carry the GGUF names (``blk.{i}.first_router_in.weight``, ...) in NumPy /
torch shape, ``constants.router_shape`` (W1 is ``(hidden, n_embd)``, w2 ``(1, hidden)``, b2
``(1,)``), float32 (W1 may be float16). The ``__metadata__`` header maps each first.* key to
its value as JSON (``"first.router.threshold": "0.5"``, ``"first.router.protected_layers":
"[0, 23]"``); other metadata entries (e.g. torch's ``format``) are ignored. n_layer and
n_embd are not stored: they follow from the tensors (layers 0..max, the length of g).
Loading applies the FiRST-GGUF rules of ``router_set``; messages name the file.

Also here: ``atomic_output``, the write-to-temp-then-rename used by every writer of ours.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
from pathlib import Path
from typing import Iterator

import numpy as np
import safetensors
from safetensors.numpy import save_file

from .constants import (
    FIRST_KEY_PREFIX,
    KEY_ROUTER_HIDDEN_SIZE,
    KEY_VERSION,
    ROUTER_F16_ROLES,
    ROUTER_NORM,
    ROUTER_TENSORS,
    router_tensor_name,
)
from .errors import FirstError, FormatError
from .router_set import (
    RouterSet,
    StoredTensor,
    check_keys_present,
    check_metadata,
    check_value_types,
    check_version,
    collect_layers,
    parse_router_name,
    routers_from_metadata,
)


def check_output_path(out: Path, force: bool, inputs: tuple[Path, ...] = ()) -> None:
    """Refuse an output that is one of the inputs (always) or exists (unless ``force``)."""
    for src in inputs:
        if out.resolve() == src.resolve() or (out.exists() and src.exists() and out.samefile(src)):
            raise FirstError(f"{out}: the output would overwrite the input {src}; write to another file")
    if out.is_dir():
        raise FirstError(f"{out} is a directory")
    if out.exists() and not force:
        raise FirstError(f"{out} exists; pass --force")
    if not out.parent.is_dir():
        raise FirstError(f"{out.parent}: no such directory")


@contextlib.contextmanager
def atomic_output(out: Path) -> Iterator[Path]:
    """Yield a fresh temporary path next to ``out``; rename it to ``out`` if the block succeeds.

    On any exception (KeyboardInterrupt too) the temporary file is removed and ``out`` is
    untouched, so a reader never sees half a file.
    """
    tmp = out.with_name(f".{out.name}.{secrets.token_hex(6)}.tmp")
    try:
        os.close(os.open(tmp, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o666))  # mode follows the umask
    except OSError as exc:
        raise FirstError(f"{out}: cannot write next to it ({exc.strerror})") from None
    mode = tmp.stat().st_mode & 0o777
    try:
        yield tmp
        os.chmod(tmp, mode)  # some writers (safetensors) recreate the file as 0600
        os.replace(tmp, out)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


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


W1_DTYPES = ("f32", "f16")


def check_w1_dtype(w1_dtype: str) -> None:
    if w1_dtype not in W1_DTYPES:
        raise FirstError(f"w1_dtype must be one of {', '.join(W1_DTYPES)}, got {w1_dtype!r}")


def router_arrays(routers: RouterSet, w1_dtype: str) -> list[tuple[str, np.ndarray]]:
    """(name, contiguous array) of every router tensor in layer order, W1 cast to ``w1_dtype``.

    Raises:
        FormatError: W1 overflows F16.
    """
    out = []
    for bid in range(routers.n_layer):
        for role in ROUTER_TENSORS:
            name = router_tensor_name(role, bid)
            arr = np.ascontiguousarray(routers.tensors[bid][role], dtype=np.float32)
            if role in ROUTER_F16_ROLES and w1_dtype == "f16":
                with np.errstate(over="ignore"):  # reported below, with the layer
                    arr = arr.astype(np.float16)
                if not np.isfinite(arr).all():
                    raise FormatError(f"{routers.source}: layer {bid}: {name} overflows F16 "
                                      f"(max |value| {np.abs(routers.tensors[bid][role]).max():g}); use F32")
            out.append((name, arr))
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

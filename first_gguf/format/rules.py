"""The FiRST-GGUF rules (``docs/FORMAT.md`` section 2), shared by every path that reads routers.

The GGUF reader (``reader``), the safetensors reader (``router_file``) and ``RouterSet.check``
(``routers``) all apply these checks, so every path rejects the same files with the same
messages. A file's tensors arrive as ``StoredTensor`` (shape in the file's own convention) and
leave ``collect_layers`` as float32 arrays in NumPy / torch shape (``constants.router_shape``).
numpy only, never torch.
"""

from __future__ import annotations

import math
import re
from typing import NamedTuple

import numpy as np

from ..constants import (
    AGGREGATION_VALUES,
    FIRST_KEY_PREFIX,
    FIRST_VERSION,
    FIRST_VERSIONS,
    KEY_AGGREGATION,
    KEY_PREFILL,
    KEY_PROTECTED_LAYERS,
    KEY_ROUTER_HIDDEN_SIZE,
    KEY_ROUTER_NORM_EPS,
    KEY_ROUTER_THRESHOLD,
    KEY_TRAIN_SOURCE,
    KEY_VERSION,
    OPTIONAL_KEYS,
    PREFILL_VALUES,
    REQUIRED_KEYS,
    ROUTER_F16_ROLES,
    ROUTER_IN_WEIGHT,
    ROUTER_TENSORS,
    router_ne,
    router_shape,
    router_tensor_name,
)
from ..errors import FormatError

# Python type of each first.* value once decoded (GGUF or JSON); bool is never a number here.
VALUE_TYPES: dict[str, tuple[type, ...]] = {
    KEY_VERSION: (int,),
    KEY_ROUTER_HIDDEN_SIZE: (int,),
    KEY_ROUTER_NORM_EPS: (int, float),
    KEY_ROUTER_THRESHOLD: (int, float),
    KEY_PROTECTED_LAYERS: (list,),
    KEY_AGGREGATION: (str,),
    KEY_PREFILL: (str,),
    KEY_TRAIN_SOURCE: (str,),
}
KNOWN_KEYS = REQUIRED_KEYS + OPTIONAL_KEYS


class StoredTensor(NamedTuple):
    """One router tensor as a file stores it, before any check."""

    name: str
    shape: tuple[int, ...]  # in the file's own convention: GGUF ne, or NumPy shape
    dtype: str              # "F32", "F16", or the file's name for anything else
    data: np.ndarray        # NumPy-shaped values (raw bytes for a quantized GGUF tensor)



def numpy_dtype_name(dtype: np.dtype) -> str:
    """GGUF / safetensors spelling of a NumPy float dtype ("F32", "F16"), else NumPy's name."""
    return {np.dtype(np.float32): "F32", np.dtype(np.float16): "F16"}.get(np.dtype(dtype), str(dtype))


def check_version(where: str, version: object) -> None:
    """Checked before anything else, so a file of a newer version says so rather than fail on a new key."""
    if version not in FIRST_VERSIONS:
        *older, newest = map(str, FIRST_VERSIONS)
        raise FormatError(f"{where}: unknown {KEY_VERSION} {version} (this first-gguf reads "
                          f"{', '.join(older)} and {newest})")


def check_keys_present(where: str, keys: set[str] | list[str], known: tuple[str, ...] = KNOWN_KEYS) -> None:
    """Every required first.* key is there and no unknown one (a typo would vanish silently).

    ``known``: the keys this kind of file may carry (a GGUF adds the operating points).
    """
    for key in REQUIRED_KEYS:
        if key not in keys:
            raise FormatError(f"{where}: missing key {key}")
    for key in sorted(keys):
        if key.startswith(FIRST_KEY_PREFIX) and key not in known:
            raise FormatError(f"{where}: unknown key {key} (first.version {FIRST_VERSION} knows "
                              f"{', '.join(known)})")


def check_value_types(where: str, meta: dict[str, object]) -> None:
    """Decoded first.* values have the right Python types (for JSON and in-memory routers)."""
    for key, value in meta.items():
        types = VALUE_TYPES.get(key)
        if types is None:
            continue
        if isinstance(value, bool) or not isinstance(value, types):
            expected = " or ".join(t.__name__ for t in types)
            raise FormatError(f"{where}: {key} is {value!r}, expected {expected}")
    layers = meta.get(KEY_PROTECTED_LAYERS, [])
    if any(isinstance(x, bool) or not isinstance(x, int) for x in layers):
        raise FormatError(f"{where}: {KEY_PROTECTED_LAYERS} is {layers!r}, expected a list of integers")


def check_metadata(where: str, meta: dict[str, object], n_layer: int) -> None:
    """The first.* values obey docs/FORMAT.md section 2 (types already checked)."""
    check_version(where, meta[KEY_VERSION])
    hidden = meta[KEY_ROUTER_HIDDEN_SIZE]
    if hidden < 1:
        raise FormatError(f"{where}: {KEY_ROUTER_HIDDEN_SIZE} is {hidden}, expected >= 1")
    eps = meta[KEY_ROUTER_NORM_EPS]
    if not (math.isfinite(eps) and eps > 0):
        raise FormatError(f"{where}: {KEY_ROUTER_NORM_EPS} is {eps}, expected a finite value > 0")
    threshold = meta[KEY_ROUTER_THRESHOLD]
    if not 0.0 <= threshold <= 1.0:  # also rejects NaN
        raise FormatError(f"{where}: {KEY_ROUTER_THRESHOLD} is {threshold}, expected within [0, 1]")
    protected = meta[KEY_PROTECTED_LAYERS]
    for layer in protected:
        if not 0 <= layer < n_layer:
            raise FormatError(f"{where}: {KEY_PROTECTED_LAYERS} has layer {layer}, outside 0..{n_layer - 1}")
    if len(set(protected)) != len(protected):
        raise FormatError(f"{where}: {KEY_PROTECTED_LAYERS} {protected} lists a layer twice")
    for key, allowed in ((KEY_AGGREGATION, AGGREGATION_VALUES), (KEY_PREFILL, PREFILL_VALUES)):
        if meta[key] not in allowed:
            raise FormatError(f"{where}: {key} is {meta[key]!r}; first.version {meta[KEY_VERSION]} "
                              f"allows only {', '.join(map(repr, allowed))}")


# Name pattern of each router role, with the layer number captured.
_ROLE_PATTERNS = {
    role: re.compile("^" + re.escape(tpl).replace(re.escape("{bid}"), r"(\d+)") + "$")
    for role, tpl in ROUTER_TENSORS.items()
}


def parse_router_name(name: str) -> tuple[int, str] | None:
    """(layer, role) of a well-formed router tensor name, else None."""
    for role, pattern in _ROLE_PATTERNS.items():
        match = pattern.match(name)
        if match and name == router_tensor_name(role, int(match.group(1))):
            return int(match.group(1)), role
    return None


def collect_layers(where: str, stored: dict[str, StoredTensor], n_layer: int, n_embd: int, hidden: int,
                   gguf_ne: bool) -> dict[int, dict[str, np.ndarray]]:
    """Check router tensors against the rules and return them as float32 NumPy arrays.

    Args:
        where: File (or "routers") named in messages.
        stored: Every router tensor of the file, by name.
        n_layer, n_embd: The model's; hidden: first.router.hidden_size.
        gguf_ne: Shapes in ``stored`` are GGUF ``ne`` (trailing 1s are insignificant, as in
            ggml), else NumPy shapes (exact).

    Returns:
        layer -> role -> float32 array of shape ``router_shape``.
    """
    for name in stored:
        parsed = parse_router_name(name)
        if parsed is None:
            raise FormatError(f"{where}: unknown router tensor {name}")
        if parsed[0] >= n_layer:
            raise FormatError(f"{where}: extra router layer {parsed[0]} ({name}); the model has "
                              f"{n_layer} layers, 0..{n_layer - 1}")
    _check_hidden(where, stored, n_embd, hidden, gguf_ne)
    return {bid: {role: _check_tensor(where, bid, role, stored, n_embd, hidden, gguf_ne)
                  for role in ROUTER_TENSORS}
            for bid in range(n_layer)}


def _check_hidden(where: str, stored: dict[str, StoredTensor], n_embd: int, hidden: int,
                  gguf_ne: bool) -> None:
    """A hidden size the W1 tensors agree on, but the key does not, is a hidden_size mismatch."""
    found = {}
    for name, t in stored.items():
        shape = tuple(reversed(t.shape)) if gguf_ne else t.shape
        if parse_router_name(name)[1] == ROUTER_IN_WEIGHT and len(shape) == 2 and shape[1] == n_embd:
            found[name] = shape[0]
    if found and len(set(found.values())) == 1 and hidden not in found.values():
        name, got = next(iter(found.items()))
        raise FormatError(f"{where}: {KEY_ROUTER_HIDDEN_SIZE} is {hidden} but the router tensors have "
                          f"hidden size {got} (e.g. {name})")


def _check_tensor(where: str, bid: int, role: str, stored: dict[str, StoredTensor], n_embd: int, hidden: int,
                  gguf_ne: bool) -> np.ndarray:
    """One router tensor: present, exact shape, F32 (or F16 where allowed), finite."""
    name = router_tensor_name(role, bid)
    at = f"{where}: layer {bid}: {name}"
    t = stored.get(name)
    if t is None:
        raise FormatError(f"{where}: layer {bid}: missing {name}")
    want = router_ne(role, n_embd, hidden) if gguf_ne else router_shape(role, n_embd, hidden)
    if (_pad4(t.shape) != _pad4(want)) if gguf_ne else (tuple(t.shape) != want):
        raise FormatError(f"{at} has shape {tuple(t.shape)}, expected {want}")
    allowed = ("F32", "F16") if role in ROUTER_F16_ROLES else ("F32",)
    if t.dtype not in allowed:
        raise FormatError(f"{at} has type {t.dtype}, expected {' or '.join(allowed)}")
    values = np.asarray(t.data)
    bad = ~np.isfinite(values)
    if bad.any():
        n_nan = int(np.isnan(values).sum())
        raise FormatError(f"{at} has non-finite values ({n_nan} NaN, {int(bad.sum()) - n_nan} inf)")
    return np.array(values, dtype=np.float32).reshape(router_shape(role, n_embd, hidden))


def _pad4(shape: tuple[int, ...]) -> tuple[int, ...]:
    """ggml's view of a shape: four dims, the missing trailing ones 1."""
    return tuple(shape) + (1,) * (4 - len(shape)) if len(shape) <= 4 else tuple(shape)

"""Routers in memory (``RouterSet``), the untrained recipe, and the checks every file shares.

A ``RouterSet`` holds one FiRST router per layer (``shared/FIRST.md`` section 1) as float32
NumPy arrays in NumPy / torch shape, ``constants.router_shape(role, n_embd, hidden)``:
W1 is ``(hidden, n_embd)``, exactly a torch ``Linear(n_embd, hidden).weight``. The GGUF stores
the same tensors with ``ne`` reversed (``constants.router_ne``).

The checks here (``check_metadata``, ``collect_layers``) are the format's rules, shared by the
GGUF reader (``gguf_router``), the safetensors reader (``router_file``) and ``RouterSet.check``,
so every path rejects the same files with the same messages. numpy only, never torch.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np

from .constants import (
    AGGREGATION_MEAN,
    AGGREGATION_VALUES,
    DEFAULT_HIDDEN_SIZE,
    DEFAULT_NORM_EPS,
    DEFAULT_THRESHOLD,
    FIRST_KEY_PREFIX,
    FIRST_VERSION,
    KEY_AGGREGATION,
    KEY_PREFILL,
    KEY_PROTECTED_LAYERS,
    KEY_ROUTER_HIDDEN_SIZE,
    KEY_ROUTER_NORM_EPS,
    KEY_ROUTER_THRESHOLD,
    KEY_TRAIN_SOURCE,
    KEY_VERSION,
    OPTIONAL_KEYS,
    PREFILL_FULL,
    PREFILL_VALUES,
    REQUIRED_KEYS,
    ROUTER_F16_ROLES,
    ROUTER_IN_BIAS,
    ROUTER_IN_WEIGHT,
    ROUTER_NORM,
    ROUTER_OUT_BIAS,
    ROUTER_OUT_WEIGHT,
    ROUTER_TENSORS,
    default_protected_layers,
    router_ne,
    router_shape,
    router_tensor_name,
)
from .errors import FirstError, FormatError

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


@dataclass(eq=False)
class RouterSet:
    """The routers of every layer of one model, plus the first.* settings.

    ``tensors[layer][role]`` is a float32 array of shape ``router_shape(role, n_embd,
    hidden_size)``; roles are ``constants.ROUTER_*``. ``source`` names where the routers came
    from (a file, or "routers") in error messages; it is not stored in any file.
    """

    n_layer: int
    n_embd: int
    hidden_size: int
    norm_eps: float
    threshold: float
    protected_layers: list[int]
    aggregation: str
    prefill: str
    train_source: str
    tensors: dict[int, dict[str, np.ndarray]]
    source: str = "routers"

    def __eq__(self, other: object) -> bool:
        """Same settings and bit-identical tensors (``source`` is not compared)."""
        if not isinstance(other, RouterSet):
            return NotImplemented
        same = lambda a, b: a.dtype == b.dtype and np.array_equal(a, b)  # noqa: E731
        mine, theirs = (self.n_layer, self.n_embd, self.metadata()), (other.n_layer, other.n_embd, other.metadata())
        return (mine == theirs
                and self.tensors.keys() == other.tensors.keys()
                and all(self.tensors[b].keys() == other.tensors[b].keys()
                        and all(same(a, other.tensors[b][r]) for r, a in self.tensors[b].items())
                        for b in self.tensors))

    def metadata(self) -> dict[str, object]:
        """The first.* keys of a FiRST-GGUF carrying these routers -> their values."""
        return {
            KEY_VERSION: FIRST_VERSION,
            KEY_ROUTER_HIDDEN_SIZE: self.hidden_size,
            KEY_ROUTER_NORM_EPS: self.norm_eps,
            KEY_ROUTER_THRESHOLD: self.threshold,
            KEY_PROTECTED_LAYERS: list(self.protected_layers),
            KEY_AGGREGATION: self.aggregation,
            KEY_PREFILL: self.prefill,
            KEY_TRAIN_SOURCE: self.train_source,
        }

    def check(self) -> None:
        """Apply the FiRST-GGUF rules to these routers; raise FormatError naming ``source``."""
        meta = self.metadata()
        check_value_types(self.source, meta)
        check_metadata(self.source, meta, self.n_layer)
        stored = {}
        for bid, roles in self.tensors.items():
            for role, arr in roles.items():
                name = router_tensor_name(role, bid) if role in ROUTER_TENSORS else f"blk.{bid}.{role}"
                stored[name] = StoredTensor(name, tuple(arr.shape), numpy_dtype_name(arr.dtype), arr)
        for t in stored.values():
            if t.dtype != "F32":
                raise FormatError(f"{self.source}: {t.name} is {t.dtype}, expected float32 in memory")
        collect_layers(self.source, stored, self.n_layer, self.n_embd, self.hidden_size, gguf_ne=False)


def make_identity_routers(n_layer: int, n_embd: int, hidden_size: int = DEFAULT_HIDDEN_SIZE,
                          seed: int = 0, keep_prob: float = 0.9,
                          train_source: str | None = None) -> RouterSet:
    """Untrained routers that keep every layer: the demo's routers before any training.

    The recipe, exactly (float32 results)::

        rng = numpy.random.default_rng(seed)
        for layer in 0 .. n_layer-1, in order:
            g  = ones(n_embd)
            W1 = (rng.standard_normal((hidden_size, n_embd)) * n_embd ** -0.5).astype(float32)
            b1 = zeros(hidden_size);  w2 = zeros((1, hidden_size))
            b2 = [log(keep_prob / (1 - keep_prob))]          # logit(keep_prob)

    W1 is N(0, 1/n_embd) (one float64 draw per layer, then rounded to float32). With w2 = 0
    every router outputs p = sigmoid(b2) = keep_prob for any input, so with keep_prob above
    the threshold (default 0.5) every layer runs. Threshold 0.5, norm eps 1e-6, protected
    layers the first and last, aggregation "mean", prefill "full".

    Args:
        n_layer: Number of decoder layers of the model.
        n_embd: Width of its residual stream.
        hidden_size: Router width.
        seed: Seed of ``numpy.random.default_rng`` for W1.
        keep_prob: The constant p of every router, in (0, 1).
        train_source: Provenance text; default says "untrained" with seed and keep_prob.

    Returns:
        The RouterSet.
    """
    if not 0.0 < keep_prob < 1.0:
        raise FirstError(f"keep_prob must lie in (0, 1), got {keep_prob}")
    rng = np.random.default_rng(seed)
    b2 = np.float32(math.log(keep_prob / (1.0 - keep_prob)))
    tensors = {}
    for bid in range(n_layer):
        w1 = rng.standard_normal((hidden_size, n_embd)) * n_embd ** -0.5
        tensors[bid] = {
            ROUTER_NORM: np.ones(router_shape(ROUTER_NORM, n_embd, hidden_size), np.float32),
            ROUTER_IN_WEIGHT: w1.astype(np.float32),
            ROUTER_IN_BIAS: np.zeros(router_shape(ROUTER_IN_BIAS, n_embd, hidden_size), np.float32),
            ROUTER_OUT_WEIGHT: np.zeros(router_shape(ROUTER_OUT_WEIGHT, n_embd, hidden_size), np.float32),
            ROUTER_OUT_BIAS: np.full(router_shape(ROUTER_OUT_BIAS, n_embd, hidden_size), b2, np.float32),
        }
    if train_source is None:
        train_source = f"untrained identity routers (seed={seed}, keep_prob={keep_prob})"
    return RouterSet(n_layer=n_layer, n_embd=n_embd, hidden_size=hidden_size,
                     norm_eps=DEFAULT_NORM_EPS, threshold=DEFAULT_THRESHOLD,
                     protected_layers=default_protected_layers(n_layer), aggregation=AGGREGATION_MEAN,
                     prefill=PREFILL_FULL, train_source=train_source, tensors=tensors)


def routers_from_metadata(meta: dict[str, object], n_layer: int, n_embd: int,
                          tensors: dict[int, dict[str, np.ndarray]], source: str) -> RouterSet:
    """A RouterSet from checked first.* values and checked tensors."""
    return RouterSet(n_layer=n_layer, n_embd=n_embd, hidden_size=int(meta[KEY_ROUTER_HIDDEN_SIZE]),
                     norm_eps=float(meta[KEY_ROUTER_NORM_EPS]), threshold=float(meta[KEY_ROUTER_THRESHOLD]),
                     protected_layers=[int(x) for x in meta[KEY_PROTECTED_LAYERS]],
                     aggregation=str(meta[KEY_AGGREGATION]), prefill=str(meta[KEY_PREFILL]),
                     train_source=str(meta.get(KEY_TRAIN_SOURCE, "")), tensors=tensors, source=source)


def numpy_dtype_name(dtype: np.dtype) -> str:
    """GGUF / safetensors spelling of a NumPy float dtype ("F32", "F16"), else NumPy's name."""
    return {np.dtype(np.float32): "F32", np.dtype(np.float16): "F16"}.get(np.dtype(dtype), str(dtype))


def check_version(where: str, version: object) -> None:
    """Checked before anything else, so a file of a newer version says so rather than fail on a new key."""
    if version != FIRST_VERSION:
        raise FormatError(f"{where}: unknown {KEY_VERSION} {version} (this first-gguf reads {FIRST_VERSION})")


def check_keys_present(where: str, keys: set[str] | list[str]) -> None:
    """Every required first.* key is there and no unknown one (a typo would vanish silently)."""
    for key in REQUIRED_KEYS:
        if key not in keys:
            raise FormatError(f"{where}: missing key {key}")
    for key in sorted(keys):
        if key.startswith(FIRST_KEY_PREFIX) and key not in KNOWN_KEYS:
            raise FormatError(f"{where}: unknown key {key} (first.version {FIRST_VERSION} knows "
                              f"{', '.join(KNOWN_KEYS)})")


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
    """The first.* values obey FIRST.md section 2 (types already checked)."""
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
            raise FormatError(f"{where}: {key} is {meta[key]!r}; first.version {FIRST_VERSION} "
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

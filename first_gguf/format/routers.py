"""Routers in memory (``RouterSet``), the untrained recipe, and their arrays as files store them.

A ``RouterSet`` holds one FiRST router per layer (``docs/FORMAT.md`` section 1) as float32
NumPy arrays in NumPy / torch shape, ``constants.router_shape(role, n_embd, hidden)``:
W1 is ``(hidden, n_embd)``, exactly a torch ``Linear(n_embd, hidden).weight``. The GGUF stores
the same tensors with ``ne`` reversed (``constants.router_ne``). ``RouterSet.check`` applies
the format's rules (``rules``). numpy only, never torch.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from ..constants import (
    AGGREGATION_MEAN,
    DEFAULT_HIDDEN_SIZE,
    DEFAULT_NORM_EPS,
    DEFAULT_THRESHOLD,
    FIRST_VERSION_PLAIN,
    KEY_AGGREGATION,
    KEY_PREFILL,
    KEY_PROTECTED_LAYERS,
    KEY_ROUTER_HIDDEN_SIZE,
    KEY_ROUTER_NORM_EPS,
    KEY_ROUTER_THRESHOLD,
    KEY_TRAIN_SOURCE,
    KEY_VERSION,
    PREFILL_FULL,
    ROUTER_F16_ROLES,
    ROUTER_IN_BIAS,
    ROUTER_IN_WEIGHT,
    ROUTER_NORM,
    ROUTER_OUT_BIAS,
    ROUTER_OUT_WEIGHT,
    ROUTER_TENSORS,
    default_protected_layers,
    router_shape,
    router_tensor_name,
)
from ..errors import FirstError, FormatError
from .rules import StoredTensor, check_metadata, check_value_types, collect_layers, numpy_dtype_name

W1_DTYPES = ("f32", "f16")


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
            KEY_VERSION: FIRST_VERSION_PLAIN,
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

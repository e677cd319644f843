"""Every FiRST-GGUF key and tensor name, and the format's defaults.

This module is the one place that spells the strings of ``docs/FORMAT.md`` section 2;
the converter, the runtime bindings and the tests import them from here. It imports
nothing heavy so that any part of the package can use it.
"""

from __future__ import annotations

# Versions of the FiRST-GGUF format (`first.version`): this package reads every one of
# FIRST_VERSIONS. A writer writes FIRST_VERSION_ATTN exactly when the file carries attention
# copies (first.thin.attn and its tensors), else FIRST_VERSION_VOCAB when it carries a short
# output vocabulary (the first.vocab.* keys and tensor), else FIRST_VERSION_THIN when it carries
# thinned FFNs (the first.thin.* keys and tensors), else FIRST_VERSION_PLAIN, so a file without
# them stays byte-identical to what version 1 wrote.
FIRST_VERSION_PLAIN = 1
FIRST_VERSION_THIN = 2
FIRST_VERSION_VOCAB = 3
FIRST_VERSION_ATTN = 4
FIRST_VERSION = FIRST_VERSION_ATTN  # the newest
FIRST_VERSIONS = (FIRST_VERSION_PLAIN, FIRST_VERSION_THIN, FIRST_VERSION_VOCAB, FIRST_VERSION_ATTN)

# --- GGUF keys ---------------------------------------------------------------------------
KEY_VERSION = "first.version"                       # u32
KEY_ROUTER_HIDDEN_SIZE = "first.router.hidden_size"  # u32
KEY_ROUTER_NORM_EPS = "first.router.norm_eps"        # f32
KEY_ROUTER_THRESHOLD = "first.router.threshold"      # f32
KEY_PROTECTED_LAYERS = "first.router.protected_layers"  # array[i32]
KEY_AGGREGATION = "first.aggregation"               # string
KEY_PREFILL = "first.prefill"                       # string
KEY_TRAIN_SOURCE = "first.train.source"             # string
KEY_POINTS = "first.points"                         # array[string], optional: named operating points
KEY_POINTS_DEFAULT = "first.points.default"         # string, optional: the point used when none is asked for
KEY_THIN_LAYERS = "first.thin.layers"                # array[i32], version 2: layers with a thinned FFN, ascending
KEY_THIN_WIDTHS = "first.thin.widths"                # array[u32], version 2: kept neurons per listed layer
KEY_THIN_NEURONS = "first.thin.neurons"              # array[i32], version 2: kept neuron indices, layer after layer
KEY_THIN_SOURCE = "first.thin.source"                # string, optional: how the neurons were chosen
KEY_THIN_TYPE = "first.thin.type"                    # string, optional: ggml type of every thin tensor (requantized)
KEY_THIN_ATTN = "first.thin.attn"                    # bool, version 4, optional (true): attention copies too
KEY_VOCAB_TOKENS = "first.vocab.tokens"              # array[i32], version 3: the short vocabulary, ascending
KEY_VOCAB_SOURCE = "first.vocab.source"              # string, optional: how the tokens were chosen
KEY_VOCAB_TYPE = "first.vocab.type"                  # string, optional: ggml type of first_output.weight (requantized)

FIRST_KEY_PREFIX = "first."

# Keys every FiRST-GGUF carries, and the optional ones (provenance only).
REQUIRED_KEYS = (
    KEY_VERSION,
    KEY_ROUTER_HIDDEN_SIZE,
    KEY_ROUTER_NORM_EPS,
    KEY_ROUTER_THRESHOLD,
    KEY_PROTECTED_LAYERS,
    KEY_AGGREGATION,
    KEY_PREFILL,
)
OPTIONAL_KEYS = (KEY_TRAIN_SOURCE,)
# Keys of a FiRST-GGUF only (router files do not carry operating points).
POINT_KEYS = (KEY_POINTS, KEY_POINTS_DEFAULT)
# Keys of a file with thinned FFNs (first.version 2): the first three together, the source optional.
THIN_KEY_PREFIX = "first.thin."
THIN_REQUIRED_KEYS = (KEY_THIN_LAYERS, KEY_THIN_WIDTHS, KEY_THIN_NEURONS)
THIN_KEYS = THIN_REQUIRED_KEYS + (KEY_THIN_SOURCE, KEY_THIN_TYPE, KEY_THIN_ATTN)
# Keys of a file with a short output vocabulary (first.version 3): the tokens, the source optional.
VOCAB_KEY_PREFIX = "first.vocab."
VOCAB_KEYS = (KEY_VOCAB_TOKENS, KEY_VOCAB_SOURCE, KEY_VOCAB_TYPE)
# Its tensor: the listed tokens' rows of the output matrix, GGUF ne [n_embd, n_tokens].
VOCAB_TENSOR = "first_output.weight"
# The output matrix it is cut from: output.weight, or the embeddings when the output is tied.
OUTPUT_TENSOR = "output.weight"
TOKEN_EMBD_TENSOR = "token_embd.weight"
# Every token of another type than normal belongs to the short vocabulary (llama.cpp's types).
KEY_TOKEN_TYPE = "tokenizer.ggml.token_type"
TOKEN_TYPE_NORMAL = 1


def first_version_for(thin: bool, vocab: bool, attn: bool = False) -> int:
    """The ``first.version`` a writer writes for a file with (or without) thinned FFNs, a short
    vocabulary and attention copies."""
    if attn:
        return FIRST_VERSION_ATTN
    return FIRST_VERSION_VOCAB if vocab else FIRST_VERSION_THIN if thin else FIRST_VERSION_PLAIN

# Allowed values of the string keys (first.version 1 has one each).
AGGREGATION_MEAN = "mean"
AGGREGATION_VALUES = (AGGREGATION_MEAN,)
PREFILL_FULL = "full"
PREFILL_VALUES = (PREFILL_FULL,)

# Operating points (docs/FORMAT.md section 2): each entry of first.points is
# "<name>=threshold:<T>", "<name>=skip:<i>,<j>,..." or "<name>=thin:<i>,<j>,...", the first two
# optionally followed by ";thin:<i>,<j>,..." (layers decoded with their thinned FFN), a skip
# point without thin by ";heal:<file>" (a healing adapter beside the GGUF); any point but a healed
# one may end in ";vocab" (decode with the short output vocabulary), and "<name>=vocab" alone is
# mask mode skipping nothing with the short vocabulary. Any but "<name>=vocab" may carry
# ";warmup:<n>" before ";vocab": its first n decode steps after each prefill run every layer.
POINT_THRESHOLD = "threshold"
POINT_SKIP = "skip"
POINT_THIN = "thin"
POINT_HEAL = "heal"
POINT_VOCAB = "vocab"
POINT_WARMUP = "warmup"
MAX_WARMUP = 4096  # decode steps at full depth a point may ask for

# --- Defaults ----------------------------------------------------------------------------
DEFAULT_HIDDEN_SIZE = 64
DEFAULT_NORM_EPS = 1e-6
DEFAULT_THRESHOLD = 0.5


def default_protected_layers(n_layer: int) -> list[int]:
    """The first and the last layer always run."""
    return [0, n_layer - 1] if n_layer > 1 else [0]


# --- Per-layer router tensors ------------------------------------------------------------
# Role -> name template. Shapes are given as GGUF `ne` (innermost first); the NumPy and
# safetensors view of the same tensor is the reverse (e.g. W1 is (hidden, n_embd) there,
# exactly a torch Linear(n_embd, hidden).weight).
ROUTER_NORM = "norm"
ROUTER_IN_WEIGHT = "in_weight"
ROUTER_IN_BIAS = "in_bias"
ROUTER_OUT_WEIGHT = "out_weight"
ROUTER_OUT_BIAS = "out_bias"

ROUTER_TENSORS = {
    ROUTER_NORM: "blk.{bid}.first_router_norm.weight",
    ROUTER_IN_WEIGHT: "blk.{bid}.first_router_in.weight",
    ROUTER_IN_BIAS: "blk.{bid}.first_router_in.bias",
    ROUTER_OUT_WEIGHT: "blk.{bid}.first_router_out.weight",
    ROUTER_OUT_BIAS: "blk.{bid}.first_router_out.bias",
}

# Marker every router tensor name contains (after `blk.N.`), used to tell them apart
# from the base model's tensors.
ROUTER_NAME_MARKER = ".first_router_"


def router_tensor_name(role: str, bid: int) -> str:
    """Name of one router tensor of layer ``bid``."""
    return ROUTER_TENSORS[role].format(bid=bid)


def router_ne(role: str, n_embd: int, hidden: int) -> tuple[int, ...]:
    """GGUF shape (``ne``, innermost first) of one router tensor."""
    return {
        ROUTER_NORM: (n_embd,),
        ROUTER_IN_WEIGHT: (n_embd, hidden),
        ROUTER_IN_BIAS: (hidden,),
        ROUTER_OUT_WEIGHT: (hidden, 1),
        ROUTER_OUT_BIAS: (1,),
    }[role]


def router_shape(role: str, n_embd: int, hidden: int) -> tuple[int, ...]:
    """NumPy / safetensors / torch shape of one router tensor (the reverse of ``ne``)."""
    return tuple(reversed(router_ne(role, n_embd, hidden)))


# Roles whose tensor may be stored as F16 in a GGUF (every other one is F32).
ROUTER_F16_ROLES = (ROUTER_IN_WEIGHT,)


# --- Thinned FFNs (first.version 2) ------------------------------------------------------
# Role -> name template of the decode-only stand-in of a layer's FFN: the kept neurons of
# ffn_gate / ffn_up (rows, ne [n_embd, w]) and ffn_down (columns, ne [w, n_embd]), in the
# types of the base tensors they come from (BASE_FFN_TENSORS).
THIN_GATE = "gate"
THIN_UP = "up"
THIN_DOWN = "down"

THIN_TENSORS = {
    THIN_GATE: "blk.{bid}.first_ffn_gate.weight",
    THIN_UP: "blk.{bid}.first_ffn_up.weight",
    THIN_DOWN: "blk.{bid}.first_ffn_down.weight",
}
BASE_FFN_TENSORS = {
    THIN_GATE: "blk.{bid}.ffn_gate.weight",
    THIN_UP: "blk.{bid}.ffn_up.weight",
    THIN_DOWN: "blk.{bid}.ffn_down.weight",
}

# Marker every thin tensor name contains (after `blk.N.`).
THIN_NAME_MARKER = ".first_ffn_"

# Attention copies (first.version 4, with first.thin.type and first.thin.attn): every thin layer
# also carries its attention weights requantized to first.thin.type, same shapes as the base's.
ATTN_COPY_TENSORS = {
    "q": "blk.{bid}.first_attn_q.weight",
    "k": "blk.{bid}.first_attn_k.weight",
    "v": "blk.{bid}.first_attn_v.weight",
    "output": "blk.{bid}.first_attn_output.weight",
}
BASE_ATTN_TENSORS = {
    "q": "blk.{bid}.attn_q.weight",
    "k": "blk.{bid}.attn_k.weight",
    "v": "blk.{bid}.attn_v.weight",
    "output": "blk.{bid}.attn_output.weight",
}
ATTN_COPY_MARKER = ".first_attn_"


def is_thin_part(name: str) -> bool:
    """Whether a tensor belongs to the thin part of a file: a thin FFN or an attention copy."""
    return THIN_NAME_MARKER in name or ATTN_COPY_MARKER in name


def thin_tensor_name(role: str, bid: int) -> str:
    """Name of one thinned-FFN tensor of layer ``bid``."""
    return THIN_TENSORS[role].format(bid=bid)


def base_ffn_name(role: str, bid: int) -> str:
    """Name of the base FFN tensor of layer ``bid`` a thin tensor is cut from."""
    return BASE_FFN_TENSORS[role].format(bid=bid)


def thin_ne(role: str, n_embd: int, width: int) -> tuple[int, int]:
    """GGUF shape (``ne``) of one thinned-FFN tensor of ``width`` neurons."""
    return (width, n_embd) if role == THIN_DOWN else (n_embd, width)

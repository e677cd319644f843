"""Tiny GGUFs for tests, written with gguf.GGUFWriter: no download, a few KB each.

A file is described by two plain dicts that a test can edit before writing:
``kv`` (key -> (value, GGUF type, array item type or None)) and ``tensors``
(name -> (NumPy array, GGML type or None)); quantized arrays are the uint8 bytes from
``gguf.quants.quantize``. The first.* GGUF types are spelled here from docs/FORMAT.md section 2,
not taken from the code under test.
"""

from __future__ import annotations

from pathlib import Path

import gguf
import numpy as np
from gguf import GGMLQuantizationType as Q
from gguf import GGUFValueType as T

from first_gguf import constants as C

ARCH = "qwen2"
N_LAYER = 3
N_EMBD = 64
HIDDEN = 8  # router width in tests (small, and unlike n_embd so shape mix-ups show)
N_VOCAB = 32

KV = dict[str, tuple[object, T, T | None]]
Tensors = dict[str, tuple[np.ndarray, Q | None]]

# docs/FORMAT.md section 2: u32, u32, f32, f32, array[i32], string, string, string.
FIRST_TYPES = {
    C.KEY_VERSION: (T.UINT32, None),
    C.KEY_ROUTER_HIDDEN_SIZE: (T.UINT32, None),
    C.KEY_ROUTER_NORM_EPS: (T.FLOAT32, None),
    C.KEY_ROUTER_THRESHOLD: (T.FLOAT32, None),
    C.KEY_PROTECTED_LAYERS: (T.ARRAY, T.INT32),
    C.KEY_AGGREGATION: (T.STRING, None),
    C.KEY_PREFILL: (T.STRING, None),
    C.KEY_TRAIN_SOURCE: (T.STRING, None),
}


def base_kv(n_layer: int = N_LAYER, n_embd: int = N_EMBD, arch: str = ARCH) -> KV:
    """Model keys of several GGUF types, including a string array and a nested array."""
    return {
        "general.name": ("tiny test model", T.STRING, None),
        "general.file_type": (int(gguf.LlamaFileType.MOSTLY_Q8_0), T.UINT32, None),
        f"{arch}.block_count": (n_layer, T.UINT32, None),
        f"{arch}.embedding_length": (n_embd, T.UINT32, None),
        f"{arch}.context_length": (256, T.UINT32, None),
        f"{arch}.attention.layer_norm_rms_epsilon": (1e-6, T.FLOAT32, None),
        f"{arch}.rope.freq_base": (1e6, T.FLOAT32, None),
        "tokenizer.ggml.tokens": ([f"tok{i}" for i in range(N_VOCAB - 1)] + ["é✓"], T.ARRAY, T.STRING),
        "tokenizer.ggml.scores": ([-float(i) / 3 for i in range(N_VOCAB)], T.ARRAY, T.FLOAT32),
        "tokenizer.ggml.token_type": ([1] * N_VOCAB, T.ARRAY, T.INT32),
        "tokenizer.ggml.add_bos_token": (False, T.BOOL, None),
        "test.int64": (-(2**40), T.INT64, None),
        "test.float64": (0.1, T.FLOAT64, None),
        "test.uint8": (200, T.UINT8, None),
        "test.nested": ([[1, 2, 3], [4]], T.ARRAY, None),
    }


def base_tensors(n_layer: int = N_LAYER, n_embd: int = N_EMBD, seed: int = 0) -> Tensors:
    """Seeded weights: F16 embedding, per layer an F32 norm, a Q8_0 matrix, an F16 matrix and an F32 bias."""
    rng = np.random.default_rng(seed)
    f32 = lambda *shape: rng.standard_normal(shape).astype(np.float32)  # noqa: E731
    tensors: Tensors = {"token_embd.weight": (f32(N_VOCAB, n_embd).astype(np.float16), None)}
    for i in range(n_layer):
        tensors[f"blk.{i}.attn_norm.weight"] = (f32(n_embd), None)
        tensors[f"blk.{i}.attn_q.weight"] = (gguf.quants.quantize(f32(n_embd, n_embd), Q.Q8_0), Q.Q8_0)
        tensors[f"blk.{i}.attn_q.bias"] = (f32(n_embd), None)
        tensors[f"blk.{i}.ffn_up.weight"] = (f32(2 * n_embd, n_embd).astype(np.float16), None)
    tensors["output_norm.weight"] = (f32(n_embd), None)
    tensors["output.weight"] = (gguf.quants.quantize(f32(N_VOCAB, n_embd), Q.Q4_0), Q.Q4_0)
    return tensors


def first_kv(hidden: int = HIDDEN, n_layer: int = N_LAYER) -> KV:
    """Valid first.* keys, spelled with docs/FORMAT.md's types."""
    values = {
        C.KEY_VERSION: C.FIRST_VERSION_PLAIN,
        C.KEY_ROUTER_HIDDEN_SIZE: hidden,
        C.KEY_ROUTER_NORM_EPS: C.DEFAULT_NORM_EPS,
        C.KEY_ROUTER_THRESHOLD: C.DEFAULT_THRESHOLD,
        C.KEY_PROTECTED_LAYERS: C.default_protected_layers(n_layer),
        C.KEY_AGGREGATION: C.AGGREGATION_MEAN,
        C.KEY_PREFILL: C.PREFILL_FULL,
        C.KEY_TRAIN_SOURCE: "tests",
    }
    return {key: (value, *FIRST_TYPES[key]) for key, value in values.items()}


def random_router_arrays(n_layer: int = N_LAYER, n_embd: int = N_EMBD, hidden: int = HIDDEN,
                         seed: int = 1) -> dict[int, dict[str, np.ndarray]]:
    """Every router tensor random (nothing 0 or 1), float32, NumPy shapes."""
    rng = np.random.default_rng(seed)
    return {bid: {role: rng.standard_normal(C.router_shape(role, n_embd, hidden)).astype(np.float32)
                  for role in C.ROUTER_TENSORS} for bid in range(n_layer)}


def router_tensors(arrays: dict[int, dict[str, np.ndarray]]) -> Tensors:
    """GGUF-named router tensors from layer -> role -> array."""
    return {C.router_tensor_name(role, bid): (arr, None) for bid, roles in arrays.items()
            for role, arr in roles.items()}


def write_gguf(path: Path, kv: KV, tensors: Tensors, arch: str = ARCH, alignment: int | None = None) -> Path:
    """Write one GGUF with exactly these keys and tensors (plus general.architecture)."""
    writer = gguf.GGUFWriter(path, arch)
    if alignment is not None:
        writer.add_custom_alignment(alignment)
    for key, (value, vtype, sub_type) in kv.items():
        writer.add_key_value(key, value, vtype, sub_type=sub_type)
    for name, (arr, raw_dtype) in tensors.items():
        writer.add_tensor(name, arr, raw_dtype=raw_dtype)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def assert_refused(directory: Path, kv: KV, tensors: Tensors, mutate, message: str) -> Path:
    """Write ``kv`` / ``tensors`` after ``mutate(kv, tensors)`` and check that validation refuses the
    file with ``"<file>: " + message`` (a regex); returns the file."""
    import re

    import pytest

    from first_gguf import format as fmt
    from first_gguf.errors import FormatError

    mutate(kv, tensors)
    path = write_gguf(directory / "m.gguf", kv, tensors)
    with pytest.raises(FormatError, match=rf"^{re.escape(str(path))}: {message}"):
        fmt.validate_first_gguf(path)
    return path


def write_base(path: Path, n_layer: int = N_LAYER, n_embd: int = N_EMBD,
               alignment: int | None = None) -> Path:
    """A plain (not FiRST) tiny qwen2 GGUF."""
    return write_gguf(path, base_kv(n_layer, n_embd), base_tensors(n_layer, n_embd), alignment=alignment)


def write_first(path: Path, arrays: dict[int, dict[str, np.ndarray]] | None = None) -> Path:
    """A valid tiny FiRST-GGUF written directly (not through the code under test)."""
    arrays = random_router_arrays() if arrays is None else arrays
    return write_gguf(path, base_kv() | first_kv(), base_tensors() | router_tensors(arrays))


def sha256(path: Path) -> str:
    from first_gguf.build import sha256_file

    return sha256_file(path)


def kv_raw(field) -> bytes:
    """A KV field's type tag and value bytes, from the reader's parts."""
    return b"".join(part.tobytes() for part in field.parts[2:])

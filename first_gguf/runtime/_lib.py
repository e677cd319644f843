"""ctypes bindings for the FiRST symbols of the patched libllama.

The symbols are bound on the library llama-cpp-python already loaded (``llama_cpp._lib``),
never on a second copy (a second copy would have its own global state). Each binding
carries its C prototype as a comment. A stock llama-cpp-python has none of these symbols:
``load()`` then raises RuntimeNotBuiltError telling the user how to build the runtime.
"""

from __future__ import annotations

import ctypes
import functools
import os
from dataclasses import dataclass
from typing import Any

from ..errors import RuntimeNotBuiltError

BUILD_HINT = "run `first-gguf build` (or `make setup`) in the first-gguf checkout"

# enum llama_first_mode / enum llama_first_prefill (src/llama-first.h)
MODE_FULL, MODE_FIRST, MODE_MASK = 0, 1, 2
PREFILL_FULL, PREFILL_MASKED = 0, 1

_ctx, _model = ctypes.c_void_p, ctypes.c_void_p
_u8p, _f32p, _i32, _f32 = ctypes.POINTER(ctypes.c_uint8), ctypes.POINTER(ctypes.c_float), ctypes.c_int32, ctypes.c_float

# (symbol, argtypes, restype)
_PROTOTYPES: tuple[tuple[str, list[Any], Any], ...] = (
    # int32_t llama_first_version(void);
    ("llama_first_version", [], _i32),
    # const char * llama_first_build_key(void);
    ("llama_first_build_key", [], ctypes.c_char_p),
    # int32_t llama_first_model_router_hidden(const struct llama_model * model);
    ("llama_first_model_router_hidden", [_model], _i32),
    # int32_t llama_first_set_mode(struct llama_context * ctx, int32_t mode);
    ("llama_first_set_mode", [_ctx, _i32], _i32),
    # int32_t llama_first_get_mode(const struct llama_context * ctx);
    ("llama_first_get_mode", [_ctx], _i32),
    # int32_t llama_first_set_prefill(struct llama_context * ctx, int32_t kind);
    ("llama_first_set_prefill", [_ctx, _i32], _i32),
    # int32_t llama_first_get_prefill(const struct llama_context * ctx);
    ("llama_first_get_prefill", [_ctx], _i32),
    # int32_t llama_first_set_mask(struct llama_context * ctx, const uint8_t * run, int32_t n);
    ("llama_first_set_mask", [_ctx, _u8p, _i32], _i32),
    # int32_t llama_first_get_mask(const struct llama_context * ctx, uint8_t * run, int32_t n);
    ("llama_first_get_mask", [_ctx, _u8p, _i32], _i32),
    # int32_t llama_first_set_threshold(struct llama_context * ctx, float threshold);
    ("llama_first_set_threshold", [_ctx, _f32], _i32),
    # float llama_first_get_threshold(const struct llama_context * ctx);
    ("llama_first_get_threshold", [_ctx], _f32),
    # int32_t llama_first_begin_prefill(struct llama_context * ctx);
    ("llama_first_begin_prefill", [_ctx], _i32),
    # int32_t llama_first_add_prior(struct llama_context * ctx, const double * sums, int32_t n, int64_t n_tokens);
    ("llama_first_add_prior", [_ctx, ctypes.POINTER(ctypes.c_double), _i32, ctypes.c_int64], _i32),
    # int64_t llama_first_get_sums(const struct llama_context * ctx, double * sums, int32_t n);
    ("llama_first_get_sums", [_ctx, ctypes.POINTER(ctypes.c_double), _i32], ctypes.c_int64),
    # int32_t llama_first_end_prefill(struct llama_context * ctx);
    ("llama_first_end_prefill", [_ctx], _i32),
    # int32_t llama_first_get_probs(const struct llama_context * ctx, float * p, int32_t n);
    ("llama_first_get_probs", [_ctx, _f32p, _i32], _i32),
    # int32_t llama_first_get_prefill_tokens(const struct llama_context * ctx);
    ("llama_first_get_prefill_tokens", [_ctx], _i32),
)


@dataclass(frozen=True)
class FirstLib:
    """Typed handles on the FiRST functions of the loaded libllama."""

    lib: ctypes.CDLL
    path: str

    def version(self) -> int:
        """FiRST-GGUF format version the library implements."""
        return int(self.lib.llama_first_version())

    def build_key(self) -> str:
        """Key of the build (sdist, patch series, flags); ``dev-<commit>`` for dev builds."""
        return self.lib.llama_first_build_key().decode()

    def __getattr__(self, name: str) -> Any:
        # lib.set_mode(...) -> llama_first_set_mode(...), typed by _PROTOTYPES
        return getattr(self.lib, f"llama_first_{name}")


@functools.cache
def load() -> FirstLib:
    """Bind the FiRST symbols on ``llama_cpp``'s library.

    Raises:
        RuntimeNotBuiltError: llama-cpp-python is missing or is a stock build.
    """
    try:
        from llama_cpp import llama_cpp as lc
    except ImportError as exc:
        raise RuntimeNotBuiltError(f"first-gguf runtime not built: llama-cpp-python is not "
                                   f"importable ({exc}); {BUILD_HINT}") from None
    lib = lc._lib
    path = getattr(lib, "_name", "?")
    missing = [name for name, _, _ in _PROTOTYPES if not hasattr(lib, name)]
    if missing:
        where = " (LLAMA_CPP_LIB_PATH is set)" if os.environ.get("LLAMA_CPP_LIB_PATH") else ""
        raise RuntimeNotBuiltError(
            f"first-gguf runtime not built: {path}{where} lacks {', '.join(missing)} "
            f"(a stock or outdated llama-cpp-python); {BUILD_HINT}")
    for name, argtypes, restype in _PROTOTYPES:
        fn = getattr(lib, name)
        fn.argtypes, fn.restype = argtypes, restype
    return FirstLib(lib, path)


# llama.cpp's own per-layer input capture (C++ symbols of llama-context.cpp, not in llama.h):
# void llama_set_embeddings_layer_inp(llama_context * ctx, uint32_t il, bool value);
# float * llama_get_embeddings_layer_inp(llama_context * ctx, uint32_t il);
_LAYER_INP = ("_Z30llama_set_embeddings_layer_inpP13llama_contextjb",
              "_Z30llama_get_embeddings_layer_inpP13llama_contextj")


@functools.cache
def layer_input_fns() -> tuple[Any, Any]:
    """(set, get) of the hidden-state capture at each layer's input.

    Raises:
        RuntimeNotBuiltError: the loaded library does not export them.
    """
    flib = load()
    missing = [name for name in _LAYER_INP if not hasattr(flib.lib, name)]
    if missing:
        raise RuntimeNotBuiltError(f"{flib.path} lacks the layer-input capture ({', '.join(missing)}); "
                                   f"{BUILD_HINT}")
    set_inp, get_inp = (getattr(flib.lib, name) for name in _LAYER_INP)
    set_inp.argtypes, set_inp.restype = [_ctx, ctypes.c_uint32, ctypes.c_bool], None
    get_inp.argtypes, get_inp.restype = [_ctx, ctypes.c_uint32], _f32p
    return set_inp, get_inp

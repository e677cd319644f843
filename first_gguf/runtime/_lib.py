"""ctypes bindings for the FiRST symbols of the patched libllama.

Written the way llama-cpp-python's ``llama_cpp.py`` writes its own: each C function is a
typed stub with its C prototype as the comment above it. The stubs are methods of
``FirstLib``; ``load()`` binds them on the library llama-cpp-python already loaded
(``llama_cpp._lib``), never on a second copy (a second copy would have its own global
state). A stock llama-cpp-python has none of these symbols: ``load()`` then raises
RuntimeNotBuiltError telling the user how to build the runtime.
"""

from __future__ import annotations

import ctypes
import functools
import os
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable, TypeVar

from ..errors import RuntimeNotBuiltError

if TYPE_CHECKING:
    from llama_cpp._ctypes_extensions import CtypesArray, CtypesPointer

BUILD_HINT = "run `first-gguf build` (or `make setup`) in the first-gguf checkout"

# enum llama_first_mode / enum llama_first_prefill (src/llama-first.h)
MODE_FULL, MODE_FIRST, MODE_MASK = 0, 1, 2
PREFILL_FULL, PREFILL_MASKED = 0, 1

# struct llama_context * / struct llama_model * (opaque; llama_cpp passes them as c_void_p)
llama_context_p = ctypes.c_void_p
llama_model_p = ctypes.c_void_p
_u8p, _f32p, _f64p = ctypes.POINTER(ctypes.c_uint8), ctypes.POINTER(ctypes.c_float), ctypes.POINTER(ctypes.c_double)
_i32, _i64, _u32, _f32 = ctypes.c_int32, ctypes.c_int64, ctypes.c_uint32, ctypes.c_float
_i32p = ctypes.POINTER(ctypes.c_int32)

F = TypeVar("F", bound=Callable[..., Any])


@dataclass(frozen=True)
class _CFunction:
    symbol: str
    argtypes: tuple[Any, ...]
    restype: Any
    required: bool


_C_FUNCTIONS: dict[str, _CFunction] = {}  # FirstLib method name -> its C function


def _c_function(symbol: str, argtypes: list[Any], restype: Any, required: bool = True) -> Callable[[F], F]:
    """Declare the stub below as C function ``symbol`` (llama_cpp's ``ctypes_function``).

    ``FirstLib`` replaces the stub with the bound C function. The stub itself only runs when
    the library lacks an optional symbol, and then raises RuntimeNotBuiltError.
    """

    def decorator(stub: F) -> F:
        _C_FUNCTIONS[stub.__name__] = _CFunction(symbol, tuple(argtypes), restype, required)

        @functools.wraps(stub)
        def unbound(self: FirstLib, *args: Any) -> Any:
            raise RuntimeNotBuiltError(f"{self.path} lacks {symbol} (an outdated patched build); {BUILD_HINT}")

        return unbound  # type: ignore[return-value]

    return decorator


class FirstLib:
    """Typed handles on the FiRST functions of the loaded libllama (see ``load()``).

    Each method is the C function itself once bound; the C prototype is above each stub.
    """

    def __init__(self, lib: ctypes.CDLL, path: str) -> None:
        self.lib, self.path = lib, path
        for method, fn in _C_FUNCTIONS.items():
            if hasattr(lib, fn.symbol):
                cfn = getattr(lib, fn.symbol)
                cfn.argtypes, cfn.restype = list(fn.argtypes), fn.restype
                setattr(self, method, cfn)  # shadows the stub: no Python frame per call

    def missing(self, required_only: bool = False) -> list[str]:
        """C symbols of our bindings the library does not export."""
        return [fn.symbol for method, fn in _C_FUNCTIONS.items()
                if method not in vars(self) and (fn.required or not required_only)]

    def build_key(self) -> str:
        """Key of the build (sdist, patch series, flags); ``dev-<commit>`` for dev builds."""
        return self._build_key().decode()

    # --- version: which library this is ------------------------------------------------------

    # int32_t llama_first_version(void);
    @_c_function("llama_first_version", [], _i32)
    def version(self) -> int:
        """FiRST-GGUF format version the library implements."""
        ...

    # const char * llama_first_build_key(void);
    @_c_function("llama_first_build_key", [], ctypes.c_char_p)
    def _build_key(self) -> bytes: ...

    # --- model and per-context FiRST state ----------------------------------------------------

    # int32_t llama_first_model_router_hidden(const struct llama_model * model);
    @_c_function("llama_first_model_router_hidden", [llama_model_p], _i32)
    def model_router_hidden(self, model: llama_model_p | int) -> int: ...

    # int32_t llama_first_set_mode(struct llama_context * ctx, int32_t mode);
    @_c_function("llama_first_set_mode", [llama_context_p, _i32], _i32)
    def set_mode(self, ctx: llama_context_p | int, mode: int) -> int: ...

    # int32_t llama_first_get_mode(const struct llama_context * ctx);
    @_c_function("llama_first_get_mode", [llama_context_p], _i32)
    def get_mode(self, ctx: llama_context_p | int) -> int: ...

    # int32_t llama_first_set_prefill(struct llama_context * ctx, int32_t kind);
    @_c_function("llama_first_set_prefill", [llama_context_p, _i32], _i32)
    def set_prefill(self, ctx: llama_context_p | int, kind: int) -> int: ...

    # int32_t llama_first_get_prefill(const struct llama_context * ctx);
    @_c_function("llama_first_get_prefill", [llama_context_p], _i32)
    def get_prefill(self, ctx: llama_context_p | int) -> int: ...

    # int32_t llama_first_set_mask(struct llama_context * ctx, const uint8_t * run, int32_t n);
    @_c_function("llama_first_set_mask", [llama_context_p, _u8p, _i32], _i32)
    def set_mask(self, ctx: llama_context_p | int, run: CtypesArray[ctypes.c_uint8], n: int) -> int: ...

    # int32_t llama_first_get_mask(const struct llama_context * ctx, uint8_t * run, int32_t n);
    @_c_function("llama_first_get_mask", [llama_context_p, _u8p, _i32], _i32)
    def get_mask(self, ctx: llama_context_p | int, run: CtypesArray[ctypes.c_uint8], n: int) -> int: ...

    # int32_t llama_first_set_threshold(struct llama_context * ctx, float threshold);
    @_c_function("llama_first_set_threshold", [llama_context_p, _f32], _i32)
    def set_threshold(self, ctx: llama_context_p | int, threshold: float) -> int: ...

    # float llama_first_get_threshold(const struct llama_context * ctx);
    @_c_function("llama_first_get_threshold", [llama_context_p], _f32)
    def get_threshold(self, ctx: llama_context_p | int) -> float: ...

    # int32_t llama_first_begin_prefill(struct llama_context * ctx);
    @_c_function("llama_first_begin_prefill", [llama_context_p], _i32)
    def begin_prefill(self, ctx: llama_context_p | int) -> int: ...

    # int32_t llama_first_add_prior(struct llama_context * ctx, const double * sums, int32_t n, int64_t n_tokens);
    @_c_function("llama_first_add_prior", [llama_context_p, _f64p, _i32, _i64], _i32)
    def add_prior(self, ctx: llama_context_p | int, sums: CtypesPointer[ctypes.c_double], n: int,
                  n_tokens: int) -> int: ...

    # int64_t llama_first_get_sums(const struct llama_context * ctx, double * sums, int32_t n);
    @_c_function("llama_first_get_sums", [llama_context_p, _f64p, _i32], _i64)
    def get_sums(self, ctx: llama_context_p | int, sums: CtypesPointer[ctypes.c_double], n: int) -> int: ...

    # int32_t llama_first_end_prefill(struct llama_context * ctx);
    @_c_function("llama_first_end_prefill", [llama_context_p], _i32)
    def end_prefill(self, ctx: llama_context_p | int) -> int: ...

    # int32_t llama_first_get_probs(const struct llama_context * ctx, float * p, int32_t n);
    @_c_function("llama_first_get_probs", [llama_context_p, _f32p, _i32], _i32)
    def get_probs(self, ctx: llama_context_p | int, p: CtypesArray[ctypes.c_float], n: int) -> int: ...

    # int32_t llama_first_get_prefill_tokens(const struct llama_context * ctx);
    @_c_function("llama_first_get_prefill_tokens", [llama_context_p], _i32)
    def get_prefill_tokens(self, ctx: llama_context_p | int) -> int: ...

    # --- thin FFN stand-ins (format version 2) --------------------------------------------------

    # int32_t llama_first_model_thin_width(const struct llama_model * model, int32_t il);
    @_c_function("llama_first_model_thin_width", [llama_model_p, _i32], _i32)
    def model_thin_width(self, model: llama_model_p | int, il: int) -> int: ...

    # int32_t llama_first_set_thin(struct llama_context * ctx, const uint8_t * thin, int32_t n);
    @_c_function("llama_first_set_thin", [llama_context_p, _u8p, _i32], _i32)
    def set_thin(self, ctx: llama_context_p | int, thin: CtypesArray[ctypes.c_uint8], n: int) -> int: ...

    # int32_t llama_first_get_thin(const struct llama_context * ctx, uint8_t * thin, int32_t n);
    @_c_function("llama_first_get_thin", [llama_context_p, _u8p, _i32], _i32)
    def get_thin(self, ctx: llama_context_p | int, thin: CtypesArray[ctypes.c_uint8], n: int) -> int: ...

    # int32_t llama_first_model_thin_attn(const struct llama_model * model);  (format version 4)
    @_c_function("llama_first_model_thin_attn", [llama_model_p], _i32)
    def model_thin_attn(self, model: llama_model_p | int) -> int: ...

    # --- short output vocabulary (format version 3) ---------------------------------------------

    # int32_t llama_first_model_vocab_size(const struct llama_model * model);
    @_c_function("llama_first_model_vocab_size", [llama_model_p], _i32)
    def model_vocab_size(self, model: llama_model_p | int) -> int: ...

    # int32_t llama_first_set_vocab(struct llama_context * ctx, int32_t on, const int32_t * extra, int32_t n_extra);
    @_c_function("llama_first_set_vocab", [llama_context_p, _i32, _i32p, _i32], _i32)
    def set_vocab(self, ctx: llama_context_p | int, on: int, extra: CtypesArray[ctypes.c_int32] | None,
                  n_extra: int) -> int: ...

    # int32_t llama_first_get_vocab(const struct llama_context * ctx);
    @_c_function("llama_first_get_vocab", [llama_context_p], _i32)
    def get_vocab(self, ctx: llama_context_p | int) -> int: ...

    # --- layer-input capture (optional: only evaluation and tests read it) ----------------------

    # void llama_first_set_layer_inp_capture(struct llama_context * ctx, uint32_t il, bool capture);
    @_c_function("llama_first_set_layer_inp_capture", [llama_context_p, _u32, ctypes.c_bool], None,
                 required=False)
    def set_layer_inp_capture(self, ctx: llama_context_p | int, il: int, capture: bool) -> None: ...

    # float * llama_first_get_layer_inp(struct llama_context * ctx, uint32_t il);
    @_c_function("llama_first_get_layer_inp", [llama_context_p, _u32], _f32p, required=False)
    def get_layer_inp(self, ctx: llama_context_p | int, il: int) -> CtypesPointer[ctypes.c_float]: ...


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
    flib = FirstLib(lc._lib, getattr(lc._lib, "_name", "?"))
    missing = flib.missing(required_only=True)
    if missing:
        where = " (LLAMA_CPP_LIB_PATH is set)" if os.environ.get("LLAMA_CPP_LIB_PATH") else ""
        raise RuntimeNotBuiltError(
            f"first-gguf runtime not built: {flib.path}{where} lacks {', '.join(missing)} "
            f"(a stock or outdated llama-cpp-python); {BUILD_HINT}")
    return flib


@functools.cache
def layer_input_fns() -> tuple[Callable[[Any, int, bool], None], Callable[[Any, int], Any]]:
    """(set, get) of the hidden-state capture at each layer's input.

    ``set(ctx, il, capture)`` turns the capture of layer ``il`` on or off for the following
    decodes; ``get(ctx, il)`` points at its ``n_tokens * n_embd`` floats of the last decode.

    Raises:
        RuntimeNotBuiltError: the loaded library does not export them.
    """
    flib = load()
    missing = [s for s in flib.missing() if s in ("llama_first_set_layer_inp_capture", "llama_first_get_layer_inp")]
    if missing:
        raise RuntimeNotBuiltError(f"{flib.path} lacks the layer-input capture ({', '.join(missing)}); "
                                   f"{BUILD_HINT}")
    return flib.set_layer_inp_capture, flib.get_layer_inp

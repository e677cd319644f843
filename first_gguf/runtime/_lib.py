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

# (symbol, argtypes, restype)
_PROTOTYPES: tuple[tuple[str, list[Any], Any], ...] = (
    # int32_t llama_first_version(void);
    ("llama_first_version", [], ctypes.c_int32),
    # const char * llama_first_build_key(void);
    ("llama_first_build_key", [], ctypes.c_char_p),
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

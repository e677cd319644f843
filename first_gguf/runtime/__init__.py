"""The FiRST runtime: the patched llama.cpp driven through llama-cpp-python (no torch)."""

from __future__ import annotations

from ._lib import BUILD_HINT, FirstLib, load


def runtime_info() -> dict:
    """Where the runtime library is and whether it matches this checkout's patch series.

    Returns:
        ``library``, ``format_version``, ``build_key``, ``expected_key`` (None outside a
        source checkout) and ``up_to_date`` (None when it cannot be told).
    """
    lib = load()
    info = {"library": lib.path, "format_version": lib.version(), "build_key": lib.build_key(),
            "expected_key": None, "up_to_date": None}
    from .. import build
    from ..errors import BuildError

    try:
        expected = build.build_key(build.read_base(), build.patch_files(), build.cmake_args())
    except BuildError:  # not a source checkout: nothing to compare with
        return info
    info["expected_key"] = expected
    if not info["build_key"].startswith("dev-"):
        info["up_to_date"] = info["build_key"] == expected
    return info


def __getattr__(name: str):
    # the engine imports llama_cpp; keep `import first_gguf.runtime` cheap and its errors clear
    if name in ("FirstModel", "PrefillReport", "mask_from_skip"):
        load()
        from . import engine

        return getattr(engine, name)
    raise AttributeError(name)


__all__ = ["BUILD_HINT", "FirstLib", "FirstModel", "PrefillReport", "load", "mask_from_skip", "runtime_info"]

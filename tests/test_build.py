"""The patch pipeline: the series applies to a fresh sdist, idempotently; the installed
library is the patched build of this checkout; a stock library gives a clear error."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from first_gguf import build, build_dev, constants
from first_gguf.errors import BuildError


@pytest.fixture(scope="module")
def sdist() -> Path:
    return build.fetch_sdist(build.read_base(), build.cache_dir())


def _patched_markers(tree: Path) -> dict[str, bool]:
    src = tree / "vendor" / "llama.cpp" / "src"
    return {
        "llama-first.cpp": (src / "llama-first.cpp").is_file(),
        "cmake hook": "llama-first.cpp" in (src / "CMakeLists.txt").read_text(),
        "loader hook": "load_first_tensors(ml);" in (src / "llama-model.cpp").read_text(),
        "common not forced": 'LLAMA_BUILD_COMMON ON CACHE BOOL "Build llama.cpp common library" FORCE'
        not in (tree / "CMakeLists.txt").read_text(),
    }


def test_base_pins_the_sdist(sdist: Path) -> None:
    base = build.read_base()
    assert sdist.name == base.sdist_name
    assert build.sha256_file(sdist) == base.sdist_sha256
    assert len(base.llama_cpp_commit) == 40


def test_series_applies_to_fresh_sdist_and_is_idempotent(sdist: Path, tmp_path: Path) -> None:
    patches = build.patch_files()
    assert [p.name[:4] for p in patches] == [f"{i:04d}" for i in range(1, len(patches) + 1)]
    tree = build.extract_sdist(sdist, tmp_path / "x")
    assert not any(_patched_markers(tree).values())
    assert build.apply_patches(tree, patches) == ["applied"] * len(patches)
    assert all(_patched_markers(tree).values()), _patched_markers(tree)
    before = (tree / "vendor/llama.cpp/src/llama-model.cpp").read_bytes()
    assert build.apply_patches(tree, patches) == ["already applied"] * len(patches)
    assert (tree / "vendor/llama.cpp/src/llama-model.cpp").read_bytes() == before


def test_series_applies_inside_an_enclosing_git_repo(sdist: Path, tmp_path: Path) -> None:
    # Without the sdist's own .git, a plain `git apply` run in a subdirectory of another
    # repository skips every path outside it; the ceiling must prevent that.
    subprocess.run(["git", "init", "-q", str(tmp_path)], check=True)
    tree = build.extract_sdist(sdist, tmp_path / "nested" / "x")
    shutil.rmtree(tree / ".git")
    (tree / "vendor" / "llama.cpp" / ".git").unlink()
    build.apply_patches(tree, build.patch_files())
    assert all(_patched_markers(tree).values()), _patched_markers(tree)


def test_stale_patch_fails_with_regenerate_hint(sdist: Path, tmp_path: Path) -> None:
    tree = build.extract_sdist(sdist, tmp_path / "x")
    cm = tree / "vendor" / "llama.cpp" / "src" / "CMakeLists.txt"
    cm.write_text(cm.read_text().replace("llama-cparams.cpp", "llama-cparams-moved.cpp"))
    with pytest.raises(BuildError, match=r"0001-.*does not apply.*regenerate against patches/BASE"):
        build.apply_patches(tree, build.patch_files())


def test_dev_tree_exports_the_committed_series_byte_for_byte(tmp_path: Path) -> None:
    # The series must be exactly what its scratch tree regenerates (ollama's CI checks its
    # series the same way): a hand-edited patch, or one `--export` would rewrite, fails here.
    # dev_tree only makes the git tree; compiling is dev_build's, so this stays quick.
    dev, out = tmp_path / "dev", tmp_path / "exported"
    build_dev.dev_tree(dev)
    out.mkdir()
    exported, committed = build_dev.export_patches(dev, out), build.patch_files()
    assert [p.name for p in exported] == [p.name for p in committed]
    for new, old in zip(exported, committed):
        assert new.read_bytes() == old.read_bytes(), f"{old.name} differs from its regeneration"


def test_build_key_tracks_sdist_patches_and_flags(tmp_path: Path) -> None:
    base, patches, args = build.read_base(), build.patch_files(), build.cmake_args("")
    key = build.build_key(base, patches, args)
    assert key == build.build_key(base, patches, list(args))
    assert key != build.build_key(base, patches, [*args, "-DGGML_NATIVE=OFF"])
    assert key != build.build_key(base, patches[:-1], args)
    edited = tmp_path / patches[0].name
    edited.write_bytes(patches[0].read_bytes() + b"\n")
    assert key != build.build_key(base, [edited, *patches[1:]], args)
    other = build.Base(base.version, "0" * 64, base.llama_cpp_commit)
    assert key != build.build_key(other, patches, args)


def test_no_amx_kernels_in_a_native_build() -> None:
    """On a CPU with AMX the native build leaves ggml's AMX kernels out (they crash this llama.cpp),
    by flags that only such a CPU gets; the installed library is the proof."""
    import ctypes

    import llama_cpp

    amx = "amx_tile" in build._cpu_flags().split() and build.platform.machine() == "x86_64"
    flags = [a for a in build.cmake_args("") if "-mno-amx" in a]
    assert flags == ([f"-DCMAKE_{lang}_FLAGS={build.NO_AMX_FLAGS}" for lang in ("C", "CXX")] if amx else [])
    assert not [a for a in build.cmake_args("-DGGML_NATIVE=OFF") if "-mno-amx" in a]  # the user's flags decide
    lib = Path(llama_cpp.__file__).parent / "lib" / "libggml-cpu.so"
    if lib.is_file():  # Linux wheels: the CPU backend's own report of what it was compiled with
        assert ctypes.CDLL(str(lib)).ggml_cpu_has_amx_int8() == 0


def test_wrong_sdist_hash_is_refused(tmp_path: Path) -> None:
    base = build.read_base()
    bad = build.Base(base.version, "0" * 64, base.llama_cpp_commit)
    with pytest.raises(BuildError, match=r"sha256 .* does not match patches/BASE"):
        build.fetch_sdist(bad, tmp_path)
    assert not list((tmp_path / "sdist").glob("*.tar.gz"))


def test_installed_library_is_this_checkouts_patched_build() -> None:
    from first_gguf.runtime import load, runtime_info

    lib = load()
    assert lib.version() == constants.FIRST_VERSION
    info = runtime_info()
    print(info)
    assert info["build_key"] == info["expected_key"], "run `make setup` (or `first-gguf build`)"
    assert info["up_to_date"] is True


def test_c_sources_spell_the_keys_of_constants() -> None:
    patch = "".join(p.read_text() for p in build.patch_files())
    # the loader reads every required key and the thin layers and widths (the kept neurons'
    # indices are for the Python side only: the tensors already hold the kept neurons)
    keys = [*constants.REQUIRED_KEYS, constants.KEY_THIN_LAYERS, constants.KEY_THIN_WIDTHS]
    for key in keys:
        assert f'"{key}"' in patch, key
    for template in [*constants.ROUTER_TENSORS.values(), *constants.THIN_TENSORS.values()]:
        stem = template.split(".")[2]  # blk.{bid}.<stem>.weight
        assert f'"blk.%d.{stem}"' in patch, stem


def test_bindings_match_the_c_api_of_the_series() -> None:
    # Every llama_first_* function the patches declare has a typed binding of the same arity.
    from first_gguf.runtime import _lib

    header = "".join(p.read_text() for p in build.patch_files())
    declared = {m[1]: 0 if m[2].strip() == "void" else m[2].count(",") + 1
                for m in re.finditer(r"^\+\s*LLAMA_API [^(]*?\b(llama_first_\w+)\s*\(([^)]*)\)", header, re.M)}
    bound = {f.symbol: len(f.argtypes) for f in _lib._C_FUNCTIONS.values()}
    assert declared == bound


@pytest.mark.slow
def test_stock_library_gives_a_clear_error() -> None:
    libdir = build.ensure_stock_library()
    env = {**os.environ, "LLAMA_CPP_LIB_PATH": str(libdir)}
    code = "from first_gguf.runtime import load; load()"
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    assert proc.returncode != 0
    assert "first-gguf runtime not built" in proc.stderr and "first-gguf build" in proc.stderr, proc.stderr
    assert "llama_first_version" in proc.stderr

"""Patch development: a persistent scratch tree instead of the cached wheel.

``first-gguf build --dev DIR`` makes ``DIR/tree`` (the pinned sdist as a git repo, one commit
per patch) and builds it incrementally with CMake (``LLAMA_CPP_LIB_PATH`` then points at it);
``first-gguf build --export DIR`` regenerates ``patches/`` from the commits.
Standard library only, like ``first_gguf.build``.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

from .build import (GIT_IDENTITY, cmake_args, extract_sdist, fetch_sdist, git, patch_files, patches_dir,
                    read_base, run_command)
from .errors import BuildError
from .paths import cache_dir


def dev_tree(dev: Path, cache: Path | None = None) -> Path:
    """Create ``dev/tree``: the pinned sdist as a git repo, one commit per patch."""
    tree = dev / "tree"
    if (tree / ".git").is_dir():
        return tree
    base = read_base()
    sdist = fetch_sdist(base, cache or cache_dir())
    extracted = extract_sdist(sdist, dev / "extract")
    os.replace(extracted, tree)
    shutil.rmtree(dev / "extract")
    # The sdist carries upstream git metadata; the scratch tree gets a history of its own.
    shutil.rmtree(tree / ".git", ignore_errors=True)
    (tree / "vendor" / "llama.cpp" / ".git").unlink(missing_ok=True)
    git(["init", "-q"], tree)
    git(["add", "-A", "-f"], tree)  # -f: upstream .gitignore hides src/models/
    git([*GIT_IDENTITY, "commit", "-q", "-m", f"llama-cpp-python {base.version} sdist"], tree)
    git(["tag", "first-base"], tree)
    for patch in patch_files():
        git([*GIT_IDENTITY, "am", "-q", "--keep-cr", str(patch)], tree)
    return tree


def dev_build(dev: Path, extra_cmake_args: str | None = None) -> Path:
    """Incremental CMake build of ``dev/tree`` into ``dev/build``; returns the library dir."""
    tree, build = dev / "tree", dev / "build"
    if not (tree / ".git").is_dir():
        raise BuildError(f"{tree}: no scratch tree; run `first-gguf build --dev {dev}` first")
    head = git(["rev-parse", "--short", "HEAD"], tree).stdout.strip()
    args = [*cmake_args(extra_cmake_args), f"-DLLAMA_FIRST_BUILD_KEY=dev-{head}", "-DCMAKE_BUILD_TYPE=Release"]
    gen = ["-G", "Ninja"] if shutil.which("ninja") and not (build / "CMakeCache.txt").exists() else []
    run_command(["cmake", "-S", str(tree), "-B", str(build), *gen, *args], what="cmake configure",
         log=dev / "configure.log")
    run_command(["cmake", "--build", str(build), "-j", str(os.cpu_count() or 1)], what="cmake build",
         log=dev / "build.log")
    return build / "bin"


def export_patches(dev: Path, out: Path | None = None) -> list[Path]:
    """Regenerate the series from the scratch tree's commits after ``first-base``.

    Args:
        dev: the directory given to ``first-gguf build --dev``.
        out: where the ``NNNN-*.patch`` files go (default: ``patches/``); its old ones are replaced.

    Returns:
        The exported patches, in order.
    """
    tree, out = dev / "tree", out or patches_dir()
    if git(["status", "--porcelain", "--untracked-files=no"], tree).stdout.strip():
        raise BuildError(f"{tree}: uncommitted changes; commit them (one commit per patch) first")
    with tempfile.TemporaryDirectory() as tmp:
        git(["format-patch", "--no-signature", "--no-numbered", "--zero-commit", "-o", tmp,
              "first-base..HEAD"], tree)
        new = sorted(Path(tmp).glob("*.patch"))
        for old in patch_files(out):
            old.unlink()
        for p in new:
            shutil.copy(p, out / p.name)
    return patch_files(out)


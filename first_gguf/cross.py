"""The patched llama.cpp on another CPU: a cross build for 64-bit Arm (Raspberry Pi 4 and 5),
checked against this machine by a small C driver of ours run under qemu-user.

The cross build is the pinned sdist's vendored llama.cpp with ``patches/`` applied (the same
``build.fetch_sdist`` / ``extract_sdist`` / ``apply_patches`` as the wheel), configured with
CMake for Debian's ``aarch64-linux-gnu`` toolchain: shared libraries, ``GGML_NATIVE=OFF`` and
``GGML_CPU_ARM_ARCH`` for the target core (ggml turns it into ``-march=``), nothing but
libllama and ggml. It is cached under ``<cache>/cross/`` by a key made of the sdist hash, the
patch-series hash and the flags, like the wheel. ``native/first_driver.c`` (shipped in the
package) is compiled for the target against it and for this machine against the installed
patched library; ``run_driver`` runs either (the Arm one under ``qemu-aarch64``) and
``compare`` says how far apart the two answers are.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np

from . import build
from .errors import BuildError, FirstError
from .log import logger
from .paths import cache_dir

_log = logger("cross")

DRIVER_SOURCE = Path(__file__).resolve().parent / "native" / "first_driver.c"
# Debian's cross toolchain and user-mode emulator; installed by ensure_tools when missing.
APT_PACKAGES = ("gcc-aarch64-linux-gnu", "g++-aarch64-linux-gnu", "qemu-user")
QEMU = ("qemu-aarch64", "qemu-aarch64-static")
# Only libllama and ggml: no tests, examples, tools, server, mtmd or common library.
LIBRARY_ARGS = ("-DBUILD_SHARED_LIBS=ON", "-DLLAMA_BUILD_TESTS=OFF", "-DLLAMA_BUILD_EXAMPLES=OFF",
                "-DLLAMA_BUILD_TOOLS=OFF", "-DLLAMA_BUILD_SERVER=OFF", "-DLLAMA_BUILD_COMMON=OFF",
                "-DGGML_CCACHE=OFF", "-DCMAKE_BUILD_TYPE=Release")


@dataclass(frozen=True)
class Target:
    """A 64-bit Arm core: what ggml is compiled for and what qemu emulates."""

    name: str
    arm_arch: str   # GGML_CPU_ARM_ARCH: ggml passes it as -march=
    tune: str       # -mtune (tuning only: -mcpu would conflict with ggml's -march)
    qemu_cpu: str   # qemu-aarch64 -cpu, a model with every feature of arm_arch
    triple: str = "aarch64-linux-gnu"

    @property
    def sysroot(self) -> Path:
        return Path("/usr") / self.triple

    def cmake_args(self) -> list[str]:
        """Toolchain and CPU flags of a cross build for this core."""
        return ["-DCMAKE_SYSTEM_NAME=Linux", "-DCMAKE_SYSTEM_PROCESSOR=aarch64",
                f"-DCMAKE_C_COMPILER={self.triple}-gcc", f"-DCMAKE_CXX_COMPILER={self.triple}-g++",
                f"-DCMAKE_FIND_ROOT_PATH={self.sysroot}", "-DCMAKE_FIND_ROOT_PATH_MODE_PROGRAM=NEVER",
                "-DCMAKE_FIND_ROOT_PATH_MODE_LIBRARY=ONLY", "-DCMAKE_FIND_ROOT_PATH_MODE_INCLUDE=ONLY",
                "-DGGML_NATIVE=OFF", f"-DGGML_CPU_ARM_ARCH={self.arm_arch}",
                f"-DCMAKE_C_FLAGS=-mtune={self.tune}", f"-DCMAKE_CXX_FLAGS=-mtune={self.tune}"]


# Raspberry Pi 5 (Cortex-A76: Armv8.2-A with dot product and half-precision arithmetic, no i8mm,
# no SVE) and Pi 4 (Cortex-A72: Armv8.0-A with CRC, no dot product).
TARGETS = {
    "cortex-a76": Target("cortex-a76", "armv8.2-a+dotprod+fp16", "cortex-a76", "cortex-a76"),
    "cortex-a72": Target("cortex-a72", "armv8-a+crc", "cortex-a72", "cortex-a72"),
}
DEFAULT_TARGET = "cortex-a76"


def missing_tools(target: Target) -> list[str]:
    """Commands of the cross toolchain and emulator that are not on PATH."""
    missing = [c for c in (f"{target.triple}-gcc", f"{target.triple}-g++") if shutil.which(c) is None]
    if not any(shutil.which(q) for q in QEMU):
        missing.append("qemu-aarch64")
    return missing


def ensure_tools(target: Target, install: bool = True) -> None:
    """Install Debian's cross toolchain and qemu-user with apt-get when any is missing.

    Raises:
        BuildError: something is missing and cannot be installed here (not root, no apt-get,
            or apt-get failed).
    """
    missing = missing_tools(target)
    if not missing:
        return
    what = f"{', '.join(missing)} missing (Debian packages: {' '.join(APT_PACKAGES)})"
    root = _root_prefix()
    if not install or shutil.which("apt-get") is None or root is None:
        raise BuildError(f"{what}; install them as root with apt-get install --no-install-recommends")
    _log(f"{what}: installing with apt-get")
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    build.run_command([*root, "apt-get", "update", "-qq"], what="apt-get update", env=env)
    build.run_command([*root, "apt-get", "install", "-y", "--no-install-recommends", *APT_PACKAGES],
               what="apt-get install", env=env)
    if missing_tools(target):
        raise BuildError(f"apt-get installed {' '.join(APT_PACKAGES)} but {', '.join(missing_tools(target))} "
                         f"is still not on PATH")


def _root_prefix() -> list[str] | None:
    """[] as root, sudo where it needs no password (a CI runner), else None."""
    if os.geteuid() == 0:
        return []
    if shutil.which("sudo") and subprocess.run(["sudo", "-n", "true"], capture_output=True).returncode == 0:
        return ["sudo", "-n", "-E"]
    return None


@dataclass(frozen=True)
class Library:
    """A patched libllama and the headers of its sources."""

    key: str
    lib_dir: Path
    tree: Path  # the patched sdist tree (of the installed library: its headers only)
    info: dict = field(default_factory=dict, compare=False)  # a cross build's record: flags, seconds

    @property
    def include_dirs(self) -> list[Path]:
        cpp = self.tree / "vendor" / "llama.cpp"
        return [cpp / "include", cpp / "ggml" / "include", cpp / "src"]  # src: llama-first.h


def _patched_tree(base: build.Base, patches: list[Path], cache: Path, dest: Path) -> Path:
    tree = build.extract_sdist(build.fetch_sdist(base, cache), dest)
    build.apply_patches(tree, patches)
    return tree


def ensure_cross_library(target: Target, cache: Path | None = None, force: bool = False) -> Library:
    """The patched libllama cross-compiled for ``target`` (built once, then cached).

    The key is the wheel's (``build.build_key``): sdist hash, patch-series hash and every flag,
    the target's included. The compile runs under ``nice -n 10``.
    """
    cache = cache or cache_dir()
    base, patches = build.read_base(), build.patch_files()
    args = [*LIBRARY_ARGS, *target.cmake_args()]
    key = build.build_key(base, patches, args)
    root = cache / "cross" / f"{target.name}-{key}"
    stamp, lib_dir = root / "built.json", root / "build" / "bin"
    if stamp.is_file() and not force:
        return Library(key, lib_dir, root / "src" / f"llama_cpp_python-{base.version}", json.loads(stamp.read_text()))
    shutil.rmtree(root, ignore_errors=True)
    tree = _patched_tree(base, patches, cache, root / "src")
    src, out = tree / "vendor" / "llama.cpp", root / "build"
    gen = ["-G", "Ninja"] if shutil.which("ninja") else []
    _log(f"cross-compiling the patched library for {target.name} (minutes; log: {root / 'build.log'})")
    t0 = time.monotonic()
    build.run_command(["cmake", "-S", str(src), "-B", str(out), *gen, *args, f"-DLLAMA_FIRST_BUILD_KEY={key}"],
               what=f"cmake configure ({target.name})", log=root / "configure.log")
    build.run_command(["nice", "-n", "10", "cmake", "--build", str(out), "--target", "llama",
                "-j", str(os.cpu_count() or 1)], what=f"cmake build ({target.name})", log=root / "build.log")
    seconds = time.monotonic() - t0
    _log(f"built the {target.name} library in {seconds:.0f} s")
    info = {"key": key, "target": target.name, "cmake_args": args, "sdist_sha256": base.sdist_sha256,
            "series": build.series_hash(patches), "seconds": round(seconds, 1)}
    stamp.write_text(json.dumps(info, indent=1))
    return Library(key, lib_dir, tree, info)


def installed_library(cache: Path | None = None) -> Library:
    """The patched libllama installed in this Python (the wheel of ``first-gguf build``), with
    the headers of the patched sources of the same key (copied once into the cache).

    Raises:
        BuildError: the installed library is not this checkout's patched build.
    """
    import importlib.util

    cache = cache or cache_dir()
    base, patches = build.read_base(), build.patch_files()
    key = build.build_key(base, patches, build.cmake_args())
    if build.installed_build_key() != key:
        raise BuildError(f"the installed llama-cpp-python is not the patched build of this checkout "
                         f"(key {build.installed_build_key()}, expected {key}); run `first-gguf build`")
    spec = importlib.util.find_spec("llama_cpp")
    lib_dir = Path(spec.origin).parent / "lib"
    root = cache / "cross" / f"host-{key}"
    if not (root / "headers.json").is_file():
        shutil.rmtree(root, ignore_errors=True)
        tree = _patched_tree(base, patches, cache, root / "src")
        _copy_headers(tree, root / "headers")
        shutil.rmtree(root / "src")
        (root / "headers.json").write_text(json.dumps({"key": key}))
    return Library(key, lib_dir, root / "headers")


def _copy_headers(tree: Path, dest: Path) -> None:
    """The headers a driver includes, in the tree's layout (a few hundred KB of a 200 MB tree)."""
    cpp = Path("vendor") / "llama.cpp"
    for sub in (cpp / "include", cpp / "ggml" / "include"):
        shutil.copytree(tree / sub, dest / sub)
    (dest / cpp / "src").mkdir(parents=True)
    for header in (tree / cpp / "src").glob("*.h"):
        shutil.copy2(header, dest / cpp / "src" / header.name)


def compile_driver(lib: Library, target: Target | None = None, cache: Path | None = None) -> Path:
    """``native/first_driver.c`` compiled against ``lib`` for ``target`` (None: this machine).

    Cached by the source, the library (key and place) and the compiler; the library is found
    by rpath.
    """
    cc = f"{target.triple}-gcc" if target else os.environ.get("CC", "cc")
    source = DRIVER_SOURCE.read_bytes()
    tag = hashlib.sha256(source + f"{lib.key}\0{lib.lib_dir}\0{cc}".encode()).hexdigest()[:16]
    out = (cache or cache_dir()) / "cross" / "driver" / f"{target.name if target else 'host'}-{tag}" / "first-driver"
    if out.is_file():
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    includes = [f"-I{d}" for d in lib.include_dirs]
    with tempfile.TemporaryDirectory(dir=out.parent) as tmp:
        build.run_command([cc, "-std=c11", "-O2", "-Wall", "-Wextra", *includes, str(DRIVER_SOURCE), "-o", f"{tmp}/d",
                    f"-L{lib.lib_dir}", "-lllama", "-lggml", "-lggml-base", f"-Wl,-rpath,{lib.lib_dir}", "-lm"],
                   what=f"compiling {DRIVER_SOURCE.name} ({target.name if target else 'host'})")
        os.replace(f"{tmp}/d", out)
    return out


@dataclass
class DriverRun:
    """What ``first-driver`` printed and wrote for one model and token sequence."""

    key: str
    mask: tuple[bool, ...]
    probs: tuple[float, ...] | None
    threshold: float | None
    tokens: tuple[int, ...]   # argmax of every logits row (the first STEPS were fed back)
    logits: np.ndarray        # (steps + 1, n_vocab) float32
    seconds: float


def driver_command(driver: Path, target: Target | None = None) -> list[str]:
    """How to start ``driver``: directly, or under qemu-aarch64 with the target's CPU model."""
    if target is None:
        return [str(driver)]
    qemu = next((q for q in QEMU if shutil.which(q)), None)
    if qemu is None:
        raise BuildError(f"no {' or '.join(QEMU)} on PATH (Debian package qemu-user)")
    return [qemu, "-cpu", target.qemu_cpu, "-L", str(target.sysroot), str(driver)]


def run_driver(driver: Path, model: Path, tokens: Sequence[int], steps: int = 4, threads: int = 1,
               target: Target | None = None, kv_f32: bool = False, flash_attn: bool = False,
               mode: str = "first") -> DriverRun:
    """One FiRST prefill of ``tokens`` and ``steps`` greedy decode steps by ``driver``.

    Args:
        target: the core the driver was built for (run under qemu-user), None for this machine.
        kv_f32: a float32 KV cache (else llama.cpp's default, f16).
        flash_attn: flash attention on (off by default, as in ``FirstModel``).
        mode: "first" (the file's routers and threshold) or "full".
    """
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "logits.f32"
        cmd = [*driver_command(driver, target), "-t", str(threads), "-n", str(steps), "-m", mode,
               "-k", "f32" if kv_f32 else "f16", *(["-f"] if flash_attn else []), str(model), str(out), *map(str, tokens)]
        t0 = time.monotonic()
        proc = subprocess.run(cmd, capture_output=True, text=True)
        seconds = time.monotonic() - t0
        if proc.returncode != 0:
            raise FirstError(f"{driver.name} ({target.name if target else 'host'}) failed on {model.name} "
                             f"with exit code {proc.returncode}: {proc.stderr.strip()[-2000:]}")
        lines = dict(line.split(" ", 1) for line in proc.stdout.splitlines() if " " in line)
        n_vocab = int(lines["n_vocab"])
        logits = np.fromfile(out, dtype="<f4").reshape(steps + 1, n_vocab)
    probs = tuple(float(x) for x in lines["probs"].split()) if "probs" in lines else None
    return DriverRun(lines["key"], tuple(x == "1" for x in lines["mask"].split()), probs,
                     float(lines["threshold"]) if "threshold" in lines else None,
                     tuple(int(x) for x in lines["tokens"].split()), logits, seconds)


@dataclass(frozen=True)
class Comparison:
    """How far apart two runs of the same model and tokens are (``b`` is the reference)."""

    same_mask: bool
    same_tokens: bool
    nmse: float           # over every logits row: sum((a - b)^2) / sum(b^2)
    max_abs: float
    top1: float           # fraction of rows whose argmax agrees
    max_prob_diff: float  # largest |p_i(a) - p_i(b)|, nan without p_i

    def line(self) -> str:
        return (f"mask {'same' if self.same_mask else 'DIFFERENT'}, tokens {'same' if self.same_tokens else 'DIFFERENT'}, "
                f"logits NMSE {self.nmse:.3g} (max abs {self.max_abs:.3g}), top-1 {self.top1:.0%}, "
                f"max |dp_i| {self.max_prob_diff:.3g}")


def compare(a: DriverRun, b: DriverRun) -> Comparison:
    la, lb = a.logits.astype(np.float64), b.logits.astype(np.float64)
    nmse = float(np.sum((la - lb) ** 2) / max(np.sum(lb ** 2), 1e-30))
    top1 = float(np.mean(np.argmax(la, axis=1) == np.argmax(lb, axis=1)))
    dp = float(np.max(np.abs(np.subtract(a.probs, b.probs)))) if a.probs and b.probs else float("nan")
    return Comparison(a.mask == b.mask, a.tokens == b.tokens, nmse, float(np.max(np.abs(la - lb))), top1, dp)

"""The patched library on 64-bit Arm (Raspberry Pi 5's Cortex-A76), proven here: the series
cross-compiled with Debian's aarch64 toolchain (``first_gguf/cross.py``, cached), our driver
(``first_gguf/native/first_driver.c``) run under qemu-user, and the same driver on this machine's
installed patched library; same masks and greedy tokens, and on a tiny f32 FiRST-GGUF logits
within NMSE 1e-6. Missing tools are installed with apt-get (as ``make aarch64-check`` does,
which runs this module with ``-s`` to print the figures); where that is impossible the
tests fail saying so, they never skip.
"""

from __future__ import annotations

import time
from pathlib import Path

import pytest

import tiny_ckpt
from conftest import spread_routers
from first_gguf import cross, models, shipped

pytestmark = pytest.mark.slow

TARGET = cross.TARGETS[cross.DEFAULT_TARGET]
STEPS = 8          # greedy decode steps after the prompt: 9 logits rows per run
NMSE_MAX = 1e-6    # tiny f32 model (measured: 6e-13, and 9e-8 with flash attention)
TINY_SEED = 1      # spread routers whose mask on the default prompt skips a layer and keeps others


def _say(line: str) -> None:
    print(f"\n[aarch64] {line}", flush=True)


@pytest.fixture(scope="module")
def drivers() -> dict:
    """The driver for this machine and for the target (the cross build on first use: minutes)."""
    cross.ensure_tools(TARGET)
    t0 = time.monotonic()
    arm_lib = cross.ensure_cross_library(TARGET)
    flags = " ".join(a for a in arm_lib.info["cmake_args"] if "ARM" in a)
    _say(f"{TARGET.name} library {arm_lib.key} ({flags}): built in {arm_lib.info['seconds']:.0f} s, "
         f"ready in {time.monotonic() - t0:.1f} s this run")
    return {"host": cross.compile_driver(cross.installed_library()),
            "arm": cross.compile_driver(arm_lib, TARGET)}


@pytest.fixture(scope="module")
def tiny_first(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny qwen2 checkpoint (tests/tiny_ckpt.py) converted to an f32 FiRST-GGUF."""
    from first_gguf.convert import convert_hf

    work = tmp_path_factory.mktemp("aarch64")
    model, hf_dir = tiny_ckpt.checkpoint_dir("qwen2", work)
    routers = spread_routers(model.config.num_hidden_layers, model.config.hidden_size, seed=TINY_SEED)
    return convert_hf(hf_dir, work / "tiny.first.gguf", routers=routers, outtype="f32")


def _both(drivers: dict, model: Path, tokens: list[int], **kw) -> tuple[cross.DriverRun, cross.DriverRun]:
    host = cross.run_driver(drivers["host"], model, tokens, STEPS, **kw)
    arm = cross.run_driver(drivers["arm"], model, tokens, STEPS, target=TARGET, **kw)
    return host, arm


def _report(name: str, host: cross.DriverRun, arm: cross.DriverRun) -> cross.Comparison:
    cmp = cross.compare(arm, host)
    skipped = [i for i, run in enumerate(host.mask) if not run]
    _say(f"{name}: {len(host.mask)} layers, x86 skips {skipped}, {cmp.line()}; "
         f"x86 {host.seconds:.1f} s, {TARGET.name} under qemu {arm.seconds:.1f} s")
    return cmp


@pytest.mark.parametrize("flash_attn", [False, True], ids=["attn", "flash-attn"])
def test_tiny_f32_model_same_answer_on_arm(drivers: dict, tiny_first: Path, flash_attn: bool,
                                           default_tokens: tuple[list[int], list[int]]) -> None:
    """Without flash attention (FirstModel's default) the two CPUs differ only in the order of
    float sums; ggml's CPU flash attention rounds through half precision differently on each."""
    host, arm = _both(drivers, tiny_first, default_tokens[0], kv_f32=True, flash_attn=flash_attn)
    cmp = _report(f"tiny f32 FiRST-GGUF, f32 KV, flash attention {'on' if flash_attn else 'off'}", host, arm)
    assert not all(host.mask) and any(host.mask[1:-1]), f"seed {TINY_SEED}: the mask should skip some layers"
    assert cmp.same_mask, (host.probs, arm.probs)
    assert cmp.same_tokens, (host.tokens, arm.tokens)
    assert cmp.nmse < NMSE_MAX, cmp.line()
    assert host.key != arm.key  # two builds, not one library twice


def test_default_model_same_mask_and_tokens_on_arm(drivers: dict,
                                                   default_tokens: tuple[list[int], list[int]]) -> None:
    """Q4_K_M: x86 and Arm use different quantized kernels, so the logits differ more than
    float rounding (the figures are printed); the mask and the greedy tokens must not."""
    model = shipped.first_gguf_path(models.DEFAULT_MODEL)
    host, arm = _both(drivers, model, default_tokens[0])
    cmp = _report(f"{models.DEFAULT_MODEL} (committed routers, threshold {host.threshold})", host, arm)
    assert cmp.same_mask, (host.probs, arm.probs)
    assert cmp.same_tokens, (host.tokens, arm.tokens)


def test_driver_is_the_python_runtime(drivers: dict, tiny_first: Path,
                                      default_tokens: tuple[list[int], list[int]]) -> None:
    """On this machine the driver gives what FirstModel gives for the same prefill (so the Arm
    figures speak for the runtime users run): same mask and p_i, identical last-token logits."""
    import numpy as np

    from first_gguf.runtime import FirstModel
    from llama_cpp import GGML_TYPE_F32

    tokens = default_tokens[0]
    host = cross.run_driver(drivers["host"], tiny_first, tokens, steps=0, kv_f32=True)
    llm = FirstModel(str(tiny_first), mode="first", n_ctx=64, n_threads=1, type_k=GGML_TYPE_F32,
                     type_v=GGML_TYPE_F32)
    report = llm.prefill(tokens)
    logits = np.ctypeslib.as_array(llm._ctx.get_logits(), shape=(1, llm.n_vocab()))[0]
    assert report.mask == host.mask and np.allclose(report.probs, host.probs, rtol=0, atol=1e-7)
    assert np.array_equal(logits, host.logits[0])


def test_cross_build_is_cached(drivers: dict) -> None:
    t0 = time.monotonic()
    lib = cross.ensure_cross_library(TARGET)
    assert time.monotonic() - t0 < 30 and (lib.lib_dir / "libllama.so").is_file()
    assert cross.compile_driver(lib, TARGET) == drivers["arm"]


def test_missing_tools_are_named(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("PATH", str(tmp_path))
    assert cross.missing_tools(TARGET) == ["aarch64-linux-gnu-gcc", "aarch64-linux-gnu-g++", "qemu-aarch64"]
    with pytest.raises(cross.BuildError, match="gcc-aarch64-linux-gnu g\\+\\+-aarch64-linux-gnu qemu-user"):
        cross.ensure_tools(TARGET, install=False)

"""Every ggml op the FiRST graph builds has a Metal kernel in the vendored llama.cpp.

No compile and no Mac: the test reads the pinned sdist (patches/BASE) straight from its
tarball. The ops are the ones our patches build on the graph context (the router MLP:
rms_norm, mul, mul_mat, add, silu, sigmoid, sum; get_rows, which keeps the output rows
when the last layer is skipped and gathers the context's extra tokens' rows of the output
matrix for the short output vocabulary (Q8_0 on the 0.5B, Q6_K on the 1.5B); concat, which
joins their logits to the list's). For each it checks ggml-metal's ``supports_op`` (the case is
there and does not return false outright), the op encoder's dispatch and the kernels. A
version bump that loses one fails here; a patch that builds a new op fails until it is added
to OPS below (after checking ggml-metal supports it).
"""

from __future__ import annotations

import re
import tarfile
from functools import lru_cache

import pytest

from first_gguf import build
from first_gguf.paths import cache_dir

METAL = "vendor/llama.cpp/ggml/src/ggml-metal/"
# ggml builder the patches call -> (op, unary op or None, Metal kernels it needs: F32 activations,
# F32 or F16 router weights; mul_mv for one token, mul_mm for a prompt)
OPS = {
    "ggml_rms_norm": ("GGML_OP_RMS_NORM", None, ("kernel_rms_norm_f32",)),
    "ggml_mul": ("GGML_OP_MUL", None, ("kernel_bin_fuse_f32_f32_f32",)),
    "ggml_add": ("GGML_OP_ADD", None, ("kernel_bin_fuse_f32_f32_f32",)),
    "ggml_mul_mat": ("GGML_OP_MUL_MAT", None, ("kernel_mul_mv_f32_f32", "kernel_mul_mv_f16_f32",
                                               "kernel_mul_mm_f32_f32", "kernel_mul_mm_f16_f32")),
    "ggml_silu": ("GGML_OP_UNARY", "GGML_UNARY_OP_SILU", ()),
    "ggml_sigmoid": ("GGML_OP_UNARY", "GGML_UNARY_OP_SIGMOID", ()),
    "ggml_sum": ("GGML_OP_SUM", None, ("kernel_op_sum_f32",)),
    "ggml_get_rows": ("GGML_OP_GET_ROWS", None, ("kernel_get_rows_f32", "kernel_get_rows_q8_0",
                                                 "kernel_get_rows_q6_K")),
    "ggml_concat": ("GGML_OP_CONCAT", None, ("kernel_concat_f32",)),
}
# called on the graph context but not ops: tensors the graph creates (inputs)
NOT_OPS = {"ggml_new_tensor_1d"}


@lru_cache(maxsize=1)
def metal_sources() -> dict[str, str]:
    """The ggml-metal sources of the pinned sdist, by path below ggml-metal/."""
    sdist = build.fetch_sdist(build.read_base(), cache_dir())
    out = {}
    with tarfile.open(sdist) as tar:
        for member in tar.getmembers():
            _, _, rel = member.name.partition("/")
            if member.isfile() and rel.startswith(METAL):
                out[rel[len(METAL):]] = tar.extractfile(member).read().decode("utf-8", errors="replace")
    assert out, f"no {METAL} in {sdist.name}: did the sdist layout change?"
    return out


def graph_builders() -> set[str]:
    """The ggml functions our patches call on the graph context (``ggml_x(ctx0, ...)`` in added lines)."""
    found = set()
    for patch in build.patch_files():
        for line in patch.read_text().splitlines():
            if line.startswith("+") and not line.startswith("+++"):
                found |= {f"ggml_{m}" for m in re.findall(r"\bggml_(\w+)\(\s*ctx0\b", line)}
    return found


def function_body(source: str, signature: str) -> str:
    """A C function's text up to its closing brace, without // comments."""
    start = source.index(signature)
    return re.sub(r"//[^\n]*", "", source[start:source.index("\n}\n", start)])


def first_statement_after(body: str, label: str) -> str:
    """The statement a ``case LABEL:`` falls through to (skipping further case labels)."""
    m = re.search(rf"case {label}:", body)
    assert m, f"no 'case {label}:'"
    rest = re.sub(r"^(\s*case \w+:)+", "", body[m.end():])
    return rest.strip().split(";")[0]


def test_the_table_covers_every_op_the_patches_build():
    assert graph_builders() - NOT_OPS == set(OPS), "update OPS (and check ggml-metal supports the new op)"


@pytest.mark.parametrize("builder", sorted(OPS))
def test_metal_supports_and_encodes(builder: str):
    src = metal_sources()
    op, unary, kernels = OPS[builder]
    supports = function_body(src["ggml-metal-device.m"], "bool ggml_metal_device_supports_op(")
    if unary:
        block = supports[supports.index("case GGML_OP_UNARY:"):]
        block = block[:block.index("default:")]
        assert first_statement_after(block, unary).startswith("return ") and \
            first_statement_after(block, unary) != "return false", f"{unary} is not supported on Metal"
        num = unary.replace("GGML_UNARY_OP_", "OP_UNARY_NUM_")
        assert re.search(rf"case {unary}:\s*op_num\s*=\s*{num}", src["ggml-metal-device.cpp"]), \
            f"no pipeline for {unary}"
        assert num in src["kernels/unary.metal"], f"kernels/unary.metal has no branch for {num}"
    assert first_statement_after(supports, op) != "return false", f"{op} is not supported on Metal"
    assert f"case {op}:" in src["ggml-metal-ops.cpp"], f"the Metal encoder does not dispatch {op}"
    names = set()
    for path, text in src.items():
        if path.startswith("kernels/") and path.endswith(".metal"):
            names |= set(re.findall(r'host_name\("(\w+)"\)', text)) | set(re.findall(r"kernel void (\w+)\(", text))
    missing = [k for k in kernels if k not in names]
    assert not missing, f"{builder}: Metal kernels missing: {missing}"

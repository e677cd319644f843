"""``convert_hf`` end to end: tiny seeded HF checkpoints of every architecture through upstream's
converter into f32 FiRST-GGUFs, checked on the patched runtime against HF and the PyTorch
reference (``first_gguf/router.py``) with the same semantics; then a K-quant, bad input, and
(slow) the real default model. Real converter, real library, no mocks.

Row convention: the runtime's ``teacher_forced_logits(prompt, cont)`` row t predicts token
t + 1; the reference's row j is the distribution cont[j] is drawn from, i.e. runtime row
len(prompt) - 1 + j.
"""

from __future__ import annotations

import functools
import os
import secrets
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch

import tiny_ckpt
from conftest import spread_routers
from first_gguf.convert import convert_hf
from first_gguf.errors import FirstError
from first_gguf.format import inspect_gguf, make_identity_routers, save_router_file, validate_first_gguf
from first_gguf.router import FirstRouters, first_generate_logits, prefill
from llama_worker import compare

ARCHS = ("qwen2", "llama", "qwen3", "gemma3_text")
GGUF_ARCH = {"gemma3_text": "gemma3"}
PROMPTS = ("def fibonacci(n):\n    if n < 2:\n        return n\n",
           "The quick brown fox jumps over the lazy dog, then it sleeps.",
           "1, 2, 3, 5, 8, 13, 21, 34,")
CONTINUATION = " and the answer is forty-two, of course."
THRESHOLD = 0.5
NEAR = 1e-3     # docs/FORMAT.md: layers whose p_i lies this close to the threshold may differ
MARGIN = 0.02   # routers are chosen so that every p_i is this far from the threshold
NMSE_MAX = 1e-4
P_MAX = 1e-4    # p_i, runtime vs reference
GGML_TYPE_F32 = 0
SCRIPT = Path(__file__).resolve().parent.parent / "convert" / "convert_hf_to_first_gguf.py"
TABLE: dict[str, dict[str, str]] = {}  # arch -> check -> "max abs / NMSE / mask"


@dataclass
class Case:
    """One architecture: the HF model, its directory, its routers and the converted FiRST-GGUF."""

    model_type: str
    model: torch.nn.Module
    hf_dir: Path
    vocab_gguf: Path
    routers: object  # RouterSet
    gguf: Path
    prompts: list[list[int]]
    cont: list[int]
    seed: int

    @property
    def first_routers(self) -> FirstRouters:
        return FirstRouters.from_router_set(self.routers)


@functools.lru_cache(maxsize=None)
def _vocab(gguf: Path):
    from llama_cpp import Llama

    return Llama(str(gguf), vocab_only=True, verbose=False)


def _tokenize(gguf: Path, text: str, bos: bool) -> list[int]:
    """llama.cpp's tokenizer of a GGUF (add_bos: a BOS only where the vocab asks for one)."""
    return _vocab(gguf).tokenize(text.encode(), add_bos=bos, special=False)


def _same_routers(a, b) -> bool:
    """Bit-identical tensors and settings (norm eps as the GGUF's f32 stores it)."""
    return (a.metadata() | {"first.router.norm_eps": float(np.float32(a.norm_eps))}
            == b.metadata() | {"first.router.norm_eps": float(np.float32(b.norm_eps))}
            and all(np.array_equal(a.tensors[i][r], b.tensors[i][r]) for i in a.tensors for r in a.tensors[i]))


def _pick_routers(model: torch.nn.Module, prompts: list[list[int]]):
    """The first seed whose spread routers skip a layer on some prompt, run one on some prompt,
    and keep every p_i MARGIN away from the threshold (so the masks compare exactly)."""
    cfg = model.config.get_text_config()
    n_layer, n_embd = cfg.num_hidden_layers, cfg.hidden_size
    for seed in range(1, 200):
        rs = spread_routers(n_layer, n_embd, seed=seed)
        fr = FirstRouters.from_router_set(rs)
        with torch.no_grad():
            pres = [prefill(model, fr, torch.tensor(p)) for p in prompts]
        p = torch.stack([r.p[0] for r in pres])[:, 1:-1]  # unprotected layers
        if (p - THRESHOLD).abs().min() > MARGIN and (p < THRESHOLD).any() and (p >= THRESHOLD).any():
            return rs, seed
    raise AssertionError("no seed gives routers that both skip and keep layers")


@pytest.fixture(scope="session")
def work(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("convert")


@pytest.fixture(scope="session")
def tokenizers(work: Path):
    """Tokenizer files per model type, each built once (qwen2 and qwen3 share one)."""
    built: dict[tuple, Path] = {}

    def get(model_type: str) -> tuple[Path, Path]:
        key = tiny_ckpt.TOKENIZERS[model_type]
        if key not in built:
            built[key] = tiny_ckpt.tokenizer_files(model_type, work / f"tok-{model_type}", work)
        return built[key], tiny_ckpt.source_gguf(key[1], work)

    return get


@pytest.fixture(scope="session")
def cases(work: Path, tokenizers):
    """model_type -> its Case, built on first use: tiny checkpoint, routers, FiRST-GGUF (f32)."""
    built: dict[str, Case] = {}

    def get(model_type: str) -> Case:
        if model_type not in built:
            tok_dir, vocab_gguf = tokenizers(model_type)
            model = tiny_ckpt.tiny_checkpoint(model_type, tiny_ckpt.vocab_size(tok_dir),
                                              tiny_ckpt.special_ids(vocab_gguf))
            hf_dir = tiny_ckpt.write_checkpoint(model, tok_dir, work / f"hf-{model_type}")
            prompts = [_tokenize(vocab_gguf, text, bos=True) for text in PROMPTS]
            cont = _tokenize(vocab_gguf, CONTINUATION, bos=False)
            routers, seed = _pick_routers(model, prompts)
            out = convert_hf(hf_dir, work / f"{model_type}.first.gguf", routers=routers, outtype="f32")
            built[model_type] = Case(model_type, model, hf_dir, vocab_gguf, routers, out, prompts, cont, seed)
        return built[model_type]

    return get


@pytest.fixture(params=ARCHS)
def case(request, cases) -> Case:
    return cases(request.param)


@pytest.fixture(scope="session", autouse=True)
def parity_table():
    yield
    _vocab.cache_clear()  # free the llama.cpp vocabularies while the library is still loaded
    if TABLE:
        checks = ["full vs HF", "first", "mask, prefill=full", "mask, prefill=masked", "first, warm-up 3",
                  "mask, warm-up 3"]
        print("\n\nparity (f32 GGUF, patched runtime vs HF / PyTorch reference): max abs diff / NMSE / mask")
        print("arch         " + "".join(f"| {c:34s}" for c in checks))
        for arch, row in TABLE.items():
            print(f"{arch:12s} " + "".join(f"| {row.get(c, '-'):34s}" for c in checks))


def _runtime(case: Case, prompt: list[int], kv_f32: bool = True, **mode) -> tuple[np.ndarray, object]:
    """Teacher-forced logits on the patched runtime. The KV cache is F32 (llama.cpp's default
    F16 cache alone costs NMSE ~1e-6 and p_i ~1e-4 here), so what is left is conversion and
    the FiRST graph."""
    from first_gguf.runtime import FirstModel

    kv = {"type_k": GGML_TYPE_F32, "type_v": GGML_TYPE_F32} if kv_f32 else {}
    llm = FirstModel(case.gguf, logits_all=True, n_threads=2, n_ctx=256, verbose=False, **kv, **mode)
    logits = llm.teacher_forced_logits(prompt, case.cont)
    return logits, llm.last_prefill


def _record(case: Case, check: str, diff: float, nmse: float, mask: str = "") -> None:
    cell = f"{diff:.2g} / {nmse:.2g}" + (f" / {mask}" if mask else "")
    TABLE.setdefault(case.model_type, {})[check] = cell


def _aligned(runtime: np.ndarray, n_prompt: int, n_cont: int) -> np.ndarray:
    return runtime[n_prompt - 1: n_prompt - 1 + n_cont]


# --- the converted file ----------------------------------------------------------------------

def test_converted_file_is_a_valid_first_gguf(case: Case):
    info = inspect_gguf(case.gguf)
    assert info["architecture"] == GGUF_ARCH.get(case.model_type, case.model_type)
    assert info["n_layer"] == case.routers.n_layer and info["n_embd"] == case.routers.n_embd
    assert info["quantization"]["file_type"] == "ALL_F32"
    assert info["first"]["valid"] is True
    assert set(info["first"]["router"]["dtypes"].values()) == {"F32"}
    assert _same_routers(validate_first_gguf(case.gguf), case.routers)
    print(f"{case.model_type}: routers seed {case.seed}, {info['size_bytes'] / 1e6:.1f} MB")


def test_tokenizer_survives_conversion(case: Case):
    """The converted GGUF tokenizes as the GGUF the tokenizer files came from, token for token."""
    from first_gguf.format import read_header

    src, got = read_header(case.vocab_gguf), read_header(case.gguf)
    value = lambda r, key: r.fields[key].contents() if key in r.fields else None  # noqa: E731
    for key in ("tokenizer.ggml.model", "tokenizer.ggml.pre", "tokenizer.ggml.tokens",
                "tokenizer.ggml.bos_token_id", "tokenizer.ggml.eos_token_id", "tokenizer.ggml.add_bos_token"):
        assert value(got, key) == value(src, key), key
    # token types too, except the vocab's padding entries (UNUSED), which transformers'
    # rebuilt tokenizer lists as plain tokens; nothing tokenizes to them
    types = [(i, a, b) for i, (a, b) in enumerate(zip(value(src, "tokenizer.ggml.token_type"),
                                                       value(got, "tokenizer.ggml.token_type"))) if a != b]
    assert all(a == gguf.TokenType.UNUSED for _, a, _ in types), types[:5]
    for text in (*PROMPTS, CONTINUATION, "naïve café — 你好 🦙\n\n    x  =  1\t# tab"):
        assert _tokenize(case.gguf, text, bos=True) == _tokenize(case.vocab_gguf, text, bos=True), text


# --- parity ----------------------------------------------------------------------------------

def test_full_mode_matches_hf(case: Case):
    prompt = case.prompts[0]
    got, rep = _runtime(case, prompt, mode="full")
    with torch.no_grad():
        want = case.model(torch.tensor([prompt + case.cont])).logits[0].numpy()
    diff, nmse = compare(f"{case.model_type} full vs HF", got, want)
    _record(case, "full vs HF", diff, nmse)
    assert all(rep.mask) and nmse < NMSE_MAX


def test_first_mode_matches_reference(case: Case):
    agree, total, worst = 0, 0, (0.0, 0.0)
    for prompt in case.prompts:
        got, rep = _runtime(case, prompt, mode="first")
        want, mask, p = first_generate_logits(case.model, case.first_routers, torch.tensor(prompt),
                                              torch.tensor(case.cont), mode="first")
        p, mask = p.numpy(), mask.numpy()
        err = np.abs(np.array(rep.probs) - p)
        print(f"{case.model_type} p_i runtime {np.round(rep.probs, 4)} reference {np.round(p, 4)} "
              f"max diff {err.max():.2g}; skipped {rep.skipped}")
        assert err.max() < P_MAX
        far = np.abs(p - THRESHOLD) >= NEAR
        assert np.array_equal(np.array(rep.mask)[far], mask[far])
        agree += int(np.array_equal(np.array(rep.mask), mask))
        total += 1
        diff, nmse = compare(f"{case.model_type} first vs reference", _aligned(got, len(prompt), len(case.cont)),
                             want.numpy())
        worst = max(worst, (diff, nmse), key=lambda x: x[1])
        assert nmse < NMSE_MAX
    _record(case, "first", *worst, f"{agree}/{total} masks")
    assert agree == total


def _skip_mask(case: Case) -> list[bool]:
    """Skip the first unprotected layer and, where there is one, the second-last."""
    n = case.routers.n_layer
    return [i not in (1, n - 2) for i in range(n)]


@pytest.mark.parametrize("kind", ["full", "masked"])
def test_mask_mode_matches_reference(case: Case, kind: str):
    mask = _skip_mask(case)
    worst = (0.0, 0.0)
    for prompt in case.prompts:
        got, rep = _runtime(case, prompt, mode="mask", mask=mask, prefill=kind)
        want, used, _ = first_generate_logits(case.model, case.first_routers, torch.tensor(prompt),
                                              torch.tensor(case.cont), mode="mask", mask=mask, prefill=kind)
        assert list(rep.mask) == mask == used.tolist()
        diff, nmse = compare(f"{case.model_type} mask {rep.skipped} prefill={kind} vs reference",
                             _aligned(got, len(prompt), len(case.cont)), want.numpy())
        worst = max(worst, (diff, nmse), key=lambda x: x[1])
        assert nmse < NMSE_MAX
    _record(case, f"mask, prefill={kind}", *worst, f"skip {rep.skipped}")


@pytest.mark.parametrize("mode", ["first", "mask"])
def test_warmup_matches_reference(case: Case, mode: str):
    """A warm-up of 3 decode steps at full depth, then the decode mask (docs/FORMAT.md section 3):
    the runtime splits the teacher-forced continuation at the warm-up's end; the reference runs
    those 3 steps through every layer (their KV complete) and the rest under the mask."""
    warmup = 3
    kw = dict(mode="mask", mask=_skip_mask(case)) if mode == "mask" else dict(mode="first")
    worst = (0.0, 0.0)
    for prompt in case.prompts:
        got, rep = _runtime(case, prompt, warmup=warmup, **kw)
        want, used, _ = first_generate_logits(case.model, case.first_routers, torch.tensor(prompt),
                                              torch.tensor(case.cont), warmup=warmup, **kw)
        full, _, _ = first_generate_logits(case.model, None, torch.tensor(prompt), torch.tensor(case.cont),
                                           mode="full")
        assert rep.warmup == warmup and list(rep.mask) == used.tolist()
        # the reference: full depth up to the warm-up's end (another batch split: float rounding only)
        assert torch.allclose(want[:warmup + 1], full[:warmup + 1], atol=1e-4)
        diff, nmse = compare(f"{case.model_type} {mode} skip {rep.skipped}, warm-up {warmup} vs reference",
                             _aligned(got, len(prompt), len(case.cont)), want.numpy())
        worst = max(worst, (diff, nmse), key=lambda x: x[1])
        assert nmse < NMSE_MAX
        if rep.skipped:  # the mask takes over after the warm-up
            assert not torch.allclose(want[warmup + 1:], full[warmup + 1:], atol=1e-3)
    _record(case, f"{mode}, warm-up {warmup}", *worst, f"skip {rep.skipped}")


# --- quantization ------------------------------------------------------------------------------

def test_k_quant_keeps_routers_f32_and_runs(cases, tmp_path: Path):
    case = cases("qwen2")
    from first_gguf.runtime import FirstModel

    out = tmp_path / "q.first.gguf"
    out.write_text("old")  # --force replaces it
    convert_hf(case.hf_dir, out, routers=case.routers, outtype="q4_k_m", force=True)
    info = inspect_gguf(out)
    assert info["quantization"]["file_type"] == "Q4_K_M" and info["first"]["valid"] is True
    assert set(info["first"]["router"]["dtypes"].values()) == {"F32"}
    assert _same_routers(validate_first_gguf(out), case.routers)
    llm = FirstModel(out, n_threads=2, n_ctx=256, verbose=False)
    llm.prefill(case.prompts[0])
    assert llm.last_prefill.mode == "first" and llm.last_prefill.probs is not None
    assert sorted(os.listdir(tmp_path)) == ["q.first.gguf"]


def test_without_routers_a_plain_gguf(cases, tmp_path: Path, capfd):
    case = cases("llama")
    out = convert_hf(case.hf_dir, tmp_path / "plain.gguf", outtype="q8_0")
    assert "no routers: writing a plain GGUF, which runs in full or mask mode only" in capfd.readouterr().err
    info = inspect_gguf(out)
    assert info["first"] is None and info["quantization"]["file_type"] == "Q8_0"
    assert sorted(os.listdir(tmp_path)) == ["plain.gguf"]


# --- bad input: one clear line, nothing written, nothing left behind ---------------------------

def _fails(match: str, hf_dir, out: Path, no_work: bool = False, **kw) -> str:
    """convert_hf raises one clear FirstError line and leaves the output directory as it was;
    with ``no_work``, it fails before any work: a fresh, empty cache (where the sdist and the
    extracted converter would go) stays empty."""
    before = sorted(os.listdir(out.parent))
    cache = out.parent.parent / f"cache-{secrets.token_hex(4)}"
    cache.mkdir()
    with pytest.MonkeyPatch.context() as mp:
        if no_work:
            mp.setenv("FIRST_GGUF_CACHE", str(cache))
        with pytest.raises(FirstError, match=match) as err:
            convert_hf(hf_dir, out, **kw)
    message = str(err.value)
    print("error:", message)
    assert "\n" not in message
    assert sorted(os.listdir(out.parent)) == before, "the failure left files behind"
    assert not any(cache.iterdir()), "it did work before failing"
    cache.rmdir()
    return message


def test_not_an_hf_directory(tmp_path: Path):
    (tmp_path / "empty").mkdir()
    _fails("not a Hugging Face model directory", tmp_path / "empty", tmp_path / "o.gguf", no_work=True)
    _fails("not a Hugging Face model directory", tmp_path / "missing", tmp_path / "o.gguf", no_work=True)


def test_unsupported_model_type_fails_before_any_work(tmp_path: Path):
    hf = tmp_path / "gpt2"
    hf.mkdir()
    (hf / "config.json").write_text('{"model_type": "gpt2", "n_layer": 2}')
    (hf / "model.safetensors").write_bytes(b"")
    t0 = time.monotonic()
    msg = _fails("model_type 'gpt2' is not supported", hf, tmp_path / "o.gguf", no_work=True)
    assert all(t in msg for t in ARCHS), msg
    assert time.monotonic() - t0 < 5


def test_routers_for_another_model(cases, tmp_path: Path):
    case = cases("qwen3")
    n_layer, n_embd = case.routers.n_layer, case.routers.n_embd
    more = save_router_file(make_identity_routers(n_layer + 1, n_embd), tmp_path / "more.safetensors")
    _fails(f"routers are for {n_layer + 1} layers but .* has {n_layer}", case.hf_dir, tmp_path / "o.gguf",
           no_work=True, routers=more)
    narrow = make_identity_routers(n_layer, n_embd // 2)
    _fails(f"routers are for n_embd {n_embd // 2} but .* has hidden_size {n_embd}", case.hf_dir,
           tmp_path / "o.gguf", no_work=True, routers=narrow)


def test_existing_output_needs_force(cases, tmp_path: Path):
    case = cases("qwen2")
    out = tmp_path / "o.gguf"
    out.write_text("keep me")
    _fails("exists; pass --force", case.hf_dir, out, no_work=True, routers=case.routers)
    assert out.read_text() == "keep me"


def test_converter_failure_reports_its_last_lines(cases, tmp_path: Path):
    case = cases("qwen2")
    hf = tmp_path / "truncated"
    hf.mkdir()
    for f in case.hf_dir.iterdir():
        (hf / f.name).symlink_to(f)
    (hf / "model.safetensors").unlink()
    (hf / "model.safetensors").write_bytes((case.hf_dir / "model.safetensors").read_bytes()[:100_000])
    out = tmp_path / "out"
    out.mkdir()
    _fails(r"upstream convert_hf_to_gguf.py failed .*\(exit 1\): ValueError: mmap length is greater than file size$",
           hf, out / "o.gguf", routers=case.routers)


def test_missing_tokenizer_is_refused_before_any_work(cases, tmp_path: Path):
    case = cases("qwen2")
    hf = tmp_path / "no-tokenizer"
    hf.mkdir()
    for name in ("config.json", "model.safetensors"):
        (hf / name).symlink_to(case.hf_dir / name)
    _fails("no tokenizer files", hf, tmp_path / "o.gguf", no_work=True)


def test_interrupted_conversion_leaves_nothing(cases, tmp_path: Path):
    """Ctrl-C (SIGINT to the process group) in the middle of the convert stage (upstream's
    converter running; about 8 s of work remain): exit 130, no output, no scratch file."""
    case = cases("gemma3_text")
    routers = save_router_file(case.routers, tmp_path / "routers.safetensors")
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    proc = subprocess.Popen([sys.executable, str(SCRIPT), str(case.hf_dir), "-o", str(out_dir / "o.gguf"),
                             "--routers", str(routers), "--outtype", "f32"],
                            stderr=subprocess.PIPE, text=True, start_new_session=True,
                            # as a terminal's foreground job: a background shell ignores SIGINT
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    try:
        for line in proc.stderr:  # wait for the convert stage
            if "1/2 convert (at" in line:
                break
        time.sleep(1.0)
        os.killpg(proc.pid, signal.SIGINT)
        rest = proc.stderr.read()
        rc = proc.wait(timeout=60)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    print(rest.strip().splitlines()[-1])
    assert rc == 130 and "interrupted" in rest
    assert os.listdir(out_dir) == []


def test_script_help():
    proc = subprocess.run([sys.executable, str(SCRIPT), "--help"], capture_output=True, text=True)
    assert proc.returncode == 0 and "--outtype" in proc.stdout and "q4_k_m" in proc.stdout


# --- the real default model ------------------------------------------------------------------

REQUANT_NEAR = 0.05  # p_i this close to the threshold may flip: the weights are quantized twice


@pytest.mark.slow
def test_real_default_model_end_to_end(default_base: Path, tmp_path_factory):
    """Zoo GGUF -> HF directory (transformers) -> convert --outtype q4_k_m with the committed
    routers -> first mode.

    The masks are compared with the zoo GGUF plus the same routers: the converted weights are
    the zoo's Q4_K_M dequantized and quantized again, so p_i moves a little and a layer near
    the threshold may flip; how many do is printed.
    """
    import shutil

    from first_gguf.convert import hf_dir_from_gguf
    from first_gguf.format import attach_routers, load_router_file
    from first_gguf.shipped import shipped_routers_path
    from first_gguf.runtime import FirstModel

    shipped = shipped_routers_path("qwen2.5-coder-0.5b-instruct")
    assert shipped is not None, "the default model's routers are committed with the package"
    work = tmp_path_factory.mktemp("real")
    try:
        t0 = time.monotonic()
        hf = hf_dir_from_gguf(default_base, work / "hf")
        t1 = time.monotonic()
        out = convert_hf(hf, work / "q4.first.gguf", routers=shipped, outtype="q4_k_m")
        t2 = time.monotonic()
        print(f"HF directory from the zoo GGUF {t1 - t0:.0f} s; HF -> f16 -> Q4_K_M -> FiRST-GGUF {t2 - t1:.0f} s")
        info = inspect_gguf(out)
        assert info["quantization"]["file_type"] == "Q4_K_M" and info["first"]["valid"] is True
        assert info["n_layer"] == 24 and set(info["first"]["router"]["dtypes"].values()) == {"F32"}
        zoo_first = attach_routers(default_base, load_router_file(shipped), work / "zoo.first.gguf")
        differ = 0
        for prompt in ("def fibonacci(n):\n    \"\"\"Return the n-th Fibonacci number.\"\"\"\n",
                       "Write a Python function that reverses a string.", "import numpy as np\n\ndef softmax(x):"):
            assert _tokenize(out, prompt, bos=True) == _tokenize(zoo_first, prompt, bos=True)
            reps = []
            for path in (zoo_first, out):
                m = FirstModel(path, n_threads=2, n_ctx=512, verbose=False)
                reps.append(m.prefill(_tokenize(path, prompt, bos=True)))
                del m
            zoo, conv = reps
            assert conv.mode == "first" and conv.probs is not None
            p = np.array(zoo.probs)
            flipped = [i for i in range(24) if zoo.mask[i] != conv.mask[i]]
            differ += bool(flipped)
            print(f"zoo skips {zoo.skipped}, converted skips {conv.skipped}; max |dp| "
                  f"{np.abs(p - conv.probs).max():.3g}; flipped {[(i, round(p[i], 3)) for i in flipped]}")
            assert all(abs(p[i] - THRESHOLD) < REQUANT_NEAR for i in flipped)
        print(f"masks differing from the zoo FiRST-GGUF: {differ} of 3 prompts")
        llm = FirstModel(out, n_threads=2, n_ctx=512, verbose=False)
        text = llm.create_completion("def fibonacci(n):", max_tokens=16, temperature=0.0)["choices"][0]["text"]
        print(f"first mode, committed routers: {llm.last_prefill.skipped} skipped; completion {text!r}")
        assert llm.last_prefill.mode == "first" and text.strip()
    finally:
        _vocab.cache_clear()
        shutil.rmtree(work, ignore_errors=True)

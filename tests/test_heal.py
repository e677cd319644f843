"""Decode-only healing end to end on a tiny seeded qwen2 (f32): PEFT adapters through llama.cpp's
own ``convert_lora_to_gguf.py``, the ``first.heal.*`` keys, and the patched runtime against the
PyTorch reference (prompt at full depth without the adapter, decode under the mask with it);
``full`` and other masks stay bit-identical; training lowers the held-out KL and resumes; bad
files are clear errors. Real converter, real library, no mocks.
"""

from __future__ import annotations

import copy
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

import tiny_ckpt
from first_gguf.convert import convert_hf
from first_gguf.errors import FirstError, FormatError
from first_gguf.format import make_identity_routers, read_heal, stamp_heal
from first_gguf.llama_tools import convert_lora
from first_gguf.router import decode_hard, prefill
from first_gguf.train.heal import HealConfig, adapted_layers, attach_adapters, heal_gguf
from llama_worker import compare

GGML_TYPE_F32 = 0
SKIP = (1,)
PROMPT_TEXT = "def fibonacci(n):\n    if n < 2:\n        return n\n"
CONT_TEXT = " and the answer is forty-two, of course."
NMSE_MAX = 1e-6


pytestmark = pytest.mark.usefixtures("torch_one_thread")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory):
    """(HF model, HF dir, FiRST-GGUF f32, prompt ids, continuation ids)."""
    work = tmp_path_factory.mktemp("heal")
    model, hf_dir = tiny_ckpt.checkpoint_dir("qwen2", work)
    n_layer, n_embd = model.config.num_hidden_layers, model.config.hidden_size
    gguf = convert_hf(hf_dir, work / "tiny.first.gguf", routers=make_identity_routers(n_layer, n_embd), outtype="f32")
    from first_gguf.runtime import FirstModel

    llm = FirstModel(gguf, n_ctx=128, n_threads=1)
    prompt, cont = llm.tokenize(PROMPT_TEXT.encode()), llm.tokenize(CONT_TEXT.encode(), add_bos=False)
    llm.close()
    return model, hf_dir, gguf, prompt, cont


def _adapter(model, cfg: HealConfig, out: Path, seed: int = 3) -> Path:
    """A healing GGUF with random (non-zero) B matrices, and the PEFT model it came from."""
    pm = attach_adapters(copy.deepcopy(model), cfg, model.config.num_hidden_layers)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in pm.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.2)
    pm.save_pretrained(out / "adapter")
    base = pm.get_base_model()
    base.config.architectures = ["Qwen2ForCausalLM"]
    base.config.save_pretrained(out / "config")
    raw = convert_lora(out / "adapter", out / "config", out / "raw.gguf", "f32")
    return stamp_heal(raw, cfg.skip, model.config.num_hidden_layers, "test", out / "heal.gguf").path, pm


def _runtime(gguf: Path, prompt, cont, **kw) -> tuple[np.ndarray, object]:
    from first_gguf.runtime import FirstModel

    llm = FirstModel(gguf, logits_all=True, n_threads=1, n_ctx=128, type_k=GGML_TYPE_F32, type_v=GGML_TYPE_F32, **kw)
    try:
        logits = llm.teacher_forced_logits(prompt, cont)
        return logits[len(prompt) - 1: len(prompt) - 1 + len(cont)], llm.last_prefill
    finally:
        llm.close()


def _reference(pm, prompt, cont, keep: list[bool], adapters: bool) -> np.ndarray:
    """Row j: the distribution cont[j] is drawn from; the prompt always without the adapters."""
    with torch.no_grad():
        with pm.disable_adapter():
            pre = prefill(pm.get_base_model(), None, torch.tensor(prompt))
            if not adapters:
                rows = decode_hard(pm.get_base_model(), pre, torch.tensor(cont[:-1]), keep)[0]
        if adapters:
            rows = decode_hard(pm.get_base_model(), pre, torch.tensor(cont[:-1]), keep)[0]
    return torch.cat([pre.last_logits, rows]).numpy()


def test_healed_decode_matches_reference_and_full_is_untouched(tiny, tmp_path):
    model, _, gguf, prompt, cont = tiny
    n_layer = model.config.num_hidden_layers
    cfg = HealConfig(skip=SKIP, rank=4, alpha=8, layers=tuple(range(2, n_layer)))
    heal, pm = _adapter(model, cfg, tmp_path)
    keep = [i not in SKIP for i in range(n_layer)]

    got, rep = _runtime(gguf, prompt, cont, mode="mask", mask=keep, heal=heal)
    assert rep.healed and rep.skipped == SKIP
    want = _reference(pm, prompt, cont, keep, adapters=True)
    _, nmse = compare("healed decode vs reference", got, want)
    assert nmse < NMSE_MAX
    plain, rep_plain = _runtime(gguf, prompt, cont, mode="mask", mask=keep)
    assert not rep_plain.healed
    _, nmse_plain = compare("plain skip vs reference", plain, _reference(pm, prompt, cont, keep, adapters=False))
    assert nmse_plain < NMSE_MAX
    assert np.array_equal(got[0], plain[0])  # the prefill's row: no adapter
    _, apart = compare("healed vs plain skip", got, plain)
    assert apart > 100 * NMSE_MAX  # the adapter really acts on decode

    full_h, rep_full = _runtime(gguf, prompt, cont, mode="full", heal=heal)
    full, _ = _runtime(gguf, prompt, cont, mode="full")
    assert not rep_full.healed and np.array_equal(full_h, full)
    other = [i != 2 for i in range(n_layer)]
    other_h, rep_other = _runtime(gguf, prompt, cont, mode="mask", mask=other, heal=heal)
    other_plain, _ = _runtime(gguf, prompt, cont, mode="mask", mask=other)
    assert not rep_other.healed and np.array_equal(other_h, other_plain)
    switched, rep_sw = _runtime(gguf, prompt, cont, mode="mask", mask=keep, heal=heal)
    assert rep_sw.healed and np.array_equal(switched, got)


def test_branches_heal_only_when_asked(tiny, tmp_path):
    from first_gguf.runtime import FirstModel

    model, _, gguf, prompt, cont = tiny
    n_layer = model.config.num_hidden_layers
    heal, _ = _adapter(model, HealConfig(skip=SKIP, rank=4, layers=(2,)), tmp_path)
    keep = [i not in SKIP for i in range(n_layer)]
    llm = FirstModel(gguf, logits_all=True, n_threads=1, n_ctx=128, heal=heal, mode="full")
    try:
        llm.fork(prompt)
        on, off = llm.branch_logits(cont, keep, heal=True), llm.branch_logits(cont, keep, heal=False)
        full = llm.branch_logits(cont, [True] * n_layer)
        assert not np.array_equal(on, off)
        assert np.array_equal(on, llm.branch_logits(cont, keep, heal=True))  # the fork is left as it was
        llm.configure(mode="full", heal=False)
        assert np.array_equal(off, llm.branch_logits(cont, keep))
        assert np.array_equal(full, llm.branch_logits(cont, [True] * n_layer, heal=True))
    finally:
        llm.close()


def test_heal_files_are_checked(tiny, tmp_path):
    from first_gguf.runtime import FirstModel

    model, _, gguf, _, _ = tiny
    heal, _ = _adapter(model, HealConfig(skip=SKIP, rank=2, layers=(2,)), tmp_path)
    info = read_heal(heal)
    assert info.skip == SKIP and info.n_layer == model.config.num_hidden_layers and info.arch == "qwen2"
    with pytest.raises(FormatError, match="raw.gguf.*without first.heal"):
        read_heal(tmp_path / "raw.gguf")
    with pytest.raises(FormatError, match="not a LoRA adapter"):
        read_heal(gguf)
    with pytest.raises(FirstError, match="exists"):
        stamp_heal(tmp_path / "raw.gguf", SKIP, 4, "x", heal)
    with pytest.raises(FormatError, match="not an ascending set"):
        stamp_heal(tmp_path / "raw.gguf", (1, 1), 4, "x", tmp_path / "dup.gguf")
    assert not (tmp_path / "dup.gguf").exists()
    with pytest.raises(FirstError, match="second healing adapter"):
        FirstModel(gguf, n_ctx=64, n_threads=1, heal=[heal, heal])


def test_config_rules():
    assert adapted_layers(HealConfig(skip=(3, 4, 9)), 24) == [5, 10]
    assert adapted_layers(HealConfig(skip=(3,), layers=(7, 2)), 24) == [2, 7]
    for bad in (HealConfig(skip=()), HealConfig(skip=(1, 1)), HealConfig(skip=(24,)),
                HealConfig(skip=(3,), layers=(3,)), HealConfig(skip=(3,), targets=("lm_head",))):
        with pytest.raises(FirstError):
            bad.check(24)


def test_training_lowers_heldout_kl_resumes_and_writes_the_file(tiny, tmp_path, capfd):
    model, hf_dir, gguf, prompt, cont = tiny
    cfg = HealConfig(skip=SKIP, rank=4, lr=1e-2, examples=8, batch=2, heldout=4, max_prompt=24, max_response=12,
                     families=("code",), checkpoint_every=2)
    out = heal_gguf(str(hf_dir), cfg, tmp_path / "h.gguf", threads=1, outtype="f32")
    summary = json.loads((tmp_path / "h.gguf.run" / "heal.json").read_text())
    before, after = summary["heldout_before"][0], summary["heldout_after"]
    assert after[0] == pytest.approx(before)  # the plain skip is the same model
    assert after[1] < before                 # the adapters learned something that carries
    assert read_heal(out).skip == SKIP
    _, rep = _runtime(gguf, prompt, cont, mode="mask", heal=out,
                      mask=[i not in SKIP for i in range(model.config.num_hidden_layers)])
    assert rep.healed
    with pytest.raises(FirstError, match="exists"):
        heal_gguf(str(hf_dir), cfg, out, threads=1)
    capfd.readouterr()
    heal_gguf(str(hf_dir), cfg, out, threads=1, outtype="f32", force=True)  # resumes at the last step
    assert "resuming at step 4" in capfd.readouterr().err
    other = HealConfig(**{**cfg.__dict__, "rank": 2})
    with pytest.raises(FirstError, match="another run"):
        heal_gguf(str(hf_dir), other, tmp_path / "h2.gguf", run_dir=tmp_path / "h.gguf.run", threads=1)


def test_cli_trains_on_the_families_given(tiny, tmp_path):
    """`first-gguf heal --families` reaches the run (its heal.json), and an unknown family is refused."""
    from click.testing import CliRunner

    from first_gguf.cli import cli

    _, hf_dir, _, _, _ = tiny
    out = tmp_path / "h.gguf"
    args = ["heal", str(hf_dir), "--skip", "1", "-o", str(out), "--examples", "4", "--rank", "2",
            "--max-response-tokens", "8", "--outtype", "f32", "--threads", "1"]
    bad = CliRunner().invoke(cli, [*args, "--families", "code,poetry"])
    assert bad.exit_code == 2 and "poetry: not a built-in family" in bad.output and not out.exists()
    own = CliRunner().invoke(cli, [*args, "--families", "code", "--own"])
    assert own.exit_code != 0 and "own continuations are written by the runtime and need a GGUF file" in own.output
    assert not out.exists()
    res = CliRunner().invoke(cli, [*args, "--families", "code"])
    assert res.exit_code == 0, res.output
    summary = json.loads((tmp_path / "h.gguf.run" / "heal.json").read_text())
    assert summary["config"]["families"] == ["code"] and read_heal(out).skip == SKIP


def test_own_continuations_are_the_models_greedy_text_and_resume(tiny, tmp_path):
    """`own` replaces each response with the full model's greedy continuation, written by the
    runtime: every token is the reference's argmax (or within a near tie of it); the cache
    resumes, a line cut by an interrupted run is written again, a damaged one is refused."""
    from first_gguf.prompts import Example
    from first_gguf.train.heal import own_continuations

    model, _, gguf, prompt, _ = tiny
    examples = [Example(tuple(prompt), (1, 2), "code", "a"), Example(tuple(prompt[:5]), (3, 4), "code", "b")]
    cache = tmp_path / "own.jsonl"
    got = own_continuations(gguf, examples, 10, cache, threads=1)
    assert [ex.source for ex in got] == ["a", "b"] and [ex.prompt for ex in got] == [ex.prompt for ex in examples]
    for ex in got:
        assert len(ex.response) == 10  # a random tiny model does not stop
        with torch.no_grad():
            logits = model(torch.tensor([list(ex.prompt) + list(ex.response)])).logits[0, len(ex.prompt) - 1:-1]
        top = logits.max(-1).values
        chosen = logits[torch.arange(len(ex.response)), torch.tensor(ex.response)]
        assert torch.all(top - chosen < 1e-3), (top - chosen).tolist()
    lines = cache.read_text().splitlines()
    assert len(lines) == 2
    cache.write_text(lines[0] + "\n" + lines[1][:7])  # an interrupted write
    assert own_continuations(gguf, examples, 10, cache, threads=1) == got
    assert len(cache.read_text().splitlines()) == 2 and cache.read_text().endswith("\n")
    cache.write_text(cache.read_text().rstrip("\n"))  # a whole last line without its newline: kept
    assert own_continuations(gguf, examples, 10, cache, threads=1) == got
    assert len(cache.read_text().splitlines()) == 2 and cache.read_text().endswith("\n")
    other = tmp_path / "other.gguf"  # another model file: its own lines, not this one's
    shutil.copyfile(gguf, other)
    assert own_continuations(other, examples, 10, cache, threads=1) == got
    assert len(cache.read_text().splitlines()) == 4
    cache.write_text("not json\n" + cache.read_text())
    with pytest.raises(FirstError, match=r"own.jsonl:1: not a line of own continuations"):
        own_continuations(gguf, examples, 10, cache, threads=1)
    with pytest.raises(FirstError, match="need a GGUF file"):
        own_continuations(tmp_path, examples, 10, tmp_path / "other.jsonl")


def test_training_along_own_continuations(tiny, tmp_path):
    """`first-gguf heal --own`: the run trains along the runtime's continuations (kept in the run
    directory, the fingerprint binds them) and lowers the held-out KL."""
    _, hf_dir, gguf, _, _ = tiny
    cfg = HealConfig(skip=SKIP, rank=4, lr=1e-2, examples=8, batch=2, heldout=4, max_prompt=24, max_response=12,
                     families=("code",), own=True)
    out = heal_gguf(str(hf_dir), cfg, tmp_path / "h.gguf", threads=1, outtype="f32", writer=gguf)
    run = tmp_path / "h.gguf.run"
    summary = json.loads((run / "heal.json").read_text())
    assert summary["config"]["own"] is True
    assert summary["heldout_after"][1] < summary["heldout_before"][0]
    assert len((run / "own.jsonl").read_text().splitlines()) == 12  # 8 training and 4 held-out prompts
    assert read_heal(out).skip == SKIP
    plain = HealConfig(**{**cfg.__dict__, "own": False})
    with pytest.raises(FirstError, match="another run"):  # the reference text is another run's data
        heal_gguf(str(hf_dir), plain, tmp_path / "h2.gguf", run_dir=run, threads=1)

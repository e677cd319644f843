"""Router training (first_gguf/train) on a tiny seeded qwen2 model with a byte-level tokenizer:
the loss falls and p moves, runs are seed-deterministic and resumable, the frozen pass and the
gates mirror inference, bad data fails clearly, and the evaluation and LoRA stages run."""

from __future__ import annotations

import json
import math
import sysconfig
from pathlib import Path

import numpy as np
import pytest
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import AutoModelForCausalLM, PreTrainedTokenizerFast

from first_gguf.constants import ROUTER_OUT_WEIGHT
from first_gguf.errors import FirstError
from first_gguf.router import FirstRouters, decode_hard, decode_soft, first_generate_logits, prefill
from first_gguf.format import load_router_file, make_identity_routers
from first_gguf.train import data as D
from first_gguf.train import losses, trainer
from first_gguf.train.quality import evaluate_routers
from first_gguf.train.trainer import read_history, train_routers
from tiny_hf import tiny_model

CHAT_TEMPLATE = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
                 "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
# Small runs: a step takes a few ms on the tiny model.
FAST = dict(max_prompt_tokens=32, max_response_tokens=8, examples=12)


def byte_tokenizer() -> PreTrainedTokenizerFast:
    """One token per byte (256) plus three specials: fits the tiny models' 512-token vocabulary."""
    vocab = {ch: i for i, ch in enumerate(sorted(pre_tokenizers.ByteLevel.alphabet()))}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>",
                                   additional_special_tokens=["<|im_start|>", "<|im_end|>"])
    fast.chat_template = CHAT_TEMPLATE
    return fast


pytestmark = pytest.mark.usefixtures("torch_one_thread")


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny qwen2 model with the byte tokenizer, saved as an HF directory."""
    path = tmp_path_factory.mktemp("tiny-train") / "qwen2"
    tiny_model("qwen2").save_pretrained(path)
    byte_tokenizer().save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def text_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("data") / "textwrap.py"
    path.write_text((Path(sysconfig.get_paths()["stdlib"]) / "textwrap.py").read_text()[:8000])
    return path


@pytest.fixture(scope="session")
def loaded(tiny_dir: Path):
    return trainer.load_base(str(tiny_dir))


def run(tiny_dir: Path, text_file: Path, out: Path, **kwargs) -> Path:
    args = dict(data=[str(text_file)], steps=12, lam=0.5, force=True, resume=False, **FAST)
    args.update(kwargs)
    return train_routers(str(tiny_dir), str(out), **args)


def test_short_run_lowers_loss_and_moves_p(tiny_dir, text_file, tmp_path):
    out = run(tiny_dir, text_file, tmp_path / "r.safetensors", steps=30, threshold=0.6)
    history = read_history(out)
    first, last = history[:5], history[-5:]
    mean = lambda rows, k: sum(r[k] for r in rows) / len(rows)  # noqa: E731
    assert mean(last, "loss") < 0.9 * mean(first, "loss")
    assert abs(mean(last, "p") - 0.9) > 0.05  # routers start at p = 0.9
    rs = load_router_file(out)
    assert rs.threshold == 0.6 and rs.protected_layers == [0, 3] and rs.hidden_size == 64
    assert "first-gguf train" in rs.train_source and "30 steps" in rs.train_source


def test_same_seed_same_routers_other_seed_differs(tiny_dir, text_file, tmp_path):
    a = load_router_file(run(tiny_dir, text_file, tmp_path / "a.safetensors", seed=1))
    b = load_router_file(run(tiny_dir, text_file, tmp_path / "b.safetensors", seed=1))
    c = load_router_file(run(tiny_dir, text_file, tmp_path / "c.safetensors", seed=2))
    assert a == b
    assert a != c


def test_resume_after_interrupt_equals_uninterrupted(tiny_dir, text_file, tmp_path, monkeypatch):
    kw = dict(batch_size=2, gate="concrete")  # concrete gates draw noise: it must resume too
    whole = load_router_file(run(tiny_dir, text_file, tmp_path / "whole.safetensors", **kw))
    out = tmp_path / "resumed.safetensors"
    step = trainer.RouterTrainer.train_step

    def interrupted(self):
        if self.step == 5:
            raise KeyboardInterrupt
        return step(self)

    monkeypatch.setattr(trainer.RouterTrainer, "train_step", interrupted)
    with pytest.raises(KeyboardInterrupt):
        run(tiny_dir, text_file, out, **kw)
    assert not out.exists() and trainer.checkpoint_path(out).is_file()
    monkeypatch.setattr(trainer.RouterTrainer, "train_step", step)
    resumed = load_router_file(run(tiny_dir, text_file, out, resume=True, **kw))
    assert resumed == whole
    # A finished run extends to more steps from its checkpoint.
    run(tiny_dir, text_file, out, resume=True, steps=14, **kw)
    assert len(read_history(out)) == 14


def test_checkpoint_of_another_run_is_refused(tiny_dir, text_file, tmp_path):
    out = tmp_path / "r.safetensors"
    run(tiny_dir, text_file, out, steps=2)
    with pytest.raises(FirstError, match=r"checkpoint of another run \(lr: 0.003 there, 0.01 now"):
        run(tiny_dir, text_file, out, steps=4, lr=0.01, resume=True)


def test_refuses_to_overwrite_without_force(tiny_dir, text_file, tmp_path):
    out = run(tiny_dir, text_file, tmp_path / "r.safetensors", steps=1)
    with pytest.raises(FirstError, match="exists; pass --force"):
        run(tiny_dir, text_file, out, steps=1, force=False)


@pytest.mark.parametrize("kwargs", [dict(distill=False), dict(gate="straight-through", target_skip=1.0),
                                    dict(gate="concrete", target_skip=1.0)])
def test_other_objectives_train(tiny_dir, text_file, tmp_path, kwargs):
    """Each objective's own term is in the loss: cross-entropy on the data (no distillation:
    a random tiny model is far from its targets), or relu(target - S)^2 beside the task and
    skip terms (straight-through at init: p = 0.9 runs both routable layers, so S = 0 and the
    term is exactly 1); and the routers move away from their init."""
    lam = 0.5
    out = run(tiny_dir, text_file, tmp_path / "r.safetensors", steps=4, lam=lam, **kwargs)
    history = read_history(out)
    assert len(history) == 4
    assert all(math.isfinite(v) for h in history for v in h.values()), history
    extra = [h["loss"] - h["task"] - lam * h["p"] for h in history]  # the target term, if any
    if kwargs.get("target_skip") is None:
        assert all(h["task"] > 1.0 for h in history), history
        assert extra == pytest.approx([0.0] * 4, abs=1e-5)
    else:
        assert all(e >= -1e-5 for e in extra) and sum(extra) > 0, extra
        if kwargs["gate"] == "straight-through":
            assert extra[0] == pytest.approx(1.0, abs=1e-5)
    trained = load_router_file(out)
    init = make_identity_routers(trained.n_layer, trained.n_embd, trained.hidden_size, seed=0)
    assert not np.array_equal(trained.tensors[1][ROUTER_OUT_WEIGHT], init.tensors[1][ROUTER_OUT_WEIGHT])


def test_frozen_pass_and_gates_mirror_inference(loaded):
    """The cached pass equals prefill + full decode; gates of exactly 1 give zero KL; hard
    straight-through gates give the logits of the hard rule."""
    model, tok = loaded
    ex = D.Example(tuple(range(3, 23)), tuple(range(40, 48)), "data", "test")
    prep = trainer.prepare(model, ex, distill=True)
    pre = prefill(model, None, torch.tensor([ex.prompt]), keep_hidden=True)
    full = decode_hard(model, pre, torch.tensor([ex.response[:-1]]), [True] * 4)[0]
    for (k, v), (k2, v2) in zip(prep.kv, pre.kv):
        torch.testing.assert_close(k, k2, atol=1e-5, rtol=0)
        torch.testing.assert_close(v, v2, atol=1e-5, rtol=0)
    for h, h2 in zip(prep.hidden, pre.hidden):
        torch.testing.assert_close(h, h2, atol=1e-5, rtol=0)
    teacher = losses.teacher_from_logits(full)
    torch.testing.assert_close(prep.teacher.logprobs, teacher.logprobs, atol=1e-4, rtol=0)
    assert losses.kl_to_teacher(full, prep.teacher).item() == pytest.approx(0.0, abs=1e-5)

    routers = FirstRouters(4, 64, hidden_size=8)
    p = torch.tensor([[0.9, 0.2, 0.7, 0.1]], requires_grad=True)
    g = losses.gates(routers, p, "straight-through")
    assert g.tolist() == [[1.0, 0.0, 1.0, 1.0]]  # layer 3 is protected
    hard_logits = decode_hard(model, pre, torch.tensor([ex.response[:-1]]), g[0].detach().bool())
    soft_logits = decode_soft(model, pre, torch.tensor([ex.response[:-1]]), g)
    torch.testing.assert_close(soft_logits, hard_logits, atol=2e-5, rtol=0)
    soft_logits.sum().backward()
    assert p.grad is not None and p.grad[0, 1] != 0 and p.grad[0, 3] == 0


def test_concrete_gates_keep_a_layer_with_probability_p():
    routers = FirstRouters(4, 64, hidden_size=8)
    p = torch.tensor([0.5, 0.8, 0.2, 0.5]).expand(4000, 4)
    g = losses.gates(routers, p, "concrete", torch.Generator().manual_seed(0))
    assert (g[:, [0, 3]] == 1).all()  # protected
    kept = (g > 0.5).float().mean(0)
    assert kept[1].item() == pytest.approx(0.8, abs=0.03) and kept[2].item() == pytest.approx(0.2, abs=0.03)
    assert ((g[:, 1:3] < 0.1) | (g[:, 1:3] > 0.9)).float().mean() > 0.6  # mostly near 0 or 1
    again = losses.gates(routers, p, "concrete", torch.Generator().manual_seed(0))
    assert torch.equal(g, again)


def test_kl_to_teacher_equals_full_kl_when_top_k_holds_the_mass():
    torch.manual_seed(0)
    full, other = torch.randn(5, 40) * 3, torch.randn(5, 40) * 3
    teacher = losses.teacher_from_logits(full, k=40)
    ref = torch.log_softmax(full, -1)
    want = (ref.exp() * (ref - torch.log_softmax(other, -1))).sum(-1).mean()
    assert losses.kl_to_teacher(other, teacher).item() == pytest.approx(want.item(), rel=1e-5)
    coarse = losses.kl_to_teacher(other, losses.teacher_from_logits(full, k=5)).item()
    assert 0 <= coarse <= want.item() + 1e-6  # coarsening can only lower a KL


# --- data ---------------------------------------------------------------------------------------

LIMITS = D.Limits(max_prompt=32, max_response=8, context=256)


def _bad(tmp_path: Path, name: str, content: bytes) -> Path:
    path = tmp_path / name
    path.write_bytes(content)
    return path


@pytest.mark.parametrize("name,content,match", [
    ("empty.txt", b"", r"empty.txt: empty file"),
    ("blank.jsonl", b"\n  \n", r"blank.jsonl: empty file"),
    ("latin1.txt", "caf\xe9 au lait".encode("latin-1"),
     r"latin1.txt: not UTF-8 text \(invalid byte 0xe9 at offset 3\)"),
    ("fields.jsonl", b'{"prompt": "a"}\n',
     r"fields.jsonl:1: expected string fields 'prompt' and 'response', or 'text'"),
    ("notjson.jsonl", b'{"text": "fine text here"}\n{oops\n', r"notjson.jsonl:2: not valid JSON"),
    ("long.jsonl", json.dumps({"prompt": "x" * 250, "response": "y" * 10}).encode(),
     r"long.jsonl:1: prompt and response are 260 tokens, longer than the model's context of 256"),
    ("prompt.jsonl", json.dumps({"prompt": "x" * 40, "response": "y" * 10}).encode(),
     r"prompt.jsonl:1: prompt has 40 tokens, more than max_prompt_tokens=32"),
    ("short.txt", b"ab", r"short.txt: too short"),
])
def test_bad_data_is_a_clear_error_naming_the_file(tmp_path, name, content, match):
    path = _bad(tmp_path, name, content)
    with pytest.raises(D.DataError, match=match):
        D.build_examples(byte_tokenizer(), LIMITS, [str(path)])


def test_bad_data_fails_before_training(tiny_dir, tmp_path):
    path = _bad(tmp_path, "latin1.txt", b"\xff\xfe")
    with pytest.raises(D.DataError, match="latin1.txt: not UTF-8"):
        train_routers(str(tiny_dir), str(tmp_path / "r.safetensors"), data=[str(path)], steps=1, **FAST)
    assert not (tmp_path / "r.safetensors").exists()


def test_missing_path_and_too_long_limits(tmp_path):
    with pytest.raises(D.DataError, match="nope.txt: no such file or directory"):
        D.build_examples(byte_tokenizer(), LIMITS, [str(tmp_path / "nope.txt")])
    with pytest.raises(FirstError, match="exceeds the model's context of 256"):
        D.build_examples(byte_tokenizer(), D.Limits(200, 100, 256), tasks=["code"])


def test_user_data_files_dirs_and_jsonl(tmp_path, text_file):
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "a.txt").write_text(text_file.read_text()[:300])
    (tmp_path / "d" / "b.jsonl").write_text(json.dumps({"prompt": "def f():", "response": "\n    return 1\n"}) + "\n"
                                            + json.dumps({"text": "hello world, this is text"}) + "\n")
    found = D.load_user_data([str(tmp_path / "d")], byte_tokenizer(), LIMITS)
    assert {ex.source.split("@")[0].rsplit(":", 1)[0] for ex in found} == {str(tmp_path / "d" / "a.txt"),
                                                                            str(tmp_path / "d" / "b.jsonl")}
    for ex in found:
        assert 1 <= len(ex.prompt) <= LIMITS.max_prompt and 2 <= len(ex.response) <= LIMITS.max_response
    pair = next(ex for ex in found if ex.source.endswith("b.jsonl:1"))
    assert byte_tokenizer().decode(list(pair.prompt)) == "def f():"
    assert byte_tokenizer().decode(list(pair.response)) == "\n    ret"  # cut to max_response tokens


def test_builtin_families_are_deterministic_and_split_by_file():
    tok, limits = byte_tokenizer(), D.Limits(max_prompt=160, max_response=8, context=256)
    tasks = ["code", "prose", "instruct"]
    train = D.build_examples(tok, limits, tasks=tasks, n_examples=9, seed=3)
    assert train == D.build_examples(tok, limits, tasks=tasks, n_examples=9, seed=3)
    assert [ex.family for ex in train] == ["code"] * 3 + ["prose"] * 3 + ["instruct"] * 3
    held = D.build_examples(tok, limits, tasks=tasks, n_examples=9, seed=3, split="heldout")
    def file_of(ex: D.Example) -> str:
        return ex.source.rsplit(":", 1)[0] if ex.source.startswith("pydoc:") else ex.source.split(":")[0]

    assert {file_of(ex) for ex in train}.isdisjoint({file_of(ex) for ex in held})
    assert all(not D.is_heldout(file_of(ex)) for ex in train) and all(D.is_heldout(file_of(ex)) for ex in held)
    inst = train[-1]
    assert tok.decode(list(inst.prompt)).startswith("<|im_start|>user\nWrite a Python function `")
    assert tok.decode(list(inst.prompt)).endswith("<|im_start|>assistant\n")
    assert tok.decode(list(inst.response)).startswith("```pytho")
    assert all("humaneval" not in ex.source.lower() for ex in train + held)


def test_stub_family_restates_a_bodiless_stub_and_is_drawn_only_by_name():
    import ast

    from first_gguf.prompts import FAMILIES, KNOWN_FAMILIES, STUB_REQUESTS

    assert "stub" in KNOWN_FAMILIES and "stub" not in FAMILIES  # the default families stay as they were
    tok, limits = byte_tokenizer(), D.Limits(max_prompt=700, max_response=900, context=2048)
    train = D.build_examples(tok, limits, tasks=["stub"], n_examples=6, seed=1)
    assert train == D.build_examples(tok, limits, tasks=["stub"], n_examples=6, seed=1)
    held = D.build_examples(tok, limits, tasks=["stub"], n_examples=3, seed=1, split="heldout")
    assert len(train) == 6 and len(held) == 3 and {ex.family for ex in train + held} == {"stub"}
    assert {ex.source.split(":")[0] for ex in train}.isdisjoint({ex.source.split(":")[0] for ex in held})
    heads = {r.split("{stub}")[0] for r in STUB_REQUESTS}
    for ex in train + held:
        prompt, response = tok.decode(list(ex.prompt)), tok.decode(list(ex.response))
        request = prompt.split("<|im_start|>user\n", 1)[1].split("<|im_end|>", 1)[0]
        head = next(h for h in heads if request.startswith(h))
        stub = request[len(head):].removesuffix("\n```")
        fn = ast.parse(stub).body[0]
        assert isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef)) and len(fn.body) == 1  # no body
        assert ast.get_docstring(fn)
        assert response.startswith(f"```python\n{stub}\n")  # restates the stub, then its own code
        assert "humaneval" not in ex.source.lower()


# --- evaluation and LoRA ---------------------------------------------------------------------------

def test_evaluation_runs_and_matches_first_generate_logits(tiny_dir, text_file, tmp_path, loaded, monkeypatch):
    monkeypatch.setenv("FIRST_GGUF_CACHE", str(tmp_path / "cache"))
    routers = run(tiny_dir, text_file, tmp_path / "r.safetensors", steps=6)
    result = evaluate_routers(str(tiny_dir), str(routers), tasks=["code", "prose"], n_per_family=3,
                              search_per_family=2, cont_tokens=6, static_sizes=2, out_dir=str(tmp_path / "docs"),
                              max_prompt_tokens=32, max_response_tokens=8, model_and_tokenizer=loaded)
    assert {"sweep", "static", "skip_table"} <= set(result)
    assert set(result["skip_table"]["layers"]) == {"code", "prose", "all"}
    assert result["skip_table"]["layers"]["all"][0] == 0.0  # protected
    for k, row in result["static"].items():
        assert len(row["skip"]) == int(k) and row["full"]["all"]["skipped"] == int(k)
    for name in ("first-eval.json", "first-quality.png", "first-skips.png"):
        assert (tmp_path / "docs" / name).stat().st_size > 0
    # The shared-prefill path of the sweep is first_generate_logits(mode="first").
    model, _ = loaded
    r = FirstRouters.from_router_set(load_router_file(routers))
    prompt, cont = torch.arange(5, 25), torch.arange(30, 36)
    want, keep, _ = first_generate_logits(model, r, prompt, cont, mode="first")
    pre = prefill(model, r, prompt[None])
    got = torch.cat([pre.last_logits, decode_hard(model, pre, cont[None, :-1], pre.mask[0])[0]])
    torch.testing.assert_close(got, want, atol=1e-5, rtol=0)


def test_lora_stage_writes_a_merged_model(tiny_dir, text_file, tmp_path, capfd):
    out = run(tiny_dir, text_file, tmp_path / "r.safetensors", steps=4, lora=True,
              lora_out=str(tmp_path / "merged"), lora_steps=4, lora_lr=1e-3)
    assert out.is_file()
    err = capfd.readouterr().err
    assert "LoRA on" in err and "in full mode" in err
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged")
    base = AutoModelForCausalLM.from_pretrained(tiny_dir)
    assert not any("lora" in name for name, _ in merged.named_parameters())
    diffs = [(a - b).abs().max().item() for a, b in zip(merged.parameters(), base.parameters())]
    assert max(diffs) > 0
    with pytest.raises(FirstError, match="pass --force"):
        run(tiny_dir, text_file, tmp_path / "r2.safetensors", steps=1, lora=True, lora_out=str(tmp_path / "merged"),
            force=False)


@pytest.mark.parametrize("model, n_layer, n_embd", [("qwen2.5-coder-0.5b-instruct", 24, 896),
                                                    ("qwen2.5-coder-1.5b-instruct", 28, 1536)])
def test_committed_routers_are_the_readme_recipe(model, n_layer, n_embd):
    import re
    from pathlib import Path

    from first_gguf.shipped import shipped_routers
    from first_gguf.train import recipe

    assert model in recipe.COMMITTED_MODELS
    rs = shipped_routers(model)
    assert rs is not None and (rs.n_layer, rs.n_embd, rs.threshold) == (n_layer, n_embd, 0.5)
    src = rs.train_source
    for part in (f"base {model};", f"{recipe.COMMITTED['examples']} examples",
                 f"{recipe.COMMITTED['gate']} gates", f"lam {recipe.COMMITTED['lam']}",
                 f"{recipe.COMMITTED['steps']} steps"):
        assert part in src, (part, src)
    readme = re.sub(r"\\\n\s*", "", (Path(__file__).parents[1] / "docs" / "TRAINING.md").read_text())
    assert recipe.committed_command(model=model) in readme

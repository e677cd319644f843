"""Decode-only healing: LoRA adapters for one fixed skip set, trained end to end (docs/FORMAT.md section 6).

Each step runs an example as the runtime will: the prompt at full depth with the adapters
*off* (its KV and the first response token stay exactly the full model's), then the response
through the kept layers with the adapters *on*, attending to the prompt's KV. The loss is the
KL to the full model's distributions at every response position after the first (top-k
teacher, as the router stage). Gradients reach only the adapters of the layers that run in
decode. ``full`` never sees the adapters: the runtime applies them only while this skip set
decodes, so full stays bit-identical to the base model.

The adapters are saved in PEFT's format (``adapter/``) and converted to a LoRA GGUF by
llama.cpp's own ``convert_lora_to_gguf.py`` (``heal_gguf.py``). A run directory holds the
adapter, a resumable checkpoint and ``heal.json`` (configuration, held-out KL before and
after); the same command resumes an interrupted run.

With ``own`` the responses are not the families' reference text but the full model's own greedy
continuation of each prompt (up to ``max_response`` tokens, its end-of-generation token kept),
written by the runtime on the GGUF (the weights that run) and kept in the run directory
(``own.jsonl``, resumed): the adapters then learn along the text the reduced decode will
actually follow, e.g. a chat answer with its prose and fenced code.
"""

from __future__ import annotations

import hashlib
import json
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from ..errors import FirstError
from ..log import logger
from ..prompts import FAMILIES, Example, Limits
from ..router import decode_hard, prefill
from . import losses

log = logger("heal")

# Every linear map of a decoder block in the HF architectures we convert (attention and MLP).
TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
CHECKPOINT = "checkpoint.pt"
OWN = "own.jsonl"
ADAPTER = "adapter"
SUMMARY = "heal.json"


@dataclass(frozen=True)
class HealConfig:
    """One healing run.

    skip: the layers the reduced decode leaves out (the adapters heal this set only).
    targets: module names that get adapters.
    layers: the layers that get them (kept ones only); empty: the first kept layer after each
        run of skipped layers, where the residual stream first differs (each adapted matmul
        costs decode time in llama.cpp: four graph nodes).
    rank, alpha: LoRA rank and scale (alpha / rank multiplies B A).
    examples: training examples (built-in families, train split), visited ``epochs`` times.
    batch: examples per optimizer step (gradient accumulation).
    heldout: held-out examples on which KL to full is measured before and after.
    own: the responses are the full model's own greedy continuations (made by the runtime).
    """

    skip: tuple[int, ...]
    targets: tuple[str, ...] = TARGETS
    layers: tuple[int, ...] = ()
    rank: int = 16
    alpha: float = 16.0
    lr: float = 3e-4
    examples: int = 240
    epochs: int = 1
    batch: int = 4
    max_prompt: int = 96
    max_response: int = 64
    heldout: int = 24
    seed: int = 0
    families: tuple[str, ...] = FAMILIES
    checkpoint_every: int = 10
    own: bool = False

    def check(self, n_layer: int) -> None:
        if not self.skip:
            raise FirstError("healing needs a skip set: at least one layer to leave out")
        bad = [i for i in self.skip if not 0 <= i < n_layer]
        if bad or len(set(self.skip)) != len(self.skip) or len(self.skip) >= n_layer:
            raise FirstError(f"skip set {list(self.skip)} is not a set of distinct layers in 0..{n_layer - 1} "
                             f"leaving at least one")
        if self.rank < 1 or self.examples < 1 or self.epochs < 1 or self.batch < 1 or self.lr <= 0:
            raise FirstError("rank, examples, epochs and batch must be >= 1 and lr > 0")
        if any(i in self.skip or not 0 <= i < n_layer for i in self.layers):
            raise FirstError(f"adapter layers {list(self.layers)} must be layers that run in decode")
        if not self.targets or any(t not in TARGETS for t in self.targets):
            raise FirstError(f"targets must be a non-empty subset of {', '.join(TARGETS)}, got {self.targets}")


@dataclass
class HealState:
    """What a checkpoint holds besides the tensors."""

    step: int = 0
    seconds: float = 0.0
    history: list[dict] = field(default_factory=list)


def keep_mask(n_layer: int, skip: Sequence[int]) -> list[bool]:
    return [i not in set(skip) for i in range(n_layer)]


def adapted_layers(cfg: HealConfig, n_layer: int) -> list[int]:
    """The layers that get adapters: ``cfg.layers``, or the first kept layer after each skipped run."""
    if cfg.layers:
        return sorted(cfg.layers)
    return [i for i in range(1, n_layer) if i - 1 in cfg.skip and i not in cfg.skip]


def attach_adapters(model, cfg: HealConfig, n_layer: int):
    """The PEFT model with fresh adapters on the kept layers (B = 0: starts as the base model)."""
    from peft import LoraConfig, get_peft_model

    layers = adapted_layers(cfg, n_layer)
    if not layers:
        raise FirstError(f"skip set {list(cfg.skip)}: no kept layer after it to adapt; give the layers")
    lcfg = LoraConfig(r=cfg.rank, lora_alpha=cfg.alpha, lora_dropout=0.0, target_modules=list(cfg.targets),
                      layers_to_transform=layers, bias="none")
    torch.manual_seed(cfg.seed)
    return get_peft_model(model, lcfg)


def example_tensors(peft_model, ex: Example, keep: list[bool]) -> tuple:
    """(prompt prefill, response ids, teacher) for one example, adapters off (no grad)."""
    prompt, response = torch.tensor([ex.prompt]), torch.tensor([ex.response])
    with torch.no_grad(), peft_model.disable_adapter():
        base = peft_model.get_base_model()
        pre = prefill(base, None, prompt)
        full = decode_hard(base, pre, response[:, :-1], [True] * len(keep))[0]
    return pre, response, losses.teacher_from_logits(full)


def healed_loss(peft_model, pre, response: torch.Tensor, teacher, keep: list[bool]) -> torch.Tensor:
    """KL(full || reduced decode with adapters) at every decoded response token (their next-token rows)."""
    logits = decode_hard(peft_model.get_base_model(), pre, response[:, :-1], keep)[0]
    return losses.kl_to_teacher(logits, teacher)


def heldout_kl(peft_model, examples: list[Example], keep: list[bool]) -> tuple[float, float]:
    """Mean KL to full over ``examples``: (plain skip, adapters on)."""
    plain, healed = [], []
    for ex in examples:
        pre, response, teacher = example_tensors(peft_model, ex, keep)
        with torch.no_grad():
            healed.append(healed_loss(peft_model, pre, response, teacher, keep).item())
            with peft_model.disable_adapter():
                plain.append(healed_loss(peft_model, pre, response, teacher, keep).item())
    return float(np.mean(plain)), float(np.mean(healed))


def _order(cfg: HealConfig, n: int) -> list[int]:
    rng = np.random.default_rng(cfg.seed)
    return [int(i) for _ in range(cfg.epochs) for i in rng.permutation(n)]


def _fingerprint(cfg: HealConfig, base: str, examples: list[Example]) -> dict:
    h = hashlib.sha256(json.dumps([[e.prompt, e.response] for e in examples]).encode()).hexdigest()[:16]
    return {"config": asdict(cfg), "base": Path(base).name, "data": h}


def train(base: str, cfg: HealConfig, run_dir: str | Path, threads: int | None = None,
          writer: str | Path | None = None) -> dict:
    """Train (or resume) decode-only adapters for ``cfg.skip``; returns the run summary.

    Args:
        base: A GGUF file or zoo name (the weights the runtime runs, dequantized).
        cfg: The run.
        run_dir: Directory for the checkpoint, the PEFT adapter, the base config and heal.json.
        threads: torch threads (and the runtime's, for ``cfg.own``).
        writer: The GGUF whose runtime writes the own continuations (default: ``base``).
    """
    from .base import context_length, load_base, set_threads
    from .data import build_examples

    set_threads(threads)
    run = Path(run_dir)
    writer = Path(writer if writer is not None else base)
    if cfg.own:
        _check_writer(writer)  # before the model loads
    model, tokenizer = load_base(base)
    n_layer = model.config.get_text_config().num_hidden_layers
    cfg.check(n_layer)
    limits = Limits(cfg.max_prompt, cfg.max_response, context_length(model))
    train_ex = build_examples(tokenizer, limits, tasks=cfg.families, n_examples=cfg.examples, seed=cfg.seed)
    held = build_examples(tokenizer, limits, tasks=cfg.families, n_examples=cfg.heldout, seed=cfg.seed,
                          split="heldout")
    if cfg.own:
        _check_run_dir(run)  # before the continuations are written into it
        n = len(train_ex)
        own = own_continuations(writer, train_ex + held, cfg.max_response, run / OWN, threads)
        # an answer of one token leaves nothing to decode (the first comes from the full-depth prompt)
        train_ex, held = ([ex for ex in part if len(ex.response) >= 2] for part in (own[:n], own[n:]))
    keep = keep_mask(n_layer, cfg.skip)
    peft_model = attach_adapters(model, cfg, n_layer)
    params = [p for p in peft_model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=0.0)
    fp = _fingerprint(cfg, base, train_ex)
    state = _resume(run, fp, peft_model, optimizer)
    summary_path = run / SUMMARY
    before = json.loads(summary_path.read_text())["heldout_before"] if state.step and summary_path.is_file() else None
    if before is None:
        before = heldout_kl(peft_model, held, keep)
        _write_summary(run, fp, state, before, None)
        log(f"held-out KL to full, {len(held)} examples, skip {list(cfg.skip)}: {before[0]:.4f} before healing")
    order = _order(cfg, len(train_ex))
    steps = -(-len(order) // cfg.batch)  # the families may give fewer examples than asked
    t0 = time.monotonic() - state.seconds
    while state.step < steps:
        optimizer.zero_grad(set_to_none=True)
        batch = order[state.step * cfg.batch:(state.step + 1) * cfg.batch]
        total = 0.0
        for i in batch:
            pre, response, teacher = example_tensors(peft_model, train_ex[i], keep)
            loss = healed_loss(peft_model, pre, response, teacher, keep) / len(batch)
            loss.backward()
            total += loss.item()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        state.step += 1
        state.seconds = time.monotonic() - t0
        state.history.append({"step": state.step, "kl": total})
        recent = np.mean([h["kl"] for h in state.history[-10:]])
        log(f"step {state.step}/{steps}  KL {total:.4f} (last 10: {recent:.4f})  "
            f"{state.seconds / state.step:.1f} s/step, {state.seconds / 60:.1f} min")
        if state.step % cfg.checkpoint_every == 0 or state.step == steps:
            _save(run, fp, state, peft_model, optimizer)
    after = heldout_kl(peft_model, held, keep)
    log(f"held-out KL to full: plain skip {after[0]:.4f}, healed {after[1]:.4f}")
    for lcfg in peft_model.peft_config.values():  # the base by file name: no machine path in the files
        lcfg.base_model_name_or_path = Path(base).name
    peft_model.save_pretrained(run / ADAPTER)
    (run / ADAPTER / "README.md").unlink(missing_ok=True)  # PEFT's model card names the base by its path
    cfg_dir = run / "base-config"
    model.config.architectures = [type(model).__name__]
    model.config.save_pretrained(cfg_dir)
    return _write_summary(run, fp, state, before, after)


def _check_writer(path: Path) -> Path:
    if path.suffix != ".gguf" or not path.is_file():
        raise FirstError(f"{path}: own continuations are written by the runtime and need a GGUF file")
    return path


def own_continuations(gguf: str | Path, examples: list[Example], max_new: int, cache: Path,
                      threads: int | None = None) -> list[Example]:
    """Each example with its response replaced by the full model's greedy continuation of its prompt.

    The runtime writes them on ``gguf`` (``full``, greedy, at most ``max_new`` tokens, the
    end-of-generation token kept when it comes); ``cache`` (JSONL, one line per prompt) keeps
    them, so an interrupted run goes on where it stopped and a resumed run trains on the same text.
    """
    from tqdm import tqdm

    path = _check_writer(Path(gguf))
    model_id = [path.name, path.stat().st_size]

    def key(ex: Example) -> str:  # binds each line to the model file, the prompt and the length
        return hashlib.sha256(json.dumps([model_id, list(ex.prompt), max_new]).encode()).hexdigest()[:24]

    done: dict[str, list[int]] = {}
    lines = cache.read_text().splitlines() if cache.is_file() else []
    cut = False
    for lineno, line in enumerate(lines, start=1):
        try:
            row = json.loads(line)
            done[row["key"]] = [int(t) for t in row["response"]]
        except (json.JSONDecodeError, KeyError, TypeError, ValueError):
            if lineno < len(lines):
                raise FirstError(f"{cache}:{lineno}: not a line of own continuations; delete the file") from None
            cut = True  # the last line, cut by an interrupted run: written again below
    if cut:
        cache.write_text("".join(line + "\n" for line in lines[:-1]))
    elif lines and not cache.read_bytes().endswith(b"\n"):
        with cache.open("a") as f:
            f.write("\n")
    todo = [ex for ex in examples if key(ex) not in done]
    if todo:
        from ..runtime import FirstModel
        from ..runtime.greedy import greedy

        longest = max(len(ex.prompt) for ex in todo)
        llm = FirstModel(path, mode="full", n_ctx=longest + max_new + 8, n_threads=threads)
        cache.parent.mkdir(parents=True, exist_ok=True)
        with cache.open("a") as f:
            for ex in tqdm(todo, desc="own continuations", file=sys.stderr):
                tokens = greedy(llm, ex.prompt, max_new).tokens
                if len(tokens) < max_new:  # it stopped at an end-of-generation token: the last logits chose it
                    tokens.append(int(np.argmax(llm.last_logits(copy=False))))
                done[key(ex)] = tokens
                f.write(json.dumps({"key": key(ex), "source": ex.source, "response": tokens}) + "\n")
                f.flush()
        llm.close()
    return [Example(ex.prompt, tuple(done[key(ex)]), ex.family, ex.source) for ex in examples]


def _write_summary(run: Path, fp: dict, state: HealState, before, after) -> dict:
    run.mkdir(parents=True, exist_ok=True)
    summary = {**fp, "steps_done": state.step, "seconds": round(state.seconds, 1),
               "heldout_before": before, "heldout_after": after}
    (run / SUMMARY).write_text(json.dumps(summary, indent=1) + "\n")
    return summary


def _save(run: Path, fp: dict, state: HealState, peft_model, optimizer) -> None:
    from peft import get_peft_model_state_dict

    run.mkdir(parents=True, exist_ok=True)
    tmp = run / (CHECKPOINT + ".tmp")
    torch.save({"fingerprint": fp, "state": asdict(state), "adapter": get_peft_model_state_dict(peft_model),
                "optimizer": optimizer.state_dict()}, tmp)
    tmp.replace(run / CHECKPOINT)


def _check_run_dir(run: Path) -> None:
    if run.is_dir() and any(run.iterdir()) and not any((run / f).is_file() for f in (SUMMARY, OWN)):
        raise FirstError(f"{run}: exists and is not a healing run directory; choose another")


def _resume(run: Path, fp: dict, peft_model, optimizer) -> HealState:
    from peft import set_peft_model_state_dict

    path = run / CHECKPOINT
    if not path.is_file():
        _check_run_dir(run)
        return HealState()
    ck = torch.load(path, weights_only=False)
    if ck["fingerprint"] != fp:
        raise FirstError(f"{path}: a checkpoint of another run (configuration, base or data differ); "
                         f"use another run directory or delete it")
    set_peft_model_state_dict(peft_model, ck["adapter"])
    optimizer.load_state_dict(ck["optimizer"])
    state = HealState(**ck["state"])
    print(f"[first-gguf heal] resuming at step {state.step}", file=sys.stderr, flush=True)
    return state


def heal_gguf(base: str, cfg: HealConfig, out: str | Path, run_dir: str | Path | None = None,
              threads: int | None = None, outtype: str = "f16", force: bool = False, source: str = "",
              writer: str | Path | None = None) -> Path:
    """Train (or resume) the adapters for ``cfg.skip`` and write the healing adapter GGUF ``out``.

    The run directory (default ``OUT.run``) keeps the checkpoint and the PEFT adapter; the
    GGUF is llama.cpp's conversion of that adapter with the ``first.heal.*`` keys added.
    """
    from ..format import stamp_heal
    from ..llama_tools import convert_lora
    from ..paths import ScratchFiles, check_output_path

    out = Path(out)
    check_output_path(out, force, (Path(base),))
    run = Path(run_dir) if run_dir is not None else out.with_name(out.name + ".run")
    summary = train(base, cfg, run, threads=threads, writer=writer)
    n_layer = _n_layer(run)
    with ScratchFiles(out) as scratch:
        raw = convert_lora(run / ADAPTER, run / "base-config", scratch.path("lora"), outtype)
        info = stamp_heal(raw, cfg.skip, n_layer, source or json.dumps(summary["config"], sort_keys=True), out,
                          force=force)
    log(f"{out}: heals skip set {list(info.skip)}; held-out KL {summary['heldout_before'][0]:.4f} -> "
        f"{summary['heldout_after'][1]:.4f}")
    return out


def _n_layer(run: Path) -> int:
    cfg = json.loads((run / "base-config" / "config.json").read_text())
    text = cfg.get("text_config", cfg)
    return int(text["num_hidden_layers"])

"""Router training on a frozen model (``docs/FORMAT.md`` section 1), resumable and seed-deterministic.

Per example: the prompt runs once at full depth without gradient (its KV and the hidden
states entering every layer are kept, with the full model's distributions over the response
for distillation: one no-grad pass over prompt + response, cached in memory for later
epochs); the routers read those hidden states and give p_i; the response runs with gates
g_i from p_i (``decode_soft``), attending to the exact prompt KV; the loss on the response
tokens is the task term plus the skip terms (``losses``). Only the routers train.

Determinism: routers start from ``make_identity_routers(seed)``; epoch e visits the examples
in ``default_rng([seed, e]).permutation`` order; the learning rate depends on the step only.
A checkpoint (``<out>.ckpt``: routers, Adam state, step, torch RNG state, loss history and
the run's settings) is written every ``CHECKPOINT_EVERY`` steps, on Ctrl-C and at the end;
``resume`` continues from it (also to extend a finished run to more steps), and the result
equals an uninterrupted run. Several processes (``accelerate launch``) split each batch and
average the router gradients.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import platform
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from tqdm import tqdm

from ..arch import DecoderStack
from ..errors import FirstError
from ..format import make_identity_routers, save_router_file
from ..log import logger
from ..paths import atomic_output, check_output_path
from ..router import FirstRouters, PrefillResult, _run, decode_soft
from . import losses, recipe
from .base import context_length, dist_state, load_base, peak_memory_gb, set_threads
from .data import Example, Limits, build_examples

PREP_CACHE_BYTES = 6 << 30  # examples beyond this much cached state are recomputed at every visit


@dataclass(frozen=True)
class RunConfig:
    """Everything that decides the result of a run except its length (``steps``)."""

    base: str
    data: tuple[str, ...]
    tasks: tuple[str, ...]
    examples: int
    lr: float
    lam: float
    target_skip: float | None
    target_weight: float
    distill: bool
    gate: str
    hidden_size: int
    threshold: float
    batch_size: int
    seed: int
    max_prompt_tokens: int
    max_response_tokens: int

    def check(self) -> None:
        if self.gate not in losses.GATE_MODES:
            raise FirstError(f"unknown gate mode {self.gate!r}; expected one of {', '.join(losses.GATE_MODES)}")
        if not 0.0 <= self.threshold <= 1.0:
            raise FirstError(f"threshold must lie in [0, 1], got {self.threshold}")
        for name in ("examples", "batch_size", "hidden_size"):
            if getattr(self, name) < 1:
                raise FirstError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.lr <= 0 or self.lam < 0 or self.target_weight < 0:
            raise FirstError("lr must be > 0, lam and target_weight >= 0")
        if self.target_skip is not None and self.target_skip < 0:
            raise FirstError(f"target_skip must be >= 0, got {self.target_skip}")


@dataclass
class Prep:
    """What the frozen full-depth pass leaves for one example (computed once, no gradient)."""

    kv: list[tuple[torch.Tensor, torch.Tensor]]
    hidden: list[torch.Tensor]               # per layer, the prompt's residual stream entering it
    teacher: losses.Teacher | None           # the full model's distributions over response[1:]

    def nbytes(self) -> int:
        tensors = [t for pair in self.kv for t in pair] + self.hidden + (list(self.teacher) if self.teacher else [])
        return sum(t.numel() * t.element_size() for t in tensors)


def train_routers(base: str, out: str, data: Sequence[str] | None = None, tasks: Sequence[str] | None = None,
                  steps: int = recipe.STEPS, lr: float = recipe.LR, lam: float = recipe.LAM,
                  target_skip: float | None = None, target_weight: float = recipe.TARGET_WEIGHT,
                  distill: bool = True, gate: str = recipe.GATE, hidden_size: int = recipe.HIDDEN_SIZE,
                  threshold: float = recipe.THRESHOLD, batch_size: int = recipe.BATCH_SIZE,
                  examples: int = recipe.EXAMPLES, seed: int = 0, resume: bool = True,
                  max_prompt_tokens: int = recipe.MAX_PROMPT_TOKENS,
                  max_response_tokens: int = recipe.MAX_RESPONSE_TOKENS, lora: bool = False,
                  lora_out: str | None = None, lora_steps: int | None = None, lora_rank: int = recipe.LORA_RANK,
                  lora_lr: float = recipe.LORA_LR, threads: int | None = None, force: bool = False) -> Path:
    """Train FiRST routers for a frozen causal LM and write them as a router file.

    Args:
        base: An HF model directory, a GGUF file (dequantized to float32 by transformers), or
            a zoo model name.
        out: Router file to write (.safetensors); its checkpoint is ``<out>.ckpt``.
        data: User text / JSONL files or directories (``train.data``).
        tasks: Built-in families (``code``, ``instruct``, ``prose``); default all of them
            without ``data``, none with it.
        steps: Optimizer steps in total (a resumed run continues up to this count).
        lr: Adam learning rate.
        lam: Weight of the skip penalty mean_i(p_i) over the layers that may skip.
        target_skip: If given, also penalize target_weight * relu(target_skip - S)^2, S the
            expected number of skipped layers.
        target_weight: See ``target_skip``.
        distill: Task term KL(full model || gated) on the response tokens; else next-token
            cross-entropy on the data.
        gate: ``soft`` (g = p), ``concrete`` (relaxed Bernoulli(p) samples) or
            ``straight-through`` (hard rule forward, gradient through p); see ``losses.gates``.
        hidden_size: Router width.
        threshold: The routers' decision threshold, stored in the file. Only straight-through
            gates train with it, so with the others resuming a finished run with another
            threshold rewrites the file without training.
        batch_size: Examples per optimizer step.
        examples: Training examples drawn in total.
        seed: Seed of the router init, the data draw and the example order.
        resume: Continue from ``<out>.ckpt`` if it exists (same settings, else an error).
        max_prompt_tokens, max_response_tokens: Token budgets of one example.
        lora: Then train LoRA adapters with the routers frozen and save the merged model.
        lora_out: Directory for the merged HF model (required with ``lora``).
        lora_steps, lora_rank, lora_lr: The LoRA stage (default ``steps`` steps).
        threads: torch CPU threads (default torch's). On a machine shared with other jobs, 1
            is several times faster than 2 (OpenMP threads wait on each other); results are
            bit-reproducible for a given thread count.
        force: Overwrite ``out`` (and ``lora_out``).

    Returns:
        The path of the router file.
    """
    out_path = Path(out)
    check_output_path(out_path, force)
    if lora and not lora_out:
        raise FirstError("lora=True needs lora_out, the directory for the merged model")
    if lora:
        from .lora import check_lora_out

        check_lora_out(lora_out, force)
    if tasks is None:
        tasks = () if data else recipe.TASKS
    cfg = RunConfig(base=str(base), data=tuple(str(d) for d in data or ()), tasks=tuple(tasks),
                    examples=examples, lr=lr, lam=lam, target_skip=target_skip, target_weight=target_weight,
                    distill=distill, gate=gate, hidden_size=hidden_size, threshold=threshold,
                    batch_size=batch_size, seed=seed, max_prompt_tokens=max_prompt_tokens,
                    max_response_tokens=max_response_tokens)
    cfg.check()
    set_threads(threads)
    if steps < 0:
        raise FirstError(f"steps must be >= 0, got {steps}")
    state = dist_state()
    t0 = time.monotonic()
    model, tokenizer = load_base(cfg.base, state.device)
    limits = Limits(max_prompt_tokens, max_response_tokens, context_length(model))
    train = build_examples(tokenizer, limits, cfg.data, cfg.tasks, cfg.examples, cfg.seed, "train")
    _log(f"{len(train)} training examples ({_family_counts(train)}); base loaded in {time.monotonic() - t0:.0f} s")
    routers = init_routers(model, cfg).to(state.device)
    trainer = RouterTrainer(model, routers, train, cfg, state)
    ckpt = checkpoint_path(out_path)
    if resume and ckpt.is_file():
        trainer.load(ckpt)
    trainer.run(steps, ckpt)
    routers.train_source = train_source(cfg, train, trainer.step)
    if state.is_main_process:
        save_router_file(routers.to_router_set(), out_path, force=force)
        _log(f"wrote {out_path} after {trainer.step} steps in {time.monotonic() - t0:.0f} s; "
             f"peak memory {peak_memory_gb():.1f} GB")
    if lora:
        from .lora import train_lora

        train_lora(model, tokenizer, routers, trainer, lora_out, steps=steps if lora_steps is None else lora_steps,
                   rank=lora_rank, lr=lora_lr, force=force)
    return out_path


_log = logger("train")


def init_routers(model, cfg: RunConfig) -> FirstRouters:
    """Routers that keep every layer (p = 0.9), from the seeded untrained recipe."""
    stack = DecoderStack(model)
    rs = make_identity_routers(stack.n_layer, stack.n_embd, cfg.hidden_size, seed=cfg.seed,
                               keep_prob=recipe.INIT_KEEP_PROB)
    routers = FirstRouters.from_router_set(rs)
    routers.threshold = cfg.threshold
    return routers


def checkpoint_path(out: Path) -> Path:
    return out.with_name(out.name + ".ckpt")


def train_source(cfg: RunConfig, examples: list[Example], steps: int) -> str:
    """Provenance stored in the file (first.train.source)."""
    target = f", target_skip {cfg.target_skip} (weight {cfg.target_weight})" if cfg.target_skip is not None else ""
    return (f"first-gguf train: base {Path(cfg.base).name}; {len(examples)} examples ({_family_counts(examples)}; "
            f"Python {platform.python_version()} stdlib{', data ' + ','.join(cfg.data) if cfg.data else ''}); "
            f"prompt<={cfg.max_prompt_tokens}, response<={cfg.max_response_tokens} tokens; "
            f"{'distill KL' if cfg.distill else 'next-token CE'}, {cfg.gate} gates, lam {cfg.lam}{target}; "
            f"{steps} steps x {cfg.batch_size}, lr {cfg.lr}, hidden {cfg.hidden_size}, seed {cfg.seed}")


def _family_counts(examples: list[Example]) -> str:
    counts: dict[str, int] = {}
    for ex in examples:
        counts[ex.family] = counts.get(ex.family, 0) + 1
    return ", ".join(f"{k} {v}" for k, v in counts.items())


def data_fingerprint(examples: list[Example]) -> str:
    digest = hashlib.sha256()
    for ex in examples:
        digest.update(json.dumps([ex.prompt, ex.response]).encode())
    return digest.hexdigest()


@torch.no_grad()
def prepare(model, ex: Example, distill: bool, device: torch.device | str = "cpu") -> Prep:
    """One full-depth pass over prompt + response[:-1]: prompt KV and hidden states, teacher.

    The prompt positions of a longer causal pass are exactly the prompt's own pass; row j of
    the teacher is the full model's distribution over response[j + 1].
    """
    n = len(ex.prompt)
    ids = torch.tensor([list(ex.prompt) + list(ex.response[:-1])], device=device)
    stack, hidden = DecoderStack(model), []

    def step(i, h, run_layer):
        hidden.append(h[:, :n].clone())
        return run_layer(h)

    h, cache = _run(stack, ids, None, step)
    kv = [(layer.keys[:, :, :n].clone(), layer.values[:, :, :n].clone()) for layer in cache.layers]
    teacher = losses.teacher_from_logits(stack.logits(h[0, n:])) if distill else None
    return Prep(kv, hidden, teacher)


def router_probs(routers: FirstRouters, hidden: list[torch.Tensor]) -> torch.Tensor:
    """(B, n_layer) p_i of the prompt whose per-layer hidden states are ``hidden``."""
    return torch.stack([routers.layer_prob(i, h) for i, h in enumerate(hidden)], dim=-1)


class RouterTrainer:
    """The training loop: state (step, optimizer, history), one step, checkpoints."""

    def __init__(self, model, routers: FirstRouters, examples: list[Example], cfg: RunConfig, state):
        self.model, self.routers, self.examples, self.cfg, self.state = model, routers, examples, cfg, state
        self.device = state.device
        self.optimizer = torch.optim.Adam(routers.parameters(), lr=cfg.lr)
        self.routable = losses.routable(routers, self.device)
        self.step = 0
        self.history: list[dict[str, float]] = []
        self.cache: dict[int, Prep] = {}
        self.cache_bytes = 0

    def prep(self, index: int) -> Prep:
        """The cached full-depth pass of example ``index`` (computed on first use)."""
        if index in self.cache:
            return self.cache[index]
        prep = prepare(self.model, self.examples[index], self.cfg.distill, self.device)
        if self.cache_bytes + prep.nbytes() <= PREP_CACHE_BYTES:
            self.cache[index] = prep
            self.cache_bytes += prep.nbytes()
        return prep

    def example_order(self, k: int) -> int:
        """Index of the k-th example visited: epoch k // N in a seeded permutation."""
        n = len(self.examples)
        epoch, pos = divmod(k, n)
        return int(np.random.default_rng([self.cfg.seed, epoch]).permutation(n)[pos])

    def example_loss(self, index: int, visit: int) -> tuple[torch.Tensor, dict[str, float]]:
        """Task + skip terms of one example (the ``visit``-th of the run), with its statistics."""
        ex, prep, cfg = self.examples[index], self.prep(index), self.cfg
        p = router_probs(self.routers, prep.hidden)
        noise = torch.Generator().manual_seed(cfg.seed * 1_000_003 + visit)  # resumable: no state to save
        g = losses.gates(self.routers, p, cfg.gate, noise)
        pre = PrefillResult(kv=prep.kv, n_prompt=len(ex.prompt), last_logits=None)
        response = torch.tensor([ex.response], device=self.device)
        logits = decode_soft(self.model, pre, response[:, :-1], g)[0]
        task = (losses.kl_to_teacher(logits, prep.teacher) if cfg.distill
                else losses.next_token_loss(logits, response[0, 1:]))
        loss = task + losses.skip_penalty(p, self.routable, cfg.lam)
        if cfg.target_skip is not None:
            loss = loss + losses.target_penalty(g, self.routable, cfg.target_skip, cfg.target_weight)
        hard_skips = (~self.routers.decide(p))[..., self.routable].sum().item()
        return loss, {"loss": loss.item(), "task": task.item(), "p": p[..., self.routable].mean().item(),
                      "skipped": float(hard_skips)}

    def train_step(self) -> dict[str, float]:
        """One optimizer step over ``batch_size`` examples (split over processes)."""
        cfg, world, rank = self.cfg, self.state.num_processes, self.state.process_index
        for group in self.optimizer.param_groups:
            group["lr"] = cfg.lr * min(1.0, (self.step + 1) / recipe.WARMUP_STEPS)
        self.optimizer.zero_grad(set_to_none=True)
        stats: list[dict[str, float]] = []
        for j in range(cfg.batch_size):
            visit = (self.step * cfg.batch_size + j) * world + rank
            loss, st = self.example_loss(self.example_order(visit), visit)
            (loss / cfg.batch_size).backward()
            stats.append(st)
        if world > 1:
            _average_gradients(self.routers, world)
        torch.nn.utils.clip_grad_norm_(self.routers.parameters(), recipe.GRAD_CLIP)
        self.optimizer.step()
        self.step += 1
        mean = {k: float(np.mean([s[k] for s in stats])) for k in stats[0]}
        self.history.append({"step": self.step, **mean})
        return mean

    def run(self, steps: int, ckpt: Path) -> None:
        """Train up to ``steps`` steps, checkpointing; Ctrl-C checkpoints the last finished step."""
        bar = tqdm(total=steps, initial=min(self.step, steps), desc="train routers", file=sys.stderr,
                   mininterval=2, dynamic_ncols=True)
        try:
            while self.step < steps:
                st = self.train_step()
                bar.update(1)
                bar.set_postfix(loss=f"{st['loss']:.4f}", p=f"{st['p']:.3f}", skip=f"{st['skipped']:.1f}")
                if self.step % recipe.CHECKPOINT_EVERY == 0:
                    self.save(ckpt)
                    _log(self.progress_line())
        except KeyboardInterrupt:
            self.save(ckpt)
            _log(f"interrupted: checkpoint of step {self.step} in {ckpt}; run again to resume")
            raise
        finally:
            bar.close()
        self.save(ckpt)

    def progress_line(self) -> str:
        recent = self.history[-recipe.CHECKPOINT_EVERY:]
        mean = {k: np.mean([h[k] for h in recent]) for k in ("loss", "task", "p", "skipped")}
        return (f"step {self.step}: loss {mean['loss']:.4f} task {mean['task']:.4f} mean p {mean['p']:.3f} "
                f"skipped {mean['skipped']:.2f} (last {len(recent)} steps); peak memory {peak_memory_gb():.1f} GB")

    def fingerprint(self) -> dict:
        config = dataclasses.asdict(self.cfg)
        if self.cfg.gate != "straight-through":  # only that gate reads the threshold: re-threshold by resuming
            del config["threshold"]
        return {"config": config, "data": data_fingerprint(self.examples)}

    def save(self, path: Path) -> None:
        if not self.state.is_main_process:
            return
        blob = {"step": self.step, "routers": self.routers.state_dict(), "optimizer": self.optimizer.state_dict(),
                "torch_rng": torch.get_rng_state(), "history": self.history, **self.fingerprint()}
        with atomic_output(path) as tmp:
            torch.save(blob, tmp)

    def load(self, path: Path) -> None:
        """Continue from a checkpoint of the same run (settings and data), else a clear error."""
        try:
            blob = torch.load(path, map_location=self.device, weights_only=True)
        except Exception as exc:  # a truncated or foreign file
            raise FirstError(f"{path}: not a readable training checkpoint ({exc}); "
                             f"delete it or pass resume=False") from None
        mine = self.fingerprint()
        for key in ("config", "data"):
            if blob.get(key) != mine[key]:
                diff = _diff(blob.get(key), mine[key]) if key == "config" else "the training examples differ"
                raise FirstError(f"{path} is a checkpoint of another run ({diff}); delete it or pass resume=False")
        self.routers.load_state_dict(blob["routers"])
        self.optimizer.load_state_dict(blob["optimizer"])
        torch.set_rng_state(blob["torch_rng"])
        self.step, self.history = int(blob["step"]), list(blob["history"])
        _log(f"resuming from {path} at step {self.step}")


def _diff(old: dict | None, new: dict) -> str:
    old = old or {}
    keys = [k for k in new if old.get(k) != new[k]]
    return ", ".join(f"{k}: {old.get(k)!r} there, {new[k]!r} now" for k in keys) or "different settings"


def _average_gradients(routers: FirstRouters, world: int) -> None:
    for param in routers.parameters():
        if param.grad is not None:
            torch.distributed.all_reduce(param.grad)
            param.grad /= world


def read_history(out: str | os.PathLike) -> list[dict[str, float]]:
    """The per-step loss history stored in the checkpoint of router file ``out``."""
    blob = torch.load(checkpoint_path(Path(out)), map_location="cpu", weights_only=True)
    return list(blob["history"])

"""The optional second stage: LoRA adapters healing the skips, routers frozen (``docs/FORMAT.md`` section 1).

Each step runs an example exactly as inference will, through the adapted model: the prompt at
full depth (the routers, frozen, read its hidden states and choose the mask by the hard rule),
then the response through the kept layers only, attending to the prompt's KV; the loss is the
KL to the *original* full model's distributions (cached by the router stage), so the adapters
learn to make up for the skipped layers. Gradients reach the adapters through the response
pass and through the prompt's KV. ``all-linear`` adapters (every linear layer of the decoder
except the output head), merged into the weights at the end and saved as an HF directory for
conversion. The merge changes the model in ``full`` mode too: the stage logs the KL of the
merged model to the original in ``full`` mode and under the hard rule, before and after.
Not resumable (it is short); rerun it from the router file.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from ..errors import FirstError
from ..router import FirstRouters, decode_hard, prefill
from . import losses, recipe


def check_lora_out(path: str | Path, force: bool) -> Path:
    out = Path(path)
    if out.is_file() or (out.is_dir() and any(out.iterdir()) and not force):
        raise FirstError(f"{out} exists{' and is a file' if out.is_file() else ''}; "
                         f"{'choose a directory' if out.is_file() else 'pass --force'}")
    return out


def hard_rule_loss(model, routers: FirstRouters, prompt: torch.Tensor, response: torch.Tensor,
                   teacher: losses.Teacher, full: bool = False) -> torch.Tensor:
    """KL to the original full model on response[1:], running the prompt at full depth and the
    response under the routers' mask (or every layer with ``full``); grad as the caller chooses."""
    pre = prefill(model, routers, prompt)
    mask = torch.ones_like(pre.mask[0]) if full else pre.mask[0]
    logits = decode_hard(model, pre, response[:, :-1], mask)[0]
    return losses.kl_to_teacher(logits, teacher)


def _mean_losses(model, routers, trainer, indices: list[int]) -> tuple[float, float]:
    """(hard-rule KL, full-mode KL) to the original model over some training examples."""
    hard, full = [], []
    with torch.no_grad():
        for i in indices:
            prompt, response, teacher = _tensors(trainer, i)
            hard.append(hard_rule_loss(model, routers, prompt, response, teacher).item())
            full.append(hard_rule_loss(model, routers, prompt, response, teacher, full=True).item())
    return float(np.mean(hard)), float(np.mean(full))


def _tensors(trainer, index: int):
    ex, device = trainer.examples[index], trainer.device
    teacher = trainer.prep(index).teacher
    if teacher is None:
        raise FirstError("the LoRA stage distills to the full model: train the routers with distill=True")
    return torch.tensor([ex.prompt], device=device), torch.tensor([ex.response], device=device), teacher


def train_lora(model, tokenizer, routers: FirstRouters, trainer, out_dir: str | Path, steps: int,
               rank: int = recipe.LORA_RANK, lr: float = recipe.LORA_LR, force: bool = False,
               n_monitor: int = 8) -> Path:
    """Train LoRA adapters under the hard rule with ``routers`` frozen; save the merged model.

    Args:
        model: The frozen base model the routers were trained on (merged in place).
        tokenizer: Its tokenizer (saved with the model).
        routers: Trained routers (not changed).
        trainer: The router stage's ``RouterTrainer`` (examples, order and cached teachers).
        out_dir: Directory for the merged HF model.
        steps: Optimizer steps (``batch_size`` examples each, as the router stage).
        rank, lr: LoRA rank (alpha = 2 * rank) and AdamW learning rate.
        force: Write into a non-empty ``out_dir``.
        n_monitor: Training examples on which the KLs before and after are logged.

    Returns:
        The directory written.
    """
    from peft import LoraConfig, get_peft_model

    out = check_lora_out(out_dir, force)
    routers.requires_grad_(False)
    monitor = list(range(min(n_monitor, len(trainer.examples))))
    before = _mean_losses(model, routers, trainer, monitor)
    peft_model = get_peft_model(model, LoraConfig(r=rank, lora_alpha=2 * rank, lora_dropout=0.0,
                                                  target_modules="all-linear"))
    params = [p for p in peft_model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    batch = trainer.cfg.batch_size
    for step in tqdm(range(steps), desc="train LoRA", file=sys.stderr, mininterval=2):
        optimizer.zero_grad(set_to_none=True)
        for j in range(batch):
            prompt, response, teacher = _tensors(trainer, trainer.example_order(step * batch + j))
            (hard_rule_loss(model, routers, prompt, response, teacher) / batch).backward()
        torch.nn.utils.clip_grad_norm_(params, recipe.GRAD_CLIP)
        optimizer.step()
    merged = peft_model.merge_and_unload()
    merged.requires_grad_(False)
    after = _mean_losses(merged, routers, trainer, monitor)
    print(f"[first-gguf train] LoRA on {len(monitor)} training examples: KL to the original model "
          f"under the hard rule {before[0]:.4f} -> {after[0]:.4f}; in full mode {before[1]:.4f} -> {after[1]:.4f}",
          file=sys.stderr, flush=True)
    out.mkdir(parents=True, exist_ok=True)
    merged.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out

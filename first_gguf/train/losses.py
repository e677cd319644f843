"""Loss terms of router training (``docs/FORMAT.md`` section 1) and the gates they act through.

The task term compares the gated model's distributions over the response tokens with either
the data (next-token cross-entropy) or the full model's own distributions on the same tokens
(distillation: KL(full || gated)). The full model's distributions are cached as their top-k
log-probabilities plus one "rest" bucket, so the KL is exact on that k+1-way coarsening (a
lower bound of the full KL that equals it when the rest mass is ~0; on the default model's
training data the top 256 of 151k tokens hold 97-99.8% of the mass per example on average,
83% at worst). The skip terms are ``lam * mean_i(p_i)`` over the
layers that may skip, and optionally ``target_weight * relu(target - S)^2`` where S is the
expected number of skipped layers, sum_i (1 - g_i).
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F

from ..errors import FirstError
from ..router import FirstRouters

GATE_MODES = ("soft", "concrete", "straight-through")
CONCRETE_TEMPERATURE = 0.5
TEACHER_TOP_K = 256


class Teacher(NamedTuple):
    """The full model's distributions over the response, as top-k log-probs (T, k) and their ids."""

    logprobs: torch.Tensor
    ids: torch.Tensor


def teacher_from_logits(logits: torch.Tensor, k: int = TEACHER_TOP_K) -> Teacher:
    """(T, vocab) full-model logits -> their top-k log-probabilities (float32, detached)."""
    logp = torch.log_softmax(logits.detach().float(), dim=-1)
    values, ids = logp.topk(min(k, logp.shape[-1]), dim=-1)
    return Teacher(values, ids)


def kl_to_teacher(student_logits: torch.Tensor, teacher: Teacher) -> torch.Tensor:
    """Mean over positions of KL(teacher || student) on the teacher's top-k ids plus a rest bucket.

    Args:
        student_logits: (T, vocab) logits of the gated model.
        teacher: The full model's top-k log-probs at the same T positions.
    """
    logq = torch.log_softmax(student_logits.float(), dim=-1)
    logq_k = logq.gather(-1, teacher.ids)
    p_k = teacher.logprobs.exp()
    kl = (p_k * (teacher.logprobs - logq_k)).sum(-1)
    p_rest = (1.0 - p_k.sum(-1)).clamp_min(0.0)
    q_rest = (1.0 - logq_k.exp().sum(-1)).clamp_min(1e-12)
    rest = torch.where(p_rest > 0, p_rest * (p_rest.clamp_min(1e-12).log() - q_rest.log()), torch.zeros_like(p_rest))
    return (kl + rest).mean()


def next_token_loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy of (T, vocab) logits against (T,) target ids."""
    return F.cross_entropy(logits.float(), targets)


def routable(routers: FirstRouters, device: torch.device | None = None) -> torch.Tensor:
    """(n_layer,) bool: the layers that may skip (not protected)."""
    return ~routers.protected(device)


def gates(routers: FirstRouters, p: torch.Tensor, mode: str, generator: torch.Generator | None = None) -> torch.Tensor:
    """Gates of the response pass from the router probabilities ``p`` (..., n_layer).

    ``soft``: g = p (protected layers 1), as docs/FORMAT.md section 1 trains. ``concrete``: a relaxed
    Bernoulli(p) sample, g = sigmoid((logit p + logistic noise) / CONCRETE_TEMPERATURE), near 0
    or 1, so training sees whole layers removed, as the hard rule removes them, yet gradients
    stay smooth; its median is above 1/2 exactly when p >= 1/2. ``straight-through``: the
    forward uses the hard rule of inference (g = m_i, 0 or 1) and the gradient flows as if g = p.
    """
    soft = routers.gates(p)
    if mode == "soft":
        return soft
    if mode == "concrete":
        u = torch.rand(p.shape, generator=generator).to(p.device).clamp(1e-6, 1 - 1e-6)
        logit = torch.logit(p.clamp(1e-6, 1 - 1e-6)) + torch.log(u) - torch.log1p(-u)
        sample = torch.sigmoid(logit / CONCRETE_TEMPERATURE)
        return torch.where(routers.protected(p.device), torch.ones_like(p), sample)
    if mode == "straight-through":
        hard = routers.decide(p).to(soft.dtype)
        return hard + soft - soft.detach()
    raise FirstError(f"unknown gate mode {mode!r}; expected one of {', '.join(GATE_MODES)}")


def skip_penalty(p: torch.Tensor, mask: torch.Tensor, lam: float) -> torch.Tensor:
    """lam * mean over the routable layers (and the batch) of p_i."""
    return lam * p[..., mask].mean()


def target_penalty(g: torch.Tensor, mask: torch.Tensor, target: float, weight: float) -> torch.Tensor:
    """weight * relu(target - S)^2, S = sum over routable layers of (1 - g_i), mean over the batch."""
    skipped = (1.0 - g[..., mask]).sum(-1)
    return weight * torch.relu(target - skipped).pow(2).mean()

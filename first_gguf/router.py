"""The FiRST router and the PyTorch reference forward, whole (``docs/FORMAT.md`` sections 1, 3).

A ``Router`` gives one probability per token from the residual stream entering its layer;
``FirstRouters`` holds one per layer plus the decision settings and converts to and from the
NumPy ``RouterSet`` that files carry. The reference forward drives a frozen Hugging Face
causal LM one decoder layer at a time (through ``arch.DecoderStack``):

- ``prefill``: the prompt at full depth; returns its KV, p_i, the mask and the last logits.
- ``decode_hard``: continuation tokens run only layers with m_i = 1 (a skipped layer is the
  identity and writes no KV), attending to the exact prompt KV in every layer that runs.
- ``decode_soft``: the same with soft gates, h_{i+1} = h_i + g_i * (layer_i(h_i) - h_i).
- ``forward_masked``: the mask in the prompt too (what a GGUF with those blocks removed runs).
- ``first_generate_logits``: the runtime modes ``first``, ``full`` and ``mask M`` (with
  ``prefill=full|masked``), which the patched llama.cpp is tested against.

Token ids are (B, T) or (T,) LongTensors; the sequences of a batch have equal length (no
padding). The caller chooses grad / no_grad; with a frozen model only the routers (and soft
gates) get gradients.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import nn
from transformers.cache_utils import DynamicCache

from .arch import DecoderStack
from .constants import (
    AGGREGATION_MEAN,
    DEFAULT_HIDDEN_SIZE,
    DEFAULT_NORM_EPS,
    DEFAULT_THRESHOLD,
    PREFILL_FULL,
    ROUTER_IN_BIAS,
    ROUTER_IN_WEIGHT,
    ROUTER_NORM,
    ROUTER_OUT_BIAS,
    ROUTER_OUT_WEIGHT,
    default_protected_layers,
)
from .errors import FirstError
from .format import RouterSet

# RouterSet role -> parameter of a Router (same shape: constants.router_shape).
ROLE_PARAMS = {
    ROUTER_NORM: "g",
    ROUTER_IN_WEIGHT: "w1.weight",
    ROUTER_IN_BIAS: "w1.bias",
    ROUTER_OUT_WEIGHT: "w2.weight",
    ROUTER_OUT_BIAS: "w2.bias",
}

MODES = ("first", "full", "mask")
PREFILL_MODES = ("full", "masked")


class Router(nn.Module):
    """r(h) = sigmoid(w2 . silu(W1 @ rmsnorm(h; g, eps) + b1) + b2), one probability per token."""

    def __init__(self, n_embd: int, hidden_size: int = DEFAULT_HIDDEN_SIZE, norm_eps: float = DEFAULT_NORM_EPS):
        super().__init__()
        self.eps = norm_eps
        self.g = nn.Parameter(torch.ones(n_embd))   # the router's own norm gain
        self.w1 = nn.Linear(n_embd, hidden_size)    # W1 (hidden, n_embd), b1 (hidden,)
        self.w2 = nn.Linear(hidden_size, 1)         # w2 (1, hidden), b2 (1,)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        """(..., n_embd) residual stream -> (...) probabilities, computed in the router's dtype."""
        x = h.to(self.g.dtype)
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps) * self.g
        return torch.sigmoid(self.w2(F.silu(self.w1(x)))).squeeze(-1)


class FirstRouters(nn.Module):
    """One Router per decoder layer, with the threshold and the protected layers.

    Args:
        n_layer: Decoder layers of the model.
        n_embd: Width of its residual stream.
        hidden_size: Router width.
        norm_eps: eps of every router's RMSNorm.
        threshold: A layer runs when p_i >= threshold (or it is protected).
        protected_layers: Layers that always run; default the first and the last.
        train_source: Provenance text stored in files (``first.train.source``).
    """

    def __init__(self, n_layer: int, n_embd: int, hidden_size: int = DEFAULT_HIDDEN_SIZE,
                 norm_eps: float = DEFAULT_NORM_EPS, threshold: float = DEFAULT_THRESHOLD,
                 protected_layers: Sequence[int] | None = None, train_source: str = ""):
        super().__init__()
        self.routers = nn.ModuleList(Router(n_embd, hidden_size, norm_eps) for _ in range(n_layer))
        self.n_layer, self.n_embd, self.hidden_size, self.norm_eps = n_layer, n_embd, hidden_size, norm_eps
        self.threshold = threshold
        self.protected_layers = list(default_protected_layers(n_layer) if protected_layers is None
                                     else protected_layers)
        self.train_source = train_source

    def layer_prob(self, i: int, h: torch.Tensor) -> torch.Tensor:
        """p_i: router i on the prompt's hidden states (B, T, n_embd), mean over tokens -> (B,)."""
        return self.routers[i](h).mean(dim=-1)

    def protected(self, device: torch.device | None = None) -> torch.Tensor:
        """(n_layer,) bool, True for the protected layers."""
        flags = torch.zeros(self.n_layer, dtype=torch.bool, device=device)
        flags[self.protected_layers] = True
        return flags

    def decide(self, p: torch.Tensor) -> torch.Tensor:
        """The hard rule: m_i = protected_i or p_i >= threshold (bool, the shape of ``p``)."""
        return self.protected(p.device) | (p.detach() >= self.threshold)

    def gates(self, p: torch.Tensor) -> torch.Tensor:
        """Soft gates for training: p_i, and 1 for the protected layers (differentiable in p)."""
        return torch.where(self.protected(p.device), torch.ones_like(p), p)

    def to_router_set(self) -> RouterSet:
        """These routers as float32 NumPy arrays (exact), checked against the format's rules."""
        tensors = {i: {role: router.get_parameter(name).detach().to("cpu", torch.float32).numpy().copy()
                       for role, name in ROLE_PARAMS.items()}
                   for i, router in enumerate(self.routers)}
        rs = RouterSet(n_layer=self.n_layer, n_embd=self.n_embd, hidden_size=self.hidden_size,
                       norm_eps=float(self.norm_eps), threshold=float(self.threshold),
                       protected_layers=list(self.protected_layers), aggregation=AGGREGATION_MEAN,
                       prefill=PREFILL_FULL, train_source=self.train_source, tensors=tensors)
        rs.check()
        return rs

    @classmethod
    def from_router_set(cls, rs: RouterSet) -> "FirstRouters":
        """Routers from a (checked) RouterSet; float32 parameters equal to its arrays."""
        rs.check()
        routers = cls(rs.n_layer, rs.n_embd, rs.hidden_size, rs.norm_eps, rs.threshold,
                      rs.protected_layers, rs.train_source)
        with torch.no_grad():
            for i, router in enumerate(routers.routers):
                for role, name in ROLE_PARAMS.items():
                    router.get_parameter(name).copy_(torch.from_numpy(rs.tensors[i][role]))
        return routers


@dataclass
class PrefillResult:
    """What a full-depth prompt pass leaves for decoding.

    kv: per layer, the prompt's (keys, values), each (B, n_kv_head, n_prompt, head_dim).
    last_logits: (B, vocab), the output at the last prompt token.
    p, mask: (B, n_layer) router probabilities and the hard decisions; None without routers.
    hidden: per layer, the residual stream entering it (B, n_prompt, n_embd), if kept.
    """

    kv: list[tuple[torch.Tensor, torch.Tensor]]
    n_prompt: int
    last_logits: torch.Tensor
    p: torch.Tensor | None = None
    mask: torch.Tensor | None = None
    hidden: list[torch.Tensor] | None = None


# step(i, h, run_layer) -> the residual stream after layer i; run_layer(h) runs layer i on h.
Step = Callable[[int, torch.Tensor, Callable[[torch.Tensor], torch.Tensor]], torch.Tensor]


def _run(stack: DecoderStack, ids: torch.Tensor, kv: list | None, step: Step) -> tuple[torch.Tensor, DynamicCache]:
    """Embed ``ids`` (placed after the positions in ``kv``) and pass them through every layer's step.

    The cache keeps full K/V in every layer, sliding-window ones too; the sliding-window mask
    hides what lies outside the window, so the numbers equal HF's windowed cache. A copy of
    ``kv`` is extended, never ``kv`` itself, so one prefill serves any number of decodes.
    """
    cache = DynamicCache()
    for i, (k, v) in enumerate(kv or []):
        cache.update(k, v, i)
    start = kv[0][0].shape[-2] if kv else 0
    h = stack.embed(ids)
    ctx = stack.context(h, start, cache)  # before any layer runs: every cache layer holds `start`
    for i in range(stack.n_layer):
        h = step(i, h, lambda x, i=i: stack.layer(i, x, ctx, cache))
    return h, cache


def prefill(model: nn.Module, routers: FirstRouters | None, input_ids: torch.Tensor,
            keep_hidden: bool = False, past: PrefillResult | None = None) -> PrefillResult:
    """The prompt at full depth; the routers read the hidden state entering each layer.

    Args:
        model: A frozen HF causal LM of a type in ``arch.ARCHS``.
        routers: The routers, or None (then ``p`` and ``mask`` are None).
        input_ids: The prompt, (B, T) or (T,).
        keep_hidden: Also return the residual stream entering every layer.
        past: A full-depth pass these tokens follow (a later chat turn: the runtime's new
            prefill, recomputed positions included); p_i averages over ``input_ids`` only.

    Returns:
        The PrefillResult (KV of every layer, p_i, m_i, last logits).
    """
    stack, ids = DecoderStack(model), _batch(input_ids)
    if routers is not None:
        _check_routers(stack, routers)
    if past is not None:
        _check_batch(past, ids)
    probs, hidden = [], []

    def step(i, h, run_layer):
        if routers is not None:
            probs.append(routers.layer_prob(i, h))
        if keep_hidden:
            hidden.append(h)
        return run_layer(h)

    h, cache = _run(stack, ids, past.kv if past is not None else None, step)
    p = torch.stack(probs, dim=-1) if routers is not None else None
    n_prompt = ids.shape[1] + (past.n_prompt if past is not None else 0)
    return PrefillResult(kv=[(layer.keys, layer.values) for layer in cache.layers], n_prompt=n_prompt,
                         last_logits=stack.logits(h[:, -1]), p=p,
                         mask=routers.decide(p) if routers is not None else None,
                         hidden=hidden if keep_hidden else None)


_prefill = prefill  # first_generate_logits has a `prefill` argument


def decode_hard(model: nn.Module, prefill_result: PrefillResult, tokens: torch.Tensor,
                mask: Sequence[bool] | torch.Tensor) -> torch.Tensor:
    """Continuation tokens through the layers with m_i = 1 only, after the prompt's KV.

    Args:
        model: The model ``prefill_result`` came from.
        prefill_result: Its prompt pass (left unchanged).
        tokens: Continuation ids, (B, T) or (T,); all T at once equals one at a time.
        mask: (n_layer,) bools, 1 = run (or (B, n_layer) with equal rows).

    Returns:
        (B, T, vocab) logits, row t the output at tokens[:, t].
    """
    stack, ids = DecoderStack(model), _batch(tokens)
    keep = _mask_list(mask, stack.n_layer)
    _check_batch(prefill_result, ids)
    h, _ = _run(stack, ids, prefill_result.kv, lambda i, h, run_layer: run_layer(h) if keep[i] else h)
    return stack.logits(h)


def decode_soft(model: nn.Module, prefill_result: PrefillResult, tokens: torch.Tensor,
                gates: torch.Tensor) -> torch.Tensor:
    """``decode_hard`` with soft gates, h_{i+1} = h_i + g_i * (layer_i(h_i) - h_i) (training).

    Every layer runs and writes KV; with gates exactly 0/1 the logits equal ``decode_hard``.

    Args:
        gates: (n_layer,) or (B, n_layer); gradients flow to them.

    Returns:
        (B, T, vocab) logits.
    """
    stack, ids = DecoderStack(model), _batch(tokens)
    _check_batch(prefill_result, ids)
    if gates.shape[-1] != stack.n_layer or gates.dim() not in (1, 2):
        raise FirstError(f"gates have shape {tuple(gates.shape)}, expected ({stack.n_layer},) or "
                         f"(batch, {stack.n_layer})")
    g = gates.expand(ids.shape[0], stack.n_layer)

    def step(i, h, run_layer):
        gi = g[:, i, None, None].to(h.dtype)
        return h + gi * (run_layer(h) - h)

    h, _ = _run(stack, ids, prefill_result.kv, step)
    return stack.logits(h)


def forward_masked(model: nn.Module, input_ids: torch.Tensor, mask: Sequence[bool] | torch.Tensor) -> torch.Tensor:
    """Every token (prompt too) through the layers with m_i = 1 only (``prefill=masked``).

    What a GGUF with the blocks outside the mask physically removed computes, for
    architectures whose layers do not depend on their index.

    Returns:
        (B, T, vocab) logits at every position.
    """
    stack, ids = DecoderStack(model), _batch(input_ids)
    keep = _mask_list(mask, stack.n_layer)
    h, _ = _run(stack, ids, None, lambda i, h, run_layer: run_layer(h) if keep[i] else h)
    return stack.logits(h)


@torch.no_grad()
def first_generate_logits(model: nn.Module, routers: FirstRouters | None, prompt_ids: torch.Tensor,
                          cont_ids: torch.Tensor, mode: str = "first", mask: Sequence[bool] | None = None,
                          prefill: str = "full", warmup: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Logits of one sequence under a runtime mode of docs/FORMAT.md section 3 (teacher-forced).

    Args:
        model: A frozen HF causal LM.
        routers: The routers; required for ``first``, optional otherwise (then p is None).
        prompt_ids, cont_ids: One prompt and its continuation, 1-D (or (1, T)), both non-empty.
        mode: ``first`` (mask chosen by the routers on the prompt), ``full`` (never skip) or
            ``mask`` (``mask`` given by the caller).
        mask: (n_layer,) 1 = run, for ``mode="mask"``.
        prefill: ``full`` (the prompt at full depth) or ``masked`` (``mode="mask"`` only: the
            mask in the prompt too).
        warmup: decode steps after the prompt that run every layer (their KV complete) before
            the mask applies (``prefill="full"`` only); the routers still read the prompt alone.

    Returns:
        logits (T_cont, vocab): row j is the distribution cont_ids[j] is drawn from (row 0
            from the prompt's last position, row j >= 1 from the decode step of cont_ids[j-1]);
        mask (n_layer,) bool, the one decode ran with;
        p (n_layer,) router probabilities of the full-depth prompt (None without routers or
            with ``prefill="masked"``).
    """
    if mode not in MODES:
        raise FirstError(f"unknown mode {mode!r}; expected one of {', '.join(MODES)}")
    if prefill not in PREFILL_MODES:
        raise FirstError(f"unknown prefill {prefill!r}; expected one of {', '.join(PREFILL_MODES)}")
    if (mask is not None) != (mode == "mask"):
        raise FirstError(f"mode {mode!r} {'needs' if mode == 'mask' else 'takes no'} mask")
    if prefill == "masked" and mode != "mask":
        raise FirstError(f"prefill='masked' applies to mode 'mask' only, not {mode!r}")
    if mode == "first" and routers is None:
        raise FirstError("mode 'first' needs routers")
    if warmup < 0 or (warmup and prefill == "masked"):
        raise FirstError(f"warmup {warmup} must be >= 0, and 0 with prefill='masked'")
    prompt, cont = _batch(prompt_ids), _batch(cont_ids)
    if prompt.shape[0] != 1 or cont.shape[0] != 1:
        raise FirstError(f"expected one prompt and one continuation, got shapes "
                         f"{tuple(prompt.shape)} and {tuple(cont.shape)}")
    n_layer = DecoderStack(model).n_layer
    if prefill == "masked":
        keep = torch.tensor(_mask_list(mask, n_layer))
        logits = forward_masked(model, torch.cat([prompt, cont[:, :-1]], dim=1), keep)[0, prompt.shape[1] - 1:]
        return logits, keep, None
    pre = _prefill(model, routers, prompt)
    p = pre.p[0] if pre.p is not None else None
    if mode == "first":
        keep = pre.mask[0]
    else:
        keep = torch.tensor(_mask_list(mask, n_layer) if mode == "mask" else [True] * n_layer)
    rows = [pre.last_logits[0, None]]
    steps = cont[:, :-1]  # the decode steps: each evaluates one continuation token
    warm = min(warmup, steps.shape[1])
    if warm:
        every = [True] * n_layer
        rows.append(decode_hard(model, pre, steps[:, :warm], every)[0])
        pre = _prefill(model, None, steps[:, :warm], past=pre)  # the same positions' KV, every layer
    if steps.shape[1] > warm:
        rows.append(decode_hard(model, pre, steps[:, warm:], keep)[0])
    return torch.cat(rows), keep, p


def _batch(ids: torch.Tensor) -> torch.Tensor:
    """(T,) -> (1, T); (B, T) as is; at least one token."""
    ids = torch.as_tensor(ids)
    ids = ids[None] if ids.dim() == 1 else ids
    if ids.dim() != 2 or 0 in ids.shape:
        raise FirstError(f"token ids have shape {tuple(ids.shape)}, expected non-empty (T,) or (batch, T)")
    return ids


def _mask_list(mask: Sequence[bool] | torch.Tensor, n_layer: int) -> list[bool]:
    """A mask as n_layer Python bools; a (B, n_layer) mask must have equal rows."""
    m = torch.as_tensor(mask).bool().cpu()
    if m.dim() == 2:
        if not (m == m[0]).all():
            raise FirstError("decode runs one mask per batch, but the rows of this mask differ")
        m = m[0]
    if m.shape != (n_layer,):
        raise FirstError(f"mask has shape {tuple(m.shape)}, expected ({n_layer},) for a {n_layer}-layer model")
    return m.tolist()


def _check_routers(stack: DecoderStack, routers: FirstRouters) -> None:
    if (routers.n_layer, routers.n_embd) != (stack.n_layer, stack.n_embd):
        raise FirstError(f"routers are for {routers.n_layer} layers of width {routers.n_embd}, but the model has "
                         f"{stack.n_layer} layers of width {stack.n_embd}")


def _check_batch(pre: PrefillResult, ids: torch.Tensor) -> None:
    if pre.kv[0][0].shape[0] != ids.shape[0]:
        raise FirstError(f"continuation batch {ids.shape[0]} != prompt batch {pre.kv[0][0].shape[0]}")

"""The router and the PyTorch reference forward (first_gguf/router.py) against hand computations
and against plain Hugging Face models, on tiny seeded random models of every registered type.

Comparisons print max abs diff and NMSE (run with -s to see them); on failure they also name
the first decoder layer whose output differs (forward hooks on both sides).
"""

from __future__ import annotations

import contextlib
import copy
import math

import numpy as np
import pytest
import torch
from torch import nn
from transformers import GPT2Config, GPT2LMHeadModel

from first_gguf.arch import ARCHS, DecoderStack, UnsupportedArchError, get_arch
from first_gguf.constants import (
    ROUTER_IN_BIAS,
    ROUTER_IN_WEIGHT,
    ROUTER_NORM,
    ROUTER_OUT_BIAS,
    ROUTER_OUT_WEIGHT,
    ROUTER_TENSORS,
    router_shape,
)
from first_gguf.errors import FirstError
from first_gguf.router import (
    ROLE_PARAMS,
    FirstRouters,
    Router,
    decode_hard,
    decode_soft,
    first_generate_logits,
    forward_masked,
    prefill,
)
from first_gguf.format import RouterSet, load_router_file, make_identity_routers, save_router_file
from tiny_hf import MODEL_TYPES, N_LAYER, VOCAB, tiny_model

# float32 logits of magnitude ~5: a prompt pass plus decode sums in another order than one pass.
ATOL = 2e-5
# Skip masks used below (1 = run); each keeps layer 0 and the last layer, as the default
# protected layers do. SKIP_ONE keeps Gemma's global layer 2 (see the one-at-a-time test).
SKIP_ONE = (1, 0, 1, 1)
SKIP_TWO = (1, 0, 0, 1)


@pytest.fixture(scope="session")
def models() -> dict[str, nn.Module]:
    """One frozen tiny model per HF model_type."""
    built = {}
    for model_type in MODEL_TYPES:
        built[model_type] = tiny_model(model_type).requires_grad_(False)
    return built


def tokens(seed: int, n: int) -> torch.Tensor:
    """Random ids below Gemma 3's image / boi / eoi tokens (the last three of the vocabulary)."""
    return torch.randint(0, VOCAB - 3, (n,), generator=torch.Generator().manual_seed(seed))


PROMPT, CONT = tokens(1, 7), tokens(2, 6)  # Gemma's sliding window (4) is shorter than both


def random_router_set(n_layer: int, n_embd: int, hidden: int = 16, seed: int = 0) -> RouterSet:
    """Routers whose p differ between layers (random gains, weights and output biases)."""
    rng = np.random.default_rng(seed)
    scale = {ROUTER_NORM: 0.3, ROUTER_IN_WEIGHT: n_embd ** -0.5, ROUTER_IN_BIAS: 0.1, ROUTER_OUT_WEIGHT: 1.0,
             ROUTER_OUT_BIAS: 1.0}
    tensors = {i: {role: (rng.standard_normal(router_shape(role, n_embd, hidden)) * s
                          + (1.0 if role == ROUTER_NORM else 0.0)).astype(np.float32)
                   for role, s in scale.items()}
               for i in range(n_layer)}
    return RouterSet(n_layer=n_layer, n_embd=n_embd, hidden_size=hidden, norm_eps=1e-6, threshold=0.5,
                     protected_layers=[0, n_layer - 1], aggregation="mean", prefill="full",
                     train_source="test", tensors=tensors)


def numpy_router(t: dict[str, np.ndarray], h: np.ndarray, eps: float) -> np.ndarray:
    """docs/FORMAT.md section 1 by hand, in float64: (..., n_embd) -> (...) probabilities."""
    h = h.astype(np.float64)
    x = h / np.sqrt((h * h).mean(-1, keepdims=True) + eps) * t[ROUTER_NORM]
    z = x @ t[ROUTER_IN_WEIGHT].T.astype(np.float64) + t[ROUTER_IN_BIAS]
    s = z / (1.0 + np.exp(-z))
    return 1.0 / (1.0 + np.exp(-(s @ t[ROUTER_OUT_WEIGHT].T.astype(np.float64) + t[ROUTER_OUT_BIAS])[..., 0]))


# --- comparison with diagnostics -------------------------------------------------------------

@contextlib.contextmanager
def tap_layers(model: nn.Module, record: dict[int, list[torch.Tensor]], index: list[int] | None = None):
    """Append each decoder layer's output to record[original layer index] (index maps a pruned copy)."""
    layers = DecoderStack(model).layers
    index = index or list(range(len(layers)))

    def hook(i):
        return lambda mod, args, out: record.setdefault(i, []).append(
            (out[0] if isinstance(out, tuple) else out).detach())

    handles = [layer.register_forward_hook(hook(index[j])) for j, layer in enumerate(layers)]
    try:
        yield record
    finally:
        for handle in handles:
            handle.remove()


def nmse(got: torch.Tensor, want: torch.Tensor) -> float:
    return float(((got - want) ** 2).sum() / (want ** 2).sum().clamp_min(1e-300))


def first_failing_layer(got: dict, want: dict, atol: float) -> str:
    """The first layer whose recorded outputs (concatenated over calls) differ."""
    for i in sorted(set(got) & set(want)):
        a, b = torch.cat(got[i], dim=1).double(), torch.cat(want[i], dim=1).double()
        if a.shape != b.shape:
            return f"layer {i}: output shapes {tuple(a.shape)} vs {tuple(b.shape)}"
        diff = (a - b).abs().max().item()
        if diff > atol * max(1.0, b.abs().max().item()):
            return f"layer {i}: max abs diff {diff:.3e}, NMSE {nmse(a, b):.3e}"
    return "none (every recorded layer agrees)"


def check(what: str, got: torch.Tensor, want: torch.Tensor, atol: float = ATOL, taps=None) -> float:
    """Assert max |got - want| <= atol; print max abs diff and NMSE; name the first failing layer."""
    got, want = got.detach().double(), want.detach().double()
    assert got.shape == want.shape, f"{what}: shape {tuple(got.shape)} != {tuple(want.shape)}"
    max_abs, err = (got - want).abs().max().item(), nmse(got, want)
    print(f"{what}: max abs diff {max_abs:.3e}, NMSE {err:.3e}")
    if not max_abs <= atol:
        where = first_failing_layer(*taps, atol) if taps else "not recorded"
        pytest.fail(f"{what}: max abs diff {max_abs:.3e} > {atol:g}, NMSE {err:.3e}; first failing {where}")
    return max_abs


def pruned_copy(model: nn.Module, keep, renumber: bool) -> tuple[nn.Module, list[int]]:
    """A deep copy of ``model`` whose decoder layers outside ``keep`` are deleted.

    renumber: give the kept layers cache indices 0..n-1 (a model that never had the others);
    else they keep their indices, to run on a cache the full model filled.
    """
    pruned = copy.deepcopy(model)
    stack = DecoderStack(pruned)
    kept = [i for i, k in enumerate(keep) if k]
    stack.text.layers = nn.ModuleList(stack.text.layers[i] for i in kept)
    for config in {id(c): c for c in (stack.config, stack.text.config)}.values():
        config.num_hidden_layers = len(kept)
        if getattr(config, "layer_types", None):
            config.layer_types = [config.layer_types[i] for i in kept]
    if renumber:
        for j, layer in enumerate(stack.text.layers):
            layer.self_attn.layer_idx = j
            if hasattr(layer, "layer_idx"):
                layer.layer_idx = j
    return pruned, kept


# --- the router --------------------------------------------------------------------------------

def test_router_matches_numpy():
    n_embd, hidden, eps = 8, 5, 1e-6
    rng = np.random.default_rng(0)
    arrays = {role: rng.standard_normal(router_shape(role, n_embd, hidden)).astype(np.float32)
              for role in ROUTER_TENSORS}
    router = Router(n_embd, hidden, eps)
    with torch.no_grad():
        for role, name in ROLE_PARAMS.items():
            param = router.get_parameter(name)
            assert tuple(param.shape) == router_shape(role, n_embd, hidden), role
            param.copy_(torch.from_numpy(arrays[role]))
    h = (rng.standard_normal((2, 3, n_embd)) * 3).astype(np.float32)
    check("router vs numpy", router(torch.from_numpy(h)), torch.from_numpy(numpy_router(arrays, h, eps)), 1e-6)


def test_decide_and_gates():
    routers = FirstRouters(4, 8, threshold=0.5, protected_layers=[0, 3])
    p = torch.tensor([0.1, 0.5, 0.4999, 0.2])
    assert routers.decide(p).tolist() == [True, True, False, True]
    assert routers.gates(p).tolist() == pytest.approx([1.0, 0.5, 0.4999, 1.0])


def test_first_routers_router_set_round_trip(tmp_path):
    torch.manual_seed(0)
    routers = FirstRouters(3, 16, hidden_size=8, norm_eps=1e-5, threshold=0.37, protected_layers=[1],
                           train_source="round trip")
    with torch.no_grad():
        for param in routers.parameters():
            param.add_(torch.randn_like(param))
    rs = routers.to_router_set()
    assert (rs.n_layer, rs.n_embd, rs.hidden_size, rs.norm_eps, rs.threshold, rs.protected_layers,
            rs.train_source) == (3, 16, 8, 1e-5, 0.37, [1], "round trip")
    back = FirstRouters.from_router_set(rs)
    for (name, a), (_, b) in zip(routers.named_parameters(), back.named_parameters()):
        assert a.dtype == b.dtype == torch.float32 and torch.equal(a, b), name
    assert (back.threshold, back.protected_layers, back.norm_eps) == (0.37, [1], 1e-5)
    for rs2 in (back.to_router_set(), load_router_file(save_router_file(rs, tmp_path / "r.safetensors"))):
        for i in range(3):
            for role in ROUTER_TENSORS:
                assert rs2.tensors[i][role].dtype == np.float32
                assert np.array_equal(rs2.tensors[i][role], rs.tensors[i][role]), (i, role)
    ident = make_identity_routers(3, 16, 8)
    again = FirstRouters.from_router_set(ident).to_router_set()
    assert all(np.array_equal(again.tensors[i][r], ident.tensors[i][r]) for i in range(3) for r in ROUTER_TENSORS)


# --- the registry ------------------------------------------------------------------------------

def test_unknown_model_type_is_a_clear_error():
    with pytest.raises(UnsupportedArchError, match="Can not map model_type 'mamba'"):
        get_arch("mamba")
    torch.manual_seed(0)
    gpt2 = GPT2LMHeadModel(GPT2Config(n_embd=64, n_layer=2, n_head=4, vocab_size=VOCAB)).eval()
    with pytest.raises(UnsupportedArchError) as err:
        prefill(gpt2, None, PROMPT)
    message = str(err.value)
    assert "'gpt2'" in message and all(t in message for t in ARCHS), message


def test_routers_must_fit_the_model(models):
    with pytest.raises(FirstError, match="routers are for 3 layers of width 64, but the model has 4"):
        prefill(models["qwen2"], FirstRouters(3, 64), PROMPT)


def test_argument_errors(models):
    model = models["llama"]
    for kwargs, message in [(dict(mode="fast"), "unknown mode"), (dict(mode="mask"), "needs mask"),
                            (dict(mode="full", mask=SKIP_ONE), "takes no mask"),
                            (dict(mode="full", prefill="masked"), "mode 'mask' only"),
                            (dict(mode="mask", mask=(1, 0, 1)), r"expected \(4,\)"),
                            (dict(mode="first"), "needs routers")]:
        with pytest.raises(FirstError, match=message):
            first_generate_logits(model, None, PROMPT, CONT, **kwargs)


# --- the reference forward against hand computations and plain HF models ----------------------

@pytest.mark.parametrize("model_type", MODEL_TYPES)
def test_decisions_match_hand_computation(models, model_type):
    """p_i, m_i from HF's own hidden states and NumPy routers; `first` equals `mask` with that mask."""
    model = models[model_type]
    rs = random_router_set(N_LAYER, 64)
    rs.tensors[0][ROUTER_OUT_BIAS][:] = -30.0  # p_0 ~ 0, but layer 0 is protected: it must run
    with torch.no_grad():
        hf_hidden = model(input_ids=PROMPT[None], output_hidden_states=True).hidden_states[:N_LAYER]
    p_hand = np.array([numpy_router(rs.tensors[i], hf_hidden[i][0].numpy(), rs.norm_eps).mean()
                       for i in range(N_LAYER)])
    assert abs(p_hand[1] - p_hand[2]) > 2e-3, p_hand  # a threshold between them is far from both
    rs.threshold = float(p_hand[1:3].mean())           # so exactly one of layers 1, 2 is skipped
    mask_hand = [bool(i in rs.protected_layers or p_hand[i] >= rs.threshold) for i in range(N_LAYER)]
    routers = FirstRouters.from_router_set(rs)

    with torch.no_grad():
        pre = prefill(model, routers, PROMPT, keep_hidden=True)
    for i in range(N_LAYER):
        check(f"{model_type} h_{i} vs HF hidden_states", pre.hidden[i], hf_hidden[i], ATOL * 10)
    check(f"{model_type} p vs hand", pre.p[0], torch.from_numpy(p_hand), 1e-5)
    print(f"{model_type}: p {np.round(p_hand, 4).tolist()}, threshold {rs.threshold:.4f}, mask {mask_hand}")
    assert pre.mask[0].tolist() == mask_hand and sum(mask_hand) == N_LAYER - 1

    logits, mask, p = first_generate_logits(model, routers, PROMPT, CONT, mode="first")
    assert mask.tolist() == mask_hand and torch.equal(p, pre.p[0])
    logits_mask, _, _ = first_generate_logits(model, routers, PROMPT, CONT, mode="mask", mask=mask_hand)
    assert torch.equal(logits, logits_mask)


@pytest.mark.parametrize("model_type", MODEL_TYPES)
def test_full_equals_plain_hf(models, model_type):
    model = models[model_type]
    ref_taps, hf_taps = {}, {}
    with tap_layers(model, ref_taps):
        logits, mask, p = first_generate_logits(model, None, PROMPT, CONT, mode="full")
    with tap_layers(model, hf_taps), torch.no_grad():
        hf = model(input_ids=torch.cat([PROMPT, CONT[:-1]])[None]).logits[0, len(PROMPT) - 1:]
    check(f"{model_type} full vs HF", logits, hf, taps=(ref_taps, hf_taps))
    assert mask.all() and p is None


@pytest.mark.parametrize("model_type", MODEL_TYPES)
def test_soft_gates_at_0_1_equal_hard_mask(models, model_type):
    model = models[model_type]
    routers = FirstRouters.from_router_set(random_router_set(N_LAYER, 64))
    pre = prefill(model, routers, PROMPT)  # with grad: p depends on the router parameters
    with torch.no_grad():
        hard = decode_hard(model, pre, CONT, SKIP_TWO)
    gates = torch.tensor(SKIP_TWO, dtype=torch.float32, requires_grad=True)
    soft = decode_soft(model, pre, CONT, gates)
    check(f"{model_type} soft 0/1 vs hard", soft, hard, 1e-5)
    soft.square().mean().backward()
    with torch.no_grad():  # central differences of the same loss, one gate at a time
        eps, numeric = 1e-2, []
        for i in range(N_LAYER):
            step = torch.zeros(N_LAYER)
            step[i] = eps
            losses = [decode_soft(model, pre, CONT, gates + s * step).square().mean() for s in (1, -1)]
            numeric.append(float(losses[0] - losses[1]) / (2 * eps))
    print(f"{model_type} d loss / d gates: autograd {gates.grad.tolist()}, numeric {numeric}")
    assert (gates.grad != 0).all() and gates.grad.tolist() == pytest.approx(numeric, rel=2e-2, abs=1e-4)

    # Gradients reach the routers of the unprotected layers through g = p.
    decode_soft(model, pre, CONT, routers.gates(pre.p[0])).square().mean().backward()
    for i in range(N_LAYER):
        grad = routers.routers[i].w1.weight.grad
        assert (grad is not None and grad.abs().sum() > 0) == (i not in routers.protected_layers), i


@pytest.mark.parametrize("model_type", MODEL_TYPES)
@pytest.mark.parametrize("keep", [SKIP_ONE, SKIP_TWO, (0, 1, 1, 1)])
def test_forward_masked_equals_hf_with_layers_removed(models, model_type, keep):
    # HF layers keep the attention type they were built with, so for Gemma 3 this pruned copy
    # is the same as bypassing those layers. A pruned Gemma 3 GGUF instead re-derives the
    # sliding pattern from the new layer indices (docs/FORMAT.md section 3); that is not modelled here.
    model = models[model_type]
    seq = torch.cat([PROMPT, CONT])[None]
    pruned, kept = pruned_copy(model, keep, renumber=True)
    ref_taps, hf_taps = {}, {}
    with tap_layers(model, ref_taps), torch.no_grad():
        ref = forward_masked(model, seq, keep)
    with tap_layers(pruned, hf_taps, kept), torch.no_grad():
        hf = pruned(input_ids=seq, use_cache=False).logits
    check(f"{model_type} masked {keep} vs HF pruned", ref, hf, taps=(ref_taps, hf_taps))


@pytest.mark.parametrize("model_type", MODEL_TYPES)
@pytest.mark.parametrize("keep", [SKIP_ONE, SKIP_TWO])
def test_mask_prefill_full_is_full_prompt_kv_then_bypass(models, model_type, keep):
    """`mask M, prefill=full` = the full model's prompt KV, then the continuation without M's
    skipped layers (an HF copy with them deleted, on that cache); it differs from prefill=masked."""
    model = models[model_type]
    ref_taps, hf_taps = {}, {}
    with tap_layers(model, ref_taps):
        ref, mask, _ = first_generate_logits(model, None, PROMPT, CONT, mode="mask", mask=keep)
    assert mask.tolist() == [bool(k) for k in keep]
    pruned, kept = pruned_copy(model, keep, renumber=False)
    with tap_layers(model, hf_taps), tap_layers(pruned, hf_taps, kept), torch.no_grad():
        out = model(input_ids=PROMPT[None], use_cache=True)
        cont = pruned(input_ids=CONT[None, :-1], past_key_values=out.past_key_values, use_cache=True).logits
    direct = torch.cat([out.logits[0, -1:], cont[0]])
    check(f"{model_type} mask {keep} prefill=full vs direct", ref, direct, taps=(ref_taps, hf_taps))

    masked, _, p = first_generate_logits(model, None, PROMPT, CONT, mode="mask", mask=keep, prefill="masked")
    renumbered, _ = pruned_copy(model, keep, renumber=True)
    with torch.no_grad():
        hf_masked = renumbered(input_ids=torch.cat([PROMPT, CONT[:-1]])[None], use_cache=False).logits
    check(f"{model_type} mask {keep} prefill=masked vs HF pruned", masked, hf_masked[0, len(PROMPT) - 1:])
    gap = (ref - masked).abs().max().item()
    print(f"{model_type} mask {keep}: prefill=full vs prefill=masked max abs diff {gap:.3e}")
    assert gap > 1e-2 and p is None


@pytest.mark.parametrize("model_type", MODEL_TYPES)
def test_decode_one_token_at_a_time_equals_all_at_once(models, model_type):
    # HF sizes its masks from cache layer 0 (and Gemma's first global layer, 2): SKIP_ONE keeps both.
    model = models[model_type]
    pruned, _ = pruned_copy(model, SKIP_ONE, renumber=False)
    with torch.no_grad():
        cache = model(input_ids=PROMPT[None], use_cache=True).past_key_values
        steps = torch.stack([pruned(input_ids=tok.view(1, 1), past_key_values=cache, use_cache=True).logits[0, -1]
                             for tok in CONT])
        ref = decode_hard(model, prefill(model, None, PROMPT), CONT, SKIP_ONE)[0]
    check(f"{model_type} decode all at once vs HF one token at a time", ref, steps)


def test_batch_rows_equal_single_sequences(models):
    model = models["qwen3"]
    routers = FirstRouters.from_router_set(random_router_set(N_LAYER, 64))
    prompts, conts = torch.stack([PROMPT, tokens(3, 7)]), torch.stack([CONT, tokens(4, 6)])
    with torch.no_grad():
        both = prefill(model, routers, prompts)
        logits = decode_hard(model, both, conts, SKIP_ONE)
        for b in range(2):
            one = prefill(model, routers, prompts[b])
            check(f"batch row {b} p", both.p[b], one.p[0], 1e-6)
            check(f"batch row {b} logits", logits[b], decode_hard(model, one, conts[b], SKIP_ONE)[0])
    with pytest.raises(FirstError, match="rows of this mask differ"):
        decode_hard(model, both, conts, torch.tensor([SKIP_ONE, SKIP_TWO]))


def test_soft_gate_math_is_the_interpolation(models):
    """A gate of 0.5 lands halfway between skipping and running that layer (for the last layer)."""
    model = models["llama"]
    with torch.no_grad():
        pre = prefill(model, None, PROMPT)
        stack = DecoderStack(model)
        keep_taps = {}
        with tap_layers(model, keep_taps):
            decode_hard(model, pre, CONT, (1, 1, 1, 1))
        skip_taps = {}
        with tap_layers(model, skip_taps):
            decode_hard(model, pre, CONT, (1, 1, 1, 0))
        half = decode_soft(model, pre, CONT, torch.tensor([1.0, 1.0, 1.0, 0.5]))
        h_in = skip_taps[2][-1]              # residual entering layer 3 (layers 0-2 ran)
        h_out = keep_taps[3][-1]             # layer 3's output on it
        want = stack.logits(h_in + 0.5 * (h_out - h_in))
    check("gate 0.5 vs interpolation", half, want, 1e-5)
    assert not math.isclose((half - decode_hard(model, pre, CONT, (1, 1, 1, 1))).abs().max().item(), 0.0)


def test_prefill_after_a_past_pass(models):
    """A later turn: prefill continuing a full-depth pass equals one pass; p averages the new tokens."""
    model = models["gemma3_text"]
    routers = FirstRouters.from_router_set(random_router_set(N_LAYER, 64))
    with torch.no_grad():
        whole = prefill(model, routers, PROMPT, keep_hidden=True)
        turn2 = prefill(model, routers, PROMPT[3:], past=prefill(model, routers, PROMPT[:3]))
        p_new = torch.stack([routers.layer_prob(i, whole.hidden[i][:, 3:]) for i in range(N_LAYER)], dim=-1)
    assert turn2.n_prompt == len(PROMPT)
    check("turn 2 last logits vs one pass", turn2.last_logits, whole.last_logits)
    for i in range(N_LAYER):
        check(f"turn 2 keys of layer {i} vs one pass", turn2.kv[i][0], whole.kv[i][0])
    check("turn 2 p vs the new tokens' mean", turn2.p, p_new, 1e-6)
    with pytest.raises(FirstError, match="expected non-empty"):
        prefill(model, routers, PROMPT[:0])

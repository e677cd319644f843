"""The default training recipe: the defaults of ``train_routers`` and of ``first-gguf train``.

The routers committed for the default model (``first_gguf/data/<model>.routers.safetensors``)
were trained with exactly these values except where ``COMMITTED`` says otherwise; the README
gives the command. No torch here, so the CLI can show these defaults without importing it.
"""

from __future__ import annotations

from ..constants import DEFAULT_THRESHOLD

TASKS = ("code", "instruct", "prose")   # built-in families (train/data.py)
STEPS = 300                  # optimizer steps
BATCH_SIZE = 1               # examples per optimizer step (gradient accumulation)
EXAMPLES = 96                # training examples, shared evenly between the data sources
LR = 3e-3                    # Adam, constant after WARMUP_STEPS of linear warm-up
WARMUP_STEPS = 10
GRAD_CLIP = 1.0
LAM = 0.01                   # the paper's skip penalty: lam * mean_i(p_i)
TARGET_WEIGHT = 1.0          # weight of relu(target_skip - S)^2 when a target skip count is given
GATE = "soft"                # "soft" (g = p, docs/FORMAT.md) or "straight-through" (hard forward)
HIDDEN_SIZE = 64
THRESHOLD = DEFAULT_THRESHOLD
INIT_KEEP_PROB = 0.9         # routers start as make_identity_routers(seed): p = 0.9 everywhere
MAX_PROMPT_TOKENS = 96
MAX_RESPONSE_TOKENS = 24
CHECKPOINT_EVERY = 25        # steps between checkpoints
LORA_RANK = 8
LORA_LR = 2e-4

# The committed routers of the default model: `first-gguf train` with these options (README).
# Chosen among soft / straight-through / concrete gates, with and without a target skip count,
# by held-out KL and top-1 agreement at equal mean skip (docs/TRAINING.md): relaxed-Bernoulli
# gates with a strong skip penalty spread the skipping over more inputs than soft gates do.
COMMITTED: dict[str, object] = {"gate": "concrete", "lam": 1.0, "steps": 600, "examples": 192}
COMMITTED_MODEL = "qwen2.5-coder-0.5b-instruct"
# Every model with committed routers, all trained with COMMITTED (the 1.5B's W1 stored as F16).
COMMITTED_MODELS = (COMMITTED_MODEL, "qwen2.5-coder-1.5b-instruct")


def committed_command(threads: int = 2, model: str = COMMITTED_MODEL) -> str:
    """The ``first-gguf train`` command line that reproduces ``model``'s committed routers."""
    opts = " ".join(f"--{k.replace('_', '-')} {v}" for k, v in COMMITTED.items())
    return f"first-gguf train {model} -o {model}.routers.safetensors {opts} --threads {threads}"

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
GATE = "soft"                # "soft" (g = p, FIRST.md) or "straight-through" (hard forward)
HIDDEN_SIZE = 64
THRESHOLD = DEFAULT_THRESHOLD
INIT_KEEP_PROB = 0.9         # routers start as make_identity_routers(seed): p = 0.9 everywhere
MAX_PROMPT_TOKENS = 96
MAX_RESPONSE_TOKENS = 24
CHECKPOINT_EVERY = 25        # steps between checkpoints
LORA_RANK = 8
LORA_LR = 2e-4

# The committed routers of the default model: `first-gguf train` with these options (README).
COMMITTED: dict[str, object] = {}

"""Long-context extension of v3_small with YaRN, as DeepSeek-V3 did (4K -> 32K -> 128K, 1000 steps each).

Continues the v3_small checkpoint (its params, through `init.checkpoint`) at 4x the context:
seq_len 256 -> 1024, YaRN factor 4 over the 256 positions it was trained on (beta_fast 32, beta_slow 1,
mscale_all_dim 1 so the softmax scale gets mscale^2 as in V3), a small constant learning rate.

Run:      python -m dsjax.main --config=experiments/v3_small.py
          python -m dsjax.main --config=experiments/v3_long.py
Hardware: 2 CPU cores, a few minutes (40 steps).
Expect:   `val_loss_pos*` (validation loss by position within a document, quarters of 1024).
          Measured once, from a 150-step v3_small (gamma 1e-2): step 0 (YaRN zero-shot) 5.366 overall,
          5.454 / 5.355 / 5.343 / 5.267 by quarter; after 40 steps 5.193, 5.274 / 5.188 / 5.166 /
          5.102. Plain RoPE at 1024 scores the same at step 0 (5.367): at this size the model leans
          on the 32-wide no-RoPE part of each head, so the extension buys little beyond training on
          longer documents; the gain is about even across positions.
Variants: `:smoke` continues runs/v3_small_smoke (tests).
"""
from dsjax import presets


def get_config(arg=None):
    # Start from the base run's own config, so the two never drift apart.
    c = presets.load_experiment(__file__, 'v3_small', arg)
    original = c.data.seq_len
    c.init.checkpoint = 'runs/v3_small' + (f'_{arg}' if arg else '')
    c.data.seq_len = original * 4
    c.model.max_position_embeddings = original * 4
    c.model.rope_scaling.update(type='yarn', factor=4.0, original_max_position_embeddings=original,
                                beta_fast=32.0, beta_slow=1.0, mscale=1.0, mscale_all_dim=1.0)
    c.optim.schedule = 'constant'
    c.optim.lr = 3e-4
    c.optim.warmup_steps = 0
    c.train.steps = 40 if arg != 'smoke' else 2
    c.train.eval_every = 20 if arg != 'smoke' else 2
    c.train.checkpoint_every = c.train.steps
    return c

"""DeepSeek-V2-Lite (15.7B total, 2.4B activated) at true size: MLA without query compression,
2 shared + 64 routed experts (top-6), softmax greedy routing, expert-level balance loss 0.001.

Builds abstractly here (tests/test_experiments.py). Recipe (V2 paper App. B): lr 4.2e-4, steps at 80%
and 90% of 5.7T tokens, batch 4608.
"""
from dsjax import presets

BATCH, TOKENS = 4608, 5_700_000_000_000


def get_config(arg=None):
    c = presets.full_size_pretraining('deepseek_v2_lite', batch=BATCH, tokens=TOKENS,
                                         mesh=dict(data=1, fsdp=-1, expert=8))
    m = c.model
    m.remat_policy = 'save_dots'
    m.moe_dispatch = 'expert_parallel'
    c.optim.lr = 4.2e-4
    c.optim.schedule = 'multistep'
    c.optim.warmup_steps = 2000
    return presets.variant(c, arg)

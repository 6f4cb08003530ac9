"""DeepSeek-V2 (236B total, 21B activated) at true size: MLA, 2 shared + 160 routed experts (top-6),
softmax gating, device-limited routing (8 groups, 3 kept), expert/device/communication balance losses.

Builds abstractly here (tests/test_experiments.py); trains on a pod with expert parallelism.
Recipe (V2 paper 3.1.2): AdamW (0.9, 0.95), wd 0.1, clip 1.0, lr 2.4e-4, 2K warmup, x0.316 at ~60% and
~90% of 8.1T tokens; alpha1/2/3 = 0.003/0.05/0.02; capacity factor 1.0 at the device level.
"""
from dsjax import presets

BATCH, TOKENS = 9216, 8_100_000_000_000


def get_config(arg=None):
    c = presets.full_size_pretraining('deepseek_v2', batch=BATCH, tokens=TOKENS,
                                         mesh=dict(data=1, fsdp=-1, expert=8))
    m = c.model
    m.remat_policy = 'full'
    m.moe_dispatch = 'expert_parallel'
    m.capacity_factor = 1.0
    c.optim.lr = 2.4e-4
    c.optim.schedule = 'multistep'
    c.optim.warmup_steps = 2000
    c.optim.milestones = (0.6, 0.9)
    c.optim.milestone_factors = (0.316, 0.1)
    return presets.variant(c, arg)

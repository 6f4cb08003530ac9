"""DeepSeek-V3 (671B total, 37B activated) at true size: MLA, 1 shared + 256 routed experts (top-8),
sigmoid gating with node-limited routing (8 groups, 4 kept), auxiliary-loss-free bias balancing
(gamma 0.001, off for the last 500B tokens), sequence-wise balance loss 1e-4, one MTP depth
(lambda 0.3 then 0.1).

Builds abstractly here (tests/test_experiments.py); trains on a pod with expert parallelism.
Recipe (V3 paper 4.2): AdamW (0.9, 0.95), wd 0.1, clip 1.0; lr 2.2e-4 after 2K warmup, cosine to
2.2e-5; 14.8T tokens at 4K context; AdamW's moments kept in bfloat16 (paper 3.3). Long context follows
as a separate stage (YaRN, 32K then 128K).
"""
from dsjax import presets

BATCH, TOKENS = 15360, 14_800_000_000_000


def get_config(arg=None):
    c = presets.full_size_pretraining('deepseek_v3', batch=BATCH, tokens=TOKENS,
                                         mesh=dict(data=1, fsdp=-1, expert=64))
    m = c.model
    m.remat_policy = 'full'
    m.moe_dispatch = 'expert_parallel'
    # Expert-parallel buffers of 2x the balanced load (moe.expert_parallel_buffers): 1.8% of assignments
    # dropped at a trained v3_small's routing, 12% at 1.25 (benchmarks/results/aot.md).
    m.capacity_factor = 2.0
    c.optim.lr = 2.2e-4
    c.optim.warmup_steps = 2000
    c.optim.min_lr_ratio = 0.1
    c.optim.moment_dtype = 'bfloat16'
    c.train.bias_update_rate = 0.001
    c.train.bias_update_until = 14.3 / 14.8
    c.train.mtp_loss_weight = 0.3
    c.train.mtp_loss_weight_final = 0.1
    c.train.mtp_weight_switch = 10.0 / 14.8
    return presets.variant(c, arg)

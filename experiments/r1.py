"""DeepSeek-R1 at true size: the V3 architecture as released (YaRN factor 40, 163,840 positions).

R1 is V3-Base trained further (cold-start SFT, GRPO, rejection sampling, SFT, GRPO). This file holds
the architecture and the long-context setting R1's checkpoints use; it builds abstractly here
(tests/test_experiments.py: same 671B / 37B as V3). Until the post-training stages land, running it
continues next-token training at 32K context from `init.checkpoint` (e.g. converted R1 weights).
"""
from dsjax import config as config_lib
from dsjax import presets


def get_config(arg=None):
    c = presets.apply_preset(config_lib.base_config(), 'deepseek_v3')
    m = c.model
    m.dtype = 'bfloat16'
    m.remat_policy = 'full'
    m.moe_dispatch = 'expert_parallel'
    c.data.seq_len = 32768
    c.data.batch_size = 1920
    c.optim.lr = 7.3e-6
    c.optim.schedule = 'constant'
    c.optim.warmup_steps = 0
    c.train.steps = 1000
    c.mesh.data, c.mesh.fsdp, c.mesh.expert = 1, -1, 64
    return presets.variant(c, arg)

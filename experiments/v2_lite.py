"""DeepSeek-V2-Lite (15.7B total, 2.4B activated) at true size: MLA without query compression,
2 shared + 64 routed experts (top-6), softmax greedy routing, expert-level balance loss 0.001.

Builds abstractly here (tests/test_experiments.py). Recipe (V2 paper App. B): lr 4.2e-4, steps at 80%
and 90% of 5.7T tokens, batch 4608.
"""
from dsjax import config as config_lib

BATCH, TOKENS = 4608, 5_700_000_000_000


def get_config(arg=None):
    c = config_lib.apply_preset(config_lib.base_config(), 'deepseek_v2_lite')
    m = c.model
    m.rope_scaling.type = 'none'
    m.max_position_embeddings = 4096
    m.dtype = 'bfloat16'
    m.remat_policy = 'save_dots'
    m.moe_dispatch = 'expert_parallel'
    c.data.seq_len = 4096
    c.data.batch_size = BATCH
    c.optim.lr = 4.2e-4
    c.optim.schedule = 'multistep'
    c.optim.warmup_steps = 2000
    c.train.steps = TOKENS // (BATCH * c.data.seq_len)
    c.optim.decay_steps = c.train.steps
    c.mesh.data, c.mesh.fsdp, c.mesh.expert = 1, -1, 8
    if arg == 'smoke':
        config_lib.smoke(c)
        c.mesh.data, c.mesh.fsdp, c.mesh.expert = -1, 1, 1
    return c

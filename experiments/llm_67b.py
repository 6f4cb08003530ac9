"""DeepSeek-LLM 67B Base at true size: 95 layers, d 8192, 64 heads with 8 kv heads (GQA), FFN 22016.

Builds abstractly here (tests/test_experiments.py: 67.4B parameters); trains on a pod.
Recipe as llm_7b but lr 3.2e-4 and batch 4608 x 4096 tokens; fsdp x tensor parallel.
"""
from dsjax import config as config_lib

BATCH, TOKENS = 4608, 2_000_000_000_000


def get_config(arg=None):
    c = config_lib.apply_preset(config_lib.base_config(), 'deepseek_llm_67b')
    c.model.initializer_range = 0.006
    c.model.dtype = 'bfloat16'
    c.model.remat_policy = 'full'
    c.data.seq_len = 4096
    c.data.batch_size = BATCH
    c.optim.lr = 3.2e-4
    c.optim.schedule = 'multistep'
    c.optim.warmup_steps = 2000
    c.train.steps = TOKENS // (BATCH * c.data.seq_len)
    c.optim.decay_steps = c.train.steps
    c.mesh.data, c.mesh.fsdp, c.mesh.tensor = 1, -1, 8
    if arg == 'smoke':
        config_lib.smoke(c)
        c.mesh.data, c.mesh.fsdp, c.mesh.tensor = -1, 1, 1
    return c

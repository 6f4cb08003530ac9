"""DeepSeek-LLM 67B Base at true size: 95 layers, d 8192, 64 heads with 8 kv heads (GQA), FFN 22016.

Build abstractly (no memory):  see tests/test_experiments.py, which reports ~67B parameters.
Train: a TPU/GPU pod; the recipe is DeepSeek-LLM's: AdamW (0.9, 0.95), wd 0.1, clip 1.0,
lr 3.2e-4, 2000 warmup steps, multi-step decay to 31.6% at 80% and 10% at 90% of tokens,
batch 4608 x 4096 tokens.
"""
from dsjax import config as config_lib


def get_config(arg=None):
    c = config_lib.base_config()
    m = c.model
    m.vocab_size = 102400
    m.hidden_size = 8192
    m.intermediate_size = 22016
    m.num_hidden_layers = 95
    m.num_attention_heads = 64
    m.num_key_value_heads = 8
    m.max_position_embeddings = 4096
    m.initializer_range = 0.006
    m.dtype = 'bfloat16'
    m.remat_policy = 'save_dots'
    c.data.seq_len = 4096
    c.data.batch_size = 4608
    c.data.vocab_size = m.vocab_size
    c.optim.lr = 3.2e-4
    c.optim.schedule = 'multistep'
    c.optim.warmup_steps = 2000
    c.optim.milestones = (0.8, 0.9)
    c.optim.milestone_factors = (0.316, 0.1)
    c.train.steps = 2_000_000_000_000 // (4608 * 4096)
    c.optim.decay_steps = c.train.steps
    c.mesh.data, c.mesh.fsdp = 1, -1
    if arg == 'smoke':
        config_lib.smoke(c)
        c.mesh.data, c.mesh.fsdp = -1, 1
    return c

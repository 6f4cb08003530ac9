"""DeepSeek-LLM 67B Base at true size: 95 layers, d 8192, 64 heads with 8 kv heads (GQA), FFN 22016.

Builds abstractly here (tests/test_experiments.py: 67.4B parameters); trains on a pod.
Recipe as llm_7b but lr 3.2e-4 and batch 4608 x 4096 tokens; fsdp x tensor parallel.
"""
from dsjax import presets

BATCH, TOKENS = 4608, 2_000_000_000_000


def get_config(arg=None):
    c = presets.full_size_pretraining('deepseek_llm_67b', batch=BATCH, tokens=TOKENS,
                                         mesh=dict(data=1, fsdp=-1, tensor=8))
    c.model.initializer_range = 0.006
    c.model.remat_policy = 'full'
    c.optim.lr = 3.2e-4
    c.optim.schedule = 'multistep'
    c.optim.warmup_steps = 2000
    return presets.variant(c, arg)

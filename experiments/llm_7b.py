"""DeepSeek-LLM 7B Base at true size: 30 layers, d 4096, 32 heads (MHA), FFN 11008, vocab 102400.

Builds abstractly here (tests/test_experiments.py: 6.91B parameters); trains on a pod:
  python -m dsjax.main --config=experiments/llm_7b.py --workdir=gs://...
Recipe (DeepSeek-LLM): AdamW (0.9, 0.95), wd 0.1, clip 1.0, lr 4.2e-4, 2000 warmup steps, steps down
to 31.6% at 80% and 10% at 90% of 2T tokens, batch 2304 x 4096 tokens.
"""
from dsjax import presets

BATCH, TOKENS = 2304, 2_000_000_000_000


def get_config(arg=None):
    c = presets.full_size_pretraining('deepseek_llm_7b', batch=BATCH, tokens=TOKENS,
                                         mesh=dict(data=1, fsdp=-1))
    c.model.initializer_range = 0.006
    c.model.remat_policy = 'save_dots'
    c.optim.lr = 4.2e-4
    c.optim.schedule = 'multistep'
    c.optim.warmup_steps = 2000
    c.optim.milestones = (0.8, 0.9)
    c.optim.milestone_factors = (0.316, 0.1)
    return presets.variant(c, arg)

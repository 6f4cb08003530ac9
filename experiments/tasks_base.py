"""A small dense base pre-trained on task worksheets: the base of r1_small (500 steps of it) and of
distill_small's tokenizer; r1_zero_small pre-trains the same model on multiplication worksheets.

A model pre-trained only on Python source knows no arithmetic, so this base reads procedurally
generated worksheet pages (data.source='tasks'): train-split problems written as 'Q: .. / A: ..',
as bare equations, or as 'Problem: .. / Solution: <think> .. </think> <answer> .. </answer>' (the
tags as web text uses them). None of it is the R1-Zero template: GRPO has to teach the format.

Run:      python -m dsjax.main --config=experiments/tasks_base.py
Hardware: 2 CPU cores: 3,000 steps x 8 x 256 tokens in 15.8 min on the idle machine (3.2 steps/s).
Expect:   validation loss 6.19 -> 0.57 (500) -> 0.44 (1,000) -> 0.38 (1,500) -> 0.36 (2,000) -> 0.35 (2,500)
          -> 0.34 (3,000) (measured). In the R1-Zero template it answers 54.5% of 512 held-out
          arithmetic:2 problems correctly inside <answer> tags (greedy) but never stops after them
          (format rate 0%). By operation (256 problems): subtraction 100%, addition 61%,
          multiplication 11%; sampling at T=1 adds almost nothing (pass@8 62.5% against 59.8% greedy):
          its mistakes are systematic, operands misread after the template's long preamble (in its own
          tagged worksheet format it answers 99% of 128 of them).
Variants: `:smoke` shrinks everything to a seconds-long run (tests).
"""
from dsjax import config as config_lib
from dsjax import presets


def get_config(arg=None):
    c = config_lib.base_config()
    m = c.model
    m.vocab_size = 512
    m.hidden_size = 128
    m.intermediate_size = 344
    m.num_hidden_layers = 4
    m.num_attention_heads = 4
    m.num_key_value_heads = 4
    m.max_position_embeddings = 512
    d = c.data
    d.source = 'tasks'
    d.tasks = ('arithmetic:2',)
    d.task_documents = 40000
    d.seq_len = 256  # positions restart per page: rows this long train positions as deep as a prompt's
    d.batch_size = 8
    c.train.steps = 3000
    c.train.log_every = 20
    c.train.eval_every = 500
    c.train.checkpoint_every = 500
    c.optim.lr = 3e-3
    c.optim.warmup_steps = 30
    if arg == 'smoke':
        presets.smoke(c)
        c.model.vocab_size = 384
        c.model.max_position_embeddings = 512
        d.task_documents = 400
    return c

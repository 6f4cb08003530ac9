"""R1-Zero at laptop scale: GRPO with rule rewards (accuracy + format) straight from a small base.

The chain: `base` pre-trains experiments/tasks_base.py (worksheets of train-split 2-digit arithmetic,
never the R1-Zero template), then `grpo` runs GRPO from it with the R1-Zero template, G completions
per prompt, accuracy + format rewards and k3 KL to the base. Held-out accuracy and format rate are
measured on 512 test-split problems (greedy) before the first and after the last GRPO step.

Run:      python -m dsjax.main --config=experiments/r1_zero_small.py --workdir=runs/r1_zero_small
          (each stage in its own subdirectory; re-running resumes). `:grpo` is the GRPO stage alone
          (give --config.init.checkpoint=<a tasks_base workdir>); `:smoke` is a seconds-long chain.
Hardware: 2 CPU cores.
"""
from dsjax import config as config_lib
import ml_collections


def grpo_stage(arg=None):
    c = config_lib.load_experiment(__file__, 'tasks_base', arg)  # same model and tokenizer
    c.stage = 'grpo'
    g = c.grpo
    g.tasks = c.data.tasks
    g.template = 'zero'
    g.batch_size = 64
    g.group_size = 8
    g.max_new_tokens = 48
    g.temperature = 1.0
    g.beta = 0.001
    g.aggregation = 'seq-mean-token-mean'
    g.reward_names = ('accuracy', 'format')
    g.reward_weights = (1.0, 1.0)
    g.eval_problems = 512
    c.train.steps = 60
    c.train.log_every = 1
    c.train.eval_every = 30
    c.train.checkpoint_every = 10
    c.optim.lr = 3e-4
    c.optim.schedule = 'constant'
    c.optim.warmup_steps = 0
    c.optim.weight_decay = 0.0
    c.optim.decay_steps = c.train.steps
    if arg == 'smoke':
        g.batch_size, g.group_size, g.max_new_tokens, g.eval_problems = 16, 4, 8, 16
        c.train.steps, c.train.eval_every, c.train.checkpoint_every = 2, 2, 1
    return c


def get_config(arg=None):
    if arg == 'grpo':
        return grpo_stage()
    c = ml_collections.ConfigDict()
    c.stage = 'chain'
    c.chain = ('base', 'grpo')
    c.stages = ml_collections.ConfigDict()
    c.stages.base = config_lib.load_experiment(__file__, 'tasks_base', arg)
    c.stages.grpo = grpo_stage(arg)
    return c

"""DeepSeek-R1's four-stage recipe at laptop scale, on 2-digit arithmetic.

The chain (each stage in WORKDIR/<stage>, each from the previous stage's checkpoint unless noted):
  base      pre-training on task worksheets (experiments/tasks_base.py, the base of r1_zero_small)
  cold_sft  cold-start SFT: worked <think> ... </think> <answer> ... </answer> solutions of train-split
            problems, in the chat template, loss on the assistant tokens only
  grpo1     reasoning RL: GRPO with accuracy + format rewards, prompts in the same chat template
  rs        rejection sampling from grpo1: k answers per train prompt, correct and not overlong kept
  rs_sft    SFT of the *base* model (init '{base}', as R1 does) on rs's samples.jsonl
  grpo2     RL again from rs_sft
After every stage but rs, the model answers 512 held-out (test-split) problems greedily: accuracy,
format rate, and the cross-entropy of the problems' worked solutions -> WORKDIR/table.md.

Run:      python -m dsjax.main --config=experiments/r1_small.py --workdir=runs/r1_small
          (re-running resumes; finished stages are skipped). `:smoke` is a seconds-long chain.
Hardware: 2 CPU cores, shared with other jobs (1-minute load average 11-35 during the run).
Time:     ~55 min measured: base 13 min (the tasks_base run), cold_sft 6, grpo1 13, rs 4, rs_sft 4,
          grpo2 3 (10 steps); plus ~1 min of evaluation per stage. Wall times below include restarts
          of the chain; the base was a finished tasks_base run put in WORKDIR/base (same config).
Measured (512 held-out arithmetic:2 problems, greedy, chat template; task_val_loss = cross-entropy
per assistant token of their worked solutions):

    | stage    | accuracy | format rate | task_val_loss | completion tokens | wall (s) |
    |----------|----------|-------------|---------------|-------------------|----------|
    | base     | 0.000    | 0.000       | 0.919         | 63.2 (hits max)   | 792      |
    | cold_sft | 0.115    | 1.000       | 0.144         | 48.6              | 434      |
    | grpo1    | 0.078    | 1.000       | 0.161         | 48.7              | 816      |
    | rs_sft   | 0.088    | 0.992       | 0.397         | 47.4              | 229      |
    | grpo2    | 0.100    | 0.998       | 0.414         | 46.6              | 168      |

    rs: 3,200 answers (800 prompts x 4 at T 0.7) from grpo1, 9.3% correct; kept 187 (5.8%; 109
    correct duplicates dropped, none overlong), 21.6% of prompts have a kept answer (250 s).
What it shows: the cold start teaches the format completely (0 -> 100%) and some arithmetic; at
this size and step budget GRPO did not raise accuracy (20 steps of 16 prompts x 8: 11.5 -> 7.8%;
an earlier try at lr 2e-4, T 1, 8 prompts/step went to 2.3%), so rejection sampling had few correct
answers to keep and rs_sft (the base SFT-ed on 187 of them) stays below the cold start; grpo2 adds
1.2 points. More GRPO steps and prompts per step are the first thing to try with more compute.
Tried on multiplication:3 (r1_zero_small's base, 2,500 steps; not adopted): cold_sft (100 steps on
2,000 worked solutions, ~70 tokens each) reached 14.1% with format 100%; grpo1 for 40 steps then
moved held-out accuracy (256 problems) 11.7 -> 13.3% (these settings, G=8 x 16 prompts, max 80 new
tokens) or 11.7 -> 14.5% (T=1, beta 0.04, lr 1e-4, 8 prompts): the SFT-ed policy writes the partial
products confidently (entropy ~0.06) and wrongly, 70-90% of groups are all wrong, so GRPO has
little to reinforce, as on arithmetic:2.
"""
import ml_collections

from dsjax import presets


def _post(base, stage: str, steps: int, lr: float):
    """A post-training stage on the base model's architecture, data section and tokenizer."""
    c = base.copy_and_resolve_references()
    c.stage = stage
    c.train.steps = steps
    c.train.log_every = 5
    c.train.eval_every = steps
    c.train.checkpoint_every = steps
    c.optim.lr = lr
    c.optim.warmup_steps = 10 if stage == 'sft' else 0
    c.optim.schedule = 'cosine' if stage == 'sft' else 'constant'
    c.optim.weight_decay = 0.0
    c.optim.decay_steps = steps
    return c


def _sft(base, steps: int, **sft):
    c = _post(base, 'sft', steps, 1e-3)
    c.data.seq_len = 256  # about three conversations per row
    c.data.batch_size = 8
    c.sft.update(**sft)
    return c


def _grpo(base, steps: int):
    # Measured: lr 2e-4 at 64 completions/step and T = 1 drifted (KL 0.18 after 20 steps) and took
    # held-out accuracy from 11.5% to 2.3%; so a smaller lr, twice the prompts and T = 0.7.
    c = _post(base, 'grpo', steps, 5e-5)
    g = c.grpo
    g.tasks = base.data.tasks
    g.template = 'chat'  # the SFT stages' template (dsjax/data/chat.py)
    g.batch_size = 128  # 16 prompts x G = 8
    g.num_generations = 8
    g.max_completion_length = 64  # a worked solution is ~50 tokens with EOS
    g.temperature = 0.7
    g.beta = 0.001
    g.reward_funcs = ('accuracy', 'format')
    g.reward_weights = (1.0, 1.0)
    g.eval_problems = 64  # its own quick check; the chain's evaluation uses 512
    return c


def get_config(arg=None):
    smoke = arg == 'smoke'
    base = presets.load_experiment(__file__, 'tasks_base', arg)
    if not smoke:  # the base these numbers were measured on: 500 steps of tasks_base
        base.train.steps = base.optim.decay_steps = 500
        base.train.eval_every = base.train.checkpoint_every = 250
    tasks = tuple(base.data.tasks)
    c = ml_collections.ConfigDict()
    c.stage = 'chain'
    c.chain = ('base', 'cold_sft', 'grpo1', 'rs', 'rs_sft', 'grpo2')
    c.stages = s = ml_collections.ConfigDict()
    s.base = base
    s.cold_sft = _sft(base, 100, source='cold_start', tasks=tasks, examples=2000, val_examples=100)
    s.grpo1 = _grpo(base, 20)
    s.rs = _post(base, 'rejection', 1, 1e-3)
    s.rs.rejection.update(tasks=tasks, prompts=800, samples=4, temperature=0.7, max_new_tokens=64, max_tokens=64,
                          batch=64, template='chat')
    s.rs_sft = _sft(base, 100, source='jsonl', paths=('{rs}/samples.jsonl',))
    s.rs_sft.init.checkpoint = '{base}'
    s.grpo2 = _grpo(base, 10)
    c.evaluation = presets.chain_evaluation(('base', 'cold_sft', 'grpo1', 'rs_sft', 'grpo2'), tasks)
    if smoke:
        for name in ('cold_sft', 'rs_sft'):
            s[name].data.seq_len = 128
            s[name].train.update(steps=2, eval_every=2, checkpoint_every=2)
            s[name].optim.update(warmup_steps=0, decay_steps=2)
        s.cold_sft.sft.update(examples=16, val_examples=8)
        # An untrained model answers nothing correctly: the smoke chain's rs_sft re-reads the cold start.
        s.rs_sft.sft.update(source='cold_start', tasks=tasks, examples=16, val_examples=8)
        for name in ('grpo1', 'grpo2'):
            s[name].grpo.update(batch_size=16, num_generations=4, max_completion_length=8, eval_problems=8)
            s[name].train.update(steps=1, eval_every=1, checkpoint_every=1)
            s[name].optim.decay_steps = 1
        s.rs.rejection.update(prompts=4, samples=2, max_new_tokens=8, max_tokens=8, batch=4)
        c.evaluation.update(problems=8, max_new_tokens=8, batch_size=8, seq_len=128)
    return c

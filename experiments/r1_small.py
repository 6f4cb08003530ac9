"""DeepSeek-R1's four-stage recipe at laptop scale, on 2-digit arithmetic.

The chain (each stage in WORKDIR/<stage>, each from the previous stage's checkpoint unless noted):
  base      500 steps of experiments/tasks_base.py (pre-training on task worksheets)
  cold_sft  cold-start SFT, 300 steps on 3,000 worked <think> ... </think> <answer> ... </answer>
            solutions of train-split problems, chat template, loss on the assistant tokens only
  grpo1     reasoning RL: 20 GRPO steps of 16 prompts x 8, accuracy + format rewards, same template
  rs        rejection sampling from grpo1: 4 answers to each of 800 train prompts, correct ones kept
  rs_sft    SFT of the *base* model (init '{base}', as R1 does) on rs's samples.jsonl, 300 steps
  grpo2     10 more GRPO steps from rs_sft
After every stage but rs, the model answers 512 held-out (test-split) problems greedily: accuracy,
format rate, and the cross-entropy of the problems' worked solutions -> WORKDIR/table.md.

Run:      python -m dsjax.main --config=experiments/r1_small.py --workdir=runs/r1_small
          (re-running resumes; finished stages are skipped).
Hardware: 2 idle CPU cores: 6 min for the chain (2026-12-05): base 1.3, cold_sft 0.8, grpo1 0.9, rs 0.8,
          rs_sft 0.7, grpo2 0.5, plus ~10 s of evaluation per stage.
Expect:   (2026-12-05; 512 held-out problems, greedy, chat template; the chain with train.seed and
          rejection.seed 0, 1, 2 in every stage: benchmarks/results/r1_small.md)

    | stage    | seed 0 | seed 1 | seed 2 | mean  |
    |----------|--------|--------|--------|-------|
    | base     | 0.0%   | 0.2%   | 0.0%   | 0.1%  |
    | cold_sft | 37.3%  | 31.1%  | 43.9%  | 37.4% |
    | grpo1    | 37.5%  | 30.5%  | 45.5%  | 37.8% |
    | rs_sft   | 25.2%  | 18.6%  | 41.2%  | 28.3% |
    | grpo2    | 25.2%  | 18.8%  | 43.6%  | 29.2% |

          The cold start does the work (format 0 -> 100%, accuracy 31-44% by seed). GRPO moves accuracy by
          +0.2 / -0.6 / +1.6 points (grpo1) and +0.0 / +0.2 / +2.3 (grpo2): at 16 prompts x 8 its gradient
          is mostly noise, so Adam's lr-sized steps are a short random walk from the SFT optimum (lr 1e-5;
          KL 0.001 after 20 steps) and the one drop is 3 problems of 512. rs_sft learns from ~450-520 kept
          answers instead of the cold start's 3,000 and lands below it. The diagnosis (sampled vs greedy
          accuracy, gradient norm against batch size, larger lr): benchmarks/results/r1_small.md.
Variants: `:smoke` is a seconds-long chain (tests).
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
    # At 16 prompts x 8 the policy gradient is mostly noise and Adam moves every weight by ~lr per step
    # whatever the gradient's size: larger lrs walked away from the cold start (benchmarks/results/r1_small.md).
    c = _post(base, 'grpo', steps, 1e-5)
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
    # 100 steps on 2,000 solutions left 70-80% of GRPO's groups all wrong (no signal); 300 on 3,000 leaves ~30%.
    s.cold_sft = _sft(base, 300, source='cold_start', tasks=tasks, examples=3000, val_examples=100)
    s.grpo1 = _grpo(base, 20)
    s.rs = _post(base, 'rejection', 1, 1e-3)
    s.rs.rejection.update(tasks=tasks, prompts=800, samples=4, temperature=0.7, max_new_tokens=64, max_tokens=64,
                          batch=64, template='chat')
    s.rs_sft = _sft(base, 300, source='jsonl', paths=('{rs}/samples.jsonl',))
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

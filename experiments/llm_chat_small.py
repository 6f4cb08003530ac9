"""DeepSeek-LLM Chat's alignment at laptop scale: SFT, then DPO from it on preference pairs (paper 5.2).

The chain (each stage in WORKDIR/<stage>): `sft` trains tasks_base's model from scratch on 2,000 worked
arithmetic:2 solutions (the cold-start set); `dpo` aligns it on 2,000 built-in preference pairs (the
worked solution against the same one with a near-miss answer, or against the bare answer without the
think/answer format), its frozen reference being the SFT model. DPO as the paper ran it (warm-up then cosine;
beta 0.1, TRL's default: the paper gives none) at a laptop's batch (16 pairs) and a larger lr (1e-4, not 5e-6:
100 steps, not one epoch of 512-pair batches).
Run:      python -m dsjax.main --config=experiments/llm_chat_small.py --workdir=runs/llm_chat_small
Hardware: 2 CPU cores shared with other jobs (load ~20): sft 8.4 min, dpo 12.4 min.
Expect:   (measured once; WORKDIR/dpo/metrics.jsonl, 128 held-out pairs) sft val loss 6.14 -> 0.225; dpo from it:
          val DPO loss 0.693 (log 2: pi = pi_ref) -> 0.471, implicit-reward accuracy 0.50 -> 0.94 (train batches
          0.875 at step 100), and the likelihood preference accuracy stays 97.7% -> 97.7%: the SFT model already
          ranks 125 of the 128 pairs right by likelihood; DPO widens the margins (rejected reward -1.18, chosen
          -0.10 at step 100) rather than flipping pairs.
Variants: `:smoke` is a seconds-long chain (tests).
"""
import ml_collections

from dsjax import presets


def _stage(base, stage: str, steps: int, lr: float, batch: int):
    c = base.copy_and_resolve_references()
    c.stage = stage
    c.data.seq_len = 128  # a conversation is ~60 tokens: one SFT row packs two, a DPO row holds one answer
    c.data.batch_size = batch
    c.train.update(steps=steps, log_every=5, eval_every=steps, checkpoint_every=steps)
    c.optim.update(lr=lr, warmup_steps=10, schedule='cosine', decay_steps=steps, weight_decay=0.0)
    return c


def get_config(arg=None):
    smoke = arg == 'smoke'
    base = presets.load_experiment(__file__, 'tasks_base', arg)
    tasks = tuple(base.data.tasks)
    c = ml_collections.ConfigDict()
    c.stage = 'chain'
    c.chain = ('sft', 'dpo')
    c.stages = s = ml_collections.ConfigDict()
    s.sft = _stage(base, 'sft', 300, 3e-3, 16)
    s.sft.init.checkpoint = 'scratch'
    s.sft.sft.update(source='cold_start', tasks=tasks, examples=2000, val_examples=100)
    s.dpo = _stage(base, 'dpo', 100, 1e-4, 16)
    s.dpo.dpo.update(tasks=tasks, pairs=2000, val_pairs=200, beta=0.1)
    if smoke:
        for name, stage in s.items():
            stage.train.update(steps=2, eval_every=2, checkpoint_every=2)
            stage.optim.update(warmup_steps=0, decay_steps=2)
            stage.data.batch_size = 8
        s.sft.sft.update(examples=16, val_examples=8)
        s.dpo.dpo.update(pairs=16, val_pairs=8)
    return c

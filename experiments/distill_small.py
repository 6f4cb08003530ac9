"""Distillation at laptop scale: a V3-style MoE teacher into a small dense student, on 2-digit arithmetic.

The chain (each stage in WORKDIR/<stage>; every model here starts from random weights):
  teacher          V3-style MoE (MLA, 1 shared + 8 routed experts top-2, sigmoid routing with the
                   bias, seq-wise balance loss) SFT-ed on 2,000 worked solutions of train problems
  teacher_samples  the teacher answers 2,000 train prompts (T = 0.6); every answer that ends within
                   64 tokens is kept, right or wrong (`rejection.keep='all'`): the teacher's data
  student_alone    the dense student (2 layers of 64) SFT-ed on the 300 worked solutions a student
                   without a teacher has, for the same steps as the distilled one
  student_seq      the same student SFT-ed on teacher_samples (sequence-level distillation)
  student_logit    the same student trained on teacher_samples with the generalised JSD (beta 0.5,
                   T = 1) to the teacher's logits only (logit-level distillation; no CE: the samples'
                   own tokens are not trusted)
All share the worksheet tokenizer of tasks_base (logit-level distillation requires one tokenizer).
Each model answers 512 held-out (test-split) problems greedily (accuracy, format rate) and is scored
on the cross-entropy of their worked solutions (task validation loss, per assistant token) ->
WORKDIR/table.md. Gap closed = (student_alone - student_x) / (student_alone - teacher), on the task
validation loss: a teacher this small trained from scratch answers few problems right, so accuracy
differences are too small to measure a gap on.

Run:      python -m dsjax.main --config=experiments/distill_small.py --workdir=runs/distill_small
          (re-running resumes; finished stages are skipped). `:smoke` is a seconds-long chain.
Hardware: 2 CPU cores.
Measured: see the table at the end of this docstring.
"""
import ml_collections

from dsjax import config as config_lib

_V3_STYLE = dict(
    attention_type='mla', q_lora_rank=64, kv_lora_rank=32, qk_nope_head_dim=32, qk_rope_head_dim=16, v_head_dim=32,
    rope_interleave=True, n_routed_experts=8, n_shared_experts=1, num_experts_per_tok=2, moe_intermediate_size=128,
    first_k_dense_replace=1, scoring_func='sigmoid', topk_method='noaux_tc', n_group=2, topk_group=1,
    norm_topk_prob=True, routed_scaling_factor=2.5, aux_loss_alpha=1e-4, seq_aux=True, moe_dispatch='capacity',
    capacity_factor=2.0)


def _stage(base, stage: str, steps: int, lr: float, **sft):
    c = base.copy_and_resolve_references()
    c.stage = stage
    c.init.checkpoint = 'scratch'
    c.data.seq_len = 256
    c.data.batch_size = 8
    # data.val_fraction stays tasks_base's: it picks the worksheets the tokenizer is trained on.
    c.sft.update(**sft)
    c.train.update(steps=steps, log_every=10, eval_every=steps, checkpoint_every=steps)
    c.optim.update(lr=lr, warmup_steps=min(20, steps - 1), decay_steps=steps, weight_decay=0.0)
    return c


def _student(c):
    c.model.update(hidden_size=64, intermediate_size=172, num_hidden_layers=2, num_attention_heads=4,
                   num_key_value_heads=4)
    return c


def get_config(arg=None):
    smoke = arg == 'smoke'
    base = config_lib.load_experiment(__file__, 'tasks_base', arg)  # its data section: the tokenizer
    tasks = tuple(base.data.tasks)
    steps = 200
    c = ml_collections.ConfigDict()
    c.stage = 'chain'
    c.chain = ('teacher', 'teacher_samples', 'student_alone', 'student_seq', 'student_logit')
    c.stages = s = ml_collections.ConfigDict()
    s.teacher = _stage(base, 'sft', 300, 2e-3, source='cold_start', tasks=tasks, examples=2000, val_examples=100)
    s.teacher.model.update(num_hidden_layers=4, **_V3_STYLE)
    s.teacher.train.bias_update_rate = 1e-2
    s.teacher_samples = _stage(base, 'rejection', 1, 1e-3)
    s.teacher_samples.init.checkpoint = '{teacher}'
    s.teacher_samples.model.update(num_hidden_layers=4, **_V3_STYLE)
    s.teacher_samples.rejection.update(tasks=tasks, prompts=2000, samples=1, temperature=0.6, max_new_tokens=64,
                                       max_tokens=64, batch=128, template='chat', keep='all')
    s.student_alone = _student(_stage(base, 'sft', steps, 2e-3, source='cold_start', tasks=tasks, examples=300,
                                      val_examples=100))
    s.student_seq = _student(_stage(base, 'sft', steps, 2e-3, source='jsonl', paths=('{teacher_samples}/samples.jsonl',)))
    s.student_logit = _student(_stage(base, 'distill', steps, 2e-3, source='jsonl',
                                      paths=('{teacher_samples}/samples.jsonl',)))
    s.student_logit.distill.update(teacher='{teacher}', beta=0.5, temperature=1.0, ce_weight=0.0)
    c.evaluation = e = ml_collections.ConfigDict()
    e.stages = ('teacher', 'student_alone', 'student_seq', 'student_logit')
    e.tasks = tasks
    e.problems = 512
    e.template = 'chat'
    e.max_new_tokens = 64
    e.batch_size = 128
    e.val_loss = True
    e.seq_len = 256
    if smoke:
        for name in ('teacher', 'student_alone', 'student_seq', 'student_logit'):
            s[name].data.seq_len = 128
            s[name].train.update(steps=2, eval_every=2, checkpoint_every=2)
            s[name].optim.update(warmup_steps=0, decay_steps=2)
            s[name].sft.update(examples=16, val_examples=8)
        # An untrained teacher answers nothing correctly: the smoke students read the cold start.
        for name in ('student_seq', 'student_logit'):
            s[name].sft.update(source='cold_start', tasks=tasks)
        s.teacher_samples.rejection.update(prompts=4, samples=1, max_new_tokens=8, max_tokens=8, batch=4)
        e.update(problems=8, max_new_tokens=8, batch_size=8, seq_len=128)
    return c

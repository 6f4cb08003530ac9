"""Distillation at laptop scale (R1's last step): a GRPO-trained V3-style MoE teacher into a small
dense student, on 3-digit x 1-digit multiplication, against the same student trained without it.

The chain (each stage in WORKDIR/<stage>; r1_zero_small's recipe for both models, R1-Zero template):
  teacher_base     V3-style MoE (MLA, 1 shared + 8 routed experts top-2, sigmoid routing with the bias,
                   seq-wise balance loss; 1.8M parameters, 0.85M activated matmul parameters per token)
                   pre-trained from scratch on r1_zero_small's multiplication worksheets (2,500 steps)
  teacher          GRPO from teacher_base: r1_zero_small's GRPO stage (80 steps of 8 prompts x G=8)
  teacher_samples  the teacher answers 3,000 train prompts twice at T = 1; correct answers that end
                   within 48 tokens, without duplicates, are kept (rejection sampling)
  student_base     the dense student (2 layers of 64 wide, 0.16M parameters) pre-trained on the same
                   worksheets for the same 2,500 steps
  student_alone    the student without a teacher: GRPO from student_base with the teacher's own recipe
                   (R1's comparison, its Table 6: RL on the small model itself)
  student_seq      sequence-level distillation: student_base SFT-ed on teacher_samples (300 steps)
  student_logit    logit-level distillation: the same, with the generalised JSD (beta 0.5, T = 1) to the
                   teacher's logits added to the samples' CE
Teacher and students share r1_zero_small's tokenizer (logit-level distillation requires one); SFT
renders the samples in the R1-Zero template (`sft.template='zero'`), the prompt every model is asked
in. Each model answers 512 held-out (test-split) problems greedily (<= 48 new tokens): accuracy,
format rate, task validation loss (CE of the worked solutions) and the share of the accuracy gap
between student_alone and the teacher each closes -> WORKDIR/table.md.

Run:      python -m dsjax.main --config=experiments/distill_small.py --workdir=runs/distill_small
          (re-running resumes; finished stages are skipped).
Hardware: 2 idle CPU cores: 19 min for the chain (2026-12-05): teacher_base 9.3 min (0.22 s per MoE step),
          teacher 3.7, teacher_samples 1.1, student_base 1.7, student_alone 1.3, student_seq 0.3,
          student_logit 0.7, plus ~10 s of evaluation per stage.
Expect:   (2026-12-05; 512 held-out problems, greedy, R1-Zero template)

    | model         | accuracy | format rate | task_val_loss | gap closed |
    |---------------|----------|-------------|---------------|------------|
    | teacher_base  | 67.2%    | 0%          | 0.083         |            |
    | teacher       | 71.3%    | 100%        | 0.189         | 1.00       |
    | student_base  | 0.0%     | 5.3%        | 1.010         |            |
    | student_alone | 0.2%     | 98.4%       | 0.921         | 0.00       |
    | student_seq   | 78.3%    | 100%        | 0.649         | 1.10       |
    | student_logit | 77.0%    | 100%        | 0.618         | 1.08       |

          R1's finding at laptop scale: RL alone cannot teach the 2-layer student to answer (its base never
          answers right, so every GRPO group is all wrong and RL teaches only the format), while 300 SFT
          steps on the teacher's kept answers (2,271 of 6,000 samples at T = 1; 75.6% of prompts keep one)
          take the same student 7 points past the teacher's greedy accuracy (it trains only on answers the
          grader passed; not separated further). Logit-level distillation lands within 1.3 points of
          sequence-level (on answers this deterministic the teacher's distribution adds little to the
          sampled tokens). The verdict holds for students whose base cannot answer: with q/k/v biases the
          base answers 23% and GRPO alone matches distillation (benchmarks/results/distill_small.md).
Variants: `:smoke` is a seconds-long chain (tests); `:qwen2` shapes the student as R1's Qwen2.5 students
          (q/k/v biases, 2 kv heads, tied head, RoPE theta 1e6): base 0%, student_seq 8.8%; the same with
          an untied head: base 59.8%, GRPO alone 76.2%, student_seq 73.2% (one run each); `:qwen2,smoke` both.
"""
import ml_collections

from dsjax import presets

TEACHER = dict(
    attention_type='mla', q_lora_rank=64, kv_lora_rank=32, qk_nope_head_dim=32, qk_rope_head_dim=16, v_head_dim=32,
    rope_interleave=True, n_routed_experts=8, n_shared_experts=1, num_experts_per_tok=2, moe_intermediate_size=128,
    first_k_dense_replace=1, scoring_func='sigmoid', topk_method='noaux_tc', n_group=2, topk_group=1,
    norm_topk_prob=True, routed_scaling_factor=2.5, aux_loss_alpha=1e-4, seq_aux=True, moe_dispatch='capacity',
    capacity_factor=2.0)
STUDENT = dict(hidden_size=64, intermediate_size=172, num_hidden_layers=2, num_attention_heads=4,
               num_key_value_heads=4)
# Variant `qwen2`: the student shaped as R1's Qwen2.5 students are (q/k/v biases, grouped kv heads, a head tied
# to the embedding as in the small Qwen2.5 models, RoPE theta 1e6), at the same size.
QWEN2_STUDENT = dict(STUDENT, qkv_bias=True, num_key_value_heads=2, tie_word_embeddings=True, rope_theta=1e6)


def _teacher(c):
    c.model.update(**TEACHER)
    c.train.bias_update_rate = 1e-2
    return c


def _student(c, shape):
    c.model.update(**shape)
    return c


def _on_samples(c, stage: str, steps: int):
    """An SFT-shaped stage from student_base on the teacher's kept samples, in the R1-Zero template."""
    c.stage = stage
    c.init.checkpoint = '{student_base}'
    c.sft.update(source='jsonl', paths=('{teacher_samples}/samples.jsonl',), template='zero')
    c.train.update(steps=steps, log_every=10, eval_every=steps, checkpoint_every=steps)
    c.optim.update(lr=1e-3, schedule='cosine', warmup_steps=min(20, steps - 1), decay_steps=steps, weight_decay=0.0)
    return c


def get_config(arg=None):
    options = set((arg or '').split(','))  # 'smoke', 'qwen2', or both: 'qwen2,smoke'
    smoke = 'smoke' in options
    student = QWEN2_STUDENT if 'qwen2' in options else STUDENT
    r1_zero = presets.load_experiment(__file__, 'r1_zero_small', 'smoke' if smoke else None)
    base, grpo = r1_zero.stages.base, r1_zero.stages.grpo
    tasks = tuple(grpo.grpo.tasks)
    c = ml_collections.ConfigDict()
    c.stage = 'chain'
    c.chain = ('teacher_base', 'teacher', 'teacher_samples', 'student_base', 'student_alone', 'student_seq',
               'student_logit')
    c.stages = s = ml_collections.ConfigDict()
    s.teacher_base = _teacher(base.copy_and_resolve_references())
    s.teacher = _teacher(grpo.copy_and_resolve_references())
    s.teacher_samples = _teacher(grpo.copy_and_resolve_references())
    s.teacher_samples.stage = 'rejection'
    s.teacher_samples.init.checkpoint = '{teacher}'
    s.teacher_samples.rejection.update(tasks=tasks, prompts=3000, samples=2, temperature=1.0, max_new_tokens=48,
                                       max_tokens=48, batch=128, template='zero', keep='correct')
    s.student_base = _student(base.copy_and_resolve_references(), student)
    s.student_base.init.checkpoint = 'scratch'
    s.student_alone = _student(grpo.copy_and_resolve_references(), student)
    s.student_alone.init.checkpoint = '{student_base}'
    s.student_seq = _on_samples(_student(base.copy_and_resolve_references(), student), 'sft', 300)
    s.student_logit = _on_samples(_student(base.copy_and_resolve_references(), student), 'distill', 300)
    s.student_logit.distill.update(teacher='{teacher}', beta=0.5, temperature=1.0, ce_weight=1.0)
    c.evaluation = presets.chain_evaluation(('teacher_base', 'teacher', 'student_base', 'student_alone',
                                                'student_seq', 'student_logit'), tasks)
    c.evaluation.update(template='zero', max_new_tokens=grpo.grpo.max_completion_length, gap=('student_alone', 'teacher'))
    if smoke:
        for name in ('student_seq', 'student_logit'):
            s[name].train.update(steps=2, eval_every=2, checkpoint_every=2)
            s[name].optim.update(warmup_steps=0, decay_steps=2)
            s[name].data.seq_len = 512  # the smoke tokenizer spells the R1-Zero prompt in ~300 tokens
            # An untrained teacher answers nothing correctly: the smoke students read the cold start.
            s[name].sft.update(source='cold_start', tasks=tasks, examples=16, val_examples=8)
        s.teacher_samples.rejection.update(prompts=4, samples=2, max_new_tokens=8, max_tokens=8, batch=4)
        c.evaluation.update(problems=8, max_new_tokens=8, batch_size=8, seq_len=512)
    return c

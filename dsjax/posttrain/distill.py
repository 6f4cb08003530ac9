"""Logit-level distillation: a student matches a teacher's token distributions on completion tokens.

Run:  python -m dsjax.main --config=<experiment> --config.stage=distill --config.distill.teacher=RUN --workdir=DIR

The data are SFT conversations (the `sft` section), packed as in SFT: teacher data (the teacher's
rejection-sampled answers, or any dataset), or student samples (stage 'rejection' with
`rejection.keep='all'` on the student's checkpoint: the student's own answers, drawn once before the
stage rather than every step as on-policy GKD does). For each batch the
frozen teacher (any architecture, e.g. a V3-style MoE, loaded from its run directory) computes its
logits, and the student (e.g. dense) trains on the generalised JSD to them (`distill.beta`: 0 forward
KL, 1 reverse KL, 0.5 JSD; `distill.temperature`), masked to the assistant tokens, plus
`distill.ce_weight` times the ordinary SFT cross-entropy. Validation is the SFT cross-entropy on the
held-out conversations. Teacher and student must share the tokenizer (checked; a mismatch is an error
naming distill.teacher).

Sequence-level distillation (what R1 did) needs no code of its own: rejection-sample the teacher
(stage 'rejection'), then SFT the student on its samples.jsonl.
"""
import grain
import jax
import numpy as np

from dsjax import config as config_lib
from dsjax.infer import loading
from dsjax.model.transformer import Transformer
from dsjax.posttrain import losses, sft
from dsjax.train import loop
from dsjax.train import step as step_lib

# Tokenizers agree when they agree on their special ids, size, and the encoding of this text.
_PROBE = 'Compute 48 + 17 <think> 40 + 10 = 50 </think> <answer> 65 </answer> def f(x): return x ** 2'


def check_teacher(teacher: loading.Loaded, tokenizer, model_cfg, field: str = 'distill.teacher',
                  path: str = '') -> None:
    """Raises ConfigError unless teacher and student share the tokenizer and the vocabulary size."""
    t = teacher.tokenizer
    mine = (tokenizer.vocab_size, tokenizer.bos_id, tokenizer.eos_id, tokenizer.pad_id, tokenizer.encode(_PROBE))
    theirs = (t.vocab_size, t.bos_id, t.eos_id, t.pad_id, t.encode(_PROBE))
    if mine != theirs:
        config_lib.fail(field, path, 'the teacher\'s tokenizer differs from the student\'s (vocabulary size '
                        f'{t.vocab_size} vs {tokenizer.vocab_size}, or other ids for the same text): logit-level '
                        'distillation compares distributions over the same tokens. Use one tokenizer (the same '
                        'data section), or distill sequence-level (rejection sampling + SFT)')
    if teacher.cfg.vocab_size != model_cfg.vocab_size:
        config_lib.fail(field, path, f'the teacher has model.vocab_size={teacher.cfg.vocab_size}, the student '
                        f'{model_cfg.vocab_size}: their logits must cover the same vocabulary')


def make_teacher_logits(teacher: loading.Loaded):
    """Jitted (inputs, positions, segment_ids) -> the teacher's logits [B, L, V] (float32)."""
    model = Transformer(teacher.cfg)

    @jax.jit
    def logits(variables, inputs, positions, segment_ids):
        return model.apply(variables, inputs, positions, segment_ids)[0]

    return lambda batch: np.asarray(logits(teacher.variables, batch['inputs'], batch['positions'],
                                           batch['segment_ids']))


class WithTeacherLogits(grain.DatasetIterator):
    """The SFT batches with `teacher_logits` [B, L, V] added; position and state are the parent's."""

    def __init__(self, parent, teacher_logits):
        super().__init__(parent)
        self._teacher_logits = teacher_logits

    def __next__(self):
        batch = next(self._parent)
        return {**batch, 'teacher_logits': self._teacher_logits(batch)}

    def get_state(self):
        return self._parent.get_state()

    def set_state(self, state):
        self._parent.set_state(state)


def make_loss_fn(model, beta: float, temperature: float, ce_weight: float):
    """Distillation loss_fn for `make_accumulating_step`: shares of the masked GJSD (and CE)."""

    def loss_fn(params, buffers, batch, num_tokens, rng):
        logits, aux = step_lib._apply(model, params, buffers, batch, deterministic=False, rng=rng)
        jsd = losses.distill_loss(logits, batch['teacher_logits'], batch['weights'], num_tokens, beta, temperature)
        ce = losses.sft_loss(logits, batch['targets'], batch['weights'], num_tokens)
        share = batch['weights'].sum() / num_tokens
        total = jsd + ce_weight * ce + share * aux['balance_loss']
        return total, ({'jsd': jsd, 'ce': ce, 'balance_loss': share * aux['balance_loss']}, aux['load'])

    return loss_fn


def validate(config, num_devices: int) -> None:
    """Raises ConfigError naming the first bad `distill.*` or `sft.*` field (it trains on SFT data)."""
    d = config.distill
    if not d.teacher:
        config_lib.fail('distill.teacher', d.teacher, "needs the teacher's run directory")
    if not 0 <= d.beta <= 1:
        config_lib.fail('distill.beta', d.beta, 'must be in [0, 1] (0 forward KL, 0.5 JSD, 1 reverse KL)')
    if not d.temperature > 0:
        config_lib.fail('distill.temperature', d.temperature, 'must be > 0')
    if d.ce_weight < 0:
        config_lib.fail('distill.ce_weight', d.ce_weight, 'must be >= 0')
    sft.validate(config, num_devices)


def build_stage(setup: loop.Setup) -> loop.Stage:
    """The loop's Stage for logit-level distillation: SFT data, teacher logits per batch."""
    config = setup.config
    try:
        teacher = loading.load(config.distill.teacher, what='distill.teacher')
    except (FileNotFoundError, ValueError) as e:
        config_lib.fail('distill.teacher', config.distill.teacher, f'cannot load the teacher: {e}')
    check_teacher(teacher, setup.tokenizer, setup.model_cfg, path=config.distill.teacher)
    base = sft.build_stage(setup)
    d = config.distill
    step = step_lib.make_accumulating_step(make_loss_fn(base.model, float(d.beta), d.temperature, d.ce_weight),
                                           setup.apply_gradients, config.train.micro_batches)
    return loop.Stage(model=base.model, train_step=step,
                      train_iter=WithTeacherLogits(base.train_iter, make_teacher_logits(teacher)),
                      eval_step=base.eval_step, eval_batches=base.eval_batches)


def run(config, workdir, devices=None) -> dict:
    """Distils `distill.teacher` into the student of `config` in `workdir`; returns the last metrics."""
    return loop.run(config, workdir, devices, build_stage=build_stage, validate=validate)

"""Distillation: generalised JSD against numpy at beta 0 / 0.5 / 1, the completion mask, a MoE teacher
into a dense student end to end, and the tokenizer-mismatch error."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dsjax import config as config_lib
from dsjax import presets
from dsjax.posttrain import distill, losses, sft
from dsjax.train import logger

REPO_FILE = __file__.replace('tests/posttrain/test_distill.py', 'experiments/x.py')


def _softmax(x):
    e = np.exp(x - x.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


def _kl(p, q):
    return (p * (np.log(p) - np.log(q))).sum(-1)


@pytest.mark.parametrize('beta', [0.0, 0.5, 1.0, 0.2])
@pytest.mark.parametrize('temperature', [1.0, 2.0])
def test_generalized_jsd_against_numpy(beta, temperature):
    rng = np.random.default_rng(0)
    student = rng.normal(size=(2, 3, 7)).astype(np.float32)
    teacher = rng.normal(size=(2, 3, 7)).astype(np.float32) * 2
    p, q = _softmax(teacher.astype(np.float64) / temperature), _softmax(student.astype(np.float64) / temperature)
    if beta == 0.0:
        expected = _kl(p, q)  # forward KL(teacher || student)
    elif beta == 1.0:
        expected = _kl(q, p)  # reverse KL(student || teacher)
    else:
        m = beta * p + (1 - beta) * q
        expected = beta * _kl(p, m) + (1 - beta) * _kl(q, m)
    got = losses.generalized_jsd(jnp.asarray(student), jnp.asarray(teacher), beta, temperature)
    np.testing.assert_allclose(np.asarray(got), expected, rtol=1e-5, atol=1e-7)
    if beta == 0.5:  # the symmetric Jensen-Shannon divergence, at most log 2
        swapped = losses.generalized_jsd(jnp.asarray(teacher), jnp.asarray(student), beta, temperature)
        np.testing.assert_allclose(np.asarray(swapped), np.asarray(got), rtol=1e-5)
        assert np.all(np.asarray(got) <= np.log(2) + 1e-6)


def test_distill_loss_is_masked_to_completion_tokens():
    rng = np.random.default_rng(1)
    student = rng.normal(size=(2, 4, 5)).astype(np.float32)
    teacher = rng.normal(size=(2, 4, 5)).astype(np.float32)
    weights = np.array([[0, 1, 1, 0], [0, 0, 1, 0]], np.float32)
    per_token = np.asarray(losses.generalized_jsd(student, teacher, 0.5))
    got = losses.distill_loss(student, teacher, weights, weights.sum(), 0.5)
    assert float(got) == pytest.approx(float((per_token * weights).sum() / 3), rel=1e-6)
    changed = student.copy()
    changed[weights == 0] = 9.0  # prompt and padding positions never count
    assert float(losses.distill_loss(changed, teacher, weights, weights.sum(), 0.5)) == pytest.approx(float(got))
    assert float(losses.distill_loss(teacher, teacher, weights, weights.sum(), 0.5)) == pytest.approx(0.0, abs=1e-6)


def _sft_config(experiment):
    c = presets.load_experiment(REPO_FILE, experiment, 'smoke')
    c.stage = 'sft'
    c.sft.update(source='cold_start', tasks=('arithmetic:1',), examples=32, val_examples=8)
    c.data.seq_len = 64
    c.model.max_position_embeddings = 128
    c.model.num_nextn_predict_layers = 0
    c.train.update(steps=2, eval_every=2, checkpoint_every=2, async_checkpoint=False, mtp_loss_weight=0.0,
                   mtp_loss_weight_final=0.0)
    c.optim.update(warmup_steps=0, decay_steps=2)
    c.mesh.data = 1
    return c


@pytest.fixture(scope='module')
def moe_teacher(tmp_path_factory):
    workdir = tmp_path_factory.mktemp('teacher')
    sft.run(_sft_config('v3_small'), workdir, devices=jax.devices()[:1])
    return workdir


def test_moe_teacher_into_dense_student(moe_teacher, tmp_path):
    c = _sft_config('llm_small')
    c.stage = 'distill'
    c.distill.update(teacher=str(moe_teacher), beta=0.5, temperature=1.0, ce_weight=0.1)
    c.train.micro_batches = 2
    last = distill.run(c, tmp_path, devices=jax.devices()[:1])
    assert np.isfinite(last['loss']) and last['jsd'] > 0
    steps = [r['step'] for r in logger.read_metrics(tmp_path) if 'val_loss' in r]
    assert steps == [0, 2]
    c.train.steps = 3  # resumes: the wrapped data iterator's position was checkpointed
    c.optim.decay_steps = 3
    distill.run(c, tmp_path, devices=jax.devices()[:1])
    assert (tmp_path / 'checkpoints' / '3').is_dir()


def test_different_tokenizers_are_refused(moe_teacher, tmp_path):
    c = _sft_config('llm_small')
    c.stage = 'distill'
    c.distill.teacher = str(moe_teacher)
    c.model.vocab_size = 384  # trains (and uses) another sentencepiece model
    with pytest.raises(config_lib.ConfigError, match=r"distill.teacher.*tokenizer differs"):
        distill.run(c, tmp_path, devices=jax.devices()[:1])

"""Bad configs fail before anything compiles, with an error naming the field."""
import pytest

from dsjax import config as config_lib
from dsjax import presets


def _v3_like():
    c = config_lib.base_config()
    m = c.model
    m.attention_type = 'mla'
    m.q_lora_rank, m.kv_lora_rank, m.qk_nope_head_dim, m.qk_rope_head_dim, m.v_head_dim = 32, 32, 16, 8, 16
    m.n_routed_experts, m.num_experts_per_tok, m.moe_intermediate_size = 8, 2, 32
    m.scoring_func, m.topk_method, m.n_group, m.topk_group = 'sigmoid', 'noaux_tc', 4, 2
    m.first_k_dense_replace = 1
    return c


BAD = [
    ('model.hidden_size', lambda c: c.model.update(hidden_size=0)),
    ('model.num_key_value_heads', lambda c: c.model.update(num_key_value_heads=3)),
    ('model.attention_type', lambda c: c.model.update(attention_type='flash')),
    ('model.dtype', lambda c: c.model.update(dtype='float64')),
    ('model.remat_policy', lambda c: c.model.update(remat_policy='some')),
    ('model.attention_impl', lambda c: c.model.update(attention_impl='flash')),
    ('model.attention_impl', lambda c: c.model.update(attention_impl='cudnn')),  # tests run on CPU
    ('model.rope_scaling.type', lambda c: c.model.rope_scaling.update(type='ntk')),
    ('model.rope_scaling.factor', lambda c: c.model.rope_scaling.update(type='yarn', factor=0.5)),
    ('model.rms_norm_eps', lambda c: c.model.update(rms_norm_eps=0.0)),
    ('data.seq_len', lambda c: c.data.update(seq_len=8192)),
    ('data.source', lambda c: c.data.update(source='s3')),
    ('data.paths', lambda c: c.data.update(source='text')),
    ('data.val_fraction', lambda c: c.data.update(val_fraction=1.5)),
    ('data.batch_size', lambda c: c.data.update(batch_size=12)),
    ('train.steps', lambda c: c.train.update(steps=-1)),
    ('train.mtp_loss_weight', lambda c: c.train.update(mtp_loss_weight=0.3)),
    ('optim.lr', lambda c: c.optim.update(lr=-1.0)),
    ('optim.schedule', lambda c: c.optim.update(schedule='linear')),
    ('mesh.tensor', lambda c: c.mesh.update(tensor=8, data=1)),
    ('mesh', lambda c: c.mesh.update(data=2, fsdp=2)),
    ('mesh.expert', lambda c: c.mesh.update(expert=2)),
]

BAD_MOE = [
    ('model.num_experts_per_tok', lambda c: c.model.update(num_experts_per_tok=9, topk_group=4)),
    ('model.n_group', lambda c: c.model.update(n_group=3)),
    ('model.topk_group', lambda c: c.model.update(topk_group=5)),
    ('model.topk_group', lambda c: c.model.update(n_group=8, topk_group=1, num_experts_per_tok=2)),
    ('model.scoring_func', lambda c: c.model.update(scoring_func='softmax')),
    ('model.qk_rope_head_dim', lambda c: c.model.update(qk_rope_head_dim=7)),
]


@pytest.mark.parametrize('field,mutate', BAD, ids=[f for f, _ in BAD])
def test_bad_config_names_field(field, mutate):
    c = config_lib.base_config()
    mutate(c)
    with pytest.raises(config_lib.ConfigError, match=f'config.{field}='):
        config_lib.validate(c, num_devices=8)


@pytest.mark.parametrize('field,mutate', BAD_MOE, ids=[f for f, _ in BAD_MOE])
def test_bad_moe_config_names_field(field, mutate):
    c = _v3_like()
    mutate(c)
    with pytest.raises(config_lib.ConfigError, match=f'config.{field}='):
        config_lib.validate(c, num_devices=8)


def test_expert_axis_must_divide_experts():
    c = _v3_like()
    c.mesh.update(expert=8, data=1)
    c.model.n_routed_experts, c.model.n_group = 12, 4
    with pytest.raises(config_lib.ConfigError, match='config.mesh.expert=8'):
        config_lib.validate(c, num_devices=8)


def test_valid_configs_pass_and_mesh_fills():
    config_lib.validate(config_lib.base_config(), num_devices=8)
    config_lib.validate(_v3_like(), num_devices=8)
    c = config_lib.base_config()
    c.mesh.update(data=-1, fsdp=2, tensor=2)
    assert config_lib.mesh_shape(c.mesh, 8) == {'data': 2, 'fsdp': 2, 'expert': 1, 'tensor': 2}


def test_unknown_model_field_is_named():
    c = config_lib.base_config()
    c.model.unlock()
    c.model.num_layers = 3
    with pytest.raises(config_lib.ConfigError, match='config.model.num_layers='):
        config_lib.freeze_model(c.model)


@pytest.mark.parametrize('old,new', [('group_size', 'num_generations'), ('max_new_tokens', 'max_completion_length'),
                                     ('updates_per_batch', 'num_iterations'), ('eps_low', 'epsilon'),
                                     ('aggregation', 'loss_type'), ('reward_names', 'reward_funcs')])
def test_a_renamed_grpo_field_points_to_its_new_name(old, new):
    c = config_lib.base_config()
    c.grpo[old] = 8
    with pytest.raises(config_lib.ConfigError, match=f'config.grpo.{old}=8 is invalid: renamed to config.grpo.{new}'):
        config_lib.validate(c, num_devices=8)


def test_an_unknown_field_of_any_section_is_named():
    c = config_lib.base_config()
    c.train.stepz = 10
    with pytest.raises(config_lib.ConfigError, match=r'config.train.stepz=10 is invalid: unknown field; the fields'):
        config_lib.validate(c, num_devices=8)


def test_decay_steps_follows_train_steps_until_set():
    """The cosine schedule ends where training ends, whichever of the two a user overrides, unless
    decay_steps is set itself (then it stays, and train.steps moves alone)."""
    c = presets.load_experiment(__file__.replace('tests/test_config.py', 'experiments/x.py'), 'v3_small')
    assert c.optim.decay_steps == c.train.steps == 300
    c.train.steps = 1000  # what --config.train.steps=1000 does
    assert c.optim.decay_steps == 1000
    c.optim.decay_steps = 500
    c.train.steps = 2000
    assert (c.optim.decay_steps, c.train.steps) == (500, 2000)
    smoke = presets.load_experiment(__file__.replace('tests/test_config.py', 'experiments/x.py'), 'v3_small',
                                       'smoke')
    assert smoke.optim.decay_steps == smoke.train.steps == 4
    assert config_lib.base_config().copy_and_resolve_references().optim.decay_steps == 1000


def test_a_schedule_shorter_than_training_is_reported(caplog):
    c = config_lib.base_config()
    c.optim.decay_steps = 300
    with caplog.at_level('WARNING'):
        config_lib.validate(c, 8)
    assert 'config.optim.decay_steps=300 < train.steps=1000' in caplog.text and 'last 700 steps' in caplog.text

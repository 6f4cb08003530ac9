"""Invalid inputs fail early with a message naming the field: a table of bad configs, and data faults."""
import os
import re
import subprocess
import sys

import pytest

from dsjax import config as config_lib
from dsjax.data import corpus

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _dense():
    return config_lib.base_config()


def _mla_moe():
    """A small V3-like config (MLA, sigmoid group-limited routing) that validates on 8 devices."""
    c = config_lib.base_config()
    m = c.model
    m.attention_type = 'mla'
    m.q_lora_rank, m.kv_lora_rank, m.qk_nope_head_dim, m.qk_rope_head_dim, m.v_head_dim = 32, 32, 16, 8, 16
    m.n_routed_experts, m.num_experts_per_tok, m.moe_intermediate_size = 8, 2, 32
    m.scoring_func, m.topk_method, m.n_group, m.topk_group = 'sigmoid', 'noaux_tc', 4, 2
    m.first_k_dense_replace = 1
    return c


def _set(section, **values):
    """A mutation that sets `values` in `config.<section>` (dotted for nested sections)."""

    def mutate(c):
        target = c
        for part in section.split('.'):
            target = target[part]
        target.update(**values)

    return mutate


def _mesh(**sizes):
    return _set('mesh', **{**dict(data=1, fsdp=1, expert=1, tensor=1), **sizes})


# (field named by the error, base config, mutation, number of devices). tests/test_config.py holds
# another table; none of these repeats one of its cases.
BAD = [
    # Types that ConfigDict lets through (None, or a bool where an int belongs).
    ('model.hidden_size', _dense, _set('model', hidden_size=None), 8),
    ('train.steps', _dense, _set('train', steps=True), 8),
    ('model.rms_norm_eps', _dense, _set('model', rms_norm_eps=None), 8),
    ('model.dtype', _dense, _set('model', dtype=None), 8),
    ('optim.lr', _dense, _set('optim', lr=None), 8),
    ('mesh.data', _dense, _set('mesh', data=None), 8),
    ('data.paths', _dense, _set('data', source='text', paths=('a.txt', 3)), 8),
    ('optim.milestones', _dense, _set('optim', milestones=(0.8, 'late')), 8),
    ('model.rope_scaling.factor', _dense, _set('model.rope_scaling', factor=None), 8),
    # Ranges and choices.
    ('model.vocab_size', _dense, _set('model', vocab_size=0), 8),
    ('model.intermediate_size', _dense, _set('model', intermediate_size=-8), 8),
    ('model.initializer_range', _dense, _set('model', initializer_range=0.0), 8),
    ('model.rope_theta', _dense, _set('model', rope_theta=-1.0), 8),
    ('model.head_dim', _dense, _set('model', head_dim=7), 8),
    ('model.num_nextn_predict_layers', _dense, _set('model', num_nextn_predict_layers=-1), 8),
    ('data.max_doc_chars', _dense, _set('data', max_doc_chars=0), 8),
    ('data.shuffle_seed', _dense, _set('data', shuffle_seed=-1), 8),
    ('data.shuffle_window', _dense, _set('data', shuffle_window=0), 8),
    ('data.fim_rate', _dense, _set('data', fim_rate=1.5), 8),
    ('train.micro_batches', _dense, _set('train', micro_batches=3), 8),
    ('model.qkv_bias', _mla_moe, _set('model', qkv_bias=True), 8),
    ('model.rope_scaling.high_freq_factor', _dense, _set('model.rope_scaling', type='llama3', high_freq_factor=0.5), 8),
    ('data.tokenizer', _dense, _set('data', tokenizer='bpe'), 8),
    ('data.worked_fraction', _dense, _set('data', source='tasks', worked_fraction=1.5), 8),
    ('train.keep_checkpoints', _dense, _set('train', keep_checkpoints=0), 8),
    ('train.nonfinite_policy', _dense, _set('train', nonfinite_policy='ignore'), 8),
    ('train.bias_update_until', _dense, _set('train', bias_update_until=1.5), 8),
    ('train.peak_flops', _dense, _set('train', peak_flops=-1.0), 8),
    ('optim.b2', _dense, _set('optim', b2=1.0), 8),
    ('optim.clip_norm', _dense, _set('optim', clip_norm=-1.0), 8),
    ('optim.warmup_steps', _dense, _set('optim', warmup_steps=-5), 8),
    ('model.capacity_factor', _mla_moe, _set('model', capacity_factor=-1.0), 8),
    ('model.moe_intermediate_size', _mla_moe, _set('model', moe_intermediate_size=0), 8),
    # Cross-field rules.
    ('model.head_dim', _dense, _set('model', hidden_size=250), 8),
    ('model.rope_scaling.beta_fast', _dense, _set('model.rope_scaling', type='yarn', factor=4.0, beta_fast=0.5), 8),
    ('optim.decay_steps', _dense, _set('optim', warmup_steps=100, decay_steps=100), 8),
    ('data.tokenizer_path', _dense, _set('data', tokenizer='hf'), 8),
    ('model.first_k_dense_replace', _mla_moe, _set('model', first_k_dense_replace=5), 8),
    ('model.n_group', _mla_moe, _set('model', n_group=8, topk_group=2), 8),
    ('model.kv_lora_rank', _mla_moe, _set('model', kv_lora_rank=0), 8),
    # Sequence length against positions: MLA without YaRN.
    ('data.seq_len', _mla_moe, lambda c: (c.model.update(max_position_embeddings=256), c.data.update(seq_len=512)), 8),
    # Mesh against the device count.
    ('mesh.data', _dense, _set('mesh', data=-1, fsdp=3), 8),
    ('mesh.fsdp', _dense, _set('mesh', data=-1, fsdp=-1), 8),
    ('mesh.tensor', _dense, _set('mesh', tensor=0), 8),
    ('mesh', _dense, _mesh(data=8), 4),
    ('mesh.tensor', _dense, lambda c: (c.model.update(num_key_value_heads=2), _mesh(data=2, tensor=4)(c)), 8),
    # Batch against the data-parallel size.
    ('data.batch_size', _dense, lambda c: (c.data.update(batch_size=6), _mesh(data=2, fsdp=2, tensor=2)(c)), 8),
    ('data.batch_size', _mla_moe, lambda c: (c.data.update(batch_size=4), _mesh(expert=8)(c)), 8),
]


@pytest.mark.parametrize('field,base,mutate,devices', BAD, ids=[f'{i:02d}-{case[0]}' for i, case in enumerate(BAD)])
def test_invalid_config_names_the_field(field, base, mutate, devices):
    c = base()
    config_lib.validate(c, num_devices=devices)  # the base is valid: the mutation alone is at fault
    mutate(c)
    with pytest.raises(config_lib.ConfigError, match=f'config.{field}=') as e:
        config_lib.validate(c, num_devices=devices)
    assert 'is invalid:' in str(e.value)


def test_table_covers_at_least_25_cases():
    assert len(BAD) >= 25


def test_valid_corner_cases_pass():
    c = _mla_moe()
    c.model.max_position_embeddings, c.data.seq_len = 256, 512
    c.model.rope_scaling.update(type='yarn', factor=2.0, original_max_position_embeddings=256)
    config_lib.validate(c, num_devices=8)  # YaRN extends the positions
    c = _dense()
    c.model.update(num_key_value_heads=2)
    c.mesh.update(data=-1, tensor=2)
    config_lib.validate(c, num_devices=8)
    c.train.nonfinite_policy = 'skip'
    config_lib.validate(c, num_devices=8)


def _data(tmp_path, **overrides):
    c = config_lib.base_config().data
    c.update(source='text', paths=(str(tmp_path / '*.txt'),), val_fraction=0.5, max_doc_chars=50)
    c.update(**overrides)
    return c


def test_data_faults_are_counted_or_named(tmp_path, caplog):
    (tmp_path / 'empty.txt').write_text('  \n')
    (tmp_path / 'latin1.txt').write_bytes('caf\xe9 au lait\n'.encode('latin-1') * 3)
    (tmp_path / 'long.txt').write_text('a line of text\n' * 40)  # 600 chars > max_doc_chars=50
    (tmp_path / 'ok.txt').write_text('plain text\n')
    os.symlink(tmp_path / 'gone.bin', tmp_path / 'dangling.txt')
    with pytest.raises(corpus.DataError, match="data.paths: cannot read .*dangling.txt"):
        corpus.load_documents(_data(tmp_path), 'train')
    os.remove(tmp_path / 'dangling.txt')
    docs = corpus.load_documents(_data(tmp_path), 'train') + corpus.load_documents(_data(tmp_path), 'validation')
    names = {d.name.split('#')[0] for d in docs}
    assert names == {'latin1.txt', 'long.txt', 'ok.txt'}  # the empty file is skipped
    assert all(len(d.text) <= 50 for d in docs)  # the long document is split, not dropped or crashed on
    assert any('\ufffd' in d.text for d in docs)  # bad bytes become U+FFFD
    with pytest.raises(corpus.DataError, match='data.paths:.*missing.txt.*file does not exist'):
        corpus.load_documents(_data(tmp_path, paths=(str(tmp_path / 'missing.txt'),)), 'train')


def test_main_reports_bad_inputs_without_a_traceback(tmp_path):
    """The entry point turns data and config faults into one line on stderr and exit status 1."""
    cases = [
        (['--config.data.source=text', f'--config.data.paths=("{tmp_path}/none/*.txt",)'],
         'data.paths:.*glob matches no file'),
        (['--config.train.nonfinite_policy=ignore'], 'config.train.nonfinite_policy='),
    ]
    env = {**os.environ, 'JAX_PLATFORMS': 'cpu'}
    for flags, message in cases:
        proc = subprocess.run(
            [sys.executable, '-m', 'dsjax.main', '--config=experiments/llm_small.py:smoke',
             f'--workdir={tmp_path / "run"}', *flags],
            cwd=REPO, env=env, capture_output=True, text=True, timeout=240)
        assert proc.returncode == 1, proc.stderr[-2000:]
        assert 'Traceback' not in proc.stderr, proc.stderr[-2000:]
        last = proc.stderr.strip().splitlines()[-1]
        assert last.startswith('error: ') and re.search(message, last), last

"""Chains: references between stages, 'scratch', evaluation table, and a resumed chain skips finished work."""
import json

import ml_collections
import pytest

from dsjax import config as config_lib
from dsjax import presets
from dsjax import stages
from dsjax.posttrain import chain

REPO_FILE = __file__.replace('tests/posttrain/test_chain.py', 'experiments/x.py')


def test_references_name_earlier_stage_directories():
    c = config_lib.base_config()
    c.sft.paths = ('{rs}/samples.jsonl', 'plain.jsonl')
    c.distill.teacher = '{teacher}'
    c.init.checkpoint = 'scratch'
    chain.resolve_references(c, {'rs': '/w/rs', 'teacher': '/w/teacher'})
    assert c.sft.paths == ('/w/rs/samples.jsonl', 'plain.jsonl')
    assert c.distill.teacher == '/w/teacher'
    assert c.init.checkpoint == ''
    c.init.checkpoint = '{later}'
    with pytest.raises(ValueError, match=r"config.init.checkpoint='\{later\}' names stage 'later'"):
        chain.resolve_references(c, {'rs': '/w/rs'})


def _sft_stage(steps=2):
    c = presets.load_experiment(REPO_FILE, 'llm_small', 'smoke')
    c.stage = 'sft'
    c.sft.update(source='cold_start', tasks=('arithmetic:1',), examples=16, val_examples=8)
    c.data.seq_len = 64
    c.model.max_position_embeddings = 128
    c.train.update(steps=steps, eval_every=steps, checkpoint_every=steps, async_checkpoint=False)
    c.optim.update(warmup_steps=0, decay_steps=steps)
    return c


def _chain():
    c = ml_collections.ConfigDict()
    c.stage = 'chain'
    c.chain = ('first', 'second')
    c.stages = ml_collections.ConfigDict({'first': _sft_stage(), 'second': _sft_stage()})
    c.stages.first.init.checkpoint = 'scratch'
    c.evaluation = ml_collections.ConfigDict(dict(stages=('first', 'second'), tasks=('arithmetic:1',), problems=8,
                                                  template='chat', max_new_tokens=4, batch_size=8, val_loss=True,
                                                  seq_len=64))
    return c


def test_unknown_reference_is_a_config_error_naming_the_stage(tmp_path):
    c = _chain()
    c.stages.second.sft.update(source='jsonl', paths=('{nope}/samples.jsonl',))
    with pytest.raises(config_lib.ConfigError, match="stage 'second'.*'nope'"):
        stages.chain_configs(c, tmp_path)


def test_a_bad_field_of_a_later_stage_fails_before_the_first_stage_runs(tmp_path):
    c = _chain()
    c.stages.second.stage = 'grpo'
    c.stages.second.grpo.update(batch_size=12, num_generations=8)
    with pytest.raises(config_lib.ConfigError, match="stage 'second'.*config.grpo.batch_size=12"):
        stages.run(c, tmp_path / 'chain')
    assert not (tmp_path / 'chain').exists()


def test_chain_runs_evaluates_and_resumes(tmp_path):
    c = _chain()
    configs = stages.chain_configs(c, tmp_path)
    assert configs[1][1].init.checkpoint == str(tmp_path / 'first')
    stages.run(c, tmp_path)
    table = json.loads((tmp_path / 'table.json').read_text())
    assert set(table['stages']) == {'first', 'second'}
    for row in table['stages'].values():
        assert 0 <= row['accuracy'] <= 1 and 0 <= row['format_rate'] <= 1 and row['problems'] == 8
        assert row['task_val_loss'] > 0
    assert '| first |' in (tmp_path / 'table.md').read_text()
    saved = sorted(p.name for p in (tmp_path / 'second' / 'checkpoints').iterdir())
    stages.run(c, tmp_path)  # finished: nothing is trained or evaluated again
    assert sorted(p.name for p in (tmp_path / 'second' / 'checkpoints').iterdir()) == saved
    assert json.loads((tmp_path / 'table.json').read_text())['stages'] == table['stages']


def test_a_stage_stopped_by_a_signal_stops_the_chain(tmp_path, monkeypatch):
    from dsjax.train import loop
    ran = []

    def fake(config, workdir):
        ran.append(workdir.name)
        return {loop.STOPPED: 'SIGTERM'} if workdir.name == 'first' else {}

    monkeypatch.setitem(stages.RUNNERS, 'sft', fake)
    c = _chain()
    del c.evaluation
    stages.run(c, tmp_path)
    assert ran == ['first']


def test_table_reports_the_share_of_the_gap_each_stage_closes(tmp_path):
    rows = {'teacher': {'accuracy': 0.9}, 'alone': {'accuracy': 0.1}, 'distilled': {'accuracy': 0.7}}
    text = chain.write_table(tmp_path, rows, {}, gap=('alone', 'teacher'))
    assert '| distilled | 0.700 |  |  |  | 0.750 |' in text  # (0.7 - 0.1) / (0.9 - 0.1)
    assert json.loads((tmp_path / 'table.json').read_text())['stages']['teacher']['gap_closed'] == 1.0
    # Until both ends are evaluated (or when they tie) there is no gap to report.
    assert chain.gap_closed({'alone': {'accuracy': 0.1}}, ('alone', 'teacher')) == {}
    assert chain.gap_closed({'a': {'accuracy': 0.5}, 'b': {'accuracy': 0.5}}, ('a', 'b')) == {}

"""Rejection sampling: the filter (correct, ended within max_tokens, not a duplicate) and the stage's files."""
import json

import jax
import pytest

from dsjax import config as config_lib
from dsjax import presets
from dsjax.data import chat, tasks
from dsjax.posttrain import rejection, sft


def test_select_keeps_correct_ended_short_unique_answers():
    problems = tasks.make_problems('arithmetic', 'train', 2, level=1) + tasks.make_problems('countdown', 'train', 1, 2)
    good = [tasks.worked_solution(p) for p in problems]
    records = [
        {'problem': 0, 'completion': good[0], 'tokens': 10, 'ended': True},  # kept
        {'problem': 0, 'completion': good[0], 'tokens': 10, 'ended': True},  # duplicate
        {'problem': 0, 'completion': '<think> x </think> <answer> -1 </answer>', 'tokens': 9, 'ended': True},
        {'problem': 1, 'completion': good[1], 'tokens': 30, 'ended': True},  # overlong
        {'problem': 1, 'completion': good[1], 'tokens': 12, 'ended': False},  # cut off: overlong too
        {'problem': 2, 'completion': good[2], 'tokens': 20, 'ended': True},  # kept
    ]
    kept, stats = rejection.select(problems, records, max_tokens=20)
    assert [r['problem'] for r in kept] == [0, 2]
    assert stats['dropped'] == {'duplicate': 1, 'incorrect': 1, 'overlong': 2}
    assert stats['kept_fraction'] == pytest.approx(2 / 6)
    assert stats['prompts_with_a_kept_answer'] == pytest.approx(2 / 3)
    assert stats['per_level']['arithmetic:1']['kept_fraction'] == pytest.approx(1 / 5)
    assert stats['per_level']['countdown:2']['prompts_with_a_kept_answer'] == 1.0
    kept_all, stats_all = rejection.select(problems, records, max_tokens=20, keep='all')
    assert [r['problem'] for r in kept_all] == [0, 0, 2]  # the incorrect answer too, still graded
    assert stats_all['correct_fraction'] == stats['correct_fraction'] and 'incorrect' not in stats_all['dropped']


def test_bad_fields_are_named():
    c = config_lib.base_config()
    c.init.checkpoint = 'somewhere'
    c.rejection.samples = 0
    with pytest.raises(config_lib.ConfigError, match='rejection.samples'):
        rejection.validate(c, 1)
    c.rejection.samples = 2
    c.rejection.template = 'fancy'
    with pytest.raises(config_lib.ConfigError, match='rejection.template'):
        rejection.validate(c, 1)
    c.rejection.template = 'chat'
    c.rejection.keep = 'some'
    with pytest.raises(config_lib.ConfigError, match='rejection.keep'):
        rejection.validate(c, 1)
    c.rejection.keep = 'correct'
    c.init.checkpoint = ''
    with pytest.raises(config_lib.ConfigError, match='init.checkpoint'):
        rejection.validate(c, 1)


def test_stage_writes_an_sft_set_and_statistics(tmp_path):
    c = presets.load_experiment(__file__.replace('tests/posttrain/test_rejection.py', 'experiments/x.py'),
                                   'llm_small', 'smoke')
    c.stage = 'sft'
    c.sft.update(source='cold_start', tasks=('arithmetic:1',), examples=16, val_examples=8)
    c.data.seq_len = 64
    c.model.max_position_embeddings = 128
    c.train.update(steps=1, eval_every=1, checkpoint_every=1, async_checkpoint=False)
    c.optim.update(warmup_steps=0, decay_steps=1)
    c.mesh.data = 1
    sft.run(c, tmp_path / 'policy', devices=jax.devices()[:1])
    c.stage = 'rejection'
    c.init.checkpoint = str(tmp_path / 'policy')
    c.rejection.update(tasks=('arithmetic:1',), prompts=3, samples=2, max_new_tokens=6, max_tokens=6, batch=2)
    stats = rejection.run(c, tmp_path / 'rs')
    assert stats['prompts'] == 3 and stats['samples'] == 6
    assert stats['kept'] + sum(stats['dropped'].values()) == 6
    assert json.loads((tmp_path / 'rs' / rejection.STATS_FILE).read_text())['samples'] == 6
    assert len(chat.read_conversations(tmp_path / 'rs' / rejection.SAMPLES_FILE)) == stats['kept']

"""Ablation sweeps (dsjax/sweep.py): every run validated before any starts, one command per run,
finished runs skipped, interrupted ones resumed, and the report's tables and plots written."""
import csv
import json
import os
import pathlib
import shlex
import signal
import subprocess
import sys
import time

import pytest

from dsjax import config as config_lib
from dsjax import sweep as sweep_lib
from dsjax.train import logger

ROOT = pathlib.Path(__file__).resolve().parents[1]
SMOKE = f'{ROOT}/experiments/v3_small.py:smoke'
SHIPPED = sorted((ROOT / 'experiments' / 'sweeps').glob('*.py'))


def _write_sweep(tmp_path, **sweep) -> pathlib.Path:
    path = tmp_path / 'sweep.py'
    path.write_text(f'def get_sweep():\n    return {sweep!r}\n')
    return path


def _plan(tmp_path, **sweep):
    return sweep_lib.plan(sweep_lib.load_sweep(str(_write_sweep(tmp_path, **sweep))), tmp_path / 'out')


def _cli(*args, **kwargs):
    return subprocess.run([sys.executable, '-m', 'dsjax.sweep', *args], capture_output=True, text=True, cwd=ROOT,
                          **kwargs)


@pytest.mark.parametrize('field, message', [
    ('model.no_such_field', r"config\.model\.no_such_field does not exist; the fields of config\.model are \["),
    ('modle.hidden_size', r"config\.modle\.hidden_size does not exist \(config has no section 'modle'"),
    ('model', r'config\.model is a section; override its fields'),
])
def test_unknown_field_fails_naming_it_before_any_run(tmp_path, field, message):
    variants = {'ok': {'train.steps': 3}, 'bad': {field: 1}}
    with pytest.raises(sweep_lib.SweepError, match=r"run 'bad' seed 0: " + message):
        _plan(tmp_path, base=SMOKE, variants=variants)
    assert not (tmp_path / 'out').exists()


@pytest.mark.parametrize('overrides, message', [
    ({'model.attention_type': 'gqa'}, r"config\.model\.attention_type='gqa' is invalid: must be one of"),
    ({'train.steps': 'many'}, r"config\.train\.steps='many' is invalid"),
    ({'model.num_experts_per_tok': 16}, r'config\.model\.num_experts_per_tok=16 is invalid: must be <= '),
])
def test_bad_value_fails_naming_run_and_field(tmp_path, overrides, message):
    with pytest.raises(sweep_lib.SweepError, match=r"run 'x' seed 1: " + message):
        _plan(tmp_path, base=SMOKE, variants={'x': overrides}, seeds=[1])


@pytest.mark.parametrize('sweep', [dict(seeds=[]), dict(variants={}), dict(product={'train.seed': []})])
def test_zero_runs_fail(tmp_path, sweep):
    with pytest.raises(sweep_lib.SweepError, match='the sweep has zero runs'):
        _plan(tmp_path, base=SMOKE, **sweep)


def test_sweep_file_errors(tmp_path):
    with pytest.raises(sweep_lib.SweepError, match=r"key 'seed' is unknown; valid keys: \('base'"):
        _plan(tmp_path, base=SMOKE, seed=[0])
    with pytest.raises(sweep_lib.SweepError, match=r"needs 'base'"):
        _plan(tmp_path, seeds=[0])
    with pytest.raises(sweep_lib.SweepError, match=r"base='nowhere\.py': nowhere\.py does not exist"):
        _plan(tmp_path, base='nowhere.py')
    with pytest.raises(sweep_lib.SweepError, match=r'metrics=\[\] is invalid: give one or more metric names'):
        _plan(tmp_path, base=SMOKE, metrics=[])
    with pytest.raises(sweep_lib.SweepError, match=r'no such sweep file'):
        sweep_lib.load_sweep(str(tmp_path / 'missing.py'))


def test_product_crosses_variants_and_seeds(tmp_path):
    runs = _plan(tmp_path, base=SMOKE, variants={'a': {}, 'b': {'train.bias_update_rate': 0.0}},
                 product={'model.aux_loss_alpha': [0.0, 0.01], 'data.seq_len': [16, 32]}, seeds=[0, 7])
    assert len(runs) == 2 * 4 * 2
    assert runs[0].variant == 'a, aux_loss_alpha=0.0, seq_len=16'
    last = runs[-1]
    assert (last.variant, last.seed) == ('b, aux_loss_alpha=0.01, seq_len=32', 7)
    assert (last.config.model.aux_loss_alpha, last.config.data.seq_len, last.config.train.seed,
            last.config.data.shuffle_seed, last.config.train.bias_update_rate) == (0.01, 32, 7, 7, 0.0)
    assert len({r.workdir for r in runs}) == len(runs)


def test_config_drift_names_the_fields_a_run_was_started_with_differently(tmp_path):
    run = _plan(tmp_path, base=SMOKE)[0]
    assert run.config_drift() == []  # never started
    saved = json.loads(run.config.to_json_best_effort())
    saved['train']['steps'] = 99
    del saved['data']['shuffle_seed']
    run.workdir.mkdir(parents=True)
    (run.workdir / 'config.json').write_text(json.dumps(saved))
    assert run.config_drift() == ['data.shuffle_seed', 'train.steps']


def test_print_emits_one_command_per_run_that_main_parses_back(tmp_path):
    """--print starts nothing; each line is a dsjax.main command whose flags rebuild the planned config."""
    from absl import flags
    from ml_collections import config_flags

    path = _write_sweep(tmp_path, base=SMOKE, variants={'mha': {'model.attention_type': 'mha', 'model.head_dim': 8},
                                                         'bias off': {'train.bias_update_rate': 0.0}},
                        seeds=[0, 1], overrides={'data.paths': ('a.txt',), 'model.norm_topk_prob': False})
    out = _cli(f'--config={path}', f'--workdir={tmp_path / "sw"}', '--print')
    assert out.returncode == 0, out.stderr
    lines = out.stdout.strip().splitlines()
    assert len(lines) == 4 and all(line.startswith('python -m dsjax.main --config=') for line in lines)
    assert not (tmp_path / 'sw').exists()
    planned = sweep_lib.plan(sweep_lib.load_sweep(str(path)), tmp_path / 'sw')
    for line, run in zip(lines, planned):
        args = shlex.split(line)[3:]
        argv = ['main', *args]
        fv = flags.FlagValues()
        config_flags.DEFINE_config_file('config', None, flag_values=fv, lock_config=True, sys_argv=argv)
        flags.DEFINE_string('workdir', None, '', flag_values=fv)
        fv(argv)
        assert fv.config.to_dict() == run.config.to_dict()
        assert fv.workdir == str(run.workdir)


def test_cli_errors_before_any_run(tmp_path):
    path = _write_sweep(tmp_path, base=SMOKE, variants={'typo': {'train.bias_update_rat': 0.0}})
    out = _cli(f'--config={path}', f'--workdir={tmp_path / "sw"}')
    assert out.returncode != 0
    assert "error: run 'typo' seed 0: config.train.bias_update_rat does not exist" in out.stderr
    assert not (tmp_path / 'sw').exists()


@pytest.mark.parametrize('path', SHIPPED, ids=lambda p: p.stem)
def test_shipped_sweeps_validate_and_document_their_claim(path):
    sweep = sweep_lib.load_sweep(str(path))
    import jax

    runs = sweep_lib.plan(sweep, '/tmp/unused', num_devices=jax.device_count())
    assert len({r.variant for r in runs}) >= 2 and len({r.seed for r in runs}) == 3
    doc = path.read_text().split('"""')[1]
    for heading in ('Claim', 'Run:', 'Expect:'):
        assert heading in doc, f'{path.name} docstring lacks {heading!r}'
    assert f'--config=experiments/sweeps/{path.name}' in doc


def _derived(path, metric):
    sweep = sweep_lib.load_sweep(str(ROOT / 'experiments' / 'sweeps' / path))
    runs = sweep_lib.plan(sweep, '/tmp/unused', num_devices=8)
    return {r.variant: sweep_lib.DERIVED_METRICS[metric](config_lib.freeze_model(r.config.model)) for r in runs}


def test_attention_sweep_matches_parameters_and_orders_the_cache():
    params = _derived('attention.py', 'params')
    assert max(params.values()) / min(params.values()) < 1.001
    cache = _derived('attention.py', 'kv_cache_bytes_per_token')
    # float32, 4 layers: MLA (64 latent + 16 rope) x 4 B; GQA 2 x 2 x 48 x 4 B; MHA 2 x 4 x 36 x 4 B.
    assert cache == {'MLA': 4 * 80 * 4, 'GQA (2 kv heads)': 4 * 2 * 2 * 48 * 4, 'MHA': 4 * 2 * 4 * 36 * 4}


def test_experts_sweep_keeps_activated_parameters():
    activated = _derived('experts.py', 'activated_params')
    assert max(activated.values()) / min(activated.values()) < 1.02  # the router's d x E weights only


def _wait_for(predicate, timeout: float, what: str):
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f'timed out waiting for {what}')
        time.sleep(0.05)


def _logged_train_step(workdir: pathlib.Path) -> bool:
    try:
        return any('loss' in r for r in logger.read_metrics(workdir))
    except FileNotFoundError:
        return False


@pytest.mark.slow
def test_interrupted_sweep_resumes_without_redoing_finished_runs_then_reports(tmp_path):
    """Run 1 finishes, run 2 is stopped by SIGTERM part-way; the relaunch skips run 1 (its files are
    untouched), resumes run 2 from its saved step, and writes the tables and plots."""
    path = _write_sweep(
        tmp_path, base=SMOKE, seeds=[0],
        overrides={'train.checkpoint_every': 10_000, 'train.eval_every': 10_000, 'train.log_every': 5},
        variants={'short': {'train.steps': 3, 'optim.decay_steps': 3},
                  'long, no bias': {'train.steps': 200, 'optim.decay_steps': 200, 'train.bias_update_rate': 0.0}},
        metrics=['val_loss', 'maxvio_global', 'kv_cache_bytes_per_token'])
    out_dir = tmp_path / 'sw'
    first, second = (out_dir / 'short' / 'seed_0', out_dir / 'long_no_bias' / 'seed_0')
    args = [sys.executable, '-m', 'dsjax.sweep', f'--config={path}', f'--workdir={out_dir}']
    proc = subprocess.Popen(args, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env={**os.environ, 'JAX_PLATFORMS': 'cpu'})
    try:
        _wait_for(lambda: _logged_train_step(second), 600, 'run 2 to train')
        proc.send_signal(signal.SIGTERM)
        output, _ = proc.communicate(timeout=300)
    finally:
        proc.kill()
    assert proc.returncode != 0, output
    assert '[1/2] short (seed 0): done' in output
    assert '[2/2] long, no bias (seed 0): stopped by signal SIGTERM at step' in output, output
    saved = sweep_lib.Run('', 0, {}, None, second).finished_step()
    assert saved is not None and 0 < saved < 200
    before = {p: p.read_bytes() for p in first.rglob('*') if p.is_file()}

    again = subprocess.run(args, cwd=ROOT, capture_output=True, text=True)
    assert again.returncode == 0, again.stdout + again.stderr
    assert '[1/2] short (seed 0): finished (step 3), skipped' in again.stdout
    assert f'[2/2] long, no bias (seed 0): resuming from step {saved}' in again.stdout
    assert {p: p.read_bytes() for p in first.rglob('*') if p.is_file()} == before
    records = logger.read_metrics(second)
    assert records[-1]['step'] == 200 and 'val_loss' in records[-1]
    assert json.loads((second / 'config.json').read_text())['train']['steps'] == 200

    for name in ('report.md', 'runs.csv', 'summary.csv', 'loss_curves.png', 'metrics.png', 'expert_load.png'):
        assert (out_dir / name).stat().st_size > 0, name
    with open(out_dir / 'runs.csv') as f:
        rows = list(csv.DictReader(f))
    assert [r['variant'] for r in rows] == ['short', 'long, no bias']
    assert float(rows[1]['val_loss']) < float(rows[0]['val_loss'])  # 200 steps beat 3
    assert float(rows[0]['kv_cache_bytes_per_token']) == 3 * (32 + 8) * 4  # smoke MLA: 3 layers, fp32
    report = (out_dir / 'report.md').read_text()
    assert '| variant | val_loss | maxvio_global | kv_cache_bytes_per_token |' in report
    assert '![expert load](expert_load.png)' in report

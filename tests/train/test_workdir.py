"""Workdirs wherever etils.epath reaches, on a fake gs:// (fsspec's in-memory filesystem registered as
GCS): the run's config.json, metrics.jsonl (appended although object stores cannot append), expert
loads, the checkpoint directory scan and the report; a scheme without its package is one clear error."""
import json
import pathlib

from etils import epath
import fsspec
from fsspec.implementations.memory import MemoryFileSystem
import numpy as np
import pytest

from dsjax import presets, report, stages
from dsjax import sweep as sweep_lib
from dsjax.posttrain import chain
from dsjax.train import checkpoint, logger, loop
from dsjax.train import workdir as workdir_lib

ROOT = pathlib.Path(__file__).resolve().parents[2]


class _FakeGCS(MemoryFileSystem):
    """In memory, under the gs:// protocol epath reads GCS through."""
    protocol = ('gcs', 'gs')

    def __init__(self, *args, finalize_on_close=False, **kwargs):
        del finalize_on_close  # gcsfs's option, which epath passes
        super().__init__(*args, **kwargs)

    @classmethod
    def _strip_protocol(cls, path):
        path = str(path)
        for prefix in ('gs://', 'gcs://'):
            path = path[len(prefix):] if path.startswith(prefix) else path
        return super()._strip_protocol(path)


@pytest.fixture
def gs():
    fsspec.register_implementation('gcs', _FakeGCS, clobber=True)
    fsspec.register_implementation('gs', _FakeGCS, clobber=True)
    yield workdir_lib.resolve('gs://bucket/run')
    _FakeGCS.store.clear()
    _FakeGCS.pseudo_dirs[:] = ['']


def test_metrics_config_and_report_on_gs(gs):
    assert str(gs) == 'gs://bucket/run'  # not a local folder named 'gs:'
    log = logger.MetricsLogger(gs, total_steps=3, enable_progress=False)
    log.log(1, {'loss': 2.0})
    log.close()
    again = logger.MetricsLogger(gs, total_steps=3, enable_progress=False)  # a resumed run appends
    again.log(2, {'loss': 1.5, 'val_loss': float('nan')})
    again.log(3, {'loss': 1.0})
    again.close()
    records = logger.read_metrics(gs)
    assert [r['step'] for r in records] == [1, 2, 3] and records[2]['loss'] == 1.0 and np.isnan(records[1]['val_loss'])
    loop._save_expert_load(gs, 3, {'val_load': np.ones((2, 4))})
    out = report.render(gs)
    assert str(out) == 'gs://bucket/run/report.png' and out.read_bytes()[:4] == b'\x89PNG'
    assert not list(pathlib.Path('.').glob('gs:*')), 'wrote a local folder named gs:'


def test_checkpoint_directory_scan_on_gs(gs):
    (gs / 'checkpoints' / '4').mkdir(parents=True)
    (gs / 'checkpoints' / '4' / 'commit_success.txt').write_text('')
    (gs / 'checkpoints' / '6.orbax-checkpoint-tmp-1').mkdir(parents=True)
    assert checkpoint.complete_steps(gs / 'checkpoints') == [4]
    (gs / 'config.json').write_text(json.dumps({'stage': 'pretrain'}))
    assert json.loads((gs / 'config.json').read_text()) == {'stage': 'pretrain'}


def test_a_scheme_without_its_package_is_named():
    with pytest.raises(workdir_lib.WorkdirError, match=r"--workdir='s3://bucket/run': the s3:// filesystem needs "
                                                       r'its package: pip install s3fs'):
        workdir_lib.resolve('s3://bucket/run')
    with pytest.raises(workdir_lib.WorkdirError, match=r"etils.epath knows no nofs:// filesystem"):
        workdir_lib.resolve('nofs://bucket/run')
    assert workdir_lib.resolve('relative/run').is_absolute()


def test_sweep_and_chain_directories_on_gs(gs, tmp_path):
    """A sweep plans its runs under gs://, reads their metrics and writes its report there; a chain's stages
    live under gs:// and each starts from the previous one's gs:// directory; no local 'gs:' folder."""
    sweep_file = tmp_path / 'sweep.py'
    sweep_file.write_text("def get_sweep():\n    return {'base': '%s/experiments/v3_small.py:smoke', "
                          "'variants': {'a': {}, 'b': {'optim.lr': 1e-3}}, 'seeds': [0]}\n" % ROOT)
    sweep = sweep_lib.load_sweep(str(sweep_file))
    runs = sweep_lib.plan(sweep, gs)
    assert [str(r.workdir) for r in runs] == ['gs://bucket/run/a/seed_0', 'gs://bucket/run/b/seed_0']
    assert '--workdir=gs://bucket/run/a/seed_0' in runs[0].command(sweep['base'])
    for i, run in enumerate(runs):
        log = logger.MetricsLogger(run.workdir, total_steps=2, enable_progress=False)
        log.log(2, {'loss': 3.0 + i, 'val_loss': 4.0 + i})
        log.close()
    report_md = sweep_lib.write_report(runs, sweep, gs, 'gs sweep')
    assert str(report_md) == 'gs://bucket/run/report.md' and '| b | 5.000 |' in report_md.read_text()
    assert (gs / 'summary.csv').read_text().splitlines()[1].startswith('a,1,4.0')
    assert (gs / 'loss_curves.png').read_bytes()[:4] == b'\x89PNG'

    c = presets.load_experiment(str(ROOT / 'experiments' / 'r1_small.py'), 'r1_small', 'smoke')
    planned = stages.chain_configs(c, 'gs://bucket/chain')
    assert [str(d) for _, _, d in planned] == [f'gs://bucket/chain/{name}' for name in c.chain]
    assert planned[1][1].init.checkpoint == f'gs://bucket/chain/{c.chain[0]}'
    chain.write_table('gs://bucket/chain', {'sft': {'accuracy': 0.5, 'format_rate': 1.0}}, {'sft': 3.0})
    assert '| sft | 0.500 | 1.000 |' in (epath.Path('gs://bucket/chain') / 'table.md').read_text()
    assert not list(pathlib.Path('.').glob('gs:*')), 'wrote a local folder named gs:'

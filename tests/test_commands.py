"""Every command line as a user meets it: --help lists the command's own flags (not absl's, jax's, grain's
or Orbax's), and a missing file, directory or Hub id, a positional argument or a bad config field ends
with one line, `error: ...`, exit status 1, no traceback and no start-up noise. The commands run as
subprocesses, a few at a time (each pays its own imports)."""
import os
import pathlib
import subprocess
import sys

import pytest

REPO = pathlib.Path(__file__).resolve().parents[1]
PARALLEL = 4  # processes at a time: each holds a few hundred MB of imports
COMMANDS = ('main', 'generate', 'chat', 'report', 'convert', 'sweep', 'data.prepare')
# Each command's own flags that --help must list.
OWN_FLAGS = {
    'main': ('--config', '--workdir', '--distributed'),
    'generate': ('--model', '--prompt', '--temperature', '--top_k', '--top_p', '--seed', '--dtype', '--max_new_tokens'),
    'chat': ('--model', '--system', '--temperature', '--top_k', '--top_p', '--seed', '--dtype'),
    'report': ('--workdir', '--out'),
    'convert': ('--to', '--hf_dir', '--orbax_dir', '--dtype'),
    'sweep': ('--config', '--workdir', '--print'),
    'data.prepare': ('--input', '--output', '--tokenizer', '--records_per_shard'),
}
ERRORS = {
    'generate_missing_model': (['generate', '--model=/no/such/run', '--prompt=x'], "--model='/no/such/run' does not exist"),
    'generate_offline_hub_id': (['generate', '--model=owner/unseen', '--prompt=x'],
                                "--model='owner/unseen' is not a local path and the Hub could not provide it"),
    'chat_missing_model': (['chat', '--model=/no/such/run'], "--model='/no/such/run' does not exist"),
    'report_missing_workdir': (['report', '--workdir=/no/such/run'], "--workdir='/no/such/run' holds no metrics.jsonl"),
    'convert_missing_hf_dir': (['convert', '--to=orbax', '--hf_dir=/no/such/hf', '--orbax_dir=/tmp/unused'],
                               '/no/such/hf/config.json does not exist'),
    'convert_missing_orbax_dir': (['convert', '--to=hf', '--hf_dir=/tmp/unused', '--orbax_dir=/no/such/run'],
                                  '/no/such/run'),
    'sweep_missing_file': (['sweep', '--config=/no/such/sweep.py', '--workdir=/tmp/unused'],
                           "--config='/no/such/sweep.py': no such sweep file"),
    'main_positional': (['main', '--config=experiments/llm_small.py:smoke', 'train.steps=10'],
                        "unexpected argument 'train.steps=10'"),
    'main_bad_field': (['main', '--config=experiments/llm_small.py:smoke', '--config.optim.lr=-1'],
                       'config.optim.lr=-1.0 is invalid'),
    'prepare_missing_input': (['data.prepare', '--input=/no/such/*.txt', '--output=/tmp/unused', '--tokenizer=x.model'],
                              "--input: '/no/such/*.txt': glob matches no file"),
}


def _start(args, tmp_path):
    env = {k: v for k, v in os.environ.items() if k not in ('JAX_PLATFORMS', 'XLA_FLAGS')}  # as a user starts it
    env.update(HF_HUB_OFFLINE='1', HF_HUB_CACHE=str(tmp_path / 'hub'), DSJAX_CACHE=str(tmp_path / 'cache'))
    return subprocess.Popen([sys.executable, '-m', f'dsjax.{args[0]}', *args[1:]], cwd=REPO, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


@pytest.fixture(scope='module')
def outputs(tmp_path_factory):
    """(returncode, stdout, stderr) of every case, the processes run side by side."""
    tmp_path = tmp_path_factory.mktemp('cli')
    cases = {f'help_{c}': [c, '--help'] for c in COMMANDS}
    cases.update({name: args for name, (args, _) in ERRORS.items()})
    results, running, waiting = {}, {}, list(cases.items())
    while waiting or running:
        while waiting and len(running) < PARALLEL:
            name, args = waiting.pop(0)
            running[name] = _start(args, tmp_path)
        name = next(iter(running))
        out, err = running[name].communicate(timeout=600)
        results[name] = (running.pop(name).returncode, out, err)
    return results


@pytest.mark.parametrize('command', COMMANDS)
def test_help_lists_the_commands_own_flags(outputs, command):
    _, out, err = outputs[f'help_{command}']  # absl ends --help with status 1
    text = out + err
    for flag in OWN_FLAGS[command]:
        assert f'  {flag}' in text or f'  --[no]{flag[2:]}' in text, (flag, text)
    for library in ('--jax_', '--grain_', '--xla_', '--experimental_orbax', '--only_check_args'):
        assert library not in text, (library, text)
    assert len(text.splitlines()) < 80 and 'Try --helpfull to get a list of all flags.' in text


@pytest.mark.parametrize('case', sorted(ERRORS))
def test_errors_are_one_line(outputs, case):
    code, out, err = outputs[case]
    want = ERRORS[case][1]
    assert code == 1, (code, out, err)
    assert 'Traceback' not in err, err
    errors = [line for line in err.splitlines() if line.startswith('error: ')]
    assert len(errors) == 1 and want in errors[0], err
    assert err.count(want) == 1, f'printed more than once:\n{err}'
    for noise in ('Unable to initialize backend', 'libtpu', 'TPU', 'InitGoogle'):
        assert noise not in err, err

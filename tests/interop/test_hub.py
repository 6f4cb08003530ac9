"""Hub ids wherever a HF directory is taken, without a network: a fake download (huggingface_hub's own
pattern filter over a local 'repository'), and huggingface_hub itself offline and against a closed port."""
import json
import pathlib
import shutil

import flax.linen as nn
import httpx2 as httpx  # huggingface_hub's HTTP client
import huggingface_hub
from huggingface_hub import constants as hub_constants
from huggingface_hub import errors as hub_errors
from huggingface_hub.utils import filter_repo_objects
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dsjax import config as config_lib
from dsjax import sharding
from dsjax.infer import loading
from dsjax.interop import hf, hub, orbax_io
from dsjax.model.transformer import Transformer
from dsjax.train import loop


@pytest.fixture(scope='module')
def remote(tmp_path_factory, tiny_model):
    """A 'Hub repository' on disk: a tiny V3-like checkpoint plus files dsjax must not download."""
    cfg = tiny_model(mla_moe=True)
    variables = nn.unbox(jax.jit(Transformer(cfg).init)(jax.random.PRNGKey(0), jnp.zeros((1, 4), jnp.int32)))
    repo = tmp_path_factory.mktemp('hub') / 'owner--tiny'
    hf.save(Transformer(cfg), variables, repo)
    (repo / 'generation_config.json').write_text(json.dumps(dict(do_sample=True, temperature=0.6, top_p=0.95)))
    (repo / 'pytorch_model.bin').write_bytes(b'pickled weights are never fetched')
    (repo / 'README.md').write_text('model card')
    return cfg, variables, repo


@pytest.fixture
def fake_hub(remote, tmp_path, monkeypatch):
    """snapshot_download over the local repository: copies what allow_patterns admits (huggingface_hub's
    filter) into a snapshot folder, as the real one does; other ids are not found."""
    calls = []

    def snapshot_download(repo_id, *, revision=None, allow_patterns=None, **kwargs):
        calls.append(dict(repo_id=repo_id, revision=revision, allow_patterns=allow_patterns, **kwargs))
        if repo_id != 'owner/tiny':
            url = f'http://hub.invalid/api/models/{repo_id}'
            response = httpx.Response(404, request=httpx.Request('GET', url))
            raise hub_errors.RepositoryNotFoundError(f'{repo_id} not found', response=response)
        snapshot = tmp_path / 'cache' / (revision or 'main')
        snapshot.mkdir(parents=True, exist_ok=True)
        names = [p.name for p in remote[2].iterdir()]
        for name in filter_repo_objects(names, allow_patterns=allow_patterns):
            shutil.copyfile(remote[2] / name, snapshot / name)
        return str(snapshot)

    monkeypatch.setattr(huggingface_hub, 'snapshot_download', snapshot_download)
    return calls


def test_local_paths_are_not_looked_up(tmp_path, fake_hub):
    (tmp_path / 'owner').mkdir()
    assert hub.resolve(tmp_path) == tmp_path
    assert hub.resolve('gs://bucket/run') == 'gs://bucket/run' and hub.resolve('/abs/a/b') == '/abs/a/b'
    assert not fake_hub
    assert hub.is_repo_id('deepseek-ai/DeepSeek-V3') and hub.is_repo_id('owner/name@v1.0')
    assert not hub.is_repo_id('one_part') and not hub.is_repo_id('a/b/c') and not hub.is_repo_id('gs://b/c')


def test_hf_load_and_the_cli_loader_take_a_hub_id(remote, fake_hub):
    cfg, variables, _ = remote
    model, loaded = hf.load('owner/tiny@v1', dtype=jnp.float32)
    assert model.cfg == cfg
    jax.tree.map(np.testing.assert_array_equal, loaded, variables)
    call = fake_hub[0]
    assert (call['repo_id'], call['revision']) == ('owner/tiny', 'v1')
    fetched = sorted(p.name for p in pathlib.Path(hub.resolve('owner/tiny')).iterdir())
    assert 'pytorch_model.bin' not in fetched and 'README.md' not in fetched
    assert {'config.json', 'generation_config.json', 'model.safetensors'} <= set(fetched)
    # --model: the sampling defaults come with the checkpoint's generation_config.json.
    assert loading.sampling_for(hub.resolve('owner/tiny')) == loading.SamplingConfig(0.6, 50, 0.95)


def test_init_checkpoint_takes_a_hub_id(remote, fake_hub):
    cfg, variables, _ = remote
    mesh = sharding.make_mesh(dict(data=2, fsdp=2, expert=2, tensor=1))
    import optax
    with jax.set_mesh(mesh), nn.logical_axis_rules(sharding.DEFAULT_RULES):
        _, abstract, _ = loop.build_state_fns(Transformer(cfg), optax.sgd(0.1), mesh, seq_len=8)
    params, _ = loop.start_from('owner/tiny', cfg, abstract)
    jax.tree.map(np.testing.assert_array_equal, params, variables['params'])


def test_convert_takes_a_hub_id(remote, fake_hub, tmp_path):
    cfg = orbax_io.hf_to_orbax('owner/tiny', tmp_path / 'orbax', dtype=np.float32)
    assert cfg == remote[0]


def test_unknown_repository_is_one_line(fake_hub):
    with pytest.raises(hub.HubError, match=r"--model='nobody/nothing' is neither a local path nor a Hub repository"):
        loading.load('nobody/nothing')


def test_offline_says_to_pass_a_local_directory(tmp_path, monkeypatch):
    """The real huggingface_hub with HF_HUB_OFFLINE and an empty cache."""
    monkeypatch.setattr(hub_constants, 'HF_HUB_OFFLINE', True)
    monkeypatch.setattr(hub_constants, 'HF_HUB_CACHE', str(tmp_path / 'cache'))
    with pytest.raises(hub.HubError) as e:
        hf.load('deepseek-ai/DeepSeek-V2-Lite')
    message = str(e.value)
    assert '\n' not in message and 'hf.load(path)' in message and 'pass the local directory' in message


def test_unreachable_hub_says_to_pass_a_local_directory(tmp_path, monkeypatch):
    """The real huggingface_hub against a closed local port."""
    monkeypatch.setattr(hub_constants, 'ENDPOINT', 'http://127.0.0.1:9')
    monkeypatch.setattr(hub_constants, 'HF_HUB_CACHE', str(tmp_path / 'cache'))
    with pytest.raises(hub.HubError, match=r"init.checkpoint='a/b@main' is not a local path and the Hub could not "
                                           r'provide it .*ConnectError.*pass the local directory'):
        hub.resolve('a/b@main', 'init.checkpoint')


@pytest.mark.parametrize('dtype', ['bfloat16', jnp.bfloat16, np.dtype('bfloat16'), config_lib.DTYPES[1]])
def test_dtypes_by_name_or_type(remote, tmp_path, dtype):
    cfg, variables, repo = remote
    model, loaded = hf.load(repo, dtype)
    assert model.cfg.dtype == model.cfg.param_dtype == 'bfloat16'
    assert loaded['params']['embed']['embedding'].dtype == jnp.bfloat16
    hf.save(model, loaded, tmp_path / 'out', dtype=jnp.float16)
    assert json.loads((tmp_path / 'out' / 'config.json').read_text())['dtype'] == 'float16'
    with pytest.raises(ValueError, match=r"hf.load\(dtype\)=.*int32.* is not a supported dtype"):
        hf.load(repo, jnp.int32)

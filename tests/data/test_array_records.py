"""`python -m dsjax.data.prepare` and `data.source='array_record'`: the shards hold each document's tokens
with its boundaries, the pipeline reads them as it reads the same documents in memory, and two hosts
(processes under jax.distributed) read disjoint shares that together make the corpus, resuming exactly
from an Orbax checkpoint."""
import json
import os
import pathlib
import socket
import subprocess
import sys

import ml_collections
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import tokenizers

from dsjax import config as config_lib
from dsjax.data import array_records, corpus, pipeline, prepare
from dsjax.data import tokenizer as tokenizer_lib

REPO = pathlib.Path(__file__).resolve().parents[2]
WORDS = ['<pad>', '<s>', '</s>', '[UNK]'] + [f'w{i}' for i in range(60)]


def _tokenizer(directory: pathlib.Path) -> pathlib.Path:
    """A word-level HF tokenizer over WORDS with bos/eos/pad."""
    tok = tokenizers.Tokenizer(tokenizers.models.WordLevel({w: i for i, w in enumerate(WORDS)}, unk_token='[UNK]'))
    tok.pre_tokenizer = tokenizers.pre_tokenizers.WhitespaceSplit()
    directory.mkdir(parents=True, exist_ok=True)
    tok.save(str(directory / 'tokenizer.json'))
    (directory / 'tokenizer_config.json').write_text(json.dumps(dict(bos_token='<s>', eos_token='</s>',
                                                                     pad_token='<pad>')))
    return directory


def _text(k: int) -> str:
    """Document k: a unique opening pair of words, then a length that varies with k."""
    rng = np.random.default_rng(k)
    return ' '.join([f'w{k // 60}', f'w{k % 60}'] + [f'w{i}' for i in rng.integers(0, 60, 3 + k % 17)])


@pytest.fixture(scope='module')
def corpus_files(tmp_path_factory):
    """120 documents: 60 JSONL records, 40 Parquet rows and 20 text files."""
    root = tmp_path_factory.mktemp('corpus')
    with open(root / 'a.jsonl', 'w') as f:
        for k in range(60):
            f.write(json.dumps({'text': _text(k)}) + '\n')
    pq.write_table(pa.table({'text': [_text(k) for k in range(60, 100)]}), root / 'b.parquet')
    (root / 'texts').mkdir()
    for k in range(100, 120):
        (root / 'texts' / f'{k}.txt').write_text(_text(k))
    return root, _tokenizer(root / 'tok')


@pytest.fixture(scope='module')
def dataset(corpus_files, tmp_path_factory):
    root, tok = corpus_files
    out = tmp_path_factory.mktemp('prepared') / 'ds'
    prepare.prepare([str(root / 'a.jsonl'), str(root / 'b.parquet'), str(root / 'texts' / '*.txt')], out, str(tok),
                    val_fraction=0.1, per_shard=16)
    return out


def _data_cfg(**overrides):
    d = config_lib.base_config().data
    d.update(seq_len=16, batch_size=4, shuffle_window=4, val_fraction=0.1, tokenizer='hf', **overrides)
    return d


def test_prepare_writes_each_document_as_one_record(corpus_files, dataset):
    root, tok = corpus_files
    meta = json.loads((dataset / 'dataset.json').read_text())
    tokenizer = tokenizer_lib.from_path(dataset)  # the dataset directory carries its tokenizer
    assert (meta['vocab_size'], meta['bos_id'], meta['eos_id']) == (len(WORDS), 1, 2)
    want = {s: [] for s in corpus.SPLITS}
    # Files in the order of their names (100.txt ... 119.txt, a.jsonl, b.parquet), records in file order.
    names = [(f'{k}.txt', k) for k in range(100, 120)] + [(f'a.jsonl:{k + 1}', k) for k in range(60)] + [
        (f'b.parquet:{k - 59}', k) for k in range(60, 100)]
    for name, k in names:
        split = 'validation' if corpus.is_validation(name, 0.1) else 'train'
        want[split].append(pipeline.tokenize_document(tokenizer, _text(k)).tolist())
    assert want['validation'] and want['train']
    for split in corpus.SPLITS:
        records = array_records.source((str(dataset),), split, tokenizer)
        got = [array_records.decode(records[i]).tolist() for i in range(len(records))]
        assert got == want[split], split
        assert meta['splits'][split]['documents'] == len(got)
        assert meta['splits'][split]['tokens'] == sum(map(len, got))
    assert len(meta['splits']['train']['shards']) == -(-len(want['train']) // 16)


def test_array_record_batches_equal_the_in_memory_source(corpus_files, dataset):
    """The same documents in the same order give the same packed, shuffled batches, train and validation."""
    root, tok = corpus_files
    shards = _data_cfg(source='array_record', paths=(str(dataset),), tokenizer_path=str(dataset))
    memory = _data_cfg(source='jsonl', paths=(str(root / 'a.jsonl'),), tokenizer_path=str(tok))
    tokenizer = tokenizer_lib.get_tokenizer(shards)
    # JSONL alone: prepare the same 60 records to compare like with like.
    only_jsonl = root.parent / 'only_jsonl'
    prepare.prepare([str(root / 'a.jsonl')], only_jsonl, str(tok), val_fraction=0.1, per_shard=16)
    shards.paths = (str(only_jsonl),)
    a = pipeline.make_train_iterator(shards, tokenizer)
    b = pipeline.make_train_iterator(memory, tokenizer)
    for _ in range(6):
        x, y = next(a), next(b)
        for k in pipeline.FIELDS:
            np.testing.assert_array_equal(x[k], y[k])
    for x, y in zip(pipeline.make_eval_batches(shards, tokenizer, num_batches=2),
                    pipeline.make_eval_batches(memory, tokenizer, num_batches=2)):
        for k in pipeline.FIELDS:
            np.testing.assert_array_equal(x[k], y[k])


def test_bad_datasets_are_named(dataset, tmp_path):
    tokenizer = tokenizer_lib.from_path(dataset)
    with pytest.raises(corpus.DataError, match=r"holds no dataset.json; write the shards with python -m "
                                               r'dsjax.data.prepare'):
        array_records.source((str(tmp_path),), 'train', tokenizer)
    other = _tokenizer(tmp_path / 'other')
    (other / 'tokenizer_config.json').write_text(json.dumps(dict(bos_token='<pad>', eos_token='</s>')))
    with pytest.raises(corpus.DataError, match=r'tokenised with bos_id=1 .* the configured tokenizer has 0'):
        array_records.source((str(dataset),), 'train', tokenizer_lib.from_path(other))
    with pytest.raises(FileExistsError, match='already holds shards'):
        prepare.prepare(['x'], dataset, str(dataset))
    c = config_lib.base_config()
    c.data.update(source='array_record', paths=(str(dataset),))
    with pytest.raises(config_lib.ConfigError, match=r'config.data.tokenizer_path=.*needs the tokenizer'):
        config_lib.validate(c, 8)


_TWO_HOSTS = r'''
import json, sys
import jax, jax.numpy as jnp, numpy as np
port, pid, dataset, out = sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4]
jax.distributed.initialize(f'127.0.0.1:{port}', num_processes=2, process_id=pid)
from dsjax import config as config_lib
from dsjax.data import pipeline, tokenizer as tokenizer_lib
from dsjax.train.checkpoint import Checkpointer
d = config_lib.base_config().data
d.update(source='array_record', paths=(dataset,), tokenizer='hf', tokenizer_path=dataset, seq_len=16, batch_size=4,
         shuffle_window=4)
tok = tokenizer_lib.get_tokenizer(d)
p, n = jax.process_index(), jax.process_count()
mine = pipeline.token_documents(d, tok, 'train')[p::n]  # what this host's iterator draws from
docs = [mine[i].tolist() for i in range(len(mine))]
it = pipeline.make_train_iterator(d, tok, process_index=p, process_count=n)
for _ in range(5):
    next(it)
sharding = jax.sharding.NamedSharding(jax.sharding.Mesh(np.array(jax.devices()), ('d',)), jax.sharding.PartitionSpec())
state = {'step': jax.make_array_from_callback((), sharding, lambda _: np.int32(5))}
ckpt = Checkpointer(out + '/ckpt', keep=1, async_save=False)
ckpt.save(5, state, data_iterator=it, force=True)
ckpt.wait()
after = [next(it) for _ in range(4)]
fresh = pipeline.make_train_iterator(d, tok, process_index=p, process_count=n)
abstract = {'step': jax.ShapeDtypeStruct((), jnp.int32, sharding=sharding)}
ckpt.restore(abstract, data_iterator=fresh)
resumed = [next(fresh) for _ in range(4)]
same = all(np.array_equal(a[k], b[k]) for a, b in zip(after, resumed) for k in pipeline.FIELDS)
ckpt.close()
json.dump({'docs': docs, 'resumed_equal': same, 'first_inputs': after[0]['inputs'].tolist()},
          open(f'{out}/host_{p}.json', 'w'))
'''


def test_two_hosts_read_disjoint_shares_and_resume_exactly(dataset, tmp_path):
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0))
        port = s.getsockname()[1]
    script = tmp_path / 'two_hosts.py'
    script.write_text(_TWO_HOSTS)
    env = {**os.environ, 'JAX_PLATFORMS': 'cpu', 'XLA_FLAGS': '--xla_force_host_platform_device_count=1',
           'PYTHONPATH': str(REPO)}  # this checkout's dsjax, not an installed one
    procs = [subprocess.Popen([sys.executable, str(script), str(port), str(p), str(dataset), str(tmp_path)], cwd=REPO,
                              env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for p in range(2)]
    try:
        logs = [proc.communicate(timeout=300)[0] for proc in procs]
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
    assert [proc.returncode for proc in procs] == [0, 0], '\n'.join(log[-3000:] for log in logs)
    hosts = [json.loads((tmp_path / f'host_{p}.json').read_text()) for p in range(2)]
    tokenizer = tokenizer_lib.from_path(dataset)
    records = array_records.source((str(dataset),), 'train', tokenizer)
    every = sorted(array_records.decode(records[i]).tolist() for i in range(len(records)))
    a, b = ({tuple(doc) for doc in h['docs']} for h in hosts)
    assert not a & b, 'a document read by both hosts'
    assert sorted(map(list, a | b)) == every and len(a) + len(b) == len(every)
    assert all(h['resumed_equal'] for h in hosts)
    assert hosts[0]['first_inputs'] != hosts[1]['first_inputs']
    data_files = sorted(p.name for p in (tmp_path / 'ckpt' / '5' / 'data').iterdir())
    assert len([n for n in data_files if 'of-2' in n]) == 2, data_files

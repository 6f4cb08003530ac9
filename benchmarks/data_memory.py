"""Host memory of the training input pipeline: ArrayRecord shards against the in-memory text source.

Run:      python benchmarks/data_memory.py [--tokens=260e6] [--dir=/tmp/dsjax_data_memory]
Hardware: any CPU; needs ~3 GB of disk under --dir (deleted at the end) and ~3 GB of RAM.
Expect:   the in-memory source's peak RSS grows with the corpus (it holds every document's text); the
          ArrayRecord source's stays near the imports' (records are read by index when the pipeline asks).

A synthetic corpus of random words ('w0' .. 'w4095', a word-level HF tokenizer: one token per word) is
written as JSONL files and, from the same ids, as the ArrayRecord shards dsjax.data.prepare writes
(int32 records, so --tokens=260e6 is ~1.04 GB of tokens). Each source then runs in a fresh process that builds the
training iterator and draws 50 batches of 16 x 256 tokens; the peak RSS of that process is reported,
beside a process that only imports the same modules.
"""
import argparse
import json
import pathlib
import shutil
import subprocess
import sys
import time

import numpy as np

from dsjax.data import array_records, corpus

REPO = pathlib.Path(__file__).resolve().parents[1]
WORDS = 4096
DOC_TOKENS = 10_000
FILES = 64

_MEASURE = r'''
import json, resource, sys, time
from dsjax import config as config_lib
from dsjax.data import pipeline, tokenizer as tokenizer_lib
source, paths, tok = sys.argv[1], sys.argv[2], sys.argv[3]
d = config_lib.base_config().data
d.update(source=source, paths=(paths,), tokenizer='hf', tokenizer_path=tok, vocab_size=4100, seq_len=256,
         batch_size=16, max_doc_chars=10**9)
start = time.perf_counter()
if source != 'none':
    it = pipeline.make_train_iterator(d, tokenizer_lib.get_tokenizer(d))
    for _ in range(50):
        next(it)
print(json.dumps({'peak_rss_mb': resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                  'seconds': time.perf_counter() - start}))
'''


def write_tokenizer(directory: pathlib.Path) -> None:
    import tokenizers
    vocab = {w: i for i, w in enumerate(['<pad>', '<s>', '</s>', '[UNK]'] + [f'w{i}' for i in range(WORDS)])}
    tok = tokenizers.Tokenizer(tokenizers.models.WordLevel(vocab, unk_token='[UNK]'))
    tok.pre_tokenizer = tokenizers.pre_tokenizers.WhitespaceSplit()
    directory.mkdir(parents=True, exist_ok=True)
    tok.save(str(directory / 'tokenizer.json'))
    (directory / 'tokenizer_config.json').write_text(json.dumps(dict(bos_token='<s>', eos_token='</s>',
                                                                     pad_token='<pad>')))


def write_corpus(root: pathlib.Path, tokens: int, write_text: bool = True, val_fraction: float = 0.001) -> int:
    """FILES JSONL files of random-word documents and, from the same ids, the ArrayRecord shards
    `dsjax.data.prepare` would write of them (written directly: tokenising 1 GB of text would take this
    benchmark hours; prepare itself is tested in tests/data/test_array_records.py). Returns the tokens."""
    (root / 'text').mkdir(parents=True, exist_ok=True)
    words = np.array([f'w{i}' for i in range(WORDS)])
    rng = np.random.default_rng(0)
    docs = tokens // DOC_TOKENS

    def documents():
        for f in range(FILES):
            name = f'part{f:03d}.jsonl'
            out = open(root / 'text' / name, 'w') if write_text else None
            for line in range(1, (f + 1) * docs // FILES - f * docs // FILES + 1):
                ids = rng.integers(0, WORDS, DOC_TOKENS)
                if out:
                    out.write('{"text": "' + ' '.join(words[ids]) + '"}\n')
                split = 'validation' if corpus.is_validation(f'{name}:{line}', val_fraction) else 'train'
                yield split, np.concatenate([[1], ids + 4, [2]])  # [bos] + word ids + [eos]
            if out:
                out.close()

    splits = array_records.write_shards(root / 'shards', documents())
    meta = dict(format=1, dtype='int32', vocab_size=WORDS + 4, bos_id=1, eos_id=2, tokenizer=str(root / 'tok'),
                val_fraction=val_fraction, splits=splits)
    (root / 'shards' / array_records.DATASET_FILE).write_text(json.dumps(meta))
    return sum(s['tokens'] for s in splits.values())


def measure(source: str, paths: str, tok: str) -> dict:
    out = subprocess.run([sys.executable, '-c', _MEASURE, source, paths, tok], cwd=REPO, capture_output=True,
                         text=True, env={'PYTHONPATH': str(REPO), 'JAX_PLATFORMS': 'cpu', 'PATH': '/usr/bin:/bin'})
    if out.returncode:
        raise RuntimeError(out.stderr[-3000:])
    return json.loads(out.stdout.strip().splitlines()[-1])


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument('--tokens', type=float, default=260e6)
    parser.add_argument('--dir', default='/tmp/dsjax_data_memory')
    parser.add_argument('--keep_text', action='store_true',
                        help='reuse the JSONL files a previous run left in --dir (same seed)')
    args = parser.parse_args()
    root = pathlib.Path(args.dir)
    if not args.keep_text:
        shutil.rmtree(root, ignore_errors=True)
    try:
        write_tokenizer(root / 'tok')
        t0 = time.perf_counter()
        tokens = write_corpus(root, int(args.tokens), write_text=not args.keep_text)
        text_bytes = sum(p.stat().st_size for p in (root / 'text').iterdir())
        shard_bytes = sum(p.stat().st_size for p in (root / 'shards').glob('*.array_record'))
        seconds = time.perf_counter() - t0
        rows = {name: measure(source, paths, str(root / 'tok')) for name, source, paths in (
            ('imports only', 'none', ''),
            ('in-memory (data.source=jsonl)', 'jsonl', f'{root}/text/*.jsonl'),
            ('ArrayRecord (data.source=array_record)', 'array_record', f'{root}/shards'))}
    finally:
        shutil.rmtree(root, ignore_errors=True)
    print(f'corpus: {tokens:,} tokens = {tokens * 4 / 1e9:.2f} GB of int32 in {shard_bytes / 1e9:.2f} GB of '
          f'ArrayRecord shards; the same documents as {text_bytes / 1e9:.2f} GB of JSONL; written in {seconds:.0f} s')
    print('| source | peak RSS (MB) | build + 50 batches (s) |\n|---|---|---|')
    for name, r in rows.items():
        print(f"| {name} | {r['peak_rss_mb']:,.0f} | {r['seconds']:.1f} |")


if __name__ == '__main__':
    main()

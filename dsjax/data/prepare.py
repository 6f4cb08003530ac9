"""Tokenise a corpus once into ArrayRecord shards that `data.source='array_record'` trains from.

    python -m dsjax.data.prepare --input='/corpus/**/*.jsonl' --input=/corpus/books.parquet \\
        --output=/data/corpus_tok --tokenizer=/ckpt/DeepSeek-V3   # or a sentencepiece .model

Inputs are text files (one document each), JSONL (one document per line, field --field) or Parquet
(one per row, column --field), read one document at a time. Each document becomes one record: its
token ids [bos] + tokens + [eos] as little-endian int32, so document boundaries survive. Documents are
assigned to train or validation by the hash of their name, as the in-memory sources do. The output
directory holds train-NNNNN.array_record and validation-NNNNN.array_record shards, the tokenizer's
files and dataset.json (counts, tokenizer ids); train with

    --config.data.source=array_record --config.data.paths="('/data/corpus_tok',)" \\
    --config.data.tokenizer=hf --config.data.tokenizer_path=/data/corpus_tok
"""
import json
import pathlib
from absl import flags, logging

from dsjax import cli
from dsjax.data import array_records, corpus
from dsjax.data import tokenizer as tokenizer_lib
from dsjax.data.pipeline import tokenize_document
from dsjax.interop import hf_files

_INPUT = flags.DEFINE_multi_string('input', [], 'Input files or globs: *.txt (or any text), *.jsonl, *.parquet; '
                                   'repeatable.')
_OUTPUT = flags.DEFINE_string('output', None, 'Output directory (new, or without shards in it).')
_TOKENIZER = flags.DEFINE_string('tokenizer', None, 'A sentencepiece .model, or a HF tokenizer.json or a '
                                 'directory holding one.')
_FIELD = flags.DEFINE_string('field', 'text', 'JSONL field / Parquet column holding the text.')
_VAL_FRACTION = flags.DEFINE_float('val_fraction', 0.02, 'Share of documents (by name hash) for validation.')
_RECORDS_PER_SHARD = flags.DEFINE_integer('records_per_shard', 65536, 'Documents per ArrayRecord file.')


def prepare(inputs, output, tokenizer_path: str, *, field: str = 'text', val_fraction: float = 0.02,
            per_shard: int = 65536) -> dict:
    """Tokenises the `inputs` files into ArrayRecord shards in `output`; returns dataset.json's content."""
    output = pathlib.Path(output)
    if output.exists() and any(output.glob('*.array_record')):
        raise FileExistsError(f'--output={str(output)!r} already holds shards: write to a new directory')
    if not 0 < val_fraction < 1:
        raise ValueError(f'--val_fraction={val_fraction!r} must be in (0, 1)')
    corpus.match_paths(inputs, what='--input')  # a missing input fails before anything is read
    tokenizer = tokenizer_lib.from_path(tokenizer_path)
    docs = corpus.read_files(inputs, field, what='--input')
    split = lambda doc: 'validation' if corpus.is_validation(doc.name, val_fraction) else 'train'
    splits = array_records.write_shards(output, ((split(d), tokenize_document(tokenizer, d.text)) for d in docs),
                                        per_shard=per_shard)
    if not splits['train']['documents']:
        raise corpus.DataError(f'--input {list(inputs)}: no training documents (all empty, or all in validation)')
    hf_files.write_tokenizer(output, tokenizer)
    meta = dict(format=1, dtype=array_records.RECORD_DTYPE.name, vocab_size=tokenizer.vocab_size,
                bos_id=tokenizer.bos_id, eos_id=tokenizer.eos_id, tokenizer=str(tokenizer_path),
                val_fraction=val_fraction, splits=splits)
    (output / array_records.DATASET_FILE).write_text(json.dumps(meta, indent=2) + '\n')
    return meta


def main():
    if not _INPUT.value:
        raise ValueError('give --input=FILE_OR_GLOB (repeatable)')
    meta = prepare(_INPUT.value, _OUTPUT.value, _TOKENIZER.value, field=_FIELD.value,
                   val_fraction=_VAL_FRACTION.value, per_shard=_RECORDS_PER_SHARD.value)
    for split, s in meta['splits'].items():
        logging.info('%s: %d documents, %d tokens in %d shards', split, s['documents'], s['tokens'], len(s['shards']))
    print(f'Wrote {_OUTPUT.value}: ' + ', '.join(f"{s}: {m['tokens']:,} tokens" for s, m in meta['splits'].items()))


if __name__ == '__main__':
    flags.mark_flags_as_required(['output', 'tokenizer'])
    cli.run(main, errors=cli.USER_ERRORS)

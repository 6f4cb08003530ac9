"""Document sources: the Python standard library, text files, JSONL files, generated task worksheets.

Every source yields `Document`s in a deterministic order and assigns each to
'train' or 'validation' by a hash of its name, so the split is identical across
runs and machines. A document's name is portable: the stdlib path relative to
the stdlib root, or a file path relative to the fixed (glob-free) directory of
the pattern that matched it, with ':<line>' appended for JSONL records.
"""
import dataclasses
import glob
import hashlib
import json
import os
import pathlib
import random
import re
import sysconfig
from typing import Iterator

from absl import logging

from dsjax import config as config_lib
from dsjax.data import tasks

SOURCES = ("stdlib", "text", "jsonl", "tasks")  # data.source="array_record" is read by array_records.py
# Problems per worksheet page: many single-problem pages, so a page often ends right after its answer.
_PAGE_SIZES = (1, 1, 1, 2, 3, 5, 8)
SPLITS = ("train", "validation")
_GLOB_CHARS = re.compile(r"[*?\[]")


class DataError(ValueError):
    """The data that `config.data` names cannot be read or used; the message names the file or field."""


@dataclasses.dataclass(frozen=True)
class Document:
    name: str
    text: str


@dataclasses.dataclass
class _Counts:
    """What was skipped or repaired while reading; logged once per load."""
    empty_files: int = 0
    empty_records: int = 0
    files_with_bad_utf8: int = 0
    docs_split: int = 0


def load_documents(data_cfg, split: str) -> list[Document]:
    """Returns the documents of `split` ('train' or 'validation'), in a fixed order.

  Args:
    data_cfg: the `config.data` section; reads source, paths, jsonl_field,
      val_fraction and max_doc_chars.
    split: 'train' or 'validation'.

  Returns:
    The split's documents, ordered by source file (sorted) and then by position
    within the file. A document longer than `data.max_doc_chars` is returned as
    consecutive pieces named '<name>#<k>'; all pieces of one document fall in
    the same split.
  """
    if split not in SPLITS:
        raise DataError(f"split must be one of {SPLITS}, got {split!r}")
    if not 0.0 < data_cfg.val_fraction < 1.0:
        raise DataError(f"data.val_fraction must be in (0, 1), got {data_cfg.val_fraction!r}")
    if data_cfg.max_doc_chars <= 0:
        raise DataError(f"data.max_doc_chars must be positive, got {data_cfg.max_doc_chars!r}")
    counts = _Counts()
    want_validation = split == "validation"
    docs = []
    for doc in _read_source(data_cfg, counts):
        if is_validation(doc.name, data_cfg.val_fraction) != want_validation:
            continue
        pieces = split_text(doc.text, data_cfg.max_doc_chars)
        if len(pieces) == 1:
            docs.append(doc)
        else:
            counts.docs_split += 1
            docs.extend(Document(f"{doc.name}#{k}", piece) for k, piece in enumerate(pieces))
    logging.info(
        "data.source=%s split=%s: %d documents; skipped %d empty files and %d empty "
        "records; %d files had invalid UTF-8 (replaced with U+FFFD); %d documents "
        "longer than data.max_doc_chars=%d were split into pieces.", data_cfg.source, split, len(docs),
        counts.empty_files, counts.empty_records, counts.files_with_bad_utf8, counts.docs_split,
        data_cfg.max_doc_chars)
    return docs


def is_validation(name: str, val_fraction: float) -> bool:
    """True if the document named `name` belongs to the validation split."""
    # sha256, not hash(): Python salts str hashes per process.
    digest = hashlib.sha256(name.encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "big") / 2.0**64 < val_fraction


def split_text(text: str, max_chars: int) -> list[str]:
    """Cuts `text` into pieces of at most `max_chars` characters, at a newline when one is near."""
    pieces = []
    start = 0
    while len(text) - start > max_chars:
        cut = text.rfind("\n", start, start + max_chars) + 1
        # Only cut at a newline in the back half, so pieces stay reasonably long.
        if cut <= start + max_chars // 2:
            cut = start + max_chars
        pieces.append(text[start:cut])
        start = cut
    pieces.append(text[start:])
    return pieces


def stdlib_files() -> list[pathlib.Path]:
    """The standard library's own .py files on this machine (no site/dist-packages), sorted."""
    root = pathlib.Path(sysconfig.get_paths()["stdlib"])
    excluded = {"site-packages", "dist-packages"}
    return sorted(path for path in root.rglob("*.py")
                  if path.is_file() and not excluded & set(path.relative_to(root).parts))


def _read_source(data_cfg, counts: _Counts) -> Iterator[Document]:
    """Yields every non-empty document of the configured source, in a fixed order."""
    if data_cfg.source == "stdlib":
        root = pathlib.Path(sysconfig.get_paths()["stdlib"])
        for path in stdlib_files():
            text = _read_text(path, counts)
            if text:
                yield Document(path.relative_to(root).as_posix(), text)
    elif data_cfg.source == "text":
        for path, name in match_paths(data_cfg.paths):
            text = _read_text(path, counts)
            if text:
                yield Document(name, text)
    elif data_cfg.source == "jsonl":
        for path, name in match_paths(data_cfg.paths):
            yield from _read_jsonl(path, name, data_cfg.jsonl_field, counts)
    elif data_cfg.source == "tasks":
        yield from worksheet_documents(data_cfg.tasks, data_cfg.task_documents, data_cfg.worked_fraction)
    else:
        raise DataError(f"data.source must be one of {SOURCES}, got {data_cfg.source!r}")


def read_files(patterns, field: str = "text", what: str = "data.paths") -> Iterator[Document]:
    """Every document of the files `patterns` match, one at a time, by suffix: a JSONL record or a Parquet
    row (its `field`) each, any other file whole as text."""
    counts = _Counts()
    for path, name in match_paths(patterns, what):
        if path.suffix == ".jsonl":
            yield from _read_jsonl(path, name, field, counts)
        elif path.suffix == ".parquet":
            yield from _read_parquet(path, name, field)
        else:
            text = _read_text(path, counts)
            if text:
                yield Document(name, text)


def _read_parquet(path: pathlib.Path, name: str, column: str) -> Iterator[Document]:
    """One document per row of `column`, read a batch of rows at a time."""
    try:
        import pyarrow.parquet as pq  # only Parquet inputs need it (the 'data' extra)
    except ImportError as e:
        raise DataError(f"{path}: reading Parquet needs pyarrow: pip install 'dsjax[data]'") from e
    file = pq.ParquetFile(path)
    if column not in file.schema_arrow.names:
        raise DataError(f"{path}: no column {column!r} (columns: {file.schema_arrow.names})")
    row = 0
    for batch in file.iter_batches(columns=[column], batch_size=1024):
        for text in batch.column(0).to_pylist():
            row += 1
            if text:
                yield Document(f"{name}:{row}", text)


def worksheet_documents(entries, n: int, worked_fraction: float = 1.0) -> Iterator[Document]:
    """`n` worksheet pages (tasks.worksheet) of train-split problems of the task:level `entries`, taken
    in turn; each page has its own style and size, and each tagged solution shows its steps with
    probability `worked_fraction` (else only its result). Test-split problems never appear."""
    parsed = config_lib.parse_task_entries(entries, "data.tasks")
    rng = random.Random(0)
    for k in range(n):
        task, level = parsed[k % len(parsed)]
        size, style = rng.choice(_PAGE_SIZES), rng.choice(tasks.WORKSHEET_STYLES)
        header = rng.choice(("",) + tasks.WORKSHEET_HEADERS[style])
        problems = tasks.make_problems(task, "train", size, level=level, seed=k)
        shown = [rng.random() < worked_fraction for _ in problems] if worked_fraction < 1 else None
        yield Document(f"tasks/{task}{level}/{k:07d}", tasks.worksheet(problems, style, header, shown))


def match_paths(patterns, what: str = "data.paths") -> list[tuple[pathlib.Path, str]]:
    """Expands `data.paths` (or the argument `what`) into sorted, de-duplicated (file, portable name) pairs."""
    if isinstance(patterns, str):
        raise DataError(f"{what} must be a tuple of paths or globs, got the string {patterns!r}")
    if not patterns:
        raise DataError(f"{what} is empty; give at least one file path or glob pattern")
    found = {}
    for pattern in patterns:
        pattern = os.path.expanduser(str(pattern))
        matches = sorted(glob.glob(pattern, recursive=True))
        if not matches:
            kind = "glob matches no file" if _GLOB_CHARS.search(pattern) else "file does not exist"
            raise DataError(f"{what}: {pattern!r}: {kind}")
        base = _fixed_dir(pattern)
        for match in matches:
            path = pathlib.Path(match)
            if path.is_dir():
                if not _GLOB_CHARS.search(pattern):
                    raise DataError(f"{what}: {pattern!r} is a directory; give files or a glob such as "
                                    f"'{pattern.rstrip('/')}/**/*.txt'")
                continue  # A glob such as 'dir/*' also matches subdirectories; only files are documents.
            found.setdefault(path.resolve(), (path, os.path.relpath(path, base)))
    return sorted(found.values(), key=lambda pair: pair[1:] + (str(pair[0]), ))


def _fixed_dir(pattern: str) -> str:
    """The directory part of `pattern` before its first glob character."""
    parts = pathlib.PurePath(pattern).parts
    fixed = []
    for part in parts[:-1]:
        if _GLOB_CHARS.search(part):
            break
        fixed.append(part)
    return str(pathlib.PurePath(*fixed)) if fixed else "."


def _read_text(path: pathlib.Path, counts: _Counts) -> str:
    """Reads `path` as UTF-8, replacing invalid bytes; counts empty and repaired files."""
    try:
        data = path.read_bytes()
    except OSError as e:  # unreadable, vanished since the glob, or a broken link
        raise DataError(f"data.paths: cannot read {str(path)!r}: {e.strerror or e}") from e
    if not data.strip():
        counts.empty_files += 1
        logging.debug("Skipping empty file %s", path)
        return ""
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        counts.files_with_bad_utf8 += 1
        return data.decode("utf-8", errors="replace")


def jsonl_records(text: str, path) -> Iterator[tuple[str, int, object]]:
    """(`path:line`, line number, the parsed JSON value) of each non-blank line of a JSONL file's text; a
    line that is not JSON is an error naming file and line. Every JSONL reader of dsjax goes through here."""
    for line_no, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue  # Blank lines (e.g. a trailing newline) are not records.
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            raise DataError(f"{path}:{line_no}: not valid JSON ({e.msg} at column {e.colno})") from e
        yield f"{path}:{line_no}", line_no, record


def _read_jsonl(path: pathlib.Path, name: str, field: str, counts: _Counts) -> Iterator[Document]:
    """Yields one document per JSONL record; a bad line is an error naming file and line."""
    for where, line_no, record in jsonl_records(_read_text(path, counts), path):
        if not isinstance(record, dict) or field not in record:
            keys = sorted(record) if isinstance(record, dict) else type(record).__name__
            raise DataError(f"{where}: record has no field data.jsonl_field={field!r} (found: {keys})")
        value = record[field]
        if not isinstance(value, str):
            raise DataError(f"{where}: field data.jsonl_field={field!r} must hold a string, "
                            f"got {type(value).__name__}")
        if not value:
            counts.empty_records += 1
            continue
        yield Document(f"{name}:{line_no}", value)

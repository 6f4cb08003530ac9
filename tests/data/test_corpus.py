"""Tests for dsjax/data/corpus.py: sources, the deterministic split, data faults."""
import json
import logging
import pathlib

import ml_collections
import pytest

from dsjax.data import corpus


def data_config(**overrides):
    cfg = ml_collections.ConfigDict(
        dict(source="text", paths=(), jsonl_field="text", val_fraction=0.25, max_doc_chars=10_000))
    cfg.update(overrides)
    return cfg


def write_texts(root: pathlib.Path, texts: dict) -> None:
    for name, text in texts.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(text if isinstance(text, bytes) else text.encode("utf-8"))


@pytest.fixture(scope="session")
def stdlib_splits():
    cfg = data_config(source="stdlib", val_fraction=0.05, max_doc_chars=10_000_000)
    return corpus.load_documents(cfg, "train"), corpus.load_documents(cfg, "validation")


def test_stdlib_files_are_the_standard_library():
    files = corpus.stdlib_files()
    names = {p.name for p in files}
    assert len(files) > 500
    assert files == sorted(files)
    assert "os.py" in names and "decoder.py" in names
    assert not any(part in ("site-packages", "dist-packages") for p in files for part in p.parts)


def test_stdlib_split_is_disjoint_and_honours_val_fraction(stdlib_splits):
    train, validation = stdlib_splits
    train_names = {d.name for d in train}
    val_names = {d.name for d in validation}
    assert train and validation
    assert not train_names & val_names
    assert len(train_names) == len(train)  # Names are unique.
    assert all(d.text for d in train + validation)
    # 0.05 of ~1800 files: the binomial standard deviation is ~0.005.
    assert 0.03 < len(validation) / (len(train) + len(validation)) < 0.07
    # Names are portable (relative to the stdlib root), so the split holds on any machine.
    assert "os.py" in train_names | val_names


def test_stdlib_split_is_deterministic(stdlib_splits):
    cfg = data_config(source="stdlib", val_fraction=0.05, max_doc_chars=10_000_000)
    again = corpus.load_documents(cfg, "validation")
    assert again == stdlib_splits[1]


def test_split_depends_only_on_names(tmp_path):
    texts = {f"sub/doc{i:02d}.txt": f"document {i}\n" for i in range(40)}
    for root in ("machine_a", "machine_b"):
        write_texts(tmp_path / root, texts)
    splits = []
    for root in ("machine_a", "machine_b"):
        cfg = data_config(paths=(str(tmp_path / root / "**" / "*.txt"), ))
        splits.append([corpus.load_documents(cfg, s) for s in corpus.SPLITS])
    assert splits[0] == splits[1]
    train, validation = splits[0]
    assert {d.name for d in train} | {d.name for d in validation} == set(texts)
    assert not {d.name for d in train} & {d.name for d in validation}
    assert [d.name for d in train] == sorted(d.name for d in train)


def test_long_documents_are_split_not_dropped(tmp_path):
    long_text = "".join(f"line {i:04d} of a long file\n" for i in range(500))
    write_texts(tmp_path, {"long.txt": long_text, "short.txt": "short\n"})
    cfg = data_config(paths=(str(tmp_path / "*.txt"), ), max_doc_chars=1000)
    docs = corpus.load_documents(cfg, "train") + corpus.load_documents(cfg, "validation")
    pieces = [d for d in docs if d.name.startswith("long.txt#")]
    assert len(pieces) >= len(long_text) // 1000
    assert all(len(d.text) <= 1000 for d in pieces)
    assert "".join(d.text for d in pieces) == long_text
    assert all(d.text.endswith("\n") for d in pieces)  # Cut at line ends when possible.
    assert [d.name for d in pieces] == [f"long.txt#{k}" for k in range(len(pieces))]


def test_split_text_hard_cuts_a_line_without_newlines():
    assert corpus.split_text("abcdefghij", 4) == ["abcd", "efgh", "ij"]
    # A newline in the front half would make a short piece, so the cut is hard.
    assert corpus.split_text("a\nbcdefgh", 4) == ["a\nbc", "defg", "h"]
    assert corpus.split_text("abc\ndefgh", 4) == ["abc\n", "defg", "h"]


def test_empty_and_non_utf8_files_are_counted(tmp_path, caplog):
    write_texts(tmp_path, {
        "a.txt": "good text\n",
        "b.txt": b"bad \xff\xfe bytes\n",
        "c.txt": "",
        "d.txt": "  \n"
    })
    cfg = data_config(paths=(str(tmp_path / "*.txt"), ), val_fraction=1e-9)
    with caplog.at_level(logging.INFO):
        docs = corpus.load_documents(cfg, "train")
    assert [d.name for d in docs] == ["a.txt", "b.txt"]
    assert docs[1].text == "bad \ufffd\ufffd bytes\n"
    assert "skipped 2 empty files" in caplog.text
    assert "1 files had invalid UTF-8" in caplog.text


def test_missing_file_and_empty_glob_name_data_paths(tmp_path):
    write_texts(tmp_path, {"a.txt": "text\n"})
    missing = str(tmp_path / "missing.txt")
    with pytest.raises(ValueError, match=r"data\.paths.*missing\.txt.*does not exist"):
        corpus.load_documents(data_config(paths=(str(tmp_path / "a.txt"), missing)), "train")
    with pytest.raises(ValueError, match=r"data\.paths.*\*\.json.*matches no file"):
        corpus.load_documents(data_config(paths=(str(tmp_path / "*.json"), )), "train")
    with pytest.raises(ValueError, match=r"data\.paths.*is a directory"):
        corpus.load_documents(data_config(paths=(str(tmp_path), )), "train")


def test_bad_config_values_name_the_field():
    with pytest.raises(ValueError, match=r"data\.source.*'stdlib', 'text', 'jsonl'"):
        corpus.load_documents(data_config(source="parquet", paths=("x", )), "train")
    with pytest.raises(ValueError, match=r"data\.val_fraction"):
        corpus.load_documents(data_config(val_fraction=1.0), "train")
    with pytest.raises(ValueError, match=r"split"):
        corpus.load_documents(data_config(), "test")


def write_jsonl(path: pathlib.Path, lines: list) -> None:
    path.write_text("".join(l if isinstance(l, str) else json.dumps(l) + "\n" for l in lines))


def test_jsonl_records_become_documents(tmp_path):
    write_jsonl(tmp_path / "a.jsonl", [{"text": "first", "id": 1}, "\n", {"text": "third"}, {"text": ""}])
    write_jsonl(tmp_path / "b.jsonl", [{"text": "other file ü"}])
    cfg = data_config(source="jsonl", paths=(str(tmp_path / "*.jsonl"), ), val_fraction=1e-9)
    docs = corpus.load_documents(cfg, "train")
    assert docs == [
        corpus.Document("a.jsonl:1", "first"),
        corpus.Document("a.jsonl:3", "third"),
        corpus.Document("b.jsonl:1", "other file ü")
    ]


def test_malformed_jsonl_line_names_file_and_line(tmp_path):
    path = tmp_path / "bad.jsonl"
    write_jsonl(path, [{"text": "ok"}, {"text": "ok"}, '{"text": "unterminated\n'])
    cfg = data_config(source="jsonl", paths=(str(path), ))
    with pytest.raises(ValueError, match=rf"{path}:3: not valid JSON"):
        corpus.load_documents(cfg, "train")


def test_jsonl_record_without_field_names_field_file_and_line(tmp_path):
    path = tmp_path / "nofield.jsonl"
    write_jsonl(path, [{"text": "ok"}, {"content": "wrong key"}])
    cfg = data_config(source="jsonl", paths=(str(path), ))
    with pytest.raises(ValueError, match=rf"{path}:2: .*data\.jsonl_field='text'.*content"):
        corpus.load_documents(cfg, "train")
    write_jsonl(path, [{"text": 7}])
    with pytest.raises(ValueError, match=rf"{path}:1: .*must hold a string"):
        corpus.load_documents(cfg, "train")


def test_overlapping_globs_read_each_file_once(tmp_path):
    write_texts(tmp_path, {"a.txt": "alpha\n", "b.txt": "beta\n"})
    cfg = data_config(paths=(str(tmp_path / "*.txt"), str(tmp_path / "a.txt")), val_fraction=1e-9)
    assert [d.name for d in corpus.load_documents(cfg, "train")] == ["a.txt", "b.txt"]


@pytest.mark.parametrize("fraction", [1.0, 0.3, 0.0])
def test_worksheet_pages_show_steps_in_the_asked_share_of_tagged_solutions(fraction):
    thoughts = [line.split("<think>")[1] for doc in corpus.worksheet_documents(("multiplication:3",), 600, fraction)
                for line in doc.text.split("\n\n") if "<think>" in line and line.startswith("User:")]
    shown = sum(thought.count("=") > 1 for thought in thoughts) / len(thoughts)  # steps: several equations
    assert len(thoughts) > 300
    assert shown == pytest.approx(fraction, abs=0.05)

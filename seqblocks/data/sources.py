"""Where documents come from: text files, folders, globs, JSONL, Parquet / Arrow and HF ``datasets``.

``iter_documents(sources)`` yields the documents of every source in order, one string each,
lazily: a corpus larger than memory streams through (a Parquet or Arrow file is read a record batch
at a time, a JSONL file a line at a time). A source is

- a text file (any suffix not listed below): the whole file is one document;
- a ``.jsonl`` file: one JSON object per line, the document in its ``text_field``;
- a ``.parquet`` or ``.arrow`` file: the ``text_field`` column, one document per row;
- a folder: the files under it (recursively, sorted by path, hidden ones skipped) whose suffix is
  one of ``FOLDER_SUFFIXES``; a folder written by ``datasets.Dataset.save_to_disk`` is read as a dataset;
- a glob (``"corpus/**/*.txt"``): the matching files, sorted;
- ``"hf:NAME"`` or ``"hf:NAME:SPLIT"``: ``datasets.load_dataset(NAME, split=SPLIT)`` (default split
  "train"), from the local cache when ``HF_DATASETS_OFFLINE=1`` is set, as no test here downloads.

pyarrow and datasets are the optional extra ``data``, imported only for those sources.
"""

from __future__ import annotations

import glob
import json
import os
from collections.abc import Iterator, Sequence
from pathlib import Path

from seqblocks.tokenizers import missing_extra

__all__ = ["iter_documents", "expand_sources", "FOLDER_SUFFIXES"]

FOLDER_SUFFIXES = (".txt", ".text", ".md", ".rst", ".jsonl", ".parquet", ".arrow")


def _is_saved_dataset(path: Path) -> bool:
    return path.is_dir() and ((path / "dataset_info.json").is_file() or (path / "dataset_dict.json").is_file())


def expand_sources(sources: str | os.PathLike | Sequence[str | os.PathLike]) -> list[str]:
    """The sources as a list of files, saved-dataset folders and ``hf:`` names, in reading order.

    Raises:
        FileNotFoundError: a path that does not exist, or a glob or folder that matches no file.
    """
    if isinstance(sources, str | os.PathLike):
        sources = [sources]
    if not sources:
        raise ValueError("no data sources given: name text files, folders, globs, .jsonl/.parquet/.arrow files, "
                         "or hf:NAME")
    out: list[str] = []
    for source in sources:
        text = os.fspath(source)
        path = Path(text)
        if text.startswith("hf:") or _is_saved_dataset(path):
            out.append(text)
        elif path.is_dir():
            found = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix in FOLDER_SUFFIXES
                           and not any(part.startswith(".") for part in p.relative_to(path).parts))
            if not found:
                raise FileNotFoundError(f"folder {text!r} holds no file ending in {', '.join(FOLDER_SUFFIXES)}")
            out.extend(str(p) for p in found)
        elif path.is_file():
            out.append(text)
        elif glob.has_magic(text):
            found = sorted(p for p in glob.glob(text, recursive=True) if Path(p).is_file())
            if not found:
                raise FileNotFoundError(f"glob {text!r} matches no file")
            out.extend(found)
        else:
            raise FileNotFoundError(f"data source {text!r} does not exist")
    return out


def iter_documents(sources: str | os.PathLike | Sequence[str | os.PathLike], text_field: str = "text",
                   ) -> Iterator[str]:
    """Every document of ``sources``, in order (see the module docstring for what a source is).

    Args:
        sources: one source or a list of them.
        text_field (str): the field (JSONL) or column (Parquet, Arrow, datasets) holding the text.
            Default: "text".

    Raises:
        ValueError: a JSONL line that is not an object with a string ``text_field``, a table without
            that column; each message names the file (and line).
    """
    for source in expand_sources(sources):
        path = Path(source)
        if source.startswith("hf:") or _is_saved_dataset(path):
            yield from _dataset_documents(source, text_field)
        elif path.suffix == ".jsonl":
            yield from _jsonl_documents(path, text_field)
        elif path.suffix in (".parquet", ".arrow"):
            yield from _table_documents(path, text_field)
        else:
            yield path.read_text(encoding="utf-8", errors="replace")


def _jsonl_documents(path: Path, field: str) -> Iterator[str]:
    with open(path, encoding="utf-8", errors="replace") as handle:
        for number, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as err:
                raise ValueError(f"{path}:{number} is not JSON: {err}") from None
            if not isinstance(row, dict) or not isinstance(row.get(field), str):
                keys = sorted(row) if isinstance(row, dict) else type(row).__name__
                raise ValueError(f"{path}:{number} has no string field {field!r} (it has {keys}); choose the field "
                                 f"with text_field / --text-field")
            yield row[field]


def _column(batch, field: str, where: str):
    if field not in batch.schema.names:
        raise ValueError(f"{where} has no column {field!r} (it has {batch.schema.names}); choose it with "
                         f"text_field / --text-field")
    return batch.column(field).to_pylist()


def _table_documents(path: Path, field: str) -> Iterator[str]:
    try:
        import pyarrow  # noqa: F401  (the readers below import its submodules)
    except ImportError:
        raise missing_extra("pyarrow") from None
    if path.suffix == ".parquet":
        import pyarrow.parquet as pq

        parquet = pq.ParquetFile(path)
        if field not in parquet.schema_arrow.names:
            raise ValueError(f"{path} has no column {field!r} (it has {parquet.schema_arrow.names}); choose it with "
                             f"text_field / --text-field")
        for batch in parquet.iter_batches(columns=[field], batch_size=1024):
            yield from (t for t in _column(batch, field, str(path)) if t is not None)
        return
    import pyarrow as pa
    import pyarrow.ipc as ipc

    with pa.memory_map(str(path)) as source:
        try:
            reader = ipc.open_file(source)
            batches = (reader.get_batch(i) for i in range(reader.num_record_batches))
        except pa.ArrowInvalid:  # the streaming format, as datasets writes it
            source.seek(0)
            batches = iter(ipc.open_stream(source))
        for batch in batches:
            yield from (t for t in _column(batch, field, str(path)) if t is not None)


def _dataset_documents(source: str, field: str) -> Iterator[str]:
    try:
        import datasets
    except ImportError:
        raise missing_extra("datasets") from None
    if source.startswith("hf:"):
        name, _, split = source[3:].partition(":")
        data = datasets.load_dataset(name, split=split or "train")
    else:
        data = datasets.load_from_disk(source)
        if isinstance(data, datasets.DatasetDict):
            if "train" not in data:
                raise ValueError(f"dataset {source!r} has splits {sorted(data)} and no 'train'; name one with "
                                 f"its folder ({source}/SPLIT)")
            data = data["train"]
    if field not in data.column_names:
        raise ValueError(f"dataset {source!r} has no column {field!r} (it has {data.column_names}); choose it with "
                         f"text_field / --text-field")
    for batch in data.select_columns([field]).iter(batch_size=1024):
        yield from (t for t in batch[field] if t is not None)

"""``prepare``: tokenize a corpus once, in parallel, into memory-mapped token shards; ``Shards`` reads them.

A prepared directory holds

- ``train_000000.bin``, ``train_000001.bin``, ..., ``val_000000.bin``, ...: flat token ids, ``uint16``
  when the vocabulary fits in 16 bits, else ``uint32`` (little-endian). Documents follow each other,
  each ended by the tokenizer's end-of-document token (EOS); a document may continue into the next shard.
- ``tokenizer.json``: the tokenizer (``seqblocks.tokenizers``), whole.
- ``manifest.json``, written last: the format, dtype, vocabulary size, EOS id, tokenizer, and per split
  the shards with their token counts and SHA-256.

The split is by document and by content: a document goes to validation when a hash of its text falls
in the lowest ``val_fraction`` of the range. It therefore does not depend on the order of the
sources, the number of workers or what else the corpus holds; the same document always lands on the
same side. (A tiny corpus where one side would stay empty is the exception: it receives the last
document of the other side, or, for a single document, its tail.)

Crash safety: each shard is written under a temporary name (``.train_000000.bin.tmp-PID``), flushed
and renamed into place when full, and the manifest is written (atomically) only after every shard.
A new ``prepare`` deletes the old manifest before anything else. So ``Shards`` (which reads only what
the manifest lists, and checks every file's size against it) never takes a half-written shard or a
mix of two preparations for a complete one; an interrupted ``prepare`` leaves a directory it refuses
to open, with a message to prepare again.
"""

from __future__ import annotations

import bisect
import hashlib
import json
import multiprocessing
import os
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

from seqblocks.checkpoint import atomic_write_text
from seqblocks.tasks.base import stable_hash

__all__ = ["prepare", "Shards", "MANIFEST", "FORMAT", "is_prepared", "document_in_val"]

MANIFEST = "manifest.json"
TOKENIZER = "tokenizer.json"
FORMAT = "seqblocks-shards"
SPLITS = ("train", "val")


def _numpy():
    import numpy

    return numpy


def is_prepared(path: str | os.PathLike) -> bool:
    """Whether ``path`` is a directory that ``prepare`` completed."""
    return (Path(path) / MANIFEST).is_file()


def document_in_val(text: str, val_fraction: float) -> bool:
    """Whether a document goes to the validation split: a hash of its text, so the split is stable."""
    return (stable_hash("seqblocks-split", hashlib.sha256(text.encode("utf-8", "replace")).hexdigest()) % 1_000_000
            ) < val_fraction * 1_000_000


class _ShardWriter:
    """Appends token arrays to the shards of one split, each shard renamed into place when complete."""

    def __init__(self, directory: Path, split: str, dtype, shard_tokens: int) -> None:
        self.directory, self.split, self.dtype, self.shard_tokens = directory, split, dtype, shard_tokens
        self.shards: list[dict[str, Any]] = []
        self.documents = 0
        self._handle, self._tmp, self._count, self._hash = None, None, 0, None

    @property
    def tokens(self) -> int:
        return sum(s["tokens"] for s in self.shards) + self._count

    def write(self, tokens) -> None:
        self.documents += 1
        while len(tokens):
            if self._handle is None:
                name = f"{self.split}_{len(self.shards):06d}.bin"
                self._tmp = self.directory / f".{name}.tmp-{os.getpid()}"
                self._handle, self._count, self._hash = open(self._tmp, "wb"), 0, hashlib.sha256()
            room = self.shard_tokens - self._count
            piece, tokens = tokens[:room], tokens[room:]
            data = piece.astype(self.dtype, copy=False).tobytes()
            self._handle.write(data)
            self._hash.update(data)
            self._count += len(piece)
            if self._count == self.shard_tokens:
                self._finish()

    def _finish(self) -> None:
        name = f"{self.split}_{len(self.shards):06d}.bin"
        self._handle.flush()
        os.fsync(self._handle.fileno())
        self._handle.close()
        os.replace(self._tmp, self.directory / name)
        self.shards.append({"file": name, "tokens": self._count, "sha256": self._hash.hexdigest()})
        self._handle, self._tmp, self._count = None, None, 0

    def close(self) -> None:
        if self._handle is not None and self._count:
            self._finish()

    def abort(self) -> None:
        if self._handle is not None:
            self._handle.close()
            Path(self._tmp).unlink(missing_ok=True)
            self._handle = None


_WORKER_TOKENIZER = None


def _init_worker(tokenizer_dict: dict[str, Any]) -> None:
    global _WORKER_TOKENIZER  # one tokenizer per worker process, built once
    from seqblocks.tokenizers import tokenizer_from_dict

    _WORKER_TOKENIZER = tokenizer_from_dict(tokenizer_dict)


def _encode_chunk(args: tuple[list[str], float]) -> list[tuple[bool, Any]]:
    """(goes to validation, int64 token array ending in EOS) for each document of a chunk."""
    texts, val_fraction = args
    np = _numpy()
    tok = _WORKER_TOKENIZER
    encoded = tok.encode_batch(texts) if hasattr(tok, "encode_batch") else [tok.encode(t) for t in texts]
    return [(document_in_val(text, val_fraction), np.asarray([*ids, tok.eos_id], dtype=np.int64))
            for text, ids in zip(texts, encoded)]


def _chunks(documents: Iterable[str], chars: int, val_fraction: float) -> Iterator[tuple[list[str], float]]:
    chunk, size = [], 0
    for text in documents:
        if not text:
            continue
        chunk.append(text)
        size += len(text)
        if size >= chars:
            yield chunk, val_fraction
            chunk, size = [], 0
    if chunk:
        yield chunk, val_fraction


def _clear(directory: Path) -> None:
    """Remove what an earlier preparation left, the manifest first (the directory is then not 'prepared')."""
    (directory / MANIFEST).unlink(missing_ok=True)
    for entry in directory.iterdir():
        name = entry.name
        if entry.is_file() and ((name.endswith(".bin") and name.split("_")[0] in SPLITS) or
                                (name.startswith(".") and ".tmp-" in name)):
            entry.unlink()


def prepare(sources: str | os.PathLike | Sequence[str | os.PathLike], tokenizer: Any, out_dir: str | os.PathLike,
            *, val_fraction: float = 0.01, text_field: str = "text", shard_tokens: int = 1 << 27,
            workers: int | None = None, chunk_chars: int = 1 << 20, progress: bool = True) -> dict[str, Any]:
    """Tokenize ``sources`` into token shards in ``out_dir``; returns the manifest.

    Documents stream from the sources (``seqblocks.data.sources``) in chunks of about ``chunk_chars``
    characters, are encoded by ``workers`` processes, and are written in source order, so the
    shards are the same for any number of workers.

    Args:
        sources: text files, folders, globs, ``.jsonl`` / ``.parquet`` / ``.arrow`` files, saved
            datasets or ``hf:NAME`` (see ``iter_documents``).
        tokenizer: a tokenizer or what ``load_tokenizer`` accepts; it needs an end-of-document token.
        out_dir (str | PathLike): the directory to write (created; an earlier preparation there is replaced).
        val_fraction (float): share of documents held out for validation, in [0, 1). Default: 0.01.
        text_field (str): the text field of JSONL / table sources. Default: "text".
        shard_tokens (int): tokens per shard file. Default: 2**27 (256 MiB of uint16).
        workers (int | None): encoding processes; 1 encodes in this process. Default: None (the CPU
            count, at most 8).
        chunk_chars (int): characters per unit of work handed to a worker. Default: 2**20.
        progress (bool): a tqdm progress bar over documents. Default: True.

    Raises:
        ValueError: a tokenizer without an end-of-document token, a bad ``val_fraction`` /
            ``shard_tokens`` / ``workers``, or a corpus without any text.
    """
    from seqblocks.data.sources import expand_sources, iter_documents
    from seqblocks.tokenizers import load_tokenizer

    np = _numpy()
    tok = load_tokenizer(tokenizer)
    if tok.eos_id is None:
        raise ValueError("the tokenizer has no end-of-document token to separate documents with; train one with "
                         "`seqblocks tokenizer train` (it has <|endoftext|>), or use 'char' or a tiktoken encoding")
    if not 0.0 <= val_fraction < 1.0:
        raise ValueError(f"val_fraction={val_fraction!r} must be in [0, 1)")
    if shard_tokens < 1 or chunk_chars < 1:
        raise ValueError(f"shard_tokens={shard_tokens} and chunk_chars={chunk_chars} must be positive")
    workers = min(os.cpu_count() or 1, 8) if workers is None else workers
    if workers < 1:
        raise ValueError(f"workers={workers} must be at least 1")
    files = expand_sources(sources)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    _clear(out)
    dtype = np.uint16 if tok.vocab_size <= 1 << 16 else np.uint32
    writers = {s: _ShardWriter(out, s, dtype, shard_tokens) for s in SPLITS}
    held: dict[str, Any] = {s: None for s in SPLITS}  # the last document of each split, written one late
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(desc="prepare", unit=" docs", dynamic_ncols=True)
    chunks = _chunks(iter_documents(files, text_field), chunk_chars, val_fraction)
    pool = None
    try:
        if workers == 1:
            _init_worker(tok.to_dict())
            results: Iterator = map(_encode_chunk, chunks)
        else:
            methods = multiprocessing.get_all_start_methods()
            context = multiprocessing.get_context("fork" if "fork" in methods else "spawn")
            pool = context.Pool(workers, initializer=_init_worker, initargs=(tok.to_dict(),))
            results = pool.imap(_encode_chunk, chunks)
        for encoded in results:
            for in_val, ids in encoded:
                split = "val" if in_val else "train"
                if held[split] is not None:
                    writers[split].write(held[split])
                held[split] = ids
            if bar is not None:
                bar.update(len(encoded))
                bar.set_postfix(tokens=f"{sum(w.tokens for w in writers.values()):,}", refresh=False)
        _fill_empty_split(writers, held, val_fraction)
        for split in SPLITS:
            if held[split] is not None:
                writers[split].write(held[split])
            writers[split].close()
        if bar is not None:
            bar.set_postfix(tokens=f"{sum(w.tokens for w in writers.values()):,}", refresh=True)
    except BaseException:
        for writer in writers.values():
            writer.abort()
        raise
    finally:
        if pool is not None:
            pool.terminate()
        if bar is not None:
            bar.close()
    if writers["train"].tokens == 0:
        raise ValueError(f"the sources hold no text: {files[:5]}{' ...' if len(files) > 5 else ''}")
    tok.save(out / TOKENIZER)
    manifest = {"format": FORMAT, "version": 1, "dtype": np.dtype(dtype).name, "vocab_size": tok.vocab_size,
                "eos_id": tok.eos_id, "val_fraction": val_fraction, "text_field": text_field,
                "sources": [os.fspath(s) for s in ([sources] if isinstance(sources, str | os.PathLike) else sources)],
                "splits": {s: {"tokens": w.tokens, "documents": w.documents, "shards": w.shards}
                           for s, w in writers.items()},
                "tokenizer": tok.to_dict()}
    atomic_write_text(out / MANIFEST, json.dumps(manifest, indent=1))
    return manifest


def _fill_empty_split(writers: dict[str, _ShardWriter], held: dict[str, Any], val_fraction: float) -> None:
    """A split left without any document takes the other's last one (its tail, if that is the only one)."""
    if val_fraction == 0.0:
        return
    for empty, other in (("val", "train"), ("train", "val")):
        if writers[empty].documents or held[empty] is not None or held[other] is None:
            continue
        if writers[other].documents:
            held[empty], held[other] = held[other], None
        else:  # one document in all: its head trains, its tail validates
            ids = held[other]
            cut = min(max(1, int(len(ids) * (1 - val_fraction))), len(ids) - 1)
            held["train"], held["val"] = ids[:cut], ids[cut:]


class Shards:
    """The token shards of a prepared directory, memory-mapped (a corpus larger than memory is fine).

    Args:
        path (str | PathLike): a directory ``prepare`` completed.
        verify (bool): also check every shard's SHA-256 (reads everything once). Default: False.

    Raises:
        ValueError: no manifest (not prepared, or an interrupted ``prepare``), another format, or a
            shard whose size (or hash) differs from the manifest's.
    """

    def __init__(self, path: str | os.PathLike, verify: bool = False) -> None:
        np = _numpy()
        self.path = Path(path)
        manifest_path = self.path / MANIFEST
        if not manifest_path.is_file():
            raise ValueError(f"{str(self.path)!r} is not a prepared data directory (no {MANIFEST}; an interrupted "
                             f"`seqblocks prepare` leaves none): run `seqblocks prepare SOURCES -o {self.path}`")
        self.manifest = json.loads(manifest_path.read_text())
        if self.manifest.get("format") != FORMAT:
            raise ValueError(f"{manifest_path} is not a {FORMAT} manifest")
        self.dtype = np.dtype(self.manifest["dtype"])
        self.eos_id: int = self.manifest["eos_id"]
        self.vocab_size: int = self.manifest["vocab_size"]
        self._arrays: dict[str, list] = {}
        self._offsets: dict[str, list[int]] = {}
        for split in SPLITS:
            arrays, offsets = [], [0]
            for shard in self.manifest["splits"][split]["shards"]:
                file = self.path / shard["file"]
                expected = shard["tokens"] * self.dtype.itemsize
                size = file.stat().st_size if file.is_file() else None
                if size != expected:
                    raise ValueError(f"shard {file} is {'missing' if size is None else f'{size} bytes'}, the manifest "
                                     f"says {expected} bytes: prepare the data again")
                array = np.memmap(file, dtype=self.dtype, mode="r", shape=(shard["tokens"],))
                if verify and hashlib.sha256(array.tobytes()).hexdigest() != shard["sha256"]:
                    raise ValueError(f"shard {file} does not match its SHA-256 in the manifest: prepare the data again")
                arrays.append(array)
                offsets.append(offsets[-1] + shard["tokens"])
            self._arrays[split], self._offsets[split] = arrays, offsets

    def tokenizer(self):
        from seqblocks.tokenizers import tokenizer_from_dict

        return tokenizer_from_dict(self.manifest["tokenizer"])

    def num_tokens(self, split: str) -> int:
        return self._offsets[split][-1]

    def read(self, split: str, start: int, length: int):
        """Tokens ``start .. start + length`` of ``split``'s stream (across shard ends), as an int64 numpy array."""
        np = _numpy()
        offsets, arrays = self._offsets[split], self._arrays[split]
        if start < 0 or start + length > offsets[-1]:
            raise ValueError(f"tokens {start}..{start + length} are outside the {offsets[-1]} tokens of split "
                             f"{split!r}")
        pieces, position, end = [], start, start + length
        shard = bisect.bisect_right(offsets, position) - 1
        while position < end:
            take = min(end, offsets[shard + 1]) - position
            local = position - offsets[shard]
            pieces.append(arrays[shard][local:local + take])
            position += take
            shard += 1
        return np.concatenate(pieces).astype(np.int64) if len(pieces) > 1 else pieces[0].astype(np.int64)

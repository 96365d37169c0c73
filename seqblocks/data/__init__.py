"""Your own text as training data: sources (files, folders, globs, JSONL, Parquet / Arrow, HF datasets),
``prepare`` into memory-mapped token shards, the ``shards`` task the trainer reads, and streaming.

See docs/data.md for the formats and the guarantees (stable split, crash-safe shards).
"""

from seqblocks.data.dataset import PackedBatch, ShardTask, pack_rows, stream_batches
from seqblocks.data.shards import MANIFEST, Shards, document_in_val, is_prepared, prepare
from seqblocks.data.sources import FOLDER_SUFFIXES, expand_sources, iter_documents

__all__ = ["PackedBatch", "ShardTask", "pack_rows", "stream_batches", "MANIFEST", "Shards", "document_in_val",
           "is_prepared", "prepare", "FOLDER_SUFFIXES", "expand_sources", "iter_documents"]

"""Streaming packed batches from raw text, and the packed-batch types of the ``shards`` task.

``PackedBatch``, ``pack_rows`` and ``ShardTask`` live in ``seqblocks.tasks.shards`` (the task registry
holds them) and are re-exported here.

Shapes: B batch, T time.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Sequence
from typing import Any

import torch

from seqblocks.tasks.shards import PackedBatch, ShardTask, pack_rows

__all__ = ["PackedBatch", "ShardTask", "pack_rows", "stream_batches"]


def stream_batches(sources: str | os.PathLike | Sequence[str | os.PathLike], tokenizer: Any, seq_len: int,
                   batch_size: int, *, text_field: str = "text", mask_boundaries: bool = True,
                   ) -> Iterator[PackedBatch]:
    """Packed batches straight from raw text, tokenized as it is read: for a corpus larger than memory
    (or disk) that is read once, without ``prepare``. Rows do not overlap; the last partial batch is dropped.

    Args:
        sources: what ``iter_documents`` reads.
        tokenizer: a tokenizer or what ``load_tokenizer`` accepts (with an end-of-document token).
        seq_len (int): T. batch_size (int): B.
        text_field (str): the text field of JSONL / table sources. Default: "text".
        mask_boundaries (bool): as in ``pack_rows``. Default: True.
    """
    from seqblocks.data.sources import iter_documents
    from seqblocks.tokenizers import load_tokenizer

    tok = load_tokenizer(tokenizer)
    if tok.eos_id is None:
        raise ValueError("the tokenizer has no end-of-document token to separate documents with")
    if seq_len <= 0 or batch_size <= 0:
        raise ValueError(f"seq_len={seq_len} and batch_size={batch_size} must be positive")
    need = batch_size * (seq_len + 1)
    buffer: list[int] = []
    for text in iter_documents(sources, text_field):
        buffer.extend(tok.encode(text))
        buffer.append(tok.eos_id)
        while len(buffer) >= need:
            rows = torch.tensor(buffer[:need], dtype=torch.long).view(batch_size, seq_len + 1)
            del buffer[:need]
            yield pack_rows(rows, tok.eos_id, mask_boundaries)

"""Training on prepared shards: the ``shards`` task, packed batches with document boundaries, and streaming.

Rows are packed: a row is ``seq_len + 1`` consecutive tokens of the split's stream, where documents
follow each other separated by EOS, so one row may hold the end of one document and the start of the
next. Each row comes with its document boundaries:

- ``PackedBatch.doc_ids`` [B, T]: the index, within its row, of the document each input token
  belongs to (an EOS is the last token of its document; the token after it starts the next);
- ``PackedBatch.cu_seqlens()`` [N + 1] int32: the start offset of every document piece in the
  flattened [B * T] batch, with ``B * T`` last, the form variable-length attention kernels take.

The target of an EOS input (the first token of the next document, predicted from the previous one)
is not scored (``IGNORE_INDEX``) when ``mask_boundaries`` is set: no loss crosses a document
boundary. The trainer passes ``cu_seqlens=`` to the model only with ``TrainConfig.pack_boundaries``,
for a model whose forward accepts it.

Shapes: B batch, T time, N documents (pieces) in a batch.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any

import torch

from seqblocks.tasks.base import IGNORE_INDEX, Batch, Task

__all__ = ["PackedBatch", "ShardTask", "pack_rows"]


@dataclasses.dataclass
class PackedBatch(Batch):
    """A ``Batch`` of packed rows with their document boundaries.

    Attributes:
        input_ids (Tensor): [B, T] int64.
        targets (Tensor): [B, T] int64; ``IGNORE_INDEX`` after an EOS when boundaries are masked.
        document_ids (Tensor): [B, T] int64 document index of each input token within its row (``Batch``'s
            field; ``doc_ids`` is the same tensor).
    """

    @property
    def doc_ids(self) -> torch.Tensor:
        return self.document_ids

    def __getitem__(self, rows: slice) -> PackedBatch:
        return PackedBatch(self.input_ids[rows], self.targets[rows], self.document_ids[rows])

    def to(self, device: torch.device | str) -> PackedBatch:
        return PackedBatch(self.input_ids.to(device, non_blocking=True), self.targets.to(device, non_blocking=True),
                           self.document_ids.to(device, non_blocking=True))

    def cu_seqlens(self) -> torch.Tensor:
        """[N + 1] int32 offsets of the document pieces in the flattened batch, starting 0, ending B * T."""
        B, T = self.document_ids.shape
        starts = torch.ones(B, T, dtype=torch.bool, device=self.document_ids.device)
        starts[:, 1:] = self.document_ids[:, 1:] != self.document_ids[:, :-1]
        offsets = starts.flatten().nonzero().flatten()
        end = torch.tensor([B * T], device=offsets.device)
        return torch.cat([offsets, end]).to(torch.int32)


def pack_rows(rows: torch.Tensor, eos_id: int, mask_boundaries: bool = True) -> PackedBatch:
    """[B, T + 1] token rows -> the batch of inputs, next-token targets and document ids.

    Args:
        rows (Tensor): [B, T + 1] int64 consecutive tokens.
        eos_id (int): the end-of-document token.
        mask_boundaries (bool): do not score the target of an EOS input. Default: True.
    """
    inputs, targets = rows[:, :-1].contiguous(), rows[:, 1:].clone()
    is_eos = inputs == eos_id
    if mask_boundaries:
        targets[is_eos] = IGNORE_INDEX
    doc_ids = torch.zeros_like(inputs)
    doc_ids[:, 1:] = is_eos[:, :-1].long().cumsum(dim=1)
    return PackedBatch(inputs, targets, doc_ids)


class ShardTask(Task):
    """Language modelling on a directory written by ``seqblocks prepare``.

    Training batches are random windows of the training stream (a pure function of the seed and the
    batch index, so a resumed run sees the same batches); the held-out set is consecutive,
    non-overlapping windows from the start of the validation stream. The tokenizer comes from the
    directory and is saved with every checkpoint.

    Args:
        path (str | None): the prepared directory (required).
        seq_len (int): T, tokens per row. Default: 256.
        mask_boundaries (bool): do not score predictions across a document boundary. Default: True.
        eval_examples (int): held-out windows scored by ``eval``. Default: 256.
    """

    name = "shards"
    description = "language modelling on your own text, tokenized by `seqblocks prepare` (option path=DIR)"
    is_language = True

    def __init__(self, path: str | None = None, seq_len: int = 256, mask_boundaries: bool = True, *,
                 eval_examples: int = 256) -> None:
        super().__init__(eval_examples=eval_examples)
        from seqblocks.data.shards import Shards

        if path is None:
            raise ValueError("task 'shards' needs path=DIR, a directory written by `seqblocks prepare`")
        if seq_len <= 0:
            raise ValueError(f"shards: seq_len={seq_len} must be positive")
        self.path, self._seq_len, self.mask_boundaries = os.fspath(path), seq_len, mask_boundaries
        self.shards = Shards(path)
        self.tokenizer = self.shards.tokenizer()
        n_train, n_val = self.shards.num_tokens("train"), self.shards.num_tokens("val")
        if n_train < seq_len + 1:
            raise ValueError(f"shards: the train split of {self.path!r} has {n_train} tokens, fewer than seq_len + 1 "
                             f"= {seq_len + 1}; use a smaller seq_len or more text")
        if n_val < 2:
            raise ValueError(f"shards: the validation split of {self.path!r} has {n_val} tokens; prepare it again "
                             f"with a larger val_fraction")

    @property
    def vocab_size(self) -> int:
        return self.shards.vocab_size

    @property
    def seq_len(self) -> int:
        return self._seq_len

    def config(self) -> dict[str, Any]:
        return {"path": self.path, "seq_len": self._seq_len, "mask_boundaries": self.mask_boundaries,
                "eval_examples": self.eval_examples}

    def _rows(self, split: str, starts: list[int], length: int | None = None) -> PackedBatch:
        import numpy as np

        rows = np.stack([self.shards.read(split, s, (length or self._seq_len) + 1) for s in starts])
        return pack_rows(torch.from_numpy(rows), self.shards.eos_id, self.mask_boundaries)

    def _make(self, split: str, generator: torch.Generator, batch_size: int) -> PackedBatch:
        high = self.shards.num_tokens(split) - self._seq_len
        return self._rows(split, torch.randint(0, high, (batch_size,), generator=generator).tolist())

    def eval_batches(self, batch_size: int, seed: int = 0) -> list[Batch]:
        """Consecutive non-overlapping windows from the start of the validation stream (seed unused).

        A validation split shorter than a row (a tiny corpus) is scored as one shorter row."""
        if batch_size <= 0:
            raise ValueError(f"batch_size={batch_size} must be positive")
        length = min(self._seq_len, self.shards.num_tokens("val") - 1)
        count = min(self.eval_examples, (self.shards.num_tokens("val") - 1) // length)
        starts = [i * length for i in range(count)]
        return [self._rows("val", starts[i:i + batch_size], length) for i in range(0, count, batch_size)]

    def decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids)

"""Text-to-text tasks for an encoder-decoder: reverse or sort a random string of letters.

Source and target share one vocabulary: 0 padding, 1 BOS, 2 EOS, then the letters. A source row is
the string, right-padded with 0 (the encoder masks padding: ``seqblocks.train.models``). The decoder
input is BOS followed by the answer; the targets are the answer followed by EOS, ``IGNORE_INDEX`` on
padding. Every example is drawn from the batch's own generator, so batches are a pure function of
(seed, split, index).

Shapes: B batch, S source length, T target length.
"""

from __future__ import annotations

import string
from typing import Any

import torch

from seqblocks.tasks.base import IGNORE_INDEX, Batch, Task

__all__ = ["StringTransduction", "PAD_ID", "BOS_ID", "EOS_ID"]

PAD_ID, BOS_ID, EOS_ID = 0, 1, 2
_OPS = ("reverse", "sort")


class StringTransduction(Task):
    """Map a random string to its reversal (``op="reverse"``) or its sorted letters (``op="sort"``).

    Args:
        op (str): "reverse" or "sort". Default: "reverse".
        min_len (int): shortest string. Default: 4.
        max_len (int): longest string (S; the targets are max_len + 1 long). Default: 16.
        num_letters (int): alphabet size, at most 26 (the letters a, b, ...). Default: 16.
        eval_examples (int): held-out examples. Default: 256.
    """

    name = "seq2seq"
    description = "encoder-decoder text-to-text: reverse or sort a random string (op=reverse|sort)"
    kind = "seq2seq"

    def __init__(self, op: str = "reverse", min_len: int = 4, max_len: int = 16, num_letters: int = 16, *,
                 eval_examples: int = 256) -> None:
        super().__init__(eval_examples=eval_examples)
        if op not in _OPS:
            raise ValueError(f"seq2seq: op={op!r}; expected one of {_OPS}")
        if not 1 <= min_len <= max_len:
            raise ValueError(f"seq2seq: need 1 <= min_len <= max_len, got min_len={min_len}, max_len={max_len}")
        if not 2 <= num_letters <= 26:
            raise ValueError(f"seq2seq: num_letters={num_letters} must be in [2, 26]")
        self.op, self.min_len, self.max_len, self.num_letters = op, min_len, max_len, num_letters

    @property
    def vocab_size(self) -> int:
        return 3 + self.num_letters

    @property
    def seq_len(self) -> int:
        return self.max_len + 1

    def config(self) -> dict[str, Any]:
        return {"op": self.op, "min_len": self.min_len, "max_len": self.max_len, "num_letters": self.num_letters,
                "eval_examples": self.eval_examples}

    def _make(self, split: str, generator: torch.Generator, batch_size: int) -> Batch:
        B, S = batch_size, self.max_len
        lengths = torch.randint(self.min_len, S + 1, (B,), generator=generator)
        letters = torch.randint(3, 3 + self.num_letters, (B, S), generator=generator)
        valid = torch.arange(S)[None] < lengths[:, None]
        src = letters.masked_fill(~valid, PAD_ID)
        if self.op == "reverse":
            # position i of the answer is letter lengths - 1 - i of the source
            idx = (lengths[:, None] - 1 - torch.arange(S)[None]).clamp(min=0)
            answer = src.gather(1, idx).masked_fill(~valid, PAD_ID)
        else:  # padding (0) sorts first: move it to the end
            answer = torch.where(valid, src, torch.full_like(src, 1 << 20)).sort(dim=1).values
            answer = answer.masked_fill(~valid, PAD_ID)
        full = torch.cat([torch.full((B, 1), BOS_ID), answer], 1)  # [B, S + 1]
        tgt_in = full.clone()
        targets = torch.cat([answer, torch.zeros(B, 1, dtype=torch.long)], 1)
        targets[torch.arange(B), lengths] = EOS_ID
        targets = targets.masked_fill(torch.arange(S + 1)[None] > lengths[:, None], IGNORE_INDEX)
        return Batch(tgt_in, targets, src_ids=src)

    def decode(self, ids: list[int]) -> str:
        special = {PAD_ID: "", BOS_ID: "<s>", EOS_ID: "</s>"}
        return "".join(special.get(i, string.ascii_lowercase[i - 3] if 3 <= i < self.vocab_size else "?")
                       for i in ids)

"""Sequence-length warmup: train on the first ``L(step)`` tokens of each row, growing ``L`` linearly
from ``seq_len_start`` to the task's full length over ``seq_len_warmup`` steps (rounded down to a
multiple of 8, never below ``seq_len_start``). Short sequences early make the first steps cheap and
stable (Li et al. 2022, "The stability-efficiency dilemma"); every row keeps its prefix, so the
targets stay the next tokens of the same text.

Rows whose scored targets all lie past ``L`` (the copy of a copying task) contribute nothing until
``L`` reaches them: the warmup is meant for language-model tasks.
"""

from __future__ import annotations

from seqblocks.tasks import Batch

__all__ = ["curriculum_seq_len", "curriculum_batch"]


def curriculum_seq_len(step: int, full_len: int, warmup_steps: int, start_len: int) -> int:
    """The training length at optimizer step ``step`` (0-based); ``full_len`` once the warmup is over."""
    if warmup_steps <= 0 or step >= warmup_steps or start_len >= full_len:
        return full_len
    length = start_len + (full_len - start_len) * step / warmup_steps
    return max(start_len, min(full_len, int(length) // 8 * 8))


def curriculum_batch(batch: Batch, step: int, warmup_steps: int, start_len: int) -> Batch:
    """``batch`` cut to ``curriculum_seq_len`` tokens per row (unchanged when the warmup is off or over)."""
    T = batch.input_ids.shape[1]
    L = curriculum_seq_len(step, T, warmup_steps, start_len)
    if L >= T:
        return batch
    return Batch(batch.input_ids[:, :L].contiguous(), batch.targets[:, :L].contiguous())

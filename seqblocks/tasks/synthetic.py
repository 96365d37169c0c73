"""Synthetic sequence tasks that probe what a mixer can remember: MQAR, selective copying, induction
heads, copying. Every example is generated on the fly from a seeded generator; nothing is downloaded.

Token conventions shared by the tasks: 0 is the blank / filler token, 1 the separator or trigger, and
content tokens start at 2 (MQAR splits its content range into keys and values).

Shapes: B batch, T time, N pairs / data tokens.
"""

from __future__ import annotations

from typing import Any

import torch

from seqblocks.tasks.base import IGNORE_INDEX, Batch, Task

__all__ = ["MQAR", "SelectiveCopying", "InductionHeads", "Copying"]

BLANK, SEP = 0, 1


def _check(task: str, condition: bool, message: str) -> None:
    if not condition:
        raise ValueError(f"{task}: {message}")


def _random_distinct(generator: torch.Generator, rows: int, low: int, high: int, count: int) -> torch.Tensor:
    """[rows, count] distinct integers per row drawn uniformly from [low, high)."""
    scores = torch.rand(rows, high - low, generator=generator)
    return scores.argsort(dim=1)[:, :count] + low


class MQAR(Task):
    """Multi-query associative recall (Zoology): recall the value bound to each queried key.

    A row is ``k1 v1 k2 v2 ... kN vN`` followed by a query region of blanks in which every key
    appears again (in random order, at random even offsets). The model is scored on predicting, at
    each query key, the value bound to it. The answers are not written into the query region, so
    the model cannot shortcut later queries by eliminating values it has already seen answered.
    Keys come from [2, 2 + num_keys), values from the rest.

    Args:
        vocab_size (int): total vocabulary (blank, separator, keys, values). Default: 128.
        num_kv_pairs (int): N, key-value pairs per row. Default: 8.
        seq_len (int): T, row length; at least 4N. Default: 64.
        eval_examples (int): held-out set size. Default: 512.
    """

    name = "mqar"
    description = "multi-query associative recall: recall the value bound to each queried key"

    def __init__(self, vocab_size: int = 128, num_kv_pairs: int = 8, seq_len: int = 64, *,
                 eval_examples: int = 512) -> None:
        super().__init__(eval_examples=eval_examples)
        _check("mqar", num_kv_pairs > 0, f"num_kv_pairs={num_kv_pairs} must be positive")
        _check("mqar", seq_len >= 4 * num_kv_pairs,
               f"seq_len={seq_len} must be at least 4 * num_kv_pairs = {4 * num_kv_pairs}")
        num_keys = (vocab_size - 2) // 2
        _check("mqar", num_keys >= num_kv_pairs,
               f"vocab_size={vocab_size} leaves {num_keys} keys, fewer than num_kv_pairs={num_kv_pairs}; "
               f"use vocab_size >= {2 * num_kv_pairs + 2}")
        self._vocab_size, self.num_kv_pairs, self._seq_len, self.num_keys = vocab_size, num_kv_pairs, seq_len, num_keys

    @property
    def vocab_size(self) -> int:
        return self._vocab_size

    @property
    def seq_len(self) -> int:
        return self._seq_len

    def config(self) -> dict[str, Any]:
        return {"vocab_size": self._vocab_size, "num_kv_pairs": self.num_kv_pairs, "seq_len": self._seq_len,
                "eval_examples": self.eval_examples}

    def _make(self, split: str, generator: torch.Generator, batch_size: int) -> Batch:
        B, N, T = batch_size, self.num_kv_pairs, self._seq_len
        keys = _random_distinct(generator, B, 2, 2 + self.num_keys, N)  # [B, N]
        values = torch.randint(2 + self.num_keys, self._vocab_size, (B, N), generator=generator)
        ids = torch.full((B, T), BLANK, dtype=torch.long)
        ids[:, 0:2 * N:2], ids[:, 1:2 * N:2] = keys, values
        # Query slots: N distinct 2-token slots in the region after the context, keys in random order.
        slots = _random_distinct(generator, B, 0, (T - 2 * N) // 2, N)  # [B, N]
        query_pos = 2 * N + 2 * slots
        order = _random_distinct(generator, B, 0, N, N)
        ids.scatter_(1, query_pos, keys.gather(1, order))
        targets = torch.full((B, T), IGNORE_INDEX, dtype=torch.long)
        targets.scatter_(1, query_pos, values.gather(1, order))
        return Batch(ids, targets)


class SelectiveCopying(Task):
    """Selective copying (Mamba paper): copy the content tokens scattered among blanks, in order.

    A row is a context of ``context_len`` positions holding ``num_tokens`` content tokens at random
    positions (blanks elsewhere), then a separator, then the content tokens again; the model is scored
    on the tokens after the separator (teacher forcing), so it must filter the blanks by content.

    Args:
        vocab_size (int): blank + separator + content tokens. Default: 16.
        num_tokens (int): content tokens to copy. Default: 8.
        context_len (int): positions they are scattered over. Default: 48.
        eval_examples (int): held-out set size. Default: 512.
    """

    name = "selective_copying"
    description = "copy the content tokens scattered among blanks, in order (Mamba's selective copying)"

    def __init__(self, vocab_size: int = 16, num_tokens: int = 8, context_len: int = 48, *,
                 eval_examples: int = 512) -> None:
        super().__init__(eval_examples=eval_examples)
        _check("selective_copying", vocab_size >= 3, f"vocab_size={vocab_size} must be at least 3")
        _check("selective_copying", 0 < num_tokens <= context_len,
               f"need 0 < num_tokens <= context_len, got num_tokens={num_tokens}, context_len={context_len}")
        self._vocab_size, self.num_tokens, self.context_len = vocab_size, num_tokens, context_len

    @property
    def vocab_size(self) -> int:
        return self._vocab_size

    @property
    def seq_len(self) -> int:
        return self.context_len + self.num_tokens

    def config(self) -> dict[str, Any]:
        return {"vocab_size": self._vocab_size, "num_tokens": self.num_tokens, "context_len": self.context_len,
                "eval_examples": self.eval_examples}

    def _make(self, split: str, generator: torch.Generator, batch_size: int) -> Batch:
        B, M, L = batch_size, self.num_tokens, self.context_len
        content = torch.randint(2, self._vocab_size, (B, M), generator=generator)
        positions = _random_distinct(generator, B, 0, L, M).sort(dim=1).values
        full = torch.full((B, L + 1 + M), BLANK, dtype=torch.long)
        full.scatter_(1, positions, content)
        full[:, L] = SEP
        full[:, L + 1:] = content
        targets = full[:, 1:].clone()
        targets[:, :L] = IGNORE_INDEX
        return Batch(full[:, :-1].contiguous(), targets)


class Copying(Task):
    """Copying: reproduce a random token string after a separator.

    A row is ``num_tokens`` random content tokens, a separator, then the same tokens; the model is
    scored on the copy (teacher forcing).

    Args:
        vocab_size (int): blank + separator + content tokens. Default: 16.
        num_tokens (int): length of the string to copy. Default: 16.
        eval_examples (int): held-out set size. Default: 512.
    """

    name = "copying"
    description = "reproduce a random token string after a separator"

    def __init__(self, vocab_size: int = 16, num_tokens: int = 16, *, eval_examples: int = 512) -> None:
        super().__init__(eval_examples=eval_examples)
        _check("copying", vocab_size >= 3, f"vocab_size={vocab_size} must be at least 3")
        _check("copying", num_tokens > 0, f"num_tokens={num_tokens} must be positive")
        self._vocab_size, self.num_tokens = vocab_size, num_tokens

    @property
    def vocab_size(self) -> int:
        return self._vocab_size

    @property
    def seq_len(self) -> int:
        return 2 * self.num_tokens

    def config(self) -> dict[str, Any]:
        return {"vocab_size": self._vocab_size, "num_tokens": self.num_tokens, "eval_examples": self.eval_examples}

    def _make(self, split: str, generator: torch.Generator, batch_size: int) -> Batch:
        B, M = batch_size, self.num_tokens
        content = torch.randint(2, self._vocab_size, (B, M), generator=generator)
        full = torch.cat([content, torch.full((B, 1), SEP, dtype=torch.long), content], dim=1)
        targets = full[:, 1:].clone()
        targets[:, :M] = IGNORE_INDEX
        return Batch(full[:, :-1].contiguous(), targets)


class InductionHeads(Task):
    """Induction heads: after ``trigger X ... trigger``, predict ``X``.

    A row is random content tokens in which the trigger token appears once at a random position,
    followed by some token X, and again as the last input; the model is scored on predicting X there.

    Args:
        vocab_size (int): blank + trigger + content tokens. Default: 16.
        seq_len (int): T, row length; at least 4. Default: 64.
        eval_examples (int): held-out set size. Default: 512.
    """

    name = "induction_heads"
    description = "after 'trigger X ... trigger', predict X (the induction-head mechanism)"

    def __init__(self, vocab_size: int = 16, seq_len: int = 64, *, eval_examples: int = 512) -> None:
        super().__init__(eval_examples=eval_examples)
        _check("induction_heads", vocab_size >= 3, f"vocab_size={vocab_size} must be at least 3")
        _check("induction_heads", seq_len >= 4, f"seq_len={seq_len} must be at least 4")
        self._vocab_size, self._seq_len = vocab_size, seq_len

    @property
    def vocab_size(self) -> int:
        return self._vocab_size

    @property
    def seq_len(self) -> int:
        return self._seq_len

    def config(self) -> dict[str, Any]:
        return {"vocab_size": self._vocab_size, "seq_len": self._seq_len, "eval_examples": self.eval_examples}

    def _make(self, split: str, generator: torch.Generator, batch_size: int) -> Batch:
        B, T = batch_size, self._seq_len
        ids = torch.randint(2, self._vocab_size, (B, T), generator=generator)
        # The first trigger leaves room for X and at least one token before the final trigger.
        trigger_pos = torch.randint(0, T - 2, (B, 1), generator=generator)
        ids.scatter_(1, trigger_pos, SEP)
        ids[:, -1] = SEP
        targets = torch.full((B, T), IGNORE_INDEX, dtype=torch.long)
        targets[:, -1] = ids.gather(1, trigger_pos + 1)[:, 0]
        return Batch(ids, targets)

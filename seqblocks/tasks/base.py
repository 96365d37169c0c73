"""The task contract: what the trainer, ``seqblocks eval`` and ``seqblocks bench tasks`` see of a task.

A task produces batches of token ids and next-token targets, deterministically from a seed and a
batch index, so that a run, its resumption and its distributed twin all see the same data:

- ``batch(split, index, batch_size, seed) -> Batch``: the ``index``-th batch of ``split``
  ("train" or "val"). The same arguments give the same tensors on every machine and process.
- ``eval_batches(batch_size, seed)``: the fixed held-out set (a finite list of batches).

Targets use ``IGNORE_INDEX`` (-100) where no prediction is scored (the prompt of a synthetic task).

Shapes: B batch, T time.
"""

from __future__ import annotations

import abc
import dataclasses
import hashlib
from typing import Any, ClassVar

import torch

__all__ = ["IGNORE_INDEX", "Batch", "Task", "batch_generator", "stable_hash"]

IGNORE_INDEX = -100


@dataclasses.dataclass
class Batch:
    """One batch of a task.

    Attributes:
        input_ids (Tensor): [B, T] int64 model inputs (a seq2seq task's decoder inputs).
        targets (Tensor): [B, T] int64 next-token targets; ``IGNORE_INDEX`` where not scored. A
            classification task's are [B, 1]: the label of each row.
        document_ids (Tensor | None): [B, T] int64 document of each token, for rows that pack several
            documents (the model then sees each document alone). Default: None.
        src_ids (Tensor | None): [B, S] int64 source tokens of a seq2seq task (the encoder input).
            Default: None.
    """

    input_ids: torch.Tensor
    targets: torch.Tensor
    document_ids: torch.Tensor | None = None
    src_ids: torch.Tensor | None = None

    def __getitem__(self, rows: slice) -> Batch:
        return Batch(*(None if t is None else t[rows] for t in self._tensors()))

    def _tensors(self) -> tuple[torch.Tensor | None, ...]:
        return self.input_ids, self.targets, self.document_ids, self.src_ids

    @property
    def num_targets(self) -> int:
        """How many positions are scored."""
        return int((self.targets != IGNORE_INDEX).sum())

    def to(self, device: torch.device | str) -> Batch:
        return Batch(*(None if t is None else t.to(device, non_blocking=True) for t in self._tensors()))


def stable_hash(*parts: Any) -> int:
    """A 63-bit hash of ``parts`` that is the same in every process (unlike ``hash()`` on str)."""
    digest = hashlib.sha256(repr(parts).encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


def batch_generator(seed: int, split: str, index: int) -> torch.Generator:
    """A CPU generator seeded from (seed, split, index): batch ``index`` never depends on earlier batches."""
    return torch.Generator().manual_seed(stable_hash("seqblocks-task", seed, split, index))


class Task(abc.ABC):
    """Base of the embedded tasks.

    Subclasses set ``name``, ``description`` and ``is_language`` (a language task prints samples and
    has a tokenizer), and implement ``vocab_size``, ``seq_len`` and ``_make(split, generator, batch_size)``.

    Args:
        eval_examples (int): size of the held-out set used by ``eval_batches``. Default: 512.
    """

    name: ClassVar[str] = ""
    description: ClassVar[str] = ""
    is_language: ClassVar[bool] = False
    #: what the task trains: "lm" (a causal LM's next tokens), "seq2seq" (an encoder-decoder: batches
    #: carry ``src_ids``) or "classification" (a classifier: targets [B, 1] are labels).
    kind: ClassVar[str] = "lm"

    def __init__(self, *, eval_examples: int = 512) -> None:
        if eval_examples <= 0:
            raise ValueError(f"{type(self).__name__}: eval_examples={eval_examples} must be positive")
        self.eval_examples = eval_examples

    @property
    @abc.abstractmethod
    def vocab_size(self) -> int:
        """Number of token ids the model must embed."""

    @property
    @abc.abstractmethod
    def seq_len(self) -> int:
        """Length T of every input row."""

    def model_fields(self) -> dict[str, Any]:
        """The model-config values the task fixes (``seqblocks train`` sets them): the vocabulary of a
        token task; an image task's classes, image size and channels."""
        return {"vocab_size": self.vocab_size}

    @abc.abstractmethod
    def config(self) -> dict[str, Any]:
        """The task's constructor arguments (JSON values): ``get_task(name, **config())`` rebuilds it."""

    @abc.abstractmethod
    def _make(self, split: str, generator: torch.Generator, batch_size: int) -> Batch:
        """``batch_size`` examples of ``split`` drawn with ``generator``."""

    def batch(self, split: str, index: int, batch_size: int, seed: int = 0) -> Batch:
        """The ``index``-th batch of ``split``; a pure function of the arguments.

        Raises:
            ValueError: unknown split, negative index or non-positive batch size.
        """
        if split not in ("train", "val"):
            raise ValueError(f"split must be 'train' or 'val', got {split!r}")
        if index < 0 or batch_size <= 0:
            raise ValueError(f"need index >= 0 and batch_size > 0, got index={index}, batch_size={batch_size}")
        return self._make(split, batch_generator(seed, split, index), batch_size)

    def eval_batches(self, batch_size: int, seed: int = 0) -> list[Batch]:
        """The held-out set: ``eval_examples`` examples of the "val" split, cut into batches of ``batch_size``.

        The examples do not depend on ``batch_size``.
        """
        if batch_size <= 0:
            raise ValueError(f"batch_size={batch_size} must be positive")
        full = self.batch("val", 0, self.eval_examples, seed)
        return [full[i:i + batch_size] for i in range(0, self.eval_examples, batch_size)]

    def token_bytes(self) -> torch.Tensor | None:
        """[vocab_size] int64 UTF-8 bytes of each token's text, for bits-per-byte; None for a task
        whose targets are not text (the default)."""
        return None

    def decode(self, ids: list[int]) -> str:
        """Render token ids as text (language tasks decode characters; synthetic ones list ids)."""
        return " ".join(str(i) for i in ids)

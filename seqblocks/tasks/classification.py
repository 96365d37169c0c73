"""Text classification from a file: ``(text, label)`` rows of a CSV or JSON Lines file.

Texts become UTF-8 bytes (token id = byte + 1; 0 is padding), cut to ``seq_len`` and right-padded;
the classifier pools the valid prefix (``seqblocks.train.models``). Labels are the file's distinct
label values in sorted order. Each row goes to the validation split when a hash of its index falls
in the lowest ``val_fraction`` of the range, so the split does not depend on the file's order of
labels and is the same in every process.

Shapes: B batch, T time.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Any

import torch

from seqblocks.tasks.base import Batch, Task, stable_hash

__all__ = ["TextClassification", "read_labelled_texts"]


def read_labelled_texts(path: str | Path, text_field: str = "text",
                        label_field: str = "label") -> list[tuple[str, str]]:
    """``(text, label)`` pairs of a ``.csv`` (with a header row) or ``.jsonl`` / ``.json`` (one object a
    line) file; labels as strings.

    Raises:
        ValueError: another extension, a row without either field, an unreadable JSON line, no rows.
        FileNotFoundError: no such file.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"classification: no file {str(path)!r}")
    suffix = path.suffix.lower()
    rows: list[dict[str, Any]] = []
    if suffix == ".csv":
        with path.open(newline="", encoding="utf-8") as handle:
            rows = list(csv.DictReader(handle))
    elif suffix in (".jsonl", ".json"):
        for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as err:
                raise ValueError(f"classification: {path}:{n} is not a JSON object ({err})") from None
            if not isinstance(row, dict):
                raise ValueError(f"classification: {path}:{n} is not a JSON object")
            rows.append(row)
    else:
        raise ValueError(f"classification: {str(path)!r} must be a .csv or .jsonl file, got {suffix or 'no suffix'!r}")
    pairs = []
    for n, row in enumerate(rows, start=1):
        if text_field not in row or label_field not in row:
            raise ValueError(f"classification: row {n} of {path} lacks the field {text_field!r} or {label_field!r}; "
                             f"it has {sorted(row)}")
        pairs.append((str(row[text_field]), str(row[label_field])))
    if not pairs:
        raise ValueError(f"classification: {path} holds no rows")
    return pairs


class TextClassification(Task):
    """Classify texts read from a CSV or JSONL file (see the module docstring).

    Args:
        path (str | None): the file. Required.
        text_field (str): the text column / key. Default: "text".
        label_field (str): the label column / key. Default: "label".
        seq_len (int): bytes per row (longer texts are cut). Default: 128.
        val_fraction (float): share of rows held out. Default: 0.2.
        eval_examples (int): held-out rows scored (at most the validation split). Default: 256.
    """

    name = "classification"
    description = "text classification from a CSV / JSONL file of (text, label) rows (path=...)"
    kind = "classification"

    def __init__(self, path: str | None = None, text_field: str = "text", label_field: str = "label",
                 seq_len: int = 128, val_fraction: float = 0.2, *, eval_examples: int = 256) -> None:
        super().__init__(eval_examples=eval_examples)
        if path is None:
            raise ValueError("classification: give the data file as the task option path=FILE.csv|FILE.jsonl")
        if seq_len <= 0:
            raise ValueError(f"classification: seq_len={seq_len} must be positive")
        if not 0.0 < val_fraction < 1.0:
            raise ValueError(f"classification: val_fraction={val_fraction} must be in (0, 1)")
        self.path, self.text_field, self.label_field = str(path), text_field, label_field
        self._seq_len, self.val_fraction = seq_len, val_fraction
        pairs = read_labelled_texts(path, text_field, label_field)
        self.labels = sorted({label for _, label in pairs})
        index = {label: i for i, label in enumerate(self.labels)}
        ids, labels = self._encode([t for t, _ in pairs]), torch.tensor([index[label] for _, label in pairs])
        in_val = torch.tensor([stable_hash("classification-split", i) % 10_000 < val_fraction * 10_000
                               for i in range(len(pairs))])
        if bool(in_val.all()) or not bool(in_val.any()):
            raise ValueError(f"classification: {len(pairs)} rows with val_fraction={val_fraction} leave a split empty; "
                             f"give more rows")
        self._splits = {"train": (ids[~in_val], labels[~in_val]), "val": (ids[in_val], labels[in_val])}

    def _encode(self, texts: list[str]) -> torch.Tensor:
        out = torch.zeros(len(texts), self._seq_len, dtype=torch.long)
        for i, text in enumerate(texts):
            raw = text.encode("utf-8")[: self._seq_len] or b" "  # the classifier pools at least one token
            out[i, : len(raw)] = torch.frombuffer(bytearray(raw), dtype=torch.uint8).long() + 1
        return out

    @property
    def vocab_size(self) -> int:
        return 257

    @property
    def num_classes(self) -> int:
        return len(self.labels)

    @property
    def seq_len(self) -> int:
        return self._seq_len

    def config(self) -> dict[str, Any]:
        return {"path": self.path, "text_field": self.text_field, "label_field": self.label_field,
                "seq_len": self._seq_len, "val_fraction": self.val_fraction, "eval_examples": self.eval_examples}

    def _make(self, split: str, generator: torch.Generator, batch_size: int) -> Batch:
        ids, labels = self._splits[split]
        pick = torch.randint(0, ids.shape[0], (batch_size,), generator=generator)
        return Batch(ids[pick], labels[pick, None])

    def eval_batches(self, batch_size: int, seed: int = 0) -> list[Batch]:
        """The first ``eval_examples`` rows of the validation split, in file order (seed unused)."""
        if batch_size <= 0:
            raise ValueError(f"batch_size={batch_size} must be positive")
        ids, labels = self._splits["val"]
        n = min(self.eval_examples, ids.shape[0])
        return [Batch(ids[i:min(i + batch_size, n)], labels[i:min(i + batch_size, n), None])
                for i in range(0, n, batch_size)]

    def decode(self, ids: list[int]) -> str:
        return bytes(i - 1 for i in ids if 0 < i < 257).decode("utf-8", errors="replace")

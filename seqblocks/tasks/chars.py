"""Character-level language modelling on a corpus every Python install has: the standard library's source.

The corpus is the ``.py`` files under ``sysconfig.get_paths()["stdlib"]`` (tests, site-packages and a
few data-heavy packages excluded). Files are ordered by a hash of their relative path, so the
selection is deterministic and spread across the library, and taken until the character budget is
met. A file goes to the validation split when its hash falls in the lowest ``val_fraction`` of the
range, so the two splits never share a file. ``CharTokenizer`` is a fixed ASCII alphabet (tab,
newline, printable characters) plus one unknown token; it is saved with checkpoints as JSON.

Shapes: B batch, T time.
"""

from __future__ import annotations

import functools
import json
import os
import re
import sysconfig
from pathlib import Path
from typing import Any

import torch

from seqblocks.tasks.base import IGNORE_INDEX, Batch, Task, stable_hash

__all__ = ["CharTokenizer", "StdlibChars", "stdlib_files"]

_EXCLUDED_DIRS = frozenset({"site-packages", "dist-packages", "test", "tests", "__pycache__", "idlelib",
                            "lib2to3", "turtledemo", "encodings", "pydoc_data", "ensurepip"})


class CharTokenizer:
    """Characters to ids over a fixed alphabet; anything else becomes the unknown token.

    Args:
        alphabet (str): the known characters, id = position. Default: tab, newline and ASCII 32..126.
        unk (str): how the unknown token is rendered by ``decode``. Default: "\\ufffd".
        eos (bool): add an end-of-document token after the unknown one (id ``len(alphabet) + 1``), which
            separates the documents of a prepared corpus; ``encode`` never produces it and ``decode``
            renders it as nothing. Default: False.
    """

    DEFAULT_ALPHABET = "\t\n" + "".join(chr(c) for c in range(32, 127))

    def __init__(self, alphabet: str = DEFAULT_ALPHABET, unk: str = "\ufffd", eos: bool = False) -> None:
        if len(set(alphabet)) != len(alphabet) or not alphabet:
            raise ValueError("CharTokenizer: alphabet must be a non-empty string of distinct characters")
        self.alphabet, self.unk = alphabet, unk
        self.unk_id = len(alphabet)
        self.eos_id = len(alphabet) + 1 if eos else None
        self._index = {ch: i for i, ch in enumerate(alphabet)}
        self._unknown = re.compile("[^" + re.escape(alphabet) + "]")
        # Known ASCII characters map through a 128-entry byte table: encoding is one pass in C.
        table = bytearray([min(self.unk_id, 255)] * 256)  # only used when unk_id < 256 (the fast path)
        for ch, i in self._index.items():
            if ord(ch) < 128:
                table[ord(ch)] = i
        self._table = bytes(table)
        # The fast path marks unknown characters with NUL, which must then not be in the alphabet.
        self._fast = all(0 < ord(ch) < 128 for ch in alphabet) and self.unk_id < 256

    @property
    def vocab_size(self) -> int:
        return len(self.alphabet) + 1 + (self.eos_id is not None)

    def encode(self, text: str) -> list[int]:
        return self.encode_tensor(text).tolist()

    def encode_tensor(self, text: str) -> torch.Tensor:
        """[len(text)] int64 ids."""
        if not self._fast:
            return torch.tensor([self._index.get(ch, self.unk_id) for ch in text], dtype=torch.long)
        raw = self._unknown.sub("\x00", text).encode("ascii").translate(self._table)
        if not raw:
            return torch.zeros(0, dtype=torch.long)
        return torch.frombuffer(bytearray(raw), dtype=torch.uint8).long()

    def decode(self, ids: list[int] | torch.Tensor) -> str:
        if isinstance(ids, torch.Tensor):
            ids = ids.tolist()
        return "".join(self.alphabet[i] if 0 <= i < len(self.alphabet) else "" if i == self.eos_id else self.unk
                       for i in ids)

    def to_dict(self) -> dict[str, Any]:
        data = {"type": "char", "alphabet": self.alphabet, "unk": self.unk}
        if self.eos_id is not None:
            data["eos"] = True
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> CharTokenizer:
        if data.get("type") != "char":
            raise ValueError(f"not a char tokenizer: type={data.get('type')!r}")
        return cls(data["alphabet"], data["unk"], eos=bool(data.get("eos", False)))

    def save(self, path: str | os.PathLike) -> None:
        Path(path).write_text(json.dumps(self.to_dict()))

    @classmethod
    def load(cls, path: str | os.PathLike) -> CharTokenizer:
        return cls.from_dict(json.loads(Path(path).read_text()))


def stdlib_files(root: str | None = None) -> list[Path]:
    """The candidate corpus files: every ``.py`` under the stdlib, minus excluded directories, by path."""
    base = Path(root or sysconfig.get_paths()["stdlib"])
    if not base.is_dir():
        raise ValueError(f"standard-library directory {str(base)!r} does not exist")
    found = []
    for dirpath, dirnames, filenames in os.walk(base):
        dirnames[:] = sorted(d for d in dirnames if d not in _EXCLUDED_DIRS and not d.startswith("."))
        found.extend(Path(dirpath, f) for f in sorted(filenames) if f.endswith(".py"))
    return found


@functools.lru_cache(maxsize=4)
def _load_corpus(root: str, max_chars: int, val_fraction: float) -> tuple[str, str, tuple[str, ...],
                                                                         tuple[int, ...], tuple[int, ...]]:
    base = Path(root)
    files = sorted(stdlib_files(root), key=lambda p: stable_hash("stdlib-order", p.relative_to(base).as_posix()))
    train, val, used, n_train, n_val = [], [], [], 0, 0
    train_starts: list[int] = []  # where each file (document) starts in its split's text
    val_starts: list[int] = []
    val_budget = max(1, int(max_chars * val_fraction))
    for path in files:
        rel = path.relative_to(base).as_posix()
        in_val = (stable_hash("stdlib-split", rel) % 10_000) < val_fraction * 10_000
        if (n_val >= val_budget) if in_val else (n_train >= max_chars - val_budget):
            continue
        try:
            text = path.read_text(encoding="utf-8")
        except (UnicodeDecodeError, OSError):
            continue
        text = f"# file: {rel}\n{text}\n"
        (val if in_val else train).append(text)
        (val_starts if in_val else train_starts).append(n_val if in_val else n_train)
        used.append(rel)
        if in_val:
            n_val += len(text)
        else:
            n_train += len(text)
        if n_val >= val_budget and n_train >= max_chars - val_budget:
            break
    return "".join(train), "".join(val), tuple(used), tuple(train_starts), tuple(val_starts)


class StdlibChars(Task):
    """Character-level language modelling on the Python standard library's own source files.

    Training batches are random windows of the training text; the held-out set is consecutive,
    non-overlapping windows of the validation text. With ``pack_documents`` each source file is a
    document: a window spanning files is a packed row, its batch carries ``document_ids`` (the model
    sees each file alone) and the first token of a file is never a target of the previous file's last.

    Args:
        seq_len (int): T, characters per row. Default: 128.
        max_chars (int): corpus size in characters (train + validation). Default: 2_000_000.
        val_fraction (float): share of files (and characters) held out. Default: 0.1.
        root (str | None): the directory to read instead of the stdlib (for tests). Default: None.
        eval_examples (int): held-out windows scored by ``eval``. Default: 256.
        pack_documents (bool): rows are packed documents (see above). Default: False.
    """

    name = "chars"
    description = "character-level LM on the Python standard library's source files (no download)"
    is_language = True

    def __init__(self, seq_len: int = 128, max_chars: int = 2_000_000, val_fraction: float = 0.1,
                 root: str | None = None, *, eval_examples: int = 256, pack_documents: bool = False) -> None:
        super().__init__(eval_examples=eval_examples)
        if seq_len <= 0 or max_chars <= 0:
            raise ValueError(f"chars: seq_len={seq_len} and max_chars={max_chars} must be positive")
        if not 0.0 < val_fraction < 1.0:
            raise ValueError(f"chars: val_fraction={val_fraction} must be in (0, 1)")
        self._seq_len, self.max_chars, self.val_fraction = seq_len, max_chars, val_fraction
        self.root = root
        self.tokenizer = CharTokenizer()
        resolved = str(Path(root or sysconfig.get_paths()["stdlib"]).resolve())
        train, val, self.files, train_starts, val_starts = _load_corpus(resolved, max_chars, val_fraction)
        self.pack_documents = bool(pack_documents)
        self._starts = {"train": torch.tensor(train_starts, dtype=torch.long),
                        "val": torch.tensor(val_starts, dtype=torch.long)}
        min_len = seq_len + 2
        if len(train) < min_len or len(val) < min_len:
            raise ValueError(f"chars: corpus under {resolved!r} is too small for seq_len={seq_len} "
                             f"({len(train)} train / {len(val)} validation characters)")
        self.train_ids = self.tokenizer.encode_tensor(train)
        self.val_ids = self.tokenizer.encode_tensor(val)

    @property
    def vocab_size(self) -> int:
        return self.tokenizer.vocab_size

    @property
    def seq_len(self) -> int:
        return self._seq_len

    def config(self) -> dict[str, Any]:
        config = {"seq_len": self._seq_len, "max_chars": self.max_chars, "val_fraction": self.val_fraction,
                  "root": self.root, "eval_examples": self.eval_examples}
        if self.pack_documents:
            config["pack_documents"] = True
        return config

    def token_bytes(self) -> torch.Tensor:
        """UTF-8 bytes of each character id (the unknown token counts its rendering's bytes)."""
        return torch.tensor([len(self.tokenizer.decode([i]).encode("utf-8")) for i in range(self.vocab_size)])

    def _make(self, split: str, generator: torch.Generator, batch_size: int) -> Batch:
        data = self.train_ids if split == "train" else self.val_ids
        starts = torch.randint(0, data.numel() - self._seq_len - 1, (batch_size,), generator=generator)
        return self._windows(data, starts, split)

    def _windows(self, data: torch.Tensor, starts: torch.Tensor, split: str) -> Batch:
        idx = starts[:, None] + torch.arange(self._seq_len + 1)[None, :]
        rows = data[idx]
        if not self.pack_documents:
            return Batch(rows[:, :-1].contiguous(), rows[:, 1:].contiguous())
        doc = torch.searchsorted(self._starts[split], idx, right=True)  # [B, T + 1] file of each character
        targets = rows[:, 1:].masked_fill(doc[:, 1:] != doc[:, :-1], IGNORE_INDEX)
        return Batch(rows[:, :-1].contiguous(), targets.contiguous(), document_ids=doc[:, :-1].contiguous())

    def eval_batches(self, batch_size: int, seed: int = 0) -> list[Batch]:
        """Consecutive non-overlapping windows from the start of the validation text (seed unused)."""
        count = min(self.eval_examples, (self.val_ids.numel() - 1) // self._seq_len)
        starts = torch.arange(count) * self._seq_len
        return [self._windows(self.val_ids, starts[i:i + batch_size], "val") for i in range(0, count, batch_size)]

    def decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids)

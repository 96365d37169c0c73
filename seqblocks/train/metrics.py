"""``metrics.jsonl``: one JSON object per line, appended as training goes, read back tolerantly.

A writer killed in the middle of a line (``kill -9``, a full disk) leaves a last line without its
newline. ``read_metrics`` skips such a torn last line, so a plot, an evaluation or a resume reads
every complete row; a resumed run rewrites the file without it (``rewrite_metrics``). A malformed
line anywhere else was not written by this module and is an error naming the file and line.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from seqblocks.train.checkpointing import atomic_write_text

__all__ = ["MetricsWriter", "read_metrics", "rewrite_metrics"]


def read_metrics(path: str | os.PathLike, upto_step: int | None = None) -> list[dict[str, Any]]:
    """The rows of a metrics file, without a torn last line.

    Args:
        path (str | PathLike): the ``metrics.jsonl`` file; a missing file has no rows.
        upto_step (int | None): keep only rows whose ``step`` is at most this. Default: None (all).

    Raises:
        ValueError: a line other than the last is not a JSON object.
    """
    path = Path(path)
    if not path.is_file():
        return []
    lines = path.read_text(errors="replace").split("\n")
    # Every complete row ends with a newline, so the last piece is "" unless the last write was cut
    # short; a cut object is never valid JSON (its closing brace is missing), so it is dropped.
    *complete, tail = lines
    rows = []
    for number, line in enumerate(complete, start=1):
        if not line.strip():
            continue
        row = _parse(line)
        if row is None:
            raise ValueError(f"{path}:{number} is not a JSON object: {line[:80]!r}")
        rows.append(row)
    last = _parse(tail) if tail.strip() else None
    if last is not None:
        rows.append(last)
    if upto_step is not None:
        rows = [r for r in rows if r.get("step", 0) <= upto_step]
    return rows


def _parse(line: str) -> dict[str, Any] | None:
    try:
        row = json.loads(line)
    except json.JSONDecodeError:
        return None
    return row if isinstance(row, dict) else None


def rewrite_metrics(path: str | os.PathLike, rows: list[dict[str, Any]]) -> None:
    """Replace the metrics file with ``rows``, atomically (a crash keeps the old file whole)."""
    atomic_write_text(path, "".join(json.dumps(r) + "\n" for r in rows))


class MetricsWriter:
    """Appends rows to a metrics file, each with one unbuffered write.

    Nothing is held in a buffer, so closing never writes (and cannot fail on a full disk), and a
    row is in the file as soon as ``write`` returns.
    """

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self._fd: int | None = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)

    def write(self, row: dict[str, Any]) -> None:
        if self._fd is None:
            raise ValueError(f"the metrics writer of {self.path} is closed")
        data = memoryview((json.dumps(row) + "\n").encode())
        while data:
            data = data[os.write(self._fd, data):]

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None

    def __enter__(self) -> MetricsWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

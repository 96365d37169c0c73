"""metrics.jsonl: whole rows in, a torn last line tolerated on the way out; atomic writes clean up."""

from __future__ import annotations

import errno
import json

import pytest

from seqblocks.train import checkpointing
from seqblocks.train.metrics import MetricsWriter, read_metrics, rewrite_metrics
from seqblocks.train.plot import plot_loss_curve


def test_read_metrics_skips_a_torn_last_line_only(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"type": "train", "step": 1, "loss": 2.0}\n{"type": "train", "step": 2, "lo')
    assert read_metrics(path) == [{"type": "train", "step": 1, "loss": 2.0}]
    path.write_text('{"step": 1}\n{"step": 2}')  # complete but for its newline: kept
    assert [r["step"] for r in read_metrics(path)] == [1, 2]
    assert read_metrics(path, upto_step=1) == [{"step": 1}]
    path.write_text('{"step": 1}\n{"st\n{"step": 3}\n')  # not what a killed writer leaves: an error
    with pytest.raises(ValueError, match="metrics.jsonl:2 is not a JSON object"):
        read_metrics(path)
    assert read_metrics(tmp_path / "missing.jsonl") == []
    path.write_text('{"type": "train", "step": 1, "loss": 2.0}\n{"type": "train", "step": 2, "loss": 1.5}\n{"ty')
    assert plot_loss_curve(path, tmp_path / "loss.png") is True


def test_metrics_writer_appends_whole_rows(tmp_path):
    path = tmp_path / "metrics.jsonl"
    rewrite_metrics(path, [{"step": 1}])
    with MetricsWriter(path) as writer:
        writer.write({"step": 2, "loss": 0.5})
        assert path.read_text() == '{"step": 1}\n{"step": 2, "loss": 0.5}\n'  # in the file at once, unbuffered
    with pytest.raises(ValueError, match="closed"):
        writer.write({"step": 3})
    assert [json.loads(line)["step"] for line in path.read_text().splitlines()] == [1, 2]


def test_a_failed_atomic_write_keeps_the_original_and_leaves_no_temporary_file(tmp_path, monkeypatch):
    target = tmp_path / "run.json"
    target.write_text("old")

    def disk_full(fd):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(checkpointing.os, "fsync", disk_full)
    with pytest.raises(OSError, match="No space left"):
        checkpointing.atomic_write_text(target, "new")
    monkeypatch.undo()
    assert target.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["run.json"]
    checkpointing.atomic_write_text(target, "new")
    assert target.read_text() == "new" and [p.name for p in tmp_path.iterdir()] == ["run.json"]
    assert checkpointing.is_temporary(".run.json.tmp-12") and checkpointing.is_temporary(".tmp-step_0000003-1")
    assert not checkpointing.is_temporary("run.json") and not checkpointing.is_temporary(".lock")

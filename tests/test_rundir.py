"""Run directories: one writer at a time, no run lost silently, torn metrics, clear write failures."""

from __future__ import annotations

import errno
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch

import seqblocks  # noqa: F401  (registers the mixers)
from seqblocks.checkpoint import load_pretrained
from seqblocks.cli import main
from seqblocks.train import TrainConfig, checkpointing, latest_checkpoint, load_train_state, train
from seqblocks.train import rundir as rundir_module
from seqblocks.train.metrics import MetricsWriter, read_metrics
from seqblocks.train.optim import lr_factor
from seqblocks.train.rundir import (
    LOCK_FILE,
    LockInfo,
    RunDirectory,
    RunDirectoryError,
    RunDirectoryWriteError,
    read_lock,
    write_failure,
)

TINY = {"d_model": 32, "d_state": 4, "n_layer": 2, "vocab_size": 0, "mixer_types": ["mamba", "attn"],
        "d_intermediate": 32, "mixer_kwargs": {"attn": {"num_heads": 2}, "mamba": {"expand": 1}}}
MQAR = {"task": "mqar", "task_options": {"vocab_size": 24, "num_kv_pairs": 2, "seq_len": 12, "eval_examples": 16}}
QUIET = {"progress": False, "log": lambda m: None}
REPO = Path(__file__).resolve().parents[1]


def _config(**kw) -> TrainConfig:
    base = dict(MQAR, steps=6, batch_size=4, lr=1e-2, warmup_steps=2, eval_every=0, ckpt_every=3, log_every=1,
                sample_tokens=0, device="cpu", eval_batch_size=16)
    base.update(kw)
    return TrainConfig(**base)


def _config_file(tmp_path: Path, **train_kw) -> Path:
    path = tmp_path / "tiny.json"
    path.write_text(json.dumps({"model": TINY, "train": _config(**train_kw).to_dict()}))
    return path


def _losses(run_dir: Path) -> list[float]:
    return [r["loss"] for r in read_metrics(run_dir / "metrics.jsonl") if r["type"] == "train"]


def _temporary(run_dir: Path) -> list[str]:
    folders = [run_dir, run_dir / "checkpoints"]
    return [p.name for f in folders if f.is_dir() for p in f.iterdir() if checkpointing.is_temporary(p.name)]


def _plant_lock(run_dir: Path, **fields) -> str:
    run_dir.mkdir(parents=True, exist_ok=True)
    info = {"pid": 1, "host": socket.gethostname(), "started": "2020-01-01T00:00:00+00:00", "token": "t", **fields}
    text = json.dumps(info) + "\n"
    (run_dir / LOCK_FILE).write_text(text)
    return text


def _exited_pid() -> int:
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()  # reaped: the pid names no process now
    return child.pid


@pytest.fixture(scope="module")
def full_run(tmp_path_factory) -> Path:
    """The uninterrupted run (``_config()``) that interrupted and resumed runs must reproduce."""
    run = tmp_path_factory.mktemp("full") / "run"
    train(TINY, _config(), run, **QUIET)
    return run


def _subprocess_env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}


# The lock


def test_the_lock_names_its_owner_and_is_released(tmp_path):
    run = tmp_path / "run"
    with RunDirectory(run) as owned:
        assert owned.locked
        lock = json.loads((run / LOCK_FILE).read_text())
        assert lock["pid"] == os.getpid() and lock["host"] == socket.gethostname()
        assert lock["started"].endswith("+00:00") and lock["token"]
        assert read_lock(run) == LockInfo(**lock)
        with pytest.raises(RunDirectoryError, match="already in use by this process"):
            RunDirectory(run).acquire()
    assert not (run / LOCK_FILE).exists()
    with pytest.raises(RunDirectoryError, match="must be locked first"):
        RunDirectory(run).prepare()
    (tmp_path / "file").write_text("")
    with pytest.raises(RunDirectoryError, match="is not a directory"):
        RunDirectory(tmp_path / "file").acquire()


def test_a_live_writer_refuses_a_second_until_force_unlock(tmp_path):
    run = tmp_path / "run"
    # Another live process on this host holds the lock.
    other = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        start = rundir_module._process_start(other.pid)
        _plant_lock(run, pid=other.pid, pid_start=start)
        with pytest.raises(RunDirectoryError) as refused:
            train(TINY, _config(steps=1), run, **QUIET)
        message = str(refused.value)
        assert f"pid {other.pid} on host {socket.gethostname()!r}" in message
        assert "--force-unlock" in message and str(run / LOCK_FILE) in message
        assert not (run / "metrics.jsonl").exists()  # the refused run wrote nothing
        messages = []
        result = train(TINY, _config(steps=1), run, force_unlock=True, progress=False, log=messages.append)
        assert result.step == 1 and any("--force-unlock" in m for m in messages)
        assert not (run / LOCK_FILE).exists()
    finally:
        other.kill()
        other.wait()


def test_stale_locks_are_taken_over(tmp_path):
    messages = []
    # The owner has exited.
    run = tmp_path / "exited"
    pid = _exited_pid()
    _plant_lock(run, pid=pid)
    assert train(TINY, _config(steps=1), run, progress=False, log=messages.append).step == 1
    assert any(f"its process {pid} has exited" in m for m in messages)
    # The pid is alive but started later than the lock's owner: it was reused.
    run = tmp_path / "reused"
    with RunDirectory(run, log=messages.append):
        pass
    if rundir_module._process_start(os.getppid()) is not None:
        _plant_lock(run, pid=os.getppid(), pid_start=rundir_module._process_start(os.getppid()) + 1)
        with RunDirectory(run, log=messages.append):
            pass
        assert any(f"pid {os.getppid()} now belongs to another one" in m for m in messages)
    # This very pid, but not held by this process: an earlier process with the same pid (a restarted container).
    _plant_lock(run, pid=os.getpid())
    with RunDirectory(run, log=messages.append):
        pass
    assert any("earlier process with this pid" in m for m in messages)
    # An unreadable lock is being written while young, and was left half-made when old.
    (run / LOCK_FILE).write_text("")
    with pytest.raises(RunDirectoryError, match="being written"):
        RunDirectory(run).acquire()
    os.utime(run / LOCK_FILE, (time.time() - 60, time.time() - 60))
    with RunDirectory(run, log=messages.append):
        pass
    assert any("unreadable" in m for m in messages)


def test_a_lock_from_another_host_is_respected(tmp_path):
    run = tmp_path / "run"
    _plant_lock(run, pid=os.getpid(), host="elsewhere.example")
    with pytest.raises(RunDirectoryError, match=r"on host 'elsewhere.example'.*--force-unlock \(or delete "):
        RunDirectory(run).acquire()
    with RunDirectory(run, force_unlock=True) as owned:
        assert read_lock(run).host == socket.gethostname() and owned.locked


def test_breaking_a_stale_lock_goes_through_one_breaker(tmp_path, monkeypatch):
    run = tmp_path / "run"
    stale = _plant_lock(run, pid=_exited_pid())
    guard = run / (LOCK_FILE + ".break")
    guard.write_text("12345\n")  # another process is breaking this lock right now
    monkeypatch.setattr(rundir_module, "_BREAK_WAIT_S", 0.2)
    with pytest.raises(RunDirectoryError, match="another process is breaking"):
        RunDirectory(run).acquire()
    assert (run / LOCK_FILE).read_text() == stale
    os.utime(guard, (time.time() - 60, time.time() - 60))  # ... and was killed doing it
    with RunDirectory(run):
        assert not guard.exists()
    # A breaker that finds the lock changed since it judged it stale (another breaker took it) leaves it.
    fresh = _plant_lock(run, pid=os.getpid(), token="fresh")
    RunDirectory(run)._break(stale, "test")
    assert (run / LOCK_FILE).read_text() == fresh and not guard.exists()


def test_release_leaves_a_lock_another_process_took_over(tmp_path):
    run = tmp_path / "run"
    owned = RunDirectory(run)
    owned.acquire()
    taken = _plant_lock(run, pid=os.getpid(), token="someone-else")  # e.g. broken with --force-unlock
    owned.release()
    assert (run / LOCK_FILE).read_text() == taken and not owned.locked


# Previous runs: refused, resumed or overwritten


def test_a_fresh_run_refuses_a_previous_run_unless_overwrite(tmp_path, capsys):
    run = tmp_path / "run"
    train(TINY, _config(steps=3, ckpt_every=1, keep_checkpoints=0), run, **QUIET)
    (run / "notes.txt").write_text("mine")
    before = (run / "metrics.jsonl").read_text()
    refusal = r"holds a previous run \(checkpoint step_0000003, metrics.jsonl, run.json\); continue it with --resume"
    with pytest.raises(RunDirectoryError, match=refusal + ", or start over with --overwrite"):
        train(TINY, _config(steps=1), run, **QUIET)
    assert (run / "metrics.jsonl").read_text() == before and latest_checkpoint(run).name == "step_0000003"
    config = _config_file(tmp_path, steps=1)
    assert main(["train", str(config), "--out", str(run), "--no-progress"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"seqblocks train: error: run directory {run} holds a previous run (checkpoint step_0000003, "
                   f"metrics.jsonl, run.json); continue it with --resume, or start over with --overwrite (deletes "
                   f"its checkpoints and metrics)"]
    assert main(["train", str(config), "--out", str(run), "--no-progress", "--overwrite"]) == 0
    assert sorted(p.name for p in (run / "checkpoints").glob("step_*")) == ["step_0000001"]
    assert [(r["type"], r["step"]) for r in read_metrics(run / "metrics.jsonl")] == [("train", 1), ("eval", 1)]
    assert (run / "notes.txt").read_text() == "mine"  # --overwrite deletes the run's files only
    with pytest.raises(ValueError, match="give one"):
        train(TINY, _config(), run, resume=True, overwrite=True, **QUIET)
    # A directory without a run (empty, or holding other files) needs no flag.
    assert train(TINY, _config(steps=1), tmp_path / "new", **QUIET).step == 1


def test_resume_of_a_complete_run_says_so_and_a_larger_steps_continues(tmp_path, capsys):
    run = tmp_path / "run"
    config = _config_file(tmp_path, steps=3, ckpt_every=0)
    assert main(["train", str(config), "--out", str(run), "--no-progress"]) == 0
    capsys.readouterr()
    rows = read_metrics(run / "metrics.jsonl")
    assert main(["train", "--out", str(run), "--resume", "--no-progress"]) == 0
    captured = capsys.readouterr()
    assert f"the run in run directory {run} is complete (3 of 3 steps" in captured.err
    assert captured.out.strip() == f"{run}: the run is complete (3 steps); checkpoint: {run}/checkpoints/step_0000003"
    assert read_metrics(run / "metrics.jsonl") == rows  # nothing was trained or rewritten
    result = train({}, _config(), run, resume=True, **QUIET)
    assert result.already_complete and result.step == 3 and result.metrics["train_loss"] == rows[2]["loss"]
    assert result.config.steps == 3 and result.checkpoint == latest_checkpoint(run)

    assert main(["train", "--out", str(run), "--resume", "--steps", "5", "--no-progress"]) == 0
    assert "extending the schedule from 3 to 5 steps" in capsys.readouterr().err
    rows = read_metrics(run / "metrics.jsonl")
    assert [r["step"] for r in rows if r["type"] == "train"] == [1, 2, 3, 4, 5]
    assert latest_checkpoint(run).name == "step_0000005"
    assert load_train_state(latest_checkpoint(run))["train_config"]["steps"] == 5
    # The learning rate of the added steps follows the 5-step schedule from step 3 on.
    cfg = _config()
    assert [r["lr"] for r in rows if r["step"] > 3 and r["type"] == "train"] == pytest.approx(
        [cfg.lr * lr_factor(s, 5, cfg.warmup_steps, cfg.min_lr_ratio) for s in (3, 4)])
    with pytest.raises(ValueError, match="--steps 4 is fewer than the 5 steps"):
        train({}, _config(), run, resume=True, steps=4, **QUIET)
    # A resumed run stopped where it already is returns its checkpoint (there was a NoneType error here).
    split = tmp_path / "split"
    train(TINY, _config(), split, stop_after=3, **QUIET)
    again = train({}, _config(), split, resume=True, stop_after=3, **QUIET)
    assert again.step == 3 and again.checkpoint == latest_checkpoint(split) and not again.already_complete


# Metrics: torn lines and temporary files


def test_resume_drops_a_torn_line_and_later_rows(tmp_path, full_run):
    split = tmp_path / "split"
    train(TINY, _config(), split, stop_after=3, **QUIET)
    with open(split / "metrics.jsonl", "a") as f:
        f.write(json.dumps({"type": "train", "step": 4, "loss": 123.0}) + "\n" + '{"type": "train", "step": 5, "lo')
    train({}, _config(), split, resume=True, **QUIET)
    assert _losses(split) == _losses(full_run)
    assert (split / "metrics.jsonl").read_text().endswith("}\n")
    for line in (split / "metrics.jsonl").read_text().splitlines():
        json.loads(line)


def test_temporary_files_a_killed_run_left_are_removed(tmp_path):
    run = tmp_path / "run"
    train(TINY, _config(), run, stop_after=3, **QUIET)
    left = [run / ".metrics.jsonl.tmp-4242", run / "checkpoints" / ".latest.tmp-4242"]
    for path in left:
        path.write_text("half")
    (run / "checkpoints" / ".tmp-step_0000006-4242").mkdir()
    (run / "checkpoints" / ".tmp-step_0000006-4242" / "model.safetensors").write_text("half")
    messages = []
    train({}, _config(), run, resume=True, progress=False, log=messages.append)
    assert _temporary(run) == []
    assert any("removed 3 temporary file(s)" in m for m in messages)


# Write failures: a full disk, a read-only directory


def _assert_intact(run: Path, step: int) -> None:
    latest = latest_checkpoint(run)
    assert latest is not None and latest.name == f"step_{step:07d}"
    assert load_train_state(latest)["step"] == step
    load_pretrained(latest)
    assert _temporary(run) == [] and not (run / LOCK_FILE).exists()


def test_disk_full_during_a_checkpoint_keeps_the_last_one(tmp_path, full_run, monkeypatch, capsys):
    run = tmp_path / "run"
    config = _config_file(tmp_path)
    real_save = torch.save

    def fill_the_disk(obj, f, *args, **kwargs):
        if load_step(obj) == 6:  # the second checkpoint: half written, then the disk is full
            f.write(b"\0" * 100)
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_save(obj, f, *args, **kwargs)

    def load_step(obj):
        return obj.get("step") if isinstance(obj, dict) else None

    monkeypatch.setattr(torch, "save", fill_the_disk)
    assert main(["train", str(config), "--out", str(run), "--no-progress"]) == 1
    err = capsys.readouterr().err
    assert err.strip().splitlines()[-1] == (
        f"seqblocks train: error: no space left on device while writing {run}/checkpoints/step_0000006; the last "
        f"complete checkpoint is {run}/checkpoints/step_0000003")
    assert "Traceback" not in err
    _assert_intact(run, 3)
    monkeypatch.undo()
    # The space is back: the run resumes from its last complete checkpoint and ends as it would have.
    assert main(["train", "--out", str(run), "--resume", "--no-progress"]) == 0
    assert _losses(run) == _losses(full_run)


def test_disk_full_during_a_metrics_write_leaves_a_resumable_run(tmp_path, full_run, monkeypatch):
    run = tmp_path / "run"
    real_write, rows = MetricsWriter.write, []

    def disk_full_at_the_fifth_row(self, row):
        rows.append(row)
        if len(rows) == 5:  # a part of the row fits, then the disk is full
            os.write(self._fd, json.dumps(row).encode()[:10])
            raise OSError(errno.ENOSPC, "No space left on device")
        real_write(self, row)

    monkeypatch.setattr(MetricsWriter, "write", disk_full_at_the_fifth_row)
    with pytest.raises(RunDirectoryWriteError) as failed:
        train(TINY, _config(), run, **QUIET)
    monkeypatch.undo()
    assert failed.value.errno == errno.ENOSPC
    assert str(failed.value) == (f"no space left on device while writing {run}/metrics.jsonl; the last complete "
                                 f"checkpoint is {run}/checkpoints/step_0000003")
    assert not (run / "metrics.jsonl").read_text().endswith("\n")  # the torn row
    _assert_intact(run, 3)
    train({}, _config(), run, resume=True, **QUIET)
    assert _losses(run) == _losses(full_run)


def test_read_only_and_refused_directories_are_one_line(tmp_path, monkeypatch, capsys):
    # Root ignores permission bits, so the file system's refusals are simulated here (and real below).
    run = tmp_path / "run"
    config = _config_file(tmp_path)
    train(TINY, _config(), run, stop_after=3, **QUIET)
    real_open = os.open

    def read_only(path, flags, *args):
        if flags & (os.O_WRONLY | os.O_RDWR | os.O_CREAT):
            raise OSError(errno.EROFS, "Read-only file system", str(path))
        return real_open(path, flags, *args)

    monkeypatch.setattr(rundir_module.os, "open", read_only)
    assert main(["train", "--out", str(run), "--resume", "--no-progress"]) == 1
    assert capsys.readouterr().err.strip().splitlines()[-1] == (
        f"seqblocks train: error: read-only file system while writing {run}/.lock; the last complete checkpoint "
        f"is {run}/checkpoints/step_0000003")
    monkeypatch.undo()
    _assert_intact(run, 3)

    def refused(obj, f, *args, **kwargs):
        raise PermissionError(errno.EACCES, "Permission denied", str(f))

    monkeypatch.setattr(torch, "save", refused)
    assert main(["train", str(config), "--out", str(tmp_path / "fresh"), "--no-progress"]) == 1
    assert capsys.readouterr().err.strip().splitlines()[-1] == (
        f"seqblocks train: error: permission denied while writing {tmp_path}/fresh/checkpoints/step_0000003; "
        f"run directory {tmp_path}/fresh holds no complete checkpoint")
    assert _temporary(tmp_path / "fresh") == [] and not (tmp_path / "fresh" / LOCK_FILE).exists()


def test_write_failures_are_recognised_and_program_errors_are_not(tmp_path, monkeypatch):
    # torch.save into a Python file: its own error, with the file's OSError as the context.
    torch_error = RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 704 vs 598")
    torch_error.__context__ = OSError(errno.ENOSPC, "No space left on device")
    assert write_failure(torch_error, tmp_path) == errno.ENOSPC
    safetensors_like = type("SafetensorError", (Exception,), {})
    text = "Error while serializing: I/O error: No space left on device (os error 28)"
    assert write_failure(safetensors_like(text), tmp_path) == errno.ENOSPC
    assert write_failure(RuntimeError("open file failed with strerror: Read-only file system"), tmp_path) == \
        errno.EROFS
    assert write_failure(OSError(errno.EDQUOT, "Disk quota exceeded"), tmp_path) == errno.EDQUOT
    assert write_failure(TypeError("no space left on device"), tmp_path) is None  # a bug, whatever it says
    assert write_failure(KeyboardInterrupt(), tmp_path) is None
    assert write_failure(RuntimeError("unexpected pos 576 vs 534"), tmp_path) is None  # plenty of space here

    class Full:
        f_flag, f_bavail, f_frsize = 0, 3, 4096

    monkeypatch.setattr(rundir_module.os, "statvfs", lambda path: Full())
    assert write_failure(RuntimeError("unexpected pos 576 vs 534"), tmp_path / "missing" / "f") == errno.ENOSPC
    Full.f_flag, Full.f_bavail = os.ST_RDONLY, 10**9
    assert write_failure(RuntimeError("unexpected pos 576 vs 534"), tmp_path) == errno.EROFS


# Real file systems: a full tmpfs and a read-only mount (root with mount(8) only)


@pytest.fixture
def tmpfs(tmp_path):
    """``mount(size_kib)`` mounts a tmpfs of that size under ``tmp_path`` (skips where that is not permitted)."""
    mounted = []

    def mount(size_kib: int) -> Path:
        if not sys.platform.startswith("linux") or os.geteuid() != 0 or shutil.which("mount") is None:
            pytest.skip("mounting a tmpfs needs Linux, root and mount(8)")
        target = tmp_path / f"mnt{len(mounted)}"
        target.mkdir()
        done = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size_kib}k", "tmpfs", str(target)],
                              capture_output=True, text=True)
        if done.returncode:
            pytest.skip(f"cannot mount a tmpfs here: {done.stderr.strip() or done.returncode}")
        mounted.append(target)
        return target

    yield mount
    for target in reversed(mounted):
        subprocess.run(["umount", "-l", str(target)], capture_output=True)


def _fill(directory: Path, leave_bytes: int) -> None:
    stat = os.statvfs(directory)
    size = stat.f_bavail * stat.f_frsize - leave_bytes
    with open(directory / "filler", "wb") as f:
        f.write(b"\0" * size)


def test_a_full_tmpfs(tmp_path, full_run, tmpfs, capsys):
    disk = tmpfs(4096)
    run = disk / "run"
    config = _config_file(tmp_path, keep_checkpoints=1)
    assert main(["train", str(config), "--out", str(run), "--no-progress", "--stop-after", "3"]) == 0
    _fill(disk, leave_bytes=32 * 1024)  # room for the lock and metrics, not for a checkpoint
    capsys.readouterr()
    assert main(["train", "--out", str(run), "--resume", "--no-progress"]) == 1
    err = capsys.readouterr().err
    assert err.strip().splitlines()[-1] == (
        f"seqblocks train: error: no space left on device while writing {run}/checkpoints/step_0000006; the last "
        f"complete checkpoint is {run}/checkpoints/step_0000003")
    assert "Traceback" not in err
    _assert_intact(run, 3)
    (disk / "filler").unlink()
    assert main(["train", "--out", str(run), "--resume", "--no-progress"]) == 0
    assert _losses(run) == _losses(full_run)


def test_a_read_only_mount(tmp_path, tmpfs, capsys):
    disk = tmpfs(4096)
    run = disk / "run"
    config = _config_file(tmp_path)
    assert main(["train", str(config), "--out", str(run), "--no-progress", "--stop-after", "3"]) == 0
    done = subprocess.run(["mount", "-o", "remount,ro", str(disk)], capture_output=True, text=True)
    if done.returncode:
        pytest.skip(f"cannot remount the tmpfs read-only: {done.stderr.strip()}")
    capsys.readouterr()
    assert main(["train", "--out", str(run), "--resume", "--no-progress"]) == 1
    assert capsys.readouterr().err.strip().splitlines()[-1] == (
        f"seqblocks train: error: read-only file system while writing {run}/.lock; the last complete checkpoint "
        f"is {run}/checkpoints/step_0000003")
    assert main(["train", str(config), "--out", str(disk / "fresh"), "--no-progress"]) == 1
    assert "read-only file system while writing" in capsys.readouterr().err
    assert latest_checkpoint(run).name == "step_0000003" and load_train_state(latest_checkpoint(run))["step"] == 3


# kill -9


KILLED_WRITER = textwrap.dedent("""
    import json, os, signal, sys
    import seqblocks
    from seqblocks.train import TrainConfig, metrics, train

    model, config, out = json.loads(sys.argv[1]), TrainConfig.from_dict(json.loads(sys.argv[2])), sys.argv[3]
    real_write, rows = metrics.MetricsWriter.write, []

    def write(self, row):
        rows.append(row)
        if len(rows) == 5:  # half of the fifth row is in the file when the process is killed
            data = (json.dumps(row) + "\\n").encode()
            os.write(self._fd, data[: len(data) // 2])
            os.kill(os.getpid(), signal.SIGKILL)
        real_write(self, row)

    metrics.MetricsWriter.write = write
    train(model, config, out, progress=False, log=lambda m: None)
""")


def test_kill_9_during_a_metrics_write_then_resume(tmp_path, full_run):
    run = tmp_path / "run"
    killed = subprocess.run([sys.executable, "-c", KILLED_WRITER, json.dumps(TINY), _config().to_json(), str(run)],
                            env=_subprocess_env(), capture_output=True, text=True, timeout=300)
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    text = (run / "metrics.jsonl").read_text()
    assert text.count("\n") == 4 and not text.endswith("\n")  # four rows and a torn fifth
    lock = read_lock(run)  # the killed process's lock is still there
    assert lock is not None and lock.pid != os.getpid()
    assert latest_checkpoint(run).name == "step_0000003"
    messages = []
    resumed = train({}, _config(), run, resume=True, progress=False, log=messages.append)
    assert resumed.step == 6
    assert any("has exited" in m for m in messages)  # the stale lock was taken over
    # The steps before the kill ran in another process, with one thread: equal up to float reordering.
    assert _losses(run) == pytest.approx(_losses(full_run), rel=1e-5)
    assert [(r["type"], r["step"]) for r in read_metrics(run / "metrics.jsonl")] == \
        [(r["type"], r["step"]) for r in read_metrics(full_run / "metrics.jsonl")]


def test_two_writers_then_kill_9_from_outside_then_resume(tmp_path, capsys):
    run = tmp_path / "run"
    long_run = _config_file(tmp_path, steps=1000, ckpt_every=1, keep_checkpoints=2)
    first = subprocess.Popen([sys.executable, "-m", "seqblocks", "train", str(long_run), "--out", str(run),
                              "--no-progress"], env=_subprocess_env(), stdout=subprocess.DEVNULL,
                             stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 240
        while latest_checkpoint(run) is None or latest_checkpoint(run).name < "step_0000002":
            assert first.poll() is None, first.stderr.read().decode()
            assert time.monotonic() < deadline, "the first writer made no checkpoint"
            time.sleep(0.05)
        # The second writer, with or without --resume, is refused while the first trains.
        for extra in ([], ["--resume"], ["--overwrite"]):
            assert main(["train", str(long_run), "--out", str(run), "--no-progress", *extra]) == 2
            assert f"is in use by another training run (pid {first.pid} on host" in capsys.readouterr().err
    finally:
        first.send_signal(signal.SIGKILL)
        first.wait()
    assert first.returncode == -signal.SIGKILL
    reached = load_train_state(latest_checkpoint(run))["step"]
    resumed = train({}, _config(), run, resume=True, stop_after=reached + 2, **QUIET)
    assert resumed.step == reached + 2
    reference = train(TINY, _config(steps=1000), tmp_path / "reference", stop_after=reached + 2, **QUIET)
    assert reference.step == reached + 2
    # The steps before the kill ran in another process, with one thread: equal up to float reordering.
    assert _losses(run) == pytest.approx(_losses(tmp_path / "reference"), rel=1e-5)
    assert _temporary(run) == [] and not (run / LOCK_FILE).exists()

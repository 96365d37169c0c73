"""Run directories with one owner, whose runs are never lost without being asked.

A training run owns its directory (``seqblocks train --out DIR``) from start to end:

- **A lock.** ``DIR/.lock`` is created atomically (``O_CREAT | O_EXCL``) and holds JSON
  ``{"pid", "host", "started", "token", "pid_start"}``. A second writer finds it and is refused,
  with the owner named. A lock is stale when its host is this one and its process has exited (or
  its pid now belongs to another process, told apart by the process start time on Linux); a stale
  lock is removed and taken over. A lock from another host cannot be checked and is respected; the
  refusal says how to break it (``--force-unlock``, or deleting the file). Breaking goes through a
  second exclusive file, ``DIR/.lock.break``, so two processes that find the same stale lock do not
  both take it.
- **No run lost silently.** A directory holding a previous run (checkpoints, metrics, ``run.json``)
  is refused to a fresh run unless it resumes (``--resume``) or starts over (``--overwrite``, which
  deletes the run's own files and nothing else in the directory).
- **No stale temporary files.** The atomic writes of ``seqblocks.train.checkpointing`` use names
  marked ``.tmp-``; a failed write removes its own, and the owner removes any a killed process left.
- **Write failures in one line.** A full disk, a read-only file system or a refused permission while
  writing becomes ``RunDirectoryWriteError``, whose message names the file and the last complete
  checkpoint, which the atomic writes leave intact.

Under torchrun only rank 0 owns the directory: it alone locks and writes.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime
import errno
import json
import os
import secrets
import shutil
import socket
import time
from collections.abc import Callable, Iterator
from pathlib import Path

from seqblocks.train.checkpointing import CHECKPOINT_DIR, is_temporary, latest_checkpoint

__all__ = ["RunDirectory", "RunDirectoryError", "RunDirectoryWriteError", "LockInfo", "read_lock", "write_failure",
           "LOCK_FILE", "METRICS_FILE", "RUN_CONFIG", "LOSS_PLOT"]

LOCK_FILE = ".lock"
METRICS_FILE = "metrics.jsonl"
RUN_CONFIG = "run.json"
LOSS_PLOT = "loss.png"
_BREAK_SUFFIX = ".break"
# Filling in a new lock takes microseconds; a lock still unreadable after this long was left half-made.
_UNREADABLE_LOCK_STALE_S = 30.0
# Breaking a stale lock takes milliseconds; a break guard older than this was left by a killed process.
_BREAK_GUARD_STALE_S = 10.0
_BREAK_WAIT_S = 5.0
# Each attempt either takes the lock or breaks a stale one; only competing processes need a second.
_ACQUIRE_ATTEMPTS = 20
# Below this much free space a failed write is taken to be a full disk (when the error does not say).
_NEARLY_FULL_BYTES = 1 << 20

_REASONS = {
    errno.ENOSPC: "no space left on device",
    errno.EDQUOT: "disk quota exceeded",
    errno.EROFS: "read-only file system",
    errno.EACCES: "permission denied",
    errno.EPERM: "operation not permitted",
}
# Libraries that do not raise OSError (safetensors, torch's file writer) put the reason in their text.
_REASON_TEXT = (
    ("no space left on device", errno.ENOSPC), ("os error 28", errno.ENOSPC),
    ("disk quota exceeded", errno.EDQUOT), ("os error 122", errno.EDQUOT),
    ("read-only file system", errno.EROFS), ("os error 30", errno.EROFS),
    ("permission denied", errno.EACCES), ("os error 13", errno.EACCES),
)
# Errors of the program itself: never blamed on the disk.
_PROGRAM_ERRORS = (TypeError, ValueError, AttributeError, LookupError, NameError, AssertionError, ImportError,
                   ArithmeticError)

# Locks taken by this process, by path: a lock naming this pid that is not here was left by an
# earlier process that had the same pid (a restarted container often reuses small pids).
_HELD: set[str] = set()


class RunDirectoryError(ValueError):
    """The run directory cannot be used as asked: another run holds it, or a run in it would be lost."""


class RunDirectoryWriteError(OSError):
    """Writing into a run directory failed for want of space or permission.

    ``errno`` is the cause (``ENOSPC``, ``EDQUOT``, ``EROFS``, ``EACCES``, ``EPERM``); the message is one
    line naming the file and the last complete checkpoint.
    """

    def __init__(self, code: int, message: str):
        super().__init__(message)
        self.errno = code


@dataclasses.dataclass(frozen=True)
class LockInfo:
    """The owner a lock file names.

    Attributes:
        pid (int): the owning process.
        host (str): its host name.
        started (str): when it took the lock (ISO 8601, UTC).
        token (str): random; tells this lock apart from a later one of the same pid.
        pid_start (int | None): the process start time in clock ticks since boot (Linux), to tell a
            reused pid from the owner.
    """

    pid: int
    host: str
    started: str
    token: str
    pid_start: int | None = None

    @classmethod
    def for_this_process(cls) -> LockInfo:
        now = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
        return cls(pid=os.getpid(), host=socket.gethostname(), started=now, token=secrets.token_hex(8),
                   pid_start=_process_start(os.getpid()))

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self)) + "\n"

    @classmethod
    def from_json(cls, text: str) -> LockInfo | None:
        """The lock in ``text``, or None when it is not a complete lock record."""
        try:
            data = json.loads(text)
            info = cls(pid=data["pid"], host=data["host"], started=data["started"], token=data["token"],
                       pid_start=data.get("pid_start"))
        except (json.JSONDecodeError, TypeError, KeyError):
            return None
        valid = isinstance(info.pid, int) and info.pid > 0 and isinstance(info.host, str)
        return info if valid else None

    def describe(self) -> str:
        return f"pid {self.pid} on host {self.host!r}, since {self.started}"


def read_lock(run_dir: str | os.PathLike) -> LockInfo | None:
    """The owner named by ``run_dir``'s lock, or None when it has no (readable) lock."""
    text = _read_text(Path(run_dir) / LOCK_FILE)
    return None if text is None else LockInfo.from_json(text)


def write_failure(err: BaseException, path: str | os.PathLike) -> int | None:
    """The errno of a write into ``path`` that failed for want of space or permission, else None.

    Looks, in order, at the ``errno`` of the exception and of its causes, at their text (safetensors
    and torch's file writer do not raise ``OSError``), then at the file system itself: torch's writer
    reports a full disk only as "unexpected pos", so an unexplained failure on a read-only or nearly
    full file system is put down to it. Errors of the program (``TypeError``, ``KeyError``, ...) are
    never blamed on the disk.
    """
    if not isinstance(err, Exception) or isinstance(err, _PROGRAM_ERRORS):
        return None
    chain = list(_chain(err))
    for e in chain:
        if isinstance(e, OSError) and e.errno in _REASONS:
            return e.errno
    for e in chain:
        text = str(e).lower()
        for needle, code in _REASON_TEXT:
            if needle in text:
                return code
    if isinstance(err, OSError | RuntimeError):
        return _file_system_state(Path(path))
    return None


def _chain(err: BaseException) -> Iterator[BaseException]:
    seen: set[int] = set()
    while err is not None and id(err) not in seen:
        seen.add(id(err))
        yield err
        err = err.__cause__ or err.__context__


def _file_system_state(path: Path) -> int | None:
    """EROFS or ENOSPC when the file system holding ``path`` is read-only or nearly full, else None."""
    for candidate in (path, *path.parents):
        if candidate.exists():
            try:
                stat = os.statvfs(candidate)
            except OSError:
                return None
            if stat.f_flag & os.ST_RDONLY:
                return errno.EROFS
            if stat.f_bavail * stat.f_frsize < _NEARLY_FULL_BYTES:
                return errno.ENOSPC
            return None
    return None


class RunDirectory:
    """The ownership of one run directory, held as a context manager.

    ``with RunDirectory(path) as run:`` takes the lock (creating the directory), and gives it back on
    leaving, however the block ends. ``prepare`` then refuses, clears or accepts what is there.

    Args:
        path (str | PathLike): the run directory.
        force_unlock (bool): take the lock even when its owner looks alive (another host's, or a hung
            process). Default: False.
        log (Callable[[str], None] | None): where messages go. Default: None (nowhere).

    Raises (on entering):
        RunDirectoryError: another process holds the lock.
        RunDirectoryWriteError: the directory or its lock cannot be written.
    """

    def __init__(self, path: str | os.PathLike, *, force_unlock: bool = False,
                 log: Callable[[str], None] | None = None):
        self.path = Path(path)
        self.lock_path = self.path / LOCK_FILE
        self.force_unlock = force_unlock
        self._log = log or (lambda msg: None)
        self._lock: LockInfo | None = None

    def __enter__(self) -> RunDirectory:
        self.acquire()
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()

    @property
    def locked(self) -> bool:
        """Whether this object holds the lock."""
        return self._lock is not None

    def acquire(self) -> None:
        """Take the lock, breaking a stale one (or any, with ``force_unlock``)."""
        if self._lock is not None:
            raise RunDirectoryError(f"run directory {self.path} is already locked by this RunDirectory")
        key = self._key()
        if key in _HELD:
            raise RunDirectoryError(f"run directory {self.path} is already in use by this process (pid {os.getpid()})")
        if self.path.exists() and not self.path.is_dir():
            raise RunDirectoryError(f"run directory {self.path} exists and is not a directory; choose another --out")
        mine = LockInfo.for_this_process()
        with self.writing(self.lock_path):
            self.path.mkdir(parents=True, exist_ok=True)
            for _ in range(_ACQUIRE_ATTEMPTS):
                if _create_exclusive(self.lock_path, mine.to_json()):
                    break
                seen = _read_text(self.lock_path)
                if seen is None:  # released between our attempt and the read: try again
                    continue
                holder = LockInfo.from_json(seen)
                if self.force_unlock:
                    self._break(seen, "--force-unlock")
                    continue
                why = self._stale(holder)
                if why is None:
                    raise RunDirectoryError(self._in_use(holder))
                self._break(seen, why)
            else:
                raise RunDirectoryError(f"{self.lock_path} keeps changing: other processes are taking this run "
                                        f"directory; stop them, or use another --out")
        self._lock = mine
        _HELD.add(key)

    def release(self) -> None:
        """Give the lock back (a lock another process has since taken over is left alone)."""
        if self._lock is None:
            return
        try:
            if _read_text(self.lock_path) == self._lock.to_json():
                self.lock_path.unlink()
        except OSError as err:  # a read-only or vanished directory: nothing more can be done
            self._log(f"could not remove the lock {self.lock_path}: {err}")
        finally:
            _HELD.discard(self._key())
            self._lock = None

    def _key(self) -> str:
        return os.path.realpath(self.lock_path)

    def _stale(self, holder: LockInfo | None) -> str | None:
        """Why the lock is stale, or None while its owner may be alive."""
        if holder is None:
            age = _age(self.lock_path)
            if age is not None and age > _UNREADABLE_LOCK_STALE_S:
                return f"the lock is unreadable and {age:.0f} s old"
            return None
        if holder.host != socket.gethostname():
            return None
        if holder.pid == os.getpid():
            return "it was left by an earlier process with this pid"
        status = _process_status(holder.pid, holder.pid_start)
        if status == "exited":
            return f"its process {holder.pid} has exited"
        if status == "reused":
            return f"its process has exited and pid {holder.pid} now belongs to another one"
        return None

    def _in_use(self, holder: LockInfo | None) -> str:
        owner = holder.describe() if holder is not None else "its lock file is being written"
        return (f"run directory {self.path} is in use by another training run ({owner}); wait for it to end, or, "
                f"if it is no longer running, pass --force-unlock (or delete {self.lock_path})")

    def _break(self, seen: str, why: str) -> None:
        """Remove the lock whose text was ``seen``, unless another process changed it meanwhile."""
        guard = self.lock_path.with_name(LOCK_FILE + _BREAK_SUFFIX)
        deadline = time.monotonic() + _BREAK_WAIT_S
        while not _create_exclusive(guard, f"{os.getpid()}\n"):
            age = _age(guard)
            if age is not None and age > _BREAK_GUARD_STALE_S:
                guard.unlink(missing_ok=True)
            elif time.monotonic() > deadline:
                raise RunDirectoryError(f"another process is breaking the lock of {self.path} ({guard} exists); "
                                        f"delete {guard} if no process is")
            else:
                time.sleep(0.05)
        try:
            # Under the guard the lock changes only by its owner's release or a fresh lock: if it is no
            # longer the one judged stale, another breaker has already replaced it.
            if _read_text(self.lock_path) == seen:
                self.lock_path.unlink()
                holder = LockInfo.from_json(seen)
                owner = holder.describe() if holder is not None else "unreadable"
                self._log(f"run directory {self.path}: removed the lock of {owner}: {why}")
        finally:
            guard.unlink(missing_ok=True)

    def previous_run(self) -> list[str]:
        """What of a previous run the directory holds (empty when none): checkpoints, metrics, run.json."""
        found = []
        latest = latest_checkpoint(self.path)
        root = self.path / CHECKPOINT_DIR
        if latest is not None:
            found.append(f"checkpoint {latest.name}")
        elif root.is_dir() and any(p.name.startswith("step_") for p in root.iterdir()):
            found.append(CHECKPOINT_DIR)
        metrics = self.path / METRICS_FILE
        if metrics.is_file() and metrics.stat().st_size > 0:
            found.append(METRICS_FILE)
        if (self.path / RUN_CONFIG).is_file():
            found.append(RUN_CONFIG)
        return found

    def prepare(self, *, resume: bool = False, overwrite: bool = False) -> None:
        """Make the directory ready for a run: remove temporary files, then refuse or clear a previous run.

        Args:
            resume (bool): the run continues the one in the directory. Default: False.
            overwrite (bool): a fresh run replaces the one in the directory. Default: False.

        Raises:
            RunDirectoryError: a fresh run without ``overwrite`` in a directory holding a run.
            ValueError: both ``resume`` and ``overwrite``.
        """
        if resume and overwrite:
            raise ValueError("--resume continues the run in the directory and --overwrite deletes it; give one")
        self._require_lock()
        self.remove_temporary()
        found = self.previous_run()
        if found and not resume:
            if not overwrite:
                raise RunDirectoryError(
                    f"run directory {self.path} holds a previous run ({', '.join(found)}); continue it with --resume, "
                    f"or start over with --overwrite (deletes its checkpoints and metrics)")
            self._log(f"--overwrite: deleting the previous run in {self.path} ({', '.join(found)})")
            self.clear()

    def clear(self) -> None:
        """Delete the run's own files (checkpoints, metrics, run.json, the loss plot, its TensorBoard / W&B
        logs); nothing else."""
        self._require_lock()
        with self.writing(self.path):
            # The TensorBoard and W&B logs of seqblocks.train.logging belong to the run too.
            for name in (CHECKPOINT_DIR, "tensorboard", "wandb"):
                if (self.path / name).is_dir():
                    shutil.rmtree(self.path / name)
            for name in (METRICS_FILE, RUN_CONFIG, LOSS_PLOT):
                (self.path / name).unlink(missing_ok=True)

    def remove_temporary(self) -> list[Path]:
        """Remove the temporary files and directories interrupted writes left; returns them."""
        self._require_lock()
        removed = []
        with self.writing(self.path):
            for folder in (self.path, self.path / CHECKPOINT_DIR):
                if not folder.is_dir():
                    continue
                for entry in sorted(folder.iterdir()):
                    if is_temporary(entry.name):
                        if entry.is_dir() and not entry.is_symlink():
                            shutil.rmtree(entry)
                        else:
                            entry.unlink()
                        removed.append(entry)
        if removed:
            self._log(f"run directory {self.path}: removed {len(removed)} temporary file(s) an interrupted run left: "
                      f"{', '.join(p.name for p in removed)}")
        return removed

    def _require_lock(self) -> None:
        if self._lock is None:
            raise RunDirectoryError(f"run directory {self.path} must be locked first (enter RunDirectory as a "
                                    f"context manager)")

    @contextlib.contextmanager
    def writing(self, path: str | os.PathLike) -> Iterator[None]:
        """Turn a failure for want of space or permission while writing ``path`` into one clear error."""
        try:
            yield
        except RunDirectoryWriteError:
            raise
        except Exception as err:
            code = write_failure(err, path)
            if code is None:
                raise
            raise RunDirectoryWriteError(code, self.failure_message(code, path)) from err

    def failure_message(self, code: int, path: str | os.PathLike) -> str:
        """``"<reason> while writing <path>; the last complete checkpoint is <checkpoint>"``."""
        try:
            latest = latest_checkpoint(self.path)
        except OSError:
            latest = None
        last = (f"the last complete checkpoint is {latest}" if latest is not None
                else f"run directory {self.path} holds no complete checkpoint")
        return f"{_REASONS.get(code, os.strerror(code)).lower()} while writing {path}; {last}"


def _create_exclusive(path: Path, text: str) -> bool:
    """Create ``path`` holding ``text`` if it does not exist (atomically); False if it does."""
    try:
        fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
    except FileExistsError:
        return False
    try:
        data = memoryview(text.encode())
        while data:
            data = data[os.write(fd, data):]
        os.fsync(fd)
    except BaseException:
        os.close(fd)
        path.unlink(missing_ok=True)
        raise
    os.close(fd)
    return True


def _read_text(path: Path) -> str | None:
    try:
        return path.read_text()
    except FileNotFoundError:
        return None


def _age(path: Path) -> float | None:
    try:
        return time.time() - path.stat().st_mtime
    except FileNotFoundError:
        return None


def _proc_stat(pid: int) -> tuple[str, int] | None:
    """(state, start time in clock ticks) of ``pid`` from ``/proc`` (Linux), or None."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    # "pid (comm) state ppid ...": comm may hold spaces and parentheses, so split after the last ')'.
    fields = text[text.rfind(")") + 2:].split()
    try:
        return fields[0], int(fields[19])
    except (IndexError, ValueError):
        return None


def _process_start(pid: int) -> int | None:
    stat = _proc_stat(pid)
    return None if stat is None else stat[1]


def _process_status(pid: int, started: int | None) -> str:
    """"alive", "exited", or "reused" (``pid`` runs, but started at another time than ``started``)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return "exited"
    except PermissionError:  # it exists, under another user
        pass
    stat = _proc_stat(pid)
    if stat is None:
        return "alive"
    state, start = stat
    if state in ("Z", "X"):  # killed, not yet reaped by its parent
        return "exited"
    return "alive" if started is None or start == started else "reused"


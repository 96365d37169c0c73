"""How many threads torch's CPU operations use under the ``seqblocks`` command.

torch starts one thread per physical core, and every parallel operation waits for all of them. On a
machine where other processes keep cores busy, that wait is long: on a 2-core machine with one core
taken by another process, training the default preset ran at about 1,650 tokens/s with 2 threads and
10,750 with 1 thread; on the same machine when quiet, 2 threads give 18,700 tokens/s and 1 thread
10,800 (docs/cli.md, "CPU threads"). No fixed number is right for both, so by default the command
uses the cores other processes leave idle, and re-checks while it trains:

- ``--threads N`` fixes the count at N; so does ``OMP_NUM_THREADS`` (torch reads it at start-up, and
  then seqblocks leaves the count alone). ``torchrun`` sets ``OMP_NUM_THREADS=1`` for its processes.
- Otherwise the count starts at the number of idle cores (measured over 0.1 s, at most torch's
  default and the cores this process may run on, at least 1), and every few seconds of training the
  CPU time other processes took is measured again (``/proc/stat`` minus this process's own time) and
  the count follows. Where ``/proc/stat`` does not exist (macOS, Windows) torch's default stays.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Iterable, Mapping

import torch

__all__ = ["CpuThreads", "read_cpu_times"]

# A core counts as free when at least this much of it is idle (so a core another process uses a
# quarter of the time is not shared with a second thread of ours).
FREE_CORE = 0.75
# How long the starting count is measured (clock ticks are 10 ms: 10 per CPU).
SAMPLE_S = 0.1


def read_cpu_times(cpus: Iterable[int], path: str = "/proc/stat") -> tuple[float, float] | None:
    """``(busy, total)`` clock ticks summed over ``cpus`` since boot, from ``/proc/stat``; None where
    the file does not exist. Busy is everything but idle and I/O wait (steal time counts as busy: a
    hypervisor's other guests had the core)."""
    wanted = set(cpus)
    try:
        with open(path) as handle:
            lines = handle.readlines()
    except OSError:
        return None
    busy = total = 0.0
    for line in lines:
        name, _, rest = line.partition(" ")
        if not (name.startswith("cpu") and name[3:].isdigit() and int(name[3:]) in wanted):
            continue
        ticks = [float(v) for v in rest.split()[:8]]  # user nice system idle iowait irq softirq steal
        idle = ticks[3] + (ticks[4] if len(ticks) > 4 else 0.0)
        total += sum(ticks)
        busy += sum(ticks) - idle
    return (busy, total) if total > 0 else None


def _allowed_cpus() -> list[int]:
    if hasattr(os, "sched_getaffinity"):
        return sorted(os.sched_getaffinity(0))
    return list(range(os.cpu_count() or 1))


class CpuThreads:
    """Chooses, and while training adjusts, ``torch.set_num_threads`` (see the module docstring).

    Args:
        requested (int | None): ``--threads``; None chooses automatically. Default: None.
        environ (Mapping[str, str] | None): where ``OMP_NUM_THREADS`` is looked up. Default: None
            (``os.environ``).
        interval (float): seconds between re-checks while training. Default: 5.0.
        cpus (list[int] | None): the CPUs this process may use. Default: None (its affinity).
        read_times (Callable | None): ``cpus -> (busy, total) | None``. Default: None
            (``read_cpu_times``).
        clock, process_time, sleep: ``time.monotonic``, ``time.process_time``, ``time.sleep``
            (replaceable for tests).
        get_threads, set_threads: ``torch.get_num_threads``, ``torch.set_num_threads``.

    Raises:
        ValueError: ``requested`` is not a positive integer.
    """

    def __init__(self, requested: int | None = None, *, environ: Mapping[str, str] | None = None,
                 interval: float = 5.0, cpus: list[int] | None = None,
                 read_times: Callable[[list[int]], tuple[float, float] | None] | None = None,
                 clock: Callable[[], float] = time.monotonic, process_time: Callable[[], float] = time.process_time,
                 sleep: Callable[[float], None] = time.sleep,
                 get_threads: Callable[[], int] = torch.get_num_threads,
                 set_threads: Callable[[int], None] = torch.set_num_threads) -> None:
        if requested is not None and (isinstance(requested, bool) or not isinstance(requested, int) or requested < 1):
            raise ValueError(f"--threads {requested!r} must be a positive integer")
        environ = os.environ if environ is None else environ
        self.requested = requested
        self.from_environment = requested is None and bool(environ.get("OMP_NUM_THREADS"))
        self.cpus = list(cpus) if cpus is not None else _allowed_cpus()
        self.interval = interval
        self._read = read_times if read_times is not None else read_cpu_times
        self._clock, self._cpu, self._sleep = clock, process_time, sleep
        self._get, self._set = get_threads, set_threads
        self.initial = get_threads()
        self.limit = max(1, min(self.initial, len(self.cpus)))
        self._last: tuple[float, float, float, float] | None = None  # (wall, own cpu, busy, total)

    @property
    def adaptive(self) -> bool:
        """Whether the count follows the machine's load (neither --threads nor OMP_NUM_THREADS given)."""
        return self.requested is None and not self.from_environment and self.limit > 1

    def _sample(self) -> tuple[float, float, float, float] | None:
        times = self._read(self.cpus)
        return None if times is None else (self._clock(), self._cpu(), *times)

    def _count(self, busy_cores: float) -> int:
        free = len(self.cpus) - max(0.0, busy_cores)
        return max(1, min(self.limit, int(free + 1 - FREE_CORE)))

    def start(self) -> int:
        """Set the starting count; returns it."""
        if self.requested is not None:
            self._set(self.requested)
        elif self.adaptive:
            before = self._sample()
            if before is not None:
                self._sleep(SAMPLE_S)
                after = self._sample()
                if after is not None:
                    self._apply(before, after)
                    self._last = after
        return self._get()

    def _apply(self, before: tuple[float, float, float, float], after: tuple[float, float, float, float]) -> None:
        wall, ticks = after[0] - before[0], after[3] - before[3]
        if wall <= 0 or ticks <= 0:
            return
        busy_cores = (after[2] - before[2]) / ticks * len(self.cpus)
        own_cores = (after[1] - before[1]) / wall
        count = self._count(busy_cores - own_cores)
        if count != self._get():
            self._set(count)

    def update(self, *_: object) -> None:
        """Re-check the other processes' load once ``interval`` seconds have passed (call it often:
        it does nothing in between). Takes and ignores any arguments, so it can be a step hook."""
        if not self.adaptive or self._last is None or self._clock() - self._last[0] < self.interval:
            return
        now = self._sample()
        if now is not None:
            self._apply(self._last, now)
            self._last = now

    def describe(self) -> str:
        """One line for the run's header."""
        n = self._get()
        if self.requested is not None:
            return f"{n} CPU thread{'s' * (n != 1)} (--threads)"
        if self.from_environment:
            return f"{n} CPU thread{'s' * (n != 1)} (OMP_NUM_THREADS)"
        if not self.adaptive:
            return f"{n} CPU thread{'s' * (n != 1)}"
        return (f"{n} of {self.limit} CPU threads (the cores other processes leave idle, re-checked while "
                f"training; --threads N fixes it)")

    def restore(self) -> None:
        """Put torch's count back as it was (``main`` runs in-process in tests and notebooks)."""
        self._set(self.initial)

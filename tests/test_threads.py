"""The command line's CPU thread count: fixed by --threads or OMP_NUM_THREADS, else the cores other
processes leave idle, re-checked while training (seqblocks/cli/threads.py)."""

from __future__ import annotations

import json

import pytest
import torch

from seqblocks.cli import main
from seqblocks.cli.threads import CpuThreads, read_cpu_times


class FakeMachine:
    """Two CPUs, a clock, this process's CPU time and /proc/stat ticks (100 per CPU-second)."""

    def __init__(self) -> None:
        self.wall = self.own = self.busy = self.total = 0.0
        self.threads = 2
        self.set_calls: list[int] = []

    def run(self, seconds: float, own_cores: float, other_cores: float) -> None:
        self.wall += seconds
        self.own += seconds * own_cores
        self.busy += 100 * seconds * min(2.0, own_cores + other_cores)
        self.total += 100 * seconds * 2

    def set(self, n: int) -> None:
        self.set_calls.append(n)
        self.threads = n

    def threads_for(self, requested=None, environ=None, other_cores=0.0) -> CpuThreads:
        def sleep(seconds: float) -> None:
            self.run(seconds, 0.0, other_cores)  # this process waits; the others run

        return CpuThreads(requested, environ=environ or {}, cpus=[0, 1], read_times=lambda cpus: (self.busy,
                          self.total), clock=lambda: self.wall, process_time=lambda: self.own, sleep=sleep,
                          get_threads=lambda: self.threads, set_threads=self.set)


def test_a_quiet_machine_keeps_every_core():
    m = FakeMachine()
    threads = m.threads_for(other_cores=0.05)
    assert threads.adaptive and threads.start() == 2 and m.set_calls == []
    assert threads.describe().startswith("2 of 2 CPU threads (the cores other processes leave idle")


@pytest.mark.parametrize("other_cores, expected", [(1.0, 1), (2.0, 1), (0.3, 1), (0.2, 2)])
def test_the_starting_count_leaves_the_busy_cores_alone(other_cores, expected):
    m = FakeMachine()
    assert m.threads_for(other_cores=other_cores).start() == expected


def test_the_count_follows_the_load_while_training():
    m = FakeMachine()
    threads = m.threads_for(other_cores=0.0)
    assert threads.start() == 2
    m.run(3.0, own_cores=2.0, other_cores=0.0)
    threads.update(10)
    assert m.set_calls == []  # nothing to change
    # Another job takes a core: with 2 threads it gets about 2/3 of a core, we keep the rest.
    m.run(2.5, own_cores=1.33, other_cores=0.67)
    threads.update(20)
    assert m.threads == 1
    m.run(1.0, own_cores=1.0, other_cores=1.0)
    threads.update(30)  # less than `interval` seconds since the last check: not even measured
    assert m.set_calls == [1]
    m.run(5.0, own_cores=1.0, other_cores=1.0)
    threads.update(40)
    assert m.threads == 1
    m.run(5.0, own_cores=1.0, other_cores=0.0)  # the job ended
    threads.update(50)
    assert m.threads == 2 and m.set_calls == [1, 2]


def test_threads_flag_and_environment_fix_the_count():
    m = FakeMachine()
    fixed = m.threads_for(requested=3, other_cores=2.0)
    assert fixed.start() == 3 and not fixed.adaptive and fixed.describe() == "3 CPU threads (--threads)"
    m.run(10.0, 1.0, 1.0)
    fixed.update(1)
    assert m.set_calls == [3]
    env = m.threads_for(environ={"OMP_NUM_THREADS": "2"}, other_cores=2.0)
    assert env.start() == 3 and not env.adaptive and env.describe() == "3 CPU threads (OMP_NUM_THREADS)"
    assert m.set_calls == [3]  # the environment's count is torch's; seqblocks leaves it
    env.restore()
    assert m.threads == 3  # restore puts back what torch had when the object was made
    for bad in (0, -2, 1.5, True):
        with pytest.raises(ValueError, match="--threads"):
            CpuThreads(bad)


def test_without_proc_stat_torch_keeps_its_default():
    m = FakeMachine()
    threads = CpuThreads(None, environ={}, cpus=[0, 1], read_times=lambda cpus: None, get_threads=lambda: 2,
                         set_threads=m.set, sleep=lambda s: None)
    assert threads.start() == 2 and m.set_calls == []
    one_cpu = CpuThreads(None, environ={}, cpus=[0], get_threads=lambda: 1, set_threads=m.set)
    assert not one_cpu.adaptive and one_cpu.start() == 1


def test_proc_stat_is_read_for_the_allowed_cpus(tmp_path):
    stat = tmp_path / "stat"
    stat.write_text("cpu  300 0 100 900 50 0 0 0 0 0\n"
                    "cpu0 100 0 50 400 25 0 0 10 0 0\n"
                    "cpu1 200 0 50 500 25 0 0 0 0 0\n"
                    "intr 12345\n")
    assert read_cpu_times([0], str(stat)) == (160.0, 585.0)  # steal counts as busy, iowait as idle
    assert read_cpu_times([0, 1], str(stat)) == (410.0, 1360.0)
    assert read_cpu_times([5], str(stat)) is None and read_cpu_times([0], str(tmp_path / "none")) is None


@pytest.fixture
def restore_threads():
    before = torch.get_num_threads()
    yield before
    torch.set_num_threads(before)


TINY = {"d_model": 16, "d_state": 4, "n_layer": 1, "vocab_size": 98, "mixer_types": ["attn"], "d_intermediate": 0,
        "mixer_kwargs": {"attn": {"num_heads": 2}}}
TRAIN = {"task": "chars", "task_options": {"seq_len": 16, "max_chars": 40_000, "eval_examples": 4}, "steps": 2,
         "batch_size": 2, "warmup_steps": 1, "eval_every": 0, "ckpt_every": 0, "log_every": 1, "sample_tokens": 0,
         "device": "cpu"}


def test_train_with_threads_flag_records_the_count_and_restores_it(tmp_path, capsys, restore_threads):
    config = tmp_path / "c.json"
    config.write_text(json.dumps({"model": TINY, "train": TRAIN}))
    assert main(["train", str(config), "--out", str(tmp_path / "run"), "--no-progress", "--threads", "1"]) == 0
    assert "seqblocks train: 1 CPU thread (--threads)" in capsys.readouterr().err
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["cpu_threads"] for r in rows if r["type"] == "train"] == [1, 1]
    assert torch.get_num_threads() == restore_threads  # main() runs in-process here: it puts torch back


@pytest.mark.skipif(torch.get_num_threads() < 2 or len(CpuThreads().cpus) < 2, reason="needs two cores")
def test_train_by_default_leaves_a_busy_core_alone(tmp_path, capsys, monkeypatch, restore_threads):
    """The default reads the machine: here /proc/stat says another process keeps one core busy."""
    import seqblocks.cli.threads as threads_module

    ticks = {"n": 0}

    def one_core_busy(cpus):  # every read: the allowed CPUs were busy exactly half the time
        ticks["n"] += 1
        return 50.0 * len(cpus) * ticks["n"], 100.0 * len(cpus) * ticks["n"]

    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.setattr(threads_module, "read_cpu_times", one_core_busy)
    config = tmp_path / "c.json"
    config.write_text(json.dumps({"model": TINY, "train": TRAIN}))
    cpus = len(CpuThreads().cpus)
    assert main(["train", str(config), "--out", str(tmp_path / "run"), "--no-progress"]) == 0
    err = capsys.readouterr().err
    limit = min(restore_threads, cpus)
    assert f"seqblocks train: {max(1, min(limit, cpus // 2))} of {limit} CPU threads" in err  # half of them
    assert torch.get_num_threads() == restore_threads

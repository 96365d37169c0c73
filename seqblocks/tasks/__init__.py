"""Embedded tasks: synthetic recall / copying probes, character-level LM on the stdlib's source, a
text-to-text task for encoder-decoders, text classification from a CSV / JSONL file, ``shards``:
language modelling on your own text prepared by ``seqblocks prepare``, procedurally drawn shapes to
classify (``images``), and the real-valued tasks of ``seqblocks.tasks.signals`` (waveform denoising,
irregular time series; ``SIGNAL_TASKS``).

``TASKS`` maps task names to task classes; ``get_task(name, **options)`` builds one and raises
``ValueError`` listing the valid names (or the task's valid options) on a mistake.
"""

from __future__ import annotations

import inspect
from typing import Any

from seqblocks.registry import Registry
from seqblocks.tasks.base import IGNORE_INDEX, Batch, Task
from seqblocks.tasks.chars import CharTokenizer, StdlibChars
from seqblocks.tasks.classification import TextClassification
from seqblocks.tasks.images import ImageBatch, Shapes
from seqblocks.tasks.seq2seq import StringTransduction
from seqblocks.tasks.shards import PackedBatch, ShardTask
from seqblocks.tasks.signals import SIGNAL_TASKS, CoupledOscillators, Denoising, get_signal_task, si_snr
from seqblocks.tasks.synthetic import MQAR, Copying, InductionHeads, SelectiveCopying

__all__ = ["TASKS", "IGNORE_INDEX", "Batch", "Task", "CharTokenizer", "StdlibChars", "ShardTask", "PackedBatch",
           "MQAR", "Copying", "InductionHeads", "SelectiveCopying", "StringTransduction", "TextClassification",
           "get_task", "task_options", "SIGNAL_TASKS", "CoupledOscillators", "Denoising", "get_signal_task", "si_snr",
           "ImageBatch", "Shapes"]

TASKS: Registry = Registry("task")
for _cls in (StdlibChars, MQAR, SelectiveCopying, InductionHeads, Copying, StringTransduction, TextClassification,
             Shapes):
    TASKS.register(_cls.name, _cls, description=_cls.description)
TASKS.register("stdlib", StdlibChars, description="alias of 'chars'")
TASKS.register(ShardTask.name, ShardTask, description=ShardTask.description)


def task_options(name: str) -> dict[str, Any]:
    """The options task ``name`` accepts, with their defaults."""
    params = inspect.signature(TASKS.get(name).__init__).parameters
    return {k: p.default for k, p in params.items() if k != "self" and p.kind is not p.VAR_KEYWORD}


def get_task(name: str, **options: Any) -> Task:
    """Build task ``name`` with ``options``.

    Raises:
        ValueError: unknown task name (lists the valid ones) or unknown option (lists the valid ones).
        TypeError: an option of the wrong type (``seq_len="abc"``); the message names it and its default.
    """
    cls = TASKS.get(name)
    valid = task_options(name)
    unknown = sorted(set(options) - set(valid))
    if unknown:
        raise ValueError(f"task {name!r} has no option(s) {unknown}; valid options: {valid}")
    for key, value in options.items():
        _check_option_type(name, key, value, valid[key])
    return cls(**options)


def _check_option_type(task: str, key: str, value: Any, default: Any) -> None:
    """An option must have its default's type (an int serves a float option; None defaults take a str)."""
    if default is None:
        expected: tuple[type, ...] = (str, type(None))
    elif isinstance(default, bool):
        expected = (bool,)
    elif isinstance(default, int):
        expected = (int,)
    elif isinstance(default, float):
        expected = (int, float)
    else:
        expected = (type(default),)
    if (isinstance(value, bool) and bool not in expected) or not isinstance(value, expected):
        kind = " or ".join(_TYPE_WORDS[t] for t in expected if not (t is int and float in expected))
        raise TypeError(f"task {task!r} option {key}={value!r} must be {kind} (default {default!r})")


_TYPE_WORDS = {int: "an integer", float: "a number", str: "a string", bool: "True or False", type(None): "None"}

"""Embedded tasks: synthetic recall / copying probes, character-level LM on the stdlib's source, and
procedurally drawn shapes to classify (``images``).

``TASKS`` maps task names to task classes; ``get_task(name, **options)`` builds one and raises
``ValueError`` listing the valid names (or the task's valid options) on a mistake.
"""

from __future__ import annotations

import inspect
from typing import Any

from seqblocks.registry import Registry
from seqblocks.tasks.base import IGNORE_INDEX, Batch, Task
from seqblocks.tasks.chars import CharTokenizer, StdlibChars
from seqblocks.tasks.images import ImageBatch, Shapes
from seqblocks.tasks.synthetic import MQAR, Copying, InductionHeads, SelectiveCopying

__all__ = ["TASKS", "IGNORE_INDEX", "Batch", "Task", "CharTokenizer", "StdlibChars", "MQAR", "Copying",
           "InductionHeads", "SelectiveCopying", "get_task", "task_options", "ImageBatch", "Shapes"]

TASKS: Registry = Registry("task")
for _cls in (StdlibChars, MQAR, SelectiveCopying, InductionHeads, Copying, Shapes):
    TASKS.register(_cls.name, _cls, description=_cls.description)
TASKS.register("stdlib", StdlibChars, description="alias of 'chars'")


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

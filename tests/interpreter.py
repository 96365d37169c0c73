"""Running Triton kernel tests on the CPU through Triton's interpreter (``TRITON_INTERPRET=1``).

Triton fixes compile-or-interpret process-wide when it is first imported (its own library functions
are decorated then), and ``resolve_backend`` reads the variable too, so setting it inside the main
pytest process would leak into every other test. A kernel test file therefore holds, in a process
without the variable, one test that reruns the file in a child pytest process with the variable set
(``run_file_under_interpreter``); in the child, or under ``TRITON_INTERPRET=1 pytest tests/...``, its
real cases are collected and run directly.
"""

from __future__ import annotations

import os
import subprocess
import sys

from seqblocks.ops._backend import interpreter_enabled

INTERPRETER = interpreter_enabled()


def run_file_under_interpreter(path: str) -> None:
    """Run the test file ``path`` in a child pytest under TRITON_INTERPRET=1; fail with its output."""
    env = dict(os.environ, TRITON_INTERPRET="1")
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", path, "-q", "-p", "no:cacheprovider", "-x"],
        env=env, capture_output=True, text=True, timeout=600,
    )
    assert proc.returncode == 0, f"interpreter run failed:\n{proc.stdout[-6000:]}\n{proc.stderr[-2000:]}"
    assert " passed" in proc.stdout and "skipped" not in proc.stdout, proc.stdout[-2000:]

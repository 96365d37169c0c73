"""The one place that decides between the PyTorch path and the Triton kernels.

Every op takes ``backend="auto" | "torch" | "triton"``:

- ``"auto"`` runs the Triton kernel when the inputs are on a CUDA device, Triton imports, and the op has
  a kernel; otherwise the PyTorch path. Both compute the same function (tested), so the choice never
  changes results beyond floating-point rounding.
- ``"torch"`` always runs the PyTorch path (CPU and GPU).
- ``"triton"`` runs the kernel or raises: ``ValueError`` for CPU tensors unless ``TRITON_INTERPRET=1``
  (Triton's CPU interpreter, used by CI), checked first, so it holds with or without Triton; then
  ``ImportError`` (with the install command) without Triton.

The recurrent ops also run outside autocast (``outside_autocast``): an autocast region would otherwise
send their internal matrix products to bf16 / fp16 and round the state they promise to keep in fp32.
Their precision is set by their inputs' dtypes alone, so the result under autocast is bit-identical
to the result without it.
"""

from __future__ import annotations

import contextlib
import functools
import importlib.util
import os
from collections.abc import Callable
from typing import TypeVar

import torch

F = TypeVar("F", bound=Callable)

__all__ = ["BACKENDS", "triton_available", "interpreter_enabled", "resolve_backend", "prefer_backend",
           "preferred_backend",
           "outside_autocast", "autocast_off", "probe_once"]

BACKENDS = ("auto", "torch", "triton")

# What "auto" means inside a ``prefer_backend`` region: None (the device decides), "torch" or "triton".
_PREFERRED: list[str | None] = [None]


_PROBED: dict[str, bool] = {}


def probe_once(name: str, probe: Callable[[], bool]) -> bool:
    """``probe()``'s result, computed on the first call for ``name`` and remembered.

    Used for "is this optional package importable" questions. A plain dict rather than
    ``functools.cache``: Dynamo warns about (and traces through) cached functions.
    """
    if name not in _PROBED:
        _PROBED[name] = bool(probe())
    return _PROBED[name]


def _import_triton() -> bool:
    if importlib.util.find_spec("triton") is None:
        return False
    try:
        import triton  # noqa: F401
    except Exception:  # a broken install counts as absent; "triton" requests report it below
        return False
    return True


@torch.compiler.assume_constant_result  # a compiled graph takes the answer as a constant
def triton_available() -> bool:
    """True when the ``triton`` package can be imported."""
    return probe_once("triton", _import_triton)


def interpreter_enabled() -> bool:
    """True under ``TRITON_INTERPRET=1``: kernels then run on CPU tensors through Triton's interpreter."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def resolve_backend(backend: str, *tensors: torch.Tensor | None, op: str, has_kernel: bool = True) -> str:
    """Return "torch" or "triton" for a call of ``op`` on ``tensors``.

    Args:
        backend (str): "auto", "torch" or "triton".
        *tensors: the op's tensor inputs (None entries ignored); their device decides "auto".
        op (str): the op's name, for error messages.
        has_kernel (bool): whether a Triton kernel exists for this op and these options. Default: True.

    Raises:
        ValueError: unknown ``backend``; or "triton" requested for inputs it cannot run on.
        ImportError: "triton" requested without Triton installed.
    """
    if backend not in BACKENDS:
        raise ValueError(f"{op}: unknown backend {backend!r}; expected one of {BACKENDS}")
    if backend == "torch":
        return "torch"
    on_cuda = any(t is not None and t.is_cuda for t in tensors)
    if backend == "auto":
        preferred = _PREFERRED[-1]
        if preferred == "torch":
            return "torch"
        runs_here = on_cuda or (preferred == "triton" and interpreter_enabled())
        return "triton" if (has_kernel and runs_here and triton_available()) else "torch"
    if not has_kernel:
        raise ValueError(f"{op}: no Triton kernel serves this call; use backend='torch' or 'auto'")
    # Inputs no Triton install could serve are a ValueError whether or not Triton is there.
    if not on_cuda and not interpreter_enabled():
        raise ValueError(
            f"{op}: backend='triton' needs CUDA tensors (or TRITON_INTERPRET=1 for the CPU interpreter); "
            f"got device {next((t.device for t in tensors if t is not None), 'none')}"
        )
    if not triton_available():
        raise ImportError(f"{op}: backend='triton' needs Triton: pip install 'seqblocks[triton]'")
    return "triton"


@contextlib.contextmanager
def prefer_backend(backend: str):
    """Within the region, ops called with ``backend="auto"`` take ``backend`` where they can.

    ``"torch"``: every op runs its PyTorch path (for timing the two paths of a whole model against
    each other, or ruling a kernel out). ``"triton"``: an op runs its kernel wherever one serves the
    call, which under ``TRITON_INTERPRET=1`` includes CPU tensors (how the tests run a whole mixer on
    its kernels); calls with no kernel keep the PyTorch path. ``"auto"`` restores the default inside an
    outer region. An op called with an explicit ``backend="torch"`` / ``"triton"`` is unaffected.
    Regions nest; the setting is process-wide (not per thread).

    Raises:
        ValueError: ``backend`` not one of ``BACKENDS``.
    """
    if backend not in BACKENDS:
        raise ValueError(f"prefer_backend: unknown backend {backend!r}; expected one of {BACKENDS}")
    _PREFERRED.append(None if backend == "auto" else backend)
    try:
        yield
    finally:
        _PREFERRED.pop()


def preferred_backend() -> str:
    """What "auto" means here and now: "auto" (the device decides), "torch" or "triton" (the innermost
    ``prefer_backend`` region), so that work deferred to later (a recomputation in the backward) can
    re-enter the same choice."""
    return _PREFERRED[-1] or "auto"


def outside_autocast(fn: F) -> F:
    """Run ``fn`` with autocast off on the device of its first tensor argument (see the module docstring).

    Autocast changes the dtype of matrix products, convolutions and einsums inside its region; the
    wrapped op instead computes at the precision its own inputs ask for (fp32 accumulation for bf16 /
    fp16 inputs). Outside an autocast region the wrapper adds one dictionary lookup.
    """

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        device = next((a.device for a in args if isinstance(a, torch.Tensor)), None)
        if device is None:
            return fn(*args, **kwargs)
        with autocast_off(device):
            return fn(*args, **kwargs)

    return wrapper  # type: ignore[return-value]


def autocast_off(device: torch.device) -> contextlib.AbstractContextManager:
    """A region with autocast off on ``device``'s type (a no-op context when it is not on)."""
    if torch.is_autocast_enabled(device.type):
        return torch.autocast(device.type, enabled=False)
    return contextlib.nullcontext()

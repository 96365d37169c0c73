"""Input validation, the state tuple and the shared per-step math of ``mamba3`` (kept apart so that the
package namespace never needs the name ``torch``, which the submodule ``.torch`` binds there).

Shapes: B batch, T time, H heads, P head width, N state width, G groups of B / C, R MIMO rank,
S rotary angles per head (at most N / 2).
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch

from seqblocks.ops._packing import check_cu_seqlens

__all__ = ["Mamba3State", "kernel_serves", "check_inputs", "check_state", "compute_dtype", "rotate",
           "expand_groups"]


class Mamba3State(NamedTuple):
    """The recurrent state of ``mamba3`` for ``B`` sequences (all fp32, float64 for float64 inputs).

    Attributes:
        angle (Tensor): [B, H, S] accumulated rotation angles, kept in [0, 2 pi).
        ssm (Tensor): [B, H, P, N] the state h.
        k (Tensor): [B, R, H, N] the last step's rotated, biased key (B), for the trapezoid's second term.
        v (Tensor): [B, H, P] the last step's value (x), before the MIMO up-projection.
    """

    angle: torch.Tensor
    ssm: torch.Tensor
    k: torch.Tensor
    v: torch.Tensor


def kernel_serves(R: int, N: int, P: int, dtype: torch.dtype, state_dtype: torch.dtype | None = None) -> bool:
    """Whether the Triton kernels take these sizes: rank R a power of two up to 8, N and P up to 256,
    inputs other than float64 (and, for the decode step, an fp32 ``state_dtype``)."""
    fp32_state = state_dtype is None or state_dtype == torch.float32
    return dtype != torch.float64 and fp32_state and R & (R - 1) == 0 and R <= 8 and N <= 256 and P <= 256


def compute_dtype(*tensors: torch.Tensor | None) -> torch.dtype:
    """fp32, or float64 when any input is float64: the dtype of the state and every accumulation."""
    return torch.float64 if any(t is not None and t.dtype == torch.float64 for t in tensors) else torch.float32


def expand_groups(M: torch.Tensor, H: int) -> torch.Tensor:
    """[..., G, N] -> [..., H, N]: head h reads group h // (H / G)."""
    return M.repeat_interleave(H // M.shape[-2], dim=-2)


def rotate(x: torch.Tensor, theta: torch.Tensor, halves: bool) -> torch.Tensor:
    """Rotate pairs of the last dim of ``x`` [..., N] by ``theta`` [..., S] (broadcast), S <= N / 2.

    ``halves=False`` (SISO): pair i is channels (2i, 2i + 1); ``halves=True`` (MIMO): pair i is channels
    (i, i + N / 2). Pairs i >= S are left as they are (angle 0)."""
    N, S = x.shape[-1], theta.shape[-1]
    if halves:
        a, b = x[..., : N // 2], x[..., N // 2:]
    else:
        a, b = x[..., 0::2], x[..., 1::2]
    cos, sin = torch.cos(theta), torch.sin(theta)
    ra, rb = a[..., :S] * cos - b[..., :S] * sin, a[..., :S] * sin + b[..., :S] * cos
    a, b = torch.cat([ra, a[..., S:]], -1), torch.cat([rb, b[..., S:]], -1)
    if halves:
        return torch.cat([a, b], -1)
    return torch.stack([a, b], -1).flatten(-2)


def _shape_error(op: str, name: str, t: torch.Tensor, expected: str) -> ValueError:
    return ValueError(f"{op}: {name} must have shape {expected}, got {tuple(t.shape)}")


def _check_tensors(op: str, **tensors: torch.Tensor | None) -> None:
    for name, t in tensors.items():
        if t is None:
            continue
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{op}: {name} must be a Tensor, got {type(t).__name__}")
        if not t.is_floating_point():
            raise TypeError(f"{op}: {name} must be real floating point, got {t.dtype}")


def check_state(op: str, state, rows: int, H: int, P: int, N: int, R: int, S: int, name: str = "initial_state"):
    """``state`` must be a ``Mamba3State`` (or 4-tuple) of floating tensors with these sizes."""
    if not isinstance(state, tuple) or len(state) != 4:
        raise TypeError(f"{op}: {name} must be a Mamba3State (angle, ssm, k, v), got {type(state).__name__}")
    state = Mamba3State(*state)
    _check_tensors(op, **{f"{name}.{f}": getattr(state, f) for f in Mamba3State._fields})
    for f, shape in (("angle", (rows, H, S)), ("ssm", (rows, H, P, N)), ("k", (rows, R, H, N)), ("v", (rows, H, P))):
        if tuple(getattr(state, f).shape) != shape:
            raise _shape_error(op, f"{name}.{f}", getattr(state, f), str(list(shape)))
    return state


def check_inputs(op, q, k, v, adt, dt, trap, q_bias, k_bias, angles, D, z, mimo_v, mimo_z, mimo_o,
                 initial_state, lengths, cu_seqlens, chunk_size=None, step=False) -> None:
    """Validate the arguments of ``mamba3`` (``step=False``, time axis present) or ``mamba3_step``.

    Raises:
        TypeError: a non-tensor or non-floating input, a state that is not a 4-tuple.
        ValueError: any shape mismatch (each message names the argument and the expected shape), an odd
            N, more angles than N / 2 pairs, groups not dividing H, SISO with R > 1, a gate or projection
            missing for MIMO, a bad chunk_size, lengths out of [0, T], malformed cu_seqlens.
    """
    _check_tensors(op, q=q, k=k, v=v, adt=adt, dt=dt, trap=trap, q_bias=q_bias, k_bias=k_bias, angles=angles,
                   D=D, z=z, mimo_v=mimo_v, mimo_z=mimo_z, mimo_o=mimo_o)
    for name, t in (("q", q), ("k", k), ("v", v), ("adt", adt), ("dt", dt), ("trap", trap), ("q_bias", q_bias),
                    ("k_bias", k_bias), ("angles", angles)):
        if t is None:
            raise TypeError(f"{op}: {name} is required, got None")
    lead = 1 if step else 2  # [B] or [B, T]
    spell = "[B, " if step else "[B, T, "
    if v.dim() != lead + 2:
        raise _shape_error(op, "v", v, spell + "H, P]")
    pre = tuple(v.shape[:lead])
    H, P = v.shape[lead:]
    if q.dim() != lead + 3 or tuple(q.shape[:lead]) != pre:
        raise _shape_error(op, "q", q, spell + "R, G, N]")
    if k.shape != q.shape:
        raise _shape_error(op, "k", k, f"{tuple(q.shape)} (like q)")
    R, G, N = q.shape[lead:]
    if G == 0 or H % G:
        raise ValueError(f"{op}: groups G={G} must divide the number of heads H={H}")
    if N % 2:
        raise ValueError(f"{op}: the state width N={N} must be even (its channels rotate in pairs)")
    for name, t in (("adt", adt), ("dt", dt), ("trap", trap)):
        if tuple(t.shape) != pre + (H,):
            raise _shape_error(op, name, t, str(list(pre + (H,))))
    if angles.dim() != lead + 2 or tuple(angles.shape[: lead + 1]) != pre + (H,):
        raise _shape_error(op, "angles", angles, spell + f"H={H}, S]")
    S = angles.shape[-1]
    if S > N // 2:
        raise ValueError(f"{op}: angles has S={S} angles per head, at most N / 2 = {N // 2} pairs can rotate")
    for name, t in (("q_bias", q_bias), ("k_bias", k_bias)):
        if tuple(t.shape) != (H, R, N):
            raise _shape_error(op, name, t, f"[{H}, {R}, {N}] (H, R, N)")
    if D is not None and tuple(D.shape) != (H,):
        raise _shape_error(op, "D", D, f"[{H}]")
    if z is not None and z.shape != v.shape:
        raise _shape_error(op, "z", z, f"{tuple(v.shape)} (like v)")
    if mimo_v is None:
        if R != 1:
            raise ValueError(f"{op}: q and k have rank R={R}; R > 1 is MIMO and needs mimo_v (and mimo_o or not)")
        if mimo_z is not None or mimo_o is not None:
            raise ValueError(f"{op}: mimo_z / mimo_o are MIMO projections and need mimo_v as well")
    else:
        for name, t in (("mimo_v", mimo_v), ("mimo_z", mimo_z), ("mimo_o", mimo_o)):
            if t is not None and tuple(t.shape) != (H, R, P):
                raise _shape_error(op, name, t, f"[{H}, {R}, {P}] (H, R, P)")
        if z is not None and mimo_z is None:
            raise ValueError(f"{op}: MIMO with a gate z needs mimo_z [H, R, P]")
    if chunk_size is not None and (isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size <= 0):
        raise ValueError(f"{op}: chunk_size must be a positive int, got {chunk_size!r}")
    rows = pre[0]
    if step:
        if initial_state is not None:
            check_state(op, initial_state, rows, H, P, N, R, S, name="state")
        return
    Bsz, T = pre
    if lengths is not None and cu_seqlens is not None:
        raise ValueError(f"{op}: pass either lengths or cu_seqlens, not both")
    if cu_seqlens is not None:
        rows = check_cu_seqlens(op, cu_seqlens, Bsz, T)
    if lengths is not None:
        if not isinstance(lengths, torch.Tensor) or tuple(lengths.shape) != (Bsz,) \
                or lengths.dtype not in (torch.int32, torch.int64):
            raise ValueError(f"{op}: lengths must be an int32 / int64 tensor of shape ({Bsz},), got {lengths!r}")
        if bool(((lengths < 0) | (lengths > T)).any()):
            raise ValueError(f"{op}: lengths must lie in [0, T={T}], got {lengths.tolist()}")
    if initial_state is not None:
        check_state(op, initial_state, rows, H, P, N, R, S)


TWO_PI = 2 * math.pi

"""Decode steps of the diagonal recurrences: ``linear_scan_step`` (``h = a * h + b``), ``rglru_step``, ``s7_step``.

Each is one Triton launch on CUDA (``step_triton.py``) and a few PyTorch lines otherwise; the PyTorch
lines are the specification (``linear_scan`` on a one-step sequence, the RG-LRU recurrence of
``seqblocks.layers.mixers.rglru`` and S7's of ``seqblocks.layers.mixers.s7``). Each can advance a
cache's token count in the same launch.

Shapes: B batch, S the state's trailing shape, E channels, N state, D width.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from seqblocks.ops._backend import outside_autocast, resolve_backend

__all__ = ["linear_scan_step", "rglru_step", "s7_step"]


def _check_offset(op: str, seqlen_offset: torch.Tensor | None, rows: int) -> None:
    if seqlen_offset is None:
        return
    if not isinstance(seqlen_offset, torch.Tensor) or seqlen_offset.dtype != torch.int64:
        raise TypeError(f"{op}: seqlen_offset must be an int64 tensor, got {seqlen_offset!r}")
    if seqlen_offset.shape != (rows,):
        raise ValueError(f"{op}: seqlen_offset must have shape [{rows}], got {tuple(seqlen_offset.shape)}")


def _check_tensor(op: str, name: str, t: torch.Tensor) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{op}: {name} must be a Tensor, got {type(t).__name__}")
    if not (t.is_floating_point() or t.is_complex()):
        raise TypeError(f"{op}: {name} must be floating point or complex, got {t.dtype}")


@outside_autocast
def linear_scan_step(
    state: torch.Tensor,
    a: torch.Tensor,
    b: torch.Tensor,
    *,
    inplace: bool = True,
    seqlen_offset: torch.Tensor | None = None,
    backend: str = "auto",
) -> torch.Tensor:
    """One step of ``linear_scan``: ``h = a * state + b``.

    Args:
        state (Tensor): [B, *S] fp32 / complex64 (float64 / complex128) state.
        a (Tensor): [B, *S] decays, or [*S] shared by every row. Real or complex.
        b (Tensor): [B, *S] inputs. Real or complex.
        inplace (bool): write ``h`` into ``state`` and return it; otherwise return a new tensor.
            Default: True.
        seqlen_offset (Tensor | None): [B] int64 token count, advanced by one in place. Default: None.
        backend (str): "auto", "torch" or "triton". Default: "auto".

    Returns:
        h (Tensor): [B, *S] in the state's dtype (``state`` itself when ``inplace``).

    Raises:
        TypeError: non-floating inputs, a real state for complex inputs, a non-int64 ``seqlen_offset``.
        ValueError: shapes that do not match, an unknown backend.
    """
    op = "linear_scan_step"
    for name, t in (("state", state), ("a", a), ("b", b)):
        _check_tensor(op, name, t)
    if b.shape != state.shape or a.shape not in (state.shape, state.shape[1:]):
        raise ValueError(f"{op}: expected state and b [B, *S] alike and a [B, *S] or [*S]; got state "
                         f"{tuple(state.shape)}, a {tuple(a.shape)}, b {tuple(b.shape)}")
    if (a.is_complex() or b.is_complex()) and not state.is_complex():
        raise TypeError(f"{op}: complex a or b need a complex state, got {state.dtype}")
    _check_offset(op, seqlen_offset, state.shape[0] if state.dim() else 0)
    served = (state.dtype in (torch.float32, torch.complex64) and state.is_contiguous() and state.dim() >= 1
              and all(t.dtype.itemsize <= (8 if t.is_complex() else 4) for t in (a, b)))
    if resolve_backend(backend, state, a, b, op=op, has_kernel=served) == "triton":
        from seqblocks.ops.scan.step_triton import linear_scan_step_triton

        return linear_scan_step_triton(state, a, b, seqlen_offset, state if inplace else torch.empty_like(state))
    h = a.to(state.dtype) * state + b.to(state.dtype)
    if inplace:
        state.copy_(h)
        h = state
    if seqlen_offset is not None:
        seqlen_offset.add_(1)
    return h


@outside_autocast
def rglru_step(
    state: torch.Tensor,
    x: torch.Tensor,
    gate_a: torch.Tensor,
    gate_i: torch.Tensor,
    a_param: torch.Tensor,
    c: float,
    *,
    seqlen_offset: torch.Tensor | None = None,
    backend: str = "auto",
) -> torch.Tensor:
    """One step of Griffin's RG-LRU, updating ``state`` in place and returning it::

        r, i  = sigmoid(gate_a), sigmoid(gate_i)
        log a = -c * r * softplus(-a_param)                      # a = sigmoid(a_param)^(c r)
        h     = a * h + sqrt(1 - a^2) * (i * x)

    Args:
        state (Tensor): [B, E] fp32 (float64) state; overwritten with ``h``.
        x (Tensor): [B, E] the conv output.
        gate_a, gate_i (Tensor): [B, E] pre-activations of the recurrence and input gates.
        a_param (Tensor): [E] the decay parameter Lambda.
        c (float): the decay exponent scale (8 in Griffin).
        seqlen_offset (Tensor | None): [B] int64 token count, advanced by one in place. Default: None.
        backend (str): "auto", "torch" or "triton". Default: "auto".

    Returns:
        h (Tensor): ``state``, [B, E].

    Raises:
        TypeError: non-floating inputs, a non-int64 ``seqlen_offset``.
        ValueError: shapes that do not match, an unknown backend.
    """
    op = "rglru_step"
    for name, t in (("state", state), ("x", x), ("gate_a", gate_a), ("gate_i", gate_i), ("a_param", a_param)):
        _check_tensor(op, name, t)
        if t.is_complex():
            raise TypeError(f"{op}: {name} must be real, got {t.dtype}")
    if state.dim() != 2 or x.shape != state.shape or gate_a.shape != state.shape or gate_i.shape != state.shape:
        raise ValueError(f"{op}: expected state, x, gate_a and gate_i [B, E] alike; got state {tuple(state.shape)}, "
                         f"x {tuple(x.shape)}, gate_a {tuple(gate_a.shape)}, gate_i {tuple(gate_i.shape)}")
    if a_param.shape != state.shape[1:]:
        raise ValueError(f"{op}: a_param must have shape [{state.shape[1]}], got {tuple(a_param.shape)}")
    _check_offset(op, seqlen_offset, state.shape[0])
    served = (state.dtype == torch.float32 and state.is_contiguous()
              and all(t.dtype.itemsize <= 4 and t.stride(-1) == 1 for t in (x, gate_a, gate_i, a_param)))
    if resolve_backend(backend, state, x, op=op, has_kernel=served) == "triton":
        from seqblocks.ops.scan.step_triton import rglru_step_triton

        return rglru_step_triton(state, x, gate_a, gate_i, a_param, c, seqlen_offset)
    acc = state.dtype
    r, i = torch.sigmoid(gate_a.to(acc)), torch.sigmoid(gate_i.to(acc))
    log_a = -c * r * F.softplus(-a_param.to(acc))
    h = torch.exp(log_a) * state + torch.sqrt(-torch.expm1(2 * log_a)) * (i * x.to(acc))
    state.copy_(h)
    if seqlen_offset is not None:
        seqlen_offset.add_(1)
    return state


@outside_autocast
def s7_step(
    state: torch.Tensor,
    x: torch.Tensor,
    proj: torch.Tensor,
    lambda_base: torch.Tensor,
    d_base: torch.Tensor,
    *,
    seqlen_offset: torch.Tensor | None = None,
    backend: str = "auto",
) -> torch.Tensor:
    """One step of S7's input-dependent recurrence, updating ``state`` in place::

        Lambda, B, C, D_t, beta = split(proj)                    # [N], [N, D], [D, N], [D], [N]
        a = 1 - 1 / ((Lambda + lambda_base)^2 + 0.5)
        h = a * h + B x + beta
        y = C h + (D_t + d_base) * x

    Args:
        state (Tensor): [B, N] fp32 (float64) state; overwritten with ``h``.
        x (Tensor): [B, D] the input (after in_proj).
        proj (Tensor): [B, N + 2 N D + D + N] x_proj's output, in that order.
        lambda_base (Tensor): [N]. d_base (Tensor): [D].
        seqlen_offset (Tensor | None): [B] int64 token count, advanced by one in place. Default: None.
        backend (str): "auto", "torch" or "triton". Default: "auto".

    Returns:
        y (Tensor): [B, D] in the state's dtype.

    Raises:
        TypeError: non-floating or complex inputs, a non-int64 ``seqlen_offset``.
        ValueError: shapes that do not match, an unknown backend.
    """
    op = "s7_step"
    for name, t in (("state", state), ("x", x), ("proj", proj), ("lambda_base", lambda_base), ("d_base", d_base)):
        _check_tensor(op, name, t)
        if t.is_complex():
            raise TypeError(f"{op}: {name} must be real, got {t.dtype}")
    if state.dim() != 2 or x.dim() != 2 or x.shape[0] != state.shape[0]:
        raise ValueError(f"{op}: expected state [B, N] and x [B, D]; got {tuple(state.shape)}, {tuple(x.shape)}")
    (Bsz, N), D = state.shape, x.shape[1]
    if proj.shape != (Bsz, 2 * N + 2 * N * D + D):
        raise ValueError(f"{op}: proj must have shape [{Bsz}, N + 2 N D + D + N = {2 * N + 2 * N * D + D}], got "
                         f"{tuple(proj.shape)}")
    if lambda_base.shape != (N,) or d_base.shape != (D,):
        raise ValueError(f"{op}: lambda_base must be [{N}] and d_base [{D}], got {tuple(lambda_base.shape)} and "
                         f"{tuple(d_base.shape)}")
    _check_offset(op, seqlen_offset, Bsz)
    served = (state.dtype == torch.float32 and state.is_contiguous()
              and all(t.dtype.itemsize <= 4 and t.stride(-1) == 1 for t in (x, proj, lambda_base, d_base)))
    if resolve_backend(backend, state, x, proj, op=op, has_kernel=served) == "triton":
        from seqblocks.ops.scan.step_triton import s7_step_triton

        return s7_step_triton(state, x, proj, lambda_base, d_base, seqlen_offset)
    acc = state.dtype
    lam, Bm, Cm, Dm, beta = proj.to(acc).split([N, N * D, D * N, D, N], dim=-1)
    a = 1 - 1 / (torch.square(lam + lambda_base.to(acc)) + 0.5)
    xf = x.to(acc)
    state.copy_(a * state + torch.einsum("bnd,bd->bn", Bm.unflatten(-1, (N, D)), xf) + beta)
    if seqlen_offset is not None:
        seqlen_offset.add_(1)
    return torch.einsum("bdn,bn->bd", Cm.unflatten(-1, (D, N)), state) + (Dm + d_base.to(acc)) * xf

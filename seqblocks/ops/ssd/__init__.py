"""SSD: Mamba-2's state-space recurrence (scalar decay per head), the core of ``Mamba2``.

``ssd`` validates its inputs and dispatches: ``reference.py`` is the sequential spec, ``torch.py`` the
chunked PyTorch path (quadratic inside a chunk, state passing between chunks; the "minimal SSD"
form), differentiated by autograd; ``triton.py`` the same chunked form as Triton kernels, forward and
backward (``backend="auto"`` picks them for CUDA inputs of fp16 / bf16 / fp32). ``ssd_state_update`` is
the one-token decode step, updating a cache's state in place (a one-kernel Triton path as well).

Layout is time before heads ([B, T, H, P]), as in mamba_ssm's ``mamba_chunk_scan_combined``.

Shapes: B batch, T time, H heads, P head width, N state, G groups of B / C.
"""

from __future__ import annotations

import math

# The package never uses the name ``torch``: importing the submodule ``.torch`` binds that name here.
from torch import Tensor

from seqblocks.ops._backend import outside_autocast, resolve_backend
from seqblocks.ops.ssd._common import check_dt_limit, check_inputs
from seqblocks.ops.ssd.reference import ssd_ref
from seqblocks.ops.ssd.torch import ssd_state_update_torch, ssd_torch

__all__ = ["ssd", "ssd_ref", "ssd_state_update"]


@outside_autocast
def ssd(
    x: Tensor,
    dt: Tensor,
    A: Tensor,
    B: Tensor,
    C: Tensor,
    D: Tensor | None = None,
    z: Tensor | None = None,
    *,
    dt_bias: Tensor | None = None,
    dt_softplus: bool = True,
    dt_limit: tuple[float, float | None] = (0.0, math.inf),
    initial_state: Tensor | None = None,
    return_final_state: bool = False,
    lengths: Tensor | None = None,
    cu_seqlens: Tensor | None = None,
    chunk_size: int | None = None,
    backend: str = "auto",
) -> Tensor | tuple[Tensor, Tensor]:
    """The SSD scan: a diagonal state space whose decay is one scalar per head and step.

    With ``step = clamp(softplus(dt + dt_bias), *dt_limit)`` (bias and softplus optional) and head h
    reading group ``g(h) = h // (H / G)`` of B and C::

        h_t = exp(step_t[h] * A[h]) * h_{t-1} + step_t[h] * x_t[h] B_t[g(h)]^T     (state [H, P, N])
        y_t = h_t C_t[g(h)] + D * x_t,      y_t *= silu(z_t) when z is given

    Mamba-2 with ``rmsnorm=True`` passes no ``z`` here: its gated RMSNorm applies the gate.

    Args:
        x (Tensor): [B, T, H, P] input.
        dt (Tensor): [B, T, H] step, before ``dt_bias``, softplus and the limits.
        A (Tensor): [H] continuous-time decay (negative for a stable state).
        B, C (Tensor): [B, T, G, N] input and output maps, G groups dividing H.
        D (Tensor | None): [H] or [H, P] skip. Default: None.
        z (Tensor | None): [B, T, H, P] gate; the output is multiplied by ``silu(z)``. Default: None.
        dt_bias (Tensor | None): [H] added to ``dt``. Default: None.
        dt_softplus (bool): apply softplus to ``dt + dt_bias``. Default: True.
        dt_limit (tuple): ``(lo, hi)`` clamp of the step after softplus; ``hi`` may be None or inf (no
            upper limit). Default: (0.0, inf), no clamp.
        initial_state (Tensor | None): [B, H, P, N] ([num_seqs, H, P, N] with ``cu_seqlens``). Default:
            None (zeros).
        return_final_state (bool): also return the final state. Default: False.
        lengths (Tensor | None): [B] integer valid prefix of each row; padding neither reads nor
            writes the state, its outputs are 0, and the final state is each row's own. Default: None.
        cu_seqlens (Tensor | None): [num_seqs + 1] offsets of sequences packed in a [1, total, ...] batch;
            the state restarts at every boundary (from ``initial_state[i]`` when given). Default: None.
        chunk_size (int | None): chunk length; results do not depend on it beyond rounding. The Triton path
            rounds it up to a power of two in [16, 256]. Default: None (256 on both paths).
        backend (str): "auto", "torch" or "triton". Default: "auto".

    Returns:
        y [B, T, H, P] in x's dtype; with ``return_final_state``, ``(y, final_state)`` with
        final_state [B, H, P, N] ([num_seqs, H, P, N]) in fp32 (float64 for float64 inputs).

    Raises:
        TypeError: non-tensor or non-floating inputs, a malformed ``dt_limit``.
        ValueError: mismatched shapes, groups that do not divide H, ``dt_limit`` out of order, a bad
            ``chunk_size``, lengths out of [0, T], malformed cu_seqlens, an unknown backend, or
            ``backend="triton"`` for inputs it cannot serve (float64, CPU tensors outside the interpreter).
        ImportError: ``backend="triton"`` without Triton installed.
    """
    limit = check_dt_limit("ssd", dt_limit)
    check_inputs("ssd", x, dt, A, B, C, D, z, dt_bias, initial_state, lengths, cu_seqlens, chunk_size)
    if resolve_backend(backend, x, dt, A, B, C, op="ssd", has_kernel=_served(x, dt, A, B, C, D, z, dt_bias,
                                                                             initial_state)) == "triton":
        from seqblocks.ops.ssd.triton import DEFAULT_CHUNK, ssd_triton

        return ssd_triton(x, dt, A, B, C, D, z, dt_bias=dt_bias, dt_softplus=dt_softplus, dt_limit=limit,
                          initial_state=initial_state, return_final_state=return_final_state, lengths=lengths,
                          cu_seqlens=cu_seqlens, chunk_size=DEFAULT_CHUNK if chunk_size is None else chunk_size)
    return ssd_torch(x, dt, A, B, C, D, z, dt_bias=dt_bias, dt_softplus=dt_softplus, dt_limit=limit,
                     initial_state=initial_state, return_final_state=return_final_state, lengths=lengths,
                     cu_seqlens=cu_seqlens, chunk_size=256 if chunk_size is None else chunk_size)


def _served(*tensors: Tensor | None) -> bool:
    """The Triton kernels take fp16 / bf16 / fp32 (float64 stays on the PyTorch path)."""
    return all(t is None or t.dtype.itemsize <= 4 for t in tensors)


@outside_autocast
def ssd_state_update(
    state: Tensor,
    x: Tensor,
    dt: Tensor,
    A: Tensor,
    B: Tensor,
    C: Tensor,
    D: Tensor | None = None,
    z: Tensor | None = None,
    *,
    dt_bias: Tensor | None = None,
    dt_softplus: bool = True,
    dt_limit: tuple[float, float | None] = (0.0, math.inf),
    backend: str = "auto",
) -> Tensor:
    """One decode step of ``ssd``: advances ``state`` in place and returns ``y``.

    The scalar-per-head form of mamba_ssm's ``selective_state_update`` (there A, dt and D are
    broadcast to [H, P, N] / [B, H, P] / [H, P]; here they stay per head).

    Args:
        state (Tensor): [B, H, P, N] floating-point state (fp32 for a cache), overwritten.
        x (Tensor): [B, H, P]; z likewise (optional).
        dt (Tensor): [B, H].
        A (Tensor): [H].  B, C (Tensor): [B, G, N].  D: [H] or [H, P].  dt_bias: [H].
        dt_softplus, dt_limit, backend: as in ``ssd``.

    Returns:
        y (Tensor): [B, H, P] in x's dtype, equal to ``ssd`` on the one-step sequence from ``state``.

    Raises:
        TypeError / ValueError: as ``ssd``.
    """
    limit = check_dt_limit("ssd_state_update", dt_limit)
    if not all(hasattr(t, "dim") for t in (state, x, dt, B, C)) or x.dim() != 3 or dt.dim() != 2 \
            or B.dim() != 3 or C.dim() != 3:
        raise ValueError("ssd_state_update: expected state [B, H, P, N], x [B, H, P], dt [B, H], B and C [B, G, N]")
    check_inputs("ssd_state_update", x.unsqueeze(1), dt.unsqueeze(1), A, B.unsqueeze(1), C.unsqueeze(1), D,
                 None if z is None else z.unsqueeze(1), dt_bias, state, None, None)
    if resolve_backend(backend, state, x, op="ssd_state_update",
                       has_kernel=_served(state, x, dt, A, B, C, D, z, dt_bias) and state.is_contiguous()
                       and B.shape[-1] <= 256) == "triton":
        from seqblocks.ops.ssd.triton import ssd_state_update_triton

        return ssd_state_update_triton(state, x, dt, A, B, C, D, z, dt_bias=dt_bias, dt_softplus=dt_softplus,
                                       dt_limit=limit)
    return ssd_state_update_torch(state, x, dt, A, B, C, D, z, dt_bias=dt_bias, dt_softplus=dt_softplus,
                                  dt_limit=limit)

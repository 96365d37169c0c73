"""Selective scan: Mamba's S6 recurrence with its discretisation, the core of ``Mamba`` (and STREAM).

``selective_scan`` validates its inputs and dispatches: ``reference.py`` is the sequential spec,
``torch.py`` the chunked fast path (state memory bounded by one chunk) with a recomputing backward,
``triton.py`` the GPU kernels, ``triton_chunked.py`` their chunked alternative (the design and launch
options: an explicit ``SelectiveScanTuning``, ``tuning.py``). ``selective_state_update`` is the
one-token decode step, updating a cache's state in place.

Layout is time before channels ([B, T, D]), unlike mamba's [B, D, T].

Shapes: B batch, T time, D channels, N state, G groups of B / C.
"""

from __future__ import annotations

# The package never uses the name ``torch``: importing the submodule ``.torch`` binds that name here.
from torch import Tensor

from seqblocks.ops._backend import outside_autocast, resolve_backend
from seqblocks.ops._packing import pack, unpack
from seqblocks.ops.selective_scan._common import check_inputs
from seqblocks.ops.selective_scan.reference import selective_scan_ref
from seqblocks.ops.selective_scan.torch import selective_scan_torch, selective_state_update_torch
from seqblocks.ops.selective_scan.tuning import SelectiveScanTuning

__all__ = ["selective_scan", "selective_scan_ref", "selective_state_update", "SelectiveScanTuning"]


@outside_autocast
def selective_scan(
    u: Tensor,
    delta: Tensor,
    A: Tensor,
    B: Tensor,
    C: Tensor,
    D: Tensor | None = None,
    z: Tensor | None = None,
    *,
    delta_bias: Tensor | None = None,
    delta_softplus: bool = False,
    discretization: str = "mamba",
    delta_A: Tensor | None = None,
    initial_state: Tensor | None = None,
    lengths: Tensor | None = None,
    cu_seqlens: Tensor | None = None,
    backend: str = "auto",
    tuning: SelectiveScanTuning | None = None,
) -> tuple[Tensor, Tensor]:
    """The selective (input-dependent) diagonal state-space scan.

    With ``dt = softplus(delta + delta_bias)`` (bias and softplus optional) and, per channel d and
    state index n, ``(Ā, gamma) = discretize(A[d, n], dt, discretization, dt_A=delta_A)``::

        h_t = Ā_t * h_{t-1} + gamma_t * B_t[g(d)] * u_t          (state [D, N] per row)
        y_t = (sum_n C_t[g(d)] * h_t  +  D * u_t) * silu(z_t)

    where ``g(d) = d // (D / G)`` maps channel d to its group. A complex state is read out as
    ``2 * Re(sum_n C h)`` (it holds one member of each conjugate pair, as in Mamba / S4D).

    Args:
        u (Tensor): [B, T, D] input.
        delta (Tensor): [B, T, D] step, before ``delta_bias`` and softplus.
        A (Tensor): [D, N] continuous-time diagonal, real or complex (negative real part for stability).
        B (Tensor): [B, T, N], or [B, T, G, N] with G groups dividing D; real or complex.
        C (Tensor): shaped like ``B``.
        D (Tensor | None): [D] skip connection. Default: None.
        z (Tensor | None): [B, T, D] gate; the output is multiplied by ``silu(z)``. Default: None.
        delta_bias (Tensor | None): [D] added to ``delta``. Default: None.
        delta_softplus (bool): apply softplus to ``delta + delta_bias``. Default: False.
        discretization (str): "mamba" (exp(dt A), Euler B), "zoh", "bilinear" or "dirac"
            (see ``seqblocks.ops.discretize``). Default: "mamba".
        delta_A (Tensor | None): [B, T, D] or [B, T], a separate step for ``Ā`` used as given (no
            bias, no softplus) while ``B̄`` keeps ``dt``: the event (STREAM / Event-SSM) form. Default:
            None (``Ā`` uses ``dt``).
        initial_state (Tensor | None): [B, D, N] ([num_seqs, D, N] with ``cu_seqlens``). Default: None
            (zeros).
        lengths (Tensor | None): [B] integer valid prefix of each row; padding neither reads nor
            writes the state and its outputs are 0; the final state is each row's own. Default: None.
        cu_seqlens (Tensor | None): [num_seqs + 1] integer offsets of sequences packed in a
            [1, total, ...] batch; the state restarts at every boundary. Default: None.
        backend (str): "auto", "torch" or "triton". Default: "auto".
        tuning (SelectiveScanTuning | None): kernel design ("ring" or "chunked"), block shapes,
            warps and ring options of the Triton kernels, for this call only (the PyTorch path
            ignores it; results do not depend on it). Default: None (the defaults).

    Returns:
        (y, final_state): y [B, T, D] in u's dtype; final_state [B, D, N] ([num_seqs, D, N]) in fp32
        (complex64 for a complex state; float64 / complex128 for 64-bit inputs).

    Raises:
        TypeError: non-tensor or non-floating inputs, complex u / delta / D / delta_bias, a ``tuning``
            that is not a ``SelectiveScanTuning``.
        ValueError: mismatched shapes, groups that do not divide D, an unknown discretization or
            backend, lengths out of [0, T], malformed cu_seqlens.
    """
    check_inputs(u, delta, A, B, C, D, z, delta_bias, discretization, delta_A, initial_state, lengths, cu_seqlens)
    if tuning is not None and not isinstance(tuning, SelectiveScanTuning):
        raise TypeError(f"selective_scan: tuning must be a SelectiveScanTuning or None, got {type(tuning).__name__}")
    # The Triton kernels (issue 8) take real fp16 / bf16 / fp32 inputs and d_state <= 256.
    served = A.shape[-1] <= 256 and all(
        t is None or (not t.is_complex() and t.dtype.itemsize <= 4)
        for t in (u, delta, A, B, C, D, z, delta_bias, delta_A, initial_state))
    if resolve_backend(backend, u, delta, A, B, C, op="selective_scan", has_kernel=served) == "triton":
        from seqblocks.ops.selective_scan.triton import selective_scan_triton

        return selective_scan_triton(u, delta, A, B, C, D, z, delta_bias=delta_bias, delta_softplus=delta_softplus,
                                     discretization=discretization, delta_A=delta_A, initial_state=initial_state,
                                     lengths=lengths, cu_seqlens=cu_seqlens, tuning=tuning)
    kwargs = dict(delta_bias=delta_bias, delta_softplus=delta_softplus, discretization=discretization,
                  initial_state=initial_state)
    if cu_seqlens is not None:
        # Packed sequences run as a padded batch with lengths, then are packed again.
        unpacked = [unpack(t, cu_seqlens)[0] if t is not None else None for t in (u, delta, B, C, z, delta_A)]
        uu, dd, BB, CC, zz, dA = unpacked
        y, final = selective_scan_torch(uu, dd, A, BB, CC, D, zz, delta_A=dA, lengths=cu_seqlens.diff(),
                                        **kwargs)
        return pack(y, cu_seqlens), final
    return selective_scan_torch(u, delta, A, B, C, D, z, delta_A=delta_A, lengths=lengths, **kwargs)


@outside_autocast
def selective_state_update(
    state: Tensor,
    u: Tensor,
    delta: Tensor,
    A: Tensor,
    B: Tensor,
    C: Tensor,
    D: Tensor | None = None,
    z: Tensor | None = None,
    *,
    delta_bias: Tensor | None = None,
    delta_softplus: bool = False,
    discretization: str = "mamba",
    delta_A: Tensor | None = None,
    a_is_log: bool = False,
    backend: str = "auto",
) -> Tensor:
    """One decode step of ``selective_scan``: advances ``state`` in place and returns ``y``.

    The Triton path (``step_triton.py``) is one launch for real states with the "mamba", "bilinear" or
    "dirac" discretisation: bias, softplus, ``-exp(A_log)``, the update, the readout, D and the gate fused.

    Args:
        state (Tensor): [B, D, N] fp32 / complex64 state, overwritten with the new state.
        u, delta, z (Tensor): [B, D] (z optional).
        A (Tensor): [D, N].
        B, C (Tensor): [B, N] or [B, G, N].
        D, delta_bias (Tensor | None): [D].
        delta_softplus, discretization, delta_A ([B, D] or [B]), backend: as in ``selective_scan``.
        a_is_log (bool): ``A`` holds ``log(-A)`` (Mamba's real ``A_log``) and the step uses
            ``A = -exp(A)``, computed inside the kernel, so a parameter updated in place is always read
            fresh. Default: False.

    Returns:
        y (Tensor): [B, D] in u's dtype; equal to ``selective_scan`` on the one-step sequence.

    Raises:
        ValueError: mismatched shapes, an unknown discretization or backend.
    """
    if u.dim() != 2 or state.dim() != 3 or state.shape[:2] != u.shape or delta.shape != u.shape:
        raise ValueError(f"selective_state_update: expected state [B, D, N], u and delta [B, D]; got state "
                         f"{tuple(state.shape)}, u {tuple(u.shape)}, delta {tuple(delta.shape)}")
    check_inputs(u.unsqueeze(1), delta.unsqueeze(1), A, B.unsqueeze(1), C.unsqueeze(1), D,
           None if z is None else z.unsqueeze(1), delta_bias, discretization,
           None if delta_A is None else delta_A.unsqueeze(1), state, None, None)
    if a_is_log and A.is_complex():
        raise TypeError(f"selective_state_update: a_is_log=True needs a real A (log(-A)), got {A.dtype}")
    # One launch serves real fp32 states (fp32 is the one 4-byte real floating dtype) without zoh.
    served = discretization != "zoh" and state.is_floating_point() and state.dtype.itemsize == 4 and all(
        t is None or (not t.is_complex() and t.dtype.itemsize <= 4) for t in (u, delta, A, B, C, D, z, delta_bias,
                                                                             delta_A))
    if resolve_backend(backend, state, u, op="selective_state_update", has_kernel=served) == "triton":
        from seqblocks.ops.selective_scan.step_triton import selective_state_update_triton

        return selective_state_update_triton(state, u, delta, A, B, C, D, z, delta_bias=delta_bias,
                                             delta_softplus=delta_softplus, discretization=discretization,
                                             delta_A=delta_A, a_is_log=a_is_log)
    if a_is_log:
        A = -A.to(state.real.dtype).exp()
    return selective_state_update_torch(state, u, delta, A, B, C, D, z, delta_bias=delta_bias,
                                        delta_softplus=delta_softplus, discretization=discretization,
                                        delta_A=delta_A)

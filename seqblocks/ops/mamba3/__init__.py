"""Mamba-3: the trapezoidal, rotary (complex-state) SSM of Lahoti et al. (2026), the core of ``Mamba3``.

``mamba3`` validates its inputs and dispatches: ``reference.py`` is the sequential spec, ``torch.py`` the
chunked PyTorch path (quadratic inside a chunk, state passing between chunks), differentiated by
autograd, and ``triton.py`` the same chunked scan as Triton kernels, forward and backward, with the
bias / rotation of q and k and the skip / gate / MIMO fold fused (the rest of the elementwise prologue
stays PyTorch): ``backend="auto"`` picks them for CUDA tensors when Triton is installed, for MIMO ranks
that are powers of two up to 8, N and P up to 256, and inputs other than float64; ``Mamba3Tuning`` sets
their launch. ``mamba3_step`` is the one-token decode step (one Triton launch, ``step_triton.py``, for an
fp32 state on CUDA; PyTorch otherwise), updating a ``Mamba3State`` in place. SISO (rank R = 1) and MIMO
(R > 1, ``mimo_v`` given) share one op.

Layout is time before heads ([B, T, H, P]); mamba_ssm's kernels take ``adt`` / ``dt`` / ``trap`` as
[B, H, T] and here they are [B, T, H] like every other seqblocks op.

Shapes: B batch, T time, H heads, P head width, N state width, G groups of B / C, R MIMO rank,
S rotary angles per head.
"""

from __future__ import annotations

# The package never uses the name ``torch``: importing the submodule ``.torch`` binds that name here.
from torch import Tensor

from seqblocks.ops._backend import outside_autocast, resolve_backend
from seqblocks.ops.mamba3._common import Mamba3State, check_inputs, kernel_serves
from seqblocks.ops.mamba3.reference import mamba3_ref, mamba3_step_ref, zero_state
from seqblocks.ops.mamba3.torch import mamba3_step_torch, mamba3_torch
from seqblocks.ops.mamba3.tuning import Mamba3Tuning

__all__ = ["Mamba3State", "Mamba3Tuning", "mamba3", "mamba3_ref", "mamba3_step", "mamba3_step_ref", "zero_state"]


@outside_autocast
def mamba3(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    adt: Tensor,
    dt: Tensor,
    trap: Tensor,
    q_bias: Tensor,
    k_bias: Tensor,
    angles: Tensor,
    D: Tensor | None = None,
    z: Tensor | None = None,
    *,
    mimo_v: Tensor | None = None,
    mimo_z: Tensor | None = None,
    mimo_o: Tensor | None = None,
    initial_state: Mamba3State | None = None,
    return_final_state: bool = False,
    lengths: Tensor | None = None,
    cu_seqlens: Tensor | None = None,
    chunk_size: int = 64,
    backend: str = "auto",
    tuning: Mamba3Tuning | None = None,
) -> Tensor | tuple[Tensor, Mamba3State]:
    """The Mamba-3 scan: trapezoidal discretisation, data-dependent rotation, scalar decay per head.

    With lambda_t = sigmoid(trap_t), alpha_t = exp(adt_t), beta_t = alpha_t dt_t (1 - lambda_t),
    gamma_t = dt_t lambda_t and head h reading group ``g(h) = h // (H / G)`` of q and k::

        theta_t = theta_{t-1} + pi tanh(angles_t) dt_t                 (rotation angles, mod 2 pi)
        k'_t = rot(theta_t, k_t + k_bias),  q'_t = rot(theta_t, q_t + q_bias),  x_t = v_t (* mimo_v)
        h_t = alpha_t h_{t-1} + beta_t x_{t-1} k'_{t-1}^T + gamma_t x_t k'_t^T      (summed over ranks)
        y_t = h_t q'_t + D x_t,  y_t *= silu(z_t (* mimo_z)),  y_t = sum_r mimo_o y_{t,r} (MIMO)

    ``rot`` turns pairs (2i, 2i + 1) for SISO and (i, i + N / 2) for MIMO, i < S, as mamba_ssm does.
    In mamba_ssm's names q is C, k is B, v is x; ``reference.py`` spells the recurrence out.

    Args:
        q, k (Tensor): [B, T, R, G, N] output / input maps (C and B, after their RMSNorm), R = 1 for SISO.
        v (Tensor): [B, T, H, P] input x.
        adt (Tensor): [B, T, H] log decay A * dt (negative).
        dt (Tensor): [B, T, H] step (after softplus).
        trap (Tensor): [B, T, H] trapezoid logit; lambda = sigmoid(trap).
        q_bias, k_bias (Tensor): [H, R, N] biases added to q and k before the rotation.
        angles (Tensor): [B, T, H, S] rotation rates, before tanh; S <= N / 2.
        D (Tensor | None): [H] skip. Default: None.
        z (Tensor | None): [B, T, H, P] gate. Default: None.
        mimo_v, mimo_z, mimo_o (Tensor | None): [H, R, P] MIMO projections of x, z and the output; a
            given ``mimo_v`` makes the call MIMO. Without ``mimo_o`` the output keeps its ranks.
            Default: None.
        initial_state (Mamba3State | None): the state to start from ([num_seqs, ...] with
            ``cu_seqlens``). Default: None (zeros).
        return_final_state (bool): also return the final ``Mamba3State``. Default: False.
        lengths (Tensor | None): [B] integer valid prefix of each row; padding neither reads nor writes
            the state, its outputs are 0, the final state is each row's own. Default: None.
        cu_seqlens (Tensor | None): [num_seqs + 1] offsets of sequences packed in a [1, total, ...]
            batch; the state restarts at every boundary. Default: None.
        chunk_size (int): chunk length of the PyTorch path; results do not depend on it beyond
            rounding. Default: 64.
        backend (str): "auto", "torch" or "triton" (the chunked scan as Triton kernels). Default: "auto".
        tuning (Mamba3Tuning | None): launch settings of the Triton kernels (speed only; their chunk
            is min(chunk_size, tuning.rows / R) steps). Default: None (``Mamba3Tuning()``).

    Returns:
        y [B, T, H, P] ([B, T, R, H, P] for MIMO without ``mimo_o``) in v's dtype; with
        ``return_final_state``, ``(y, Mamba3State)``, the state fp32 (float64 for float64 inputs).

    Raises:
        TypeError: non-tensor or non-floating inputs, a state that is not a 4-tuple, a ``tuning``
            that is not a ``Mamba3Tuning``.
        ValueError: mismatched shapes (named with the expected shape), an odd N, S > N / 2, groups
            not dividing H, R > 1 without ``mimo_v``, a bad ``chunk_size``, lengths out of [0, T],
            malformed cu_seqlens, an unknown backend, ``backend="triton"`` for inputs it cannot run on
            (CPU tensors without TRITON_INTERPRET=1, float64, a rank that is not a power of two up to 8).
        ImportError: ``backend="triton"`` without Triton installed.
    """
    check_inputs("mamba3", q, k, v, adt, dt, trap, q_bias, k_bias, angles, D, z, mimo_v, mimo_z, mimo_o,
                 initial_state, lengths, cu_seqlens, chunk_size)
    if tuning is not None and not isinstance(tuning, Mamba3Tuning):
        raise TypeError(f"mamba3: tuning must be a Mamba3Tuning or None, got {type(tuning).__name__}")
    scan = None
    serves = kernel_serves(q.shape[-3], q.shape[-1], v.shape[-1], v.dtype)
    if resolve_backend(backend, q, k, v, op="mamba3", has_kernel=serves) == "triton":
        from seqblocks.ops.mamba3.triton import chunk_scan_triton

        def scan(q_in, k_in, qb, kb, th, x, adt_, scale, gamma, h0, chunk, D_, z_, mz, mo):
            return chunk_scan_triton(q_in, k_in, qb, kb, th, x, adt_, scale, gamma, h0, chunk, D_, z_, mz, mo,
                                     mimo_v is not None, in_dtype=v.dtype, tuning=tuning)
    if initial_state is not None:
        initial_state = Mamba3State(*initial_state)
    return mamba3_torch(q, k, v, adt, dt, trap, q_bias, k_bias, angles, D, z, mimo_v=mimo_v, mimo_z=mimo_z,
                        mimo_o=mimo_o, initial_state=initial_state, return_final_state=return_final_state,
                        lengths=lengths, cu_seqlens=cu_seqlens, chunk_size=chunk_size, scan=scan)


@outside_autocast
def mamba3_step(
    state: Mamba3State,
    q: Tensor,
    k: Tensor,
    v: Tensor,
    adt: Tensor,
    dt: Tensor,
    trap: Tensor,
    q_bias: Tensor,
    k_bias: Tensor,
    angles: Tensor,
    D: Tensor | None = None,
    z: Tensor | None = None,
    *,
    mimo_v: Tensor | None = None,
    mimo_z: Tensor | None = None,
    mimo_o: Tensor | None = None,
    backend: str = "auto",
    tuning: Mamba3Tuning | None = None,
) -> Tensor:
    """One decode step of ``mamba3``: advances ``state`` in place and returns ``y``.

    Args:
        state (Mamba3State): [B, ...] floating-point state (fp32 for a cache), overwritten.
        q, k (Tensor): [B, R, G, N].  v, z (Tensor): [B, H, P].  adt, dt, trap (Tensor): [B, H].
        angles (Tensor): [B, H, S].  q_bias, k_bias, D, mimo_*, backend, tuning: as in ``mamba3``; the
            Triton step (``step_triton.py``, one launch) needs an fp32 state.

    Returns:
        y (Tensor): [B, H, P] (or [B, R, H, P]) in v's dtype, equal to ``mamba3`` on the one-step
        sequence from ``state``.

    Raises:
        TypeError / ValueError: as ``mamba3``.
    """
    if state is None:
        raise TypeError("mamba3_step: state is required (a Mamba3State), got None")
    check_inputs("mamba3_step", q, k, v, adt, dt, trap, q_bias, k_bias, angles, D, z, mimo_v, mimo_z, mimo_o,
                 state, None, None, step=True)
    if tuning is not None and not isinstance(tuning, Mamba3Tuning):
        raise TypeError(f"mamba3_step: tuning must be a Mamba3Tuning or None, got {type(tuning).__name__}")
    serves = kernel_serves(q.shape[-3], q.shape[-1], v.shape[-1], v.dtype, state_dtype=state[1].dtype)
    if resolve_backend(backend, q, k, v, op="mamba3_step", has_kernel=serves) == "triton":
        from seqblocks.ops.mamba3.step_triton import mamba3_step_triton

        return mamba3_step_triton(Mamba3State(*state), q, k, v, adt, dt, trap, q_bias, k_bias, angles, D, z,
                                  mimo_v, mimo_z, mimo_o, tuning)
    return mamba3_step_torch(Mamba3State(*state), q, k, v, adt, dt, trap, q_bias, k_bias, angles, D, z,
                             mimo_v, mimo_z, mimo_o)

"""Gated linear attention (GLA) and its scalar-decay case, simple GLA (RetNet's retention, lightning
attention): a [K, V] state per head decayed by ``exp(g_t)`` and written by ``k_t v_t^T``.

``reference.py`` is the sequential spec, ``torch.py`` the chunked PyTorch path (autograd backward),
``triton.py`` the kernels (chunked forward and backward as ``torch.autograd.Function``s, and a fused
one-token decode step). ``backend`` picks between them (``seqblocks.ops._backend``). Layout and
conventions are fla 0.6.0's ``chunk_gla`` / ``chunk_simple_gla``: time before heads, state [K, V],
``scale`` defaulting to K ** -0.5, ``cu_seqlens`` for a packed batch of one.

Shapes: B batch, T time, H heads, K key width, V value width, N packed sequences.
"""

from __future__ import annotations

# The package never uses the name ``torch``: importing the submodule ``.torch`` binds that name here.
from torch import Tensor, float64

from seqblocks.ops._backend import outside_autocast, resolve_backend
from seqblocks.ops.gla._checks import check_inputs, check_step_inputs, resolve_scale
from seqblocks.ops.gla.reference import gla_ref, simple_gla_ref
from seqblocks.ops.gla.torch import gla_step_torch, gla_torch, simple_gla_torch

__all__ = ["gla", "simple_gla", "gla_step", "simple_gla_step", "gla_ref", "simple_gla_ref"]


def _kernel_serves(K: int, *tensors: Tensor | None) -> bool:
    # The kernels compute in fp32 from fp32 / bf16 / fp16 inputs with one key block of at most 256
    # channels; float64 and wider keys stay on the PyTorch path.
    return K <= 256 and not any(t is not None and t.dtype == float64 for t in tensors)


def _check_chunk(op: str, chunk_size) -> None:
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size <= 0:
        raise ValueError(f"{op}: chunk_size must be a positive int, got {chunk_size!r}")


@outside_autocast
def gla(q: Tensor, k: Tensor, v: Tensor, g: Tensor, *, scale: float | None = None,
        initial_state: Tensor | None = None, output_final_state: bool = False, cu_seqlens: Tensor | None = None,
        chunk_size: int = 64, backend: str = "auto") -> tuple[Tensor, Tensor | None]:
    """Gated linear attention with a per-key data-dependent decay::

        S_t = diag(exp(g_t)) S_{t-1} + k_t v_t^T,     o_t = scale * S_t^T q_t

    Args:
        q, k (Tensor): [B, T, H, K] queries and keys.
        v (Tensor): [B, T, H, V] values.
        g (Tensor): [B, T, H, K] log-decay per key channel (<= 0, e.g. ``logsigmoid(.) / 16``).
        scale (float | None): output scale. Default: None (K ** -0.5).
        initial_state (Tensor | None): [B, H, K, V] ([N, H, K, V] with ``cu_seqlens``). Default: None (zeros).
        output_final_state (bool): also return the final state. Default: False.
        cu_seqlens (Tensor | None): [N + 1] int32 / int64 offsets of N sequences packed in a batch of
            one; the state restarts at each. Default: None.
        chunk_size (int): chunk length of the PyTorch path (results do not depend on it beyond
            rounding). Default: 64.
        backend (str): "auto", "torch" or "triton". Default: "auto".

    Returns:
        (o [B, T, H, V] in q's dtype, final state [B or N, H, K, V] fp32 (float64 for float64 inputs)
        or None).

    Raises:
        TypeError: non-tensor or non-floating inputs, a non-numeric scale.
        ValueError: mismatched shapes, malformed cu_seqlens, a bad chunk size, an unknown backend or
            a "triton" request that cannot run.
    """
    return _dispatch("gla", q, k, v, g, scale, initial_state, output_final_state, cu_seqlens, chunk_size,
                     backend, scalar=False)


@outside_autocast
def simple_gla(q: Tensor, k: Tensor, v: Tensor, g: Tensor, *, scale: float | None = None,
               initial_state: Tensor | None = None, output_final_state: bool = False,
               cu_seqlens: Tensor | None = None, chunk_size: int = 64,
               backend: str = "auto") -> tuple[Tensor, Tensor | None]:
    """Simple GLA: ``gla`` with one scalar log-decay per head and step, ``S_t = exp(g_t) S_{t-1} + k_t v_t^T``.

    RetNet's retention is the fixed-decay case: ``g = log(gamma_h)`` broadcast to [B, T, H].

    Args:
        g (Tensor): [B, T, H] log-decay. Every other argument and the results are as in ``gla``.
    """
    return _dispatch("simple_gla", q, k, v, g, scale, initial_state, output_final_state, cu_seqlens, chunk_size,
                     backend, scalar=True)


def _dispatch(op, q, k, v, g, scale, initial_state, output_final_state, cu_seqlens, chunk_size, backend, *, scalar):
    check_inputs(op, q, k, v, g, initial_state, cu_seqlens, scalar_decay=scalar)
    _check_chunk(op, chunk_size)
    scale = resolve_scale(op, scale, q.shape[-1])
    served = _kernel_serves(q.shape[-1], q, k, v, g, initial_state)
    if resolve_backend(backend, q, k, v, g, op=op, has_kernel=served) == "triton":
        from seqblocks.ops.gla.triton import gla_triton

        return gla_triton(q, k, v, g, scale=scale, initial_state=initial_state,
                          output_final_state=output_final_state, cu_seqlens=cu_seqlens, scalar=scalar)
    fn = simple_gla_torch if scalar else gla_torch
    return fn(q, k, v, g, scale=scale, initial_state=initial_state, output_final_state=output_final_state,
              cu_seqlens=cu_seqlens, chunk_size=chunk_size)


@outside_autocast
def gla_step(state: Tensor, q: Tensor, k: Tensor, v: Tensor, g: Tensor, *, scale: float | None = None,
             backend: str = "auto") -> Tensor:
    """One decode step of ``gla``: advances ``state`` in place and returns ``o``.

    Args:
        state (Tensor): [B, H, K, V] fp32 (or float64) state, overwritten.
        q, k (Tensor): [B, H, K].  v (Tensor): [B, H, V].  g (Tensor): [B, H, K] log-decay.
        scale, backend: as in ``gla``.

    Returns:
        o (Tensor): [B, H, V] in q's dtype, equal to ``gla`` on the one-token sequence from ``state``.

    Raises:
        TypeError / ValueError: as ``gla``.
    """
    return _step("gla_step", state, q, k, v, g, scale, backend, scalar=False)


@outside_autocast
def simple_gla_step(state: Tensor, q: Tensor, k: Tensor, v: Tensor, g: Tensor, *, scale: float | None = None,
                    backend: str = "auto") -> Tensor:
    """One decode step of ``simple_gla`` (g [B, H]); otherwise as ``gla_step``."""
    return _step("simple_gla_step", state, q, k, v, g, scale, backend, scalar=True)


def _step(op, state, q, k, v, g, scale, backend, *, scalar):
    check_step_inputs(op, state, q, k, v, g, scalar_decay=scalar)
    scale = resolve_scale(op, scale, q.shape[-1])
    served = _kernel_serves(state.shape[2], state, q, k, v, g)
    if resolve_backend(backend, state, q, k, v, g, op=op, has_kernel=served) == "triton":
        from seqblocks.ops.gla.triton import gla_step_triton

        return gla_step_triton(state, q, k, v, g, scale=scale)
    return gla_step_torch(state, q, k, v, g, scale=scale)

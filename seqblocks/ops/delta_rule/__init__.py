"""The delta rule and the gated delta rule: the recurrences of DeltaNet and Gated DeltaNet.

Per head, with state ``S`` [K, V], decay ``a_t = exp(g_t)`` (1 for the delta rule) and ``b_t = beta_t``::

    S_t = a_t (I - b_t k_t k_t^T) S_{t-1} + b_t k_t v_t^T
    o_t = scale * S_t^T q_t                                  # scale = K ** -0.5 by default

(fla's orientation and defaults: ``fla.ops.delta_rule.chunk_delta_rule`` and
``fla.ops.gated_delta_rule.chunk_gated_delta_rule`` compute the same function.) ``reference.py`` is the
sequential spec; ``torch.py`` the chunked WY / UT-transform form (chunk 64), differentiated by
autograd, which runs everywhere; ``triton.py`` the chunked forward and backward kernels and a fused
decode-step kernel, chosen by ``backend="auto"`` on CUDA for
fp16 / bf16 / fp32 inputs. ``delta_rule_step`` and ``gated_delta_rule_step`` are the one-token
decode steps, advancing a cache's state in place.

Layout is time before heads ([B, T, H, K]), as in fla.

Shapes: B batch, T time, H heads, K key width, V value width, N packed sequences.
"""

from __future__ import annotations

# The package never uses the name ``torch``: importing the submodule ``.torch`` binds that name here.
from torch import Tensor

from seqblocks.ops._backend import outside_autocast, resolve_backend
from seqblocks.ops.delta_rule._checks import check_inputs, check_step_inputs, kernel_serves
from seqblocks.ops.delta_rule.reference import delta_rule_ref, gated_delta_rule_ref
from seqblocks.ops.delta_rule.torch import delta_rule_step_torch, gated_delta_rule_torch

__all__ = ["delta_rule", "gated_delta_rule", "delta_rule_step", "gated_delta_rule_step", "delta_rule_ref",
           "gated_delta_rule_ref"]


@outside_autocast
def gated_delta_rule(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    g: Tensor,
    beta: Tensor,
    *,
    scale: float | None = None,
    initial_state: Tensor | None = None,
    output_final_state: bool = False,
    cu_seqlens: Tensor | None = None,
    use_qk_l2norm: bool = False,
    chunk_size: int = 64,
    backend: str = "auto",
) -> tuple[Tensor, Tensor | None]:
    """The gated delta rule ``S_t = exp(g_t) (I - b_t k_t k_t^T) S_{t-1} + b_t k_t v_t^T``, ``o_t = scale S_t^T q_t``.

    Args:
        q, k (Tensor): [B, T, H, K] queries and keys.
        v (Tensor): [B, T, H, V] values.
        g (Tensor): [B, T, H] log decay (``<= 0`` for a contracting state).
        beta (Tensor): [B, T, H] write strength (sigmoid outputs in [0, 1]; [0, 2] with negative eigenvalues).
        scale (float | None): output scale. Default: None (``K ** -0.5``).
        initial_state (Tensor | None): [B, H, K, V] ([N, H, K, V] with ``cu_seqlens``). Default: None (zeros).
        output_final_state (bool): also return the final state. Default: False.
        cu_seqlens (Tensor | None): [N + 1] integer offsets of N sequences packed in a [1, total, ...]
            batch; the state restarts at each (from ``initial_state[i]`` when given). Default: None.
        use_qk_l2norm (bool): L2-normalise q and k over K first (``x / sqrt(sum(x^2) + 1e-6)``). Default: False.
        chunk_size (int): chunk length (the Triton forward rounds it to a power of two in [16, 64]);
            results do not depend on it beyond rounding. Default: 64.
        backend (str): "auto", "torch" or "triton" (fp16 / bf16 / fp32 inputs). Default: "auto".

    Returns:
        (o, final_state): o [B, T, H, V] in q's dtype; final_state [B, H, K, V] ([N, H, K, V]) in fp32
        (float64 for float64 inputs), or None without ``output_final_state``.

    Raises:
        TypeError: non-tensor or non-floating inputs, a non-integer ``cu_seqlens``, a non-real scale.
        ValueError: mismatched shapes (a per-channel beta [B, T, H, V] included), malformed cu_seqlens,
            a bad ``chunk_size``, an unknown backend, ``backend="triton"`` for float64 or CPU inputs.
        ImportError: ``backend="triton"`` without Triton.
    """
    check_inputs("gated_delta_rule", q, k, v, g, beta, scale, initial_state, cu_seqlens, chunk_size)
    return _dispatch("gated_delta_rule", q, k, v, g, beta, scale, initial_state, output_final_state, cu_seqlens,
                     use_qk_l2norm, chunk_size, backend)


def _dispatch(op, q, k, v, g, beta, scale, initial_state, output_final_state, cu_seqlens, use_qk_l2norm,
              chunk_size, backend) -> tuple[Tensor, Tensor | None]:
    # Both public ops, checked: the kernels or the PyTorch path (g None: the ungated rule).
    kw = {"scale": scale, "initial_state": initial_state, "output_final_state": output_final_state,
          "cu_seqlens": cu_seqlens, "use_qk_l2norm": use_qk_l2norm, "chunk_size": chunk_size}
    served = kernel_serves(q, k, v, g, beta, initial_state)
    if resolve_backend(backend, q, k, v, op=op, has_kernel=served) == "triton":
        from seqblocks.ops.delta_rule.triton import gated_delta_rule_triton

        return gated_delta_rule_triton(q, k, v, g, beta, **kw)
    return gated_delta_rule_torch(q, k, v, g, beta, **kw)


@outside_autocast
def delta_rule(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    beta: Tensor,
    *,
    scale: float | None = None,
    initial_state: Tensor | None = None,
    output_final_state: bool = False,
    cu_seqlens: Tensor | None = None,
    use_qk_l2norm: bool = False,
    chunk_size: int = 64,
    backend: str = "auto",
) -> tuple[Tensor, Tensor | None]:
    """The delta rule ``S_t = (I - b_t k_t k_t^T) S_{t-1} + b_t k_t v_t^T``, ``o_t = scale S_t^T q_t``.

    ``gated_delta_rule`` without the decay; arguments, results and errors as there.
    """
    check_inputs("delta_rule", q, k, v, None, beta, scale, initial_state, cu_seqlens, chunk_size, gated=False)
    return _dispatch("delta_rule", q, k, v, None, beta, scale, initial_state, output_final_state, cu_seqlens,
                     use_qk_l2norm, chunk_size, backend)


@outside_autocast
def gated_delta_rule_step(
    state: Tensor,
    q: Tensor,
    k: Tensor,
    v: Tensor,
    g: Tensor | None,
    beta: Tensor,
    *,
    scale: float | None = None,
    use_qk_l2norm: bool = False,
    backend: str = "auto",
) -> Tensor:
    """One decode step of ``gated_delta_rule``: advances ``state`` in place and returns ``o``.

    Args:
        state (Tensor): [B, H, K, V] fp32 (or float64) state, overwritten.
        q, k (Tensor): [B, H, K].  v (Tensor): [B, H, V].
        g (Tensor | None): [B, H] log decay; None: the ungated delta rule.
        beta (Tensor): [B, H].
        scale, use_qk_l2norm, backend: as in ``gated_delta_rule``.

    Returns:
        o (Tensor): [B, H, V] in q's dtype, equal to ``gated_delta_rule`` on the one-step sequence.

    Raises:
        TypeError / ValueError: as ``gated_delta_rule``; a state narrower than fp32.
    """
    check_step_inputs("gated_delta_rule_step", state, q, k, v, g, beta, scale)
    served = kernel_serves(q, k, v, g, beta, state=state)
    if resolve_backend(backend, state, q, op="gated_delta_rule_step", has_kernel=served) == "triton":
        from seqblocks.ops.delta_rule.triton import delta_rule_step_triton

        return delta_rule_step_triton(state, q, k, v, g, beta, scale=scale, use_qk_l2norm=use_qk_l2norm)
    return delta_rule_step_torch(state, q, k, v, g, beta, scale=scale, use_qk_l2norm=use_qk_l2norm)


def delta_rule_step(state: Tensor, q: Tensor, k: Tensor, v: Tensor, beta: Tensor, *, scale: float | None = None,
                    use_qk_l2norm: bool = False, backend: str = "auto") -> Tensor:
    """One decode step of ``delta_rule``: ``gated_delta_rule_step`` with ``g=None``."""
    return gated_delta_rule_step(state, q, k, v, None, beta, scale=scale, use_qk_l2norm=use_qk_l2norm,
                                 backend=backend)

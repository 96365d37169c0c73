"""Causal depthwise 1-D convolution (the short convolution of Mamba and Griffin's recurrent block).

``causal_conv1d`` runs a whole segment, continuing from ``initial_state`` and returning the state for
the next segment; ``causal_conv1d_update`` is the decode step. ``reference.py`` is the tap-by-tap spec,
``torch.py`` the fast path (one grouped ``F.conv1d``), ``triton.py`` the GPU kernels (forward,
backward and the decode step) that ``backend="auto"`` picks on CUDA for fp16 / bf16 / fp32 inputs and
widths W <= 8.

Shapes: B batch, T time, D channels, W filter width.
"""

from __future__ import annotations

# The package never uses the name ``torch``: importing the submodule ``.torch`` binds that name here.
from torch import Tensor
from torch import is_grad_enabled as torch_grad_enabled

from seqblocks.ops._backend import outside_autocast, resolve_backend
from seqblocks.ops.causal_conv1d._checks import check_conv_inputs
from seqblocks.ops.causal_conv1d.packed import causal_conv1d_packed_torch
from seqblocks.ops.causal_conv1d.reference import ACTIVATIONS, causal_conv1d_ref
from seqblocks.ops.causal_conv1d.torch import causal_conv1d_torch, causal_conv1d_update_torch

__all__ = ["causal_conv1d", "causal_conv1d_update", "causal_conv1d_ref", "runs_kernel", "ACTIVATIONS"]

_KERNEL_MAX_WIDTH = 8  # the kernels unroll the taps; wider filters run on the PyTorch path


def _kernel_serves(weight: Tensor, *tensors: Tensor | None) -> bool:
    """fp16 / bf16 / fp32 inputs and W <= 8: what the Triton kernels take (float64 stays on torch)."""
    return weight.shape[1] <= _KERNEL_MAX_WIDTH and all(
        t.dtype.itemsize <= 4 for t in (weight, *tensors) if t is not None)


def runs_kernel(x: Tensor, weight: Tensor, bias: Tensor | None = None, initial_state: Tensor | None = None) -> bool:
    """Whether ``causal_conv1d(..., backend="auto")`` on these tensors runs the Triton kernel.

    A caller that would otherwise recompute the conv to save memory asks this: the kernel saves only
    its inputs for backward, the PyTorch path also its fp32 padded copy.
    """
    served = _kernel_serves(weight, x, bias, initial_state)
    return resolve_backend("auto", x, weight, op="causal_conv1d", has_kernel=served) == "triton"


@outside_autocast
def causal_conv1d(
    x: Tensor,
    weight: Tensor,
    bias: Tensor | None = None,
    *,
    activation: str | None = None,
    initial_state: Tensor | None = None,
    lengths: Tensor | None = None,
    cu_seqlens: Tensor | None = None,
    backend: str = "auto",
) -> tuple[Tensor, Tensor]:
    """Causal depthwise convolution ``y[t, d] = act(bias[d] + sum_k weight[d, k] x[t - W + 1 + k, d])``.

    Inputs before the segment's start come from ``initial_state`` (zeros when None). Accumulates in
    fp32 (float64 for 64-bit inputs).

    Args:
        x (Tensor): [B, T, D] input.
        weight (Tensor): [D, W] one filter per channel; ``weight[:, -1]`` multiplies the current input.
        bias (Tensor | None): [D]. Default: None.
        activation (str | None): None, or "silu" (alias "swish") applied to the output. Default: None.
        initial_state (Tensor | None): [B, W - 1, D], the W - 1 inputs preceding ``x`` (oldest first).
            Default: None (zeros).
        lengths (Tensor | None): [B] integer valid prefix of each row: outputs past it are 0 and the
            final state is taken at the row's own end. Default: None (all T valid).
        cu_seqlens (Tensor | None): [S + 1] offsets of S sequences packed in a batch of one (x [1, total,
            D]): the conv restarts at each sequence's start (from ``initial_state[i]``, [S, W - 1, D]), and
            the final state is [S, W - 1, D], one per sequence. PyTorch path only (``packed.py``).
            Exclusive with ``lengths``. Default: None.
        backend (str): "auto", "torch" or "triton". Default: "auto".

    Returns:
        (y, final_state): y [B, T, D] in x's dtype; final_state [B, W - 1, D], the last W - 1 inputs
        of each row (initial-state entries where the row is shorter), in the initial state's dtype
        (x's when None).

    Raises:
        TypeError: non-floating inputs.
        ValueError: mismatched shapes, an unknown activation or backend, lengths out of [0, T].
    """
    check_conv_inputs("causal_conv1d", x, weight, bias, activation, initial_state, lengths, cu_seqlens=cu_seqlens)
    if cu_seqlens is not None:
        resolve_backend(backend, x, weight, op="causal_conv1d", has_kernel=False)
        return causal_conv1d_packed_torch(x, weight, bias, cu_seqlens, activation=activation,
                                          initial_state=initial_state)
    served = _kernel_serves(weight, x, bias, initial_state)
    if resolve_backend(backend, x, weight, op="causal_conv1d", has_kernel=served) == "triton":
        from seqblocks.ops.causal_conv1d.triton import causal_conv1d_triton

        return causal_conv1d_triton(x, weight, bias, activation=activation, initial_state=initial_state,
                                    lengths=lengths)
    return causal_conv1d_torch(x, weight, bias, activation=activation, initial_state=initial_state,
                               lengths=lengths)


@outside_autocast
def causal_conv1d_update(
    x: Tensor,
    conv_state: Tensor,
    weight: Tensor,
    bias: Tensor | None = None,
    activation: str | None = None,
    *,
    backend: str = "auto",
) -> Tensor:
    """One decode step of ``causal_conv1d``; shifts ``x`` into ``conv_state`` in place.

    Args:
        x (Tensor): [B, D] the new input.
        conv_state (Tensor): [B, W - 1, D] the previous W - 1 inputs, oldest first; updated in place.
        weight (Tensor): [D, W].
        bias (Tensor | None): [D]. Default: None.
        activation (str | None): None or "silu" / "swish". Default: None.
        backend (str): "auto", "torch" or "triton"; the Triton step is not differentiable, so a call
            autograd records (grad enabled and an input requiring grad) runs on the PyTorch path.
            Default: "auto".

    Returns:
        y (Tensor): [B, D] in x's dtype, equal to ``causal_conv1d`` on the one-step segment.

    Raises:
        TypeError / ValueError: as ``causal_conv1d``.
    """
    check_conv_inputs("causal_conv1d_update", x, weight, bias, activation, conv_state, None, step=True)
    # The decode kernel is not differentiable: a call that autograd must record runs on the PyTorch path.
    recorded = torch_grad_enabled() and any(t is not None and t.requires_grad for t in (x, conv_state, weight, bias))
    served = _kernel_serves(weight, x, bias, conv_state) and not recorded
    if resolve_backend(backend, x, conv_state, op="causal_conv1d_update", has_kernel=served) == "triton":
        from seqblocks.ops.causal_conv1d.triton import causal_conv1d_update_triton

        return causal_conv1d_update_triton(x, conv_state, weight, bias, activation)
    return causal_conv1d_update_torch(x, conv_state, weight, bias, activation)

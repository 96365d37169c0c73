"""Diagonal linear recurrence ``h_t = a_t * h_{t-1} + b_t`` (the core of LRU, S5, S4D, RG-LRU scans).

``linear_scan`` validates its inputs and dispatches: ``reference.py`` is the sequential spec,
``torch.py`` the fast chunked path with an O(B T S) custom backward, ``triton.py`` the GPU kernels
(their block shapes: an explicit ``ScanTuning``, ``tuning.py``).

Shapes: B batch, T time, S the state's trailing shape (e.g. D, or D x N).
"""

from __future__ import annotations

# The package never uses the name ``torch``: importing the submodule ``.torch`` binds that name here.
from torch import Tensor

from seqblocks.ops._backend import outside_autocast, resolve_backend
from seqblocks.ops.scan._checks import check_scan_inputs
from seqblocks.ops.scan.reference import linear_scan_ref, state_dtype
from seqblocks.ops.scan.torch import linear_scan_torch
from seqblocks.ops.scan.tuning import ScanTuning

__all__ = ["linear_scan", "linear_scan_ref", "state_dtype", "ScanTuning"]


@outside_autocast
def linear_scan(
    a: Tensor,
    b: Tensor,
    initial_state: Tensor | None = None,
    *,
    reverse: bool = False,
    lengths: Tensor | None = None,
    cu_seqlens: Tensor | None = None,
    backend: str = "auto",
    tuning: ScanTuning | None = None,
) -> tuple[Tensor, Tensor]:
    """Solve ``h_t = a_t * h_{t-1} + b_t`` (``h_t = a_t * h_{t+1} + b_t`` when ``reverse``).

    The state is carried in fp32 / complex64 (float64 / complex128 if any input is 64-bit), whatever
    the input dtype.

    Args:
        a (Tensor): decays [B, T, *S], or any shape broadcastable to ``b``'s (e.g. [*S] for a
            time-invariant decay). Real or complex.
        b (Tensor): inputs [B, T, *S]. Real or complex.
        initial_state (Tensor | None): [B, *S] (``[num_seqs, *S]`` with ``cu_seqlens``), the state
            before the first position read (the last one when ``reverse``). Default: None (zeros).
        reverse (bool): scan from the end of each sequence back to its start. Default: False.
        lengths (Tensor | None): [B] integer, the valid prefix of each row. Padding positions are
            neither read nor written into the state, their outputs are 0, and the final state is each
            row's own (its initial state when the length is 0). Default: None (all T valid).
        cu_seqlens (Tensor | None): [num_seqs + 1] integer offsets of sequences packed in a
            [1, total, *S] batch; the state restarts at every boundary. Default: None.
        backend (str): "auto", "torch" or "triton". Default: "auto".
        tuning (ScanTuning | None): block shapes and warps of the Triton kernels, for this call only
            (the PyTorch path ignores it; results do not depend on it). Default: None (the defaults).

    Returns:
        (h, final_state): ``h`` [B, T, *S] in the promoted dtype of ``a`` and ``b``; ``final_state``
        [B, *S] (``[num_seqs, *S]``) in the state dtype.

    Raises:
        TypeError: non-floating inputs, a ``tuning`` that is not a ``ScanTuning``.
        ValueError: shapes that do not match, lengths out of [0, T], malformed cu_seqlens, both
            lengths and cu_seqlens, an unknown backend.
    """
    check_scan_inputs(a, b, initial_state, lengths, cu_seqlens)
    if tuning is not None and not isinstance(tuning, ScanTuning):
        raise TypeError(f"linear_scan: tuning must be a ScanTuning or None, got {type(tuning).__name__}")
    # The Triton kernels (issue 8) take fp16 / bf16 / fp32 / complex64; 64-bit inputs stay on the torch path.
    served = all(t.dtype.itemsize <= (8 if t.is_complex() else 4) for t in (a, b, initial_state) if t is not None)
    if resolve_backend(backend, a, b, initial_state, op="linear_scan", has_kernel=served) == "triton":
        from seqblocks.ops.scan.triton import linear_scan_triton

        return linear_scan_triton(a, b, initial_state, reverse=reverse, lengths=lengths, cu_seqlens=cu_seqlens,
                                  tuning=tuning)
    return linear_scan_torch(a, b, initial_state, reverse=reverse, lengths=lengths, cu_seqlens=cu_seqlens)

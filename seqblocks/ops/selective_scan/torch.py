"""Fast pure-PyTorch selective scan: chunked over time, memory bounded by one chunk of state.

The (B, T, D, N) discretised system is never formed whole. Time is cut into chunks of ``C`` steps;
for one chunk at a time we discretise (``Ā``, ``B̄u`` of shape [B, C, D, N]), solve the chunk's diagonal
recurrence from the incoming state with ``seqblocks.ops.scan.linear_scan`` (vectorised, no loop over
time), read out ``y`` and keep only the chunk-end state [B, D, N].

Autograd is a custom Function that saves the inputs and the T / C chunk-start states. Backward walks
the chunks in reverse, recomputes one chunk's forward under autograd and back-propagates the chunk's
output cotangent together with the cotangent of its end state; the cotangent of its start state is
what flows into the previous chunk. Peak memory is O(B T D) for the inputs and gradients plus
O(B C D N) for one chunk, instead of O(B T D N).

Variable lengths: padding positions get ``Ā = 1`` and ``B̄u = 0`` (the state passes through) and
``y = 0``. Packed sequences (``cu_seqlens``) are unpacked into a padded batch by the dispatcher.

Shapes: B batch, T time, D channels, N state, G groups of B / C, C chunk length.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from seqblocks.ops.discretize import discretize
from seqblocks.ops.scan import linear_scan
from seqblocks.ops.selective_scan.reference import compute_dtypes, expand_groups, readout

__all__ = ["selective_scan_torch", "selective_state_update_torch", "CHUNK", "default_chunk"]

CHUNK = 64
# On the CPU a chunk's [B, C, D, N] tensors should stay cache-sized: each op of the chunk sweeps them a
# few dozen times. 2^19 elements (2 MiB fp32) measured best or near-best on a 2-core machine, e.g.
# 1.7-2.3x faster than C = 64 for a Mamba MQAR training step at B64 T32 D128 N16 (C = 4 there).
_CPU_CHUNK_ELEMENTS = 1 << 19


def default_chunk(batch: int, channels: int, state: int, device: torch.device) -> int:
    """The chunk length used when none is given: ``CHUNK`` on GPUs; on the CPU the power of two in
    [4, CHUNK] that keeps one chunk of state near ``_CPU_CHUNK_ELEMENTS`` elements."""
    if device.type != "cpu":
        return CHUNK
    per_step = max(1, batch * channels * state)
    chunk = 1 << max(0, (_CPU_CHUNK_ELEMENTS // per_step).bit_length() - 1)
    return min(CHUNK, max(4, chunk))

# Positional order of the tensors handed to the autograd Function.
_NAMES = ("u", "delta", "A", "B", "C", "D", "z", "delta_bias", "delta_A", "h0", "valid")
_TIMED = {"u", "delta", "B", "C", "z", "delta_A", "valid"}  # sliced along time per chunk


def _chunk_forward(t: dict[str, torch.Tensor | None], h0: torch.Tensor, opts: dict) -> tuple[torch.Tensor,
                                                                                             torch.Tensor]:
    """One chunk: tensors ``t`` sliced to [B, C, ...], ``h0`` [B, D, N] -> (y [B, C, D] real, h_end)."""
    real, sdt, grouped = opts["real"], opts["sdt"], opts["grouped"]
    u = t["u"].to(real)
    Dm = u.shape[-1]
    dt = t["delta"].to(real)
    if t["delta_bias"] is not None:
        dt = dt + t["delta_bias"].to(real)
    if opts["softplus"]:
        dt = F.softplus(dt)
    dtA = t["delta_A"]
    if dtA is not None:
        dtA = dtA.to(real)
        dtA = dtA.unsqueeze(-1) if dtA.dim() == 2 else dtA
        dtA = dtA.unsqueeze(-1)  # [B, C, D or 1, 1]
    A_bar, gamma = discretize(t["A"].to(sdt), dt.unsqueeze(-1), opts["method"], dtA)  # [B, C, D, N]
    Bm = expand_groups(t["B"].to(sdt), grouped, Dm)
    bu = gamma * Bm * u.unsqueeze(-1)
    valid = t["valid"]
    if valid is not None:
        v = valid[..., None, None]
        A_bar = torch.where(v, A_bar, torch.ones((), dtype=sdt, device=u.device))
        bu = torch.where(v, bu, torch.zeros((), dtype=sdt, device=u.device))
    A_bar = torch.broadcast_to(A_bar, bu.shape)
    h, h_end = linear_scan(A_bar, bu, h0, backend="torch")
    y = readout(expand_groups(t["C"].to(sdt), grouped, Dm), h)
    if t["D"] is not None:
        y = y + t["D"].to(real) * u
    if t["z"] is not None:
        y = y * F.silu(t["z"].to(real))
    if valid is not None:
        y = torch.where(valid[..., None], y, torch.zeros((), dtype=real, device=u.device))
    return y, h_end


def _slice(tensors: dict, start: int, stop: int) -> dict:
    return {k: (v[:, start:stop] if (v is not None and k in _TIMED) else v) for k, v in tensors.items()}


class _SelectiveScanFn(torch.autograd.Function):
    """Chunked selective scan with per-chunk recomputation in backward (see the module docstring)."""

    @staticmethod
    def forward(ctx, opts: dict, *tensors: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        named = dict(zip(_NAMES, tensors))
        T, chunk = named["u"].shape[1], opts["chunk"]
        h = named["h0"]
        ys, starts = [], []
        for s in range(0, T, chunk):
            starts.append(h)
            y, h = _chunk_forward(_slice(named, s, s + chunk), h, opts)
            # h_end is a view of the chunk's [B, C, D, N] states: saving the view would keep them all
            h = h.clone()
            ys.append(y)
        ctx.opts = opts
        ctx.save_for_backward(*tensors, *starts)
        ctx.num_tensors = len(tensors)
        y = torch.cat(ys, dim=1) if ys else named["u"].new_zeros(named["u"].shape, dtype=opts["real"])
        return y, h

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, dy: torch.Tensor | None, dh: torch.Tensor | None):
        saved = ctx.saved_tensors
        tensors, starts = saved[: ctx.num_tensors], saved[ctx.num_tensors :]
        named = dict(zip(_NAMES, tensors))
        opts = ctx.opts
        chunk = opts["chunk"]
        wants = {k: (named[k] is not None and ctx.needs_input_grad[1 + i]) for i, k in enumerate(_NAMES)}
        wants["h0"] = True  # the start state's cotangent links consecutive chunks
        grads: dict[str, torch.Tensor | None] = {k: None for k in _NAMES}
        for k in _NAMES:
            if wants[k] and k != "h0":
                grads[k] = torch.zeros_like(named[k])
        if dh is None:
            dh = torch.zeros_like(starts[0])
        for idx in range(len(starts) - 1, -1, -1):
            s = idx * chunk
            piece = _slice(named, s, s + chunk)
            leaves = {}
            with torch.enable_grad():
                for k in _NAMES:
                    v = starts[idx] if k == "h0" else piece[k]
                    if wants[k]:
                        v = v.detach().requires_grad_(True)
                        leaves[k] = v
                    piece[k] = v
                y, h_end = _chunk_forward(piece, piece["h0"], opts)
                dy_c = torch.zeros_like(y) if dy is None else dy[:, s : s + chunk]
                got = torch.autograd.grad((y, h_end), list(leaves.values()), (dy_c, dh), allow_unused=True)
            for k, g in zip(leaves, got):
                if k == "h0":
                    dh = torch.zeros_like(leaves[k]) if g is None else g
                elif g is not None:
                    if k in _TIMED:
                        grads[k][:, s : s + chunk] += g
                    else:
                        grads[k] += g
        grads["h0"] = dh if (named["h0"] is not None and ctx.needs_input_grad[1 + _NAMES.index("h0")]) else None
        return (None, *(grads[k] for k in _NAMES))


def selective_scan_torch(
    u: torch.Tensor,
    delta: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    D: torch.Tensor | None = None,
    z: torch.Tensor | None = None,
    *,
    delta_bias: torch.Tensor | None = None,
    delta_softplus: bool = False,
    discretization: str = "mamba",
    delta_A: torch.Tensor | None = None,
    initial_state: torch.Tensor | None = None,
    lengths: torch.Tensor | None = None,
    chunk_size: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The chunked path of ``seqblocks.ops.selective_scan.selective_scan`` (no ``cu_seqlens``: the
    dispatcher unpacks those). Inputs are assumed valid.

    Args:
        chunk_size (int | None): time steps per chunk; bounds the state held at once to [B, chunk, D, N].
            Default: None (``default_chunk``: 64 on GPUs, cache-sized on the CPU).
    """
    real, sdt = compute_dtypes(u, delta, A, B, C, initial_state)
    Bsz, T, Dm = u.shape
    N = A.shape[-1]
    h0 = initial_state.to(sdt) if initial_state is not None else torch.zeros(Bsz, Dm, N, dtype=sdt,
                                                                             device=u.device)
    if T == 0:
        return u.clone(), h0
    valid = None
    if lengths is not None:
        valid = torch.arange(T, device=u.device) < lengths.to(u.device).unsqueeze(1)
    opts = {"real": real, "sdt": sdt, "grouped": B.dim() == 4, "softplus": delta_softplus,
            "method": discretization,
            "chunk": max(1, int(chunk_size)) if chunk_size is not None else default_chunk(Bsz, Dm, N, u.device)}
    tensors = (u, delta, A, B, C, D, z, delta_bias, delta_A, h0, valid)
    if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors):
        y, h = _SelectiveScanFn.apply(opts, *tensors)
    else:
        with torch.no_grad():
            y, h = _SelectiveScanFn.forward(_NoCtx(), opts, *tensors)
    return y.to(u.dtype), h


class _NoCtx:
    """Stands in for the autograd context when no gradient is needed (nothing is kept)."""

    def save_for_backward(self, *tensors: torch.Tensor | None) -> None:
        pass


def selective_state_update_torch(
    state: torch.Tensor,
    u: torch.Tensor,
    delta: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    D: torch.Tensor | None = None,
    z: torch.Tensor | None = None,
    *,
    delta_bias: torch.Tensor | None = None,
    delta_softplus: bool = False,
    discretization: str = "mamba",
    delta_A: torch.Tensor | None = None,
) -> torch.Tensor:
    """One decode step of the selective scan, writing the new state into ``state`` in place.

    Shapes: state [B, D, N]; u, delta, z [B, D]; B, C [B, N] or [B, G, N]; delta_A [B, D] or [B].
    Returns y [B, D] in u's dtype.
    """
    real, sdt = compute_dtypes(u, delta, A, B, C, state)
    Dm = u.shape[-1]
    grouped = B.dim() == 3
    dt = delta.to(real)
    if delta_bias is not None:
        dt = dt + delta_bias.to(real)
    if delta_softplus:
        dt = F.softplus(dt)
    dtA = None
    if delta_A is not None:
        dtA = delta_A.to(real)
        dtA = (dtA.unsqueeze(-1) if dtA.dim() == 1 else dtA).unsqueeze(-1)
    A_bar, gamma = discretize(A.to(sdt), dt.unsqueeze(-1), discretization, dtA)  # [B, D, N]
    x = u.to(real)
    h = A_bar * state.to(sdt) + gamma * expand_groups(B.to(sdt), grouped, Dm) * x.unsqueeze(-1)
    state.copy_(h)
    y = readout(expand_groups(C.to(sdt), grouped, Dm), h)
    if D is not None:
        y = y + D.to(real) * x
    if z is not None:
        y = y * F.silu(z.to(real))
    return y.to(u.dtype)

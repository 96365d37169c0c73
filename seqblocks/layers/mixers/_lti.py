"""Shared machinery of the linear time-invariant SSM mixers (LRU, S4, S4D, S5, Centaurus).

Each of these computes ``y = SSM(u) + skip(u)`` followed by an optional pointwise ``post`` map, where
the SSM is a linear system with a complex state. ``LTIMixer`` owns everything that is the same for
all of them, and each subclass implements ``_ssm`` (one direction of the system, convolution or
recurrence) and names its state shape:

- ``mode``: "conv" evaluates the system as a long convolution with its impulse response (FFT, the
  parallel training form of S4 / S4D); "scan" runs the recurrence (``seqblocks.ops.scan``, the
  parallel-scan form of S5 / LRU). Both compute the same function (tested). A call with a cache
  (prefill, continuation, decode step) always runs the recurrence, because it must produce the state.
- ``bidirectional``: a forward pass plus a reversed pass through the same dynamics with their own
  output map (``C`` and ``C_bwd``, as S4 and S5 do), summed; the skip term is added once. Not causal,
  so it keeps no cache.
- ``lengths``: padded positions are zeroed before the system (so the reversed pass and the
  convolution never read them), the recurrence passes the state through them untouched, the final
  state is each sequence's own, and outputs at padding are 0.
- non-finite inputs (``seqblocks.layers.finite``): a NaN / Inf at position t makes the outputs at
  t and later NaN (the whole row when bidirectional) and poisons the cache's state, never an
  earlier output or another row, in either mode: the input is zeroed there before the FFT or the
  chunked recurrence, and the poisoned outputs are set afterwards.

Shapes: B batch, T time, H (= D) model width, S the state's shape per sequence.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch
from torch import nn

from seqblocks.cache import Cache
from seqblocks.layers.checks import (
    check_allocation,
    check_cache,
    check_input,
    check_lengths,
    check_positive,
    check_range,
    is_empty,
)
from seqblocks.layers.finite import nonfinite_tokens, poison, poisoned_from, zero_nonfinite
from seqblocks.layers.mixer import Mixer
from seqblocks.ops._backend import autocast_off
from seqblocks.ops.fftconv import fftconv
from seqblocks.ops.scan import linear_scan
from seqblocks.ops.scan.reference import state_dtype
from seqblocks.ops.scan.step import linear_scan_step
from seqblocks.ops.ssm_conv_kernels import ssm_powers
from seqblocks.parallel.scan import carried_poison, chunk_lengths, linear_scan_cp, mixer_context

__all__ = ["SSMCache", "LTIMixer", "MODES", "pad_mask", "reverse_rows", "reverse_sequences", "complex_dtype",
           "post_layers", "diag_states", "complex_linear", "real_readout", "ACTIVATIONS", "make_activation"]

MODES = ("conv", "scan")


@dataclasses.dataclass(eq=False)
class SSMCache(Cache):
    """Decoding state of an LTI SSM mixer.

    Attributes:
        state (Tensor): [B, *S] complex64 (complex128 for a float64 module), updated in place.
    """

    state: torch.Tensor = None


def complex_dtype(real: torch.dtype) -> torch.dtype:
    """complex64 for fp32 (and lower), complex128 for float64."""
    return torch.complex128 if real == torch.float64 else torch.complex64


def pad_mask(lengths: torch.Tensor | None, T: int, device: torch.device) -> torch.Tensor | None:
    """[B, T, 1] bool, True at valid positions (None without lengths)."""
    if lengths is None:
        return None
    return (torch.arange(T, device=device) < lengths.unsqueeze(1)).unsqueeze(-1)


def reverse_rows(x: torch.Tensor, lengths: torch.Tensor | None) -> torch.Tensor:
    """Reverse each row's valid prefix along dim 1, leaving padding in place (an involution)."""
    if lengths is None:
        return x.flip(1)
    T = x.shape[1]
    t = torch.arange(T, device=x.device)
    n = lengths.unsqueeze(1)
    idx = torch.where(t < n, n - 1 - t, t)
    idx = idx.view(*idx.shape, *([1] * (x.dim() - 2))).expand_as(x)
    return torch.gather(x, 1, idx)


def reverse_sequences(x: torch.Tensor, lengths: torch.Tensor | None, cu_seqlens: torch.Tensor | None) -> torch.Tensor:
    """Reverse along dim 1 each row's valid prefix (``lengths``) or each packed sequence (``cu_seqlens``,
    x [1, total, ...]), leaving padding in place (an involution): the reversed pass of a bidirectional
    mixer."""
    if cu_seqlens is None:
        return reverse_rows(x, lengths)
    t = torch.arange(x.shape[1], device=x.device)
    cu = cu_seqlens.to(x.device)
    seq = torch.bucketize(t, cu[1:], right=True)
    return x.index_select(1, cu[seq] + cu[seq + 1] - 1 - t)


class LTIMixer(Mixer):
    """Base of the LTI SSM mixers; see the module docstring. Subclasses set ``d_model``, ``mode``,
    ``bidirectional`` and implement ``_ssm``, ``state_shape`` and optionally ``_skip`` / ``_post``."""

    inputs = frozenset({"lengths"})

    d_model: int
    mode: str
    bidirectional: bool

    def _init_common(self, d_model: int, mode: str, bidirectional: bool) -> None:
        check_positive(type(self).__name__, d_model=d_model)
        if mode not in MODES:
            raise ValueError(f"{type(self).__name__}: unknown mode {mode!r}; expected one of {MODES}")
        self.d_model = d_model
        self.mode = mode
        self.bidirectional = bool(bidirectional)
        self.causal = not self.bidirectional

    # ---- subclass interface -------------------------------------------------------------------
    def state_shape(self) -> tuple[int, ...]:
        """The state's shape S per sequence."""
        raise NotImplementedError  # abstract: every concrete mixer defines it

    def _ssm(self, u: torch.Tensor, *, mode: str, reverse: bool, h0: torch.Tensor | None,
             lengths: torch.Tensor | None, **kwargs: Any) -> tuple[torch.Tensor, torch.Tensor | None]:
        """One direction of the system without the skip: u [B, T, H] (zero at padding, compute dtype)
        -> (y [B, T, H] real, final state [B, *S] or None when ``mode == "conv"``)."""
        raise NotImplementedError  # abstract: every concrete mixer defines it

    def _skip(self, u: torch.Tensor) -> torch.Tensor | None:
        return None

    def _post(self, y: torch.Tensor) -> torch.Tensor:
        return y

    def _post_with_input(self, y: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """The pointwise tail given the layer input x [B, T, D] too (S4's multiplicative gate reads it)."""
        return self._post(y)

    # ---- shared -------------------------------------------------------------------------------
    def _param_dtype(self) -> torch.dtype:
        # The widest parameter dtype: fp32 for a bf16-cast module, whose poles stay fp32 (keep_in_fp32).
        return state_dtype(*(p.dtype for p in self.parameters()))

    def _native_cp(self) -> bool:
        """This mixer runs natively under context parallelism (its class says so: LRU, S5)."""
        return getattr(type(self), "context_parallel", None) == "native"

    def compute_dtype(self, x_dtype: torch.dtype) -> torch.dtype:
        """Real dtype the system runs in: fp32, or float64 when the input or the module is."""
        d = state_dtype(x_dtype, self._param_dtype())
        return d if not d.is_complex else torch.float32

    def allocate_inference_cache(self, batch_size: int, max_seqlen: int, dtype: torch.dtype | None = None,
                                 **kwargs: Any) -> SSMCache:
        """A zero state ``[batch_size, *S]`` of ``cache_state_dtype`` (complex64, or complex128 for a
        float64 module).

        Raises:
            ValueError: a bidirectional mixer (it is not causal, so it cannot decode).
        """
        if self.bidirectional:
            raise ValueError(f"{type(self).__name__}(bidirectional=True) is not causal and keeps no cache")
        check_allocation(type(self).__name__, batch_size, max_seqlen, dtype)
        p = next(self.parameters())
        state = torch.zeros(batch_size, *self.state_shape(), dtype=self.cache_state_dtype(p.dtype), device=p.device)
        return SSMCache.empty(batch_size, max_seqlen, device=p.device, state=state)

    def cache_state_dtype(self, param_dtype: torch.dtype) -> torch.dtype:
        """The cache state's dtype for parameters of ``param_dtype``: complex64 (complex128 for float64)."""
        return complex_dtype(param_dtype)

    def _check_call(self, x: torch.Tensor, cache: SSMCache | None, lengths: torch.Tensor | None) -> None:
        name = type(self).__name__
        check_input(name, x, self.d_model, device=next(self.parameters()).device)
        B, T = x.shape[:2]
        check_lengths(name, lengths, B, T)  # the chunk's own lengths under context parallelism
        if cache is not None:
            if self.bidirectional:
                raise ValueError(f"{name}(bidirectional=True) is not causal and cannot run with a cache")
            check_cache(name, cache, SSMCache, B, x.device)
            expected = (B, *self.state_shape())
            if tuple(cache.state.shape) != expected:
                raise ValueError(f"{name}: cache state has shape {tuple(cache.state.shape)}, expected {expected}")

    def forward(self, x: torch.Tensor, cache: SSMCache | None = None, *,
                lengths: torch.Tensor | None = None) -> torch.Tensor:
        """y = post(SSM(x) + skip(x)).

        Args:
            x (Tensor): [B, T, D] input, any float dtype (the system runs in fp32 / complex64).
            cache (SSMCache | None): continue from and update this state (prefill / decode step).
                Default: None.
            lengths (Tensor | None): [B] valid prefix lengths; see the module docstring. Default: None.

        Returns:
            Tensor: [B, T, D] in x's dtype.
        """
        return self._forward(x, cache, lengths)

    def _forward(self, x: torch.Tensor, cache: SSMCache | None, lengths: torch.Tensor | None,
                 **kwargs: Any) -> torch.Tensor:
        # ``kwargs`` go to ``_ssm`` (S5's integration_timesteps).
        # A subclass marked ``context_parallel = "native"`` runs on its time chunk under
        # ``seqblocks.parallel.context_parallel``: the recurrence (scan mode, whatever ``mode``) passes its
        # state across ranks, and ``lengths`` are the full sequence's.
        cp = mixer_context(type(self).__name__, cache) if self._native_cp() else None
        B, T = x.shape[:2] if isinstance(x, torch.Tensor) and x.dim() == 3 else (0, 0)
        local = chunk_lengths(type(self).__name__, lengths, B, T, cp)
        self._check_call(x, cache, local)
        B, T, _ = x.shape
        if is_empty(x):  # the empty rule (layers/checks.py): the state stays as it is
            return x.new_zeros(x.shape)
        cdt = self.compute_dtype(x.dtype)
        u = x.to(cdt)
        if cp is not None:
            kwargs["cp"] = cp
        valid = pad_mask(local, T, x.device)
        if valid is not None:
            u = u.masked_fill(~valid, 0.0)
        # A non-finite input would reach earlier outputs through the FFT (and S4's chunked recurrence):
        # zero it, and poison the outputs from it on afterwards (seqblocks.layers.finite).
        bad = nonfinite_tokens(u)
        u = zero_nonfinite(u)
        # The system runs at ``cdt`` even inside an autocast region (its products would go to bf16 there
        # and round the state); only the output layers in ``_post`` follow autocast.
        with autocast_off(x.device):
            if cache is not None:
                y, final = self._ssm(u, mode="scan", reverse=False, h0=cache.state, lengths=lengths, **kwargs)
                row_bad = bad.any(1).view(B, *([1] * (final.dim() - 1)))
                cache.state.copy_(final.masked_fill(row_bad, float("nan")))
                cache.advance(T if lengths is None else lengths.to(cache.seqlen_offset.dtype))
            else:
                mode = self.mode if cp is None else "scan"
                y, _ = self._ssm(u, mode=mode, reverse=False, h0=None, lengths=lengths, **kwargs)
                if self.bidirectional:
                    y_rev, _ = self._ssm(u, mode=mode, reverse=True, h0=None, lengths=lengths, **kwargs)
                    y = y + y_rev
            skip = self._skip(u)
            if skip is not None:
                y = y + skip
        poisoned = poisoned_from(bad, causal=not self.bidirectional)
        if cp is not None:  # a bad token on another rank of the row
            poisoned = poisoned | carried_poison(bad, causal=not self.bidirectional, cp=cp)
        y = poison(self._post_with_input(y, x), poisoned)
        if valid is not None:
            y = y.masked_fill(~valid, 0.0)
        return y.to(x.dtype)


def post_layers(d_model: int, activation: str | None, final_act: str | None, dropout: float,
                device=None, dtype=None, *, d_in: int | None = None) -> tuple[nn.Module, nn.Module, nn.Module]:
    """S4's pointwise tail: (activation, dropout, output map) as in the S4 repository.

    ``final_act``: "glu" (Linear d_in -> 2D then GLU), "id" (Linear d_in -> D), "gelu" (Linear d_in -> D
    then GELU), None (nothing, which needs d_in == D). ``d_in``: the width entering the map (S4's
    channels or gate widen it). Default: D.
    """
    d_in = d_model if d_in is None else d_in
    act = make_activation(activation)
    if final_act is None and d_in != d_model:
        raise ValueError(f"final_act=None leaves the width at {d_in}, not d_model={d_model}; use 'glu' or 'id' "
                         f"to map it back")
    if final_act == "glu":
        out = nn.Sequential(nn.Linear(d_in, 2 * d_model, device=device, dtype=dtype), nn.GLU(dim=-1))
    elif final_act == "id":
        out = nn.Linear(d_in, d_model, device=device, dtype=dtype)
    elif final_act == "gelu":
        out = nn.Sequential(nn.Linear(d_in, d_model, device=device, dtype=dtype), nn.GELU())
    elif final_act is None:
        out = nn.Identity()
    else:
        raise ValueError(f"unknown final_act {final_act!r}; expected 'glu', 'id', 'gelu' or None")
    check_range("S4", "dropout", dropout, 0.0, 1.0, hi_open=True)
    return act, (nn.Dropout(dropout) if dropout > 0 else nn.Identity()), out


#: The pointwise activations the LTI mixers' tails take by name (None and "id": none).
ACTIVATIONS = {None: nn.Identity, "id": nn.Identity, "gelu": nn.GELU, "silu": nn.SiLU, "relu": nn.ReLU,
               "tanh": nn.Tanh}


def make_activation(name: str | None, what: str = "activation") -> nn.Module:
    """The activation module named ``name`` (``ACTIVATIONS``).

    Raises:
        ValueError: an unknown name (``what`` says which argument it came from).
    """
    if name not in ACTIVATIONS:
        raise ValueError(f"unknown {what} {name!r}; expected one of {list(ACTIVATIONS)}")
    return ACTIVATIONS[name]()


def diag_states(log_lam: torch.Tensor, v: torch.Tensor, *, mode: str, reverse: bool, h0: torch.Tensor | None,
                lengths: torch.Tensor | None, a: torch.Tensor | None = None, cp=None
                ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """States of the diagonal system ``h_t = λ h_{t-1} + v_t`` (``h_{t+1}`` when ``reverse``).

    Args:
        log_lam (Tensor): [*S] complex log of the decay (``Δ A`` for ZOH; exact powers ``exp(l log λ)``).
        v (Tensor): [B, T, *S] complex inputs ``B̄ u``, zero at padding.
        mode (str): "scan" (``linear_scan``) or "conv" (FFT convolution with ``λ^l``; no state).
        a (Tensor | None): [B, T, *S] time-varying decay overriding ``exp(log_lam)`` (scan only).
        cp (ContextParallel | None): v is this rank's time chunk of a sequence split over ``cp``
            (scan mode; ``lengths`` the full sequence's): ``seqblocks.parallel.scan.linear_scan_cp``.
            Default: None.

    Returns:
        (h [B, T, *S], final state [B, *S] or None in conv mode).
    """
    if cp is not None:
        return linear_scan_cp(torch.exp(log_lam) if a is None else a, v, h0, reverse=reverse, lengths=lengths, cp=cp)
    if mode == "scan" or a is not None:
        decay = torch.exp(log_lam) if a is None else a
        step = v.shape[1] == 1 and not reverse and h0 is not None and lengths is None
        if step and decay.shape in (v.shape, v.shape[2:]) and h0.dtype == state_dtype(decay.dtype, v.dtype, h0.dtype):
            # A decode step: one fused launch on CUDA instead of a one-step scan.
            h = linear_scan_step(h0, decay[:, 0] if decay.dim() == v.dim() else decay, v[:, 0], inplace=False)
            return h.unsqueeze(1), h
        return linear_scan(decay, v, h0, reverse=reverse, lengths=lengths)
    B, T = v.shape[:2]
    S = v.shape[2:]
    flat = v.reshape(B, T, -1)
    k = ssm_powers(log_lam.reshape(-1), T)
    # Padding holds v = 0, so the anti-causal convolution of the whole row is the reversed pass.
    h = fftconv(flat.flip(1), k).flip(1) if reverse else fftconv(flat, k)
    return h.reshape(B, T, *S), None


def complex_linear(u: torch.Tensor, W: torch.Tensor) -> torch.Tensor:
    """``u @ W^T`` for real u [..., H] and complex W [P, H], as two real matrix products."""
    return torch.complex(u @ W.real.T, u @ W.imag.T)


def real_readout(h: torch.Tensor, C: torch.Tensor) -> torch.Tensor:
    """``Re(h @ C^T)`` for complex h [..., P] and C [H, P], as two real matrix products."""
    return h.real @ C.real.T - h.imag @ C.imag.T

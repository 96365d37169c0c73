"""Mamba-2: the SSD mixer of Dao & Gu (2024), with mamba_ssm's arguments, defaults and parameter names.

    z, xBC, dt = in_proj(u).split(...)                   # z [B, T, d_ssm], xBC [B, T, d_ssm + 2 G N], dt [B, T, H]
    x, B, C    = silu(causal_conv1d(xBC)).split(...)     # one short depthwise conv over x, B and C together
    y          = ssd(x, dt, A, B, C, D, dt_bias=dt_bias)  # A = -exp(A_log) [H], one scalar decay per head
    y          = RMSNormGated(y, z)                      # or y * silu(z) inside the scan when rmsnorm=False
    out        = out_proj(y)

With ``d_ssm < expand * d_model`` the remaining inner width is a gated MLP branch,
``silu(z0) * x0``, concatenated before ``out_proj`` (mamba_ssm's ``d_mlp``).

Parameter names are mamba_ssm's (``in_proj``, ``conv1d``, ``dt_bias``, ``A_log``, ``D``, ``norm.weight``,
``out_proj``), so a mamba_ssm ``Mamba2`` or a transformers ``Mamba2Mixer`` state dict loads unchanged.

Shapes: B batch, T time, D model width, H heads, P head width, N state, G groups, W conv width.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from seqblocks.cache import Cache
from seqblocks.layers.checks import (
    check_allocation,
    check_cache,
    check_call,
    check_positive,
    check_range,
    is_empty,
    lengths_mask,
)
from seqblocks.layers.mixer import Mixer
from seqblocks.layers.mixers._lti import reverse_sequences
from seqblocks.ops.causal_conv1d import causal_conv1d, causal_conv1d_update
from seqblocks.ops.ssd import ssd, ssd_state_update
from seqblocks.parallel.conv import conv_halo
from seqblocks.parallel.scan import chunk_lengths, local_cu_seqlens, mixer_context, ssd_cp
from seqblocks.registry import MIXERS

__all__ = ["Mamba2", "Mamba2Cache", "RMSNormGated"]


class RMSNormGated(nn.Module):
    """RMSNorm with a SiLU gate, normalised over groups of ``group_size`` channels (mamba_ssm's).

    ``norm_before_gate=False``: ``rmsnorm(x * silu(z)) * weight``; True: ``rmsnorm(x) * weight * silu(z)``.
    Computed in fp32 (float64 for float64 inputs), returned in x's dtype.
    """

    def __init__(self, d: int, eps: float = 1e-5, norm_before_gate: bool = False, group_size: int | None = None,
                 device=None, dtype=None) -> None:
        super().__init__()
        group_size = d if group_size is None else group_size
        if group_size <= 0 or d % group_size:
            raise ValueError(f"RMSNormGated: group_size must divide d={d}, got {group_size}")
        self.eps, self.norm_before_gate, self.group_size = eps, norm_before_gate, group_size
        self.weight = nn.Parameter(torch.ones(d, device=device, dtype=dtype))

    def forward(self, x: torch.Tensor, z: torch.Tensor | None = None) -> torch.Tensor:
        acc = torch.promote_types(torch.float32, x.dtype)
        h = x.to(acc)
        if z is not None and not self.norm_before_gate:
            h = h * F.silu(z.to(acc))
        g = h.unflatten(-1, (-1, self.group_size))
        h = (g * torch.rsqrt(g.square().mean(-1, keepdim=True) + self.eps)).flatten(-2) * self.weight.to(acc)
        if z is not None and self.norm_before_gate:
            h = h * F.silu(z.to(acc))
        return h.to(x.dtype)


@dataclasses.dataclass(eq=False)
class Mamba2Cache(Cache):
    """Decoding state of ``Mamba2``.

    Attributes:
        conv_state (Tensor): [B, W - 1, d_ssm + 2 G N] the last W - 1 conv inputs, in the activation dtype.
        ssm_state (Tensor): [B, H, P, N] the recurrent state, fp32 (float64 for a float64 module).
    """

    conv_state: torch.Tensor = None
    ssm_state: torch.Tensor = None


@MIXERS.register("Mamba2")
class Mamba2(Mixer):
    """Mamba-2 (SSD) mixer: mamba_ssm's ``Mamba2`` arguments and defaults.

    Args:
        d_model (int): model width D.
        d_state (int): state size N per head channel. Default: 128.
        d_conv (int): width W of the causal depthwise conv. Default: 4.
        conv_init (float | None): conv weights uniform in +-conv_init; None: nn.Conv1d's init. Default: None.
        expand (int): inner width expand * d_model. Default: 2.
        headdim (int): head width P. Default: 64.
        d_ssm (int | None): width of the SSM part (a multiple of headdim); the rest of the inner width is
            a gated MLP branch. None: the whole inner width. Default: None.
        ngroups (int): G groups of B / C (and of the gated norm), dividing the head count. Default: 1.
        A_init_range (tuple): A drawn uniform in this range (A_log = log A; the decay is -A). Default: (1, 16).
        D_has_hdim (bool): skip D per channel [d_ssm] instead of per head [H]. Default: False.
        rmsnorm (bool): gated RMSNorm after the scan (else the scan applies silu(z)). Default: True.
        norm_before_gate (bool): normalise, then gate. Default: False.
        rmsnorm_eps (float): epsilon of the gated RMSNorm. Default: 1e-5.
        dt_min, dt_max (float): range of the initial step (log-uniform). Default: 0.001, 0.1.
        dt_init_floor (float): lower clamp of the initial step. Default: 1e-4.
        dt_limit (tuple): ``(lo, hi)`` clamp of the step; ``hi = None`` means no upper limit (mamba_ssm's
            ``float("inf")``, which JSON cannot hold; inf is accepted too). Default: (0.0, None).
        bias (bool): biases in in_proj and out_proj. Default: False.
        conv_bias (bool): bias in the conv. Default: True.
        chunk_size (int): chunk length of the SSD scan. Default: 256.
        bidirectional (bool): add a reversed pass of the SSD scan over the conv's output (a seqblocks
            extra, not in mamba_ssm): the same weights scan each row (or packed sequence) backwards too,
            the D skip counted once; not causal, so no cache. Default: False.
        layer_idx (int | None): position in the stack. Default: None.
        device, dtype: parameter placement. Default: None.

    Raises:
        ValueError: non-positive sizes, d_ssm not a multiple of headdim or above the inner width,
            ngroups not dividing the heads, bad A_init_range / dt ranges / dt_limit.
    """

    # Kept fp32 under a bf16 / fp16 cast of the module (Mixer.keep_in_fp32): decay, skip, step bias.
    keep_in_fp32 = ("A_log", "D", "dt_bias")

    inputs = frozenset({"lengths", "cu_seqlens"})
    # Under ``seqblocks.parallel.context_parallel`` the forward runs on its time chunk (conv halo, SSD
    # state passing: parallel/scan.py); a bidirectional instance is not causal and opts out (below).
    context_parallel = "native"

    def __init__(
        self,
        d_model: int,
        d_state: int = 128,
        d_conv: int = 4,
        conv_init: float | None = None,
        expand: int = 2,
        headdim: int = 64,
        d_ssm: int | None = None,
        ngroups: int = 1,
        A_init_range: tuple[float, float] = (1, 16),
        D_has_hdim: bool = False,
        rmsnorm: bool = True,
        norm_before_gate: bool = False,
        rmsnorm_eps: float = 1e-5,
        dt_min: float = 0.001,
        dt_max: float = 0.1,
        dt_init_floor: float = 1e-4,
        dt_limit: tuple[float, float | None] = (0.0, None),
        bias: bool = False,
        conv_bias: bool = True,
        chunk_size: int = 256,
        bidirectional: bool = False,
        layer_idx: int | None = None,
        device=None,
        dtype=None,
    ) -> None:
        super().__init__()
        self.bidirectional = bool(bidirectional)
        self.causal = not self.bidirectional
        if self.bidirectional:  # its reversed pass reads the whole row: gathered, not split (run_mixer)
            self.context_parallel = None
        check_positive("Mamba2", d_model=d_model, d_state=d_state, d_conv=d_conv, expand=expand, headdim=headdim,
                       ngroups=ngroups, chunk_size=chunk_size)
        d_inner = expand * d_model
        d_ssm_ = d_inner if d_ssm is None else d_ssm
        if d_ssm is not None:
            check_positive("Mamba2", d_ssm=d_ssm)
        if d_ssm_ > d_inner or d_ssm_ % headdim:
            raise ValueError(f"Mamba2: d_ssm={d_ssm_} (expand * d_model = {d_inner} when None) must be a multiple "
                             f"of headdim={headdim} and at most expand * d_model = {d_inner}")
        nheads = d_ssm_ // headdim
        if nheads % ngroups:
            raise ValueError(f"Mamba2: ngroups={ngroups} must divide the number of heads d_ssm / headdim = {nheads}")
        check_range("Mamba2", "rmsnorm_eps", rmsnorm_eps, 0, lo_open=True)
        if conv_init is not None:
            check_range("Mamba2", "conv_init", conv_init, 0, lo_open=True)
        if not isinstance(A_init_range, tuple | list) or len(A_init_range) != 2:
            raise ValueError(f"Mamba2: A_init_range must be a pair (lo, hi), got {A_init_range!r}")
        check_range("Mamba2", "A_init_range[0]", A_init_range[0], 0, lo_open=True)
        check_range("Mamba2", "A_init_range[1]", A_init_range[1], A_init_range[0], lo_name="A_init_range[0]")
        check_range("Mamba2", "dt_min", dt_min, 0, lo_open=True)
        check_range("Mamba2", "dt_max", dt_max, dt_min, lo_name="dt_min")
        check_range("Mamba2", "dt_init_floor", dt_init_floor, 0)
        if not isinstance(dt_limit, tuple | list) or len(dt_limit) != 2:
            raise ValueError(f"Mamba2: dt_limit must be a pair (lo, hi or None), got {dt_limit!r}")
        check_range("Mamba2", "dt_limit[0]", dt_limit[0], 0)
        if dt_limit[1] is not None and dt_limit[1] != math.inf:
            check_range("Mamba2", "dt_limit[1]", dt_limit[1], dt_limit[0], lo_name="dt_limit[0]")
        fk = {"device": device, "dtype": dtype}
        self.d_model, self.d_state, self.d_conv, self.expand = d_model, d_state, d_conv, expand
        self.conv_init = conv_init
        self.d_inner, self.d_ssm, self.headdim, self.nheads, self.ngroups = d_inner, d_ssm_, headdim, nheads, ngroups
        self.d_mlp = d_inner - d_ssm_
        self.A_init_range, self.D_has_hdim = tuple(A_init_range), D_has_hdim
        self.rmsnorm, self.norm_before_gate = rmsnorm, norm_before_gate
        self.dt_min, self.dt_max, self.dt_init_floor = dt_min, dt_max, dt_init_floor
        self.dt_limit = (float(dt_limit[0]), math.inf if dt_limit[1] is None else float(dt_limit[1]))
        self.chunk_size, self.layer_idx = chunk_size, layer_idx

        self.conv_dim = d_ssm_ + 2 * ngroups * d_state
        self.in_proj = nn.Linear(d_model, 2 * d_inner + 2 * ngroups * d_state + nheads, bias=bias, **fk)
        self.conv1d = nn.Conv1d(self.conv_dim, self.conv_dim, d_conv, groups=self.conv_dim, padding=d_conv - 1,
                                bias=conv_bias, **fk)
        # The SSM's dynamics stay fp32 whatever the module dtype (keep_in_fp32).
        self.dt_bias = nn.Parameter(torch.empty(nheads, device=device, dtype=torch.float32))
        self.A_log = nn.Parameter(torch.empty(nheads, device=device, dtype=torch.float32))
        self.D = nn.Parameter(torch.empty(d_ssm_ if D_has_hdim else nheads, device=device, dtype=torch.float32))
        if rmsnorm:
            self.norm = RMSNormGated(d_ssm_, eps=rmsnorm_eps, norm_before_gate=norm_before_gate,
                                     group_size=d_ssm_ // ngroups, **fk)
        self.out_proj = nn.Linear(d_inner, d_model, bias=bias, **fk)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """mamba_ssm's initialisation: dt_bias = softplus^-1 of log-uniform [dt_min, dt_max], A uniform in
        A_init_range, D = 1, norm weight 1."""
        self.in_proj.reset_parameters()
        self.out_proj.reset_parameters()
        self.conv1d.reset_parameters()
        with torch.no_grad():
            if self.conv_init is not None:
                self.conv1d.weight.uniform_(-self.conv_init, self.conv_init)
            lo, hi = math.log(self.dt_min), math.log(self.dt_max)
            dt = torch.exp(torch.rand(self.nheads, device=self.D.device) * (hi - lo) + lo)
            dt = dt.clamp(min=self.dt_init_floor)
            self.dt_bias.copy_(dt + torch.log(-torch.expm1(-dt)))  # softplus^-1(dt)
            A = torch.empty(self.nheads, device=self.A_log.device).uniform_(*self.A_init_range)
            self.A_log.copy_(torch.log(A))
            self.D.fill_(1.0)
            if self.rmsnorm:
                self.norm.weight.fill_(1.0)

    def allocate_inference_cache(self, batch_size: int, max_seqlen: int, dtype: torch.dtype | None = None,
                                 **kwargs: Any) -> Mamba2Cache:
        """A zeroed ``Mamba2Cache`` for ``batch_size`` sequences (``max_seqlen`` does not change its size)."""
        if self.bidirectional:
            raise ValueError("Mamba2(bidirectional=True) is not causal and keeps no cache")
        check_allocation("Mamba2", batch_size, max_seqlen, dtype)
        device = self.in_proj.weight.device
        state_dtype = torch.promote_types(torch.float32, self.in_proj.weight.dtype)
        conv_dtype = dtype or self.in_proj.weight.dtype
        return Mamba2Cache.empty(
            batch_size, max_seqlen, device=device,
            conv_state=torch.zeros(batch_size, self.d_conv - 1, self.conv_dim, device=device, dtype=conv_dtype),
            ssm_state=torch.zeros(batch_size, self.nheads, self.headdim, self.d_state, device=device,
                                  dtype=state_dtype),
        )

    def forward(self, x: torch.Tensor, cache: Mamba2Cache | None = None, *,
                lengths: torch.Tensor | None = None, cu_seqlens: torch.Tensor | None = None) -> torch.Tensor:
        """x [B, T, D] -> y [B, T, D].

        Args:
            x (Tensor): [B, T, D] input (fp32, bf16 or fp16; the state is fp32).
            cache (Mamba2Cache | None): continue from and update this cache (prefill, or a decode step
                when T = 1). Default: None.
            lengths (Tensor | None): [B] valid prefix of each row; outputs past it are 0 and the cache
                advances by it. Default: None.
            cu_seqlens (Tensor | None): [S + 1] offsets of S sequences packed in x [1, total, D]; the
                conv and the state restart at every boundary, so each sequence gets its own outputs (a
                cache then holds S rows, one per sequence). Default: None.

        Raises:
            TypeError / ValueError: bad shapes or dtypes, a cache of the wrong type or batch size.
        """
        if cache is not None and self.bidirectional:
            raise ValueError("Mamba2(bidirectional=True) is not causal and cannot run with a cache")
        cp = mixer_context("Mamba2", cache)  # None: the whole sequence is here
        if cp is not None and self.bidirectional:
            raise ValueError("Mamba2(bidirectional=True) does not run on a time chunk: its reversed pass reads the "
                             "whole row; call it outside context_parallel (run_mixer gathers the sequence for it)")
        if cu_seqlens is not None:
            return self._forward_packed(x, cache, cu_seqlens, lengths, cp)
        x, in_dtype = check_call("Mamba2", x, self.d_model, self.in_proj.weight, lengths if cp is None else None,
                                 cache, Mamba2Cache)
        Bsz, T, _ = x.shape
        local = chunk_lengths("Mamba2", lengths, Bsz, T, cp)  # lengths of this chunk (all of it without cp)
        if is_empty(x):  # the empty rule (layers/checks.py)
            return x.new_zeros(x.shape, dtype=in_dtype)
        z0, x0, z, xBC, dt = self.in_proj(x).split(
            [self.d_mlp, self.d_mlp, self.d_ssm, self.conv_dim, self.nheads], dim=-1)
        weight, acc = self.conv1d.weight[:, 0], self._acc(x)
        A = -torch.exp(self.A_log.to(acc))
        if cache is not None and T == 1 and lengths is None:
            xBC = causal_conv1d_update(xBC[:, 0], cache.conv_state, weight, self.conv1d.bias, activation="silu")
            xs, Bm, Cm = self._split(xBC)
            y = ssd_state_update(cache.ssm_state, xs, dt[:, 0], A, Bm, Cm, self._D(acc),
                                 None if self.rmsnorm else z[:, 0].unflatten(-1, (self.nheads, self.headdim)),
                                 dt_bias=self.dt_bias.to(acc), dt_softplus=True, dt_limit=self.dt_limit)
            cache.advance(1)
            return self._out(y.flatten(-2).unsqueeze(1), z, z0, x0).to(in_dtype)

        conv_init = None if cache is None else cache.conv_state
        if cp is not None:  # this rank's chunk continues from the previous rank's conv inputs
            conv_init = conv_halo(xBC, self.d_conv, cp=cp)
        xBC, conv_final = causal_conv1d(xBC, weight, self.conv1d.bias, activation="silu", initial_state=conv_init,
                                        lengths=local)
        xs, Bm, Cm = self._split(xBC)
        gate = None if self.rmsnorm else z.unflatten(-1, (self.nheads, self.headdim))
        scan = ssd if cp is None else functools.partial(ssd_cp, cp=cp)
        y, final = scan(xs, dt, A, Bm, Cm, self._D(acc), gate,
                        dt_bias=self.dt_bias.to(acc), dt_softplus=True, dt_limit=self.dt_limit,
                        initial_state=None if cache is None else cache.ssm_state, return_final_state=True,
                        lengths=lengths, chunk_size=self.chunk_size)
        if self.bidirectional:
            y = y + self._reversed_pass(xs, dt, A, Bm, Cm, gate, lengths=lengths, cu_seqlens=None)
        if cache is not None:
            cache.conv_state.copy_(conv_final)
            cache.ssm_state.copy_(final)
            cache.advance(T if lengths is None else lengths.to(cache.seqlen_offset))
        out = self._out(y.flatten(-2), z, z0, x0)
        valid = lengths_mask(local, T, x.device)
        if valid is not None:  # padded outputs are 0 (the gate and out_proj's bias would move them)
            out = torch.where(valid.unsqueeze(-1), out, torch.zeros((), dtype=out.dtype, device=out.device))
        return out.to(in_dtype)

    def _forward_packed(self, x: torch.Tensor, cache: Mamba2Cache | None, cu_seqlens: torch.Tensor,
                        lengths: torch.Tensor | None, cp=None) -> torch.Tensor:
        """``forward`` on sequences packed in x [1, total, D] (``cu_seqlens``): no unpacking anywhere. Under
        a context-parallel group ``cp``, x is this rank's chunk and ``cu_seqlens`` the full sequence's."""
        if lengths is not None:
            raise ValueError("Mamba2: pass either lengths or cu_seqlens, not both")
        x, in_dtype = check_call("Mamba2", x, self.d_model, self.in_proj.weight, None, None, Mamba2Cache)
        if x.shape[0] != 1:
            raise ValueError(f"Mamba2: with cu_seqlens x must be [1, total, D], got {tuple(x.shape)}")
        if cache is not None:
            check_cache("Mamba2", cache, Mamba2Cache, cu_seqlens.numel() - 1, x.device)
        if is_empty(x):
            return x.new_zeros(x.shape, dtype=in_dtype)
        z0, x0, z, xBC, dt = self.in_proj(x).split(
            [self.d_mlp, self.d_mlp, self.d_ssm, self.conv_dim, self.nheads], dim=-1)
        acc = self._acc(x)
        conv_init, conv_cu = None if cache is None else cache.conv_state, cu_seqlens
        if cp is not None:  # the documents' pieces in this chunk; the continuing one takes the halo
            conv_init = conv_halo(xBC, self.d_conv, cu_seqlens=cu_seqlens, cp=cp)
            conv_cu = local_cu_seqlens(cu_seqlens, x.shape[1], cp)
        xBC, conv_final = causal_conv1d(xBC, self.conv1d.weight[:, 0], self.conv1d.bias, activation="silu",
                                        initial_state=conv_init, cu_seqlens=conv_cu)
        xs, Bm, Cm = self._split(xBC)
        A = -torch.exp(self.A_log.to(acc))
        gate = None if self.rmsnorm else z.unflatten(-1, (self.nheads, self.headdim))
        scan = ssd if cp is None else functools.partial(ssd_cp, cp=cp)
        y, final = scan(xs, dt, A, Bm, Cm, self._D(acc), gate,
                        dt_bias=self.dt_bias.to(acc), dt_softplus=True, dt_limit=self.dt_limit,
                        initial_state=None if cache is None else cache.ssm_state, return_final_state=True,
                        cu_seqlens=cu_seqlens, chunk_size=self.chunk_size)
        if self.bidirectional:
            y = y + self._reversed_pass(xs, dt, A, Bm, Cm, gate, lengths=None, cu_seqlens=cu_seqlens)
        if cache is not None:
            cache.conv_state.copy_(conv_final)
            cache.ssm_state.copy_(final)
            cache.advance(cu_seqlens.diff().to(cache.seqlen_offset))
        return self._out(y.flatten(-2), z, z0, x0).to(in_dtype)

    def _reversed_pass(self, xs, dt, A, Bm, Cm, gate, *, lengths, cu_seqlens) -> torch.Tensor:
        # The SSD scan over each row's valid prefix (or each packed sequence) backwards, reversed back;
        # the D skip is in the forward pass only.
        def rev(t):
            return None if t is None else reverse_sequences(t, lengths, cu_seqlens)

        y = ssd(rev(xs), rev(dt), A, rev(Bm), rev(Cm), None, rev(gate), dt_bias=self.dt_bias.to(A.dtype),
                dt_softplus=True, dt_limit=self.dt_limit, lengths=lengths, cu_seqlens=cu_seqlens,
                chunk_size=self.chunk_size)
        return rev(y)

    @staticmethod
    def _acc(t: torch.Tensor) -> torch.dtype:
        # The SSM's parameters are used in fp32 at least (float64 for float64 inputs).
        return torch.promote_types(torch.float32, t.dtype)

    def _D(self, acc: torch.dtype) -> torch.Tensor:
        D = self.D.to(acc)
        return D.view(self.nheads, self.headdim) if self.D_has_hdim else D

    def _split(self, xBC: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        # [..., conv_dim] -> x [..., H, P], B and C [..., G, N]
        xs, Bm, Cm = xBC.split([self.d_ssm, self.ngroups * self.d_state, self.ngroups * self.d_state], dim=-1)
        return (xs.unflatten(-1, (self.nheads, self.headdim)), Bm.unflatten(-1, (self.ngroups, self.d_state)),
                Cm.unflatten(-1, (self.ngroups, self.d_state)))

    def _out(self, y: torch.Tensor, z: torch.Tensor, z0: torch.Tensor, x0: torch.Tensor) -> torch.Tensor:
        if self.rmsnorm:
            y = self.norm(y, z)
        if self.d_mlp > 0:
            y = torch.cat([F.silu(z0) * x0, y], dim=-1)
        return self.out_proj(y)

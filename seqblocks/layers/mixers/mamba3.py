"""Mamba-3: the trapezoidal, rotary SSM mixer of Lahoti et al. (2026), with mamba_ssm 2.3.2's arguments,
defaults and parameter names.

    z, x, B, C, dd_dt, dd_A, trap, angles = in_proj(u).split(...)      # no conv, unlike Mamba-2
    B, C  = B_norm(B), C_norm(C)                                         # RMSNorm over N, then + B_bias / C_bias
    dt    = softplus(dd_dt + dt_bias);  A = min(-softplus(dd_A), -A_floor)   # both data-dependent, per head
    y     = mamba3(C, B, x, A dt, dt, trap, C_bias, B_bias, angles, D, z)    # trapezoid + rotation (ops.mamba3)
    y     = RMSNormGated(y, z)                                           # only with is_outproj_norm
    out   = out_proj(y)

MIMO (``is_mimo``): B and C get ``mimo_rank`` ranks, x / z are lifted by ``mimo_x`` / ``mimo_z`` and the
ranks are folded back by ``mimo_o``; the state stays [H, P, N].

Parameter names are mamba_ssm's (``in_proj``, ``dt_bias``, ``B_bias``, ``C_bias``, ``B_norm.weight``,
``C_norm.weight``, ``mimo_x``, ``mimo_z``, ``mimo_o``, ``D``, ``norm.weight``, ``out_proj``), so a
mamba_ssm ``Mamba3`` state dict loads unchanged.

Shapes: B batch, T time, D model width, H heads, P head width, N state, G groups of B / C, R MIMO rank,
S rotary angles.
"""

from __future__ import annotations

import dataclasses
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
from seqblocks.layers.mixers.mamba2 import RMSNormGated
from seqblocks.ops.mamba3 import Mamba3State, mamba3, mamba3_step
from seqblocks.registry import MIXERS

__all__ = ["Mamba3", "Mamba3Cache"]


@dataclasses.dataclass(eq=False)
class Mamba3Cache(Cache):
    """Decoding state of ``Mamba3`` (all fp32; float64 for a float64 module).

    Attributes:
        angle_state (Tensor): [B, H, S] accumulated rotation angles.
        ssm_state (Tensor): [B, H, P, N] the recurrent state.
        k_state (Tensor): [B, R, H, N] the last token's rotated, biased B (R = 1 for SISO).
        v_state (Tensor): [B, H, P] the last token's x.
    """

    angle_state: torch.Tensor = None
    ssm_state: torch.Tensor = None
    k_state: torch.Tensor = None
    v_state: torch.Tensor = None

    def state(self) -> Mamba3State:
        """The four tensors as the op's ``Mamba3State`` (the same storage)."""
        return Mamba3State(self.angle_state, self.ssm_state, self.k_state, self.v_state)


@MIXERS.register("Mamba3")
class Mamba3(Mixer):
    """Mamba-3 mixer: mamba_ssm's ``Mamba3`` arguments and defaults.

    Args:
        d_model (int): model width D.
        d_state (int): state size N per head channel (even). Default: 128.
        expand (int): inner width expand * d_model. Default: 2.
        headdim (int): head width P, dividing the inner width. Default: 64.
        ngroups (int): G groups of B / C, dividing the head count. Default: 1.
        rope_fraction (float): fraction of the N channels that rotate, 0.5 or 1.0. Default: 0.5.
        dt_min, dt_max (float): range of the initial step (log-uniform). Default: 0.001, 0.1.
        dt_init_floor (float): lower clamp of the initial step. Default: 1e-4.
        A_floor (float): the decay rate is at least this: A = min(-softplus(dd_A), -A_floor). Default: 1e-4.
        is_outproj_norm (bool): a gated RMSNorm (per head) before out_proj instead of the gate inside
            the scan. Default: False.
        is_mimo (bool): multi-input multi-output state update of rank ``mimo_rank``. Default: False.
        mimo_rank (int): the MIMO rank R (ignored unless is_mimo). Default: 4.
        chunk_size (int): chunk length of the scan. Default: 64.
        bidirectional (bool): add a reversed pass (a seqblocks extra, not in mamba_ssm): the same
            projections and scan run on each sequence reversed, the outputs summed before the gate's
            norm and out_proj, the D skip added once. Not causal, so it keeps no cache. Default: False.
        layer_idx (int | None): position in the stack. Default: None.
        device, dtype: parameter placement. Default: None.

    Raises:
        ValueError: non-positive sizes, headdim not dividing the inner width, ngroups not dividing
            the heads, an odd d_state, rope_fraction not 0.5 / 1.0 or leaving no angle, bad dt ranges.
    """

    # Kept fp32 under a bf16 / fp16 cast of the module (Mixer.keep_in_fp32), as mamba_ssm creates them.
    keep_in_fp32 = ("dt_bias", "B_bias", "C_bias", "D", "mimo_x", "mimo_z", "mimo_o")

    inputs = frozenset({"lengths", "cu_seqlens"})

    def __init__(
        self,
        d_model: int,
        d_state: int = 128,
        expand: int = 2,
        headdim: int = 64,
        ngroups: int = 1,
        rope_fraction: float = 0.5,
        dt_min: float = 0.001,
        dt_max: float = 0.1,
        dt_init_floor: float = 1e-4,
        A_floor: float = 1e-4,
        is_outproj_norm: bool = False,
        is_mimo: bool = False,
        mimo_rank: int = 4,
        chunk_size: int = 64,
        bidirectional: bool = False,
        layer_idx: int | None = None,
        device=None,
        dtype=None,
    ) -> None:
        super().__init__()
        check_positive("Mamba3", d_model=d_model, d_state=d_state, expand=expand, headdim=headdim,
                       ngroups=ngroups, mimo_rank=mimo_rank, chunk_size=chunk_size)
        d_inner = expand * d_model
        if d_inner % headdim:
            raise ValueError(f"Mamba3: headdim={headdim} must divide the inner width expand * d_model = {d_inner}")
        nheads = d_inner // headdim
        if nheads % ngroups:
            raise ValueError(f"Mamba3: ngroups={ngroups} must divide the number of heads {nheads}")
        if d_state % 2:
            raise ValueError(f"Mamba3: d_state={d_state} must be even (its channels rotate in pairs)")
        if rope_fraction not in (0.5, 1.0):
            raise ValueError(f"Mamba3: rope_fraction must be 0.5 or 1.0, got {rope_fraction!r}")
        rotated = int(d_state * rope_fraction)
        rotated -= rotated % 2
        if rotated // 2 == 0:
            raise ValueError(f"Mamba3: d_state={d_state} with rope_fraction={rope_fraction} leaves no angle")
        check_range("Mamba3", "dt_min", dt_min, 0, lo_open=True)
        check_range("Mamba3", "dt_max", dt_max, dt_min, lo_name="dt_min")
        check_range("Mamba3", "dt_init_floor", dt_init_floor, 0)
        check_range("Mamba3", "A_floor", A_floor, 0)
        fk = {"device": device, "dtype": dtype}
        self.d_model, self.d_state, self.expand, self.headdim, self.ngroups = d_model, d_state, expand, headdim, ngroups
        self.d_inner, self.nheads = d_inner, nheads
        self.rope_fraction, self.num_rope_angles = rope_fraction, rotated // 2
        self.dt_min, self.dt_max, self.dt_init_floor, self.A_floor = dt_min, dt_max, dt_init_floor, A_floor
        self.is_outproj_norm, self.is_mimo = is_outproj_norm, is_mimo
        self.mimo_rank = mimo_rank if is_mimo else 1  # mamba_ssm's rule: SISO is rank 1
        self.chunk_size, self.layer_idx = chunk_size, layer_idx
        self.bidirectional = bool(bidirectional)
        self.causal = not self.bidirectional

        R, S = self.mimo_rank, self.num_rope_angles
        self.split_sizes = [d_inner, d_inner, d_state * ngroups * R, d_state * ngroups * R, nheads, nheads, nheads, S]
        self.in_proj = nn.Linear(d_model, sum(self.split_sizes), bias=False, **fk)
        # The SSM's parameters stay fp32 whatever the module dtype (keep_in_fp32), as in mamba_ssm.
        p32 = {"device": device, "dtype": torch.float32}
        self.dt_bias = nn.Parameter(torch.empty(nheads, **p32))
        self.B_bias = nn.Parameter(torch.empty(nheads, R, d_state, **p32))
        self.C_bias = nn.Parameter(torch.empty(nheads, R, d_state, **p32))
        self.B_norm = RMSNormGated(d_state, eps=1e-5, **fk)
        self.C_norm = RMSNormGated(d_state, eps=1e-5, **fk)
        if is_mimo:
            self.mimo_x = nn.Parameter(torch.empty(nheads, R, headdim, **p32))
            self.mimo_z = nn.Parameter(torch.empty(nheads, R, headdim, **p32))
            self.mimo_o = nn.Parameter(torch.empty(nheads, R, headdim, **p32))
        self.D = nn.Parameter(torch.empty(nheads, **p32))
        if is_outproj_norm:
            self.norm = RMSNormGated(d_inner, eps=1e-5, norm_before_gate=True, group_size=headdim, **fk)
        self.out_proj = nn.Linear(d_inner, d_model, bias=False, **fk)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """mamba_ssm's initialisation: dt_bias = softplus^-1 of log-uniform [dt_min, dt_max], B_bias = C_bias
        = 1, D = 1, norm weights 1, mimo_x = mimo_o = 1 / R, mimo_z = 1, nn.Linear's default for the projections."""
        self.in_proj.reset_parameters()
        self.out_proj.reset_parameters()
        with torch.no_grad():
            lo, hi = math.log(self.dt_min), math.log(self.dt_max)
            dt = torch.exp(torch.rand(self.nheads, device=self.D.device) * (hi - lo) + lo)
            dt = dt.clamp(min=self.dt_init_floor)
            self.dt_bias.copy_(dt + torch.log(-torch.expm1(-dt)))  # softplus^-1(dt)
            self.B_bias.fill_(1.0)
            self.C_bias.fill_(1.0)
            self.B_norm.weight.fill_(1.0)
            self.C_norm.weight.fill_(1.0)
            if self.is_mimo:
                self.mimo_x.fill_(1.0 / self.mimo_rank)
                self.mimo_z.fill_(1.0)
                self.mimo_o.fill_(1.0 / self.mimo_rank)
            self.D.fill_(1.0)
            if self.is_outproj_norm:
                self.norm.weight.fill_(1.0)

    def allocate_inference_cache(self, batch_size: int, max_seqlen: int, dtype: torch.dtype | None = None,
                                 **kwargs: Any) -> Mamba3Cache:
        """A zeroed ``Mamba3Cache`` for ``batch_size`` sequences (``max_seqlen`` does not change its size)."""
        check_allocation("Mamba3", batch_size, max_seqlen, dtype)
        if self.bidirectional:
            raise ValueError("Mamba3(bidirectional=True) is not causal and keeps no cache")
        dev = self.in_proj.weight.device
        sd = torch.promote_types(torch.float32, self.in_proj.weight.dtype)
        H, P, N, R, S = self.nheads, self.headdim, self.d_state, self.mimo_rank, self.num_rope_angles
        return Mamba3Cache.empty(
            batch_size, max_seqlen, device=dev,
            angle_state=torch.zeros(batch_size, H, S, device=dev, dtype=sd),
            ssm_state=torch.zeros(batch_size, H, P, N, device=dev, dtype=sd),
            k_state=torch.zeros(batch_size, R, H, N, device=dev, dtype=sd),
            v_state=torch.zeros(batch_size, H, P, device=dev, dtype=sd),
        )

    def forward(self, x: torch.Tensor, cache: Mamba3Cache | None = None, *, lengths: torch.Tensor | None = None,
                cu_seqlens: torch.Tensor | None = None) -> torch.Tensor:
        """x [B, T, D] -> y [B, T, D].

        Args:
            x (Tensor): [B, T, D] input (fp32, bf16 or fp16; the state is fp32).
            cache (Mamba3Cache | None): continue from and update this cache (prefill, or a decode step
                when T = 1). With ``cu_seqlens`` it holds one row per packed sequence. Default: None.
            lengths (Tensor | None): [B] valid prefix of each row; outputs past it are 0 and the cache
                advances by it. Default: None.
            cu_seqlens (Tensor | None): [num_seqs + 1] offsets of sequences packed in x [1, total, D];
                the state restarts at each. Default: None.

        Raises:
            TypeError / ValueError: bad shapes or dtypes, a cache of the wrong type or batch size,
                both lengths and cu_seqlens.
        """
        packed = cu_seqlens is not None
        if cache is not None and self.bidirectional:
            raise ValueError("Mamba3(bidirectional=True) is not causal and cannot run with a cache")
        x, in_dtype = check_call("Mamba3", x, self.d_model, self.in_proj.weight, lengths,
                                 None if packed else cache, Mamba3Cache)
        if packed and cache is not None:
            rows = cu_seqlens.numel() - 1 if isinstance(cu_seqlens, torch.Tensor) else 0
            check_cache("Mamba3", cache, Mamba3Cache, rows, x.device)
        Bsz, T, _ = x.shape
        if is_empty(x):  # the empty rule (layers/checks.py)
            return x.new_zeros(x.shape, dtype=in_dtype)
        H, P, N, R, G = self.nheads, self.headdim, self.d_state, self.mimo_rank, self.ngroups
        z, xs, Bm, Cm, dd_dt, dd_A, trap, ang = self.in_proj(x).split(self.split_sizes, dim=-1)
        acc = torch.promote_types(torch.float32, x.dtype)
        Bm = self.B_norm(Bm.unflatten(-1, (R, G, N)))                              # [B, T, R, G, N]
        Cm = self.C_norm(Cm.unflatten(-1, (R, G, N)))
        A = (-F.softplus(dd_A.to(acc))).clamp(max=-self.A_floor)                  # [B, T, H]
        dt = F.softplus(dd_dt.to(acc) + self.dt_bias.to(acc))
        angles = ang.to(acc).unsqueeze(-2).expand(Bsz, T, H, self.num_rope_angles)  # shared by the heads
        xs, z = xs.unflatten(-1, (H, P)), z.unflatten(-1, (H, P))
        gate = None if self.is_outproj_norm else z
        mimo = {}
        if self.is_mimo:
            mimo = {"mimo_v": self.mimo_x, "mimo_z": None if self.is_outproj_norm else self.mimo_z,
                    "mimo_o": None if self.is_outproj_norm else self.mimo_o}
        params = (self.C_bias, self.B_bias)
        if cache is not None and T == 1 and lengths is None and not packed:
            y = mamba3_step(cache.state(), Cm[:, 0], Bm[:, 0], xs[:, 0], (A * dt)[:, 0], dt[:, 0], trap[:, 0],
                            *params, angles[:, 0], self.D, None if gate is None else gate[:, 0], **mimo)
            y = y.unsqueeze(1)
            cache.advance(1)
        else:
            y, final = mamba3(Cm, Bm, xs, A * dt, dt, trap, *params, angles, self.D, gate, **mimo,
                              initial_state=None if cache is None else cache.state(), return_final_state=True,
                              lengths=lengths, cu_seqlens=cu_seqlens, chunk_size=self.chunk_size)
            if self.bidirectional:
                y = y + self._reversed_pass(Cm, Bm, xs, A * dt, dt, trap, angles, gate, mimo, lengths=lengths,
                                            cu_seqlens=cu_seqlens)
            if cache is not None:
                for buf, new in zip(cache.state(), final):
                    buf.copy_(new)
                cache.advance(cu_seqlens.diff().to(cache.seqlen_offset) if packed
                              else T if lengths is None else lengths.to(cache.seqlen_offset))
        out = self.out_proj(self._post(y, z).to(x.dtype))
        valid = lengths_mask(lengths, T, x.device)
        if valid is not None:  # padded outputs are 0
            out = torch.where(valid.unsqueeze(-1), out, torch.zeros((), dtype=out.dtype, device=out.device))
        return out.to(in_dtype)

    def _reversed_pass(self, *inputs, lengths, cu_seqlens) -> torch.Tensor:
        # The scan over each sequence reversed (its valid prefix, or each packed sequence), reversed back.
        def rev(t):
            return None if t is None else reverse_sequences(t, lengths, cu_seqlens)
        Cm, Bm, xs, adt, dt, trap, angles, gate, mimo = inputs
        y = mamba3(*map(rev, (Cm, Bm, xs, adt, dt, trap)), self.C_bias, self.B_bias, rev(angles), None, rev(gate),
                   **mimo, lengths=lengths, cu_seqlens=cu_seqlens, chunk_size=self.chunk_size)
        return rev(y)

    def _post(self, y: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        # y [B, T, H, P] (or [B, T, R, H, P] for MIMO with the out-projection norm) -> [B, T, H P]
        if not self.is_outproj_norm:
            return y.flatten(-2)
        if not self.is_mimo:
            return self.norm(y.flatten(-2), z.flatten(-2))
        acc = torch.promote_types(torch.float32, y.dtype)
        zr = torch.einsum("bthp,hrp->btrhp", z.to(acc), self.mimo_z.to(acc))
        y = self.norm(y.to(acc).flatten(-2), zr.flatten(-2)).unflatten(-1, (self.nheads, self.headdim))
        return torch.einsum("btrhp,hrp->bthp", y, self.mimo_o.to(acc)).flatten(-2)

"""Centaurus (Pei 2025, "Let SSMs be ConvNets: state-space modeling with optimal tensor contractions").

An SSM whose state is a tensor: N state channels, each with M complex sub-states that are read out
through a real mixing matrix E, like the taps of a convolution:

    s_t        = B u_t                               # [N] real: input channels -> state channels
    x_t[n, m]  = Ā[n, m] x_{t-1}[n, m] + γ[n, m] s_t[n]      (Ā, γ) = discretize(A[n, m], Δ_n)
    w_t[n]     = sum_m E[n, m] Re(x_t[n, m])
    y_t        = C w_t

so each state channel n is a real convolution with ``K_n[l] = sum_m E[n, m] Re(γ[n, m] Ā[n, m]^l)``.
The variants (``variant``) differ in how B and C connect channels:

- ``neck``: dense B [N, H] and C [H, N] (a bottleneck of N = d_state channels).
- ``dws``: depthwise, one state channel per model channel (N = H), B and C diagonal.
- ``full``: one state channel per (output, input) pair (N = H * H), each with its own scalar B and C.
- ``pointwise``: no E; every one of the N * M sub-states is its own lane with dense B [N*M, H] and
  C [H, N*M] (also accepted as "pw" / "s5").

Shapes: B batch, T time, H model width (= D), N state channels, M sub-states.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from seqblocks.layers.checks import check_range
from seqblocks.layers.mixers._lti import LTIMixer, complex_dtype, diag_states
from seqblocks.ops.discretize import DISCRETIZATIONS, discretize
from seqblocks.ops.fftconv import fftconv
from seqblocks.ops.ssm_conv_kernels import ssm_powers
from seqblocks.registry import MIXERS

__all__ = ["Centaurus", "CENTAURUS_VARIANTS"]

CENTAURUS_VARIANTS = ("neck", "pointwise", "dws", "full")
_ALIASES = {"pw": "pointwise", "s5": "pointwise"}


@MIXERS.register("Centaurus")
class Centaurus(LTIMixer):
    """Centaurus SSM with sub-state mixing, in one of the variants neck / pointwise / dws / full.

    Args:
        d_model (int): model width H.
        d_state (int): state channels N of ``neck`` and ``pointwise`` (``dws`` uses N = H, ``full``
            N = H * H). Default: 64.
        sub_state_dim (int): sub-states M per state channel. Default: 8.
        discretization (str): "zoh", "bilinear", "dirac" or "mamba". Default: "zoh".
        mode (str): "conv" or "scan"; a variant name ("neck", "pointwise", "pw", "s5", "dws", "full")
            is accepted here too and selects the variant (older code passes it as ``mode``).
            Default: "conv".
        variant (str | None): "neck", "pointwise", "dws" or "full". Default: None ("neck").
        dt_min (float): smallest initial step (log-spaced over state channels). Default: 0.001.
        dt_max (float): largest initial step. Default: 0.1.
        bidirectional (bool): add a reversed pass with its own C. Default: False.
        layer_idx, device, dtype: as every mixer.

    Raises:
        ValueError: unknown variant / discretization / mode, conflicting ``mode`` and ``variant``,
            non-positive sizes.
    """

    # Kept fp32 under a bf16 / fp16 cast of the module (the poles and step sizes; Mixer.keep_in_fp32).
    keep_in_fp32 = ("A_real", "A_imag", "log_delta")

    def __init__(self, d_model: int, d_state: int = 64, sub_state_dim: int = 8, discretization: str = "zoh",
                 mode: str = "conv", *, variant: str | None = None, dt_min: float = 0.001, dt_max: float = 0.1,
                 bidirectional: bool = False, layer_idx: int | None = None, device=None, dtype=None) -> None:
        super().__init__()
        mode = _ALIASES.get(mode, mode)
        if mode in CENTAURUS_VARIANTS:
            if variant is not None and _ALIASES.get(variant, variant) != mode:
                raise ValueError(f"Centaurus: mode={mode!r} names a variant that conflicts with variant={variant!r}")
            variant, mode = mode, "conv"
        variant = _ALIASES.get(variant, variant) if variant is not None else "neck"
        if variant not in CENTAURUS_VARIANTS:
            raise ValueError(f"Centaurus: unknown variant {variant!r}; expected one of {CENTAURUS_VARIANTS}")
        self._init_common(d_model, mode, bidirectional)
        if discretization not in DISCRETIZATIONS:
            raise ValueError(f"Centaurus: unknown discretization {discretization!r}; expected one of {DISCRETIZATIONS}")
        for name, v in (("d_state", d_state), ("sub_state_dim", sub_state_dim)):
            if not isinstance(v, int) or v <= 0:
                raise ValueError(f"Centaurus: {name} must be a positive int, got {v!r}")
        check_range("Centaurus", "dt_min", dt_min, 0.0, lo_open=True)
        check_range("Centaurus", "dt_max", dt_max, dt_min, lo_name="dt_min")
        H = d_model
        self.variant = variant
        self.discretization = discretization
        self.sub_state_dim = M = sub_state_dim
        self.num_channels = N = {"neck": d_state, "pointwise": d_state, "dws": H, "full": H * H}[variant]
        self.d_state = d_state
        self.dt_min, self.dt_max = float(dt_min), float(dt_max)
        self.layer_idx = layer_idx
        kw = {"device": device, "dtype": dtype}
        self.A_real = nn.Parameter(torch.empty(N, M, **kw))  # Re(A) = -exp(A_real)
        self.A_imag = nn.Parameter(torch.empty(N, M, **kw))
        self.log_delta = nn.Parameter(torch.empty(N, **kw))
        if variant != "pointwise":
            self.E = nn.Parameter(torch.empty(N, M, **kw))
        b_shape, c_shape = {"neck": ((N, H), (H, N)), "pointwise": ((N * M, H), (H, N * M)),
                            "dws": ((H,), (H,)), "full": ((N,), (N,))}[variant]
        self.B = nn.Parameter(torch.empty(b_shape, **kw))
        self.C = nn.Parameter(torch.empty(c_shape, **kw))
        if self.bidirectional:
            self.C_bwd = nn.Parameter(torch.empty(c_shape, **kw))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        N, M, H = self.num_channels, self.sub_state_dim, self.d_model
        with torch.no_grad():
            # Sub-state m of every channel starts at -1/2 + i π m / M: frequencies spread over [0, π).
            self.A_real.fill_(math.log(0.5))
            self.A_imag.copy_((torch.arange(M, dtype=torch.float64) * math.pi / M).expand(N, -1))
            self.log_delta.copy_(torch.linspace(math.log(self.dt_min), math.log(self.dt_max), N, dtype=torch.float64))
            if self.variant != "pointwise":
                self.E.normal_(0.0, math.sqrt(2.0))
            Cs = [self.C] + ([self.C_bwd] if self.bidirectional else [])
            if self.variant == "neck":
                nn.init.kaiming_uniform_(self.B, a=math.sqrt(5))
                for C in Cs:
                    nn.init.kaiming_uniform_(C, a=math.sqrt(5))
            elif self.variant == "pointwise":
                self.B.fill_(1.0 / math.sqrt(H))
                for C in Cs:
                    C.normal_(0.0, math.sqrt(2.0 / (N * M)))
            elif self.variant == "dws":
                self.B.fill_(1.0)
                for C in Cs:
                    C.fill_(1.0)
            else:
                self.B.normal_(0.0, math.sqrt(2.0 / H))
                for C in Cs:
                    C.normal_(0.0, math.sqrt(2.0 / N))

    def state_shape(self) -> tuple[int, ...]:
        return (self.num_channels, self.sub_state_dim)

    def discrete(self, dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, torch.Tensor]:
        """``(log Ā [N, M], γ [N, M])`` complex."""
        A = torch.complex(-torch.exp(self.A_real.to(dtype)), self.A_imag.to(dtype))
        dt = torch.exp(self.log_delta.to(dtype))[:, None]
        A_bar, gamma = discretize(A, dt, self.discretization)
        log_lam = dt * A if self.discretization != "bilinear" else torch.log(A_bar)
        return log_lam, gamma

    def _inputs(self, u: torch.Tensor) -> torch.Tensor:
        """s [B, T, N] (or [B, T, N, M] for pointwise) real."""
        B = self.B.to(u.dtype)
        H = self.d_model
        if self.variant == "neck":
            return u @ B.T
        if self.variant == "pointwise":
            return (u @ B.T).unflatten(-1, (self.num_channels, self.sub_state_dim))
        if self.variant == "dws":
            return u * B
        return (u.unsqueeze(-2) * B.view(H, H)).flatten(-2)  # channel (o, i) reads input i

    def _outputs(self, w: torch.Tensor, reverse: bool) -> torch.Tensor:
        """w [B, T, N] (or [B, T, N, M]) real -> y [B, T, H]."""
        C = (self.C_bwd if reverse else self.C).to(w.dtype)
        H = self.d_model
        if self.variant == "neck":
            return w @ C.T
        if self.variant == "pointwise":
            return w.flatten(-2) @ C.T
        if self.variant == "dws":
            return w * C
        return (w.unflatten(-1, (H, H)) * C.view(H, H)).sum(-1)  # output o sums its channels (o, i)

    def kernel(self, L: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """Real kernels: K [N, L] (E-mixed) or [N, M, L] (pointwise lanes)."""
        log_lam, gamma = self.discrete(dtype)
        lanes = (gamma.unsqueeze(-1) * ssm_powers(log_lam, L)).real  # [N, M, L]
        if self.variant == "pointwise":
            return lanes
        return torch.einsum("nm,nml->nl", self.E.to(dtype), lanes)

    def _ssm(self, u, *, mode, reverse, h0, lengths):
        cdt = u.dtype
        T = u.shape[1]
        s = self._inputs(u)
        if mode == "conv":
            K = self.kernel(T, cdt)
            flat = s.flatten(2)
            K = K.flatten(0, 1) if self.variant == "pointwise" else K
            w = fftconv(flat.flip(1), K).flip(1) if reverse else fftconv(flat, K)
            return self._outputs(w.view(s.shape), reverse), None
        log_lam, gamma = self.discrete(cdt)
        s_c = s.to(complex_dtype(cdt))
        v = gamma * (s_c if self.variant == "pointwise" else s_c.unsqueeze(-1))  # [B, T, N, M]
        x, final = diag_states(log_lam, v, mode="scan", reverse=reverse, h0=h0, lengths=lengths)
        z = x.real
        w = z if self.variant == "pointwise" else (z * self.E.to(cdt)).sum(-1)
        return self._outputs(w, reverse), final

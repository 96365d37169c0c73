"""S4D: diagonal structured state spaces (Gu, Gupta, Goel & Ré 2022, "On the parameterization and
initialization of diagonal state space models").

Each channel h is its own single-input single-output system with N/2 complex states (one of each
conjugate pair, so the real system has N states):

    x'_h = A_h x_h + B_h u_h,   y_h = 2 Re(C_h x_h) + D_h u_h,   A_h = -exp(a_re) + i a_im
    K_h[l] = 2 Re( sum_n C_hn B̄_hn λ_hn^l )        # Vandermonde kernel, y = K * u (FFT)

followed, as in S4, by an activation (GELU), dropout and a position-wise output map (GLU).

Shapes: B batch, T time, H model width (= D), N state size, n = N / 2 stored states, L kernel length.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from seqblocks.layers.checks import check_positive, check_range
from seqblocks.layers.mixers._lti import LTIMixer, complex_dtype, post_layers
from seqblocks.layers.ssm_init import S4D_INITS, log_uniform, s4d_init
from seqblocks.ops.discretize import discretize
from seqblocks.ops.fftconv import fftconv
from seqblocks.ops.scan import linear_scan
from seqblocks.ops.ssm_conv_kernels import vandermonde_kernel
from seqblocks.registry import MIXERS

__all__ = ["S4D", "DiagonalSSMParams", "REAL_TRANSFORMS", "real_part", "inverse_real_part"]

REAL_TRANSFORMS = ("exp", "softplus", "relu", "none")


def real_part(p: torch.Tensor, transform: str) -> torch.Tensor:
    """Re(A) from its stored parameter; every transform but "none" keeps it negative."""
    if transform == "exp":
        return -torch.exp(p)
    if transform == "softplus":
        return -F.softplus(p)
    if transform == "relu":
        return -F.relu(p) - 1e-4
    return p


def inverse_real_part(re: torch.Tensor, transform: str) -> torch.Tensor:
    """The stored parameter for Re(A) = ``re`` (< 0)."""
    pos = (-re).clamp(min=1e-4)
    if transform == "exp":
        return torch.log(pos)
    if transform == "softplus":
        return pos + torch.log(-torch.expm1(-pos))  # inverse softplus
    if transform == "relu":
        return pos - 1e-4
    return re


def set_optim(params, lr: float | None, wd: float | None, owner: str = "S4") -> None:
    """Tag SSM parameters with optimizer hints (S4's ``_optim`` convention: smaller lr, no decay)."""
    if lr is not None:
        check_range(owner, "lr", lr, 0.0, lo_open=True)
    if wd is not None:
        check_range(owner, "wd", wd, 0.0)
    hints = {}
    if lr is not None:
        hints["lr"] = lr
    if wd is not None:
        hints["weight_decay"] = wd
    if hints:
        for p in params:
            p._optim = dict(hints)


class DiagonalSSMParams:
    """The parameters S4 and S4D share, and their initialisation.

    A diagonal A = A_real + i A_imag (one of each conjugate pair, Re(A) through ``real_transform``),
    B and C (and C_bwd for the reversed pass) as real / imaginary parts, a per-channel log step and
    the skip D. S4 adds its low-rank correction P on top.
    """

    def _init_diagonal(self, name: str, d_state: int, dt_min: float, dt_max: float, real_transform: str,
                       l_max: int | None, kw: dict) -> None:
        if not isinstance(d_state, int) or d_state <= 0 or d_state % 2:
            raise ValueError(f"{name}: d_state must be a positive even int, got {d_state!r}")
        if real_transform not in REAL_TRANSFORMS:
            raise ValueError(f"{name}: unknown real_transform {real_transform!r}; expected one of {REAL_TRANSFORMS}")
        check_range(name, "dt_min", dt_min, 0.0, lo_open=True)
        check_range(name, "dt_max", dt_max, dt_min, lo_name="dt_min")
        if l_max is not None:
            check_positive(name, l_max=l_max)
        self.d_state, self.l_max = d_state, l_max
        self.dt_min, self.dt_max = float(dt_min), float(dt_max)
        self.real_transform = real_transform
        H, n = self.d_model, d_state // 2
        for param in ("A_real", "A_imag", "B_re", "B_im", "C_re", "C_im") + (
                ("C_bwd_re", "C_bwd_im") if self.bidirectional else ()):
            setattr(self, param, nn.Parameter(torch.empty(H, n, **kw)))
        self.log_dt = nn.Parameter(torch.empty(H, **kw))
        self.D = nn.Parameter(torch.empty(H, **kw))

    def _reset_diagonal(self, lam: torch.Tensor, B: torch.Tensor) -> None:
        """Set A and B from ``lam`` / ``B`` [n] (shared by every channel), C complex standard normal, log
        steps log-uniform in [dt_min, dt_max], D standard normal, and the output layers."""
        H = self.d_model
        with torch.no_grad():
            # Re(Λ) can be 0 (legt / fourier); keep it slightly negative so the transforms are defined.
            self.A_real.copy_(inverse_real_part(lam.real.clamp(max=-1e-4), self.real_transform).expand(H, -1))
            self.A_imag.copy_(lam.imag.expand(H, -1))
            self.B_re.copy_(B.real.expand(H, -1))
            self.B_im.copy_(B.imag.expand(H, -1))
            names = ("C_re", "C_im", "C_bwd_re", "C_bwd_im") if self.bidirectional else ("C_re", "C_im")
            for name in names:  # complex standard normal: each part has variance 1/2
                getattr(self, name).normal_(0.0, math.sqrt(0.5))
            self.log_dt.copy_(torch.log(log_uniform(H, self.dt_min, self.dt_max)))
            self.D.normal_(0.0, 1.0)
        for m in self.output_linear.modules():
            if isinstance(m, nn.Linear):
                m.reset_parameters()

    def _C(self, reverse: bool, dtype: torch.dtype) -> torch.Tensor:
        re, im = (self.C_bwd_re, self.C_bwd_im) if reverse else (self.C_re, self.C_im)
        return torch.complex(re.to(dtype), im.to(dtype))

    def _conv(self, u: torch.Tensor, reverse: bool, dtype: torch.dtype) -> torch.Tensor:
        """The system as a long convolution with its kernel (anti-causal for the reversed pass)."""
        K = self.kernel(u.shape[1], reverse, dtype)
        return fftconv(u.flip(1), K).flip(1) if reverse else fftconv(u, K)

    def _skip(self, u):
        return u * self.D.to(u.dtype)

    def _post(self, y):
        w = next(self.output_linear.parameters(), None)
        y = self.drop(self.activation(y))
        return self.output_linear(y.to(w.dtype) if w is not None else y)


@MIXERS.register("S4D")
class S4D(DiagonalSSMParams, LTIMixer):
    """Diagonal S4: per-channel complex diagonal SSMs evaluated as a Vandermonde-kernel convolution.

    Args:
        d_model (int): model width H.
        d_state (int): state size N of each channel's real system (N/2 complex states stored); even.
            Default: 64.
        l_max (int | None): accepted for S4-style callers that size kernels in advance; kernels are
            computed for the input length.
            Default: None.
        dt_min (float): smallest initial step (log-uniform per channel). Default: 0.001.
        dt_max (float): largest initial step. Default: 0.1.
        init (str): "legs", "lin", "inv", "legt" or "fourier" (S4D-LegS / -Lin / -Inv, ...). Default: "legs".
        disc (str): "zoh" or "bilinear". Default: "zoh".
        real_transform (str): how Re(A) is stored: "exp", "softplus", "relu" or "none". Default: "exp".
        dropout (float): dropout after the activation. Default: 0.0.
        activation (str | None): pointwise activation after the SSM ("gelu", "silu", ...). Default: "gelu".
        final_act (str | None): output map: "glu" (Linear H -> 2H, GLU), "id" (Linear), "gelu" (Linear
            H -> H, then GELU), None. Default: "glu".
        double_activation (bool): apply ``activation`` twice before the dropout (code
            whose ungated path runs a conv activation and then a multiplicative one). Default: False.
        lr (float | None): learning-rate hint on the SSM parameters (``param._optim``). Default: None.
        wd (float): weight-decay hint on the SSM parameters. Default: 0.0.
        mode (str): "conv" or "scan". Default: "conv".
        bidirectional (bool): add a reversed pass with its own C. Default: False.
        layer_idx, device, dtype: as every mixer.

    Raises:
        ValueError: odd or non-positive d_state, unknown init / disc / transform / mode.
    """

    # Kept fp32 under a bf16 / fp16 cast of the module (the poles and step sizes; Mixer.keep_in_fp32).
    keep_in_fp32 = ("A_real", "A_imag", "log_dt")

    def __init__(self, d_model: int, d_state: int = 64, *, l_max: int | None = None, dt_min: float = 0.001,
                 dt_max: float = 0.1, init: str = "legs", disc: str = "zoh", real_transform: str = "exp",
                 dropout: float = 0.0, activation: str | None = "gelu", final_act: str | None = "glu",
                 lr: float | None = None, wd: float = 0.0, mode: str = "conv", bidirectional: bool = False,
                 layer_idx: int | None = None, device=None, dtype=None, double_activation: bool = False) -> None:
        super().__init__()
        self._init_common(d_model, mode, bidirectional)
        if not isinstance(double_activation, bool):
            raise TypeError(f"S4D: double_activation must be a bool, got {double_activation!r}")
        self.double_activation = double_activation
        if init not in S4D_INITS:
            raise ValueError(f"S4D: unknown init {init!r}; expected one of {S4D_INITS}")
        if disc not in ("zoh", "bilinear"):
            raise ValueError(f"S4D: unknown disc {disc!r}; expected 'zoh' or 'bilinear'")
        kw = {"device": device, "dtype": dtype}
        self._init_diagonal("S4D", d_state, dt_min, dt_max, real_transform, l_max, kw)
        self.init, self.disc = init, disc
        self.layer_idx = layer_idx
        H = d_model
        self.activation, self.drop, self.output_linear = post_layers(H, activation, final_act, dropout, **kw)
        if double_activation:
            self.activation = nn.Sequential(self.activation, type(self.activation)())
        set_optim((self.A_real, self.A_imag, self.B_re, self.B_im, self.log_dt), lr, wd, "S4D")
        self.reset_parameters()

    def reset_parameters(self) -> None:
        self._reset_diagonal(*s4d_init(self.init, self.d_state))

    def state_shape(self) -> tuple[int, ...]:
        return (self.d_model, self.d_state // 2)

    def discrete(self, dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, torch.Tensor]:
        """``(log λ [H, n], B̄ [H, n])``: the discrete diagonal system (complex)."""
        A = torch.complex(real_part(self.A_real.to(dtype), self.real_transform), self.A_imag.to(dtype))
        dt = torch.exp(self.log_dt.to(dtype))[:, None]
        A_bar, gamma = discretize(A, dt, self.disc)
        log_lam = dt * A if self.disc == "zoh" else torch.log(A_bar)
        return log_lam, gamma * torch.complex(self.B_re.to(dtype), self.B_im.to(dtype))

    def kernel(self, L: int, reverse: bool = False, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The convolution kernel ``K [H, L] = 2 Re(sum_n C B̄ λ^l)`` (of the reversed pass if asked)."""
        log_lam, B_bar = self.discrete(dtype)
        C = self._C(reverse, dtype)
        return 2 * vandermonde_kernel(C * B_bar, log_lam, L).real

    def _ssm(self, u, *, mode, reverse, h0, lengths):
        cdt = u.dtype
        if mode == "conv":
            return self._conv(u, reverse, cdt), None
        log_lam, B_bar = self.discrete(cdt)
        v = u.to(complex_dtype(cdt)).unsqueeze(-1) * B_bar  # [B, T, H, n]
        h, final = linear_scan(torch.exp(log_lam), v, h0, reverse=reverse, lengths=lengths)
        y = 2 * (h * self._C(reverse, cdt)).sum(-1).real
        return y, final

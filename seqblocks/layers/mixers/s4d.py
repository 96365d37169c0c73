"""S4D: diagonal structured state spaces (Gu, Gupta, Goel & Ré 2022, "On the parameterization and
initialization of diagonal state space models").

Each channel h is its own single-input single-output system with N/2 complex states (one of each
conjugate pair, so the real system has N states):

    x'_h = A_h x_h + B_h u_h,   y_h = 2 Re(C_h x_h) + D_h u_h,   A_h = -exp(a_re) + i a_im
    K_h[l] = 2 Re( sum_n C_hn B̄_hn λ_hn^l )        # Vandermonde kernel, y = K * u (FFT)

followed, as in S4, by an activation (GELU), dropout and a position-wise output map (GLU).
``DiagonalSSMParams`` holds what S4 shares: the parameters, multi-output ``channels``, the GSS ``gate``,
``double_activation`` and the finite kernel ``truncate_kernel`` (``K_l = 0`` past ``l_max``).

Shapes: B batch, T time, H model width (= D), N state size, n = N / 2 stored states, L kernel length.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from seqblocks.layers.checks import check_positive, check_range
from seqblocks.layers.mixers._lti import LTIMixer, complex_dtype, make_activation, post_layers
from seqblocks.layers.ssm_init import S4D_INITS, log_uniform, s4d_init
from seqblocks.ops.discretize import discretize
from seqblocks.ops.fftconv import fftconv
from seqblocks.ops.scan import linear_scan
from seqblocks.ops.ssm_conv_kernels import ssm_powers, vandermonde_kernel
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
    """The parameters S4 and S4D share, their initialisation and their pointwise tail.

    A diagonal A = A_real + i A_imag (one of each conjugate pair, Re(A) through ``real_transform``),
    B and C (and C_bwd for the reversed pass) as real / imaginary parts, a per-channel log step and
    the skip D. S4 adds its low-rank correction P on top. Shared options:

    - ``channels`` C > 1: C output maps per channel sharing one state (C [C, H, n], D [C, H]); the
      system gives [B, T, C * H] ("c h" order), which the tail takes back to H.
    - ``gate`` G (GSS): ``y = gelu(W_o act(y) * gate_act(W_i x))`` of width G * H before the output map.
    - ``double_activation``: the activation twice on the ungated path.
    - ``truncate_kernel`` with ``l_max``: the kernel stops after l_max steps, ``y_t = sum_{l < l_max}
      K_l u_{t-l} + D u_t`` (the convolution of S4 code built with ``l_max``). It is a finite impulse
      response, so both modes evaluate it as a convolution, and the cache holds the last l_max - 1
      inputs [B, l_max - 1, H] (real) in place of the SSM state.
    """

    def _init_diagonal(self, name: str, d_state: int, dt_min: float, dt_max: float, real_transform: str,
                       l_max: int | None, kw: dict, *, channels: int = 1, truncate_kernel: bool = False) -> None:
        if not isinstance(d_state, int) or d_state <= 0 or d_state % 2:
            raise ValueError(f"{name}: d_state must be a positive even int, got {d_state!r}")
        if real_transform not in REAL_TRANSFORMS:
            raise ValueError(f"{name}: unknown real_transform {real_transform!r}; expected one of {REAL_TRANSFORMS}")
        check_range(name, "dt_min", dt_min, 0.0, lo_open=True)
        check_range(name, "dt_max", dt_max, dt_min, lo_name="dt_min")
        if l_max is not None:
            check_positive(name, l_max=l_max)
        check_positive(name, channels=channels)
        if not isinstance(truncate_kernel, bool):
            raise TypeError(f"{name}: truncate_kernel must be a bool, got {truncate_kernel!r}")
        if truncate_kernel and l_max is None:
            raise ValueError(f"{name}: truncate_kernel=True needs l_max (the number of kernel steps kept)")
        self.d_state, self.l_max = d_state, l_max
        self.channels, self.truncate_kernel = channels, truncate_kernel
        self.dt_min, self.dt_max = float(dt_min), float(dt_max)
        self.real_transform = real_transform
        H, n = self.d_model, d_state // 2
        for param in ("A_real", "A_imag", "B_re", "B_im"):
            setattr(self, param, nn.Parameter(torch.empty(H, n, **kw)))
        out_shape = (H, n) if channels == 1 else (channels, H, n)
        for param in ("C_re", "C_im") + (("C_bwd_re", "C_bwd_im") if self.bidirectional else ()):
            setattr(self, param, nn.Parameter(torch.empty(*out_shape, **kw)))
        self.log_dt = nn.Parameter(torch.empty(H, **kw))
        self.D = nn.Parameter(torch.empty(*((H,) if channels == 1 else (channels, H)), **kw))

    def _init_tail(self, name: str, activation: str | None, final_act: str | None, dropout: float,
                   gate: int | None, gate_act: str | None, double_activation: bool, kw: dict) -> None:
        """The optional gate, the activation(s), dropout and the output map (``post_layers``)."""
        if gate is not None:
            check_positive(name, gate=gate)
        elif gate_act is not None:
            raise ValueError(f"{name}: gate_act={gate_act!r} needs a gate (gate=None)")
        if not isinstance(double_activation, bool):
            raise TypeError(f"{name}: double_activation must be a bool, got {double_activation!r}")
        if double_activation and gate is not None:
            raise ValueError(f"{name}: double_activation applies to the ungated path; with gate={gate} the "
                             f"activation after the gate product is the second one")
        H = self.d_model
        self.gate, self.gate_act, self.double_activation = gate, gate_act, double_activation
        width = self.channels * H
        if gate is not None:
            self.input_gate = nn.Linear(H, gate * H, **kw)
            self.gate_activation = make_activation(gate_act, "gate_act")
            self.output_gate = nn.Linear(width, gate * H, **kw)
            width = gate * H
        self.activation, self.drop, self.output_linear = post_layers(H, activation, final_act, dropout, **kw,
                                                                     d_in=width)
        if double_activation:
            self.activation = nn.Sequential(self.activation, make_activation(activation))

    def _reset_diagonal(self, lam: torch.Tensor, B: torch.Tensor) -> None:
        """Set A and B from ``lam`` / ``B`` [n] (shared by every channel), C complex standard normal, log
        steps log-uniform in [dt_min, dt_max], D standard normal, and the gate and output layers."""
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
        for m in (getattr(self, "input_gate", None), getattr(self, "output_gate", None)):
            if m is not None:
                m.reset_parameters()

    def _C(self, reverse: bool, dtype: torch.dtype) -> torch.Tensor:
        """The output vector, complex [H, n] ([channels, H, n] with channels > 1)."""
        re, im = (self.C_bwd_re, self.C_bwd_im) if reverse else (self.C_re, self.C_im)
        return torch.complex(re.to(dtype), im.to(dtype))

    def _memoised(self, slot: str, tag: Any, compute):
        """``compute()``, kept under ``slot`` while the parameters do not change, when no gradient is needed.

        The key holds every parameter's storage and in-place version counter, so any update (an optimizer
        step, ``load_state_dict``, ``.to``) recomputes. With autograd on, it is always recomputed.
        """
        if torch.is_grad_enabled() and any(p.requires_grad for p in self.parameters()):
            return compute()
        key = (tag, tuple((p.data_ptr(), p._version) for p in self.parameters()))
        memo = self.__dict__.get(slot)
        if memo is None or memo[0] != key:
            with torch.no_grad():
                memo = (key, compute())
            self.__dict__[slot] = memo
        return memo[1]

    def _apply_kernel(self, x: torch.Tensor, K: torch.Tensor) -> torch.Tensor:
        """Causal convolution of x [B, T, H] with K [H, L] (lags past L are zero), or with each of
        K [channels, H, L] side by side: [B, T, channels * H]."""
        if K.dim() == 2:
            return fftconv(x, K)
        return torch.cat([fftconv(x, K[c]) for c in range(K.shape[0])], -1)

    def _conv(self, u: torch.Tensor, reverse: bool, dtype: torch.dtype) -> torch.Tensor:
        """The system as a long convolution with its kernel (anti-causal for the reversed pass); the
        kernel stops after l_max steps with ``truncate_kernel``. Padding holds u = 0, so the reversed
        pass may flip whole rows."""
        T = u.shape[1]
        K = self.kernel(min(T, self.l_max) if self.truncate_kernel else T, reverse, dtype)
        if reverse:
            return self._apply_kernel(u.flip(1), K).flip(1)
        return self._apply_kernel(u, K)

    def _windowed(self, u: torch.Tensor, h0: torch.Tensor | None,
                  lengths: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The truncated-kernel system with a cache: h0 [B, l_max - 1, H] holds the last inputs before
        u [B, T, H] (zero before the sequence began); returns (y, the new window). A window holding a
        non-finite value (a poisoned cache) keeps the row poisoned: its outputs and window are NaN."""
        B, T, H = u.shape
        W = self.l_max - 1
        poisoned = ~torch.isfinite(h0).reshape(B, -1).all(1).view(B, 1, 1)
        x = torch.cat((h0.to(u.dtype).masked_fill(poisoned, 0.0), u), 1)  # [B, W + T, H]
        L = min(self.l_max, W + T)
        K = self._memoised("_window_kernel_memo", (L, u.dtype), lambda: self.kernel(L, False, u.dtype))
        y = self._apply_kernel(x, K)[:, W:]
        n = torch.full((B,), T, device=u.device) if lengths is None else lengths.to(u.device)
        # A row's last W inputs end at its own last valid position (x index W + n - 1).
        idx = (n.unsqueeze(1) + torch.arange(W, device=u.device)).unsqueeze(-1).expand(B, W, H)
        final = x.gather(1, idx)
        return y.masked_fill(poisoned, float("nan")), final.masked_fill(poisoned, float("nan"))

    def _window_shape(self) -> tuple[int, int]:
        return (self.l_max - 1, self.d_model)

    def cache_state_dtype(self, param_dtype: torch.dtype) -> torch.dtype:
        """complex64 / complex128 states; with ``truncate_kernel`` the window of real inputs (fp32 / fp64)."""
        if self.truncate_kernel:
            return torch.float64 if param_dtype == torch.float64 else torch.float32
        return complex_dtype(param_dtype)

    def _skip(self, u):
        if self.channels == 1:
            return u * self.D.to(u.dtype)
        return (u.unsqueeze(-2) * self.D.to(u.dtype)).flatten(-2)  # [B, T, channels * H]

    def _post(self, y):
        w = next(self.output_linear.parameters(), None)
        y = self.drop(self.activation(y))
        return self.output_linear(y.to(w.dtype) if w is not None else y)

    def _post_with_input(self, y: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        if self.gate is None:
            return self._post(y)
        w = self.output_gate.weight
        v = self.gate_activation(self.input_gate(x.to(w.dtype)))  # [B, T, gate * H]
        y = F.gelu(self.output_gate(self.activation(y).to(w.dtype)) * v)
        return self.output_linear(self.drop(y))


@MIXERS.register("S4D")
class S4D(DiagonalSSMParams, LTIMixer):
    """Diagonal S4: per-channel complex diagonal SSMs evaluated as a Vandermonde-kernel convolution.

    Args:
        d_model (int): model width H.
        d_state (int): state size N of each channel's real system (N/2 complex states stored); even.
            Default: 64.
        l_max (int | None): the kernel length of S4-style callers. Alone it is accepted and unused (the
            kernel spans the input); with ``truncate_kernel=True`` the kernel stops after l_max steps.
            Default: None.
        dt_min (float): smallest initial step (log-uniform per channel). Default: 0.001.
        dt_max (float): largest initial step. Default: 0.1.
        init (str): "legs", "lin", "inv", "legt" or "fourier" (S4D-LegS / -Lin / -Inv, ...). Default: "legs".
        disc (str): "zoh" or "bilinear". Default: "zoh".
        real_transform (str): how Re(A) is stored: "exp", "softplus", "relu" or "none". Default: "exp".
        dropout (float): dropout after the activation. Default: 0.0.
        activation (str | None): pointwise activation after the SSM ("gelu", "silu", ...). Default: "gelu".
        final_act (str | None): output map: "glu" (Linear -> 2H, GLU), "id" (Linear), "gelu" (Linear
            -> H, then GELU), None. Default: "glu".
        double_activation (bool): apply ``activation`` twice before the dropout on the ungated path (code
            whose ungated path runs a conv activation and then a multiplicative one). Default: False.
        lr (float | None): learning-rate hint on the SSM parameters (``param._optim``). Default: None.
        wd (float): weight-decay hint on the SSM parameters. Default: 0.0.
        mode (str): "conv" or "scan". Default: "conv".
        bidirectional (bool): add a reversed pass with its own C. Default: False.
        channels (int): output maps C per channel sharing one state (a multi-output SSM, C [channels, H,
            n], D [channels, H]): the system gives [B, T, channels * H], which the output map
            (``final_act`` "glu", "id" or "gelu") takes back to H. Default: 1.
        gate (int | None): a multiplicative gate of width gate * H (as in GSS):
            ``y = gelu(W_o act(y) * gate_act(W_i x))`` before the output map, which then reads gate * H
            features. Default: None (no gate).
        gate_act (str | None): activation on the gate branch ``W_i x`` ("gelu", ...; needs ``gate``).
            Default: None (none).
        truncate_kernel (bool): with ``l_max``, the kernel stops after l_max steps (``K_l = 0`` for
            l >= l_max, the convolution of S4 code built with ``l_max``); decoding then keeps the last
            l_max - 1 inputs. Default: False.
        layer_idx, device, dtype: as every mixer.

    Raises:
        ValueError: odd or non-positive d_state, unknown init / disc / transform / mode / activation,
            channels < 1, gate < 1, channels or gate > 1 with ``final_act=None``, gate_act without a gate,
            double_activation with a gate, truncate_kernel without l_max.
        TypeError: a non-bool double_activation or truncate_kernel.
    """

    # Kept fp32 under a bf16 / fp16 cast of the module (the poles and step sizes; Mixer.keep_in_fp32).
    keep_in_fp32 = ("A_real", "A_imag", "log_dt")

    def __init__(self, d_model: int, d_state: int = 64, *, l_max: int | None = None, dt_min: float = 0.001,
                 dt_max: float = 0.1, init: str = "legs", disc: str = "zoh", real_transform: str = "exp",
                 dropout: float = 0.0, activation: str | None = "gelu", final_act: str | None = "glu",
                 lr: float | None = None, wd: float = 0.0, mode: str = "conv", bidirectional: bool = False,
                 layer_idx: int | None = None, device=None, dtype=None, double_activation: bool = False,
                 channels: int = 1, gate: int | None = None, gate_act: str | None = None,
                 truncate_kernel: bool = False) -> None:
        super().__init__()
        self._init_common(d_model, mode, bidirectional)
        if init not in S4D_INITS:
            raise ValueError(f"S4D: unknown init {init!r}; expected one of {S4D_INITS}")
        if disc not in ("zoh", "bilinear"):
            raise ValueError(f"S4D: unknown disc {disc!r}; expected 'zoh' or 'bilinear'")
        kw = {"device": device, "dtype": dtype}
        self._init_diagonal("S4D", d_state, dt_min, dt_max, real_transform, l_max, kw, channels=channels,
                            truncate_kernel=truncate_kernel)
        self.init, self.disc = init, disc
        self.layer_idx = layer_idx
        self._init_tail("S4D", activation, final_act, dropout, gate, gate_act, double_activation, kw)
        set_optim((self.A_real, self.A_imag, self.B_re, self.B_im, self.log_dt), lr, wd, "S4D")
        self.reset_parameters()

    def reset_parameters(self) -> None:
        self._reset_diagonal(*s4d_init(self.init, self.d_state))

    def state_shape(self) -> tuple[int, ...]:
        return self._window_shape() if self.truncate_kernel else (self.d_model, self.d_state // 2)

    def discrete(self, dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, torch.Tensor]:
        """``(log λ [H, n], B̄ [H, n])``: the discrete diagonal system (complex)."""
        A = torch.complex(real_part(self.A_real.to(dtype), self.real_transform), self.A_imag.to(dtype))
        dt = torch.exp(self.log_dt.to(dtype))[:, None]
        A_bar, gamma = discretize(A, dt, self.disc)
        log_lam = dt * A if self.disc == "zoh" else torch.log(A_bar)
        return log_lam, gamma * torch.complex(self.B_re.to(dtype), self.B_im.to(dtype))

    def kernel(self, L: int, reverse: bool = False, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The convolution kernel ``K [H, L] = 2 Re(sum_n C B̄ λ^l)`` (of the reversed pass if asked);
        [channels, H, L] with channels > 1."""
        log_lam, B_bar = self.discrete(dtype)
        C = self._C(reverse, dtype)
        if self.channels == 1:
            return 2 * vandermonde_kernel(C * B_bar, log_lam, L).real
        return 2 * torch.einsum("chn,hnl->chl", C * B_bar, ssm_powers(log_lam, L)).real

    def _ssm(self, u, *, mode, reverse, h0, lengths):
        cdt = u.dtype
        if self.truncate_kernel and h0 is not None:
            return self._windowed(u, h0, lengths)
        if mode == "conv" or self.truncate_kernel:
            return self._conv(u, reverse, cdt), None
        log_lam, B_bar = self.discrete(cdt)
        v = u.to(complex_dtype(cdt)).unsqueeze(-1) * B_bar  # [B, T, H, n]
        h, final = linear_scan(torch.exp(log_lam), v, h0, reverse=reverse, lengths=lengths)
        C = self._C(reverse, cdt)
        if self.channels == 1:
            y = 2 * (h * C).sum(-1).real
        else:  # [B, T, channels * H]
            y = 2 * torch.einsum("bthn,chn->btch", h, C).real.flatten(-2)
        return y, final

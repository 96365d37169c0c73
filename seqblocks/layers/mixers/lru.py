"""Linear Recurrent Unit (Orvieto et al. 2023, "Resurrecting recurrent neural networks for long
sequences").

    λ   = exp(-exp(ν) + i exp(θ))            # |λ| < 1 for every ν: stable by construction
    x_t = λ ⊙ x_{t-1} + (γ ⊙ B) u_t          # complex diagonal state, γ = sqrt(1 - |λ|^2) at init
    y_t = Re(C x_t) + D ⊙ u_t

λ starts uniform on the ring ``r_min <= |λ| <= r_max`` with phase in ``[0, max_phase]``; the
normalisation γ (stored as ``gamma_log``, trainable) keeps the state's variance independent of |λ|.

Shapes: B batch, T time, H model width (= D), P state size.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from seqblocks.layers.checks import check_positive, check_range
from seqblocks.layers.mixers._lti import LTIMixer, complex_dtype, complex_linear, diag_states, real_readout
from seqblocks.layers.ssm_init import lru_ring_init
from seqblocks.registry import MIXERS

__all__ = ["LRU"]


@MIXERS.register("LRU")
class LRU(LTIMixer):
    """Linear Recurrent Unit: complex diagonal recurrence with ring initialisation and γ normalisation.

    Args:
        d_model (int): model width H.
        d_state (int): number of complex states P.
        r_min (float): smallest initial |λ|, in [0, 1). Default: 0.
        r_max (float): largest initial |λ|, in (r_min, 1]. Default: 1.
        max_phase (float): initial phases are uniform in [0, max_phase]. Default: 2π.
        mode (str): "scan" (the paper's parallel scan) or "conv" (FFT convolution). Default: "scan".
        bidirectional (bool): add a reversed pass with its own ``C``. Default: False.
        layer_idx (int | None): position in the stack (bookkeeping only). Default: None.
        device, dtype: of the parameters. Default: None.

    Raises:
        ValueError: sizes or radii out of range, unknown mode.
    """

    # Kept fp32 under a bf16 / fp16 cast of the module (the poles and their normalisation; Mixer.keep_in_fp32).
    keep_in_fp32 = ("nu_log", "theta_log", "gamma_log")
    # Under ``seqblocks.parallel.context_parallel`` the forward runs on its time chunk (the scan passes its
    # state across ranks; both directions when bidirectional): LTIMixer._forward.
    context_parallel = "native"

    def __init__(self, d_model: int, d_state: int, r_min: float = 0.0, r_max: float = 1.0,
                 max_phase: float = 2 * math.pi, *, mode: str = "scan", bidirectional: bool = False,
                 layer_idx: int | None = None, device=None, dtype=None) -> None:
        super().__init__()
        self._init_common(d_model, mode, bidirectional)
        check_positive("LRU", d_state=d_state)
        check_range("LRU", "r_min", r_min, 0.0, 1.0)
        check_range("LRU", "r_max", r_max, 0.0, 1.0)
        if not r_min < r_max:
            raise ValueError(f"LRU: need 0 <= r_min < r_max <= 1, got r_min={r_min}, r_max={r_max}")
        check_range("LRU", "max_phase", max_phase, 0.0, lo_open=True)
        self.d_state = d_state
        self.r_min, self.r_max, self.max_phase = float(r_min), float(r_max), float(max_phase)
        self.layer_idx = layer_idx
        kw = {"device": device, "dtype": dtype}
        P, H = d_state, d_model
        self.nu_log = nn.Parameter(torch.empty(P, **kw))
        self.theta_log = nn.Parameter(torch.empty(P, **kw))
        self.gamma_log = nn.Parameter(torch.empty(P, **kw))
        self.B_re = nn.Parameter(torch.empty(P, H, **kw))
        self.B_im = nn.Parameter(torch.empty(P, H, **kw))
        self.C_re = nn.Parameter(torch.empty(H, P, **kw))
        self.C_im = nn.Parameter(torch.empty(H, P, **kw))
        if self.bidirectional:
            self.C_bwd_re = nn.Parameter(torch.empty(H, P, **kw))
            self.C_bwd_im = nn.Parameter(torch.empty(H, P, **kw))
        self.D = nn.Parameter(torch.empty(H, **kw))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        P, H = self.d_state, self.d_model
        nu_log, theta_log = lru_ring_init(P, self.r_min, self.r_max, self.max_phase)
        with torch.no_grad():
            self.nu_log.copy_(nu_log)
            self.theta_log.copy_(theta_log)
            self.gamma_log.copy_(0.5 * torch.log1p(-torch.exp(-2 * torch.exp(nu_log))))
            # Glorot-style scales of the paper: B over 2H (complex), C over P.
            for p in (self.B_re, self.B_im):
                p.normal_(0.0, 1.0 / math.sqrt(2 * H))
            names = ("C_re", "C_im", "C_bwd_re", "C_bwd_im") if self.bidirectional else ("C_re", "C_im")
            for name in names:
                getattr(self, name).normal_(0.0, 1.0 / math.sqrt(P))
            self.D.normal_(0.0, 1.0)

    def state_shape(self) -> tuple[int, ...]:
        return (self.d_state,)

    def eigenvalues(self) -> torch.Tensor:
        """The diagonal λ [P] (complex)."""
        return torch.exp(self._log_lam(self.nu_log.dtype))

    def _log_lam(self, cdt: torch.dtype) -> torch.Tensor:
        return torch.complex(-torch.exp(self.nu_log.to(cdt)), torch.exp(self.theta_log.to(cdt)))

    def _ssm(self, u, *, mode, reverse, h0, lengths, cp=None):
        cdt = u.dtype
        log_lam = self._log_lam(cdt)
        B_bar = torch.complex(self.B_re.to(cdt), self.B_im.to(cdt)) * torch.exp(self.gamma_log.to(cdt))[:, None]
        v = complex_linear(u, B_bar)  # [B, T, P]
        h, final = diag_states(log_lam, v, mode=mode, reverse=reverse, h0=h0, lengths=lengths, cp=cp)
        C = (self.C_bwd_re, self.C_bwd_im) if reverse else (self.C_re, self.C_im)
        y = real_readout(h.to(complex_dtype(cdt)), torch.complex(C[0].to(cdt), C[1].to(cdt)))
        return y, final

    def _skip(self, u):
        return u * self.D.to(u.dtype)

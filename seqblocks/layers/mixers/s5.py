"""S5: simplified state-space layer (Smith, Warrington & Linderman 2023), with the event-based
(Event-SSM, Schöne et al. 2024) irregular time steps.

    x' = Λ x + B̃ u,  y = Re(C̃ x) + D ⊙ u             # one MIMO system over all H channels
    Λ, V = eig(normal part of HiPPO-LegS)  (block-diagonal with ``blocks`` blocks)
    B̃ = V^{-1} B,  C̃ = C V                           # B, C drawn in the HiPPO basis, then rotated
    x_t = Ā x_{t-1} + B̄ u_t,  (Ā, B̄) = discretize(Λ, Δ, method)   per-state steps Δ (log-spaced)

With ``conj_sym=True`` only one eigenvalue of each conjugate pair is kept (P/2 states) and the output
is ``2 Re(C̃ x)``; that is exactly the real system of P states at half the cost.

Event-based input: ``integration_timesteps`` τ [B, T] (the time since the previous event) scales the
step of Ā only: ``Ā_t = disc_A(Λ, Δ τ_t)`` while ``B̄ = disc_B(Λ, Δ)`` (the asymmetric discretisation).
τ = 1 everywhere is exactly the regular model.

Shapes: B batch, T time, H model width, P state size (P/2 stored with conj_sym).
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

from seqblocks.layers.checks import check_input, check_range, check_timesteps
from seqblocks.layers.mixer import honours_fast_path
from seqblocks.layers.mixers._lti import LTIMixer, SSMCache, complex_dtype, complex_linear, diag_states
from seqblocks.layers.mixers.s4d import REAL_TRANSFORMS, inverse_real_part, real_part
from seqblocks.layers.ssm_init import nplr, on_cpu
from seqblocks.ops.discretize import discretize
from seqblocks.parallel.scan import gather_stack, tie
from seqblocks.registry import MIXERS

__all__ = ["S5"]

#: "async" is ZOH under its event-stream name (the step of Ā scaled by ``integration_timesteps``, which
#: every method here supports); "no_discretization" uses the stored eigenvalues as the discrete decays
#: (Ā = Λ, B̄ = B), for a system whose Λ is already discrete.
S5_DISCRETIZATIONS = ("zoh", "bilinear", "dirac", "async", "no_discretization")


def s5_legs_init(P: int, blocks: int, conj_sym: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Block-diagonal HiPPO-LegS-N eigendecomposition: ``(Λ [P_s], V [P, P_s])`` complex128,
    with P_s = P/2 under ``conj_sym`` (one of each conjugate pair) and P otherwise."""
    Pb = P // blocks
    lam, _, _, V = nplr("legs", Pb)  # [Pb/2], [Pb, Pb/2]
    if not conj_sym:
        lam = torch.cat((lam, lam.conj()))
        V = torch.cat((V, V.conj()), 1)
    lam_all = lam.repeat(blocks)
    V_all = torch.block_diag(*([V] * blocks))
    return lam_all, V_all


@MIXERS.register("S5")
class S5(LTIMixer):
    """S5: a MIMO diagonal SSM initialised from HiPPO-LegS, with per-state steps.

    Args:
        d_model (int): model width H.
        d_state (int): state size P (the paper's P); must be divisible by ``2 * blocks``.
        discretization (str): "zoh", "bilinear", "dirac", "async" (ZOH by its event-stream name) or
            "no_discretization" (Ā = Λ, B̄ = B: Λ is used as the discrete decay). Default: "zoh".
        conj_sym (bool): keep one eigenvalue per conjugate pair (P/2 states, output 2 Re). Default: False.
        blocks (int): number of HiPPO-LegS blocks on the diagonal of the initial Λ (the paper's J).
            Default: 1.
        dt_min (float): smallest initial step. Default: 0.001.
        dt_max (float): largest initial step. Default: 0.1.
        step_rescale (float): positive factor on every step Δ at run time (the paper's rescaling for
            a sequence sampled at another rate; 2.0 takes steps twice as long). Default: 1.0.
        mode (str): "scan" (the paper's parallel scan) or "conv". Default: "scan".
        bidirectional (bool): add a reversed pass with its own ``C̃``. Default: False.
        use_fast_path (bool): let the scans run their Triton kernels on CUDA; False keeps every op on
            its PyTorch path (same results). Default: True.
        full_D (bool): a full ``[H, H]`` feedthrough matrix, ``y = ... + u @ D``, instead of the
            per-channel ``D ⊙ u`` (``D`` then starts at normal(0, sqrt(2 / H))). Default: False.
        real_transform (str): how ``Lambda_re_log`` holds Re Λ, as in S4 / S4D: "exp" (Re Λ =
            -exp(p)), "softplus" (-softplus(p)), "relu" (-relu(p) - 1e-4), all stable (Re Λ < 0), or
            "none" (Re Λ = p, any sign: a system with Re Λ > 0 grows, and is what a file written with
            the opposite sign convention needs). Default: "exp".
        layer_idx (int | None): position in the stack. Default: None.
        device, dtype: of the parameters. Default: None.

    Raises:
        ValueError: bad sizes, unknown discretization, mode or real_transform.
    """

    # Kept fp32 under a bf16 / fp16 cast of the module (the poles and step sizes; Mixer.keep_in_fp32).
    keep_in_fp32 = ("Lambda_re_log", "Lambda_im", "log_step")

    inputs = frozenset({"lengths", "integration_timesteps"})
    # Under ``seqblocks.parallel.context_parallel`` the forward runs on its time chunk (the scan passes its
    # state across ranks; both directions when bidirectional): LTIMixer._forward.
    context_parallel = "native"

    def __init__(self, d_model: int, d_state: int, discretization: str = "zoh", conj_sym: bool = False, *,
                 blocks: int = 1, dt_min: float = 0.001, dt_max: float = 0.1, step_rescale: float = 1.0,
                 mode: str = "scan", bidirectional: bool = False, use_fast_path: bool = True,
                 full_D: bool = False, real_transform: str = "exp", layer_idx: int | None = None, device=None,
                 dtype=None) -> None:
        super().__init__()
        self._init_common(d_model, mode, bidirectional)
        if discretization not in S5_DISCRETIZATIONS:
            raise ValueError(f"S5: unknown discretization {discretization!r}; expected one of {S5_DISCRETIZATIONS}")
        if not isinstance(blocks, int) or blocks <= 0:
            raise ValueError(f"S5: blocks must be a positive int, got {blocks!r}")
        if not isinstance(d_state, int) or d_state <= 0 or d_state % (2 * blocks):
            raise ValueError(f"S5: d_state must be a positive multiple of 2 * blocks = {2 * blocks}, got {d_state!r}")
        check_range("S5", "dt_min", dt_min, 0.0, lo_open=True)
        check_range("S5", "dt_max", dt_max, dt_min, lo_name="dt_min")
        check_range("S5", "step_rescale", step_rescale, 0.0, lo_open=True)
        if real_transform not in REAL_TRANSFORMS:
            raise ValueError(f"S5: unknown real_transform {real_transform!r}; expected one of {REAL_TRANSFORMS}")
        self.real_transform = real_transform
        self.step_rescale = float(step_rescale)
        self.use_fast_path = bool(use_fast_path)
        self.full_D = bool(full_D)
        self.d_state = d_state
        self.discretization = discretization
        self.conj_sym = bool(conj_sym)
        self.blocks = blocks
        self.dt_min, self.dt_max = float(dt_min), float(dt_max)
        self.layer_idx = layer_idx
        Ps = d_state // 2 if self.conj_sym else d_state
        H = d_model
        kw = {"device": device, "dtype": dtype}
        self.Lambda_re_log = nn.Parameter(torch.empty(Ps, **kw))
        self.Lambda_im = nn.Parameter(torch.empty(Ps, **kw))
        self.B_re = nn.Parameter(torch.empty(Ps, H, **kw))
        self.B_im = nn.Parameter(torch.empty(Ps, H, **kw))
        self.C_re = nn.Parameter(torch.empty(H, Ps, **kw))
        self.C_im = nn.Parameter(torch.empty(H, Ps, **kw))
        if self.bidirectional:
            self.C_bwd_re = nn.Parameter(torch.empty(H, Ps, **kw))
            self.C_bwd_im = nn.Parameter(torch.empty(H, Ps, **kw))
        self.D = nn.Parameter(torch.empty((H, H) if self.full_D else (H,), **kw))
        self.log_step = nn.Parameter(torch.empty(Ps, **kw))
        self.reset_parameters()

    @on_cpu  # the values are computed on the CPU and copied into the parameters, wherever they live
    def reset_parameters(self) -> None:
        P, H = self.d_state, self.d_model
        lam, V = s5_legs_init(P, self.blocks, self.conj_sym)
        Vinv = V.conj().T  # V has orthonormal columns
        B = torch.randn(P, H, dtype=torch.float64) / math.sqrt(H)  # LeCun normal, fan-in H
        B_t = Vinv @ B.to(torch.complex128)
        C = torch.complex(torch.randn(H, P, dtype=torch.float64), torch.randn(H, P, dtype=torch.float64))
        C_t = (C / math.sqrt(2 * P)) @ V
        with torch.no_grad():
            self.Lambda_re_log.copy_(inverse_real_part(lam.real, self.real_transform))
            self.Lambda_im.copy_(lam.imag)
            self.B_re.copy_(B_t.real)
            self.B_im.copy_(B_t.imag)
            self.C_re.copy_(C_t.real)
            self.C_im.copy_(C_t.imag)
            if self.bidirectional:
                C2 = torch.complex(torch.randn(H, P, dtype=torch.float64), torch.randn(H, P, dtype=torch.float64))
                C2_t = (C2 / math.sqrt(2 * P)) @ V
                self.C_bwd_re.copy_(C2_t.real)
                self.C_bwd_im.copy_(C2_t.imag)
            self.D.normal_(0.0, math.sqrt(2 / H) if self.full_D else 1.0)
            steps = torch.linspace(math.log(self.dt_min), math.log(self.dt_max), lam.shape[0], dtype=torch.float64)
            self.log_step.copy_(steps)

    def state_shape(self) -> tuple[int, ...]:
        return (self.Lambda_im.shape[0],)

    def continuous_eigenvalues(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """Λ [P_s] complex (real part < 0 by construction, except with ``real_transform="none"``)."""
        return torch.complex(real_part(self.Lambda_re_log.to(dtype), self.real_transform), self.Lambda_im.to(dtype))

    @honours_fast_path
    def forward(self, x: torch.Tensor, cache: SSMCache | None = None, *, lengths: torch.Tensor | None = None,
                integration_timesteps: torch.Tensor | None = None) -> torch.Tensor:
        """y = S5(x). See ``LTIMixer.forward``; in addition:

        Args:
            integration_timesteps (Tensor | None): [B, T] non-negative time since the previous event;
                scales the step of Ā (the system becomes time-varying, so it runs as a scan in either
                mode). Default: None (regular sampling).

        Raises:
            ValueError: integration_timesteps of the wrong shape or negative.
        """
        check_input("S5", x, self.d_model, device=self.D.device)
        check_timesteps("S5", integration_timesteps, *x.shape[:2])
        return self._forward(x, cache, lengths, integration_timesteps=integration_timesteps)

    def _ssm(self, u: torch.Tensor, *, mode: str, reverse: bool, h0, lengths,
             integration_timesteps: torch.Tensor | None = None, cp=None) -> tuple[torch.Tensor, Any]:
        cdt = u.dtype
        A = self.continuous_eigenvalues(cdt)
        dt = torch.exp(self.log_step.to(cdt)) * self.step_rescale
        A_bar, gamma = self._discretize(A, dt)
        B_bar = gamma[:, None] * torch.complex(self.B_re.to(cdt), self.B_im.to(cdt))
        v = complex_linear(u, B_bar)  # [B, T, Ps]
        # The scan multiplies by Ā itself, so τ = 1 reproduces the regular model bit for bit.
        a = A_bar if mode == "scan" else None
        if integration_timesteps is not None:
            tau = integration_timesteps.to(cdt)
            if reverse:
                # Walking backwards, the step from t + 1 to t spans the interval that ended at t + 1
                # (on the next rank for a chunk's last step under context parallelism).
                tau = torch.cat((tau[:, 1:], self._next_interval(tau, cp)), 1)
            a, _ = self._discretize(A, dt, tau.unsqueeze(-1))
        log_lam = dt * A if self.discretization in ("zoh", "dirac", "async") else torch.log(A_bar)
        h, final = diag_states(log_lam, v, mode=mode, reverse=reverse, h0=h0, lengths=lengths, a=a, cp=cp)
        C = (self.C_bwd_re, self.C_bwd_im) if reverse else (self.C_re, self.C_im)
        C = torch.complex(C[0].to(cdt), C[1].to(cdt))
        h = h.to(complex_dtype(cdt))
        y = h.real @ C.real.T - h.imag @ C.imag.T
        return (2 * y if self.conj_sym else y), final

    @staticmethod
    def _next_interval(tau: torch.Tensor, cp) -> torch.Tensor:
        """[B, 1]: the interval after this chunk's last step (the next rank's first; 1 past the end)."""
        ones = torch.ones_like(tau[:, :1])
        if cp is None:
            return ones
        firsts = gather_stack(tau[:, :1], cp)  # [W, B, 1]
        return firsts[cp.rank + 1] if cp.rank + 1 < cp.world_size else tie(ones, firsts)

    def _discretize(self, A: torch.Tensor, dt: torch.Tensor, tau: torch.Tensor | None = None):
        """``(Ā, gamma)`` for this layer's method; ``tau`` [B, T, 1] scales the step of Ā only."""
        if self.discretization == "no_discretization":
            # Λ is the discrete decay itself; a gap of τ steps applies it τ times.
            A_bar = A if tau is None else torch.exp(tau * torch.log(A))
            return A_bar, torch.ones_like(A)
        method = "zoh" if self.discretization == "async" else self.discretization
        return discretize(A, dt, method, dt_A=None if tau is None else dt * tau)

    def _skip(self, u):
        if self.full_D:
            return u @ self.D.to(u.dtype)
        return u * self.D.to(u.dtype)

"""S4: structured state spaces with a diagonal-plus-low-rank state matrix (Gu, Goel & Ré 2022,
"Efficiently modeling long sequences with structured state spaces").

Each channel h is a SISO system of N states whose matrix is the HiPPO matrix in its
normal-plus-low-rank form, diagonalised: ``A = Λ - P P^*`` (one eigenvalue of each conjugate pair
stored, so N/2 complex parameters), discretised with the bilinear transform:

    conv mode:  K = Cauchy + Woodbury kernel (seqblocks.ops.ssm_conv_kernels.dplr_kernel),  y = K * u + D u
    scan mode:  x_t = Ā x_{t-1} + B̄ u_t,  y_t = C x_t + D u_t  with the dense Ā (N x N per channel)

followed, as in S4, by an activation (GELU), dropout and a position-wise output map (GLU).

The output vector is the true ``C`` (S4's code trains ``C̃ = C (I - Ā^L)`` tied to one length); the
kernel generator applies the truncation correction for the length at hand, so the convolution and
the recurrence agree at every length. Ā is not diagonal (and diagonalising HiPPO matrices is
ill-conditioned), so the recurrence cannot use ``linear_scan``: scan mode runs the dense recurrence
chunk by chunk (``dense_scan``: batched contractions inside chunks, a Python loop over T / 16 chunk
ends). It is the prefill and decoding form; train in conv mode. With ``truncate_kernel`` (a kernel
cut after ``l_max`` steps, as S4 code built with ``l_max`` computes) both modes convolve and a cache
holds the last ``l_max - 1`` inputs instead (``DiagonalSSMParams``).

Shapes: B batch, T time, H model width (= D), N state size, n = N / 2, r low rank.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from seqblocks.layers.mixers._lti import LTIMixer, SSMCache, complex_dtype, reverse_rows
from seqblocks.layers.mixers.s4d import DiagonalSSMParams, real_part, set_optim
from seqblocks.layers.ssm_init import HIPPO_MEASURES, nplr, on_cpu, s4d_init
from seqblocks.ops.ssm_conv_kernels import dplr_bilinear, dplr_kernel
from seqblocks.registry import MIXERS

__all__ = ["S4", "S4_INITS", "s4_init"]

#: S4's initialisations: the HiPPO measures (DPLR form), the diagonal starts, and a random DPLR start.
S4_INITS = HIPPO_MEASURES + ("diag-lin", "diag-inv", "diag-real", "random")


@on_cpu
def s4_init(init: str, N: int, H: int, rank: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(Λ [n] or [H, n], P [rank, n], B [n])`` complex128 for an S4 ``init`` (see ``S4``), n = N / 2.

    Raises:
        ValueError: unknown init.
    """
    n = N // 2
    P = torch.zeros(rank, n, dtype=torch.complex128)
    if init in HIPPO_MEASURES:
        lam, P0, B, _ = nplr(init, N)
        P[: P0.shape[0]] = P0
        return lam, P, B
    ones = torch.ones(n, dtype=torch.complex128)
    if init in ("diag-lin", "diag-inv"):
        lam, _ = s4d_init(init[5:], N)
        return lam, P, ones
    if init == "diag-real":
        return torch.complex(-(torch.arange(n, dtype=torch.float64) + 1), torch.zeros(n, dtype=torch.float64)), P, ones
    if init == "random":
        imag = torch.exp(torch.randn(H, n, dtype=torch.float64))
        lam = torch.complex(torch.full((H, n), -0.5, dtype=torch.float64), imag)
        P = torch.complex(torch.randn(rank, n, dtype=torch.float64), torch.randn(rank, n, dtype=torch.float64))
        return lam, P / math.sqrt(2), ones
    raise ValueError(f"S4: unknown init {init!r}; expected one of {S4_INITS}")


def dense_scan(A_bar: torch.Tensor, B_bar: torch.Tensor, u: torch.Tensor, h0: torch.Tensor,
               chunk: int = 16) -> torch.Tensor:
    """All states of ``x_t = Ā x_{t-1} + B̄ u_t`` with a dense per-channel Ā, chunk by chunk.

    Inside a chunk of C steps the states are ``x_{c,j} = Ā^{j+1} x_{c-1} + sum_{i<=j} Ā^{j-i} B̄ u_{c,i}``:
    the sum is one batched contraction with the Toeplitz matrix of ``Ā^k B̄`` and the carry one with the
    powers ``Ā^{j+1}``; only the chunk-end states ``x_c = Ā^C x_{c-1} + ...`` are stepped in a Python
    loop (T / C matrix-vector products).

    Args:
        A_bar (Tensor): [H, N, N]; B_bar (Tensor): [H, N]; u (Tensor): [B, T, H]; h0 (Tensor): [B, H, N],
            all of one complex dtype.
        chunk (int): C. Default: 16.

    Returns:
        Tensor: [B, T, H, N].
    """
    Bsz, T, H = u.shape
    if T == 0:
        return u.new_zeros(Bsz, 0, H, A_bar.shape[-1])
    C = min(chunk, T)
    n_chunks = -(-T // C)
    u = torch.cat((u, u.new_zeros(Bsz, n_chunks * C - T, H)), 1).view(Bsz, n_chunks, C, H)
    powers = [A_bar]  # Ā^{j+1}, j < C
    for _ in range(C - 1):
        powers.append(powers[-1] @ A_bar)
    P = torch.stack(powers)  # [C, H, N, N]
    S = torch.cat((B_bar.unsqueeze(0), torch.einsum("khij,hj->khi", P[:-1], B_bar)))  # Ā^k B̄: [C, H, N]
    lag = torch.arange(C, device=u.device)
    lag = lag[:, None] - lag[None, :]  # j - i
    toeplitz = torch.where((lag >= 0)[:, :, None, None], S[lag.clamp(min=0)], torch.zeros((), dtype=S.dtype,
                                                                                         device=S.device))
    local = torch.einsum("jihn,bcih->bcjhn", toeplitz, u)  # [B, n_chunks, C, H, N], zero incoming state
    carry, carries = h0, []
    for c in range(n_chunks):
        carries.append(carry)
        carry = torch.einsum("hij,bhj->bhi", P[-1], carry) + local[:, c, -1]
    states = local + torch.einsum("jhik,bchk->bcjhi", P, torch.stack(carries, 1))
    return states.reshape(Bsz, n_chunks * C, H, -1)[:, :T]


@MIXERS.register("S4")
class S4(DiagonalSSMParams, LTIMixer):
    """S4 with the DPLR (normal plus low-rank) HiPPO parameterisation.

    Args:
        d_model (int): model width H.
        d_state (int): state size N of each channel (even). Default: 64.
        l_max (int | None): the kernel length of S4-style callers. Alone it is accepted and unused (the
            kernel spans the input); with ``truncate_kernel=True`` the kernel stops after l_max steps.
            Default: None.
        dt_min (float): smallest initial step (log-uniform per channel). Default: 0.001.
        dt_max (float): largest initial step. Default: 0.1.
        rank (int): rank r of the low-rank term; raised to what the measure needs (legt needs 2).
            Default: 1.
        init (str): HiPPO measure "legs", "legt" or "fourier" (the DPLR form of its matrix); or a diagonal
            start with P = 0 and B = 1: "diag-lin" (-1/2 + iπn), "diag-inv" (-1/2 + i (N/π)(N/(2n+1) - 1)),
            "diag-real" (-(n + 1), no oscillation); or "random" (Λ = -1/2 + i exp(ε), ε standard
            normal per channel and state, B = 1, a standard complex normal low-rank P). Default: "legs".
        real_transform (str): how Re(Λ) is stored: "exp", "softplus", "relu" or "none". Default: "exp".
        dropout (float): dropout after the activation. Default: 0.0.
        activation (str | None): pointwise activation after the SSM. Default: "gelu".
        final_act (str | None): output map: "glu", "id", "gelu" (Linear then GELU) or None. Default: "glu".
        lr (float | None): learning-rate hint on the SSM parameters. Default: None.
        wd (float): weight-decay hint on the SSM parameters. Default: 0.0.
        mode (str): "conv" or "scan". Default: "conv".
        bidirectional (bool): add a reversed pass with its own C. Default: False.
        channels (int): output maps C per channel sharing one state (a multi-output SSM): the system
            gives [B, T, channels * H], which the output map (``final_act`` "glu", "id" or "gelu") takes back to
            H. Default: 1.
        gate (int | None): a multiplicative gate of width gate * H (as in GSS):
            ``y = gelu(W_o act(y) ⊙ gate_act(W_i x))`` before the output map, which then reads gate * H
            features. Default: None (no gate).
        gate_act (str | None): activation on the gate branch ``W_i x`` ("gelu", ...; needs ``gate``).
            Default: None (none).
        double_activation (bool): apply ``activation`` twice before the dropout on the ungated path (code
            whose ungated path runs a conv activation and then a multiplicative one). Default: False.
        truncate_kernel (bool): with ``l_max``, the kernel stops after l_max steps (``K_l = 0`` for
            l >= l_max, the convolution of S4 code built with ``l_max``); decoding then keeps the last
            l_max - 1 inputs [B, l_max - 1, H] instead of the state. Default: False.
        transposed (bool | None): the seed calling convention when a bool: forward takes and returns
            [B, H, T] when True ([B, T, H] when False) and returns ``(y, state)``, state being the
            cache's state after the call (None without a cache). Blocks and models adapt to it.
            Default: None (the mixer contract: [B, T, H] in, y out).
        layer_idx, device, dtype: as every mixer.

    Raises:
        ValueError: odd or non-positive d_state, unknown init / transform / mode / activation, rank < 1,
            channels < 1, gate < 1, channels or gate > 1 with ``final_act=None``, gate_act without a gate,
            double_activation with a gate, truncate_kernel without l_max.
        TypeError: a non-bool transposed, double_activation or truncate_kernel.
    """

    # Kept fp32 under a bf16 / fp16 cast of the module (the DPLR state matrix and step sizes; Mixer.keep_in_fp32).
    keep_in_fp32 = ("A_real", "A_imag", "P_re", "P_im", "log_dt")

    def __init__(self, d_model: int, d_state: int = 64, *, l_max: int | None = None, dt_min: float = 0.001,
                 dt_max: float = 0.1, rank: int = 1, init: str = "legs", real_transform: str = "exp",
                 dropout: float = 0.0, activation: str | None = "gelu", final_act: str | None = "glu",
                 lr: float | None = None, wd: float = 0.0, mode: str = "conv", bidirectional: bool = False,
                 channels: int = 1, gate: int | None = None, transposed: bool | None = None,
                 layer_idx: int | None = None, device=None, dtype=None, gate_act: str | None = None,
                 double_activation: bool = False, truncate_kernel: bool = False) -> None:
        super().__init__()
        self._init_common(d_model, mode, bidirectional)
        if init not in S4_INITS:
            raise ValueError(f"S4: unknown init {init!r}; expected one of {S4_INITS}")
        if not isinstance(rank, int) or rank < 1:
            raise ValueError(f"S4: rank must be a positive int, got {rank!r}")
        if transposed not in (None, True, False):
            raise TypeError(f"S4: transposed must be None or a bool, got {transposed!r}")
        self.transposed = transposed
        kw = {"device": device, "dtype": dtype}
        self._init_diagonal("S4", d_state, dt_min, dt_max, real_transform, l_max, kw, channels=channels,
                            truncate_kernel=truncate_kernel)
        self.init = init
        self.layer_idx = layer_idx
        self.scan_chunk = 16  # chunk length of the dense recurrence in scan mode (see ``dense_scan``)
        self.rank = max(rank, 2 if init == "legt" else 1)
        H, n, r = d_model, d_state // 2, self.rank
        self.P_re = nn.Parameter(torch.empty(H, r, n, **kw))
        self.P_im = nn.Parameter(torch.empty(H, r, n, **kw))
        self._init_tail("S4", activation, final_act, dropout, gate, gate_act, double_activation, kw)
        set_optim((self.A_real, self.A_imag, self.P_re, self.P_im, self.B_re, self.B_im, self.log_dt), lr, wd)
        self.reset_parameters()

    @on_cpu  # the values are computed on the CPU and copied into the parameters, wherever they live
    def reset_parameters(self) -> None:
        lam, P, B = s4_init(self.init, self.d_state, self.d_model, self.rank)
        with torch.no_grad():
            self.P_re.copy_(P.real.expand(self.d_model, -1, -1))
            self.P_im.copy_(P.imag.expand(self.d_model, -1, -1))
        self._reset_diagonal(lam, B)

    def forward(self, x: torch.Tensor, cache: SSMCache | None = None, *,
                lengths: torch.Tensor | None = None):
        """y = post(SSM(x) + D x); see ``LTIMixer.forward``. With ``transposed`` set (the seed
        convention), x and y are [B, H, T] when True and the call returns ``(y, state)``, state being
        ``cache.state`` [B, H, N] after the call, or None without a cache."""
        if self.transposed is None:
            return self._forward(x, cache, lengths)
        if self.transposed:
            if not isinstance(x, torch.Tensor) or x.dim() != 3:
                raise ValueError(f"S4(transposed=True): x must be [B, H, T], got "
                                 f"{tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__}")
            x = x.transpose(1, 2)
        y = self._forward(x, cache, lengths)
        return (y.transpose(1, 2) if self.transposed else y), (None if cache is None else cache.state)

    def state_shape(self) -> tuple[int, ...]:
        return self._window_shape() if self.truncate_kernel else (self.d_model, self.d_state)

    def dplr(self, dtype: torch.dtype = torch.float32):
        """``(Λ [H, n], P [H, r, n], B [H, n], dt [H])`` in complex / real ``dtype``."""
        cd = complex_dtype(dtype)
        lam = torch.complex(real_part(self.A_real.to(dtype), self.real_transform), self.A_imag.to(dtype))
        P = torch.complex(self.P_re.to(dtype), self.P_im.to(dtype))
        B = torch.complex(self.B_re.to(dtype), self.B_im.to(dtype))
        return lam.to(cd), P.to(cd), B.to(cd), torch.exp(self.log_dt.to(dtype))

    def kernel(self, L: int, reverse: bool = False, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The convolution kernel K [H, L] (Cauchy + Woodbury); [channels, H, L] with channels > 1."""
        lam, P, B, dt = self.dplr(dtype)
        C = self._C(reverse, dtype)
        if self.channels == 1:
            return dplr_kernel(lam, P, B, C, dt, L)
        return torch.stack([dplr_kernel(lam, P, B, C[c], dt, L) for c in range(self.channels)])

    def discrete_system(self, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """Bilinear ``(Ā [H, N, N], B̄ [H, N])``, by dense solves.

        Without autograd (inference, decoding) the result is memoised, keyed on the parameters' storage
        and in-place version counters: a decode step then costs two small matmuls instead of H dense
        solves, and it stays capturable in a CUDA graph (``linalg.solve`` synchronises with the host).
        Any update of the parameters (an optimizer step, ``load_state_dict``, ``.to``) changes the key.
        """
        return self._memoised("_discrete_memo", dtype, lambda: dplr_bilinear(*self.dplr(dtype)))

    def _ssm(self, u, *, mode, reverse, h0, lengths):
        cdt = u.dtype
        T = u.shape[1]
        if self.truncate_kernel and h0 is not None:
            return self._windowed(u, h0, lengths)
        if mode == "conv" or self.truncate_kernel:
            return self._conv(u, reverse, cdt), None
        A_bar, B_bar = self.discrete_system(cdt)  # [H, N, N], [H, N]
        C = self._C(reverse, cdt)
        C_full = torch.cat((C, C.conj()), -1)  # [H, N]
        x = reverse_rows(u, lengths) if reverse else u
        if h0 is None:
            h0 = torch.zeros(u.shape[0], *self.state_shape(), dtype=A_bar.dtype, device=u.device)
        states = dense_scan(A_bar, B_bar, x.to(A_bar.dtype), h0.to(A_bar.dtype), self.scan_chunk)
        if self.channels == 1:
            y = (C_full * states).sum(-1).real
        else:  # [B, T, channels * H]
            y = torch.einsum("chn,bthn->btch", C_full, states).real.flatten(-2)
        if lengths is None:
            final = states[:, -1] if T > 0 else h0
        else:
            # The state after each row's own last token; a row of length 0 keeps its initial state.
            idx = (lengths - 1).clamp(min=0)
            final = states[torch.arange(u.shape[0], device=u.device), idx]
            final = torch.where((lengths > 0)[:, None, None], final, h0.to(final.dtype))
        if reverse:
            y = reverse_rows(y, lengths)
        return y, final

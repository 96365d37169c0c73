"""S7: a selective, simplified state-space layer (Soydan et al., 2024), on S5's MIMO state.

Every parameter of the recurrence is a linear function of the current input::

    x_t              = W_in u_t                                   # [B, T, D]
    Lambda_t, B_t, C_t, D_t, beta_t = W_proj x_t                  # [N], [N, D], [D, N], [D], [N]
    Lambda_t        += lambda_base                                # the base (documented below)
    Ā_t              = 1 - 1 / (Lambda_t^2 + 0.5)                 # stable reparameterisation, in [-1, 1)
    h_t              = Ā_t * h_{t-1} + B_t x_t + beta_t           # diagonal scan over N (seqblocks.ops.scan)
    y_t              = C_t h_t + (D_t + d_base) * x_t
    out_t            = y_t * sigmoid(W_g gelu(y_t))               # S5-style output gate

The reparameterisation (StableSSM's) makes the memory length of state n ``1 / (1 - Ā) = Lambda^2 +
0.5`` steps. **Base initialisation**: ``lambda_base`` is set so that these memory lengths are
geometrically spaced over ``timescale_range`` (default 1 to 1000 steps), deterministic, one per state
index: a spread of time scales like S4D / HiPPO's, instead of the constant that taking the real part of
HiPPO-N's eigenvalues gives (all -0.5, i.e. every Ā = -1/3). The input-dependent part of Lambda starts
small so that, at initialisation, each state's decay stays near its base.

The residual connection is left to the enclosing block (the mixer contract); the mixer adds none
unless ``input_residual=True`` (``out_t + u_t``, for checkpoints whose S7 layer includes its input).

Shapes: B batch, T time, D model width, N state.
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
    check_call,
    check_positive,
    check_range,
    is_empty,
    lengths_mask,
)
from seqblocks.layers.mixer import Mixer, honours_fast_path
from seqblocks.ops.scan import linear_scan
from seqblocks.ops.scan.step import s7_step
from seqblocks.parallel.scan import chunk_lengths, linear_scan_cp, mixer_context
from seqblocks.registry import MIXERS

__all__ = ["S7", "S7Cache", "s7_base_init"]


def s7_base_init(d_state: int, timescale_range: tuple[float, float]) -> torch.Tensor:
    """``lambda_base`` [N] whose memory lengths ``Lambda^2 + 0.5`` are geometric over the range."""
    lo, hi = timescale_range
    tau = torch.logspace(math.log10(lo), math.log10(hi), d_state, dtype=torch.float64)
    return torch.sqrt(tau - 0.5).float()


@dataclasses.dataclass(eq=False)
class S7Cache(Cache):
    """Decoding state of ``S7``.

    Attributes:
        state (Tensor): [B, N] the recurrent state, fp32 (float64 for a float64 module).
    """

    state: torch.Tensor = None


@MIXERS.register("S7")
class S7(Mixer):
    """S7: input-dependent A, B, C, D and state bias on an S5-style MIMO diagonal state.

    Args:
        d_model (int): model width D.
        d_state (int): state size N. Default: 64.
        J (int): number of blocks of the base initialisation: the N states are J blocks of N / J, each
            spanning the whole ``timescale_range`` (as S5's block-diagonal HiPPO init). Default: 1.
        use_fast_path (bool): let the decode step and scan run their Triton kernels on CUDA; False
            keeps every op on its PyTorch path (same results). Default: True.
        layer_idx (int | None): position in the stack. Default: None.
        device, dtype: parameter placement. Default: None.
        timescale_range (tuple[float, float]): keyword only; (lo, hi), 1 <= lo < hi: the memory
            lengths (in steps) of the base decays, spaced geometrically over each block's states.
            Default: (1.0, 1000.0).
        lambda_input_scale (float): keyword only; std of the input-dependent part of Lambda at init,
            relative to LeCun normal. Default: 0.1.
        input_residual (bool): keyword only; add the layer input to the gated output, ``out_t + u_t``
            (a residual inside the mixer, on top of the enclosing block's). Default: False.

    Raises:
        ValueError: non-positive sizes, a ``d_state`` that J does not divide, or a bad ``timescale_range``.
    """

    # Kept fp32 under a bf16 / fp16 cast of the module (the base decays and skip; Mixer.keep_in_fp32).
    keep_in_fp32 = ("lambda_base", "d_base")

    inputs = frozenset({"lengths"})
    # Under ``seqblocks.parallel.context_parallel`` the forward runs on its time chunk (scan state
    # passing: parallel/scan.py).
    context_parallel = "native"

    def __init__(
        self,
        d_model: int,
        d_state: int = 64,
        J: int = 1,
        use_fast_path: bool = True,
        layer_idx: int | None = None,
        device=None,
        dtype=None,
        *,
        timescale_range: tuple[float, float] = (1.0, 1000.0),
        lambda_input_scale: float = 0.1,
        input_residual: bool = False,
    ) -> None:
        super().__init__()
        check_positive("S7", d_model=d_model, d_state=d_state, J=J)
        if d_state % J:
            raise ValueError(f"S7: d_state={d_state} must be a multiple of J={J} (the number of init blocks)")
        self.J = J
        if not isinstance(input_residual, bool):
            raise TypeError(f"S7: input_residual must be a bool, got {input_residual!r}")
        self.input_residual = input_residual
        self.use_fast_path = bool(use_fast_path)
        if not isinstance(timescale_range, tuple | list) or len(timescale_range) != 2:
            raise TypeError(f"S7: timescale_range must be a pair (lo, hi), got {timescale_range!r}")
        lo, hi = timescale_range
        check_range("S7", "timescale_range[0]", lo, 1.0)
        check_range("S7", "timescale_range[1]", hi, lo, lo_open=True)
        check_range("S7", "lambda_input_scale", lambda_input_scale, 0.0)
        fk = {"device": device, "dtype": dtype}
        self.d_model, self.d_state = d_model, d_state
        self.timescale_range = (float(lo), float(hi))
        self.lambda_input_scale = float(lambda_input_scale)
        self.layer_idx = layer_idx
        D, N = d_model, d_state
        self.in_proj = nn.Linear(D, D, bias=False, **fk)
        self.x_proj = nn.Linear(D, N + N * D + D * N + D + N, bias=False, **fk)  # Lambda, B, C, D, beta
        self.gate_proj = nn.Linear(D, D, bias=False, **fk)
        self.lambda_base = nn.Parameter(torch.empty(N, device=device, dtype=torch.float32))
        self.d_base = nn.Parameter(torch.empty(D, device=device, dtype=torch.float32))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Base decays over ``timescale_range``; B, C scaled so B_t x_t and C_t h_t start O(1)."""
        D, N = self.d_model, self.d_state
        with torch.no_grad():
            self.in_proj.reset_parameters()
            self.gate_proj.reset_parameters()
            w = self.x_proj.weight
            lecun = 1 / math.sqrt(D)
            w[:N].normal_(0, lecun * self.lambda_input_scale)
            # B_t x_t = sum_d (W x)_d x_d is quadratic in x: a 1/D std keeps it O(1) for unit inputs.
            w[N : N + 2 * N * D].normal_(0, 1 / D)
            w[N + 2 * N * D :].normal_(0, lecun / math.sqrt(D))  # D_t and beta_t: small input-dependent parts
            self.lambda_base.copy_(s7_base_init(N // self.J, self.timescale_range).repeat(self.J))
            self.d_base.fill_(1.0)

    def allocate_inference_cache(self, batch_size: int, max_seqlen: int, dtype: torch.dtype | None = None,
                                 **kwargs: Any) -> S7Cache:
        """A zeroed ``S7Cache`` for ``batch_size`` sequences."""
        check_allocation("S7", batch_size, max_seqlen, dtype)
        device = self.in_proj.weight.device
        # fp32 state (float64 for a float64 module), whatever the activation dtype.
        state_dtype = torch.promote_types(torch.float32, self.in_proj.weight.dtype)
        return S7Cache.empty(batch_size, max_seqlen, device=device,
                             state=torch.zeros(batch_size, self.d_state, device=device, dtype=state_dtype))

    def decay(self, lam: torch.Tensor) -> torch.Tensor:
        """Ā = 1 - 1 / (Lambda^2 + 0.5): in [-1, 1) for every real Lambda."""
        return 1 - 1 / (lam * lam + 0.5)

    def _system(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """(Ā, B_t x_t + beta_t, C_t [.., D, N], D_t) for x [B, T, D], in fp32 (float64 for float64 x)."""
        D, N = self.d_model, self.d_state
        acc = torch.promote_types(torch.float32, x.dtype)
        lam, Bm, Cm, Dm, beta = self.x_proj(x).to(acc).split([N, N * D, D * N, D, N], dim=-1)
        a = self.decay(lam + self.lambda_base.to(acc))
        xf = x.to(acc)
        bu = torch.einsum("btnd,btd->btn", Bm.unflatten(-1, (N, D)), xf) + beta
        return a, bu, Cm.unflatten(-1, (D, N)), Dm + self.d_base.to(acc)

    @honours_fast_path
    def forward(self, x: torch.Tensor, cache: S7Cache | None = None, *,
                lengths: torch.Tensor | None = None) -> torch.Tensor:
        """x [B, T, D] -> y [B, T, D].

        Args:
            x (Tensor): [B, T, D] input (fp32, bf16 or fp16; the state is fp32).
            cache (S7Cache | None): continue from and update this cache. Default: None.
            lengths (Tensor | None): [B] valid prefix of each row; outputs past it are 0. Default: None.

        Raises:
            TypeError / ValueError: bad shapes or dtypes, a cache of the wrong type or batch size.
        """
        cp = mixer_context("S7", cache)  # None: the whole sequence is here
        x, in_dtype = check_call("S7", x, self.d_model, self.in_proj.weight, lengths if cp is None else None,
                                 cache, S7Cache)
        Bsz, T, _ = x.shape
        local = chunk_lengths("S7", lengths, Bsz, T, cp)  # lengths of this chunk (all of it without cp)
        if is_empty(x):  # the empty rule (layers/checks.py)
            return x.new_zeros(x.shape, dtype=in_dtype)
        xs = self.in_proj(x)
        if cache is not None and T == 1 and lengths is None:
            # One launch on CUDA after x_proj: the system, the update in place, the readout, the advance.
            y = s7_step(cache.state, xs[:, 0], self.x_proj(xs[:, 0]), self.lambda_base, self.d_base,
                        seqlen_offset=cache.seqlen_offset).unsqueeze(1)
        else:
            a, bu, Cm, Dt = self._system(xs)
            if cp is None:
                h, final = linear_scan(a, bu, None if cache is None else cache.state, lengths=lengths)
            else:
                h, final = linear_scan_cp(a, bu, lengths=lengths, cp=cp)
            if cache is not None:
                cache.state.copy_(final)
                cache.advance(T if lengths is None else lengths.to(cache.seqlen_offset))
            y = torch.einsum("btdn,btn->btd", Cm, h) + Dt * xs.to(Dt.dtype)
        y = y.to(x.dtype)
        y = y * torch.sigmoid(self.gate_proj(F.gelu(y)))
        if self.input_residual:
            y = y + x
        valid = lengths_mask(local, T, x.device)
        y = y if valid is None else y.masked_fill(~valid[..., None], 0.0)  # padded outputs are 0
        return y.to(in_dtype)

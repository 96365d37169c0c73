"""Griffin's recurrent block around the RG-LRU (De et al., 2024, "Griffin").

    g   = gelu(W_y u)                                     # gate branch        [B, T, E]
    x   = conv1d(W_x u)                                   # recurrent branch, causal depthwise conv
    r_t = sigmoid(W_a x_t + b_a)                          # recurrence gate (block-diagonal W_a)
    i_t = sigmoid(W_i x_t + b_i)                          # input gate      (block-diagonal W_i)
    a_t = a^(c r_t),  a = sigmoid(Lambda),  c = 8         # computed as log a_t = -c r_t softplus(-Lambda)
    h_t = a_t * h_{t-1} + sqrt(1 - a_t^2) * (i_t * x_t)   # diagonal real scan (seqblocks.ops.scan)
    out = W_o (h * g)

Initialisation follows the paper: ``a^c`` uniform in [0.9, 0.999] (``a_init_range``), so at full
recurrence gate the per-step decay spans memories of 10 to 1000 steps.

Shapes: B batch, T time, D model width, E recurrent width, H gate blocks, W conv width.
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
from seqblocks.ops.causal_conv1d import causal_conv1d
from seqblocks.ops.scan import linear_scan
from seqblocks.ops.scan.step import rglru_step
from seqblocks.ops.selective_scan.step import conv_step
from seqblocks.parallel.conv import conv_halo
from seqblocks.parallel.scan import chunk_lengths, linear_scan_cp, mixer_context
from seqblocks.registry import MIXERS

__all__ = ["RGLRU", "RGLRUCache"]

# Largest derivative allowed through sqrt(1 - a^2) (recurrentgemma's bound): near a = 1 the exact
# derivative diverges and bf16 training produces NaNs.
_MAX_SQRT_GRADIENT = 1000.0


class _SqrtBoundedGrad(torch.autograd.Function):
    """sqrt(x) whose derivative is capped at ``_MAX_SQRT_GRADIENT``."""

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(x)
        return torch.sqrt(x)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        (x,) = ctx.saved_tensors
        return grad / torch.sqrt(torch.clamp(4.0 * x, min=1.0 / _MAX_SQRT_GRADIENT ** 2))


@dataclasses.dataclass(eq=False)
class RGLRUCache(Cache):
    """Decoding state of ``RGLRU``.

    Attributes:
        conv_state (Tensor): [B, W - 1, E] the last W - 1 conv inputs, in the activation dtype.
        rnn_state (Tensor): [B, E] the RG-LRU state, fp32 (float64 for a float64 module).
    """

    conv_state: torch.Tensor = None
    rnn_state: torch.Tensor = None


@MIXERS.register("RGLRU")
class RGLRU(Mixer):
    """Griffin's recurrent block: a GeLU gate branch times conv -> RG-LRU, projected back.

    Args:
        d_model (int): model width D.
        d_conv (int): width W of the causal depthwise conv. Default: 4.
        expand (int | float): recurrent width E = int(expand * d_model) (Griffin uses 4/3).
            Default: 1.
        c (float): the fixed exponent scale of the recurrence gate. Default: 8.0.
        a_init_range (tuple[float, float]): (lo, hi) with 0 < lo < hi < 1: ``a^c`` is initialised
            uniformly in it. Default: (0.9, 0.999).
        num_heads (int): diagonal blocks of the gate projections W_a, W_i (must divide E); 1 is a
            dense gate. Default: 1.
        conv_bias (bool): bias in the conv. Default: True.
        bias (bool): biases in the input and output projections. Default: False.
        scale_first_input (bool): multiply the input at token index 0 by sqrt(1 - a_0^2) like every
            other one. False is the reference recurrentgemma rule: the first input enters unscaled,
            h_0 = i_0 * x_0 (with a zero initial state the decay there does not matter). Default: True.
        layer_idx (int | None): position in the stack. Default: None.
        device, dtype: parameter placement. Default: None.
        use_fast_path (bool): keyword only; let the conv, scan and decode step run their Triton kernels
            on CUDA; False keeps every op on its PyTorch path (same results). Default: True.
        gate_gelu (str): keyword only; the GeLU of the gate branch: "tanh" (the tanh approximation,
            Griffin's) or "exact" (the erf form). Default: "tanh".

    Raises:
        ValueError: non-positive sizes, a bad ``a_init_range`` or ``c``, num_heads not dividing E.
    """

    # Kept fp32 under a bf16 / fp16 cast of the module (the decay logit Lambda; Mixer.keep_in_fp32).
    keep_in_fp32 = ("a_param",)

    inputs = frozenset({"lengths"})
    # Under ``seqblocks.parallel.context_parallel`` the forward runs on its time chunk (conv halo, scan
    # state passing: parallel/scan.py).
    context_parallel = "native"

    def __init__(
        self,
        d_model: int,
        d_conv: int = 4,
        expand: int | float = 1,
        c: float = 8.0,
        a_init_range: tuple[float, float] = (0.9, 0.999),
        num_heads: int = 1,
        conv_bias: bool = True,
        bias: bool = False,
        scale_first_input: bool = True,
        layer_idx: int | None = None,
        device=None,
        dtype=None,
        *,
        use_fast_path: bool = True,
        gate_gelu: str = "tanh",
    ) -> None:
        super().__init__()
        if gate_gelu not in ("tanh", "exact"):
            raise ValueError(f"RGLRU: gate_gelu must be 'tanh' or 'exact', got {gate_gelu!r}")
        self.gate_gelu = gate_gelu
        if not isinstance(scale_first_input, bool):
            raise TypeError(f"RGLRU: scale_first_input must be a bool, got {scale_first_input!r}")
        self.scale_first_input = scale_first_input
        self.use_fast_path = bool(use_fast_path)
        check_positive("RGLRU", d_model=d_model, d_conv=d_conv, num_heads=num_heads)
        check_range("RGLRU", "expand", expand, 0, lo_open=True)
        if int(expand * d_model) <= 0:
            raise ValueError(f"RGLRU: expand must give a positive width, got expand={expand!r}")
        if not isinstance(a_init_range, tuple | list) or len(a_init_range) != 2:
            raise TypeError(f"RGLRU: a_init_range must be a pair (lo, hi), got {a_init_range!r}")
        lo, hi = a_init_range
        check_range("RGLRU", "a_init_range[0]", lo, 0, 1, lo_open=True, hi_open=True)
        check_range("RGLRU", "a_init_range[1]", hi, 0, 1, lo_open=True, hi_open=True)
        if not lo < hi:
            raise ValueError(f"RGLRU: a_init_range must satisfy 0 < lo < hi < 1, got {a_init_range!r}")
        check_range("RGLRU", "c", c, 0, lo_open=True)
        fk = {"device": device, "dtype": dtype}
        self.d_model, self.d_conv, self.expand, self.c = d_model, d_conv, expand, float(c)
        self.a_init_range = (float(lo), float(hi))
        self.d_inner = int(expand * d_model)
        if self.d_inner % num_heads:
            raise ValueError(f"RGLRU: num_heads={num_heads} must divide the recurrent width {self.d_inner}")
        self.num_heads = num_heads
        self.layer_idx = layer_idx
        w = self.d_inner // num_heads

        self.gate_proj = nn.Linear(d_model, self.d_inner, bias=bias, **fk)  # W_y, the GeLU branch
        self.in_proj = nn.Linear(d_model, self.d_inner, bias=bias, **fk)  # W_x, the recurrent branch
        self.conv_weight = nn.Parameter(torch.empty(self.d_inner, d_conv, **fk))
        self.conv_bias = nn.Parameter(torch.empty(self.d_inner, **fk)) if conv_bias else None
        self.gate_weight = nn.Parameter(torch.empty(2, num_heads, w, w, **fk))  # [W_a, W_i] blocks
        self.gate_bias = nn.Parameter(torch.empty(2, num_heads, w, **fk))
        # Lambda stays fp32: it sets the decay, and bf16 cannot tell sigmoid(Lambda)^8 = 0.999 from 1.
        self.a_param = nn.Parameter(torch.empty(self.d_inner, device=device, dtype=torch.float32))
        self.out_proj = nn.Linear(self.d_inner, d_model, bias=bias, **fk)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Griffin's initialisation (LeCun-normal projections, zero gate biases, a^c ~ U[lo, hi])."""
        with torch.no_grad():
            for lin in (self.gate_proj, self.in_proj):
                nn.init.normal_(lin.weight, std=1 / math.sqrt(self.d_model))
            nn.init.normal_(self.out_proj.weight, std=1 / math.sqrt(self.d_inner))
            for lin in (self.gate_proj, self.in_proj, self.out_proj):
                if lin.bias is not None:
                    lin.bias.zero_()
            nn.init.normal_(self.conv_weight, std=math.sqrt(0.01 / self.d_conv))
            if self.conv_bias is not None:
                self.conv_bias.zero_()
            nn.init.normal_(self.gate_weight, std=1 / math.sqrt(self.d_inner // self.num_heads))
            self.gate_bias.zero_()
            lo, hi = self.a_init_range
            a_pow_c = torch.empty_like(self.a_param).uniform_(lo, hi)
            a = a_pow_c ** (1.0 / self.c)
            self.a_param.copy_(torch.log(a) - torch.log1p(-a))  # logit(a)

    def decay_at_full_gate(self) -> torch.Tensor:
        """a^c [E]: the per-step decay when the recurrence gate is fully open (r_t = 1)."""
        return torch.exp(-self.c * F.softplus(-self.a_param.float()))

    def allocate_inference_cache(self, batch_size: int, max_seqlen: int, dtype: torch.dtype | None = None,
                                 **kwargs: Any) -> RGLRUCache:
        """A zeroed ``RGLRUCache`` for ``batch_size`` sequences."""
        check_allocation("RGLRU", batch_size, max_seqlen, dtype)
        device = self.in_proj.weight.device
        # fp32 state (float64 for a float64 module), whatever the activation dtype.
        state_dtype = torch.promote_types(torch.float32, self.in_proj.weight.dtype)
        conv_dtype = dtype or self.in_proj.weight.dtype
        return RGLRUCache.empty(
            batch_size, max_seqlen, device=device,
            conv_state=torch.zeros(batch_size, self.d_conv - 1, self.d_inner, device=device, dtype=conv_dtype),
            rnn_state=torch.zeros(batch_size, self.d_inner, device=device, dtype=state_dtype),
        )

    def _gates(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        # Block-diagonal W_a, W_i: [..., E] -> two [..., E] pre-activations.
        xb = x.unflatten(-1, (self.num_heads, -1))  # [..., H, w]
        pre = torch.einsum("...hi,ghij->g...hj", xb, self.gate_weight.to(x.dtype))
        pre = pre + self.gate_bias.to(x.dtype).view(2, *([1] * (x.dim() - 1)), self.num_heads, -1)
        return pre[0].flatten(-2), pre[1].flatten(-2)

    def _recurrence_inputs(self, x: torch.Tensor,
                           first: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """(a_t, sqrt(1 - a_t^2) * i_t * x_t) in fp32 (float64 for float64 ``x``), for conv outputs [B, T, E].
        ``first`` [B, T] bool marks the tokens at index 0, whose multiplier is 1 when
        ``scale_first_input`` is False."""
        acc = torch.promote_types(torch.float32, x.dtype)
        ra, ri = self._gates(x)
        r, i = torch.sigmoid(ra.to(acc)), torch.sigmoid(ri.to(acc))
        log_a = -self.c * r * F.softplus(-self.a_param.to(acc))  # log(sigmoid(Lambda)^(c r))
        a = torch.exp(log_a)
        mult = _SqrtBoundedGrad.apply(-torch.expm1(2 * log_a))  # sqrt(1 - a^2), accurate near a = 1
        if first is not None:
            mult = torch.where(first[..., None], torch.ones_like(mult), mult)
        return a, mult * (i * x.to(acc))

    @honours_fast_path
    def forward(self, x: torch.Tensor, cache: RGLRUCache | None = None, *,
                lengths: torch.Tensor | None = None) -> torch.Tensor:
        """x [B, T, D] -> y [B, T, D].

        Args:
            x (Tensor): [B, T, D] input (fp32, bf16 or fp16; the state is fp32).
            cache (RGLRUCache | None): continue from and update this cache. Default: None.
            lengths (Tensor | None): [B] valid prefix of each row; outputs past it are 0. Default: None.

        Raises:
            TypeError / ValueError: bad shapes or dtypes, a cache of the wrong type or batch size.
        """
        cp = mixer_context("RGLRU", cache)  # None: the whole sequence is here
        x, in_dtype = check_call("RGLRU", x, self.d_model, self.in_proj.weight, lengths if cp is None else None,
                                 cache, RGLRUCache)
        Bsz, T, _ = x.shape
        local = chunk_lengths("RGLRU", lengths, Bsz, T, cp)  # lengths of this chunk (all of it without cp)
        if is_empty(x):  # the empty rule (layers/checks.py)
            return x.new_zeros(x.shape, dtype=in_dtype)
        g = F.gelu(self.gate_proj(x), approximate="tanh" if self.gate_gelu == "tanh" else "none")
        xs = self.in_proj(x)
        if cache is not None and T == 1 and lengths is None and self.scale_first_input:
            # Two fused ops (one Triton launch each on CUDA): the conv step also advances the cache, the
            # RG-LRU step computes the gates' nonlinearities and the update in place.
            xc = conv_step(xs[:, 0], cache.conv_state, self.conv_weight, self.conv_bias,
                           seqlen_offset=cache.seqlen_offset)
            ra, ri = self._gates(xc)
            h = rglru_step(cache.rnn_state, xc, ra, ri, self.a_param, self.c)
            return self.out_proj(h.to(x.dtype).unsqueeze(1) * g).to(in_dtype)
        conv_init = None if cache is None else cache.conv_state
        if cp is not None:  # this rank's chunk continues from the previous rank's conv inputs
            conv_init = conv_halo(xs, self.d_conv, cp=cp)
        xc, conv_final = causal_conv1d(xs, self.conv_weight, self.conv_bias, initial_state=conv_init, lengths=local)
        first = None
        if not self.scale_first_input:
            start = torch.zeros(Bsz, dtype=torch.long, device=x.device) if cache is None else cache.seqlen_offset
            if cp is not None:
                start = start + cp.offset(T)
            first = (start[:, None] + torch.arange(T, device=x.device)) == 0  # [B, T]
        a, b = self._recurrence_inputs(xc, first)
        if cp is None:
            h, final = linear_scan(a, b, None if cache is None else cache.rnn_state, lengths=lengths)
        else:
            h, final = linear_scan_cp(a, b, lengths=lengths, cp=cp)
        if cache is not None:
            cache.conv_state.copy_(conv_final)
            cache.rnn_state.copy_(final)
            cache.advance(T if lengths is None else lengths.to(cache.seqlen_offset))
        y = self.out_proj(h.to(x.dtype) * g)
        valid = lengths_mask(local, T, x.device)
        # Padded outputs are 0, also when the padding holds NaN (the gate branch reads it).
        y = y if valid is None else y.masked_fill(~valid[..., None], 0.0)
        return y.to(in_dtype)


MIXERS.register("rg_lru", RGLRU, description="alias of 'RGLRU': Griffin's recurrent block")

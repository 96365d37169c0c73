"""Mamba (S6): the selective state-space mixer of Gu & Dao (2023), with STREAM's event form.

    x, z   = in_proj(u).chunk(2)                         # [B, T, E] each, E = expand * D
    x      = silu(causal_conv1d(x))                      # short depthwise conv, width d_conv
    dt, B, C = x_proj(x)                                 # dt through a rank-R bottleneck
    dt     = softplus(dt_proj(dt))                       # [B, T, E], bias initialised so dt in [dt_min, dt_max]
    y      = selective_scan(x, dt, A, B, C, D, z)        # A = -exp(A_log), S4D-real: A[:, n] = -(n + 1)
    out    = out_proj(y)

Event form (STREAM, ``integration_timesteps`` [B, T] given): the step of ``Ā`` is the learned,
input-dependent ``dt`` scaled by the time elapsed since the previous event, ``Ā = exp(A dt tau_t)``,
while ``B̄`` keeps ``dt``. Intervals of exactly 1 reproduce the regular model bit for bit.

Shapes: B batch, T time, D model width, E inner width, N state, R dt rank, W conv width.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.modules import module as _nn_module
from torch.utils.checkpoint import checkpoint

from seqblocks.cache import Cache
from seqblocks.layers.checks import (
    check_allocation,
    check_cache,
    check_input,
    check_lengths,
    check_positive,
    check_range,
    check_timesteps,
    is_empty,
    to_module_dtype,
)
from seqblocks.layers.mixer import Mixer, honours_fast_path
from seqblocks.layers.recompute import RecomputedSaves
from seqblocks.ops.causal_conv1d import causal_conv1d, runs_kernel
from seqblocks.ops.discretize import DISCRETIZATIONS
from seqblocks.ops.selective_scan import selective_scan, selective_state_update
from seqblocks.ops.selective_scan.step import conv_step, mamba_layer_step, mamba_step
from seqblocks.parallel.conv import conv_halo
from seqblocks.parallel.scan import chunk_lengths, mixer_context, selective_scan_cp
from seqblocks.registry import MIXERS

__all__ = ["Mamba", "MambaCache"]


@dataclasses.dataclass(eq=False)
class MambaCache(Cache):
    """Decoding state of ``Mamba``.

    Attributes:
        conv_state (Tensor): [B, W - 1, E] the last W - 1 conv inputs, in the activation dtype.
        ssm_state (Tensor): [B, E, N] the recurrent state, fp32 (float64 for a float64 module).
    """

    conv_state: torch.Tensor = None
    ssm_state: torch.Tensor = None


@MIXERS.register("Mamba")
class Mamba(Mixer):
    """Mamba (S6) selective state-space mixer, optionally in STREAM's event form.

    Args:
        d_model (int): model width D.
        d_state (int): state size N per channel. Default: 16.
        d_conv (int): width W of the causal depthwise conv. Default: 4.
        expand (int): inner width E = expand * d_model. Default: 2.
        dt_rank (int | str): rank R of the dt projection; "auto" = ceil(d_model / 16). Default: "auto".
        dt_min (float): smallest initial dt. Default: 0.001.
        dt_max (float): largest initial dt. Default: 0.1.
        dt_init (str): "random" (uniform in +-R^-0.5 * dt_scale) or "constant" init of dt_proj's
            weight. Default: "random".
        dt_scale (float): scale of dt_proj's weight init. Default: 1.0.
        dt_init_floor (float): lower clamp of the initial dt. Default: 1e-4.
        conv_bias (bool): bias in the conv. Default: True.
        bias (bool): biases in in_proj and out_proj. Default: False.
        discretization (str): "mamba", "zoh", "bilinear" or "dirac". Default: "mamba".
        layer_idx (int | None): position in the stack. Default: None.
        device, dtype: parameter placement. Default: None.
        use_fast_path (bool): keyword only; let the conv, scan and decode step run their Triton kernels
            on CUDA; False keeps every op on its PyTorch path (same results). Default: True.

    Raises:
        ValueError: non-positive sizes, dt_min > dt_max, unknown dt_init or discretization.
    """

    # Kept fp32 under a bf16 / fp16 cast of the module (A, the skip D and the step bias; Mixer.keep_in_fp32).
    keep_in_fp32 = ("A_log", "D", "dt_proj.bias")
    #: Decode through ``mamba_step`` (two fused launches for conv + x_proj + dt_proj + state update + gate)
    #: where it computes what the module path does (docs/kernels.md). Set ``Mamba.fuse_decode_step =
    #: False`` (or on one instance) to keep the seven-launch step that calls the modules.
    fuse_decode_step: bool = True
    #: Also fold in_proj, and in a ``Block`` with ``fused_add_norm`` the add + norm before it
    #: (``add_norm_step``), into those two launches (``mamba_layer_step``: three launches a block instead
    #: of five). Off: on the H200 the folded step measured 1.04x (batch 1) and 1.01x (batch 8) the time of
    #: the five-launch one at its best block sizes (``benchmarks/mamba_step_fold.py``, docs/kernels.md).
    fold_in_proj: bool = False

    inputs = frozenset({"lengths", "integration_timesteps"})
    # Under ``seqblocks.parallel.context_parallel`` the forward runs on its time chunk: the conv takes
    # the previous rank's last W - 1 inputs, the scan passes its state across ranks (parallel/scan.py).
    context_parallel = "native"

    def __init__(
        self,
        d_model: int,
        d_state: int = 16,
        d_conv: int = 4,
        expand: int = 2,
        dt_rank: int | str = "auto",
        dt_min: float = 0.001,
        dt_max: float = 0.1,
        dt_init: str = "random",
        dt_scale: float = 1.0,
        dt_init_floor: float = 1e-4,
        conv_bias: bool = True,
        bias: bool = False,
        discretization: str = "mamba",
        layer_idx: int | None = None,
        device=None,
        dtype=None,
        *,
        use_fast_path: bool = True,
    ) -> None:
        super().__init__()
        self.use_fast_path = bool(use_fast_path)
        check_positive("Mamba", d_model=d_model, d_state=d_state, d_conv=d_conv, expand=expand)
        if dt_rank != "auto" and (not isinstance(dt_rank, int) or isinstance(dt_rank, bool) or dt_rank <= 0):
            raise ValueError(f"Mamba: dt_rank must be 'auto' or a positive int, got {dt_rank!r}")
        check_range("Mamba", "dt_min", dt_min, 0, lo_open=True)
        check_range("Mamba", "dt_max", dt_max, dt_min, lo_name="dt_min")
        check_range("Mamba", "dt_scale", dt_scale, 0, lo_open=True)
        check_range("Mamba", "dt_init_floor", dt_init_floor, 0)
        if dt_init not in ("random", "constant"):
            raise ValueError(f"Mamba: dt_init must be 'random' or 'constant', got {dt_init!r}")
        if discretization not in DISCRETIZATIONS:
            raise ValueError(f"Mamba: unknown discretization {discretization!r}; expected one of {DISCRETIZATIONS}")
        fk = {"device": device, "dtype": dtype}
        self.d_model, self.d_state, self.d_conv, self.expand = d_model, d_state, d_conv, expand
        self.d_inner = expand * d_model
        self.dt_rank = math.ceil(d_model / 16) if dt_rank == "auto" else dt_rank
        self.dt_min, self.dt_max, self.dt_init, self.dt_scale = dt_min, dt_max, dt_init, dt_scale
        self.dt_init_floor = dt_init_floor
        self.discretization = discretization
        self.layer_idx = layer_idx

        self.in_proj = nn.Linear(d_model, 2 * self.d_inner, bias=bias, **fk)
        self.conv_weight = nn.Parameter(torch.empty(self.d_inner, d_conv, **fk))
        self.conv_bias = nn.Parameter(torch.empty(self.d_inner, **fk)) if conv_bias else None
        self.x_proj = nn.Linear(self.d_inner, self.dt_rank + 2 * d_state, bias=False, **fk)
        self.dt_proj = nn.Linear(self.dt_rank, self.d_inner, bias=True, **fk)
        # A and D stay fp32 whatever the module dtype, as in Mamba: they set the recurrence's dynamics.
        self.A_log = nn.Parameter(torch.empty(self.d_inner, d_state, device=device, dtype=torch.float32))
        self.D = nn.Parameter(torch.empty(self.d_inner, device=device, dtype=torch.float32))
        self.out_proj = nn.Linear(self.d_inner, d_model, bias=bias, **fk)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Mamba's initialisation: S4D-real A, dt bias = softplus^-1 of log-uniform [dt_min, dt_max]."""
        self.in_proj.reset_parameters()
        self.x_proj.reset_parameters()
        self.out_proj.reset_parameters()
        with torch.no_grad():
            # nn.Conv1d's default init for a depthwise filter (fan_in = W).
            bound = 1 / math.sqrt(self.d_conv)
            self.conv_weight.uniform_(-bound, bound)
            if self.conv_bias is not None:
                self.conv_bias.uniform_(-bound, bound)
            std = self.dt_rank ** -0.5 * self.dt_scale
            if self.dt_init == "constant":
                self.dt_proj.weight.fill_(std)
            else:
                self.dt_proj.weight.uniform_(-std, std)
            lo, hi = math.log(self.dt_min), math.log(self.dt_max)
            dt = torch.exp(torch.rand(self.d_inner, device=self.D.device) * (hi - lo) + lo)
            dt = dt.clamp(min=self.dt_init_floor)
            # softplus^-1(dt) = dt + log(1 - exp(-dt)), written with expm1 for small dt.
            self.dt_proj.bias.copy_(dt + torch.log(-torch.expm1(-dt)))
            n = torch.arange(1, self.d_state + 1, dtype=torch.float32, device=self.A_log.device)
            self.A_log.copy_(torch.log(n).expand(self.d_inner, -1))
            self.D.fill_(1.0)

    def allocate_inference_cache(self, batch_size: int, max_seqlen: int, dtype: torch.dtype | None = None,
                                 **kwargs: Any) -> MambaCache:
        """A zeroed ``MambaCache`` for ``batch_size`` sequences (``max_seqlen`` does not change its size)."""
        check_allocation("Mamba", batch_size, max_seqlen, dtype)
        device = self.in_proj.weight.device
        # fp32 state (float64 for a float64 module), whatever the activation dtype.
        state_dtype = torch.promote_types(torch.float32, self.in_proj.weight.dtype)
        conv_dtype = dtype or self.in_proj.weight.dtype
        return MambaCache.empty(
            batch_size, max_seqlen, device=device,
            conv_state=torch.zeros(batch_size, self.d_conv - 1, self.d_inner, device=device, dtype=conv_dtype),
            ssm_state=torch.zeros(batch_size, self.d_inner, self.d_state, device=device, dtype=state_dtype),
        )

    @honours_fast_path
    def forward(self, x: torch.Tensor, cache: MambaCache | None = None, *, lengths: torch.Tensor | None = None,
                integration_timesteps: torch.Tensor | None = None) -> torch.Tensor:
        """x [B, T, D] -> y [B, T, D].

        Args:
            x (Tensor): [B, T, D] input (fp32, bf16 or fp16; the state is fp32).
            cache (MambaCache | None): continue from and update this cache (prefill, or a decode step
                when T = 1). Default: None.
            lengths (Tensor | None): [B] valid prefix of each row; the cache then holds each row's own
                state and advances by its length. Default: None.
            integration_timesteps (Tensor | None): [B, T] time since the previous event (STREAM form);
                [B] is accepted for a one-token step. Default: None (regular Mamba).

        Raises:
            TypeError / ValueError: bad shapes or dtypes, a cache of the wrong type or batch size.
        """
        check_input("Mamba", x, self.d_model, device=self.in_proj.weight.device)
        in_dtype, x = x.dtype, to_module_dtype(x, self.in_proj.weight.dtype)
        Bsz, T, _ = x.shape
        cp = mixer_context("Mamba", cache)  # None: the whole sequence is here
        if cp is None:
            check_lengths("Mamba", lengths, Bsz, T)
        local = chunk_lengths("Mamba", lengths, Bsz, T, cp)  # lengths of this chunk (all of it without cp)
        if isinstance(integration_timesteps, torch.Tensor) and integration_timesteps.dim() == 1 and T == 1:
            integration_timesteps = integration_timesteps.unsqueeze(1)  # a decode step's [B] intervals
        check_timesteps("Mamba", integration_timesteps, Bsz, T)
        if cache is not None:
            check_cache("Mamba", cache, MambaCache, Bsz, x.device)
        if is_empty(x):  # the empty rule (layers/checks.py)
            return x.new_zeros(x.shape, dtype=in_dtype)
        if cache is not None and T == 1 and lengths is None:
            return self._step(x, cache, integration_timesteps).to(in_dtype)
        x_in, z = self.in_proj(x).chunk(2, dim=-1)  # [B, T, E] each
        if cp is None:
            conv_state, conv_lengths = (None if cache is None else cache.conv_state), lengths
        else:  # this rank's chunk: the conv continues from the previous rank's inputs
            conv_state, conv_lengths = conv_halo(x_in, self.d_conv, cp=cp), local
        # Training keeps the conv output and the step sizes as recipes, not tensors (as mamba_ssm's
        # mamba_inner_fn does): both are recomputed in the backward from what stays saved anyway (x_in,
        # a view of in_proj's output; x_dbl's dt columns), 4 E bytes a token and layer less. Not with a
        # cache, whose conv state the call updates in place.
        with RecomputedSaves(enabled=cache is None) as saves:
            xs, conv_final = self._conv(x_in, conv_state, conv_lengths)
            saves.recompute(xs, lambda: self._conv(x_in, conv_state, conv_lengths)[0])
            dt, Bm, Cm = self._dt_B_C(xs, saves)
            A = -torch.exp(self.A_log.to(self._acc(x)))
            kw = self._step_kwargs(dt, integration_timesteps)
            if cp is None:
                y, final = selective_scan(xs, A=A, B=Bm, C=Cm, D=self.D.to(self._acc(x)), z=z,
                                          discretization=self.discretization, lengths=lengths,
                                          initial_state=None if cache is None else cache.ssm_state, **kw)
            else:
                y, final = selective_scan_cp(xs, A=A, B=Bm, C=Cm, D=self.D.to(self._acc(x)), z=z,
                                             discretization=self.discretization, lengths=lengths, cp=cp, **kw)
        if cache is not None:
            cache.conv_state.copy_(conv_final)
            cache.ssm_state.copy_(final)
            cache.advance(T if lengths is None else lengths.to(cache.seqlen_offset))
        return self.out_proj(y).to(in_dtype)

    def _conv(self, xs: torch.Tensor, conv_state: torch.Tensor | None,
              lengths: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        # silu(causal_conv1d(xs)). The Triton kernel saves only its inputs for backward. On the PyTorch
        # path, when training, the intermediates (the fp32 padded input and pre-activation, 16 bytes per
        # inner channel and step) are recomputed in backward instead of saved: recomputing needs only xs,
        # a view of in_proj's output, which the scan keeps for z anyway.
        conv = functools.partial(causal_conv1d, activation="silu", lengths=lengths)
        training = torch.is_grad_enabled() and (xs.requires_grad or self.conv_weight.requires_grad)
        if training and not runs_kernel(xs, self.conv_weight, self.conv_bias, conv_state):
            return checkpoint(conv, xs, self.conv_weight, self.conv_bias, initial_state=conv_state,
                              use_reentrant=False, preserve_rng_state=False)
        return conv(xs, self.conv_weight, self.conv_bias, initial_state=conv_state)

    def _dt_B_C(self, xs: torch.Tensor,
                saves: RecomputedSaves | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        dt, Bm, Cm = self.x_proj(xs).split([self.dt_rank, self.d_state, self.d_state], dim=-1)
        delta = F.linear(dt, self.dt_proj.weight)  # the bias enters as delta_bias
        if saves is not None:
            saves.recompute(delta, lambda: F.linear(dt, self.dt_proj.weight))
        return delta, Bm, Cm

    @staticmethod
    def _acc(t: torch.Tensor) -> torch.dtype:
        # The SSM's parameters and steps are computed in fp32 at least (float64 for float64 inputs).
        return torch.promote_types(torch.float32, t.dtype)

    def _step_kwargs(self, dt: torch.Tensor, ts: torch.Tensor | None) -> dict[str, Any]:
        acc = self._acc(dt)
        if ts is None:
            return {"delta": dt, "delta_bias": self.dt_proj.bias.to(acc), "delta_softplus": True}
        # Event form: the same softplus'd step (computed exactly as the op computes it), scaled by each
        # event's interval, drives Ā only; B̄ keeps the step itself.
        step = F.softplus(dt.to(acc) + self.dt_proj.bias.to(acc))
        return {"delta": step, "delta_A": step * ts.to(acc).unsqueeze(-1)}

    def _fuses_step(self, xz: torch.Tensor) -> bool:
        """Whether ``mamba_step`` computes exactly what the module path of ``_step`` would: x_proj and
        dt_proj plain ``nn.Linear`` (no subclass, wrapper or bias on x_proj), no module or global forward
        hooks that calling x_proj would run, plain weights (no tensor subclass: quantized, DTensor) in
        in_proj's output dtype, and no autocast region (which would change the GEMMs' dtype)."""
        if not self.fuse_decode_step:
            return False
        x_proj, dt_proj = self.x_proj, self.dt_proj
        if type(x_proj) is not nn.Linear or type(dt_proj) is not nn.Linear or x_proj.bias is not None:
            return False
        if x_proj._forward_hooks or x_proj._forward_pre_hooks or dt_proj._forward_hooks or dt_proj._forward_pre_hooks:
            return False
        if _nn_module._global_forward_hooks or _nn_module._global_forward_pre_hooks:
            return False
        plain = (torch.Tensor, nn.Parameter)
        weights = (x_proj.weight, dt_proj.weight)
        if any(type(w) not in plain or w.dtype != xz.dtype for w in weights):
            return False
        if dt_proj.bias is not None and type(dt_proj.bias) not in plain:
            return False
        return not torch.is_autocast_enabled(xz.device.type)

    def _fuses_in_proj(self, x: torch.Tensor) -> bool:
        """Whether folding in_proj into the fused step computes what calling it would: a plain
        ``nn.Linear`` without hooks, its weight (and bias) plain tensors in x's dtype."""
        in_proj = self.in_proj
        if type(in_proj) is not nn.Linear or in_proj._forward_hooks or in_proj._forward_pre_hooks:
            return False
        plain = (torch.Tensor, nn.Parameter)
        return (type(in_proj.weight) in plain and in_proj.weight.dtype == x.dtype
                and (in_proj.bias is None or type(in_proj.bias) in plain))

    def _layer_step(self, x: torch.Tensor, cache: MambaCache, **norm: Any) -> torch.Tensor | tuple:
        # in_proj .. out_proj's input as one op (with ``norm``: the block's add + norm before it too).
        return mamba_layer_step(
            x, self.in_proj.weight, cache.conv_state, self.conv_weight, self.x_proj.weight, self.dt_proj.weight,
            cache.ssm_state, self.A_log, self.conv_bias, self.D, in_proj_bias=self.in_proj.bias,
            delta_bias=self.dt_proj.bias, delta_softplus=True, discretization=self.discretization, a_is_log=True,
            activation="silu", seqlen_offset=cache.seqlen_offset, **norm)

    def add_norm_step(self, hidden_states: torch.Tensor, residual: torch.Tensor | None, norm: nn.Module,
                      residual_in_fp32: bool, cache: Any) -> tuple[torch.Tensor, torch.Tensor] | None:
        """A decode step of ``Block``'s Add -> Norm -> Mamba in one op (``Block.forward`` calls it with
        ``fused_add_norm=True``) when ``fold_in_proj`` is set: the residual add and the norm run inside the
        fused step's first kernel, so the block's mixer half is three launches on CUDA (two and out_proj).
        Returns ``(hidden_states [B, 1, D], residual [B, 1, D])`` as the block's add_norm followed by this
        mixer's forward would, or None with ``fold_in_proj`` off or where that call would differ (hooks on
        this module or in_proj, a global hook, ``use_fast_path=False``, context parallelism, dtypes the fold
        does not keep, a norm ``ops.add_norm`` cannot stand in for, a subclass overriding ``forward``); the
        block then takes its usual path.

        Raises:
            TypeError / ValueError: a cache of the wrong type or batch size (as ``forward``)."""
        from seqblocks.layers.norm import is_fusable_norm, norm_params

        if (not self.fold_in_proj or hidden_states.dim() != 3 or hidden_states.shape[1] != 1
                or hidden_states.shape[2] != self.d_model
                or not getattr(self, "use_fast_path", True) or self._forward_hooks or self._forward_pre_hooks
                or not is_fusable_norm(norm) or is_empty(hidden_states)
                or type(self).forward is not Mamba.forward or type(self)._step is not Mamba._step):
            return None  # (a subclass that changes the call keeps it)
        check_cache("Mamba", cache, MambaCache, hidden_states.shape[0], hidden_states.device)
        x = hidden_states[:, 0]
        if mixer_context("Mamba", cache) is not None or not self._fuses_in_proj(x) or not self._fuses_step(x):
            return None
        weight, bias, eps, is_rms = norm_params(norm, hidden_states.dtype)
        y, new_residual = self._layer_step(x, cache, residual=None if residual is None else residual[:, 0],
                                           norm="rmsnorm" if is_rms else "layernorm", norm_weight=weight,
                                           norm_bias=bias, eps=eps, residual_in_fp32=residual_in_fp32)
        return self.out_proj(y).unsqueeze(1), new_residual.unsqueeze(1)

    def _step(self, x: torch.Tensor, cache: MambaCache, ts: torch.Tensor | None) -> torch.Tensor:
        # One token, x [B, 1, D] (docs/kernels.md, "Decode step kernels"). The conv and SSM states
        # update in place and the conv op advances the cache's token count. With plain projections and
        # no event intervals, everything between in_proj and out_proj is ``mamba_step``: two Triton
        # launches on CUDA, x_proj and dt_proj folded in (x_dbl kept in fp32 there); with
        # ``fold_in_proj`` and a plain in_proj, in_proj too (``mamba_layer_step``). Otherwise
        # four GEMMs on views (no copies) around two fused ops, the projections called as the modules (as
        # in the prefill, so hooks or a swapped Linear act alike); dt_proj's bias is left to the fused step.
        E, R, N = self.d_inner, self.dt_rank, self.d_state
        if ts is None and self.fold_in_proj and self._fuses_in_proj(x[:, 0]) and self._fuses_step(x[:, 0]):
            return self.out_proj(self._layer_step(x[:, 0], cache)).unsqueeze(1)
        xz = self.in_proj(x[:, 0])  # [B, 2E]
        if ts is None and self._fuses_step(xz):
            y = mamba_step(xz[:, :E], cache.conv_state, self.conv_weight, self.x_proj.weight, self.dt_proj.weight,
                           cache.ssm_state, self.A_log, self.conv_bias, self.D, xz[:, E:],
                           delta_bias=self.dt_proj.bias, delta_softplus=True, discretization=self.discretization,
                           a_is_log=True, activation="silu", seqlen_offset=cache.seqlen_offset)
            return self.out_proj(y).unsqueeze(1)
        xs = conv_step(xz[:, :E], cache.conv_state, self.conv_weight, self.conv_bias, activation="silu",
                       seqlen_offset=cache.seqlen_offset)  # [B, E]
        x_dbl = self.x_proj(xs)  # [B, R + 2N]
        dt = F.linear(x_dbl[:, :R], self.dt_proj.weight)  # [B, E]
        Bm, Cm = x_dbl[:, R:R + N], x_dbl[:, R + N:]
        if ts is None:
            kw = {"delta": dt, "delta_bias": self.dt_proj.bias, "delta_softplus": True}
        else:
            kw = self._step_kwargs(dt, ts[:, 0])
        y = selective_state_update(cache.ssm_state, xs, A=self.A_log, a_is_log=True, B=Bm, C=Cm, D=self.D,
                                   z=xz[:, E:], discretization=self.discretization, **kw)
        return self.out_proj(y).unsqueeze(1)

"""Mixture-of-experts FFNs: "moe", "shared_moe" and "latent_moe" in the FFN registry.

Every token is routed to ``top_k_experts`` of ``n_experts`` expert FFNs; the output is the
router-weighted sum of their outputs (plus, with shared experts, an always-active FFN)::

    logits = x W_r                              (fp32 or wider)
    scores = softmax(logits) | sigmoid(logits)  (``moe_router``)
    chosen = top-k of (scores + expert_bias)    (the bias steers selection only; optional group limit;
                                                 ``moe_bias_mode`` moves it to the logits or the weights)
    w      = scores[chosen], renormalised to sum 1 (``moe_norm_topk``), times moe_routed_scaling_factor
    y      = sum_j w_j * expert_{chosen_j}(x) + shared(x)

The fast path never loops over experts in Python: the (token, expert) pairs are sorted by expert
(top-1 choices ahead of top-2, then by token), the gathered rows run through each expert weight
tensor [E, ...] as one grouped matrix product (``seqblocks.ops.grouped_gemm``), and the results are
scattered back and weighted. ``forward_dense`` is the readable reference: it runs every expert on
every token and masks. ``docs/moe.md`` has the math, the losses and the kernels.

- "moe": SwiGLU experts (Mixtral); ``n_shared_experts`` adds shared SwiGLU experts (default none).
- "shared_moe": the same with shared experts on by default (one; DeepSeek).
- "latent_moe": the router reads x, the experts (squared-ReLU, non-gated) run in a
  ``moe_latent_size`` latent space (x down-projected; the weighted sum up-projected), and one
  full-width squared-ReLU shared expert (Nemotron 3's LatentMoE); sigmoid scores by default.

In training each call stores ``aux_loss`` (``moe_aux_loss_coef`` times the Switch load-balance loss
plus ``moe_z_loss_coef`` times the router z-loss); the language models sum them into
``CausalLMOutput.aux_loss``. ``last_load`` / ``last_dropped`` hold the last call's expert loads
and dropped assignments; ``update_router_bias`` is the auxiliary-loss-free balancing step.

Shapes: B batch, T time, D width, N = B * T tokens, E experts, k top_k, F expert hidden width,
L latent width.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from seqblocks.config import BlockConfig
from seqblocks.layers.ffn import FFNBase, GatedFeedForward, ReLU2FeedForward, relu2
from seqblocks.ops.grouped_gemm import grouped_mm
from seqblocks.registry import FFNS

__all__ = ["MoEFeedForward", "SharedMoEFeedForward", "LatentMoEFeedForward", "load_balance_loss",
           "router_z_loss", "moe_modules"]


def load_balance_loss(probs: torch.Tensor, expert_index: torch.Tensor, n_experts: int) -> torch.Tensor:
    """Switch Transformer's load-balance loss ``E * sum_i f_i * P_i``.

    Args:
        probs (Tensor): [N, E] router probabilities (each row sums to 1).
        expert_index (Tensor): [N, k] chosen experts.
        n_experts (int): E.

    Returns:
        Tensor: scalar; f_i is the fraction of the N * k assignments that chose expert i, P_i the mean
        probability of expert i. 1 for perfectly uniform routing, E when every token sends all its
        probability and its choices to one expert.
    """
    counts = torch.zeros(n_experts, device=probs.device, dtype=probs.dtype)
    counts.scatter_add_(0, expert_index.reshape(-1), torch.ones_like(expert_index.reshape(-1), dtype=probs.dtype))
    f = counts / max(expert_index.numel(), 1)
    return n_experts * (f * probs.mean(0)).sum()


def router_z_loss(logits: torch.Tensor) -> torch.Tensor:
    """ST-MoE's router z-loss ``mean_n logsumexp(logits_n)^2`` over [N, E] logits: keeps them small."""
    return torch.logsumexp(logits, dim=-1).square().mean()


def moe_modules(module: nn.Module) -> list[MoEFeedForward]:
    """Every MoE FFN inside ``module`` (itself included), in module order."""
    return [m for m in module.modules() if isinstance(m, MoEFeedForward)]


def _uniform_(t: torch.Tensor, fan_in: int) -> None:
    bound = 1.0 / math.sqrt(fan_in)
    nn.init.uniform_(t, -bound, bound)


class MoEFeedForward(FFNBase):
    """Top-k routed SwiGLU experts ("moe"; the module docstring has the math).

    Args:
        config (BlockConfig): ``d_model``, ``d_ff`` and the MoE fields (``n_experts``,
            ``top_k_experts``, ``n_shared_experts``, ``moe_d_ff``, ``shared_expert_d_ff``,
            ``moe_routed_scaling_factor``, ``moe_n_groups``, ``moe_topk_groups``, ``moe_router``,
            ``moe_norm_topk``, ``moe_capacity_factor``, ``moe_aux_loss_coef``, ``moe_z_loss_coef``,
            ``moe_bias_update_rate``, ``moe_bias_mode``).
        device, dtype: parameter placement. Default: None.

    Parameters: ``router`` (Linear D -> E, no bias), ``w_gate_up`` [E, D, 2F] (gate then up),
    ``w_down`` [E, F, D], and ``shared`` (a SwiGLU of hidden n_shared * shared_expert_d_ff) when there
    are shared experts. Buffers: ``expert_bias`` [E] (selection bias, saved), ``expert_load`` [E]
    (assignments counted since the last bias update, not saved).
    """

    default_router = "softmax"
    default_shared = 0

    def __init__(self, config: BlockConfig, *, device=None, dtype=None) -> None:
        super().__init__(config)
        factory = {"device": device, "dtype": dtype}
        self.n_experts = config.n_experts if config.n_experts is not None else 8
        self.top_k = config.top_k_experts
        self.router_kind = config.moe_router or self.default_router
        self.n_shared = config.n_shared_experts if config.n_shared_experts is not None else self.default_shared
        self.expert_d_ff = config.moe_d_ff or config.d_ff
        self.shared_d_ff = config.shared_expert_d_ff or config.d_ff
        self.n_groups, self.topk_groups = config.moe_n_groups, config.moe_topk_groups
        self.scaling = config.moe_routed_scaling_factor
        self.norm_topk = config.moe_norm_topk
        self.capacity_factor = config.moe_capacity_factor
        self.aux_loss_coef, self.z_loss_coef = config.moe_aux_loss_coef, config.moe_z_loss_coef
        self.bias_update_rate = config.moe_bias_update_rate
        self.bias_mode = config.moe_bias_mode
        self.router = nn.Linear(self.d_model, self.n_experts, bias=False, **factory)
        self._build_experts(factory)
        self.shared = self._build_shared(factory) if self.n_shared > 0 else None
        self.register_buffer("expert_bias", torch.zeros(self.n_experts, device=device, dtype=torch.float32))
        self.register_buffer("expert_load", torch.zeros(self.n_experts, device=device, dtype=torch.float32),
                             persistent=False)
        #: the last training call's weighted loss (None in eval mode or before a call).
        self.aux_loss: torch.Tensor | None = None
        #: the last call's assignments per expert [E] (before capacity) and dropped assignments (scalar).
        self.last_load: torch.Tensor | None = None
        self.last_dropped: torch.Tensor | None = None

    # ---------------------------------------------------------------- construction

    @property
    def expert_width(self) -> int:
        """Width the experts read and write (d_model; the latent width for "latent_moe")."""
        return self.d_model

    def _build_experts(self, factory) -> None:
        E, D, Fh = self.n_experts, self.expert_width, self.expert_d_ff
        self.w_gate_up = nn.Parameter(torch.empty(E, D, 2 * Fh, **factory))
        self.w_down = nn.Parameter(torch.empty(E, Fh, D, **factory))
        self.reset_expert_parameters()

    def _build_shared(self, factory) -> nn.Module:
        cfg = BlockConfig(d_model=self.d_model, d_ff=self.n_shared * self.shared_d_ff, bias=False)
        return GatedFeedForward(cfg, **factory)

    def reset_expert_parameters(self) -> None:
        """nn.Linear's default init per expert: U(-1/sqrt(fan_in), 1/sqrt(fan_in))."""
        with torch.no_grad():
            for p in self.expert_parameters():
                _uniform_(p, p.shape[1])

    def expert_parameters(self) -> list[nn.Parameter]:
        """The routed experts' weight tensors (each [E, in, out])."""
        return [self.w_gate_up, self.w_down]

    def routed_parameter_count(self) -> int:
        """Parameters of all E routed experts (the part of which a token uses top_k / E)."""
        return sum(p.numel() for p in self.expert_parameters())

    def rescale_output_(self, factor: float) -> None:
        """Divide the projections that write into the residual stream by ``factor`` (the language
        models' depth-scaled init)."""
        with torch.no_grad():
            self.w_down.div_(factor)
            if self.shared is not None:
                self.shared.down.weight.div_(factor)

    def _apply(self, fn, recurse=True):
        # The balancing buffers stay fp32 (or wider) when the module moves to bf16 / fp16: a bias step
        # of 1e-3 would vanish in bf16 next to a bias of order 1. They follow device moves.
        kept = {name: self._buffers[name] for name in ("expert_bias", "expert_load")}
        out = super()._apply(fn, recurse)
        for name, old in kept.items():
            new = self._buffers[name]
            if new is not None and new.dtype != old.dtype and new.dtype.itemsize < 4:
                self._buffers[name] = old.to(device=new.device)
        return out

    # ---------------------------------------------------------------- routing

    def route(self, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """Router of [N, D] tokens, in fp32 (or wider).

        Returns:
            (index [N, k] chosen experts, best first; weights [N, k]; logits [N, E]; probs [N, E],
            the scores normalised per token, which the load-balance loss reads).
        """
        wide = torch.promote_types(h.dtype, torch.float32)
        logits = F.linear(h.to(wide), self.router.weight.to(wide))
        scores = logits.softmax(-1) if self.router_kind == "softmax" else logits.sigmoid()
        bias = self.expert_bias.to(wide)
        # moe_bias_mode: the bias shifts the scores for the choice only, the logits for the choice only,
        # or the scores themselves (choice and weights).
        weighed = scores + bias if self.bias_mode == "corrected" else scores
        select = logits + bias if self.bias_mode == "logits" else scores + bias
        if self.n_groups > 1:
            N, G = select.shape[0], self.n_groups
            per = self.n_experts // G
            grouped = select.view(N, G, per)
            group_score = grouped.topk(min(2, per), dim=-1).values.sum(-1)  # DeepSeek-V3: best two per group
            keep = group_score.topk(self.topk_groups, dim=-1).indices
            allowed = torch.zeros(N, G, dtype=torch.bool, device=h.device).scatter_(1, keep, True)
            select = select.masked_fill(~allowed.repeat_interleave(per, dim=1), float("-inf"))
        index = select.topk(self.top_k, dim=-1).indices
        weights = weighed.gather(1, index)
        if self.norm_topk:
            total = weights.sum(-1, keepdim=True)
            if self.bias_mode == "corrected":  # corrected scores can be negative: keep the sum's sign
                total = torch.where(total.abs() < 1e-20, torch.full_like(total, 1e-20), total)
            else:
                total = total.clamp_min(1e-20)
            weights = weights / total
        if self.scaling != 1.0:
            weights = weights * self.scaling
        probs = scores if self.router_kind == "softmax" else scores / scores.sum(-1, keepdim=True).clamp_min(1e-20)
        return index, weights, logits, probs

    def capacity(self, n_tokens: int) -> int | None:
        """Assignments one expert takes in this call: ceil(factor * N * k / E) in training with a
        capacity factor, else None (dropless)."""
        if self.capacity_factor is None or not self.training:
            return None
        return max(1, math.ceil(self.capacity_factor * n_tokens * self.top_k / self.n_experts))

    # ---------------------------------------------------------------- experts

    def _expert_input(self, h: torch.Tensor) -> torch.Tensor:
        return h

    def _expert_output(self, routed: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        return routed.to(dtype)

    def _run_experts(self, xs: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
        """[M, D] rows sorted by expert -> [M, D] expert outputs (grouped products)."""
        gate, up = grouped_mm(xs, self.w_gate_up.to(xs.dtype), offsets).chunk(2, dim=-1)
        return grouped_mm(F.silu(gate) * up, self.w_down.to(xs.dtype), offsets)

    def _run_expert(self, e: int, xs: torch.Tensor) -> torch.Tensor:
        """Expert ``e`` on [M, D] rows, plain matrix products (the reference)."""
        gate, up = (xs @ self.w_gate_up[e].to(xs.dtype)).chunk(2, dim=-1)
        return (F.silu(gate) * up) @ self.w_down[e].to(xs.dtype)

    def _compute_dtype(self, x: torch.Tensor) -> torch.dtype:
        if torch.is_autocast_enabled(x.device.type):
            return torch.get_autocast_dtype(x.device.type)
        return x.dtype

    # ---------------------------------------------------------------- forward

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """[..., D] -> [..., D]: the grouped-product fast path (see the module docstring)."""
        self._check(x)
        h = x.reshape(-1, self.d_model)
        N, k, E = h.shape[0], self.top_k, self.n_experts
        index, weights, logits, probs = self.route(h)
        flat = index.t().reshape(-1)  # [k * N], choice-major: top-1 choices first
        order = torch.argsort(flat, stable=True)
        counts = torch.zeros(E, dtype=torch.long, device=h.device).scatter_add_(0, flat, torch.ones_like(flat))
        cap = self.capacity(N)
        if cap is None:
            kept = counts
            dropped = torch.zeros((), dtype=torch.long, device=h.device)
        else:
            starts = torch.cumsum(counts, 0) - counts
            slot = torch.arange(k * N, device=h.device) - starts[flat[order]]
            keep = slot < cap
            dropped = (~keep).sum()
            order = order[keep]
            kept = counts.clamp(max=cap)
        offsets = torch.cumsum(kept, 0).to(torch.int32)
        dtype = self._compute_dtype(x)
        xin = self._expert_input(h.to(dtype))
        out = self._run_experts(xin[order % N], offsets)  # [M, D_e]
        placed = out.new_zeros(k * N, out.shape[-1]).index_copy(0, order, out)
        y = self._combine(placed.view(k, N, -1), weights, dtype)
        self._record(counts, dropped, logits, probs, index)
        return self._finish(x, h, y)

    def forward_dense(self, x: torch.Tensor) -> torch.Tensor:
        """The reference: every expert on every token (a Python loop over experts), its output kept
        where the router chose it. The same function as ``forward`` without capacity drops."""
        self._check(x)
        h = x.reshape(-1, self.d_model)
        index, weights, _, _ = self.route(h)
        dtype = self._compute_dtype(x)
        xin = self._expert_input(h.to(dtype))
        dense = torch.stack([self._run_expert(e, xin) for e in range(self.n_experts)])  # [E, N, D_e]
        experts = torch.arange(self.n_experts, device=h.device)
        chosen = []
        for j in range(self.top_k):
            mask = (index[:, j][None, :] == experts[:, None]).to(dense.dtype)  # [E, N] one-hot
            chosen.append((mask[..., None] * dense).sum(0))
        y = self._combine(torch.stack(chosen), weights, dtype)
        return self._finish(x, h, y)

    def _combine(self, placed: torch.Tensor, weights: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """[k, N, D_e] expert outputs per choice, [N, k] weights -> [N, D] routed output."""
        wide = weights.dtype
        routed = (placed.to(wide) * weights.t().unsqueeze(-1)).sum(0)
        return self._expert_output(routed, dtype)

    def _finish(self, x: torch.Tensor, h: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        if self.shared is not None:
            y = y + self.shared(h.to(self._compute_dtype(x))).to(y.dtype)
        return y.to(x.dtype).view(x.shape)

    def _check(self, x: torch.Tensor) -> None:
        if not isinstance(x, torch.Tensor) or x.dim() < 2 or x.shape[-1] != self.d_model:
            shape = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
            raise ValueError(f"{type(self).__name__}: x must be [..., {self.d_model}], got {shape}")
        if not x.dtype.is_floating_point:
            raise TypeError(f"{type(self).__name__}: x must be a floating tensor, got {x.dtype}")

    def _record(self, counts, dropped, logits, probs, index) -> None:
        self.last_load = counts.detach()
        self.last_dropped = dropped.detach()
        if not self.training:
            self.aux_loss = None
            return
        if self.bias_update_rate > 0:
            with torch.no_grad():
                self.expert_load += counts.to(self.expert_load.dtype)
        aux = logits.new_zeros(())
        if self.aux_loss_coef > 0:
            aux = aux + self.aux_loss_coef * load_balance_loss(probs, index, self.n_experts)
        if self.z_loss_coef > 0:
            aux = aux + self.z_loss_coef * router_z_loss(logits)
        self.aux_loss = aux

    # ---------------------------------------------------------------- balancing

    @torch.no_grad()
    def update_router_bias(self) -> None:
        """Auxiliary-loss-free balancing (DeepSeek-V3): every expert's selection bias moves by
        ``moe_bias_update_rate`` towards balance, ``b_i += rate * sign(mean load - load_i)``, from the
        loads counted since the last update (summed over processes when torch.distributed is
        initialised); then the counts restart. A no-op with rate 0 or nothing counted."""
        if self.bias_update_rate <= 0:
            return
        load = self.expert_load
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.all_reduce(load)
        if float(load.sum()) > 0:
            self.expert_bias += self.bias_update_rate * torch.sign(load.mean() - load)
        load.zero_()

    def extra_repr(self) -> str:
        return (f"n_experts={self.n_experts}, top_k={self.top_k}, d_ff={self.expert_d_ff}, "
                f"n_shared={self.n_shared}, router={self.router_kind}")


class SharedMoEFeedForward(MoEFeedForward):
    """Top-k routed SwiGLU experts plus always-active shared experts ("shared_moe", DeepSeek):
    ``n_shared_experts`` defaults to 1; the selection bias ``expert_bias`` moves with
    ``moe_bias_update_rate`` (auxiliary-loss-free balancing)."""

    default_shared = 1


class LatentMoEFeedForward(MoEFeedForward):
    """Routed experts in a latent space ("latent_moe", Nemotron 3's LatentMoE).

    The router reads the full-width x; x is down-projected (``down_proj``, D -> L, L =
    ``moe_latent_size`` or D // 4), the routed squared-ReLU experts (``w_up`` [E, L, F],
    ``w_down`` [E, F, L]) run there, the weighted sum is up-projected (``up_proj``, L -> D), and a
    full-width squared-ReLU shared expert (hidden n_shared * shared_expert_d_ff, one by default) is
    added. Sigmoid scores unless ``moe_router`` says otherwise.
    """

    default_router = "sigmoid"
    default_shared = 1

    def __init__(self, config: BlockConfig, *, device=None, dtype=None) -> None:
        self.latent_size = config.moe_latent_size or max(1, config.d_model // 4)
        super().__init__(config, device=device, dtype=dtype)
        factory = {"device": device, "dtype": dtype}
        self.down_proj = nn.Linear(self.d_model, self.latent_size, bias=False, **factory)
        self.up_proj = nn.Linear(self.latent_size, self.d_model, bias=False, **factory)

    @property
    def expert_width(self) -> int:
        return self.latent_size

    def _build_experts(self, factory) -> None:
        E, L, Fh = self.n_experts, self.latent_size, self.expert_d_ff
        self.w_up = nn.Parameter(torch.empty(E, L, Fh, **factory))
        self.w_down = nn.Parameter(torch.empty(E, Fh, L, **factory))
        self.reset_expert_parameters()

    def _build_shared(self, factory) -> nn.Module:
        cfg = BlockConfig(d_model=self.d_model, d_ff=self.n_shared * self.shared_d_ff, bias=False)
        return ReLU2FeedForward(cfg, **factory)

    def expert_parameters(self) -> list[nn.Parameter]:
        return [self.w_up, self.w_down]

    def rescale_output_(self, factor: float) -> None:
        with torch.no_grad():
            self.up_proj.weight.div_(factor)
            if self.shared is not None:
                self.shared.down.weight.div_(factor)

    def _expert_input(self, h: torch.Tensor) -> torch.Tensor:
        return F.linear(h, self.down_proj.weight.to(h.dtype))

    def _expert_output(self, routed: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        return F.linear(routed.to(dtype), self.up_proj.weight.to(dtype))

    def _run_experts(self, xs: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
        return grouped_mm(relu2(grouped_mm(xs, self.w_up.to(xs.dtype), offsets)), self.w_down.to(xs.dtype), offsets)

    def _run_expert(self, e: int, xs: torch.Tensor) -> torch.Tensor:
        return relu2(xs @ self.w_up[e].to(xs.dtype)) @ self.w_down[e].to(xs.dtype)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, latent={self.latent_size}"


FFNS.register("moe", MoEFeedForward)
FFNS.register("shared_moe", SharedMoEFeedForward)
FFNS.register("latent_moe", LatentMoEFeedForward)

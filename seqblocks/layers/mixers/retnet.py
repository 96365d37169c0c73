"""Multi-scale retention (RetNet, Sun et al., 2023) as fla builds the layer: ``"retnet"``.

    q, k, v = q_proj(x), k_proj(x), v_proj(x)            # [B, T, H, K], [B, T, H, V]
    q, k    = rope(q), rope(k)                           # rotary over the whole key head (fla: no xpos scale)
    o       = simple_gla(q, k, v, log(gamma_h))          # gamma_h = 1 - 2 ** (-5 - h), fixed per head
    o       = rmsnorm(o) * weight * silu(g_proj(x))      # per head
    y       = o_proj(o)

Parameter names are fla 0.6.0's ``MultiScaleRetention`` (``q_proj``, ``k_proj``, ``v_proj``, ``g_proj``,
``o_proj``, ``g_norm_swish_gate.weight``); its rotary tables are not in its state dict, nor in ours,
so the state dict loads unchanged. The paper's xpos length extrapolation is not in fla's layer and
not here either; GQA repeats each key/value head over its group of query heads.

Shapes: B batch, T time, D model width, H heads, K key head width, V value head width.
"""

from __future__ import annotations

import torch

from seqblocks.layers.attention.common import token_index
from seqblocks.layers.mixers.gla import GLAFamilyBase, HeadRMSNormGated, document_positions
from seqblocks.layers.position import RotaryEmbedding
from seqblocks.parallel.scan import document_positions_cp
from seqblocks.registry import MIXERS

__all__ = ["MultiScaleRetention", "retention_decays"]


def retention_decays(num_heads: int) -> torch.Tensor:
    """RetNet's per-head log-decays [H] in float64: ``log(1 - 2 ** (-5 - h))``."""
    return torch.log1p(-(2.0 ** (-5.0 - torch.arange(num_heads, dtype=torch.float64))))


@MIXERS.register("retnet")
class MultiScaleRetention(GLAFamilyBase):
    """Multi-scale retention: fla 0.6.0's ``MultiScaleRetention`` arguments and defaults.

    Args:
        d_model (int): model width D (fla's ``hidden_size``).
        expand_k (float): key width D * expand_k over all heads. Default: 1.0.
        expand_v (float): value width D * expand_v over all heads. Default: 2.0.
        num_heads (int): heads H, each with its own fixed decay. Default: 8.
        num_kv_heads (int | None): key/value heads. Default: None (= H).
        feature_map (str | None): map on q and k (before the rotation). Default: None.
        use_output_gate (bool): swish output gate fused with the norm. Default: True.
        elementwise_affine (bool): a weight in the norm. Default: True.
        norm_eps (float): norm epsilon. Default: 1e-5.
        rope_base (float): rotary base. Default: 10000.0.
        chunk_size (int): chunk length of the PyTorch path. Default: 64.
        layer_idx, device, dtype: placement. Default: None.

    Raises:
        ValueError: non-integer / indivisible widths, an odd key head width (rotary), an unknown feature map.
    """

    scalar_decay = True

    def __init__(self, d_model: int, expand_k: float = 1.0, expand_v: float = 2.0, num_heads: int = 8,
                 num_kv_heads: int | None = None, feature_map: str | None = None, use_output_gate: bool = True,
                 elementwise_affine: bool = True, norm_eps: float = 1e-5, rope_base: float = 10000.0,
                 chunk_size: int = 64, layer_idx: int | None = None, device=None, dtype=None) -> None:
        super().__init__()
        fk = {"device": device, "dtype": dtype}
        self._build_common("MultiScaleRetention", d_model, expand_k, expand_v, num_heads, num_kv_heads,
                           feature_map, use_output_gate, elementwise_affine, norm_eps, chunk_size, fk)
        if self.head_k_dim % 2:
            raise ValueError(f"MultiScaleRetention: the key head width {self.head_k_dim} must be even (rotary)")
        self.layer_idx, self.rope_base = layer_idx, rope_base
        self.rotary = RotaryEmbedding(self.head_k_dim, base=rope_base, device=device)
        self.register_buffer("log_decay", retention_decays(num_heads).to(device), persistent=False)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """nn.Linear's default init; norm weight 1."""
        for m in self.modules():
            if isinstance(m, torch.nn.Linear | HeadRMSNormGated):
                m.reset_parameters()

    def _apply(self, fn, recurse: bool = True):
        super()._apply(fn, recurse)
        if self.log_decay.dtype != torch.float64:  # a dtype cast: recompute rather than round the decays
            self.log_decay = retention_decays(self.num_heads).to(self.log_decay.device)
        return self

    def _decay(self, x: torch.Tensor) -> torch.Tensor:
        acc = torch.promote_types(torch.float32, x.dtype)
        return self.log_decay.to(acc).expand(*x.shape[:2], self.num_heads)

    def _positions(self, q, k, cache, cu_seqlens, cp=None):
        T = q.shape[1]
        if cp is not None:  # this chunk's positions in the full sequence (or in its documents)
            pos = document_positions_cp(T, cu_seqlens, cp, device=q.device)
        elif cu_seqlens is not None:
            pos = document_positions(cu_seqlens, T)
        else:
            pos = token_index(cache, T, q.device)
        return self.rotary.rotate_qk(q, k, pos)


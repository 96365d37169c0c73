"""Small mixers used by the foundation tests to exercise the contract without real mixers."""

from __future__ import annotations

import dataclasses

import torch
from torch import nn

from seqblocks.cache import Cache
from seqblocks.layers.mixer import Mixer


@dataclasses.dataclass(eq=False)
class SumCache(Cache):
    total: torch.Tensor = None  # [B, D] running sum of inputs


class CausalMeanMixer(Mixer):
    """y_t = W (mean of x_1..x_t): causal, with a running-sum cache."""

    def __init__(self, d_model: int, layer_idx: int | None = None, device=None, dtype=None) -> None:
        super().__init__()
        self.proj = nn.Linear(d_model, d_model, device=device, dtype=dtype)

    def allocate_inference_cache(self, batch_size, max_seqlen, dtype=None, **kwargs):
        total = torch.zeros(batch_size, self.proj.in_features, dtype=torch.float32, device=self.proj.weight.device)
        return SumCache.empty(batch_size, max_seqlen, device=self.proj.weight.device, total=total)

    def forward(self, x: torch.Tensor, cache: SumCache | None = None) -> torch.Tensor:
        T = x.shape[1]
        start = torch.zeros(x.shape[0], 1, x.shape[2]) if cache is None else cache.total[:, None]
        offset = 0 if cache is None else cache.seqlen_offset[:, None, None]
        sums = start + x.float().cumsum(1)
        counts = offset + torch.arange(1, T + 1, device=x.device)[None, :, None]
        if cache is not None:
            cache.total.copy_(sums[:, -1])
            cache.advance(T)
        return self.proj((sums / counts).to(x.dtype))


class TupleMixer(nn.Module):
    """A foreign mixer that returns (output, state), as some lrnnx mixers do."""

    def __init__(self, d_model: int) -> None:
        super().__init__()
        self.lin = nn.Linear(d_model, d_model)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.lin(x), x.sum(1)

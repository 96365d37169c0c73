"""``LRUUnet``: a U-Net of LRU layers for waveforms (aTENNuate-style denoising), with streaming inference.

Input ``x`` [B, C_in, T]; output [B, C_out, T]. The encoder runs an LRU layer at each level and then
down-samples by that level's factor r (a strided linear map of each window of r steps, which is a
``Conv1d`` of kernel = stride = r), the bottleneck runs two LRU layers at the coarsest rate, and the
decoder up-samples by r (a linear map of each coarse step to r fine steps, a ``ConvTranspose1d``),
adds the encoder's skip connection of that level and runs an LRU layer::

    h = in_proj(x)                                            # [B, T, c_0]
    level i:  h = lru_i(h); skip_i = h; h = down_i(h)         # [B, T / r_i, c_{i+1}]
    h = mid(h)                                                # two LRU layers, width c_depth
    level i (reversed):  h = lru'_i(up_i(h) + skip_i)         # [B, T * r_i, c_i]
    y = out_proj(final(h)) (+ x when C_in == C_out)           # [B, T, C_out]

Widths: level i has ``channels[i]``; the bottleneck has ``2 * channels[-1]`` (down-sampling trades
time for width). Each LRU layer is ``h + SiLU(LRU(LayerNorm(h)))``. ``out_proj`` starts at zero, so
with ``C_in == C_out`` an untrained model is the identity map and training learns the correction.

Causality (``causal=True``): the coarse step j summarises fine steps ``[j r, (j + 1) r)``, so it is
known only at fine step ``(j + 1) r - 1``. The up-sampled block of step j is therefore delayed by
r - 1 steps (it lands on ``[(j + 1) r - 1, (j + 2) r - 1)``), the least delay that keeps every output
at t a function of the inputs <= t; the skip connections carry the newest samples. With
``causal=False`` the block is not delayed and every LRU runs in both directions.

Lengths: T is zero-padded at the end to a multiple of the frame ``prod(resample_factors)`` and the
output cropped back, so any T >= 1 works. Streaming (``step``, causal only) feeds chunks whose length
is a multiple of the frame (a last shorter chunk is padded and cropped the same way and ends the
stream); each chunk carries the LRU states and the r - 1 delayed up-sampled steps of every level, and
the concatenated outputs equal the offline output.

Shapes: B batch, C channels, T time, c width of a level, r resampling factor.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from seqblocks.checkpoint import CheckpointMixin
from seqblocks.layers.mixers._lti import SSMCache
from seqblocks.layers.mixers.lru import LRU
from seqblocks.registry import MODELS

__all__ = ["LRUUnet", "UNetCache"]

#: Width of the causal input convolution of ``pre_conv=True``.
PRE_CONV_WIDTH = 4


class _LRULayer(nn.Module):
    """``h + SiLU(LRU(LayerNorm(h)))`` over [B, T, c]."""

    def __init__(self, width: int, d_state: int, bidirectional: bool, device=None, dtype=None) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(width, device=device, dtype=dtype)
        self.lru = LRU(width, d_state, bidirectional=bidirectional, device=device, dtype=dtype)

    def forward(self, h: torch.Tensor, cache: SSMCache | None = None) -> torch.Tensor:
        return h + F.silu(self.lru(self.norm(h), cache))


class _Down(nn.Module):
    """[B, T, c] -> [B, T / r, c']: a linear map of each window of r steps (Conv1d, kernel = stride = r)."""

    def __init__(self, width: int, out_width: int, factor: int, device=None, dtype=None) -> None:
        super().__init__()
        self.factor = factor
        self.proj = nn.Linear(factor * width, out_width, device=device, dtype=dtype)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        B, T, c = h.shape
        return self.proj(h.reshape(B, T // self.factor, self.factor * c))


class _Up(nn.Module):
    """[B, T, c] -> [B, T r, c']: each step mapped to r steps (ConvTranspose1d, kernel = stride = r), and
    delayed by r - 1 steps when causal (see the module docstring)."""

    def __init__(self, width: int, out_width: int, factor: int, causal: bool, device=None, dtype=None) -> None:
        super().__init__()
        self.factor, self.out_width = factor, out_width
        self.delay = factor - 1 if causal else 0
        self.proj = nn.Linear(width, factor * out_width, device=device, dtype=dtype)

    def forward(self, h: torch.Tensor, carry: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Returns (the up-sampled [B, T r, c'], the ``delay`` steps that spill past this call's end, or None
        when there is no delay). ``carry`` [B, delay, c'] holds the previous call's spill (zeros at the start)."""
        B, T, _ = h.shape
        up = self.proj(h).reshape(B, T * self.factor, self.out_width)
        if self.delay == 0:
            return up, None
        if carry is None:
            carry = up.new_zeros(B, self.delay, self.out_width)
        full = torch.cat((carry.to(up.dtype), up), 1)  # [B, delay + T r, c']
        return full[:, : T * self.factor], full[:, T * self.factor:]


@dataclasses.dataclass(eq=False)
class UNetCache:
    """Streaming state of an ``LRUUnet`` (from ``allocate_inference_cache``; ``step`` updates it in place).

    Attributes:
        lru (dict[str, SSMCache]): the state of every LRU layer, by module name.
        carry (list[Tensor | None]): per level, the [B, r - 1, c_i] delayed up-sampled steps.
        conv (Tensor | None): [B, PRE_CONV_WIDTH - 1, C_in] the last input samples (``pre_conv``).
        batch_size (int): streams B.
        num_samples (int): samples consumed so far.
        closed (bool): a chunk shorter than a multiple of the frame ended the stream.
    """

    lru: dict[str, SSMCache]
    carry: list[torch.Tensor | None]
    conv: torch.Tensor | None
    batch_size: int
    num_samples: int = 0
    closed: bool = False


@MODELS.register("LRUUnet")
class LRUUnet(nn.Module, CheckpointMixin, library_name="seqblocks", tags=["seqblocks", "lru-unet", "audio"]):
    """U-Net of LRU layers over waveforms [B, C_in, T] (see the module docstring).

    Args:
        in_channels (int): input channels C_in. Default: 1.
        out_channels (int): output channels C_out. Default: 1.
        channels (Sequence[int]): width of each level, finest first. Default: [8, 16].
        resample_factors (Sequence[int]): down-sampling factor after each level (same length as
            ``channels``). Default: [4, 2].
        pre_conv (bool): map the input with a causal convolution over the last ``PRE_CONV_WIDTH`` (4)
            samples instead of a pointwise projection. Default: False.
        causal (bool): every output depends on the past only (and ``step`` can stream); False runs the
            LRUs in both directions and does not delay the up-sampling. Default: True.
        dtype (torch.dtype | None): parameter dtype. Default: None (torch's default).
        d_state (int | None): keyword only; complex states per LRU layer. Default: None (each layer's
            width, at least 8).
        device (torch.device | None): keyword only; parameter device. Default: None.

    Raises:
        ValueError: empty or mismatched ``channels`` / ``resample_factors``, non-positive sizes.
    """

    def __init__(self, in_channels: int = 1, out_channels: int = 1, channels: Sequence[int] = (8, 16),
                 resample_factors: Sequence[int] = (4, 2), pre_conv: bool = False, causal: bool = True,
                 dtype: torch.dtype | None = None, *, d_state: int | None = None, device=None) -> None:
        super().__init__()
        channels, factors = _int_list("channels", channels), _int_list("resample_factors", resample_factors)
        for name, value in (("in_channels", in_channels), ("out_channels", out_channels)):
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ValueError(f"LRUUnet: {name} must be a positive int, got {value!r}")
        if len(channels) != len(factors):
            raise ValueError(f"LRUUnet: channels ({len(channels)} entries: {channels}) and resample_factors "
                             f"({len(factors)} entries: {factors}) must have the same length")
        if d_state is not None and (not isinstance(d_state, int) or isinstance(d_state, bool) or d_state <= 0):
            raise ValueError(f"LRUUnet: d_state must be a positive int or None, got {d_state!r}")
        self.in_channels, self.out_channels = in_channels, out_channels
        self.channels, self.resample_factors = channels, factors
        self.pre_conv, self.causal, self.d_state = bool(pre_conv), bool(causal), d_state
        self.frame = math.prod(factors)
        widths = [*channels, 2 * channels[-1]]
        kw = {"device": device, "dtype": dtype}

        def layer(width: int) -> _LRULayer:
            return _LRULayer(width, d_state or max(width, 8), not self.causal, **kw)

        taps = PRE_CONV_WIDTH if self.pre_conv else 1
        self.in_proj = nn.Linear(taps * in_channels, channels[0], **kw)
        self.enc = nn.ModuleList(layer(c) for c in channels)
        self.down = nn.ModuleList(_Down(widths[i], widths[i + 1], r, **kw) for i, r in enumerate(factors))
        self.mid = nn.ModuleList([layer(widths[-1]), layer(widths[-1])])
        self.up = nn.ModuleList(_Up(widths[i + 1], widths[i], r, self.causal, **kw) for i, r in enumerate(factors))
        self.dec = nn.ModuleList(layer(c) for c in channels)
        self.final = layer(channels[0])
        self.out_proj = nn.Linear(channels[0], out_channels, **kw)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Zero the output map: with C_in == C_out the untrained model is the identity (see the docstring)."""
        nn.init.zeros_(self.out_proj.weight)
        nn.init.zeros_(self.out_proj.bias)

    @property
    def total_downsample(self) -> int:
        """The frame ``prod(resample_factors)``: offline lengths are padded to a multiple of it."""
        return self.frame

    # ---------------------------------------------------------------- forward

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Denoise / map a waveform.

        Args:
            x (Tensor): [B, C_in, T], any T >= 1, any float dtype.

        Returns:
            Tensor: [B, C_out, T] in x's dtype.

        Raises:
            ValueError / TypeError: x of the wrong shape or dtype.
        """
        self._check_input(x)
        return self._run(x, None)

    def _run(self, x: torch.Tensor, cache: UNetCache | None) -> torch.Tensor:
        T = x.shape[-1]
        pad = -T % self.frame
        wdt = self.in_proj.weight.dtype
        u = F.pad(x.to(wdt), (0, pad)).transpose(1, 2)  # [B, T', C_in]
        h = self.in_proj(self._taps(u, cache))  # [B, T', c_0]
        caches = cache.lru if cache is not None else {}
        skips = []
        for i, (layer, down) in enumerate(zip(self.enc, self.down)):
            h = layer(h, caches.get(f"enc.{i}"))
            skips.append(h)
            h = down(h)
        for i, layer in enumerate(self.mid):
            h = layer(h, caches.get(f"mid.{i}"))
        for i in reversed(range(len(self.channels))):
            carry = cache.carry[i] if cache is not None else None
            up, spill = self.up[i](h, carry)
            if cache is not None and spill is not None:
                cache.carry[i].copy_(spill)
            h = self.dec[i](up + skips[i], caches.get(f"dec.{i}"))
        h = self.final(h, caches.get("final"))
        y = self.out_proj(h)  # [B, T', C_out]
        if self.in_channels == self.out_channels:
            y = y + u
        return y.transpose(1, 2)[..., :T].to(x.dtype)

    def _taps(self, u: torch.Tensor, cache: UNetCache | None) -> torch.Tensor:
        """The input map's view of u [B, T, C_in]: u itself, or with ``pre_conv`` each step's last
        ``PRE_CONV_WIDTH`` samples [B, T, PRE_CONV_WIDTH * C_in] (zeros, or the cached samples, before)."""
        if not self.pre_conv:
            return u
        B, T, C = u.shape
        past = cache.conv.to(u.dtype) if cache is not None else u.new_zeros(B, PRE_CONV_WIDTH - 1, C)
        full = torch.cat((past, u), 1)  # [B, W - 1 + T, C]
        if cache is not None:
            cache.conv.copy_(full[:, -(PRE_CONV_WIDTH - 1):])
        windows = full.unfold(1, PRE_CONV_WIDTH, 1)  # [B, T, C, W]
        return windows.transpose(2, 3).reshape(B, T, PRE_CONV_WIDTH * C)

    def _check_input(self, x: Any) -> None:
        if not isinstance(x, torch.Tensor) or not x.is_floating_point():
            raise TypeError(f"LRUUnet expects a floating-point tensor [B, C_in, T], got "
                            f"{type(x).__name__ if not isinstance(x, torch.Tensor) else x.dtype}")
        if x.dim() != 3 or x.shape[1] != self.in_channels or x.shape[0] == 0 or x.shape[2] == 0:
            raise ValueError(f"LRUUnet expects x of shape [B, C_in={self.in_channels}, T] with B, T >= 1, "
                             f"got {tuple(x.shape)}")

    # ---------------------------------------------------------------- streaming

    def lru_layers(self) -> dict[str, _LRULayer]:
        """Every LRU layer by the name its state has in ``UNetCache.lru``."""
        named = {f"enc.{i}": m for i, m in enumerate(self.enc)}
        named.update({f"mid.{i}": m for i, m in enumerate(self.mid)})
        named.update({f"dec.{i}": m for i, m in enumerate(self.dec)})
        named["final"] = self.final
        return named

    def mixers(self) -> list[nn.Module]:
        """The LRU mixers, encoder to output."""
        return [layer.lru for layer in self.lru_layers().values()]

    def allocate_inference_cache(self, batch_size: int, max_seqlen: int = 1, dtype: torch.dtype | None = None,
                                 **kwargs: Any) -> UNetCache:
        """A fresh streaming state for ``batch_size`` waveforms (``max_seqlen`` is not a limit: the state
        does not grow with length).

        Raises:
            ValueError: a non-causal model (it cannot stream) or a non-positive batch size.
        """
        if not self.causal:
            raise ValueError("LRUUnet(causal=False) looks at future samples and cannot stream; build it with "
                             "causal=True")
        if not isinstance(batch_size, int) or isinstance(batch_size, bool) or batch_size <= 0:
            raise ValueError(f"LRUUnet: batch_size must be a positive int, got {batch_size!r}")
        p = self.out_proj.weight
        lru = {name: layer.lru.allocate_inference_cache(batch_size, max(1, max_seqlen))
               for name, layer in self.lru_layers().items()}
        widths = self.channels
        carry = [p.new_zeros(batch_size, r - 1, widths[i]) for i, r in enumerate(self.resample_factors)]
        conv = p.new_zeros(batch_size, PRE_CONV_WIDTH - 1, self.in_channels) if self.pre_conv else None
        return UNetCache(lru=lru, carry=carry, conv=conv, batch_size=batch_size)

    def step(self, x: torch.Tensor, cache: UNetCache) -> torch.Tensor:
        """Process the next chunk of a stream; ``cache`` advances in place.

        Args:
            x (Tensor): [B, C_in, L], L a multiple of the frame ``prod(resample_factors)`` (one frame is
                the lowest latency); a last chunk may be shorter: it is padded like ``forward`` pads and
                ends the stream.
            cache (UNetCache): from ``allocate_inference_cache(B)``.

        Returns:
            Tensor: [B, C_out, L], equal to the same samples of ``forward`` over the whole stream.

        Raises:
            ValueError: a non-causal model, a cache of another batch size or already closed, a bad x.
        """
        if not self.causal:
            raise ValueError("LRUUnet(causal=False) cannot stream; build it with causal=True")
        self._check_input(x)
        if not isinstance(cache, UNetCache):
            raise TypeError(f"LRUUnet.step expects the UNetCache from allocate_inference_cache, got "
                            f"{type(cache).__name__}")
        if cache.batch_size != x.shape[0]:
            raise ValueError(f"LRUUnet.step: the cache holds {cache.batch_size} streams, x has {x.shape[0]}")
        if cache.closed:
            raise ValueError(f"LRUUnet.step: the stream was ended by a chunk whose length is not a multiple of "
                             f"the frame ({self.frame}); allocate a new cache")
        y = self._run(x, cache)
        cache.num_samples += x.shape[-1]
        cache.closed = x.shape[-1] % self.frame != 0
        return y

    def stream(self, x: torch.Tensor, chunk_size: int | None = None) -> torch.Tensor:
        """Run ``x`` [B, C_in, T] through ``step`` in chunks of ``chunk_size`` samples (a multiple of the
        frame; default one frame) and concatenate the outputs: the streaming twin of ``forward``.

        Raises:
            ValueError: ``chunk_size`` not a positive multiple of the frame.
        """
        chunk = self.frame if chunk_size is None else chunk_size
        if not isinstance(chunk, int) or chunk <= 0 or chunk % self.frame:
            raise ValueError(f"LRUUnet.stream: chunk_size must be a positive multiple of the frame {self.frame}, "
                             f"got {chunk_size!r}")
        self._check_input(x)
        cache = self.allocate_inference_cache(x.shape[0])
        return torch.cat([self.step(x[..., s:s + chunk], cache) for s in range(0, x.shape[-1], chunk)], -1)

    # ---------------------------------------------------------------- checkpoints

    def checkpoint_config(self) -> dict[str, Any]:
        return {"in_channels": self.in_channels, "out_channels": self.out_channels, "channels": list(self.channels),
                "resample_factors": list(self.resample_factors), "pre_conv": self.pre_conv, "causal": self.causal,
                "d_state": self.d_state}

    @classmethod
    def from_checkpoint_config(cls, config: dict[str, Any], device=None, dtype=None) -> LRUUnet:
        known = {"in_channels", "out_channels", "channels", "resample_factors", "pre_conv", "causal", "d_state"}
        unknown = sorted(set(config) - known)
        if unknown:
            raise ValueError(f"LRUUnet: unknown config keys {unknown}; expected {sorted(known)}")
        values = dict(config)
        d_state = values.pop("d_state", None)
        return cls(**values, dtype=dtype, d_state=d_state, device=device)


def _int_list(name: str, values: Any) -> list[int]:
    if isinstance(values, str | bytes) or not isinstance(values, Sequence) or not values:
        raise ValueError(f"LRUUnet: {name} must be a non-empty list of positive ints, got {values!r}")
    out = list(values)
    for v in out:
        if not isinstance(v, int) or isinstance(v, bool) or v <= 0:
            raise ValueError(f"LRUUnet: {name} must hold positive ints, got {values!r}")
    return out

"""Position encodings, all driven by absolute positions so that decoding with a cache is exact.

Every encoding answers three hooks, identity by default:

- ``embed(x, positions)``: additive encodings (``sinusoidal``, ``learned``) add to token embeddings;
  the model applies it once at the input.
- ``rotate(x, positions)``: rotary encodings (``rope``) rotate queries and keys inside attention.
- ``score_bias(q_positions, k_positions)``: bias encodings (``alibi``) return an additive score bias.

``positions`` are absolute token indices, shape [T] or [B, T] (int64). A decoder with a cache passes
``cache offset + arange(T)``, so the token at position p is treated identically in a full pass and in
step-by-step decoding.

Shapes: B batch, T time, H heads, K head width, D model width.
"""

from __future__ import annotations

import math
from typing import ClassVar

import torch
from torch import nn

from seqblocks.ops.attention.prologue import apply_rotary
from seqblocks.registry import POSITIONS

__all__ = ["PositionBase", "RotaryEmbedding", "ALiBi", "SinusoidalPosition", "LearnedPosition",
           "NoPosition", "alibi_slopes", "llama3_frequencies", "positions_from_offset", "SCALING_TYPES"]

#: RoPE context-extension rules ``RotaryEmbedding(scaling_type=...)`` knows.
SCALING_TYPES = ("linear", "ntk", "llama3")


def positions_from_offset(offset: torch.Tensor | int, length: int, device=None) -> torch.Tensor:
    """Absolute positions ``offset + arange(length)``: [length] for an int offset, [B, length] for [B]."""
    if isinstance(offset, int):
        return torch.arange(offset, offset + length, device=device)
    return offset.to(torch.long)[:, None] + torch.arange(length, device=offset.device)


def _as_2d(positions: torch.Tensor) -> torch.Tensor:
    if positions.dtype.is_floating_point or positions.dtype == torch.bool:
        raise TypeError(f"positions must be an integer tensor, got {positions.dtype}")
    if positions.dim() == 1:
        return positions[None]
    if positions.dim() != 2:
        raise ValueError(f"positions must have shape [T] or [B, T], got {tuple(positions.shape)}")
    return positions


class PositionBase(nn.Module):
    """Base of position encodings; each hook is the identity unless overridden."""

    kind: ClassVar[str] = "none"

    def embed(self, x: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """x [B, T, D] -> x plus the encoding of ``positions`` ([T] or [B, T])."""
        return x

    def rotate(self, x: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """x [B, T, H, K] rotated by ``positions`` ([T] or [B, T])."""
        return x

    def rotate_qk(self, q: torch.Tensor, k: torch.Tensor,
                  positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(rotate(q, positions), rotate(k, positions))``; encodings that rotate may share work."""
        return self.rotate(q, positions), self.rotate(k, positions)

    def score_bias(self, q_positions: torch.Tensor, k_positions: torch.Tensor) -> torch.Tensor | None:
        """Additive score bias [B or 1, H, Tq, Tk] in fp32, or None."""
        return None


@POSITIONS.register("none")
class NoPosition(PositionBase):
    """No position information (e.g. for recurrent mixers, which are ordered by construction)."""

    @classmethod
    def from_config(cls, config) -> NoPosition:
        return cls()


@POSITIONS.register("rope")
class RotaryEmbedding(PositionBase):
    """Rotary position embedding (RoPE) of queries and keys.

    Args:
        head_dim (int): width of one head.
        base (float): RoPE base theta. Default: 10000.0.
        rotary_dim (int | None): rotate only the first ``rotary_dim`` channels of each head (partial
            rotary); must be even. Default: None (= head_dim).
        interleaved (bool): rotate pairs (0, 1), (2, 3), ... (GPT-J layout) instead of the two halves
            (GPT-NeoX layout). Default: False.
        scaling_factor (float): context-extension factor; 1.0 disables scaling. Default: 1.0.
        scaling_type (str): "linear" (position interpolation: positions / factor), "ntk"
            (base * factor^(d / (d - 2))) or "llama3" (Llama 3.1's per-frequency rule: wavelengths
            longer than ``original_max_positions / low_freq_factor`` are divided by the factor, those
            shorter than ``original_max_positions / high_freq_factor`` are kept, and the band between
            blends the two linearly in ``original_max_positions / wavelength``). Default: "linear".
        low_freq_factor (float): "llama3" only. Default: 1.0.
        high_freq_factor (float): "llama3" only; must exceed low_freq_factor. Default: 4.0.
        original_max_positions (int): "llama3" only: the context length the model was trained at.
            Default: 8192.
    """

    kind = "rotary"

    def __init__(
        self,
        head_dim: int,
        base: float = 10000.0,
        rotary_dim: int | None = None,
        interleaved: bool = False,
        scaling_factor: float = 1.0,
        scaling_type: str = "linear",
        device=None,
        *,
        low_freq_factor: float = 1.0,
        high_freq_factor: float = 4.0,
        original_max_positions: int = 8192,
    ) -> None:
        super().__init__()
        rotary_dim = head_dim if rotary_dim is None else rotary_dim
        if not (0 < rotary_dim <= head_dim) or rotary_dim % 2:
            raise ValueError(f"RotaryEmbedding: rotary_dim={rotary_dim} must be even and in (0, {head_dim}]")
        if base <= 0 or scaling_factor <= 0:
            raise ValueError(f"RotaryEmbedding: base={base} and scaling_factor={scaling_factor} must be > 0")
        if scaling_type not in SCALING_TYPES:
            raise ValueError(f"RotaryEmbedding: scaling_type={scaling_type!r}; expected one of {SCALING_TYPES}")
        if scaling_type == "llama3":
            if not 0 < low_freq_factor < high_freq_factor:
                raise ValueError(f"RotaryEmbedding: llama3 scaling needs 0 < low_freq_factor < high_freq_factor, "
                                 f"got {low_freq_factor} and {high_freq_factor}")
            if isinstance(original_max_positions, bool) or not isinstance(original_max_positions, int) \
                    or original_max_positions <= 0:
                raise ValueError(f"RotaryEmbedding: original_max_positions={original_max_positions!r} must be a "
                                 f"positive int")
        self.low_freq_factor, self.high_freq_factor = float(low_freq_factor), float(high_freq_factor)
        self.original_max_positions = original_max_positions
        self.head_dim, self.rotary_dim, self.interleaved = head_dim, rotary_dim, interleaved
        self.base, self.scaling_factor, self.scaling_type = base, scaling_factor, scaling_type
        if scaling_type == "ntk" and rotary_dim > 2:
            base = base * scaling_factor ** (rotary_dim / (rotary_dim - 2))
        self._freq_base = base
        # float64 always (a module cast leaves it so, see _apply): angles are formed in float64 and then
        # rounded to the rotation's dtype, fp32 for fp32 / bf16 / fp16 inputs and float64 for float64.
        self.register_buffer("inv_freq", self._inv_freq(device), persistent=False)

    def _inv_freq(self, device) -> torch.Tensor:
        exponent = torch.arange(0, self.rotary_dim, 2, dtype=torch.float64, device=device) / self.rotary_dim
        inv_freq = 1.0 / self._freq_base**exponent
        if self.scaling_type == "llama3" and self.scaling_factor != 1.0:
            inv_freq = llama3_frequencies(inv_freq, self.scaling_factor, self.low_freq_factor, self.high_freq_factor,
                                          self.original_max_positions)
        return inv_freq

    def _apply(self, fn, recurse: bool = True):
        super()._apply(fn, recurse)
        if self.inv_freq.dtype != torch.float64:  # a dtype cast: recompute rather than round the frequencies
            self.inv_freq = self._inv_freq(self.inv_freq.device)
        return self

    @classmethod
    def from_config(cls, config) -> RotaryEmbedding:
        return cls(config.effective_head_dim, base=config.rope_theta, rotary_dim=config.rotary_dim,
                   scaling_factor=config.rope_scaling, scaling_type=config.rope_scaling_type,
                   **config.rope_scaling_kwargs)

    def angles(self, positions: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """Rotation angles [B or 1, T, rotary_dim / 2] in ``dtype`` (fp32, or float64), formed in float64."""
        pos = _as_2d(positions).to(torch.float64)
        if self.scaling_type == "linear" and self.scaling_factor != 1.0:  # ntk / llama3 act on inv_freq
            pos = pos / self.scaling_factor
        return (pos[..., None] * self.inv_freq.to(pos.device, torch.float64)).to(dtype)

    def rotate(self, x: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        self._check_rotated(x)
        cos, sin = self.cos_sin(x, positions)
        return self._rotate(x, cos, sin)

    def rotate_qk(self, q: torch.Tensor, k: torch.Tensor,
                  positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(rotate(q, positions), rotate(k, positions))`` with the angles formed once (q and k may have
        different head counts)."""
        self._check_rotated(q)
        self._check_rotated(k)
        if k.dtype != q.dtype:
            return self.rotate(q, positions), self.rotate(k, positions)
        cos, sin = self.cos_sin(q, positions)
        return self._rotate(q, cos, sin), self._rotate(k, cos, sin)

    def _check_rotated(self, x: torch.Tensor) -> None:
        if x.dim() != 4 or x.shape[-1] != self.head_dim:
            raise ValueError(f"RotaryEmbedding.rotate expects [B, T, H, {self.head_dim}], got {tuple(x.shape)}")

    def cos_sin(self, x: torch.Tensor, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Cosines and sines [B or 1, T, 1, rotary_dim / 2] of the angles of ``positions`` for rotating
        ``x`` [B, T, H, head_dim] (fp32 for fp16 / bf16 / fp32, float64 for float64)."""
        acc = torch.promote_types(torch.float32, x.dtype)  # fp32 for bf16 / fp16 / fp32, float64 for float64
        theta = self.angles(positions, acc)
        if theta.shape[1] != x.shape[1]:
            raise ValueError(f"RotaryEmbedding: {theta.shape[1]} positions for {x.shape[1]} tokens")
        return theta.cos()[:, :, None], theta.sin()[:, :, None]  # [B, T, 1, R/2]

    def _rotate(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        return apply_rotary(x, cos, sin, self.rotary_dim, self.interleaved)

    def extra_repr(self) -> str:
        return (f"head_dim={self.head_dim}, rotary_dim={self.rotary_dim}, base={self.base}, "
                f"interleaved={self.interleaved}, scaling={self.scaling_type}:{self.scaling_factor}")


def llama3_frequencies(inv_freq: torch.Tensor, factor: float, low_freq_factor: float, high_freq_factor: float,
                       original_max_positions: int) -> torch.Tensor:
    """Llama 3.1's context extension of RoPE frequencies ``inv_freq`` [R / 2] (float64).

    With wavelength w = 2 pi / f and L = original_max_positions: frequencies whose w exceeds
    L / low_freq_factor (slow ones) are divided by ``factor``; those whose w is below L / high_freq_factor
    (fast ones) are kept; in between, f is interpolated as (1 - s) f / factor + s f with
    s = (L / w - low_freq_factor) / (high_freq_factor - low_freq_factor)."""
    wavelength = 2 * math.pi / inv_freq
    s = (original_max_positions / wavelength - low_freq_factor) / (high_freq_factor - low_freq_factor)
    blended = (1 - s) * inv_freq / factor + s * inv_freq
    slow = wavelength > original_max_positions / low_freq_factor
    fast = wavelength < original_max_positions / high_freq_factor
    return torch.where(slow, inv_freq / factor, torch.where(fast, inv_freq, blended))


def alibi_slopes(num_heads: int) -> torch.Tensor:
    """ALiBi head slopes [H] (Press et al.): a geometric sequence 2^(-8/n), 2^(-16/n), ... for n a power
    of two; otherwise the slopes of the largest power of two m < H, then every other slope of 2m."""
    if num_heads <= 0:
        raise ValueError(f"alibi_slopes: num_heads={num_heads} must be positive")

    def power_of_two(n: int) -> list[float]:
        start = 2.0 ** (-8.0 / n)
        return [start ** (i + 1) for i in range(n)]

    m = 2 ** math.floor(math.log2(num_heads))
    slopes = power_of_two(m)
    if m < num_heads:
        slopes += power_of_two(2 * m)[0::2][: num_heads - m]
    return torch.tensor(slopes, dtype=torch.float32)


@POSITIONS.register("alibi")
class ALiBi(PositionBase):
    """Attention with linear biases: score bias ``-slope_h * |q_pos - k_pos|``.

    Args:
        num_heads (int): attention heads (one slope each).
    """

    kind = "bias"

    def __init__(self, num_heads: int, device=None) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.register_buffer("slopes", alibi_slopes(num_heads).to(device), persistent=False)

    @classmethod
    def from_config(cls, config) -> ALiBi:
        return cls(config.n_heads)

    def score_bias(self, q_positions: torch.Tensor, k_positions: torch.Tensor) -> torch.Tensor:
        q = _as_2d(q_positions)[:, None, :, None]
        k = _as_2d(k_positions)[:, None, None, :]
        distance = (q - k).abs().to(torch.float32)  # [B, 1, Tq, Tk]
        return -self.slopes.to(distance.device)[None, :, None, None] * distance

    def extra_repr(self) -> str:
        return f"num_heads={self.num_heads}"


@POSITIONS.register("sinusoidal")
class SinusoidalPosition(PositionBase):
    """Fixed sinusoidal encoding added to the embeddings (Vaswani et al.).

    Channel 2i holds sin(p / base^(2i / D)) and channel 2i + 1 the matching cos.

    Args:
        d_model (int): embedding width.
        base (float): wavelength base. Default: 10000.0.
    """

    kind = "additive"

    def __init__(self, d_model: int, base: float = 10000.0, device=None) -> None:
        super().__init__()
        self.d_model = d_model
        exponent = torch.arange(0, d_model, 2, dtype=torch.float64, device=device) / d_model
        self.register_buffer("inv_freq", (1.0 / base**exponent).float(), persistent=False)

    @classmethod
    def from_config(cls, config) -> SinusoidalPosition:
        return cls(config.d_model)

    def encoding(self, positions: torch.Tensor) -> torch.Tensor:
        """[B or 1, T, D] fp32 encoding of ``positions``."""
        theta = _as_2d(positions).float()[..., None] * self.inv_freq.to(positions.device)
        pe = torch.stack((theta.sin(), theta.cos()), dim=-1).flatten(-2)
        return pe[..., : self.d_model]

    def embed(self, x: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        return (x.float() + self.encoding(positions)).to(x.dtype)


@POSITIONS.register("learned")
class LearnedPosition(PositionBase):
    """A learned table of ``max_seq_len`` position vectors added to the embeddings.

    Args:
        max_seq_len (int): number of positions; a position at or past it raises ``ValueError``.
        d_model (int): embedding width.
    """

    kind = "additive"

    def __init__(self, max_seq_len: int, d_model: int, device=None, dtype=None) -> None:
        super().__init__()
        self.max_seq_len = max_seq_len
        self.table = nn.Embedding(max_seq_len, d_model, device=device, dtype=dtype)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        nn.init.normal_(self.table.weight, std=0.02)

    @classmethod
    def from_config(cls, config) -> LearnedPosition:
        return cls(config.max_seq_len, config.d_model)

    def embed(self, x: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        positions = _as_2d(positions)
        if positions.numel() and (int(positions.max()) >= self.max_seq_len or int(positions.min()) < 0):
            raise ValueError(
                f"LearnedPosition: positions must lie in [0, {self.max_seq_len}); got "
                f"[{int(positions.min())}, {int(positions.max())}]"
            )
        return x + self.table(positions).to(x.dtype)

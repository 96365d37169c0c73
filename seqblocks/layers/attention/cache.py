"""Inference caches of the attention mixers: preallocated, static shapes, updated in place.

- ``KVCache``: keys / values of every position, ``[B, Hkv, max_seqlen, K]``, slot = absolute position.
- ``RollingKVCache``: the last ``window`` keys / values of a sliding-window layer, slot = position mod
  window, with the absolute position of each slot (-1 when empty), so memory stays O(window).
- ``MLACache``: MLA's compressed latents ``c_kv`` and the shared rotary key ``k_pe`` per position.
- ``LinearAttentionCache``: the recurrent state (S, z) of linear attention.
- ``CrossAttentionCache``: the keys / values of the encoder output, computed once per memory.
- ``PagedKVCache`` / ``PagedMLACache`` (``paged.py``): the same positions in a pool of pages with a block
  table, for serving.

``seqlen_offset`` [B] (a tensor) counts each sequence's tokens; ``key_valid`` [B, slots] marks slots that
hold a real, unpadded token; ``nonfinite_last`` [B] is 1 + the position of the latest valid token whose
key / value held a NaN / Inf (0: none; the keys themselves are stored zeroed), so that decoding poisons
the outputs that token may reach (``seqblocks.layers.finite``). Writing past ``max_seqlen`` raises
``ValueError`` (every cache kind, the rolling one included, so that a model's limit does not depend on
its layer mix). ``write`` stores one call's tokens (before the owner advances ``seqlen_offset``).

Shapes: B batch, Hkv key/value heads, S max_seqlen (slots), W window, K key width, V value width,
R latent width, P rotary width, M memory length.
"""

from __future__ import annotations

import dataclasses

import torch

from seqblocks.cache import Cache, host_sync_unsafe

__all__ = ["KVCache", "RollingKVCache", "MLACache", "LinearAttentionCache", "CrossAttentionCache",
           "host_sync_unsafe"]


@dataclasses.dataclass(eq=False)
class KVCache(Cache):
    """Keys / values of every position so far.

    Attributes:
        k (Tensor): [B, Hkv, S, K]. v (Tensor): [B, Hkv, S, V].
        key_valid (Tensor): [B, S] bool, True where a real (unpadded) token was written.
        nonfinite_last (Tensor): [B] int64, 1 + the position of the latest non-finite valid token (0: none).
        conv_state (Tensor | None): [B, W - 1, C] the last inputs of an attention's q / k / v conv
            (``MHA(d_conv=W)``); None without one.
    """

    k: torch.Tensor = None
    v: torch.Tensor = None
    key_valid: torch.Tensor = None
    nonfinite_last: torch.Tensor = None
    conv_state: torch.Tensor = None

    @classmethod
    def allocate(cls, batch_size: int, max_seqlen: int, num_kv_heads: int, head_dim: int, v_dim: int,
                 *, device=None, dtype=None) -> KVCache:
        cache = cls.empty(batch_size, max_seqlen, device=device)
        cache.k = torch.zeros(batch_size, num_kv_heads, max_seqlen, head_dim, device=device, dtype=dtype)
        cache.v = torch.zeros(batch_size, num_kv_heads, max_seqlen, v_dim, device=device, dtype=dtype)
        cache.key_valid = torch.zeros(batch_size, max_seqlen, dtype=torch.bool, device=device)
        cache.nonfinite_last = torch.zeros(batch_size, dtype=torch.long, device=device)
        return cache

    def write(self, index: torch.Tensor, k: torch.Tensor, v: torch.Tensor, valid: torch.Tensor) -> None:
        """Store keys [B, Hkv, T, K], values [B, Hkv, T, V] and validity [B, T] at positions ``index`` [B, T]."""
        b_idx = torch.arange(index.shape[0], device=index.device)[:, None]
        self.k[b_idx, :, index] = k.transpose(1, 2).to(self.k.dtype)
        self.v[b_idx, :, index] = v.transpose(1, 2).to(self.v.dtype)
        self.key_valid[b_idx, index] = valid

    @property
    def capacity(self) -> int:
        """Positions the cache can hold (slots)."""
        return self.k.shape[2]

    def read(self, S: int, T: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Keys [B, Hkv, S, K], values [B, Hkv, S, V] and validity [B, S] of slots 0..S-1 (after a call of
        T tokens was written; unwritten slots are invalid already)."""
        return self.k[:, :, :S], self.v[:, :, :S], self.key_valid[:, :S]


@dataclasses.dataclass(eq=False)
class RollingKVCache(Cache):
    """The last ``window`` keys / values; the token at position p lives in slot p % window.

    Attributes:
        k (Tensor): [B, Hkv, W, K]. v (Tensor): [B, Hkv, W, V].
        slot_positions (Tensor): [B, W] int64 absolute position held by each slot, -1 when empty.
        key_valid (Tensor): [B, W] bool, True where the slot holds a real (unpadded) token.
        nonfinite_last (Tensor): [B] int64, 1 + the position of the latest non-finite valid token (0: none).
        conv_state (Tensor | None): as ``KVCache.conv_state``.
    """

    k: torch.Tensor = None
    v: torch.Tensor = None
    slot_positions: torch.Tensor = None
    key_valid: torch.Tensor = None
    nonfinite_last: torch.Tensor = None
    conv_state: torch.Tensor = None

    @property
    def window(self) -> int:
        return self.k.shape[2]

    @classmethod
    def allocate(cls, batch_size: int, max_seqlen: int, window: int, num_kv_heads: int, head_dim: int,
                 v_dim: int, *, device=None, dtype=None) -> RollingKVCache:
        cache = cls.empty(batch_size, max_seqlen, device=device)
        cache.k = torch.zeros(batch_size, num_kv_heads, window, head_dim, device=device, dtype=dtype)
        cache.v = torch.zeros(batch_size, num_kv_heads, window, v_dim, device=device, dtype=dtype)
        cache.slot_positions = torch.full((batch_size, window), -1, dtype=torch.long, device=device)
        cache.key_valid = torch.zeros(batch_size, window, dtype=torch.bool, device=device)
        cache.nonfinite_last = torch.zeros(batch_size, dtype=torch.long, device=device)
        return cache

    def reset(self) -> None:
        super().reset()
        self.slot_positions.fill_(-1)

    def write(self, k: torch.Tensor, v: torch.Tensor, valid: torch.Tensor, consumed: torch.Tensor) -> None:
        """Keep the newest ``window`` tokens after a call that adds ``consumed`` [B] tokens per row.

        ``k`` [B, Hkv, T, K], ``v`` [B, Hkv, T, V] and ``valid`` [B, T] are the call's tokens, which sit
        at positions ``seqlen_offset + arange(T)``. Slot s keeps the newest position p < end with
        p % W == s (end = offset + consumed); it changes only when that p is one of this call's.
        """
        B, T = valid.shape
        W = self.window
        offset = self.seqlen_offset
        end = (offset + consumed)[:, None]
        slots = torch.arange(W, device=k.device)[None]
        newest = end - 1 - torch.remainder(end - 1 - slots, W)  # [B, W]
        is_new = newest >= offset[:, None]
        t_idx = (newest - offset[:, None]).clamp(0, T - 1)  # [B, W]
        gather = t_idx[:, None, :, None]
        new_k = k.gather(2, gather.expand(B, k.shape[1], W, k.shape[3]))
        new_v = v.gather(2, gather.expand(B, v.shape[1], W, v.shape[3]))
        sel = is_new[:, None, :, None]
        self.k.copy_(torch.where(sel, new_k.to(self.k.dtype), self.k))
        self.v.copy_(torch.where(sel, new_v.to(self.v.dtype), self.v))
        self.key_valid.copy_(torch.where(is_new, valid.gather(1, t_idx), self.key_valid))
        self.slot_positions.copy_(torch.where(is_new, newest, self.slot_positions))


@dataclasses.dataclass(eq=False)
class MLACache(Cache):
    """MLA's per-position latents: what DeepSeek-V2 caches instead of per-head keys and values.

    Attributes:
        c_kv (Tensor): [B, S, R] normalised compressed key/value latent.
        k_pe (Tensor): [B, S, P] rotated decoupled key (shared by all heads).
        key_valid (Tensor): [B, S] bool.
        nonfinite_last (Tensor): [B] int64, 1 + the position of the latest non-finite valid token (0: none).
    """

    c_kv: torch.Tensor = None
    k_pe: torch.Tensor = None
    key_valid: torch.Tensor = None
    nonfinite_last: torch.Tensor = None

    @classmethod
    def allocate(cls, batch_size: int, max_seqlen: int, kv_lora_rank: int, rope_dim: int, *, device=None,
                 dtype=None) -> MLACache:
        cache = cls.empty(batch_size, max_seqlen, device=device)
        cache.c_kv = torch.zeros(batch_size, max_seqlen, kv_lora_rank, device=device, dtype=dtype)
        cache.k_pe = torch.zeros(batch_size, max_seqlen, rope_dim, device=device, dtype=dtype)
        cache.key_valid = torch.zeros(batch_size, max_seqlen, dtype=torch.bool, device=device)
        cache.nonfinite_last = torch.zeros(batch_size, dtype=torch.long, device=device)
        return cache

    def write(self, index: torch.Tensor, c_kv: torch.Tensor, k_pe: torch.Tensor, valid: torch.Tensor) -> None:
        """Store latents [B, T, R], rotated keys [B, T, P] and validity [B, T] at positions ``index`` [B, T]."""
        b_idx = torch.arange(index.shape[0], device=index.device)[:, None]
        self.c_kv[b_idx, index] = c_kv.to(self.c_kv.dtype)
        self.k_pe[b_idx, index] = k_pe.to(self.k_pe.dtype)
        self.key_valid[b_idx, index] = valid

    @property
    def capacity(self) -> int:
        return self.c_kv.shape[1]

    def read(self, S: int, T: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Latents [B, S, R], rotated keys [B, S, P] and validity [B, S] of slots 0..S-1."""
        return self.c_kv[:, :S], self.k_pe[:, :S], self.key_valid[:, :S]


@dataclasses.dataclass(eq=False)
class LinearAttentionCache(Cache):
    """Linear attention's recurrent state (fp32; float64 for float64 models).

    Attributes:
        state (Tensor): [B, Hkv, K, V] sum of phi(k) v^T. normalizer (Tensor): [B, Hkv, K] sum of phi(k).
    """

    state: torch.Tensor = None
    normalizer: torch.Tensor = None

    @classmethod
    def allocate(cls, batch_size: int, max_seqlen: int, num_kv_heads: int, head_dim: int, v_dim: int, *,
                 device=None, dtype=None) -> LinearAttentionCache:
        dt = torch.float64 if dtype == torch.float64 else torch.float32
        cache = cls.empty(batch_size, max_seqlen, device=device)
        cache.state = torch.zeros(batch_size, num_kv_heads, head_dim, v_dim, device=device, dtype=dt)
        cache.normalizer = torch.zeros(batch_size, num_kv_heads, head_dim, device=device, dtype=dt)
        return cache


@dataclasses.dataclass(eq=False)
class CrossAttentionCache(Cache):
    """Keys / values of an encoder output ("memory"), computed once and reused by every decode step.

    ``max_seqlen`` is the memory length M. ``filled`` is False until the first call with a memory
    computes them; ``reset`` empties it (a new memory). ``seqlen_offset`` counts decoder tokens.

    Attributes:
        k (Tensor): [B, Hkv, M, K]. v (Tensor): [B, Hkv, M, V]. key_valid (Tensor): [B, M] bool.
        memory_positions (Tensor): [B, M] absolute positions of the memory tokens.
    """

    k: torch.Tensor = None
    v: torch.Tensor = None
    key_valid: torch.Tensor = None
    memory_positions: torch.Tensor = None
    filled: bool = False

    @classmethod
    def allocate(cls, batch_size: int, memory_seqlen: int, num_kv_heads: int, head_dim: int, v_dim: int, *,
                 device=None, dtype=None) -> CrossAttentionCache:
        cache = cls.empty(batch_size, memory_seqlen, device=device)
        cache.k = torch.zeros(batch_size, num_kv_heads, memory_seqlen, head_dim, device=device, dtype=dtype)
        cache.v = torch.zeros(batch_size, num_kv_heads, memory_seqlen, v_dim, device=device, dtype=dtype)
        cache.key_valid = torch.zeros(batch_size, memory_seqlen, dtype=torch.bool, device=device)
        cache.memory_positions = torch.zeros(batch_size, memory_seqlen, dtype=torch.long, device=device)
        return cache

    def reset(self) -> None:
        super().reset()
        self.filled = False

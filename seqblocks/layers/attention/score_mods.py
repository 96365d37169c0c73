"""FlexAttention-style score and mask modifiers, evaluated at ABSOLUTE positions.

A score mod is ``score_mod(score, b, h, q_idx, kv_idx) -> score`` and a mask mod is
``mask_mod(b, h, q_idx, kv_idx) -> bool`` (True = attend): FlexAttention's signatures. In seqblocks
``q_idx`` and ``kv_idx`` are absolute token positions (a cache's offset plus the index in the call),
never indices into the current chunk, so a mod gives the same result in a full pass and while decoding
token by token. Every backend that supports mods calls them with broadcastable tensors (``standard``,
``memory_efficient``, ``flash`` for mask mods) or through FlexAttention's vmap (``flex``), so a mod must
use only elementwise tensor operations and indexing.

``compose(*mods)`` chains score mods left to right (``compose(f, g)(s) == g(f(s))``) or intersects
mask mods. Each factory returns a plain function carrying a ``kind`` attribute ("score" or "mask").

Converters: ``mask_mod_to_score_mod(mask_mod)`` is the score mod that sets disallowed scores to -inf
(so a mask can travel where only a score mod is taken, e.g. a kernel given through ``attention_fn=``),
and ``mask_mod_to_boolean_mask(mask_mod, batch=, num_heads=, seq_q=, seq_kv=)`` materialises a mask
mod as a bool [B, H, Tq, Tk] tensor at positions ``0 .. seq_q - 1`` / ``0 .. seq_kv - 1``.

Shapes: B batch, H heads, T time.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable

import torch

from seqblocks.layers.position import alibi_slopes

__all__ = ["causal_mask", "sliding_window_mask", "chunked_causal_mask", "prefix_lm_mask", "document_mask",
           "alibi_score_mod", "soft_cap", "additive_bias", "compose", "and_masks", "or_masks", "mod_kind",
           "mask_mod_to_score_mod", "mask_mod_to_boolean_mask"]


def _tag(fn: Callable, kind: str, name: str) -> Callable:
    fn.kind = kind
    fn.__name__ = fn.__qualname__ = name
    return fn


def mod_kind(mod: Callable) -> str:
    """"score" for a score mod, "mask" for a mask mod (by the ``kind`` tag, else by arity: 5 or 4).

    Raises:
        TypeError: ``mod`` is neither.
    """
    kind = getattr(mod, "kind", None)
    if kind in ("score", "mask"):
        return kind
    try:
        n = len(inspect.signature(mod).parameters)
    except (TypeError, ValueError):
        n = -1
    if n == 5:
        return "score"
    if n == 4:
        return "mask"
    raise TypeError(f"{mod!r} is neither a score_mod (score, b, h, q_idx, kv_idx) nor a mask_mod "
                    f"(b, h, q_idx, kv_idx)")


def causal_mask(b, h, q_idx, kv_idx):
    """Mask mod: a query sees keys at positions <= its own."""
    return q_idx >= kv_idx


causal_mask.kind = "mask"


def sliding_window_mask(window: int) -> Callable:
    """Mask mod: causal, and a query at p sees keys in (p - window, p] (itself and window - 1 before).

    Raises:
        ValueError: ``window`` is not a positive int.
    """
    if not isinstance(window, int) or window <= 0:
        raise ValueError(f"sliding_window_mask: window={window!r} must be a positive int")

    def mask(b, h, q_idx, kv_idx):
        d = q_idx - kv_idx
        return (d >= 0) & (d < window)

    return _tag(mask, "mask", f"sliding_window_mask_{window}")


def chunked_causal_mask(chunk_size: int) -> Callable:
    """Mask mod: Llama-4 chunked local attention: causal, and a query sees only keys of its own chunk
    (positions ``c * chunk_size .. (c + 1) * chunk_size - 1``).

    Raises:
        ValueError: ``chunk_size`` is not a positive int.
    """
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size <= 0:
        raise ValueError(f"chunked_causal_mask: chunk_size={chunk_size!r} must be a positive int")

    def mask(b, h, q_idx, kv_idx):
        return (q_idx >= kv_idx) & (torch.div(q_idx, chunk_size, rounding_mode="floor")
                                    == torch.div(kv_idx, chunk_size, rounding_mode="floor"))

    return _tag(mask, "mask", f"chunked_causal_mask_{chunk_size}")


def prefix_lm_mask(prefix_length: int | torch.Tensor) -> Callable:
    """Mask mod: every query sees the first ``prefix_length`` positions (bidirectional prefix) and is
    causal after it.

    Args:
        prefix_length (int | Tensor): one length, or [B] per sequence.
    """
    if isinstance(prefix_length, int):
        if prefix_length < 0:
            raise ValueError(f"prefix_lm_mask: prefix_length={prefix_length} must be >= 0")

        def mask(b, h, q_idx, kv_idx):
            return (kv_idx < prefix_length) | (q_idx >= kv_idx)
    else:
        if prefix_length.dim() != 1 or prefix_length.dtype.is_floating_point:
            raise ValueError(f"prefix_lm_mask: prefix_length must be an int or an integer [B] tensor, got "
                             f"{prefix_length.dtype} {tuple(prefix_length.shape)}")

        def mask(b, h, q_idx, kv_idx):
            return (kv_idx < prefix_length[b]) | (q_idx >= kv_idx)

    return _tag(mask, "mask", "prefix_lm_mask")


def document_mask(document_ids: torch.Tensor, causal: bool = True) -> Callable:
    """Mask mod for packed sequences: a query sees only keys of its own document (and, if causal,
    not after itself).

    Args:
        document_ids (Tensor): [T] or [B, T] integer document id of each ABSOLUTE position; it must
            cover every position the mod will see (all cached tokens while decoding).
        causal (bool): also apply the causal mask. Default: True.
    """
    if document_ids.dtype.is_floating_point or document_ids.dim() not in (1, 2):
        raise ValueError(f"document_mask: document_ids must be an integer [T] or [B, T] tensor, got "
                         f"{document_ids.dtype} {tuple(document_ids.shape)}")
    ids = document_ids

    if ids.dim() == 1:
        def same(b, q_idx, kv_idx):
            return ids[q_idx] == ids[kv_idx]
    else:
        def same(b, q_idx, kv_idx):
            return ids[b, q_idx] == ids[b, kv_idx]

    def mask(b, h, q_idx, kv_idx):
        ok = same(b, q_idx, kv_idx)
        return ok & (q_idx >= kv_idx) if causal else ok

    return _tag(mask, "mask", "document_mask")


def alibi_score_mod(slopes: int | torch.Tensor) -> Callable:
    """Score mod: ALiBi, ``score - slope_h * |q_idx - kv_idx|``.

    Args:
        slopes (int | Tensor): the number of heads (standard slopes, ``alibi_slopes``) or [H] slopes.
    """
    s = alibi_slopes(slopes) if isinstance(slopes, int) else slopes

    def mod(score, b, h, q_idx, kv_idx):
        return score - s.to(score.device, score.dtype)[h] * (q_idx - kv_idx).abs().to(score.dtype)

    return _tag(mod, "score", "alibi_score_mod")


def soft_cap(cap: float) -> Callable:
    """Score mod: tanh soft-capping, ``cap * tanh(score / cap)`` (Gemma 2, Grok)."""
    if not cap > 0:
        raise ValueError(f"soft_cap: cap={cap!r} must be positive")
    cap = float(cap)

    def mod(score, b, h, q_idx, kv_idx):
        return cap * torch.tanh(score / cap)

    return _tag(mod, "score", f"soft_cap_{cap:g}")


def additive_bias(bias: torch.Tensor) -> Callable:
    """Score mod: ``score + bias[..., q_idx, kv_idx]`` for a bias indexed by absolute positions.

    Args:
        bias (Tensor): [P, P], [H, P, P] or [B, H, P, P] with P covering every position the mod sees.
    """
    if bias.dim() == 2:
        def mod(score, b, h, q_idx, kv_idx):
            return score + bias[q_idx, kv_idx].to(score.dtype)
    elif bias.dim() == 3:
        def mod(score, b, h, q_idx, kv_idx):
            return score + bias[h, q_idx, kv_idx].to(score.dtype)
    elif bias.dim() == 4:
        def mod(score, b, h, q_idx, kv_idx):
            return score + bias[b, h, q_idx, kv_idx].to(score.dtype)
    else:
        raise ValueError(f"additive_bias: bias must be [P, P], [H, P, P] or [B, H, P, P], got {tuple(bias.shape)}")
    return _tag(mod, "score", "additive_bias")


def and_masks(*masks: Callable) -> Callable:
    """Mask mod allowing a pair only if every mask allows it."""
    if not masks:
        raise ValueError("and_masks needs at least one mask mod")

    def mask(b, h, q_idx, kv_idx):
        ok = masks[0](b, h, q_idx, kv_idx)
        for m in masks[1:]:
            ok = ok & m(b, h, q_idx, kv_idx)
        return ok

    return _tag(mask, "mask", "and_masks")


def or_masks(*masks: Callable) -> Callable:
    """Mask mod allowing a pair if any mask allows it."""
    if not masks:
        raise ValueError("or_masks needs at least one mask mod")

    def mask(b, h, q_idx, kv_idx):
        ok = masks[0](b, h, q_idx, kv_idx)
        for m in masks[1:]:
            ok = ok | m(b, h, q_idx, kv_idx)
        return ok

    return _tag(mask, "mask", "or_masks")


def compose(*mods: Callable) -> Callable:
    """Compose mods of one kind: score mods apply left to right (``compose(f, g)`` is ``g(f(score))``);
    mask mods intersect (as ``and_masks``).

    Raises:
        ValueError: no mods. TypeError: score and mask mods mixed.
    """
    if not mods:
        raise ValueError("compose needs at least one mod")
    kinds = {mod_kind(m) for m in mods}
    if len(kinds) > 1:
        raise TypeError("compose: cannot mix score mods and mask mods; pass mask mods as mask_mod= and "
                        "score mods as score_mod=")
    if kinds == {"mask"}:
        return and_masks(*mods)

    def mod(score, b, h, q_idx, kv_idx):
        for m in mods:
            score = m(score, b, h, q_idx, kv_idx)
        return score

    return _tag(mod, "score", "compose")


def mask_mod_to_score_mod(mask_mod: Callable) -> Callable:
    """The score mod equivalent to ``mask_mod``: scores it disallows become -inf, the others are unchanged.

    A query whose every key is disallowed then outputs 0 in seqblocks' backends, as under the mask mod.

    Raises:
        TypeError: ``mask_mod`` is not a mask mod ``(b, h, q_idx, kv_idx) -> bool``.
    """
    if mod_kind(mask_mod) != "mask":
        raise TypeError(f"mask_mod_to_score_mod: {mask_mod!r} is a score mod; expected a mask mod "
                        f"(b, h, q_idx, kv_idx) -> bool")

    def mod(score, b, h, q_idx, kv_idx):
        keep = mask_mod(b, h, q_idx, kv_idx)
        if not isinstance(keep, torch.Tensor):
            keep = torch.tensor(bool(keep), device=score.device)
        return torch.where(keep.to(torch.bool), score, torch.full_like(score, float("-inf")))

    return _tag(mod, "score", f"score_mod_of_{getattr(mask_mod, '__name__', 'mask_mod')}")


def mask_mod_to_boolean_mask(mask_mod: Callable, *, batch: int, num_heads: int, seq_q: int, seq_kv: int,
                             device: torch.device | str | None = None) -> torch.Tensor:
    """Materialise ``mask_mod`` as a bool [batch, num_heads, seq_q, seq_kv] tensor (True = attend).

    The mod is called once with broadcastable index tensors b [B, 1, 1, 1], h [1, H, 1, 1],
    q_idx [1, 1, Tq, 1] and kv_idx [1, 1, 1, Tk] (positions 0 .. seq_q - 1 and 0 .. seq_kv - 1).

    Args:
        mask_mod (Callable): ``(b, h, q_idx, kv_idx) -> bool``.
        batch, num_heads, seq_q, seq_kv (int): the mask's shape.
        device (torch.device | str | None): where to build it. Default: None (CPU).

    Raises:
        TypeError: ``mask_mod`` is a score mod. ValueError: a size that is not a positive int.
    """
    if mod_kind(mask_mod) != "mask":
        raise TypeError(f"mask_mod_to_boolean_mask: {mask_mod!r} is a score mod; expected a mask mod "
                        f"(b, h, q_idx, kv_idx) -> bool")
    sizes = {"batch": batch, "num_heads": num_heads, "seq_q": seq_q, "seq_kv": seq_kv}
    for name, value in sizes.items():
        if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
            raise ValueError(f"mask_mod_to_boolean_mask: {name}={value!r} must be a positive int")
    b = torch.arange(batch, device=device)[:, None, None, None]
    h = torch.arange(num_heads, device=device)[None, :, None, None]
    q_idx = torch.arange(seq_q, device=device)[None, None, :, None]
    kv_idx = torch.arange(seq_kv, device=device)[None, None, None, :]
    out = torch.as_tensor(mask_mod(b, h, q_idx, kv_idx), device=device).to(torch.bool)
    return out.expand(batch, num_heads, seq_q, seq_kv).contiguous()

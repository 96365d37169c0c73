"""The ``flex`` backend: PyTorch FlexAttention, compiled to a fused kernel on GPU, eager on CPU.

Masks (causal, window, key padding, ``mask_mod``, a boolean ``attn_mask``) become one ``mask_mod`` and a
``BlockMask``, so fully masked tiles are skipped; score changes (ALiBi, ``score_mod``, a float
``attn_mask``) become one ``score_mod``. Mods receive ABSOLUTE positions: when the request carries
positions (a cache offset, a rolling window) the mods are wrapped to translate flex's tensor indices;
when it does not, the user's mod is passed to flex untouched, so the call is exactly a raw flex call.

The block mask of a request whose mask depends only on shapes (causal and / or window with aligned
positions) is cached per (Tq, Tk, window, device); any other block mask is built per call.

Limits: no attention dropout (``ValueError``); on CPU, forward only (FlexAttention has no CPU
backward), also ``ValueError``.

Shapes: B batch, H query heads, Hkv key/value heads, Tq queries, Tk keys, K key width, V value width.
"""

from __future__ import annotations

import functools
import inspect
import warnings

import torch

from seqblocks.ops._backend import probe_once
from seqblocks.ops.attention._common import AttentionArgs, acc_dtype

__all__ = ["attention_flex", "flex_available"]


def _import_flex() -> bool:
    try:
        import torch.nn.attention.flex_attention  # noqa: F401
    except ImportError:
        return False
    return True


@torch.compiler.assume_constant_result  # a compiled graph takes the answer as a constant
def flex_available() -> bool:
    """True when ``torch.nn.attention.flex_attention`` imports (torch >= 2.5)."""
    return probe_once("flex_attention", _import_flex)


@functools.cache
def _compiled_flex():
    from torch.nn.attention.flex_attention import flex_attention

    return torch.compile(flex_attention, dynamic=False)


@functools.lru_cache(maxsize=32)
def _static_block_mask(Tq: int, Tk: int, window: int | None, device: torch.device):
    """Causal (optionally windowed) block mask of aligned positions, built once per shape."""
    return _block_mask(_aligned_mask(Tq, Tk, window), None, None, Tq, Tk, device)


def _aligned_mask(Tq: int, Tk: int, window: int | None):
    shift = Tk - Tq  # queries are the last Tq of the Tk keys

    def causal(b, h, q_idx, kv_idx):
        return q_idx + shift >= kv_idx

    def windowed(b, h, q_idx, kv_idx):
        d = q_idx + shift - kv_idx
        return (d >= 0) & (d < window)

    return causal if window is None else windowed


@functools.cache
def _block_mask_builder(on_cuda: bool):
    """create_block_mask, compiled on CUDA (a dense [B, H, Tq, Tk] evaluation in eager mode)."""
    from torch.nn.attention.flex_attention import create_block_mask

    if not on_cuda:
        return create_block_mask
    if "_compile" in inspect.signature(create_block_mask).parameters:
        # torch 2.5-2.13 spell it _compile=True (deprecated in favour of compiling the function).
        def build(*args, **kwargs):
            with warnings.catch_warnings():
                warnings.filterwarnings("ignore", message=".*_compile flag on create_block_mask.*")
                return create_block_mask(*args, _compile=True, **kwargs)

        return build
    return torch.compile(create_block_mask)


def _block_mask(mask_mod, B, H, Tq, Tk, device):
    return _block_mask_builder(device.type == "cuda")(mask_mod, B, H, Tq, Tk, device=device)


def _lookup(pos: torch.Tensor):
    """Index function b, i -> absolute position for a [B or 1, T] position table."""
    if pos.shape[0] == 1:
        row = pos[0]
        return lambda b, i: row[i]
    return lambda b, i: pos[b, i]


def attention_flex(a: AttentionArgs, *, training_dropout: bool = True) -> torch.Tensor:
    """Softmax attention through FlexAttention; out [B, H, Tq, V] in q's dtype, equal to ``attention_standard``."""
    if not flex_available():
        raise ValueError("attention backend 'flex' needs torch.nn.attention.flex_attention (torch >= 2.5)")
    if a.dropout_p > 0 and training_dropout:
        raise ValueError("attention backend 'flex' has no attention dropout; use 'flash', 'standard' or "
                         "'memory_efficient' while training with dropout > 0")
    on_cuda = a.q.is_cuda
    if not on_cuda and torch.is_grad_enabled() and any(t.requires_grad for t in (a.q, a.k, a.v)):
        raise ValueError("attention backend 'flex' has no backward on CPU; use 'standard' or "
                         "'memory_efficient' for CPU training (or run under torch.no_grad())")
    B, H, Tq, _ = a.q.shape
    Tk = a.k.shape[2]
    aligned = a.default_positions and Tq == Tk
    q_at = k_at = None
    if not aligned or a.alibi_slopes is not None or a.key_valid is not None or a.mask_mod is not None \
            or a.attn_mask is not None:
        qpos, kpos = a.positions()
        q_at, k_at = _lookup(qpos), _lookup(kpos)

    score_mod = None
    user_mod, slopes = a.score_mod, a.alibi_slopes
    fmask = a.attn_mask if a.attn_mask is not None and a.attn_mask.dtype != torch.bool else None
    if user_mod is not None and aligned and slopes is None and fmask is None:
        score_mod = user_mod  # indices already are absolute positions: a raw flex call
    elif user_mod is not None or slopes is not None or fmask is not None:
        slopes_f = None if slopes is None else slopes.to(acc_dtype(a.q))
        fb = None if fmask is None else (lambda b: b if fmask.shape[0] > 1 else 0)
        fh = None if fmask is None else (lambda h: h if fmask.shape[1] > 1 else 0)

        def score_mod(score, b, h, q_idx, kv_idx):
            qa, ka = q_at(b, q_idx), k_at(b, kv_idx)
            if slopes_f is not None:
                score = score - slopes_f[h] * (qa - ka).abs()
            if user_mod is not None:
                score = user_mod(score, b, h, qa, ka)
            if fmask is not None:
                score = score + fmask[fb(b), fh(h), q_idx, kv_idx]
            return score

    block_mask = None
    bmask = a.attn_mask if a.attn_mask is not None and a.attn_mask.dtype == torch.bool else None
    if a.has_mask:
        only_shape = a.key_valid is None and a.mask_mod is None and bmask is None
        if only_shape and a.default_positions:
            block_mask = _static_block_mask(Tq, Tk, a.window, a.q.device)
        else:
            block_mask = _block_mask(_combined_mask(a, q_at, k_at, bmask), B, H if _per_head(a) else None,
                                     Tq, Tk, a.q.device)
    kwargs = {"score_mod": score_mod, "block_mask": block_mask, "scale": a.scale,
              "enable_gqa": a.q.shape[1] != a.k.shape[1]}
    if on_cuda:
        # Inductor's flex template has no kernel choice for some strided fp32 layouts (seen on torch 2.11):
        # give it dense inputs (a no-op for the usual contiguous [B, H, T, K] tensors).
        q, k, v = (t if t.is_contiguous() else t.contiguous() for t in (a.q, a.k, a.v))
        try:
            return _compiled_flex()(q, k, v, **kwargs)
        except Exception as err:
            # Inductor sometimes has no flex kernel for a dtype / head width / GQA combination (seen on
            # torch 2.11: fp32, head width 32, GQA, no score_mod). Eager flex computes the same function.
            if type(err).__name__ not in _COMPILE_FAILURES:
                raise
            warnings.warn(f"flex: no compiled FlexAttention kernel for q {tuple(q.shape)} {q.dtype}, k "
                          f"{tuple(k.shape)} ({type(err).__name__}); running it eagerly (slower, same result)",
                          RuntimeWarning, stacklevel=2)
            return _eager_flex(q, k, v, kwargs)
    # Grad mode is off here (checked above): detached inputs pass flex's CPU no-backward check.
    return _eager_flex(a.q.detach(), a.k.detach(), a.v.detach(), kwargs)


_COMPILE_FAILURES = ("InductorError", "LoweringException", "NoValidChoicesError", "BackendCompilerFailed")


def _eager_flex(q, k, v, kwargs):
    from torch.nn.attention.flex_attention import flex_attention

    with warnings.catch_warnings():
        # Eager flex is the CPU path by design (tests, small runs); its "use torch.compile" hint is noise.
        warnings.filterwarnings("ignore", message=".*flex_attention called without torch.compile.*")
        return flex_attention(q, k, v, **kwargs)


def _per_head(a: AttentionArgs) -> bool:
    """Whether the mask may differ between heads (then the block mask is built per head)."""
    if a.mask_mod is not None:
        return True
    return a.attn_mask is not None and a.attn_mask.dtype == torch.bool and a.attn_mask.shape[1] > 1


def _combined_mask(a: AttentionArgs, q_at, k_at, bmask):
    causal, window, key_valid, user = a.causal, a.window, a.key_valid, a.mask_mod
    mb = None if bmask is None else (lambda b: b if bmask.shape[0] > 1 else 0)
    mh = None if bmask is None else (lambda h: h if bmask.shape[1] > 1 else 0)

    def mask_mod(b, h, q_idx, kv_idx):
        qa, ka = q_at(b, q_idx), k_at(b, kv_idx)
        ok = qa >= ka if (causal or window is not None) else torch.ones_like(qa, dtype=torch.bool)
        if window is not None:
            ok = ok & (qa - ka < window)
        if key_valid is not None:
            ok = ok & key_valid[b, kv_idx]
        if user is not None:
            ok = ok & user(b, h, qa, ka)
        if bmask is not None:
            ok = ok & bmask[mb(b), mh(h), q_idx, kv_idx]
        return ok

    return mask_mod


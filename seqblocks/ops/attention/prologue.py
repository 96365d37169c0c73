"""The attention layers' prologue on q, k, v: RoPE, then non-finite values set to 0 with the tokens that
held them flagged: ``rope_nonfinite_qkv``.

The function, for q [B, T, H, K], k [B, T, Hkv, K], v [B, T, Hkv, V] and angles' ``cos`` / ``sin``
[B or 1, T, 1, R / 2] (R = ``rotary_dim`` <= K, the first R channels of each q / k head rotate):

    rotate(x)   = x with its pairs (x1, x2) -> (x1 cos - x2 sin, x2 cos + x1 sin), computed in the
                  angles' dtype and rounded back to x's dtype; pairs are the two halves of the first R
                  channels (GPT-NeoX) or channels (2j, 2j + 1) (``interleaved``, GPT-J)
    q', k'      = rotate(q), rotate(k)            (no rotation when cos / sin are None)
    bad_q[b, t] = any(not finite(q'[b, t]))       bad_kv[b, t] = any(not finite(k'[b, t]), not finite(v[b, t]))
    returns     (zero(q'), zero(k'), zero(v), bad_q, bad_kv)    zero(x): NaN / ±Inf -> 0

which is what the layers' non-finite rule (``seqblocks.layers.finite``) needs before the softmax. The
PyTorch path (``rope_nonfinite_qkv_reference``) is the readable spec: about 40 elementwise kernels per
layer on the GPU for a decode step (the two rotations, three finiteness passes, three selects). The
Triton kernel (``prologue_triton.py``) is one launch: one program per (token, q or k + v) reads the
token's heads once, rotates, tests and writes them. It is forward-only, so ``backend="auto"`` takes it
for CUDA inputs (fp16 / bf16 / fp32, fp32 angles) that need no gradient - decoding and serving - and
the PyTorch path otherwise (training; autograd differentiates it).

Shapes: B batch, T time, H query heads, Hkv key/value heads, K q / k head width, V v head width,
R rotary width.
"""

from __future__ import annotations

import torch

from seqblocks.ops._backend import resolve_backend

__all__ = ["rope_nonfinite_qkv", "rope_nonfinite_qkv_reference", "apply_rotary"]

_KERNEL_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
_MAX_ELEMENTS = 1 << 15  # heads x width of one token the kernel holds in registers


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, rotary_dim: int,
                 interleaved: bool = False) -> torch.Tensor:
    """``x`` [B, T, H, K] with its first ``rotary_dim`` channels rotated by the angles whose cosines and
    sines are ``cos`` / ``sin`` [B or 1, T, 1, rotary_dim / 2] (computed in their dtype, rounded back to
    x's); the other channels pass through."""
    rot = x[..., :rotary_dim].to(cos.dtype)
    if interleaved:
        x1, x2 = rot[..., 0::2], rot[..., 1::2]
        rotated = torch.stack((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1).flatten(-2)
    else:
        x1, x2 = rot.chunk(2, dim=-1)
        rotated = torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1)
    if rotary_dim == x.shape[-1]:  # nothing passes through: no second concatenation
        return rotated.to(x.dtype)
    return torch.cat((rotated.to(x.dtype), x[..., rotary_dim:]), dim=-1)


def _split(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    finite = torch.isfinite(x)
    return ~finite.reshape(x.shape[0], x.shape[1], -1).all(-1), torch.where(finite, x, 0.0)


def rope_nonfinite_qkv_reference(q, k, v, cos, sin, rotary_dim, interleaved=False):
    """The PyTorch path of ``rope_nonfinite_qkv`` (same arguments and returns)."""
    if cos is not None:
        q = apply_rotary(q, cos, sin, rotary_dim, interleaved)
        k = apply_rotary(k, cos, sin, rotary_dim, interleaved)
    bad_q, q = _split(q)
    bad_k, k = _split(k)
    bad_v, v = _split(v)
    return q, k, v, bad_q, bad_k | bad_v


def _check(q, k, v, cos, sin, rotary_dim) -> None:
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor) or t.dim() != 4:
            raise ValueError(f"rope_nonfinite_qkv: {name} must be a 4-D [B, T, heads, width] tensor, got "
                             f"{tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__}")
        if not t.dtype.is_floating_point:
            raise TypeError(f"rope_nonfinite_qkv: {name} must be floating point, got {t.dtype}")
    B, T, _, K = q.shape
    if k.shape[:2] != (B, T) or v.shape[:2] != (B, T) or k.shape[3] != K or k.shape[2] != v.shape[2]:
        raise ValueError(f"rope_nonfinite_qkv: q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)} must "
                         f"share B, T; k must have q's width and v's head count")
    if (cos is None) != (sin is None):
        raise ValueError("rope_nonfinite_qkv: give both cos and sin, or neither")
    if cos is not None:
        if not (isinstance(rotary_dim, int) and 0 < rotary_dim <= K and rotary_dim % 2 == 0):
            raise ValueError(f"rope_nonfinite_qkv: rotary_dim={rotary_dim!r} must be an even int in (0, {K}]")
        want = (T, 1, rotary_dim // 2)
        for name, t in (("cos", cos), ("sin", sin)):
            if t.dim() != 4 or tuple(t.shape[1:]) != want or t.shape[0] not in (1, B):
                raise ValueError(f"rope_nonfinite_qkv: {name} must have shape [1 or {B}, {T}, 1, "
                                 f"{rotary_dim // 2}], got {tuple(t.shape)}")


def _kernel_serves(q, k, v, cos) -> bool:
    needs_grad = torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, v))
    return (all(t.dtype in _KERNEL_DTYPES for t in (q, k, v)) and (cos is None or cos.dtype == torch.float32)
            and not needs_grad and q.numel() > 0
            and max(q.shape[2] * q.shape[3], k.shape[2] * (k.shape[3] + v.shape[3])) <= _MAX_ELEMENTS)


def rope_nonfinite_qkv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cos: torch.Tensor | None,
                       sin: torch.Tensor | None, *, rotary_dim: int | None = None, interleaved: bool = False,
                       backend: str = "auto"):
    """RoPE on q and k, then NaN / ±Inf set to 0 in q, k and v with the tokens that held them flagged
    (module docstring).

    Args:
        q (Tensor): [B, T, H, K] queries.
        k (Tensor): [B, T, Hkv, K] keys.
        v (Tensor): [B, T, Hkv, V] values.
        cos, sin (Tensor | None): [B or 1, T, 1, R / 2] the angles' cosines and sines (fp32 for fp16 /
            bf16 / fp32 inputs), or both None for no rotation.
        rotary_dim (int | None): R, the rotated channels of each head. Default: None (= K).
        interleaved (bool): rotate channel pairs (2j, 2j + 1) instead of the two halves. Default: False.
        backend (str): "auto", "torch" or "triton" (``seqblocks.ops._backend``). Default: "auto".

    Returns:
        (q', k', v', bad_q [B, T] bool, bad_kv [B, T] bool).

    Raises:
        ValueError / TypeError: shapes, dtypes or ``rotary_dim`` that do not fit.
    """
    rotary_dim = q.shape[-1] if rotary_dim is None and isinstance(q, torch.Tensor) else rotary_dim
    _check(q, k, v, cos, sin, rotary_dim)
    use = resolve_backend(backend, q, k, v, op="rope_nonfinite_qkv", has_kernel=_kernel_serves(q, k, v, cos))
    if use == "torch":
        return rope_nonfinite_qkv_reference(q, k, v, cos, sin, rotary_dim, interleaved)
    from seqblocks.ops.attention.prologue_triton import rope_nonfinite_qkv_triton

    return rope_nonfinite_qkv_triton(q, k, v, cos, sin, rotary_dim, interleaved)

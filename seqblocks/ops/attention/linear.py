"""Kernelized linear attention (Katharopoulos et al., 2020): a recurrent form and a chunked parallel form.

With a positive feature map phi (``elu``: elu(x) + 1, ``relu``, ``identity``), causal linear attention is

    S_t = S_{t-1} + phi(k_t) v_t^T          [K, V] state
    z_t = z_{t-1} + phi(k_t)                [K] normaliser
    y_t = phi(q_t)^T S_t / (phi(q_t)^T z_t + eps)       (normalize=True; y_t = phi(q_t)^T S_t otherwise)

``linear_attention_recurrent`` runs this loop (the spec); ``linear_attention_chunked`` computes the same
outputs C tokens at a time: inside a chunk a masked [C, C] product, across chunks the carried (S, z).
The non-causal form uses the sums over all keys. Keys marked invalid by ``key_valid`` never enter the
state. States accumulate in fp32; GQA groups of queries read their key/value head's state.

Shapes: B batch, H query heads, Hkv key/value heads, G = H / Hkv, T time, K key width, V value width,
C chunk.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = ["FEATURE_MAPS", "feature_map", "linear_attention_recurrent", "linear_attention_chunked"]

FEATURE_MAPS = ("elu", "relu", "identity")


def feature_map(x: torch.Tensor, name: str) -> torch.Tensor:
    """phi(x) in fp32 (float64 for float64 inputs): ``elu`` (elu + 1, positive), ``relu`` or ``identity``."""
    x = x.to(torch.float64 if x.dtype == torch.float64 else torch.float32)
    if name == "elu":
        return F.elu(x) + 1.0
    if name == "relu":
        return F.relu(x)
    if name == "identity":
        return x
    raise ValueError(f"linear attention: unknown feature_map {name!r}; expected one of {FEATURE_MAPS}")


def _prepare(q, k, v, feature, key_valid):
    B, H, T, K = q.shape
    Hkv = k.shape[1]
    fq = feature_map(q, feature).view(B, Hkv, H // Hkv, T, K)  # [B, Hkv, G, T, K]
    fk = feature_map(k, feature)  # [B, Hkv, T, K]
    if key_valid is not None:
        fk = fk * key_valid[:, None, :, None]
    return fq, fk, v.to(fk.dtype)


def _finish(num, den, normalize, eps, dtype, shape):
    out = num / (den[..., None] + eps) if normalize else num
    return out.reshape(shape).to(dtype)


def linear_attention_recurrent(q, k, v, *, causal: bool = True, feature: str = "elu", normalize: bool = True,
                               eps: float = 1e-6, initial_state=None, key_valid=None):
    """The spec: a token-by-token loop. Returns (out [B, H, T, V], (S [B, Hkv, K, V], z [B, Hkv, K]) fp32)."""
    B, H, T, _ = q.shape
    fq, fk, vf = _prepare(q, k, v, feature, key_valid)
    Hkv, K, V = fk.shape[1], fk.shape[-1], vf.shape[-1]
    S = fk.new_zeros(B, Hkv, K, V) if initial_state is None else initial_state[0].to(fk.dtype).clone()
    z = fk.new_zeros(B, Hkv, K) if initial_state is None else initial_state[1].to(fk.dtype).clone()
    if not causal:
        S = S + torch.einsum("bgtk,bgtv->bgkv", fk, vf)
        z = z + fk.sum(dim=2)
    nums, dens = [], []
    for t in range(T):
        if causal:
            S = S + fk[:, :, t, :, None] * vf[:, :, t, None, :]
            z = z + fk[:, :, t]
        qt = fq[:, :, :, t]  # [B, Hkv, G, K]
        nums.append(torch.einsum("bhgk,bhkv->bhgv", qt, S))
        dens.append(torch.einsum("bhgk,bhk->bhg", qt, z))
    num = torch.stack(nums, dim=3)  # [B, Hkv, G, T, V]
    den = torch.stack(dens, dim=3)
    return _finish(num, den, normalize, eps, q.dtype, (B, H, T, V)), (S, z)


def linear_attention_chunked(q, k, v, *, causal: bool = True, chunk_size: int = 64, feature: str = "elu",
                             normalize: bool = True, eps: float = 1e-6, initial_state=None, key_valid=None):
    """The chunked parallel form; same outputs and final state as ``linear_attention_recurrent``."""
    if not isinstance(chunk_size, int) or chunk_size <= 0:
        raise ValueError(f"linear attention: chunk_size={chunk_size!r} must be a positive int")
    B, H, T, _ = q.shape
    fq, fk, vf = _prepare(q, k, v, feature, key_valid)
    Hkv, K, V = fk.shape[1], fk.shape[-1], vf.shape[-1]
    S = fk.new_zeros(B, Hkv, K, V) if initial_state is None else initial_state[0].to(fk.dtype)
    z = fk.new_zeros(B, Hkv, K) if initial_state is None else initial_state[1].to(fk.dtype)
    if not causal:
        S = S + torch.einsum("bgtk,bgtv->bgkv", fk, vf)
        z = z + fk.sum(dim=2)
        num = torch.einsum("bhgtk,bhkv->bhgtv", fq, S)
        den = torch.einsum("bhgtk,bhk->bhgt", fq, z)
        return _finish(num, den, normalize, eps, q.dtype, (B, H, T, V)), (S, z)
    nums, dens = [], []
    for start in range(0, T, chunk_size):
        stop = min(start + chunk_size, T)
        C = stop - start
        qc, kc, vc = fq[:, :, :, start:stop], fk[:, :, start:stop], vf[:, :, start:stop]
        tri = torch.ones(C, C, dtype=torch.bool, device=q.device).tril()
        a = torch.einsum("bhgik,bhjk->bhgij", qc, kc).masked_fill(~tri, 0.0)  # [B, Hkv, G, C, C]
        nums.append(torch.einsum("bhgij,bhjv->bhgiv", a, vc) + torch.einsum("bhgik,bhkv->bhgiv", qc, S))
        dens.append(a.sum(dim=-1) + torch.einsum("bhgik,bhk->bhgi", qc, z))
        S = S + torch.einsum("bhjk,bhjv->bhkv", kc, vc)
        z = z + kc.sum(dim=2)
    num = torch.cat(nums, dim=3)
    den = torch.cat(dens, dim=3)
    return _finish(num, den, normalize, eps, q.dtype, (B, H, T, V)), (S, z)

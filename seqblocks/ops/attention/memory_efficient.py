"""The ``memory_efficient`` backend: blockwise attention with an online softmax, in PyTorch.

Keys are visited in blocks of ``block_size``; for each query row a running maximum ``m``, a running
normaliser ``l`` and an unnormalised output ``acc`` are rescaled as each block arrives (Milakov &
Gimelshein; Rabe & Staats), so no [Tq, Tk] matrix ever exists: the forward holds O(Tq * block) scores
per head. The backward recomputes each block's scores from the saved log-sum-exp instead of storing
them (the flash-attention recipe), so training memory is O(Tq * block) as well.

Gradients reach q, k and v (through score_mod too, by differentiating the mod per block). Tensors a
score_mod or a float ``attn_mask`` capture are treated as constants here; use ``standard`` or ``flex``
to train such tensors.

Shapes: B batch, H query heads, Hkv key/value heads, G = H / Hkv, Tq queries, Tk keys, K key width,
V value width, C key block.
"""

from __future__ import annotations

import dataclasses

import torch

from seqblocks.ops.attention._common import AttentionArgs, acc_dtype, block_scores, grouped

__all__ = ["attention_memory_efficient"]


def _dropout_keep(shape, p: float, generator: torch.Generator | None, like: torch.Tensor) -> torch.Tensor | None:
    if generator is None:
        return None
    return (torch.rand(shape, generator=generator, device=like.device) >= p).to(like.dtype) / (1.0 - p)


def _generator(seed: int | None, device) -> torch.Generator | None:
    if seed is None:
        return None
    g = torch.Generator(device=device)
    g.manual_seed(seed)
    return g


class _BlockwiseAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, a: AttentionArgs, block_size: int, seed: int | None):
        B, H, Tq, _ = q.shape
        Hkv, Tk, V = k.shape[1], k.shape[2], v.shape[-1]
        G = H // Hkv
        dt = acc_dtype(q)
        qf = grouped(q.to(dt), G)  # [B, Hkv, G, Tq, K]
        m = torch.full((B, H, Tq), float("-inf"), device=q.device, dtype=dt)
        l = torch.zeros(B, H, Tq, device=q.device, dtype=dt)
        acc = torch.zeros(B, H, Tq, V, device=q.device, dtype=dt)
        gen = _generator(seed, q.device)
        for start in range(0, Tk, block_size):
            stop = min(start + block_size, Tk)
            s = block_scores(a, qf, k[:, :, None, start:stop].to(dt), start, stop)  # [B, H, Tq, C]
            m_new = torch.maximum(m, s.amax(dim=-1))
            m_safe = m_new.masked_fill(torch.isinf(m_new), 0.0)
            alpha = torch.exp(m - m_safe)  # rescales what earlier blocks accumulated
            p = torch.exp(s - m_safe[..., None])
            l = l * alpha + p.sum(dim=-1)
            keep = _dropout_keep(p.shape, a.dropout_p, gen, p)
            if keep is not None:
                p = p * keep  # dropout of the normalised probabilities: the normaliser l keeps every term
            pv = torch.matmul(p.view(B, Hkv, G, Tq, stop - start), v[:, :, None, start:stop].to(dt))
            acc = acc * alpha[..., None] + pv.reshape(B, H, Tq, V)
            m = m_new
        empty = l == 0
        out = acc / l.masked_fill(empty, 1.0)[..., None]
        lse = torch.where(empty, float("-inf"), m + torch.log(l.masked_fill(empty, 1.0)))
        ctx.save_for_backward(q, k, v, out, lse)
        # The request without its autograd-tracked tensors: shapes, positions and masks only.
        ctx.a = dataclasses.replace(a, q=q.detach(), k=k.detach(), v=v.detach())
        ctx.block_size, ctx.seed = block_size, seed
        return out.to(q.dtype)

    @staticmethod
    def backward(ctx, dout):
        q, k, v, out, lse = ctx.saved_tensors
        a, block_size = ctx.a, ctx.block_size
        B, H, Tq, K = q.shape
        Hkv, Tk, V = k.shape[1], k.shape[2], v.shape[-1]
        G = H // Hkv
        dt = acc_dtype(q)
        do = dout.to(dt)
        D = (do * out).sum(dim=-1)  # [B, H, Tq]: rowsum(dP * P), by the softmax Jacobian
        lse_safe = lse.masked_fill(torch.isinf(lse), 0.0)
        dq = torch.zeros(B, H, Tq, K, device=q.device, dtype=dt)
        dk = torch.empty(B, Hkv, Tk, K, device=q.device, dtype=dt)
        dv = torch.empty(B, Hkv, Tk, V, device=q.device, dtype=dt)
        do_g = do.view(B, Hkv, G, Tq, V)
        gen = _generator(ctx.seed, q.device)
        for start in range(0, Tk, block_size):
            stop = min(start + block_size, Tk)
            C = stop - start
            with torch.enable_grad():
                qd = q.detach().to(dt).requires_grad_()
                kd = k[:, :, start:stop].detach().to(dt).requires_grad_()
                s = block_scores(a, grouped(qd, G), kd[:, :, None], start, stop)
            p = torch.exp(s.detach() - lse_safe[..., None])  # [B, H, Tq, C]
            keep = _dropout_keep(p.shape, a.dropout_p, gen, p)
            pd = p if keep is None else p * keep
            vb = v[:, :, None, start:stop].to(dt)  # [B, Hkv, 1, C, V]
            dv[:, :, start:stop] = torch.matmul(pd.view(B, Hkv, G, Tq, C).transpose(-1, -2), do_g).sum(dim=2)
            dp = torch.matmul(do_g, vb.transpose(-1, -2)).reshape(B, H, Tq, C)
            if keep is not None:
                dp = dp * keep
            ds = p * (dp - D[..., None])
            gq, gk = torch.autograd.grad(s, (qd, kd), ds, allow_unused=True)
            if gq is not None:
                dq += gq
            dk[:, :, start:stop] = 0.0 if gk is None else gk
        return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype), None, None, None


def attention_memory_efficient(a: AttentionArgs, *, block_size: int = 128,
                               training_dropout: bool = True) -> torch.Tensor:
    """Blockwise softmax attention; out [B, H, Tq, V] in q's dtype, equal to ``attention_standard``.

    Args:
        a (AttentionArgs): the checked request.
        block_size (int): keys per block. Default: 128.
        training_dropout (bool): apply ``a.dropout_p``. Default: True.
    """
    if not isinstance(block_size, int) or block_size <= 0:
        raise ValueError(f"attention: block_size={block_size!r} must be a positive int")
    seed = None
    if a.dropout_p > 0 and training_dropout:
        # One seed per call: the backward regenerates exactly the forward's dropout masks.
        seed = int(torch.randint(0, 2**62, (1,)).item())
    return _BlockwiseAttention.apply(a.q, a.k, a.v, a, block_size, seed)

"""The attention op: every backend against ``standard`` (forward and backward), linear attention's
chunked form against its recurrence, dropout, errors."""

from __future__ import annotations

import pytest
import torch

from seqblocks.layers.attention.score_mods import (
    alibi_score_mod,
    document_mask,
    prefix_lm_mask,
    soft_cap,
)
from seqblocks.layers.position import alibi_slopes
from seqblocks.ops.attention import attention, linear_attention
from seqblocks.testing import assert_close

B, H, T, K = 2, 4, 19, 8

DOC = torch.tensor([[0] * 7 + [1] * 5 + [2] * 7, [0] * 10 + [1] * 9])
VALID = torch.ones(B, T, dtype=torch.bool)
VALID[0, 15:] = False
VALID[1, 11:] = False

CASES = {
    "full": dict(),
    "causal": dict(causal=True),
    "window": dict(window=4),
    "alibi": dict(causal=True, alibi_slopes=alibi_slopes(H)),
    "softcap": dict(causal=True, score_mod=soft_cap(2.0)),
    "document": dict(mask_mod=document_mask(DOC)),
    "prefix_lm": dict(mask_mod=prefix_lm_mask(5)),
    "key_padding": dict(key_valid=VALID),
    "key_padding_causal": dict(key_valid=VALID, causal=True),
    "bool_mask": dict(attn_mask=torch.rand(B, 1, T, T) > 0.3),
    "float_mask": dict(attn_mask=torch.randn(B, H, T, T)),
}
HKV = {"mha": 4, "gqa": 2, "mqa": 1}


def _inputs(dtype, hkv, Tq=T, Tk=T, grad=True):
    q = torch.randn(B, H, Tq, K, dtype=dtype)
    k = torch.randn(B, hkv, Tk, K, dtype=dtype)
    v = torch.randn(B, hkv, Tk, K + 2, dtype=dtype)  # a value width other than the key width
    return [t.requires_grad_(grad) for t in (q, k, v)]


def _cast(kw, dtype):
    return {k: (v.to(dtype) if isinstance(v, torch.Tensor) and v.dtype.is_floating_point else v)
            for k, v in kw.items()}


def _supports(backend, kw):
    return not (backend == "flash" and "score_mod" in kw)


# Every case with grouped heads; plain MHA and MQA on a representative subset.
CASE_HEADS = [(c, "gqa") for c in CASES] + [(c, h) for c in ("causal", "window", "softcap", "key_padding_causal")
                                            for h in ("mha", "mqa")]


@pytest.mark.parametrize(("case", "heads"), CASE_HEADS)
@pytest.mark.parametrize("backend", ["memory_efficient", "flash", "flex"])
def test_backend_matches_standard_fp64(backend, case, heads):
    kw = _cast(CASES[case], torch.float64)
    q, k, v = _inputs(torch.float64, HKV[heads], grad=backend != "flex")
    if not _supports(backend, kw):
        with pytest.raises(ValueError, match="cannot apply a score_mod"):
            attention(q, k, v, backend=backend, **kw)
        return
    ref = attention(q, k, v, backend="standard", **kw)
    if backend == "flex":  # FlexAttention has no CPU backward: forward only here, gradients on the GPU
        with torch.no_grad():
            out = attention(q, k, v, backend="flex", **kw)
        assert_close(out, ref, atol=1e-10, msg=f"{backend} {case} {heads}")
        return
    out = attention(q, k, v, backend=backend, block_size=5, **kw)
    assert_close(out, ref, atol=1e-10, msg=f"{backend} {case} {heads}")
    g = torch.randn_like(ref)
    for a, b, name in zip(torch.autograd.grad(out, (q, k, v), g), torch.autograd.grad(ref, (q, k, v), g), "qkv"):
        assert_close(a, b, atol=1e-9, msg=f"{backend} {case} {heads}: d{name}")


@pytest.mark.parametrize("case", ["causal", "alibi", "softcap", "document"])
@pytest.mark.parametrize("backend", ["memory_efficient", "flash", "flex"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_backend_matches_standard_low_precision(backend, case, dtype):
    kw = _cast(CASES[case], dtype if dtype == torch.float32 else torch.float32)
    q, k, v = _inputs(dtype, 2, grad=False)
    if not _supports(backend, kw):
        with pytest.raises(ValueError, match="cannot apply a score_mod"):
            attention(q, k, v, backend=backend, **kw)
        return
    with torch.no_grad():
        ref = attention(q.double(), k.double(), v.double(), backend="standard", **_cast(kw, torch.float64))
        out = attention(q, k, v, backend=backend, block_size=8, **kw)
    assert out.dtype == dtype
    tol = 2e-5 if dtype == torch.float32 else 2e-2
    assert_close(out, ref, atol=tol, rtol=tol, msg=f"{backend} {case} {dtype}")


@pytest.mark.parametrize("backend", ["standard", "memory_efficient", "flash", "flex"])
def test_cross_lengths_and_positions(backend):
    """Tq != Tk with explicit absolute positions (a continuation): equals the matching rows of the full pass."""
    q, k, v = _inputs(torch.float64, 2, Tq=T, Tk=T, grad=False)
    kw = dict(causal=True, alibi_slopes=alibi_slopes(H).double())
    if backend != "flash":
        kw["score_mod"] = soft_cap(3.0)
    with torch.no_grad():
        full = attention(q, k, v, backend="standard", **kw)
        tail = attention(q[:, :, 12:], k, v, backend=backend, q_positions=torch.arange(12, T), **kw)
        default = attention(q[:, :, 12:], k, v, backend=backend, **kw)  # default: queries are the last Tq
    assert_close(tail, full[:, :, 12:], atol=1e-10)
    assert_close(default, full[:, :, 12:], atol=1e-10)


def test_empty_rows_are_zero():
    q, k, v = _inputs(torch.float64, 4, grad=False)
    valid = torch.zeros(B, T, dtype=torch.bool)
    valid[1] = True
    for backend in ("standard", "memory_efficient", "flash", "flex"):
        out = attention(q, k, v, key_valid=valid, backend=backend)
        assert torch.equal(out[0], torch.zeros_like(out[0])), backend
        assert torch.isfinite(out).all(), backend


def test_mqa_with_one_head_equals_repeated_heads():
    q, k, v = _inputs(torch.float64, 1, grad=False)
    rep = attention(q, k.expand(B, H, T, K), v.expand(B, H, T, K + 2), causal=True, backend="standard")
    for backend in ("standard", "memory_efficient", "flash"):
        assert_close(attention(q, k, v, causal=True, backend=backend), rep, atol=1e-12)


def test_alibi_slopes_equal_alibi_score_mod():
    q, k, v = _inputs(torch.float64, 4, grad=False)
    a = attention(q, k, v, causal=True, alibi_slopes=alibi_slopes(H).double(), backend="standard")
    b = attention(q, k, v, causal=True, score_mod=alibi_score_mod(H), backend="standard")
    assert_close(a, b, atol=1e-6)


@pytest.mark.parametrize("backend", ["standard", "memory_efficient", "flash"])
def test_dropout_only_when_asked(backend):
    q, k, v = _inputs(torch.float32, 2, grad=False)
    base = attention(q, k, v, causal=True, backend=backend)
    a = attention(q, k, v, causal=True, dropout_p=0.5, backend=backend)
    assert not torch.allclose(a, base)
    assert_close(attention(q, k, v, causal=True, dropout_p=0.0, backend=backend), base, atol=1e-6)


def test_memory_efficient_dropout_gradient_uses_forward_mask():
    """Backward regenerates the forward's dropout mask: gradients match an autograd replay of the same mask."""
    q, k, v = _inputs(torch.float64, 2)
    torch.manual_seed(3)
    out = attention(q, k, v, causal=True, dropout_p=0.3, backend="memory_efficient", block_size=T)
    g = torch.randn_like(out)
    dq = torch.autograd.grad(out, q, g)[0]
    # Finite differences of the same seeded call along a random direction.
    d = torch.randn_like(q)
    eps = 1e-6

    def f(qq):
        torch.manual_seed(3)
        return (attention(qq, k, v, causal=True, dropout_p=0.3, backend="memory_efficient", block_size=T) * g).sum()

    with torch.no_grad():
        fd = (f(q + eps * d) - f(q - eps * d)) / (2 * eps)
    assert_close((dq * d).sum(), fd, atol=1e-5)


def test_memory_efficient_block_size_invariant():
    q, k, v = _inputs(torch.float64, 2, grad=False)
    outs = [attention(q, k, v, causal=True, backend="memory_efficient", block_size=bs) for bs in (1, 3, 7, 64)]
    for o in outs[1:]:
        assert_close(o, outs[0], atol=1e-12)


def test_errors():
    q, k, v = _inputs(torch.float32, 2, grad=False)
    with pytest.raises(ValueError, match="score_mod"):
        attention(q, k, v, score_mod=soft_cap(1.0), backend="flash")
    with pytest.raises(ValueError, match="dropout"):
        attention(q, k, v, dropout_p=0.1, backend="flex")
    with pytest.raises(ValueError, match="no backward on CPU"):
        attention(q.requires_grad_(), k, v, backend="flex")
    q = q.detach()
    with pytest.raises(ValueError, match="unknown attention backend"):
        attention(q, k, v, backend="pallas")
    with pytest.raises(ValueError, match="multiple"):
        attention(q, k[:, :1].expand(B, 3, T, K), v[:, :1].expand(B, 3, T, K + 2))
    with pytest.raises(ValueError, match="key_valid"):
        attention(q, k, v, key_valid=torch.ones(B, T + 1, dtype=torch.bool))
    with pytest.raises(TypeError, match="dtypes differ"):
        attention(q, k.double(), v)


@pytest.mark.parametrize("hkv", [4, 2])
@pytest.mark.parametrize("feature", ["elu", "relu"])
def test_linear_chunked_equals_recurrent(hkv, feature):
    q, k, v = _inputs(torch.float64, hkv)
    valid = VALID
    ref, (S, z) = linear_attention(q, k, v, feature=feature, key_valid=valid, backend="reference")
    g = torch.randn_like(ref)
    gref = torch.autograd.grad((ref * g).sum() + S.sum() + z.sum(), (q, k, v))
    for chunk in (1, 4, 7, 64):
        out, (S2, z2) = linear_attention(q, k, v, feature=feature, chunk_size=chunk, key_valid=valid)
        assert_close(out, ref, atol=1e-10, msg=f"chunk {chunk}")
        assert_close(S2, S, atol=1e-10)
        assert_close(z2, z, atol=1e-10)
        gout = torch.autograd.grad((out * g).sum() + S2.sum() + z2.sum(), (q, k, v))
        for a, b in zip(gout, gref):
            assert_close(a, b, atol=1e-9)


def test_linear_state_continuation_and_noncausal():
    q, k, v = _inputs(torch.float64, 2, grad=False)
    full, state = linear_attention(q, k, v, chunk_size=4)
    a, s1 = linear_attention(q[:, :, :9], k[:, :, :9], v[:, :, :9], chunk_size=4)
    b, s2 = linear_attention(q[:, :, 9:], k[:, :, 9:], v[:, :, 9:], chunk_size=3, initial_state=s1)
    assert_close(torch.cat((a, b), dim=2), full, atol=1e-12)
    assert_close(s2[0], state[0], atol=1e-12)
    nc, _ = linear_attention(q, k, v, causal=False)
    ncr, _ = linear_attention(q, k, v, causal=False, backend="reference")
    assert_close(nc, ncr, atol=1e-12)
    assert_close(nc[:, :, -1], full[:, :, -1], atol=1e-12)  # the last query sees every key either way


def test_auto_rule():
    from seqblocks.ops.attention import resolve_attention_backend

    cuda, cpu = torch.device("cuda"), torch.device("cpu")
    assert resolve_attention_backend("auto", device=cuda, score_mod=False, dropout=False) == "flash"
    assert resolve_attention_backend("auto", device=cuda, score_mod=False, dropout=False, sparse_mask=True) == "flex"
    assert resolve_attention_backend("auto", device=cuda, score_mod=False, dropout=False, sparse_mask=True,
                                     num_queries=1) == "flash"  # a decode step: dense mask, graph-capturable
    assert resolve_attention_backend("auto", device=cuda, score_mod=True, dropout=False, num_queries=1) == "flex"
    assert resolve_attention_backend("auto", device=cuda, score_mod=True, dropout=False) == "flex"
    assert resolve_attention_backend("auto", device=cuda, score_mod=True, dropout=True) == "memory_efficient"
    assert resolve_attention_backend("auto", device=cuda, score_mod=False, dropout=True, sparse_mask=True) == "flash"
    assert resolve_attention_backend("auto", device=cpu, score_mod=True, dropout=False) == "standard"
    assert resolve_attention_backend("auto", device=cpu, score_mod=False, dropout=False, sparse_mask=True) == "flash"
    assert resolve_attention_backend("memory_efficient", device=cpu, score_mod=True, dropout=True) == "memory_efficient"
    # auto computes what standard computes
    q, k, v = _inputs(torch.float64, 2, grad=False)
    for kw in (dict(causal=True), dict(score_mod=soft_cap(2.0)), dict(window=3)):
        assert_close(attention(q, k, v, **kw), attention(q, k, v, backend="standard", **kw), atol=1e-12)

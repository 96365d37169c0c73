"""Score and mask mods: each equals its explicit mask / bias, composition order, absolute positions."""

from __future__ import annotations

import pytest
import torch

from seqblocks.layers.attention.score_mods import (
    additive_bias,
    alibi_score_mod,
    and_masks,
    causal_mask,
    compose,
    document_mask,
    mod_kind,
    or_masks,
    prefix_lm_mask,
    sliding_window_mask,
    soft_cap,
)
from seqblocks.layers.position import alibi_slopes
from seqblocks.ops.attention import attention
from seqblocks.testing import assert_close

B, H, T, K = 2, 4, 11, 8
Q = torch.arange(T)[:, None]
KV = torch.arange(T)[None, :]
DOC = torch.tensor([[0, 0, 0, 1, 1, 1, 1, 2, 2, 2, 2], [0, 0, 0, 0, 0, 0, 1, 1, 1, 1, 1]])


def _qkv():
    return [torch.randn(B, n, T, K, dtype=torch.float64) for n in (H, H, H)]


MASKS = {
    "causal": (causal_mask, (Q >= KV)[None, None]),
    "window": (sliding_window_mask(3), ((Q - KV >= 0) & (Q - KV < 3))[None, None]),
    "prefix": (prefix_lm_mask(4), ((KV < 4) | (Q >= KV))[None, None]),
    "prefix_per_row": (prefix_lm_mask(torch.tensor([2, 6])),
                       ((KV[None] < torch.tensor([2, 6])[:, None, None]) | (Q >= KV)[None])[:, None]),
    "document": (document_mask(DOC), ((DOC[:, :, None] == DOC[:, None, :]) & (Q >= KV)[None])[:, None]),
    "document_bidir": (document_mask(DOC, causal=False), (DOC[:, :, None] == DOC[:, None, :])[:, None]),
}


@pytest.mark.parametrize("name", list(MASKS))
@pytest.mark.parametrize("backend", ["standard", "flash", "flex"])
def test_mask_mod_equals_explicit_mask(name, backend):
    mod, explicit = MASKS[name]
    q, k, v = _qkv()
    ref = attention(q, k, v, attn_mask=explicit, backend="standard")
    assert_close(attention(q, k, v, mask_mod=mod, backend=backend), ref, atol=1e-12)


def test_score_mods_equal_explicit_bias():
    q, k, v = _qkv()
    slopes = alibi_slopes(H).double()
    alibi = -slopes[:, None, None] * (Q - KV).abs()[None].double()
    explicit = attention(q, k, v, attn_mask=alibi[None].expand(B, H, T, T), backend="standard")
    for backend in ("standard", "flex", "memory_efficient"):
        assert_close(attention(q, k, v, score_mod=alibi_score_mod(slopes), backend=backend), explicit, atol=1e-12)
    bias = torch.randn(H, T, T, dtype=torch.float64)
    assert_close(attention(q, k, v, score_mod=additive_bias(bias), backend="standard"),
                 attention(q, k, v, attn_mask=bias[None], backend="standard"), atol=1e-12)
    s = torch.randn(3, 5, dtype=torch.float64) * 10
    assert_close(soft_cap(2.0)(s, 0, 0, 0, 0), 2.0 * torch.tanh(s / 2.0), atol=1e-15)


def test_compose_order_and_mask_algebra():
    add1 = lambda s, b, h, q, kv: s + 1.0
    dbl = lambda s, b, h, q, kv: s * 2.0
    s = torch.tensor([1.0, 3.0])
    assert torch.equal(compose(add1, dbl)(s, 0, 0, 0, 0), torch.tensor([4.0, 8.0]))
    assert torch.equal(compose(dbl, add1)(s, 0, 0, 0, 0), torch.tensor([3.0, 7.0]))
    m = compose(causal_mask, sliding_window_mask(2))
    assert mod_kind(m) == "mask"
    assert torch.equal(m(0, 0, Q, KV), and_masks(causal_mask, sliding_window_mask(2))(0, 0, Q, KV))
    assert torch.equal(or_masks(prefix_lm_mask(3), causal_mask)(0, 0, Q, KV), prefix_lm_mask(3)(0, 0, Q, KV))
    with pytest.raises(TypeError, match="mix"):
        compose(causal_mask, soft_cap(1.0))
    with pytest.raises(ValueError):
        compose()


@pytest.mark.parametrize("mod", ["alibi", "document", "window"])
@pytest.mark.parametrize("backend", ["standard", "flex"])
def test_mods_see_absolute_positions(mod, backend):
    """Attending the last queries with explicit offsets equals the same rows of the full pass."""
    q, k, v = _qkv()
    kw = {"alibi": dict(score_mod=alibi_score_mod(H), causal=True),
          "document": dict(mask_mod=document_mask(DOC)),
          "window": dict(mask_mod=sliding_window_mask(3))}[mod]
    full = attention(q, k, v, backend="standard", **kw)
    part = attention(q[:, :, 7:], k, v, q_positions=torch.arange(7, T), backend=backend, **kw)
    assert_close(part, full[:, :, 7:], atol=1e-12)


def test_mod_errors():
    with pytest.raises(ValueError):
        sliding_window_mask(0)
    with pytest.raises(ValueError):
        soft_cap(-1.0)
    with pytest.raises(ValueError):
        document_mask(torch.zeros(2, 3, 4, dtype=torch.long))
    with pytest.raises(TypeError):
        mod_kind(lambda a, b: a)

"""GPU checks of the attention backends at real shapes (``pytest -m gpu``): flash and flex against the
standard reference in bf16, memory-efficient and GQA, gradients, and cached decoding on CUDA."""

from __future__ import annotations

import pytest
import torch

from seqblocks import MHA, MLA, SlidingWindowAttention, soft_cap
from seqblocks.layers.position import ALiBi
from seqblocks.ops.attention import attention
from seqblocks.testing import assert_close, check_lengths, check_prefill_then_steps

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]


def _qkv(B, H, Hkv, T, K, requires_grad=False):
    g = torch.Generator(device="cuda").manual_seed(0)
    def mk(h):
        x = torch.randn(B, h, T, K, device="cuda", dtype=torch.bfloat16, generator=g)
        return x.requires_grad_(requires_grad)

    return mk(H), mk(Hkv), mk(Hkv)


@pytest.mark.parametrize("backend", ["flash", "flex"])
@pytest.mark.parametrize("hkv", [32, 8])
def test_real_shape_vs_standard(backend, hkv):
    q, k, v = _qkv(4, 32, hkv, 4096, 128)
    with torch.no_grad():
        ref = attention(q, k, v, causal=True, backend="standard")
        out = attention(q, k, v, causal=True, backend=backend)
    assert_close(out, ref, atol=2e-2, rtol=2e-2, msg=f"{backend} vs standard, Hkv={hkv}")


@pytest.mark.parametrize("kw", [dict(score_mod=soft_cap(20.0)), dict(window=256), dict(alibi=True)])
def test_flex_mods_vs_standard(kw):
    q, k, v = _qkv(2, 16, 4, 2048, 128)
    kw = dict(kw)
    if kw.pop("alibi", False):
        from seqblocks.layers.position import alibi_slopes
        kw["alibi_slopes"] = alibi_slopes(16).cuda()
    with torch.no_grad():
        ref = attention(q, k, v, causal=True, backend="standard", **kw)
        out = attention(q, k, v, causal=True, backend="flex", **kw)
        if "score_mod" not in kw:
            assert_close(attention(q, k, v, causal=True, backend="flash", **kw), ref, atol=2e-2, rtol=2e-2)
        assert_close(attention(q, k, v, causal=True, backend="memory_efficient", block_size=256, **kw), ref,
                     atol=2e-2, rtol=2e-2)
    assert_close(out, ref, atol=2e-2, rtol=2e-2)


@pytest.mark.parametrize("backend", ["flash", "flex", "memory_efficient"])
def test_gradients_vs_standard(backend):
    q, k, v = _qkv(2, 8, 2, 1024, 128, requires_grad=True)
    kw = dict(score_mod=soft_cap(20.0)) if backend != "flash" else {}
    ref = attention(q, k, v, causal=True, backend="standard", **kw)
    g = torch.randn_like(ref)
    gr = torch.autograd.grad(ref, (q, k, v), g)
    out = attention(q, k, v, causal=True, backend=backend, **kw)
    go = torch.autograd.grad(out, (q, k, v), g)
    for a, b in zip(go, gr):
        assert_close(a, b, atol=5e-2, rtol=5e-2, msg=f"{backend} gradient")


LAYERS = {
    "gqa_rope": lambda t: MHA(256, 8, 2, rotary_emb_dim=32, attention_type=t, device="cuda"),
    "alibi": lambda t: MHA(256, 8, position=ALiBi(8, device="cuda"), attention_type=t, device="cuda"),
    "window": lambda t: SlidingWindowAttention(256, 8, 2, window_size=16, attention_type=t, device="cuda"),
    "softcap": lambda t: MHA(256, 8, 2, score_mod=soft_cap(5.0), attention_type=t, device="cuda"),
    "mla": lambda t: MLA(256, 8, q_lora_rank=64, attention_type=t, device="cuda"),
}


@pytest.mark.parametrize("name", list(LAYERS))
@pytest.mark.parametrize("attention_type", ["flash", "flex"])
def test_cached_decoding_on_cuda(name, attention_type):
    if attention_type == "flash" and name == "softcap":
        pytest.skip("flash has no score_mod")
    torch.manual_seed(0)
    m = LAYERS[name](attention_type).eval()
    ref = LAYERS[name]("standard").eval()
    ref.load_state_dict(m.state_dict())
    x = torch.randn(2, 40, 256, device="cuda")
    with torch.no_grad():
        assert_close(m(x), ref(x), atol=2e-3)
        check_prefill_then_steps(m, x, prefill=17, atol=2e-3)
        check_lengths(m, x[:, :24], torch.tensor([24, 9], device="cuda"), atol=2e-3)

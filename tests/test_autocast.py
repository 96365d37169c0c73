"""bf16 autocast: the recurrent ops ignore it, every mixer trains and decodes under it.

Training on a GPU runs the model inside ``torch.autocast(dtype=bfloat16)``. Autocast sends matrix
products, convolutions and einsums to bf16 but leaves elementwise ops alone, so an op that builds its
state with a product (LTI systems' input maps, S4's chunked recurrence, the convolutions) would round
that state to bf16, and ``torch.complex`` of two autocast outputs fails outright. CPU autocast has the
same rules, so these tests run here.
"""

from __future__ import annotations

import pytest
import torch

from seqblocks.layers.build import build_mixer, mixer_config
from seqblocks.layers.mixers._lti import LTIMixer, SSMCache
from seqblocks.models import LRNNLMHeadModel
from seqblocks.ops.attention import linear_attention
from seqblocks.ops.causal_conv1d import causal_conv1d, causal_conv1d_update
from seqblocks.ops.discretize import discretize
from seqblocks.ops.fftconv import fftconv
from seqblocks.ops.scan import linear_scan
from seqblocks.ops.selective_scan import selective_scan, selective_state_update
from seqblocks.ops.ssm_conv_kernels import vandermonde_kernel
from seqblocks.registry import MIXERS


def bf16_autocast(device: str = "cpu"):
    return torch.autocast(device, dtype=torch.bfloat16)


# The mixer tests also run on CUDA (``-m gpu``), where the scans go through the Triton kernels.
DEVICES = ["cpu", pytest.param("cuda", marks=[pytest.mark.gpu, pytest.mark.skipif(
    not torch.cuda.is_available(), reason="needs CUDA")])]


def gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _op_cases():
    g = gen()
    B, T, D, N = 2, 12, 6, 4
    x = torch.randn(B, T, D, generator=g)
    cx = torch.complex(torch.randn(B, T, D, generator=g), torch.randn(B, T, D, generator=g))
    decay = torch.rand(B, T, D, generator=g) * 0.9
    A = -torch.rand(D, N, generator=g) - 0.5
    Bm, Cm = torch.randn(B, T, N, generator=g), torch.randn(B, T, N, generator=g)
    w = torch.randn(D, 4, generator=g)
    q, k, v = (torch.randn(B, 2, T, 8, generator=g) for _ in range(3))
    log_lam = torch.complex(-torch.rand(D, generator=g), torch.rand(D, generator=g))
    return {
        "linear_scan": lambda: linear_scan(decay, x),
        "linear_scan_complex": lambda: linear_scan(torch.exp(log_lam).expand(B, T, D), cx),
        "selective_scan": lambda: selective_scan(x, x.abs(), A, Bm, Cm, torch.ones(D), x, delta_softplus=True),
        "selective_state_update": lambda: selective_state_update(
            torch.zeros(B, D, N), x[:, 0], x[:, 0].abs(), A, Bm[:, 0], Cm[:, 0], torch.ones(D)),
        "fftconv": lambda: fftconv(x, torch.randn(D, T, generator=gen(1)), torch.ones(D)),
        "causal_conv1d": lambda: causal_conv1d(x, w, torch.zeros(D), activation="silu"),
        "causal_conv1d_update": lambda: causal_conv1d_update(x[:, 0], torch.randn(B, 3, D, generator=gen(2)), w),
        "linear_attention": lambda: linear_attention(q, k, v),
        "vandermonde_kernel": lambda: vandermonde_kernel(torch.complex(x[0, :1, :], x[1, :1, :]).T.squeeze(-1),
                                                         log_lam, T),
        "discretize": lambda: discretize(torch.complex(A[:, 0], A[:, 1]), torch.rand(D, generator=gen(3)), "bilinear"),
    }


def _flatten(out):
    if isinstance(out, torch.Tensor):
        return [out]
    return [t for o in out for t in _flatten(o)]


@pytest.mark.parametrize("op", list(_op_cases()))
def test_op_result_is_bit_identical_under_autocast(op):
    plain = _flatten(_op_cases()[op]())
    with bf16_autocast():
        auto = _flatten(_op_cases()[op]())
    assert len(plain) == len(auto)
    for p, a in zip(plain, auto):
        assert a.dtype == p.dtype, f"{op}: autocast changed the output dtype {p.dtype} -> {a.dtype}"
        assert torch.equal(a, p), f"{op}: autocast changed the result (max diff {(a - p).abs().max():.3g})"


def distinct_mixers() -> list[str]:
    return [n for n in MIXERS.primary_names() if not getattr(MIXERS.get(n), "is_identity", False)]


MIXER_KWARGS = {"sliding_window": {"window_size": 4}, "mamba2": {"headdim": 8}, "mamba3": {"headdim": 8},
                "chunked_gqa": {"attention_chunk_size": 4}, "sparse_gqa": {"sparse_select_k": 2}}


def tiny_lm(name: str, device: str = "cpu") -> LRNNLMHeadModel:
    torch.manual_seed(0)
    return LRNNLMHeadModel(d_model=32, d_state=8, n_layer=2, vocab_size=41, mixer_types=[name, name],
                           d_intermediate=64, mixer_kwargs={name: MIXER_KWARGS[name]} if name in MIXER_KWARGS
                           else None, device=device).eval()


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("name", distinct_mixers())
def test_every_mixer_trains_under_autocast(name, device):
    model = tiny_lm(name, device)
    ids = torch.randint(0, 41, (2, 16), generator=gen()).to(device)
    ref = model(ids).logits
    ref.float().logsumexp(-1).sum().backward()
    ref_grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    with bf16_autocast(device):
        out = model(ids).logits
    assert torch.isfinite(out).all()
    scale = ref.abs().max().item()
    err = (out.float() - ref).abs().max().item()
    assert err <= 0.05 * scale + 0.05, f"{name}: bf16 autocast logits differ by {err:.3g} (scale {scale:.3g})"
    out.float().logsumexp(-1).sum().backward()
    grads = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
    assert grads.keys() == ref_grads.keys(), f"{name}: autocast changed which parameters get gradients"
    for n, grad in grads.items():
        assert torch.isfinite(grad).all(), f"{name}: non-finite gradient of {n} under autocast"
        assert grad.dtype == ref_grads[n].dtype


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("name", distinct_mixers())
def test_every_mixer_decodes_under_autocast(name, device):
    model = tiny_lm(name, device)
    ids = torch.randint(0, 41, (2, 10), generator=gen(1)).to(device)
    with torch.no_grad(), bf16_autocast(device):
        full = model(ids).logits.float()
        caches = model.allocate_inference_cache(2, 10)
        outs = [model(ids[:, :4], inference_params=caches).logits]
        outs += [model.step(ids[:, t : t + 1], caches).logits for t in range(4, 10)]
    stepped = torch.cat(outs, 1).float()
    assert torch.isfinite(stepped).all()
    # bf16 products round differently between a whole sequence and single steps: compare loosely.
    err = (stepped - full).abs().max().item()
    assert err <= 0.05 * full.abs().max().item() + 0.05, f"{name}: autocast decode differs from forward by {err:.3g}"


@pytest.mark.parametrize("name", [n for n in distinct_mixers() if issubclass(MIXERS.get(n), LTIMixer)])
def test_lti_state_ignores_autocast(name):
    """The LTI system (input map, recurrence or convolution) runs in fp32 inside autocast: the state after
    a prefill is bit-identical; only the output layers follow autocast."""
    torch.manual_seed(0)
    mixer = build_mixer(name, mixer_config(name, 16, d_state=8), layer_idx=0)
    x = torch.randn(2, 9, 16, generator=gen(4))
    states = []
    for ctx in (torch.autocast("cpu", enabled=False), bf16_autocast()):
        cache = mixer.allocate_inference_cache(2, 9)
        assert isinstance(cache, SSMCache)
        with torch.no_grad(), ctx:
            mixer(x, cache=cache)
        states.append(cache.state)
    assert torch.equal(states[0], states[1])

"""The Mamba2 mixer beyond the contract tests: mamba_ssm's parameter names and defaults, options
(d_ssm MLP branch, D per channel, no rmsnorm, dt_limit), presets, and logit parity with a randomly
initialised transformers ``Mamba2ForCausalLM`` (its pure-PyTorch path, on CPU)."""

from __future__ import annotations

import json

import pytest
import torch

from seqblocks.layers.mixers import Mamba2
from seqblocks.layers.mixers.mamba2 import RMSNormGated
from seqblocks.models import LRNNLMHeadModel
from seqblocks.presets import build_model, load_config
from seqblocks.registry import MIXERS
from seqblocks.testing import check_prefill_then_steps


def test_registered_under_both_spellings_with_mamba_ssm_defaults():
    assert MIXERS.get("mamba2") is Mamba2 and MIXERS.get("Mamba2") is Mamba2
    config = Mamba2.config_class()(d_model=64)
    assert (config.d_state, config.d_conv, config.expand, config.headdim, config.ngroups) == (128, 4, 2, 64, 1)
    assert config.A_init_range == (1, 16) and config.dt_limit == (0.0, None) and config.chunk_size == 256
    assert type(config).from_json(config.to_json()) == config
    m = Mamba2(64)
    names = {k for k, _ in m.named_parameters()}
    assert names == {"in_proj.weight", "conv1d.weight", "conv1d.bias", "dt_bias", "A_log", "D", "norm.weight",
                     "out_proj.weight"}
    assert m.in_proj.out_features == 2 * 128 + 2 * 128 + 2 and m.conv1d.weight.shape == (128 + 256, 1, 4)
    A = torch.exp(m.A_log)
    assert ((A >= 1) & (A <= 16)).all()
    dt = torch.nn.functional.softplus(m.dt_bias)
    assert ((dt >= 1e-4 * 0.999) & (dt <= 0.1 * 1.001)).all()
    assert m.to(torch.bfloat16).A_log.dtype == torch.float32


@pytest.mark.parametrize("kwargs", [
    {"d_ssm": 16, "D_has_hdim": True},
    {"rmsnorm": False, "dt_limit": (0.01, 0.2)},
    {"ngroups": 2, "norm_before_gate": True, "bias": True, "conv_init": 0.5},
])
def test_options_keep_prefill_plus_steps_equal_full(kwargs):
    torch.manual_seed(0)
    m = Mamba2(16, d_state=4, headdim=8, chunk_size=4, dtype=torch.float64, **kwargs).eval()
    x = torch.randn(2, 9, 16, dtype=torch.float64)
    check_prefill_then_steps(m, x, prefill=5, atol=1e-8, rtol=1e-6)


def test_chunk_size_does_not_change_outputs():
    torch.manual_seed(0)
    m = Mamba2(16, d_state=4, headdim=8, ngroups=2, chunk_size=256, dtype=torch.float64)
    x = torch.randn(2, 21, 16, dtype=torch.float64)
    y = m(x)
    m.chunk_size = 4
    torch.testing.assert_close(m(x), y)


def test_gated_norm_groups():
    norm = RMSNormGated(8, eps=0.0, group_size=4)
    x = torch.randn(3, 8)
    y = norm(x)
    torch.testing.assert_close(y[:, :4].square().mean(-1), torch.ones(3))
    torch.testing.assert_close(y[:, 4:].square().mean(-1), torch.ones(3))


def test_bad_arguments_name_the_value():
    with pytest.raises(ValueError, match="headdim=64"):
        Mamba2(16)
    with pytest.raises(ValueError, match="ngroups=3"):
        Mamba2(16, headdim=8, ngroups=3)
    with pytest.raises(ValueError, match="dt_limit"):
        Mamba2(16, headdim=8, dt_limit=(0.5, 0.1))
    with pytest.raises(ValueError, match="A_init_range"):
        Mamba2(16, headdim=8, A_init_range=(0, 4))


@pytest.mark.parametrize("name", ["tiny-mamba2", "mamba2-130m", "hybrid-mamba2-130m"])
def test_presets_build(name):
    config = load_config(name)
    assert "mamba2" in config["model"]["mixer_types"]
    json.dumps(config)
    if name == "tiny-mamba2":
        model = build_model(config["model"])
        assert model(torch.randint(0, 98, (1, 5))).logits.shape[:2] == (1, 5)


@pytest.mark.parametrize("ngroups", [1, 2])
def test_logits_match_transformers_mamba2(ngroups):
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    V, D, N, L, P = 64, 32, 8, 2, 8
    hf_config = transformers.Mamba2Config(vocab_size=V, hidden_size=D, state_size=N, num_hidden_layers=L, head_dim=P,
                                          num_heads=2 * D // P, n_groups=ngroups, expand=2, conv_kernel=4,
                                          chunk_size=16, use_conv_bias=True, use_bias=False,
                                          tie_word_embeddings=False, residual_in_fp32=True)
    hf = transformers.Mamba2ForCausalLM(hf_config).eval()
    with torch.no_grad():  # move the parameters off their init values so that every one matters
        for name, p in hf.named_parameters():
            if "norm" in name or name.endswith(("dt_bias", "D", "conv1d.bias")):
                p.add_(0.3 * torch.randn_like(p))
    kwargs = {"headdim": P, "ngroups": ngroups, "chunk_size": 16}
    ours = LRNNLMHeadModel(D, N, L, V, ["mamba2"] * L, mixer_kwargs=kwargs,
                           residual_in_fp32=True, tie_embeddings=False, pad_vocab_size_multiple=1).eval()
    # The only renames: transformers' "backbone." prefix and its "embeddings" (ours: "embedding").
    state = {k.removeprefix("backbone.").replace("embeddings.", "embedding."): v for k, v in hf.state_dict().items()}
    ours.load_state_dict(state, strict=True)
    ids = torch.randint(0, V, (2, 37))  # not a multiple of the chunk
    with torch.no_grad():
        want = hf(ids).logits
        got = ours(ids).logits
    rel = ((got - want).abs().max() / want.abs().max()).item()
    assert rel < 1e-4, rel
    print(f"ngroups={ngroups}: max relative logit difference {rel:.2e}")


def _packed_case(seed=0, **kwargs):
    torch.manual_seed(seed)
    m = Mamba2(16, d_state=4, headdim=8, ngroups=2, chunk_size=4, dtype=torch.float64, **kwargs)
    lens = [5, 1, 0, 9]
    docs = [torch.randn(1, n, 16, dtype=torch.float64) for n in lens]
    cu = torch.tensor([0, *torch.tensor(lens).cumsum(0).tolist()])
    return m, docs, cu


@pytest.mark.parametrize("kwargs", [{}, {"rmsnorm": False, "D_has_hdim": True}])
def test_packed_documents_equal_separate_runs_forward_and_grads(kwargs):
    m, docs, cu = _packed_case(**kwargs)
    packed = torch.cat(docs, 1).requires_grad_(True)
    y = m(packed, cu_seqlens=cu)
    alone = torch.cat([m(d) if d.shape[1] else d.new_zeros(d.shape) for d in docs], 1)
    torch.testing.assert_close(y, alone, atol=1e-10, rtol=1e-8)
    gy = torch.randn_like(y)
    got = torch.autograd.grad(y, [packed, *m.parameters()], gy)
    docs_leaf = torch.cat(docs, 1).requires_grad_(True)
    pieces = docs_leaf.split([int(n) for n in cu.diff()], 1)
    alone = torch.cat([m(d) if d.shape[1] else d * 0 for d in pieces], 1)
    want = torch.autograd.grad(alone, [docs_leaf, *m.parameters()], gy)
    for a, b in zip(got, want):  # A_log, D, dt_bias stay fp32 (keep_in_fp32): their sums round there
        tol = 1e-9 if a.dtype == torch.float64 else 1e-6
        torch.testing.assert_close(a, b, atol=tol, rtol=tol * 100)


def test_packed_prefill_fills_one_cache_row_per_document():
    m, docs, cu = _packed_case(seed=1)
    cache = m.allocate_inference_cache(len(docs), 32, dtype=torch.float64)
    m(torch.cat(docs, 1), cache, cu_seqlens=cu)
    assert cache.seqlen_offset.tolist() == cu.diff().tolist()
    step = torch.randn(len(docs), 1, 16, dtype=torch.float64)
    y_step = m(step, cache)
    for i, d in enumerate(docs):
        own = m.allocate_inference_cache(1, 32, dtype=torch.float64)
        if d.shape[1]:
            m(d, own)
        torch.testing.assert_close(y_step[i:i + 1], m(step[i:i + 1], own), atol=1e-10, rtol=1e-8)


def test_packed_refuses_lengths_and_batches():
    m, docs, cu = _packed_case()
    x = torch.cat(docs, 1)
    with pytest.raises(ValueError, match="either lengths or cu_seqlens"):
        m(x, cu_seqlens=cu, lengths=torch.tensor([x.shape[1]]))
    with pytest.raises(ValueError, match=r"\[1, total, D\]"):
        m(x.expand(2, -1, -1), cu_seqlens=cu)


def test_lm_save_load_round_trip(tmp_path):
    torch.manual_seed(0)
    model = LRNNLMHeadModel(d_model=32, d_state=8, n_layer=2, vocab_size=40, mixer_types=["mamba2", "mamba2"],
                            d_intermediate=0)
    ids = torch.randint(0, 40, (2, 9))
    model.save_pretrained(tmp_path / "m")
    loaded = LRNNLMHeadModel.from_pretrained(tmp_path / "m")
    torch.testing.assert_close(loaded(ids).logits, model(ids).logits)


def test_bidirectional_sees_both_ways_per_row_and_per_packed_sequence():
    """``bidirectional=True`` (a seqblocks extra): later tokens move earlier outputs; padding and packing
    still give each sequence its own outputs; no cache."""

    torch.manual_seed(0)
    m = Mamba2(16, d_state=8, headdim=8, chunk_size=4, bidirectional=True, dtype=torch.float64).eval()
    assert m.causal is False and Mamba2.config_class()(d_model=16).bidirectional is False
    x = torch.randn(3, 9, 16, dtype=torch.float64)
    y = m(x)
    x2 = x.clone()
    x2[:, 7] += 1.0
    assert not torch.allclose(m(x2)[:, :7], y[:, :7])
    lengths = torch.tensor([9, 4, 6])
    padded = m(x, lengths=lengths)
    for b, n in enumerate(lengths.tolist()):
        torch.testing.assert_close(padded[b, :n], m(x[b: b + 1, :n])[0], atol=1e-10, rtol=0)
    packed = m(torch.cat([x[0, :4], x[1, :5]]).unsqueeze(0), cu_seqlens=torch.tensor([0, 4, 9]))
    torch.testing.assert_close(packed[0, :4], m(x[:1, :4])[0], atol=1e-10, rtol=0)
    torch.testing.assert_close(packed[0, 4:], m(x[1:2, :5])[0], atol=1e-10, rtol=0)
    with pytest.raises(ValueError, match="not causal"):
        m.allocate_inference_cache(1, 8)
    causal = Mamba2(16, d_state=8, headdim=8, chunk_size=4, dtype=torch.float64)
    with pytest.raises(ValueError, match="not causal"):
        m(x[:1], causal.allocate_inference_cache(1, 8))

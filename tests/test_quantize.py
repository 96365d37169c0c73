"""Weight-only int8 / int4 quantisation (torchao): each weight within half a quantisation step of
the original (the reference's rounding), logits within the stated error of the full model, decoding
and bf16, and `seqblocks quantize` end to end."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
from post_fixtures import one_thread, tiny_checkpoint, tiny_model  # noqa: F401

from seqblocks.generation import generate
from seqblocks.post.quantize import quantize, quantize_reference

MIXED = {"d_model": 64, "mixer_types": ["gated_deltanet", "mamba2"],
         "mixer_kwargs": {"gated_deltanet": {"num_heads": 2, "head_dim": 16},
                          "mamba2": {"headdim": 16, "chunk_size": 8}}}
# Relative error ||logits_q - logits|| / ||logits|| of random tiny models (measured: int8 0.9-2.1 %,
# int4 with groups of 32: 13-28 %); the bounds leave room over those.
LOGIT_ERROR = {"int8": 0.04, "int4": 0.40}

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.mark.parametrize("mode", ["int8", "int4"])
@pytest.mark.parametrize("overrides", [{}, MIXED], ids=["attention", "gdn-mamba2"])
def test_quantised_logits_within_the_stated_error(mode, overrides):
    model = tiny_model(**overrides)
    ids = torch.randint(0, 16, (2, 12))
    ref = model(ids).logits
    quantized, report = quantize(model, mode)
    out = quantized(ids).logits
    assert ((out - ref).norm() / ref.norm()).item() < LOGIT_ERROR[mode]
    assert report.quantized and not report.skipped
    assert torch.equal(model(ids).logits, ref)  # the original is untouched (a copy was quantised)


@pytest.mark.parametrize("mode,bits,group", [("int8", 8, None), ("int4", 4, 32)])
def test_each_weight_is_within_half_a_step(mode, bits, group):
    model = tiny_model()
    quantized, report = quantize(model, mode, group_size=32)
    originals = dict(model.named_modules())
    x = torch.randn(3, 32)
    for name in report.quantized:
        layer, weight = quantized.get_submodule(name), originals[name].weight.detach()
        deq = layer.weight.dequantize().float()
        ref, scale = quantize_reference(weight, bits, group)
        step = scale.repeat_interleave(weight.shape[1] // scale.shape[1], dim=1)
        assert ((deq - weight).abs() <= 0.5 * step * 1.01 + 1e-7).all(), name
        assert ((deq - ref).abs() <= step * 1.01 + 1e-7).all(), name  # at most one rounding apart
        if layer.in_features == 32:
            torch.testing.assert_close(layer(x), F.linear(x, deq, layer.bias), atol=1e-5, rtol=1e-5)


def test_int4_keeps_layers_the_group_does_not_divide():
    model = tiny_model(d_model=48, mixer_kwargs={"attn": {"num_heads": 2}})
    _, report = quantize(model, "int4", group_size=32)
    assert report.skipped and all("group_size=32" in why for why in report.skipped.values())
    assert report.config in ("IntxWeightOnlyConfig", "Int4WeightOnlyConfig")


def test_quantised_model_decodes_and_runs_in_bf16():
    model = tiny_model().to(torch.bfloat16)
    quantized, _ = quantize(model, "int4")
    prompt = torch.tensor([[2, 3, 4]])
    out = generate(quantized, prompt, max_new_tokens=5, temperature=0)
    assert out.tokens.shape == (1, 5)
    assert quantized(prompt).logits.dtype == torch.bfloat16


def test_tied_embedding_stays_full_precision():
    model = tiny_model()
    assert model.lm_head.weight is model.embedding.weight
    quantized, report = quantize(model, "int8")
    assert "lm_head" in report.quantized
    torch.testing.assert_close(quantized.embedding.weight, model.embedding.weight)


def test_quantize_rejects_bad_arguments():
    model = tiny_model()
    with pytest.raises(ValueError, match="mode="):
        quantize(model, "int2")
    with pytest.raises(ValueError, match="group_size="):
        quantize(model, "int4", group_size=48)
    with pytest.raises(ValueError, match="bits="):
        quantize_reference(torch.ones(2, 4), 3)


def test_quantize_command_reports_the_perplexity_change(tmp_path, capsys):
    from seqblocks.cli import main

    base = tiny_checkpoint(tmp_path / "base")
    assert main(["quantize", str(base), "--mode", "int8", "--device", "cpu", "--json", "--threads", "1"]) == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert result["mode"] == "int8" and result["quantized_layers"] > 0
    assert abs(result["ppl_change"]) < 0.02


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("mode,config", [("int8", "Int8WeightOnlyConfig"), ("int4", "Int4WeightOnlyConfig")])
def test_cuda_quantisation_uses_the_gpu_kernels(mode, config):
    model = tiny_model(d_model=128, mixer_kwargs={"attn": {"num_heads": 2}}).to("cuda", torch.bfloat16)
    ids = torch.randint(0, 16, (2, 12), device="cuda")
    ref = model(ids).logits.float()
    quantized, report = quantize(model, mode, group_size=64)
    assert report.config == config and not report.skipped
    out = quantized(ids).logits.float()
    assert ((out - ref).norm() / ref.norm()).item() < LOGIT_ERROR[mode]
    for graph in (False, True):
        tokens = generate(quantized, ids[:, :4], max_new_tokens=6, temperature=0, cuda_graph=graph).tokens
        assert tokens.shape == (2, 6)

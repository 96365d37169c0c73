"""muP (BlockConfig.mup, LanguageModelConfig.mup_base_width) and hidden states from every model."""

import importlib.util
import json
import math

import pytest
import torch
import torch.nn.functional as F

from seqblocks import BlockConfig
from seqblocks.generation import generate
from seqblocks.layers.attention.mha import MHA
from seqblocks.layers.attention.mla import MLA
from seqblocks.models import Classifier, LRNNLMHeadModel
from seqblocks.models.config_lm import LanguageModel, LanguageModelConfig
from seqblocks.models.transformer import TransformerDecoder, TransformerEncoder, TransformerEncoderDecoder
from seqblocks.registry import MIXERS
from seqblocks.train import make_optimizer, param_groups

V = 64
BASE = 64


def _lm(d_model, mup, n_layers=2, **kwargs):
    extra = {"mup": True, "mup_base_width": BASE} if mup else {}
    config = LanguageModelConfig.from_pattern(["mha"] * n_layers, vocab_size=V, d_model=d_model, n_heads=4,
                                              **extra, **kwargs)
    return LanguageModel(config)


def _coordinates(d_model, mup, steps, lr=1e-2):
    """Mean |x| of each layer's output (the hidden states after the embedding) and of the logits, at
    init and after ``steps`` Adam steps on one fixed batch."""
    torch.manual_seed(0)
    model = _lm(d_model, mup)
    ids = torch.randint(0, V, (8, 24), generator=torch.Generator().manual_seed(1))
    optimizer = make_optimizer(model, lr, weight_decay=0.0)
    scales = []
    for step in range(steps + 1):
        out = model(ids, return_hidden=True)
        scales.append([h.abs().mean().item() for h in out.hidden_states[1:]] + [out.logits.abs().mean().item()])
        if step == steps:
            break
        loss = F.cross_entropy(out.logits[:, :-1].reshape(-1, V), ids[:, 1:].reshape(-1))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return torch.tensor(scales[0]), torch.tensor(scales[-1])


@pytest.fixture(scope="module")
def coordinate_check():
    widths = (64, 128, 256, 512)
    return {mup: [_coordinates(d, mup, steps=4) for d in widths] for mup in (False, True)}


def test_coordinate_check_mup_is_flat_across_widths(coordinate_check):
    init = torch.stack([c[0] for c in coordinate_check[True]])  # [widths, layers + logits]
    trained = torch.stack([c[1] for c in coordinate_check[True]])
    # Every layer's output keeps its size from width 64 to 512, at init and after the Adam steps.
    assert (init[:, :-1].amax(0) / init[:, :-1].amin(0)).max() < 1.3
    assert (trained.amax(0) / trained.amin(0)).max() < 1.5
    # Logits at init shrink with width under muP (they tend to 0 in the limit); they never grow.
    assert init[-1, -1] <= init[0, -1]


def test_coordinate_check_standard_parameterisation_blows_up(coordinate_check):
    trained = torch.stack([c[1] for c in coordinate_check[False]])
    # The same lr without muP: the first layer's output and the logits grow with width.
    assert trained[-1, 0] > 10 * trained[0, 0]
    assert trained[-1, -1] > 2 * trained[0, -1]


def test_hidden_init_scale_and_embedding_unscaled():
    for d in (64, 256):
        model = _lm(d, mup=True, bias=True, rescale_residual=False, initializer_range=0.02)
        attn = model.layers[0].attention
        expected = 0.02 / math.sqrt(d / BASE)
        assert attn.in_proj.weight.std().item() == pytest.approx(expected, rel=0.05)
        assert attn.in_proj.bias.abs().max().item() == 0.0
        assert model.embedding.weight.std().item() == pytest.approx(0.02, rel=0.05)


def test_ffn_linears_get_the_mup_init():
    model = _lm(256, mup=True, rescale_residual=False)
    linears = [m for m in model.layers[0].ffn.modules() if isinstance(m, torch.nn.Linear)]
    assert linears
    for linear in linears:
        assert linear.weight.std().item() == pytest.approx(0.02 / 2, rel=0.05)


def test_attention_scale_is_one_over_head_dim():
    config = BlockConfig(attention="gqa", d_model=64, n_heads=4, n_kv_heads=2, mup=True)
    assert MHA.from_config(config).softmax_scale == 1 / 16
    assert MHA.from_config(config.replace(mup=False)).softmax_scale is None  # the backend's head_dim ** -0.5
    assert MHA.from_config(config.replace(mixer_kwargs={"softmax_scale": 0.5})).softmax_scale == 0.5
    mla = MLA.from_config(BlockConfig(attention="mla", d_model=64, n_heads=4, kv_lora_rank=32, rope_dim=8, mup=True))
    assert mla.softmax_scale == 1 / (16 + 8)
    for name, extra in (("chunked_gqa", {"attention_chunk_size": 8}), ("sparse_gqa", {"sparse_select_k": 4})):
        layer = MIXERS.get(name).from_config(BlockConfig(attention=name, d_model=64, n_heads=4, n_kv_heads=2,
                                                         mup=True, **extra))
        assert layer.softmax_scale == 1 / 16, name
    # Linear attention has no softmax scale: mup leaves it as it is, and builds.
    LanguageModel(LanguageModelConfig.from_pattern(["linear_attention"], vocab_size=V, d_model=32, mup=True))


def test_attention_scale_changes_the_output():
    torch.manual_seed(0)
    config = BlockConfig(attention="mha", d_model=32, n_heads=2, mup=True)
    mup, sp = MHA.from_config(config), MHA.from_config(config.replace(mup=False))
    sp.load_state_dict(mup.state_dict())
    x = torch.randn(2, 5, 32)
    assert not torch.allclose(mup(x), sp(x))
    sp.softmax_scale = 1 / 16
    torch.testing.assert_close(mup(x), sp(x))


def test_lr_groups():
    model = _lm(256, mup=True, bias=True)
    lr = 1e-2
    optimizer = make_optimizer(model, lr, weight_decay=0.1)
    lr_of = {id(p): g["lr"] for g in optimizer.param_groups for p in g["params"]}
    wd_of = {id(p): g["weight_decay"] for g in optimizer.param_groups for p in g["params"]}
    assert len(lr_of) == len({id(p) for p in model.parameters()})  # every parameter, once
    for name, param in model.named_parameters():
        hidden = name.startswith("layers.") and param.ndim == 2 and name.endswith("weight") and "norm" not in name
        assert lr_of[id(param)] == pytest.approx(lr / 4 if hidden else lr), name
    assert lr_of[id(model.embedding.weight)] == lr and wd_of[id(model.embedding.weight)] == 0.0
    assert wd_of[id(model.layers[0].attention.in_proj.weight)] == 0.1
    assert wd_of[id(model.layers[0].attention.in_proj.bias)] == 0.0
    with pytest.raises(ValueError, match="pass lr"):
        param_groups(model, 0.1)
    # Without muP there is nothing to scale.
    sp = make_optimizer(_lm(256, mup=False), lr)
    assert {g["lr"] for g in sp.param_groups} == {lr}


def test_lr_scale_survives_a_rebuild_from_the_checkpoint_config():
    model = _lm(128, mup=True)
    again = LanguageModel.from_checkpoint_config(model.checkpoint_config())
    assert again.output_multiplier == 0.5
    assert again.layers[0].attention.in_proj.weight._lr_scale == 0.5


@pytest.mark.parametrize("tie", [True, False])
def test_logits_scaled_by_base_over_width_on_every_path(tie):
    torch.manual_seed(0)
    model = _lm(128, mup=True, tie_embeddings=tie).eval()
    assert model.output_multiplier == BASE / 128
    ids = torch.randint(0, V, (2, 6))
    out = model(ids, return_hidden=True)
    torch.testing.assert_close(out.logits, F.linear(out.hidden_states[-1], model.lm_head.weight[:V]) * 0.5)
    caches = model.allocate_inference_cache(2, 8)
    model(ids[:, :5], inference_params=caches)
    step = model.step(ids[:, 5:], caches)
    torch.testing.assert_close(step.logits[:, -1], out.logits[:, -1], atol=1e-5, rtol=1e-4)
    generated = generate(model, ids[:, :5], 1, temperature=0.0, return_scores=True)
    torch.testing.assert_close(generated.scores[:, 0], model(ids[:, :5]).logits[:, -1], atol=1e-5, rtol=1e-4)


def test_config_validation_and_round_trip():
    block = BlockConfig(attention="mha", d_model=64, n_heads=4, mup=True)
    config = LanguageModelConfig(vocab_size=V, blocks=(block, block), mup_base_width=32)
    assert config.mup and config.width_mult == 2.0
    assert LanguageModelConfig.from_json(config.to_json()) == config
    assert LanguageModelConfig(vocab_size=V, blocks=(block,)).width_mult == 1.0  # base = its own width
    with pytest.raises(ValueError, match="mup_base_width"):
        LanguageModelConfig(vocab_size=V, blocks=(block.replace(mup=False),), mup_base_width=32)
    with pytest.raises(ValueError, match="mup_base_width"):
        LanguageModelConfig(vocab_size=V, blocks=(block,), mup_base_width=0)
    with pytest.raises(ValueError, match="mup"):
        LanguageModelConfig(vocab_size=V, blocks=(block, block.replace(mup=False)))
    with pytest.raises(TypeError, match="mup"):
        BlockConfig(mup=1)
    from_pattern = LanguageModelConfig.from_pattern(["mamba", "mha"], vocab_size=V, d_model=64, mup=True,
                                                    mup_base_width=16)
    assert from_pattern.width_mult == 4.0 and all(b.mup for b in from_pattern.blocks)


# ------------------------------------------------------------------ hidden states


def test_language_model_hidden_states():
    torch.manual_seed(0)
    model = LanguageModel(LanguageModelConfig.from_pattern(["mamba", "mha", "mha"], vocab_size=V, d_model=32))
    ids = torch.randint(0, V, (2, 7))
    assert model(ids).hidden_states is None
    out = model(ids, return_hidden=True)
    assert len(out.hidden_states) == 4 and all(h.shape == (2, 7, 32) for h in out.hidden_states)
    torch.testing.assert_close(out.hidden_states[0], model.embedding(ids))
    torch.testing.assert_close(out.logits, F.linear(out.hidden_states[-1], model.lm_head.weight[:V]))
    torch.testing.assert_close(out.hidden_states[2], model.layers[1](model.layers[0](out.hidden_states[0])[0])[0])
    alias = model(ids, output_hidden_states=True)
    assert all(torch.equal(a, b) for a, b in zip(alias.hidden_states, out.hidden_states))
    last = model(ids, return_hidden=True, num_last_tokens=2)
    assert all(h.shape == (2, 2, 32) for h in last.hidden_states)
    torch.testing.assert_close(last.hidden_states[-1], out.hidden_states[-1][:, -2:])


def test_lrnn_lm_hidden_states():
    torch.manual_seed(0)
    model = LRNNLMHeadModel(d_model=32, d_state=8, n_layer=2, vocab_size=V, mixer_types=["mamba", "attn"],
                            d_intermediate=64)
    ids = torch.randint(0, V, (2, 5))
    out = model(ids, return_hidden=True)
    assert len(out.hidden_states) == 3 and all(h.shape == (2, 5, 32) for h in out.hidden_states)
    torch.testing.assert_close(out.hidden_states[0], model.embedding(ids))
    torch.testing.assert_close(out.logits, F.linear(out.hidden_states[-1], model.lm_head.weight[:V]))
    hidden, residual = model.layers[0](out.hidden_states[0], None)
    torch.testing.assert_close(out.hidden_states[1], hidden + residual)
    caches = model.allocate_inference_cache(2, 6)
    model(ids[:, :4], inference_params=caches)
    step = model.step(ids[:, 4:], caches, return_hidden=True)
    assert len(step.hidden_states) == 3 and step.hidden_states[-1].shape == (2, 1, 32)
    torch.testing.assert_close(step.hidden_states[-1], out.hidden_states[-1][:, -1:], atol=1e-5, rtol=1e-4)


def test_classifier_hidden_states():
    torch.manual_seed(0)
    model = Classifier(input_dim=6, num_classes=3, d_model=16, d_state=4, n_layers=2, lrnn_cls="lru",
                       pooling="mean", intermediate_pooling=["max", "none"], pooling_factor=[2, 1]).eval()
    x = torch.randn(2, 8, 6)
    logits, hidden = model(x, return_hidden=True)
    assert [h.shape for h in hidden] == [(2, 8, 16), (2, 4, 16), (2, 4, 16)]
    torch.testing.assert_close(logits, model.head(hidden[-1].mean(1)))
    torch.testing.assert_close(logits, model(x))


def test_transformer_hidden_states():
    torch.manual_seed(0)
    encoder = TransformerEncoder(V, d_model=32, num_layers=2, num_heads=4, d_ff=64).eval()
    ids = torch.randint(0, V, (2, 5))
    out, hidden = encoder(ids, return_hidden=True)
    assert len(hidden) == 3 and all(h.shape == (2, 5, 32) for h in hidden)
    assert torch.equal(hidden[-1], out) and torch.equal(out, encoder(ids))
    decoder = TransformerDecoder(V, d_model=32, num_layers=2, num_heads=4, d_ff=64, cross_attention=False).eval()
    logits, hidden = decoder(ids, return_hidden=True)
    assert len(hidden) == 3
    torch.testing.assert_close(logits, decoder.lm_head(hidden[-1]))
    model = TransformerEncoderDecoder(V, d_model=32, num_heads=4, d_ff=64, num_encoder_layers=2,
                                      num_decoder_layers=3).eval()
    logits, enc, dec = model(ids, ids[:, :4], return_hidden=True)
    assert (len(enc), len(dec)) == (3, 4) and dec[-1].shape == (2, 4, 32)
    torch.testing.assert_close(logits, model.decoder.lm_head(dec[-1]))
    torch.testing.assert_close(logits, model(ids, ids[:, :4]))


# ------------------------------------------------------------------ seqblocks bench mup


def test_bench_mup_smallest_size_writes_table_json_and_plot(tmp_path, capsys):
    from seqblocks.cli import main

    out = tmp_path / "bench"
    assert main(["bench", "mup", "--d-model", "8", "--widths", "8,16", "--steps", "2", "--seq-len", "8",
                 "--batch-size", "2", "--lr", "1e-3,1e-2", "--out", str(out), "--no-progress"]) == 0
    payload = json.loads((out / "mup.json").read_text())
    assert len(payload["rows"]) == 2 * 2 * 2  # (SP, muP) x widths x lrs
    assert all(r["loss"] is None or r["loss"] > 0 for r in payload["rows"])
    assert set(payload["best_lr"]) == {"SP/8", "SP/16", "muP/8", "muP/16"}
    table = (out / "mup.md").read_text()
    assert "| muP | 16 |" in table and "best lr" in table
    assert "muP: the best lr" in capsys.readouterr().out
    if importlib.util.find_spec("matplotlib") is not None:
        assert (out / "mup.png").stat().st_size > 1000


def test_bench_mup_rejects_a_base_that_is_not_the_narrowest_width(tmp_path):
    from seqblocks.cli import main

    assert main(["bench", "mup", "--d-model", "16", "--widths", "8,16", "--out", str(tmp_path)]) == 2


def test_mup_model_in_bf16():
    torch.manual_seed(0)
    model = _lm(128, mup=True).to(torch.bfloat16)
    out = model(torch.randint(0, V, (2, 6)), return_hidden=True)
    assert out.logits.dtype == torch.bfloat16 and torch.isfinite(out.logits).all()
    assert all(h.dtype == torch.bfloat16 for h in out.hidden_states)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_mup_model_trains_and_decodes_on_cuda_with_a_cuda_graph():
    torch.manual_seed(0)
    model = _lm(256, mup=True).cuda()
    optimizer = make_optimizer(model, 1e-2)  # fused AdamW over groups of different learning rates
    assert {g["lr"] for g in optimizer.param_groups} == {1e-2, 1e-2 / 4}
    ids = torch.randint(0, V, (2, 16), device="cuda")
    for _ in range(2):
        loss = F.cross_entropy(model(ids).logits[:, :-1].reshape(-1, V), ids[:, 1:].reshape(-1))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    model.eval()
    plain = generate(model, ids[:, :8], 8, temperature=0.0, return_scores=True)
    graphed = generate(model, ids[:, :8], 8, temperature=0.0, return_scores=True, cuda_graph=True)
    assert torch.equal(plain.tokens, graphed.tokens)
    torch.testing.assert_close(plain.scores, graphed.scores, atol=1e-4, rtol=1e-4)

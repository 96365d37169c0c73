"""Mixture-of-experts FFNs (``seqblocks.layers.moe``): the grouped fast path against the dense
reference that runs every expert and masks (bit-equal in fp64 on CPU), gradients, the balance losses
on constructed inputs, capacity drops, bias balancing, decode == forward in the language models,
parameter counts and the MoE presets.

Shapes: B batch, T time, D width, N tokens, E experts.
"""

from __future__ import annotations

import math

import pytest
import torch

import seqblocks
from seqblocks import BlockConfig, LRNNLMHeadModel, count_parameters
from seqblocks.generation import generate
from seqblocks.layers.moe import (
    LatentMoEFeedForward,
    MoEFeedForward,
    SharedMoEFeedForward,
    load_balance_loss,
    router_z_loss,
)
from seqblocks.models.config_lm import LanguageModel, LanguageModelConfig
from seqblocks.models.model_config import ModelConfig
from seqblocks.presets import build_model, load_config
from seqblocks.registry import FFNS
from seqblocks.train import TrainConfig, train

VARIANTS = {
    "moe": {},
    "moe_k3_plain": {"top_k_experts": 3, "moe_norm_topk": False},
    "moe_sigmoid_groups": {"moe_router": "sigmoid", "moe_n_groups": 3, "moe_topk_groups": 2,
                           "moe_routed_scaling_factor": 2.5},
    "moe_with_shared": {"n_shared_experts": 2, "shared_expert_d_ff": 8},
    "shared_moe": {},
    "latent_moe": {"moe_latent_size": 8},
}


def _layer(name, dtype=torch.float64, seed=0, **extra):
    kw = dict(VARIANTS[name], **extra)
    ffn = name if name in ("shared_moe", "latent_moe") else "moe"
    cfg = BlockConfig(ffn=ffn, d_model=16, d_ff=12, n_experts=6, **kw)
    torch.manual_seed(seed)
    layer = FFNS.get(ffn)(cfg)
    with torch.no_grad():  # a random selection bias, so the test also covers selection != weighting
        layer.expert_bias.normal_(std=0.05)
    return layer.to(dtype)


def _assert_same_fp64(a, b):
    """Equal to fp64 rounding: the fast path's GEMMs run on other shapes than the dense reference's, and
    a BLAS may block those sums differently (one ulp seen on an AMD EPYC CPU, bit-equal on others)."""
    torch.testing.assert_close(a, b, rtol=1e-13, atol=1e-15)


@pytest.mark.parametrize("name", list(VARIANTS))
def test_fast_path_equal_to_dense_reference_fp64(name):
    layer = _layer(name)
    x = torch.randn(3, 7, 16, dtype=torch.float64)
    _assert_same_fp64(layer(x), layer.forward_dense(x))


@pytest.mark.parametrize("name", ["moe", "moe_sigmoid_groups", "shared_moe", "latent_moe"])
def test_gradients_reach_router_and_experts_and_match_reference(name):
    layer = _layer(name)
    x = torch.randn(2, 9, 16, dtype=torch.float64, requires_grad=True)
    cot = torch.randn(2, 9, 16, dtype=torch.float64)
    params = [p for p in layer.parameters()]
    grads = torch.autograd.grad((layer(x) * cot).sum(), [x, *params])
    ref = torch.autograd.grad((layer.forward_dense(x) * cot).sum(), [x, *params])
    for (pname, _), g, r in zip([("x", x), *layer.named_parameters()], grads, ref):
        torch.testing.assert_close(g, r, rtol=1e-10, atol=1e-12, msg=pname)
        assert g.abs().sum() > 0, f"{pname} got no gradient"


def test_routing_picks_top_k_of_biased_scores_and_weights_from_unbiased():
    layer = _layer("moe_sigmoid_groups", moe_n_groups=1, moe_topk_groups=1)
    h = torch.randn(20, 16, dtype=torch.float64)
    index, weights, logits, _ = layer.route(h)
    scores = logits.sigmoid()
    want = (scores + layer.expert_bias).topk(2, dim=-1).indices
    assert torch.equal(index, want)
    chosen = scores.gather(1, index)
    torch.testing.assert_close(weights, 2.5 * chosen / chosen.sum(-1, keepdim=True))


@pytest.mark.parametrize("router", ["softmax", "sigmoid"])
def test_bias_modes_route_by_logits_or_corrected_scores(router):
    h = torch.randn(40, 16, dtype=torch.float64)
    bias = torch.tensor([0.4, -0.3, 0.2, 0.0, -0.1, 0.3], dtype=torch.float64)
    routes = {}
    for mode in ("scores", "logits", "corrected"):
        layer = _layer("moe", moe_router=router, moe_bias_mode=mode, top_k_experts=2)
        with torch.no_grad():
            layer.expert_bias.copy_(bias)
        index, weights, logits, probs = layer.route(h)
        scores = logits.softmax(-1) if router == "softmax" else logits.sigmoid()
        select = {"scores": scores + bias, "logits": logits + bias, "corrected": scores + bias}[mode]
        assert torch.equal(index, select.topk(2, dim=-1).indices)
        chosen = (scores + bias if mode == "corrected" else scores).gather(1, index)
        torch.testing.assert_close(weights, chosen / chosen.sum(-1, keepdim=True), rtol=1e-12, atol=0)
        torch.testing.assert_close(probs, scores / scores.sum(-1, keepdim=True), rtol=1e-12, atol=0)
        x = h.view(4, 10, 16)
        _assert_same_fp64(layer(x), layer.forward_dense(x))
        routes[mode] = (index, weights)
        with torch.no_grad():  # with b = 0 every mode routes as the default
            layer.expert_bias.zero_()
        routes[mode, 0] = layer.route(h)[:2]
    assert not torch.equal(routes["logits"][0], routes["scores"][0])
    assert not torch.allclose(routes["corrected"][1], routes["scores"][1])
    for mode in ("logits", "corrected"):
        assert torch.equal(routes[mode, 0][0], routes["scores", 0][0])
        torch.testing.assert_close(routes[mode, 0][1], routes["scores", 0][1], rtol=1e-12, atol=0)


def test_corrected_weights_keep_the_sign_of_their_sum():
    layer = _layer("moe", moe_router="sigmoid", moe_bias_mode="corrected", top_k_experts=2)
    with torch.no_grad():
        layer.expert_bias.fill_(-2.0)  # every corrected score is negative
    index, weights, logits, _ = layer.route(torch.randn(5, 16, dtype=torch.float64))
    chosen = logits.sigmoid().gather(1, index) - 2.0
    torch.testing.assert_close(weights, chosen / chosen.sum(-1, keepdim=True))
    assert (weights > 0).all()


def test_group_limited_routing_stays_in_the_best_groups():
    layer = _layer("moe_sigmoid_groups")  # 6 experts in 3 groups of 2, 2 groups per token
    h = torch.randn(50, 16, dtype=torch.float64)
    index, _, logits, _ = layer.route(h)
    select = (logits.sigmoid() + layer.expert_bias).view(50, 3, 2)
    best = select.sum(-1).topk(2, dim=-1).indices  # groups of 2 experts: the best-two sum is the sum
    assert all(set((index[n] // 2).tolist()) <= set(best[n].tolist()) for n in range(50))


def test_load_balance_loss_has_the_papers_values():
    E, N = 4, 8
    uniform = torch.full((N, E), 1 / E)
    spread = torch.arange(N)[:, None] % E  # each expert chosen by N / E tokens
    assert load_balance_loss(uniform, spread, E).item() == pytest.approx(1.0)
    collapsed = torch.zeros(N, E)
    collapsed[:, 0] = 1.0
    assert load_balance_loss(collapsed, torch.zeros(N, 1, dtype=torch.long), E).item() == pytest.approx(E)
    # top-2: f counts the N * k assignments; P_0 = 0.5, f_0 = 0.5 and f_1 = 0.5, P_1 = 0.5
    half = torch.zeros(N, E)
    half[:, :2] = 0.5
    two = torch.tensor([[0, 1]] * N)
    assert load_balance_loss(half, two, E).item() == pytest.approx(E * (0.5 * 0.5 + 0.5 * 0.5))


def test_router_z_loss_value():
    logits = torch.zeros(5, 8)
    assert router_z_loss(logits).item() == pytest.approx(math.log(8) ** 2)
    logits = torch.tensor([[0.0, math.log(3.0)]])
    assert router_z_loss(logits).item() == pytest.approx(math.log(4.0) ** 2)


def test_aux_loss_in_training_only_and_weighted():
    layer = _layer("moe", moe_aux_loss_coef=0.5, moe_z_loss_coef=0.25)
    x = torch.randn(2, 5, 16, dtype=torch.float64)
    layer.train()
    layer(x)
    index, _, logits, probs = layer.route(x.reshape(-1, 16))
    want = 0.5 * load_balance_loss(probs, index, 6) + 0.25 * router_z_loss(logits)
    torch.testing.assert_close(layer.aux_loss, want)
    layer.eval()
    layer(x)
    assert layer.aux_loss is None


def test_capacity_drops_are_counted_and_dropped_tokens_get_no_routed_output():
    cfg = BlockConfig(ffn="moe", d_model=8, d_ff=4, n_experts=4, top_k_experts=1, moe_capacity_factor=1.0)
    layer = MoEFeedForward(cfg).double()
    with torch.no_grad():
        layer.router.weight.zero_()
        layer.router.weight[0] = 1.0  # every token with a positive feature sum picks expert 0
    x = torch.rand(1, 8, 8, dtype=torch.float64) + 0.1
    layer.train()
    y = layer(x)
    cap = math.ceil(1.0 * 8 * 1 / 4)
    assert cap == 2 and int(layer.last_dropped) == 8 - cap
    assert layer.last_load.tolist() == [8, 0, 0, 0]
    assert torch.count_nonzero(y[0, cap:].abs().sum(-1)) == 0  # later tokens lost their only expert
    torch.testing.assert_close(y[0, :cap], layer.forward_dense(x)[0, :cap])
    layer.eval()  # evaluation is dropless
    torch.testing.assert_close(layer(x), layer.forward_dense(x))
    assert int(layer.last_dropped) == 0


def test_aux_loss_free_bias_update():
    layer = _layer("shared_moe", moe_bias_update_rate=0.01)
    with torch.no_grad():
        layer.expert_bias.zero_()
    layer.train()
    layer(torch.randn(4, 8, 16, dtype=torch.float64))
    load = layer.expert_load.clone()
    assert load.sum() == 4 * 8 * 2
    layer.update_router_bias()
    torch.testing.assert_close(layer.expert_bias, 0.01 * torch.sign(load.mean() - load))
    assert layer.expert_load.sum() == 0
    assert "expert_bias" in layer.state_dict() and "expert_load" not in layer.state_dict()
    assert layer.to(torch.bfloat16).expert_bias.dtype == torch.float64  # never rounded to bf16


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_inputs(dtype):
    layer = _layer("shared_moe", dtype=torch.float32)
    x = torch.randn(2, 6, 16)
    want = layer(x)
    low = _layer("shared_moe", dtype=dtype)
    y = low(x.to(dtype))
    assert y.dtype == dtype
    torch.testing.assert_close(y.float(), want, atol=5e-2, rtol=5e-2)


def test_block_config_moe_defaults_follow_the_seed_library():
    c = BlockConfig()
    assert (c.n_experts, c.top_k_experts, c.n_shared_experts) == (None, 2, None)
    assert (c.moe_latent_size, c.moe_d_ff, c.shared_expert_d_ff) == (None, None, None)
    assert (c.moe_routed_scaling_factor, c.moe_n_groups, c.moe_topk_groups) == (1.0, 1, 1)


def test_registry_config_errors_and_counts():
    assert {"moe", "shared_moe", "latent_moe"} <= set(FFNS.keys())
    with pytest.raises(ValueError, match="top_k_experts"):
        BlockConfig(n_experts=4, top_k_experts=5)
    with pytest.raises(ValueError, match="moe_router"):
        BlockConfig(moe_router="relu")
    with pytest.raises(ValueError, match="moe_n_groups"):
        BlockConfig(n_experts=6, moe_n_groups=4)
    with pytest.raises(ValueError, match="moe_capacity_factor"):
        BlockConfig(moe_capacity_factor=0.0)
    with pytest.raises(ValueError, match="must be"):
        _layer("moe")(torch.randn(2, 3, 5, dtype=torch.float64))
    layer = _layer("shared_moe")
    total, active = count_parameters(layer)
    per_expert = 16 * 24 + 12 * 16
    assert total == sum(p.numel() for p in layer.parameters())
    assert total - active == (6 - 2) * per_expert
    assert isinstance(SharedMoEFeedForward(BlockConfig(ffn="shared_moe", d_model=8, d_ff=4)).shared, torch.nn.Module)
    assert LatentMoEFeedForward(BlockConfig(d_model=16, d_ff=4)).latent_size == 4


def _lrnn(moe, layers=None, **kw):
    torch.manual_seed(0)
    return LRNNLMHeadModel(32, 8, 4, 50, ["mamba", "attn", "mamba", "attn"], d_intermediate=48,
                           mixer_kwargs={"attn": {"num_heads": 2}}, moe=moe, moe_layers=layers, **kw)


@pytest.mark.parametrize("ffn", ["moe", "shared_moe", "latent_moe"])
def test_lrnn_lm_moe_decode_equals_forward(ffn):
    model = _lrnn({"ffn": ffn, "n_experts": 4, "top_k_experts": 2, "moe_d_ff": 16}, [1, 3]).eval()
    assert isinstance(model.layers[1].mlp, MoEFeedForward) and not isinstance(model.layers[0].mlp, MoEFeedForward)
    assert ModelConfig.from_json(model.config.to_json()) == model.config
    ids = torch.randint(0, 50, (2, 7))
    full = model(ids)
    assert full.aux_loss is None
    caches = model.allocate_inference_cache(2, 16)
    steps = torch.cat([model.step(ids[:, t:t + 1], caches).logits for t in range(7)], 1)
    torch.testing.assert_close(steps, full.logits, atol=1e-5, rtol=1e-5)
    stats = model.router_stats()
    assert set(stats) == {"layers.1.mlp", "layers.3.mlp"} and sum(stats["layers.1.mlp"]["load"]) == 2 * 2


def test_language_model_moe_aux_loss_and_decode():
    cfg = LanguageModelConfig.from_pattern(["gqa", "mamba"], vocab_size=50, d_model=32, ffn="latent_moe",
                                           n_experts=4, n_kv_heads=1, mtp_n_predict=1)
    model = LanguageModel(cfg)
    ids = torch.randint(0, 50, (2, 6))
    out = model(ids)
    assert out.aux_loss is not None and out.aux_loss.requires_grad
    # both layers and the MTP block: three MoE losses summed
    assert len(model._moe_modules()) == 3
    torch.testing.assert_close(out.aux_loss, sum(m.aux_loss for m in model._moe_modules()))
    model.eval()
    full = model(ids).logits
    caches = model.allocate_inference_cache(2, 8)
    steps = torch.cat([model.step(ids[:, t:t + 1], caches).logits for t in range(6)], 1)
    torch.testing.assert_close(steps, full, atol=1e-5, rtol=1e-5)


def test_model_config_moe_errors_and_checkpoint(tmp_path):
    with pytest.raises(ValueError, match="moe_layers"):
        _lrnn({"n_experts": 4}, [4])
    with pytest.raises(ValueError, match="needs ModelConfig.moe"):
        _lrnn(None, [1])
    model = _lrnn({"ffn": "shared_moe", "n_experts": 4, "moe_bias_update_rate": 0.1})
    with torch.no_grad():
        model.layers[2].mlp.expert_bias.fill_(0.25)
    model.save_pretrained(tmp_path)
    loaded = LRNNLMHeadModel.from_pretrained(tmp_path)
    assert torch.equal(loaded.layers[2].mlp.expert_bias, model.layers[2].mlp.expert_bias)
    ids = torch.randint(0, 50, (1, 5))
    torch.testing.assert_close(loaded.eval()(ids).logits, model.eval()(ids).logits)


def test_info_counts_active_parameters(capsys):
    from seqblocks.cli import main

    assert main(["info", "tiny-mixtral-like", "--json"]) == 0
    import json

    data = json.loads(capsys.readouterr().out)
    assert data["active_parameters"] < data["parameters"]
    assert hasattr(seqblocks, "count_parameters") and hasattr(seqblocks, "ParameterCount")


TINY_MOE_PRESETS = ["tiny-mixtral-like", "tiny-jamba-like", "tiny-llama4-like", "tiny-deepseek-like"]


@pytest.mark.parametrize("name", TINY_MOE_PRESETS)
def test_moe_presets_build_step_and_decode(name):
    """Each tiny MoE preset: two optimizer steps on the objective the trainer uses (cross-entropy +
    MTP + aux loss), the bias update after each, then greedy decoding."""
    model = build_model(load_config(name)["model"], vocab_size=40)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    ids = torch.randint(0, 40, (2, 12))
    for _ in range(2):
        out = model(ids[:, :-1])
        loss = torch.nn.functional.cross_entropy(out.logits.flatten(0, 1), ids[:, 1:].flatten())
        assert out.aux_loss is not None
        (loss + out.aux_loss).backward()
        moes = [layer.mlp for layer in model.layers if isinstance(layer.mlp, MoEFeedForward)]
        assert moes and all(p.grad is not None for m in moes for p in m.expert_parameters())
        opt.step()
        opt.zero_grad()
        model.update_router_biases()
    assert math.isfinite(float(loss.detach()))
    model.eval()
    prompt = torch.randint(0, 40, (1, 4))
    assert generate(model, prompt, 4, temperature=0).tokens.shape == (1, 4)


@pytest.mark.slow
@pytest.mark.parametrize("name", TINY_MOE_PRESETS)
def test_moe_presets_train_with_the_trainer(name, tmp_path):
    preset = load_config(name)
    config = TrainConfig(**{**preset["train"], "steps": 2, "batch_size": 2, "eval_every": 0, "ckpt_every": 0,
                            "sample_tokens": 0, "device": "cpu", "warmup_steps": 1,
                            "task_options": {"seq_len": 16, "max_chars": 20_000}})
    result = train(preset["model"], config, tmp_path, progress=False, log=lambda m: None)
    assert math.isfinite(result.metrics["train_loss"])
    model = result.model.eval()
    assert model._moe_modules()
    if any(m.bias_update_rate > 0 for m in model._moe_modules()):  # the trainer ran the bias update
        assert any(m.expert_bias.abs().sum() > 0 for m in model._moe_modules())
    prompt = torch.randint(0, model.vocab_size, (1, 4))
    assert generate(model, prompt, 4, temperature=0).tokens.shape == (1, 4)


@pytest.mark.parametrize("name", ["mixtral-like", "jamba-like", "llama4-like", "deepseek-like"])
def test_gpu_moe_presets_describe_the_families(name):
    config = ModelConfig.from_data(load_config(name)["model"])
    moe = config.moe
    assert moe is not None
    if name == "mixtral-like":
        assert set(config.mixer_types) == {"sliding_window"} and (moe.n_experts, moe.top_k_experts) == (8, 2)
    elif name == "jamba-like":
        assert config.mixer_types.count("attn") * 8 == config.n_layer and len(config.moe_layers) * 2 == config.n_layer
    elif name == "llama4-like":
        assert moe.ffn == "shared_moe" and moe.top_k_experts == 1
    else:
        assert moe.ffn == "shared_moe" and config.mtp_n_predict == 1 and moe.moe_bias_update_rate > 0


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("ffn", ["moe", "shared_moe", "latent_moe"])
def test_cuda_moe_lm_trains_and_decodes(ffn):
    torch.manual_seed(0)
    model = LRNNLMHeadModel(256, 16, 2, 100, ["attn", "attn"], mixer_kwargs={"attn": {"num_heads": 4}},
                            moe={"ffn": ffn, "n_experts": 8, "moe_d_ff": 512}, device="cuda", dtype=torch.bfloat16)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    ids = torch.randint(0, 100, (4, 64), device="cuda")
    for _ in range(3):
        out = model(ids[:, :-1])
        loss = torch.nn.functional.cross_entropy(out.logits.float().flatten(0, 1), ids[:, 1:].flatten())
        (loss + out.aux_loss).backward()
        opt.step()
        opt.zero_grad()
        model.update_router_biases()
    assert math.isfinite(float(loss.detach()))
    model.eval()
    full = model(ids[:, :8]).logits
    caches = model.allocate_inference_cache(4, 16)
    steps = torch.cat([model.step(ids[:, t:t + 1], caches).logits for t in range(8)], 1)
    torch.testing.assert_close(steps.float(), full.float(), atol=0.1, rtol=0.05)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_moe_layer_matches_dense_reference_bf16():
    cfg = BlockConfig(ffn="moe", d_model=256, d_ff=512, n_experts=8, top_k_experts=2)
    layer = MoEFeedForward(cfg, device="cuda", dtype=torch.bfloat16)
    x = torch.randn(4, 128, 256, device="cuda", dtype=torch.bfloat16)
    torch.testing.assert_close(layer(x).float(), layer.forward_dense(x).float(), atol=3e-2, rtol=3e-2)

import dataclasses
import json

import pytest

from seqblocks import BlockConfig

NON_DEFAULTS = dict(
    attention="gqa", ffn="gated", norm="rms_norm", position="rope", d_model=96, n_heads=6, n_kv_heads=2,
    head_dim=32, d_ff=256, bias=False, dropout=0.1, norm_eps=1e-6, rope_theta=500000.0, max_seq_len=4096,
    pre_norm=False, causal=False, window_size=128, attention_dropout=0.05, attention_type="flex",
    attention_block_size=64, linear_attention_chunk_size=32, kv_lora_rank=64, q_lora_rank=48, rope_dim=16,
    rotary_dim=16, rope_scaling=2.0, rope_scaling_type="llama3", rope_scaling_kwargs={"low_freq_factor": 2.0},
    d_state=64, mixer_kwargs={"dt_min": 0.001, "nested": {"a": [1, 2]}},
    qk_norm=True, attention_chunk_size=64, sparse_select_k=32, sparse_compress_ratio=4, attn_logit_softcapping=50.0,
    mup=True,
    n_experts=12, top_k_experts=3, n_shared_experts=2, moe_latent_size=24, moe_d_ff=64, shared_expert_d_ff=32,
    moe_routed_scaling_factor=2.5, moe_n_groups=4, moe_topk_groups=2, moe_router="sigmoid", moe_norm_topk=False,
    moe_capacity_factor=1.25, moe_aux_loss_coef=0.001, moe_z_loss_coef=0.0, moe_bias_update_rate=0.001,
    moe_bias_mode="corrected",
)


def test_seed_defaults():
    c = BlockConfig()
    assert (c.attention, c.ffn, c.norm, c.position) == ("mha", "standard", "layer_norm", "sinusoidal")
    assert (c.d_model, c.n_heads, c.n_kv_heads, c.d_ff) == (512, 8, None, 2048)
    assert (c.bias, c.dropout, c.norm_eps, c.rope_theta, c.max_seq_len, c.pre_norm) == (
        True, 0.0, 1e-5, 10000.0, 2048, True)
    assert c.head_dim is None and c.effective_head_dim == 64 and c.effective_n_kv_heads == 8
    assert c.replace(d_model=1024).effective_head_dim == 128  # derived, never stored


def test_every_field_is_covered_by_the_round_trip_test():
    assert set(NON_DEFAULTS) == {f.name for f in dataclasses.fields(BlockConfig)}


def test_json_round_trip_every_field():
    c = BlockConfig(**NON_DEFAULTS)
    for f in dataclasses.fields(c):
        assert getattr(c, f.name) != getattr(BlockConfig(), f.name), f.name
    text = c.to_json()
    back = BlockConfig.from_json(text)
    assert back == c
    assert json.loads(text) == c.to_dict()
    assert BlockConfig.from_dict(json.loads(json.dumps(BlockConfig().to_dict()))) == BlockConfig()


def test_frozen_and_keyword_only():
    c = BlockConfig()
    with pytest.raises(dataclasses.FrozenInstanceError):
        c.d_model = 3
    with pytest.raises(TypeError):
        BlockConfig("mha")


def test_head_dim_is_its_own_field():
    c = BlockConfig(d_model=100, n_heads=3, head_dim=40)
    assert c.head_dim == 40
    with pytest.raises(ValueError, match="d_model=100.*multiple of n_heads=3"):
        BlockConfig(d_model=100, n_heads=3)


@pytest.mark.parametrize(
    "field, value, match",
    [
        ("d_model", 0, "d_model=0"),
        ("n_heads", -1, "n_heads=-1"),
        ("n_kv_heads", 3, "n_kv_heads=3.*divisor of n_heads=8"),
        ("dropout", 1.0, r"dropout=1.0.*\[0, 1\)"),
        ("norm_eps", 0.0, "norm_eps=0.0"),
        ("window_size", 0, "window_size=0"),
        ("rotary_dim", 63, "rotary_dim=63"),
        ("attention", " ", "attention"),
        ("rope_theta", float("inf"), "rope_theta must be finite"),
        ("attention_chunk_size", 0, "attention_chunk_size=0"),
        ("sparse_select_k", -2, "sparse_select_k=-2"),
        ("attn_logit_softcapping", 0.0, "attn_logit_softcapping=0.0"),
        ("moe_bias_mode", "weights", "moe_bias_mode='weights'.*'corrected'"),
    ],
)
def test_validation_names_the_field(field, value, match):
    with pytest.raises(ValueError, match=match):
        BlockConfig(**{field: value})


@pytest.mark.parametrize("field, value", [("d_model", 8.0), ("d_model", True), ("bias", 1), ("ffn", 3),
                                          ("mixer_kwargs", [1])])
def test_wrong_types_are_type_errors(field, value):
    with pytest.raises(TypeError, match=f"BlockConfig.{field}"):
        BlockConfig(**{field: value})


def test_ints_are_accepted_for_float_fields():
    c = BlockConfig(rope_theta=10000, dropout=0)
    assert isinstance(c.rope_theta, float) and isinstance(c.dropout, float)


def test_from_dict_rejects_unknown_fields():
    with pytest.raises(ValueError, match=r"unknown BlockConfig fields \['nope'\]"):
        BlockConfig.from_dict({"nope": 1})


def test_mixer_kwargs_must_be_json():
    with pytest.raises(ValueError, match="mixer_kwargs"):
        BlockConfig(mixer_kwargs={"f": object()})

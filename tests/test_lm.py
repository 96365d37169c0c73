"""LRNNLMHeadModel and LanguageModel: construction, routing, caches, step == forward, causality.

Every test that names a mixer type runs for every mixer registered at collection time (aliases once),
so the real mixers are covered as they land. Two stand-in mixers defined here (registered only while
these tests run) exercise the engine on their own: an event-style decay recurrence that takes
``lengths`` and ``integration_timesteps``, and a tiny causal attention with a KV cache that takes
neither and requires ``num_heads``.
"""

from __future__ import annotations

import dataclasses
import json
import math

import pytest
import torch
from torch import nn

from seqblocks import BlockConfig, LanguageModel, LanguageModelConfig, LRNNLMHeadModel
from seqblocks.cache import Cache
from seqblocks.layers.build import default_num_heads, resolve_mixer_kwargs
from seqblocks.layers.mixer import Mixer
from seqblocks.registry import MIXERS
from seqblocks.testing import assert_close

# ----------------------------------------------------------------------------- stand-in mixers


@dataclasses.dataclass(eq=False)
class DecayCache(Cache):
    state: torch.Tensor = None  # [B, D] fp32


class DecayMixer(Mixer):
    """h_t = a^dt_t * h_{t-1} + (1 - a) * in(x_t); y_t = out(h_t). Takes lengths and timesteps."""

    inputs = frozenset({"lengths", "integration_timesteps"})

    def __init__(self, d_model: int, d_state: int = 4, layer_idx: int | None = None, device=None, dtype=None):
        super().__init__()
        self.d_state, self.layer_idx = d_state, layer_idx
        self.in_proj = nn.Linear(d_model, d_model, device=device, dtype=dtype)
        self.out_proj = nn.Linear(d_model, d_model, device=device, dtype=dtype)
        self.logit_a = nn.Parameter(torch.linspace(-1.0, 2.0, d_model, device=device, dtype=dtype))

    def allocate_inference_cache(self, batch_size, max_seqlen, dtype=None, **kwargs):
        dev = self.logit_a.device
        return DecayCache.empty(batch_size, max_seqlen, device=dev,
                                state=torch.zeros(batch_size, self.logit_a.shape[0], device=dev, dtype=torch.float64))

    def forward(self, x, cache=None, *, lengths=None, integration_timesteps=None):
        B, T, D = x.shape
        u = self.in_proj(x).double()
        a = torch.sigmoid(self.logit_a.double())
        dt = torch.ones(B, T, dtype=torch.float64, device=x.device) if integration_timesteps is None \
            else integration_timesteps.double()
        valid = torch.ones(B, T, dtype=torch.bool, device=x.device) if lengths is None \
            else torch.arange(T, device=x.device)[None] < lengths[:, None]
        h = cache.state.clone() if cache is not None else torch.zeros(B, D, dtype=torch.float64, device=x.device)
        ys = []
        for t in range(T):
            new = a ** dt[:, t, None] * h + (1 - a) * u[:, t]
            h = torch.where(valid[:, t, None], new, h)
            ys.append(h)
        if cache is not None:
            cache.state.copy_(h)
            cache.advance(lengths if lengths is not None else T)
        return self.out_proj(torch.stack(ys, 1).to(x.dtype))


@dataclasses.dataclass(eq=False)
class KVCache(Cache):
    k: torch.Tensor = None  # [B, S, H, K]
    v: torch.Tensor = None


class TinyAttention(Mixer):
    """Causal multi-head attention with a static KV cache and per-row offsets; requires num_heads."""

    def __init__(self, d_model: int, num_heads: int, causal: bool = True, device=None, dtype=None):
        super().__init__()
        self.num_heads, self.causal = num_heads, causal
        self.qkv = nn.Linear(d_model, 3 * d_model, device=device, dtype=dtype)
        self.out_proj = nn.Linear(d_model, d_model, device=device, dtype=dtype)

    @classmethod
    def from_config(cls, config, **kwargs):
        return cls(config.d_model, num_heads=config.n_heads, causal=config.causal)

    def allocate_inference_cache(self, batch_size, max_seqlen, dtype=None, **kwargs):
        H, D = self.num_heads, self.out_proj.in_features
        w = self.qkv.weight
        shape = (batch_size, max_seqlen, H, D // H)
        return KVCache.empty(batch_size, max_seqlen, device=w.device, k=torch.zeros(shape, device=w.device,
                             dtype=dtype or w.dtype), v=torch.zeros(shape, device=w.device, dtype=dtype or w.dtype))

    def forward(self, x, cache=None):
        B, T, D = x.shape
        H = self.num_heads
        q, k, v = self.qkv(x).view(B, T, 3, H, D // H).unbind(2)
        if cache is None:
            qpos = torch.arange(T, device=x.device).expand(B, T)
        else:
            qpos = cache.seqlen_offset[:, None] + torch.arange(T, device=x.device)
            rows = torch.arange(B, device=x.device)[:, None].expand(B, T)
            cache.k[rows, qpos] = k.to(cache.k.dtype)
            cache.v[rows, qpos] = v.to(cache.v.dtype)
            k, v = cache.k.to(x.dtype), cache.v.to(x.dtype)
            cache.advance(T)
        S = k.shape[1]
        scores = torch.einsum("bthk,bshk->bhts", q, k) / math.sqrt(D // H)
        mask = torch.arange(S, device=x.device)[None, None, :] <= qpos[:, :, None]  # [B, T, S]
        if not self.causal:
            mask = torch.ones_like(mask)
        scores = scores.masked_fill(~mask[:, None], float("-inf"))
        y = torch.einsum("bhts,bshk->bthk", scores.softmax(-1), v).reshape(B, T, D)
        return self.out_proj(y)


STAND_INS = {"sbtest_decay": DecayMixer, "sbtest_attn": TinyAttention}


@pytest.fixture(autouse=True, scope="module")
def stand_in_mixers():
    with MIXERS.scoped():
        for name, cls in STAND_INS.items():
            MIXERS.register(name, cls)
        yield


@pytest.fixture(autouse=True)
def no_grad():
    with torch.no_grad():
        yield


def registered_types() -> list[str]:
    """Every mixer registered now (one name per class), in name order."""
    seen, names = set(), []
    for name, cls in MIXERS.items():
        if cls not in seen:
            seen.add(cls)
            names.append(name)
    return names


MIXER_TYPES = registered_types()  # the package's own, at collection time
REAL_TYPES = [t for t in MIXER_TYPES if not getattr(MIXERS.get(t), "is_identity", False)]
ALL_TYPES = MIXER_TYPES + list(STAND_INS)
# Small constructor arguments for mixers whose defaults are large or that need extra arguments.
TEST_MIXER_KWARGS: dict[str, dict] = {"sliding_window": {"window_size": 4}, "mamba2": {"headdim": 8},
                                      "mamba3": {"headdim": 8}, "chunked_gqa": {"attention_chunk_size": 4},
                                      "sparse_gqa": {"sparse_select_k": 2}}
SEED_HYBRID = ["S5", "Mamba", "attn", "LRU"]


def registered(*names: str) -> bool:
    return all(n in MIXERS for n in names)


def tiny_lm(types, *, dtype=torch.float64, d_model=16, vocab_size=37, **kwargs) -> LRNNLMHeadModel:
    kw = {t: TEST_MIXER_KWARGS[t.lower()] for t in types if t.lower() in TEST_MIXER_KWARGS}
    kwargs.setdefault("mixer_kwargs", kw or None)
    kwargs.setdefault("initializer_cfg", {"initializer_range": 1.0})  # O(1) logits: tolerances bite
    return LRNNLMHeadModel(d_model=d_model, d_state=4, n_layer=len(types), vocab_size=vocab_size,
                           mixer_types=list(types), dtype=dtype, **kwargs).eval()


def check_step_equals_forward(model, ids, prefill: int, atol: float = 1e-6) -> None:
    B, T = ids.shape
    full = model(ids).logits
    caches = model.allocate_inference_cache(B, T)
    outs = [model(ids[:, :prefill], inference_params=caches).logits] if prefill else []
    for t in range(prefill, T):
        outs.append(model.step(ids[:, t : t + 1], caches).logits)
    assert_close(torch.cat(outs, 1), full, atol=atol, msg=f"prefill({prefill}) + steps != forward")
    assert caches.seqlen_offset.tolist() == [T] * B


def check_chunked(model, ids, split: int, atol: float = 1e-6) -> None:
    B, T = ids.shape
    full = model(ids).logits
    caches = model.allocate_inference_cache(B, T)
    a = model(ids[:, :split], inference_params=caches).logits
    b = model(ids[:, split:], inference_params=caches).logits
    assert_close(torch.cat((a, b), 1), full, atol=atol, msg=f"prefill + continuation at {split} != one pass")


def check_causal(model, ids, t: int) -> None:
    full = model(ids).logits
    changed = ids.clone()
    changed[:, t + 1 :] = (changed[:, t + 1 :] + 1 + torch.arange(ids.shape[1] - t - 1)) % model.vocab_size
    other = model(changed).logits
    # 1e-9, not 0: FFT-convolution mixers (S4, Centaurus) mix positions at rounding level.
    assert_close(other[:, : t + 1], full[:, : t + 1], atol=1e-9, msg="earlier logits changed with later tokens")
    assert not torch.equal(other[:, t + 1 :], full[:, t + 1 :])


# ----------------------------------------------------------------------------- every mixer type


@pytest.mark.parametrize("mixer_type", ALL_TYPES)
def test_two_layer_model_of_each_mixer(mixer_type):
    model = tiny_lm([mixer_type, mixer_type])
    ids = torch.randint(0, 37, (2, 9))
    out = model(ids)
    assert out.logits.shape == (2, 9, 37) and out.logits.dtype == torch.float64
    assert model(ids, num_last_tokens=3).logits.shape == (2, 3, 37)
    assert_close(model(ids, num_last_tokens=3).logits, out.logits[:, -3:], atol=1e-12)
    check_step_equals_forward(model, ids, prefill=4, atol=1e-5)
    check_chunked(model, ids, split=5, atol=1e-5)
    check_causal(model, ids, t=4)


def hybrid_types() -> list[str]:
    return [t for t in ("S5", "Mamba", "attn", "LRU") if t in MIXERS] + ["sbtest_decay", "sbtest_attn"]


@pytest.mark.parametrize("types", [REAL_TYPES + list(STAND_INS), hybrid_types()], ids=["all-registered", "seed"])
def test_hybrid_model(types):
    model = tiny_lm(types, d_intermediate=24)
    ids = torch.randint(0, 37, (2, 8))
    assert model(ids).logits.shape == (2, 8, 37)
    check_step_equals_forward(model, ids, prefill=3, atol=1e-5)
    check_chunked(model, ids, split=6, atol=1e-5)
    check_causal(model, ids, t=2)


@pytest.mark.skipif(not registered(*SEED_HYBRID), reason="needs S5, Mamba, attn and LRU registered")
def test_seed_hybrid_exactly():
    model = tiny_lm(SEED_HYBRID)
    ids = torch.randint(0, 37, (2, 8))
    check_step_equals_forward(model, ids, prefill=3, atol=1e-5)
    check_causal(model, ids, t=3)


# ----------------------------------------------------------------------------- seed 002 examples


@pytest.mark.skipif(not registered("S5", "Mamba", "attn"), reason="the seed's examples use S5, Mamba and attn")
def test_seed_002_examples(tmp_path):
    # Basic Language Model (d_model 512 -> 64, d_state 64 -> 16, d_intermediate 2048 -> 256 for CPU time)
    model = LRNNLMHeadModel(
        d_model=64,
        d_state=16,
        n_layer=4,
        vocab_size=50257,  # GPT-2 vocabulary
        mixer_types=["S5", "S5", "Mamba", "Mamba"],
        d_intermediate=256,
        rms_norm=True,
        tie_embeddings=True,
    )
    input_ids = torch.randint(0, 50257, (2, 128))
    output = model(input_ids)
    logits = output.logits
    assert logits.shape == (2, 128, 50257)

    # Hybrid Architecture with Attention (d_model 768 -> 96, 12 heads of 8)
    model = LRNNLMHeadModel(
        d_model=96,
        d_state=16,
        n_layer=6,
        vocab_size=50257,
        mixer_types=["S5", "S5", "attn", "Mamba", "Mamba", "attn"],
        d_intermediate=384,
        mixer_kwargs={
            "S5": {"dt_min": 0.001},
            "attn": {"num_heads": 12},
        },
    )

    # Autoregressive Generation
    batch_size = 1
    max_seqlen = 512
    caches = model.allocate_inference_cache(
        batch_size=batch_size,
        max_seqlen=max_seqlen,
        dtype=torch.float32,
    )
    input_ids = torch.tensor([[50256]])
    fed = [50256]
    for _ in range(20):
        output = model.step(input_ids, caches)
        next_token = output.logits.argmax(dim=-1)
        input_ids = next_token
        fed.append(int(next_token))
    assert output.logits.shape == (1, 1, 50257)
    # The steps decoded what a full forward over the same tokens predicts.
    full = model(torch.tensor([fed])).logits.argmax(-1)[0, :-1]
    assert full.tolist() == fed[1:]

    # Save and Load (device cuda -> cpu on this machine; the GPU test loads onto cuda)
    model.save_pretrained(tmp_path / "my_lrnn_lm")
    loaded_model = LRNNLMHeadModel.from_pretrained(tmp_path / "my_lrnn_lm", device=torch.device("cpu"))
    ids = torch.tensor([fed])
    assert torch.equal(loaded_model(ids).logits, model.eval()(ids).logits)


def test_seed_002_calls_with_stand_ins(tmp_path):
    """The seed's calls, in order, on stand-in mixers (runs whatever is registered)."""
    model = LRNNLMHeadModel(d_model=32, d_state=8, n_layer=4, vocab_size=50257,
                            mixer_types=["sbtest_decay", "sbtest_decay", "sbtest_attn", "sbtest_attn"],
                            d_intermediate=64, mixer_kwargs={"sbtest_attn": {"num_heads": 4}},
                            rms_norm=True, tie_embeddings=True)
    assert model(torch.randint(0, 50257, (2, 16))).logits.shape == (2, 16, 50257)
    caches = model.allocate_inference_cache(batch_size=1, max_seqlen=512, dtype=torch.float32)
    input_ids = torch.tensor([[50256]])
    for _ in range(5):
        output = model.step(input_ids, caches)
        input_ids = output.logits.argmax(dim=-1)
    assert output.logits.shape == (1, 1, 50257)
    model.save_pretrained(tmp_path / "m")
    loaded = LRNNLMHeadModel.from_pretrained(tmp_path / "m", device=torch.device("cpu"))
    assert loaded.config == model.config and loaded.config.layers[2].mixer_config.num_heads == 4


# ----------------------------------------------------------------------------- construction


def test_signature_defaults_match_seed():
    import inspect

    params = inspect.signature(LRNNLMHeadModel.__init__).parameters
    expected = {"d_intermediate": 0, "mixer_kwargs": None, "mlp_cls": None, "norm_epsilon": 1e-5, "rms_norm": True,
                "fused_add_norm": True, "residual_in_fp32": False, "tie_embeddings": True,
                "pad_vocab_size_multiple": 8, "initializer_cfg": None, "device": None, "dtype": None}
    assert list(params)[1:6] == ["d_model", "d_state", "n_layer", "vocab_size", "mixer_types"]
    assert {k: params[k].default for k in expected} == expected


def test_vocab_padding_and_tied_embeddings():
    model = tiny_lm(["sbtest_decay"], vocab_size=50)
    assert model.embedding.weight.shape == (56, 16)
    assert model.lm_head.weight is model.embedding.weight
    assert model(torch.randint(0, 50, (1, 4))).logits.shape == (1, 4, 50)
    untied = tiny_lm(["sbtest_decay"], vocab_size=50, tie_embeddings=False, pad_vocab_size_multiple=1)
    assert untied.embedding.weight.shape == (50, 16) and untied.lm_head.weight is not untied.embedding.weight


def test_mixer_kwargs_forms():
    types = ["SBTEST_DECAY", "sbtest_attn"]
    assert resolve_mixer_kwargs(types, {"sbtest_decay": {"d_state": 3}, "SBTEST_ATTN": {"num_heads": 2}}) == [
        {"d_state": 3}, {"num_heads": 2}]
    # One dict for all: each mixer takes the keys its constructor names.
    assert resolve_mixer_kwargs(types, {"num_heads": 2, "d_state": 5}) == [{"d_state": 5}, {"num_heads": 2}]
    with pytest.raises(ValueError, match="accepted by none"):
        resolve_mixer_kwargs(types, {"num_hedas": 2})
    with pytest.raises(ValueError, match="mixes per-type"):
        resolve_mixer_kwargs(types, {"sbtest_attn": {"num_heads": 2}, "d_state": 3})
    model = tiny_lm(types, mixer_kwargs={"sbtest_attn": {"num_heads": 2}})
    assert model.layers[1].mixer.num_heads == 2 and model.layers[0].mixer.d_state == 4


def test_alias_key_serves_its_class():
    with MIXERS.scoped():
        MIXERS.register("sbtest_attn_alias", TinyAttention)
        out = resolve_mixer_kwargs(["sbtest_attn_alias"], {"sbtest_attn": {"num_heads": 4}})
    assert out == [{"num_heads": 4}]


def test_default_num_heads_and_causality_enforced():
    assert default_num_heads(16) == 1 and default_num_heads(256) == 4 and default_num_heads(96) == 1
    assert default_num_heads(768) == 12 and default_num_heads(200) == 2
    model = tiny_lm(["sbtest_attn"], d_model=128)
    assert model.layers[0].mixer.num_heads == 2
    with pytest.raises(ValueError, match="causal"):
        tiny_lm(["sbtest_attn"], mixer_kwargs={"sbtest_attn": {"causal": False, "num_heads": 1}})


def test_construction_errors():
    with pytest.raises(ValueError, match="unknown mixer 'nope'.*registered"):
        tiny_lm(["nope"])
    with pytest.raises(ValueError, match="n_layer=3"):
        LRNNLMHeadModel(16, 4, 3, 10, ["sbtest_decay"])
    with pytest.raises(ValueError, match="d_model"):
        LRNNLMHeadModel(0, 4, 1, 10, ["sbtest_decay"])
    with pytest.raises(ValueError, match="InitConfig.*init_range"):
        tiny_lm(["sbtest_decay"], initializer_cfg={"init_range": 0.1})
    with pytest.raises(ValueError, match=r"unknown keys \['bogus'\].*accepted keys"):
        tiny_lm(["sbtest_decay"], mixer_kwargs={"sbtest_decay": {"bogus": 1}})


def test_initializer_applied_once():
    def build(rescale):
        torch.manual_seed(0)
        return tiny_lm(["sbtest_decay"] * 3, d_intermediate=32, dtype=torch.float32,
                       initializer_cfg={"rescale_prenorm_residual": rescale, "initializer_range": 0.05})

    plain, scaled = build(False), build(True)
    factor = 1 / math.sqrt(2 * 3)  # two residual branches per layer (mixer, MLP), three layers
    for a, b in zip(plain.layers, scaled.layers):
        torch.testing.assert_close(b.mixer.out_proj.weight, a.mixer.out_proj.weight * factor)
        torch.testing.assert_close(b.mlp.fc2.weight, a.mlp.fc2.weight * factor)
        torch.testing.assert_close(b.mixer.in_proj.weight, a.mixer.in_proj.weight)
    assert abs(float(scaled.embedding.weight.detach().std()) - 0.05) < 0.01


def test_fused_and_unfused_add_norm_agree():
    torch.manual_seed(1)
    fused = tiny_lm(["sbtest_decay", "sbtest_attn"], d_intermediate=32, rms_norm=False)
    unfused = tiny_lm(["sbtest_decay", "sbtest_attn"], d_intermediate=32, rms_norm=False, fused_add_norm=False)
    unfused.load_state_dict(fused.state_dict())
    ids = torch.randint(0, 37, (2, 7))
    assert_close(unfused(ids).logits, fused(ids).logits, atol=1e-10)


def test_bf16_with_fp32_residual():
    model = tiny_lm(["sbtest_decay", "sbtest_attn"], dtype=torch.bfloat16, residual_in_fp32=True, d_intermediate=32)
    ids = torch.randint(0, 37, (2, 6))
    logits = model(ids).logits
    assert logits.dtype == torch.bfloat16 and torch.isfinite(logits.float()).all()
    caches = model.allocate_inference_cache(2, 8)
    model(ids, inference_params=caches)
    assert model.step(ids[:, :1], caches).logits.shape == (2, 1, 37)


# ----------------------------------------------------------------------------- optional inputs


def test_inputs_reach_only_mixers_that_take_them():
    model = tiny_lm(["sbtest_decay", "sbtest_attn"])
    ids = torch.randint(0, 37, (2, 6))
    ts = torch.rand(2, 6, dtype=torch.float64) + 0.5
    with_ts = model(ids, integration_timesteps=ts).logits  # TinyAttention takes no timesteps: not given any
    assert not torch.allclose(with_ts, model(ids).logits)
    caches = model.allocate_inference_cache(2, 6)
    head = model(ids[:, :4], inference_params=caches, integration_timesteps=ts[:, :4]).logits
    tail = [model.step(ids[:, t : t + 1], caches, integration_timesteps=ts[:, t]).logits for t in (4, 5)]
    assert_close(torch.cat([head, *tail], 1), with_ts, atol=1e-10)
    with pytest.raises(TypeError, match="declared by no mixer"):
        model(ids, temperature=3)


def test_lengths_routing_and_padded_prefill():
    model = tiny_lm(["sbtest_decay", "sbtest_decay"])
    ids = torch.randint(0, 37, (2, 7))
    lengths = torch.tensor([7, 4])
    caches = model.allocate_inference_cache(2, 8)
    out = model(ids, inference_params=caches, lengths=lengths).logits
    assert caches.seqlen_offset.tolist() == [7, 4]
    alone = model(ids[1:, :4]).logits
    assert_close(out[1:, :4], alone, atol=1e-10)
    nxt = torch.randint(0, 37, (2, 1))
    stepped = model.step(nxt, caches).logits
    assert_close(stepped[1:], model(torch.cat((ids[1:, :4], nxt[1:]), 1)).logits[:, -1:], atol=1e-10)
    mixed = tiny_lm(["sbtest_decay", "sbtest_attn"])
    with pytest.raises(ValueError, match="TinyAttention"):
        mixed(ids, inference_params=mixed.allocate_inference_cache(2, 8), lengths=lengths)


def test_input_errors():
    model = tiny_lm(["sbtest_decay"])
    with pytest.raises(ValueError, match=r"\[0, 37\)"):
        model(torch.tensor([[0, 37]]))
    with pytest.raises(TypeError, match="integer"):
        model(torch.zeros(1, 3))
    with pytest.raises(ValueError, match=r"\[B, T\]"):
        model(torch.zeros(3, dtype=torch.long))
    with pytest.raises(ValueError, match="lengths must lie"):
        model(torch.zeros(2, 3, dtype=torch.long), lengths=torch.tensor([-1, 3]))
    with pytest.raises(TypeError, match="int32 or int64"):
        model(torch.zeros(2, 3, dtype=torch.long), lengths=torch.tensor([True, True]))
    with pytest.raises(ValueError, match="integration_timesteps"):
        model(torch.zeros(2, 3, dtype=torch.long), integration_timesteps=torch.ones(2, 4))
    caches = model.allocate_inference_cache(1, 4)
    with pytest.raises(ValueError, match="max_seqlen=4"):
        model(torch.zeros(1, 5, dtype=torch.long), inference_params=caches)
    with pytest.raises(ValueError, match="batch size 1"):
        model(torch.zeros(2, 2, dtype=torch.long), inference_params=caches)
    with pytest.raises(ValueError, match=r"\[B, 1\]"):
        model.step(torch.zeros(1, 2, dtype=torch.long), caches)


# ----------------------------------------------------------------------------- LanguageModel (seed 001)


def pattern_lm(pattern, position="rope", dtype=torch.float64, **kwargs) -> LanguageModel:
    config = LanguageModelConfig.from_pattern(pattern, vocab_size=29, d_model=16, position=position,
                                              initializer_range=1.0, **kwargs)
    return LanguageModel(config, dtype=dtype).eval()


@pytest.mark.parametrize("position", ["none", "sinusoidal", "learned"])
def test_language_model_from_block_configs(position):
    model = pattern_lm(["sbtest_decay", "sbtest_attn"], position=position, max_seq_len=64)
    ids = torch.randint(0, 29, (2, 9))
    assert model(ids).logits.shape == (2, 9, 29)
    assert (model.position is None) == (position == "none")
    check_step_equals_forward(model, ids, prefill=4, atol=1e-8)
    check_chunked(model, ids, split=3, atol=1e-8)
    check_causal(model, ids, t=5)


@pytest.mark.parametrize("mixer_type", ALL_TYPES)
def test_language_model_each_mixer(mixer_type):
    kw = TEST_MIXER_KWARGS.get(mixer_type, {})
    config = LanguageModelConfig.from_pattern([mixer_type, mixer_type], vocab_size=29, d_model=16, n_heads=2,
                                              position="sinusoidal", mixer_kwargs=kw, d_state=4,
                                              initializer_range=1.0)
    model = LanguageModel(config, dtype=torch.float64).eval()
    ids = torch.randint(0, 29, (2, 8))
    check_step_equals_forward(model, ids, prefill=3, atol=1e-5)
    check_causal(model, ids, t=3)


def test_learned_positions_bounded():
    model = pattern_lm(["sbtest_decay"], position="learned", max_seq_len=8)
    caches = model.allocate_inference_cache(1, 16)
    model(torch.zeros(1, 6, dtype=torch.long), inference_params=caches)
    with pytest.raises(ValueError, match="learned position"):
        model(torch.zeros(1, 3, dtype=torch.long), inference_params=caches)


@pytest.mark.skipif(not registered("mha", "gqa"), reason="the presets need the mha and gqa attention mixers")
@pytest.mark.parametrize("preset", ["tiny_llama", "tiny_gpt2"])
def test_presets(preset):
    config = getattr(LanguageModelConfig, preset)(vocab_size=64, d_model=32, n_layers=2)
    model = LanguageModel(config, dtype=torch.float64).eval()
    ids = torch.randint(0, 64, (2, 10))
    check_step_equals_forward(model, ids, prefill=4, atol=1e-6)
    check_causal(model, ids, t=4)
    assert (model.lm_head.weight is model.embedding.weight) == (preset == "tiny_gpt2")


def test_preset_configs_are_data():
    for config in (LanguageModelConfig.tiny_llama(), LanguageModelConfig.tiny_gpt2(),
                   LanguageModelConfig.from_pattern(["mamba", "mha"])):
        assert LanguageModelConfig.from_json(config.to_json()) == config
    llama = LanguageModelConfig.tiny_llama(n_layers=3)
    assert llama.n_layers == 3 and llama.blocks[0].attention == "gqa" and llama.blocks[0].position == "rope"
    gpt2 = LanguageModelConfig.tiny_gpt2()
    assert gpt2.blocks[0].position == "learned" and gpt2.blocks[0].norm == "layer_norm" and gpt2.tie_embeddings


def test_language_model_config_validation():
    block = BlockConfig(attention="sbtest_decay", d_model=16, n_heads=2)
    with pytest.raises(ValueError, match="one d_model"):
        LanguageModelConfig(vocab_size=10, blocks=(block, block.replace(d_model=32)))
    with pytest.raises(ValueError, match="causal"):
        LanguageModelConfig(vocab_size=10, blocks=(block.replace(causal=False),))
    with pytest.raises(ValueError, match="additive"):
        LanguageModelConfig(vocab_size=10, blocks=(block, block.replace(position="learned")))
    with pytest.raises(ValueError, match="blocks"):
        LanguageModelConfig(vocab_size=10, blocks=())
    with pytest.raises(TypeError):
        LanguageModel({"vocab_size": 10})
    assert LanguageModelConfig(vocab_size=10, blocks=[block]).blocks == (block,)


def test_two_front_doors_one_engine():
    """An LRNNLMHeadModel and a LanguageModel of the same mixers share the cache / step / generate code."""
    lrnn = tiny_lm(["sbtest_decay", "sbtest_attn"])
    lm = pattern_lm(["sbtest_decay", "sbtest_attn"], position="none")
    assert type(lrnn).step is type(lm).step and type(lrnn).forward is type(lm).forward
    for model in (lrnn, lm):
        caches = model.allocate_inference_cache(2, 6)
        assert set(caches) == {0, 1} and caches.seqlen_offset.tolist() == [0, 0]


def test_configs_without_d_state_for_mixers_that_have_none(tmp_path):
    """An attention-only model needs no d_state: a config may leave it out (the CLI's JSON configs too)."""
    from seqblocks.models.model_config import ModelConfig
    from seqblocks.presets import build_model, load_config

    data = {"d_model": 16, "n_layer": 2, "vocab_size": 37, "mixer_types": ["attn", "attn"],
            "mixer_kwargs": {"attn": {"num_heads": 2}}}
    config = ModelConfig.from_data(data)
    assert config.mixer_types == ("attn", "attn")
    (tmp_path / "attn.json").write_text(json.dumps(data))
    model = build_model(load_config(str(tmp_path / "attn.json"))["model"])
    assert model(torch.randint(0, 37, (1, 4))).logits.shape == (1, 4, 37)
    mamba = ModelConfig.from_data({**data, "mixer_types": ["mamba", "attn"], "mixer_kwargs": None})
    assert mamba.layers[0].mixer_config.d_state == 16  # the mixer's own default


def test_padded_head_multiplies_every_row_and_returns_a_view():
    """With a padded vocabulary the head's GEMM runs at the padded width (an aligned output row, so
    cuBLAS keeps its aligned kernels) and the logits are a view of the first vocab_size columns, equal
    to a product with the sliced weight; the GPU presets pad 50,277 tokens to 50,280 rows."""
    from seqblocks.presets import get_preset

    torch.manual_seed(0)
    model = LRNNLMHeadModel(d_model=16, d_state=4, n_layer=1, vocab_size=29, mixer_types=["mamba"],
                            pad_vocab_size_multiple=8)
    hidden = torch.randn(2, 3, 16)
    logits = model.head_logits(hidden)
    assert logits.shape == (2, 3, 29) and logits.stride(1) == 32  # the padded GEMM's row
    torch.testing.assert_close(logits, hidden @ model.lm_head.weight[:29].T)
    cfg = get_preset("mamba-130m")["model"]
    assert cfg["vocab_size"] == 50277 and cfg["pad_vocab_size_multiple"] == 8

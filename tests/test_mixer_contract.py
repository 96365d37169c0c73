"""The mixer contract, run over every registered mixer (read from the registry at collection time,
never a hand-kept list) and over a user's own mixer defined and registered in this file.

Each mixer: full forward == prefill + one step per token; changing a later token never changes an
earlier output; ``lengths`` == each row alone; the cache has the batch it was allocated for; its
config round-trips through JSON exactly and an unknown key is refused naming it. The user mixer goes
through the same checks and then works in ``LRNNLMHeadModel``, ``ConfigurableBlock`` and ``generate``.
"""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch
from torch import nn

from seqblocks import BlockConfig, ConfigurableBlock, LRNNLMHeadModel, Mixer, ModelConfig, generate, mixer_registry
from seqblocks.cache import Cache
from seqblocks.layers.build import build_mixer, mixer_config
from seqblocks.layers.checks import check_cache, check_input
from seqblocks.layers.checks import check_lengths as check_lengths_arg
from seqblocks.registry import MIXERS
from seqblocks.testing import assert_close, check_causality, check_lengths, check_prefill_then_steps

D = 16


@dataclasses.dataclass(eq=False)
class EMACache(Cache):
    state: torch.Tensor = None  # [B, D] fp32


class UserEMA(Mixer):
    """A user's mixer: y_t = out(h_t), h_t = a h_{t-1} + (1 - a) x_t, with lengths support."""

    inputs = frozenset({"lengths"})

    def __init__(self, d_model: int, decay: float = 0.9, device=None, dtype=None) -> None:
        super().__init__()
        if not 0.0 < decay < 1.0:
            raise ValueError(f"UserEMA: decay={decay!r} must lie in (0, 1)")
        self.d_model, self.decay = d_model, decay
        self.out = nn.Linear(d_model, d_model, device=device, dtype=dtype)

    def allocate_inference_cache(self, batch_size, max_seqlen, dtype=None):
        dev = self.out.weight.device
        state = torch.zeros(batch_size, self.d_model, device=dev, dtype=torch.float64)
        return EMACache.empty(batch_size, max_seqlen, device=dev, state=state)

    def forward(self, x, cache=None, *, lengths=None):
        B, T, _ = x.shape
        check_input("UserEMA", x, self.d_model)
        check_lengths_arg("UserEMA", lengths, B, T)
        if cache is not None:
            check_cache("UserEMA", cache, EMACache, B)
        h = cache.state if cache is not None else x.new_zeros(B, self.d_model, dtype=torch.float64)
        valid = torch.ones(B, T, dtype=torch.bool) if lengths is None else torch.arange(T)[None] < lengths[:, None]
        ys = []
        for t in range(T):
            new = self.decay * h + (1 - self.decay) * x[:, t].double()
            h = torch.where(valid[:, t, None], new, h)
            ys.append(h * valid[:, t, None])
        if cache is not None:
            cache.state.copy_(h)
            cache.advance(T if lengths is None else lengths)
        return self.out(torch.stack(ys, 1).to(x.dtype)).masked_fill(~valid[..., None], 0.0)  # padding: 0


@pytest.fixture(scope="module", autouse=True)
def user_mixer():
    with mixer_registry.scoped():
        mixer_registry.register("user_ema", UserEMA)
        yield


def registered() -> list[str]:
    """One name per registered mixer class, plus the user's mixer."""
    return [n for n in MIXERS.primary_names()] + ["user_ema"]


SMALL = {"sliding_window": {"window_size": 4}, "mamba2": {"headdim": 8}, "mamba3": {"headdim": 8},
         "chunked_gqa": {"attention_chunk_size": 4}, "sparse_gqa": {"sparse_select_k": 2}}


def make(name: str) -> nn.Module:
    torch.manual_seed(0)
    cls = MIXERS.get(name)
    if getattr(cls, "causal", True) is False and not hasattr(cls, "config_class"):
        pytest.skip(f"{name} is not a causal mixer")
    config = mixer_config(name, D, d_state=4, kwargs=SMALL.get(name))
    return build_mixer(name, config, layer_idx=0, dtype=torch.float64).eval()


@pytest.mark.parametrize("name", registered())
def test_full_forward_equals_prefill_then_steps(name):
    mixer = make(name)
    x = torch.randn(2, 7, D, dtype=torch.float64)
    check_prefill_then_steps(mixer, x, prefill=3, atol=1e-8, rtol=1e-6)


@pytest.mark.parametrize("name", registered())
def test_causal(name):
    mixer = make(name)
    check_causality(mixer, torch.randn(2, 7, D, dtype=torch.float64), t=4, atol=1e-10)


@pytest.mark.parametrize("name", registered())
def test_lengths_equal_rows_alone(name):
    mixer = make(name)
    if "lengths" not in mixer.inputs:
        pytest.skip(f"{name} declares no lengths input")
    check_lengths(mixer, torch.randn(3, 6, D, dtype=torch.float64), torch.tensor([6, 2, 4]), atol=1e-8)


@pytest.mark.parametrize("name", registered())
def test_cache_shape_and_batch(name):
    mixer = make(name)
    cache = mixer.allocate_inference_cache(3, 9, dtype=torch.float64)
    assert isinstance(cache, Cache) and cache.batch_size == 3 and cache.max_seqlen == 9
    assert cache.seqlen_offset.tolist() == [0, 0, 0]
    for _, t in cache.tensors():
        assert t.shape[0] == 3 or t.dim() == 0 or t is cache.seqlen_offset
    if not mixer.is_identity:
        with pytest.raises((ValueError, TypeError)):
            mixer(torch.randn(2, 1, D, dtype=torch.float64), cache)  # batch 2 into a cache of 3


@pytest.mark.parametrize("name", registered())
def test_config_round_trips_and_refuses_unknown_keys(name):
    config = mixer_config(name, D, d_state=4, kwargs=SMALL.get(name))
    again = type(config).from_json(config.to_json())
    assert again == config and json.loads(again.to_json()) == json.loads(config.to_json())
    with pytest.raises(ValueError, match=r"unknown keys \['dt_mni'\].*accepted keys"):
        mixer_config(name, D, kwargs={"dt_mni": 1e-3})


def test_unknown_key_refused_with_identity_layers_too():
    with pytest.raises(ValueError, match="dt_mni.*accepted by none"):
        LRNNLMHeadModel(16, 4, 2, 10, ["S5", "none"], mixer_kwargs={"dt_mni": 1e-3})
    with pytest.raises(ValueError, match=r"IdentityMixer.*unknown keys \['dt_mni'\]"):
        LRNNLMHeadModel(16, 4, 2, 10, ["S5", "none"], mixer_kwargs={"none": {"dt_mni": 1e-3}})


def test_user_mixer_in_every_front_door(tmp_path):
    model = LRNNLMHeadModel(d_model=D, d_state=4, n_layer=2, vocab_size=20, mixer_types=["user_ema", "attn"],
                            mixer_kwargs={"user_ema": {"decay": 0.5}}, dtype=torch.float64).eval()
    assert isinstance(model.layers[0].mixer, UserEMA) and model.layers[0].mixer.decay == 0.5
    assert ModelConfig.from_json(model.config.to_json()) == model.config
    ids = torch.randint(0, 20, (2, 6))
    full = model(ids).logits
    caches = model.allocate_inference_cache(2, 6)
    steps = [model(ids[:, :2], inference_params=caches).logits]
    steps += [model.step(ids[:, t : t + 1], caches).logits for t in range(2, 6)]
    assert_close(torch.cat(steps, 1), full, atol=1e-8)
    out = generate(model, ids[:, :3], max_new_tokens=4, temperature=0)
    assert out.tokens.shape == (2, 4)  # the new tokens
    model.save_pretrained(tmp_path / "m")
    loaded = LRNNLMHeadModel.from_pretrained(tmp_path / "m")
    assert torch.equal(loaded(ids).logits, full)

    block = ConfigurableBlock(BlockConfig(attention="user_ema", d_model=D, n_heads=2, d_ff=32, position="none",
                                          mixer_kwargs={"decay": 0.25}))
    assert block.attention.decay == 0.25
    x = torch.randn(2, 5, D)
    y, cache = block(x)
    assert y.shape == x.shape and cache is None


# ---- non-finite inputs and padding (seqblocks.layers.finite) ---------------------------------------


def _nan_close(a: torch.Tensor, b: torch.Tensor, atol: float) -> None:
    """Same non-finite pattern, and the other values within atol."""
    assert torch.equal(torch.isfinite(a), torch.isfinite(b))
    fin = torch.isfinite(a)
    assert_close(a[fin], b[fin], atol=atol, rtol=1e-6)


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
@pytest.mark.parametrize("name", registered())
def test_nonfinite_never_reaches_earlier_outputs_or_other_rows(name, bad):
    mixer = make(name)
    x = torch.randn(2, 9, D, dtype=torch.float64)
    clean = mixer(x)
    x_bad = x.clone()
    x_bad[0, 5, 3] = bad
    y = mixer(x_bad)
    assert_close(y[0, :5], clean[0, :5], atol=1e-10)  # never before t
    assert_close(y[1], clean[1], atol=1e-10)  # never another row
    if not mixer.is_identity:
        assert not torch.isfinite(y[0, 5:]).any()  # the row is poisoned from t on (NaN in our mixers)


@pytest.mark.parametrize("name", registered())
def test_nonfinite_decoding_poisons_what_the_full_pass_does(name):
    mixer = make(name)
    if mixer.is_identity:
        pytest.skip("the identity has no cache to poison")
    x = torch.randn(2, 7, D, dtype=torch.float64)
    x[0, 2, 0] = float("nan")  # in the prefill: the cache carries it
    x[1, 5, 1] = float("inf")  # in a decode step
    full = mixer(x)
    cache = mixer.allocate_inference_cache(2, 7, dtype=torch.float64)
    steps = [mixer(x[:, :3], cache)] + [mixer.step(x[:, t : t + 1], cache) for t in range(3, 7)]
    _nan_close(torch.cat(steps, 1), full, atol=1e-8)
    assert torch.isfinite(full[0, :2]).all() and torch.isfinite(full[1, :5]).all()
    window = getattr(mixer, "window_size", None) or 7  # a sliding window forgets a bad token after it
    assert not torch.isfinite(full[0, 2 : 2 + window]).any() and not torch.isfinite(full[1, 5:]).any()
    if window < 5:
        assert torch.isfinite(full[0, 2 + window :]).all()


@pytest.mark.parametrize("name", registered())
def test_padding_is_zero_and_its_nan_never_reaches_valid_outputs(name):
    mixer = make(name)
    if "lengths" not in mixer.inputs or mixer.is_identity:
        pytest.skip(f"{name} takes no lengths (or is the identity, y = x exactly)")
    x = torch.randn(3, 8, D, dtype=torch.float64)
    lengths = torch.tensor([8, 3, 5])
    clean = mixer(x, lengths=lengths)
    x_pad = x.clone()
    x_pad[1, 3:] = float("nan")
    x_pad[2, 6, 2] = float("inf")
    y = mixer(x_pad, lengths=lengths)
    valid = torch.arange(8)[None] < lengths[:, None]
    assert torch.equal(y[~valid], torch.zeros_like(y[~valid]))  # padded outputs are exactly 0
    assert torch.equal(clean[~valid], torch.zeros_like(clean[~valid]))
    assert_close(y[valid], clean[valid], atol=1e-10)

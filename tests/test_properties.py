"""Property-based sweep (hypothesis) of the public surface: the constructors and inputs of every
registered mixer (read from the registry, never a hand-kept list), the blocks, the language models and
``generate``.

Each case draws valid and invalid values - shapes, dtypes, sizes, NaN / inf / negative floats, wrong
cache objects, lists and dicts where tensors go - and accepts exactly two outcomes:

- a correct result: the right shape and dtype, finite for finite inputs (and, for a fresh cache, the
  same numbers as the pass without one);
- a ``ValueError`` / ``TypeError`` raised by seqblocks whose message names the bad argument.

Any other exception (``RuntimeError`` from torch, ``AttributeError``, ``ZeroDivisionError``, ...) fails.

The default run is small (a couple of minutes on two cores). ``pytest -m slow tests/test_properties.py``
runs the same properties with many more examples (``SEQBLOCKS_PROPERTY_EXAMPLES`` sets how many).
"""

from __future__ import annotations

import dataclasses
import functools
import math
import os
import re
from collections.abc import Callable
from typing import Any

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from seqblocks import (
    Block,
    BlockConfig,
    ConfigurableBlock,
    DecoderBlock,
    EncoderBlock,
    LanguageModel,
    LanguageModelConfig,
    LRNNLMHeadModel,
    generate,
)
from seqblocks.layers.build import build_mixer, mixer_config
from seqblocks.registry import MIXERS

D = 16
V = 11  # not a multiple of the vocabulary padding, so the embedding has padded rows
MIXER_NAMES = list(MIXERS.primary_names())
SMALL = {"sliding_window": {"window_size": 4}, "mamba2": {"headdim": 8}, "mamba3": {"headdim": 8},
         "chunked_gqa": {"attention_chunk_size": 4}, "sparse_gqa": {"sparse_select_k": 2}}

CI_EXAMPLES = 25
SLOW_EXAMPLES = int(os.environ.get("SEQBLOCKS_PROPERTY_EXAMPLES", "300"))


def _settings(examples: int) -> settings:
    return settings(max_examples=examples, deadline=None, derandomize=examples == CI_EXAMPLES,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                                           HealthCheck.filter_too_much])


# ------------------------------------------------------------------------------------------- outcomes

def outcome(call: Callable[[], Any], names: list[str]) -> Any:
    """``call()``'s result, or None if it raised ValueError / TypeError naming one of ``names``.

    Any other exception, or a ValueError / TypeError naming none of ``names``, fails the test."""
    try:
        return call()
    except (ValueError, TypeError) as err:
        message = str(err)
        assert any(re.search(rf"(?<![A-Za-z_]){re.escape(n)}(?![A-Za-z_])", message) for n in names), (
            f"{type(err).__name__} names none of {names}: {message}")
        return None


def assert_correct(y: Any, shape: tuple[int, ...], dtype: torch.dtype, finite: bool) -> None:
    assert isinstance(y, torch.Tensor), type(y)
    assert tuple(y.shape) == shape and y.dtype == dtype, (tuple(y.shape), y.dtype, shape, dtype)
    if finite:
        assert torch.isfinite(y.float()).all(), "non-finite output for a finite input"


# ------------------------------------------------------------------------------------------ strategies

INT_VALUES = st.sampled_from([-3, -1, 0, 1, 2, 3, 4, 8, True, 2.5])
FLOAT_VALUES = st.sampled_from([math.nan, math.inf, -math.inf, -1.0, 0.0, 1e-6, 1e-3, 0.05, 0.5, 0.9, 1.0, 2.0,
                                50.0, True, "0.1"])


def numeric_fields(config_cls: type) -> dict[str, str]:
    """The config's int / float fields: name -> "int" | "float" (from the default, else the annotation)."""
    out = {}
    for f in dataclasses.fields(config_cls):
        default = f.default
        kind = None
        if isinstance(default, bool):
            continue
        if isinstance(default, int):
            kind = "int"
        elif isinstance(default, float):
            kind = "float"
        else:
            text = str(f.type)
            if "float" in text:
                kind = "float"
            elif "int" in text and "str" not in text:
                kind = "int"
        if kind is not None and f.name not in ("layer_idx",):
            out[f.name] = kind
    return out


@functools.cache
def small_mixer(name: str) -> torch.nn.Module:
    torch.manual_seed(0)
    return build_mixer(name, mixer_config(name, D, d_state=4, kwargs=SMALL.get(name)), layer_idx=0).eval()


# -------------------------------------------------------------------------------------- mixer: values

def _mixer_constructor(name: str, data: st.DataObject) -> None:
    base = mixer_config(name, D, d_state=4, kwargs=SMALL.get(name))
    fields = numeric_fields(type(base))
    assert fields or name in ("none", "identity"), f"{name}: no numeric constructor values found"
    if not fields:
        return
    picked = data.draw(st.lists(st.sampled_from(sorted(fields)), min_size=1, max_size=2, unique=True), "fields")
    changes = {f: data.draw(INT_VALUES if fields[f] == "int" else FLOAT_VALUES, f) for f in picked}
    kwargs = {**SMALL.get(name, {}), **changes}

    def build() -> torch.nn.Module:
        config = mixer_config(name, D, d_state=4, kwargs=kwargs)
        return build_mixer(name, config, layer_idx=0).eval()

    mixer = outcome(build, list(changes) + ["n_heads", "head_dim", "n_kv_heads"])
    if mixer is None:
        return
    for f, v in changes.items():  # accepted values are usable ones: finite numbers, positive sizes
        assert not isinstance(v, str), f"{name}: {f}={v!r} (a string) was accepted"
        if isinstance(v, float):
            assert math.isfinite(v), f"{name}: {f}={v} was accepted"
    x = torch.randn(2, 5, D)
    with torch.no_grad():
        y = mixer(x)
    assert_correct(y, (2, 5, D), x.dtype, finite=True)


@pytest.mark.parametrize("name", MIXER_NAMES)
@_settings(CI_EXAMPLES)
@given(data=st.data())
def test_mixer_constructor_values(name, data):
    _mixer_constructor(name, data)


# -------------------------------------------------------------------------------------- mixer: inputs

X_KINDS = ["ok", "ok", "ok", "bf16", "f64", "int", "list", "none", "2d", "width", "nan"]
CACHE_KINDS = ["none", "none", "fresh", "wrong_batch", "list", "dict", "other"]
LENGTH_KINDS = ["none", "ok", "bool", "float", "too_long", "negative", "shape", "list"]


def _make_x(kind: str, B: int, T: int) -> Any:
    if kind == "bf16":
        return torch.randn(B, T, D).bfloat16()
    if kind == "f64":
        return torch.randn(B, T, D, dtype=torch.float64)
    if kind == "int":
        return torch.randint(0, 3, (B, T, D))
    if kind == "list":
        return torch.randn(B, T, D).tolist()
    if kind == "none":
        return None
    if kind == "2d":
        return torch.randn(T, D)
    if kind == "width":
        return torch.randn(B, T, D + 1)
    x = torch.randn(B, T, D)
    if kind == "nan" and x.numel():
        x[0, 0, 0] = math.nan
    return x


def _make_lengths(kind: str, B: int, T: int) -> Any:
    if kind == "none":
        return None
    if kind == "ok":
        return torch.randint(0, T + 1, (B,))
    if kind == "bool":
        return torch.ones(B, dtype=torch.bool)
    if kind == "float":
        return torch.full((B,), float(T))
    if kind == "too_long":
        return torch.full((B,), T + 1)
    if kind == "negative":
        return torch.full((B,), -1)
    if kind == "shape":
        return torch.full((B + 1,), T)
    return [T] * B


def _mixer_inputs(name: str, data: st.DataObject) -> None:
    mixer = small_mixer(name)
    B = data.draw(st.integers(0, 3), "B")
    T = data.draw(st.integers(0, 5), "T")
    x_kind = data.draw(st.sampled_from(X_KINDS), "x")
    cache_kind = data.draw(st.sampled_from(CACHE_KINDS), "cache")
    length_kind = data.draw(st.sampled_from(LENGTH_KINDS), "lengths") if "lengths" in mixer.inputs else "none"
    x = _make_x(x_kind, B, T)
    lengths = _make_lengths(length_kind, B, T)
    bad = ["x"]
    cache = None
    if cache_kind != "none":
        if not mixer.causal:
            return
        if cache_kind in ("fresh", "wrong_batch"):
            cache = outcome(lambda: mixer.allocate_inference_cache(B + (cache_kind == "wrong_batch"), 8),
                            ["batch_size"])
            if cache is None:
                assert B + (cache_kind == "wrong_batch") == 0, "a valid cache was refused"
                return
        elif cache_kind == "other":
            other = small_mixer("none" if name != "none" else "mha")
            cache = other.allocate_inference_cache(max(B, 1), 8) if other.causal else None
        else:
            cache = [] if cache_kind == "list" else {}
        bad.append("cache")
    if length_kind != "none":
        bad.append("lengths")
    args = (x,) if cache is None else (x, cache)
    kwargs = {"lengths": lengths} if lengths is not None else {}
    with torch.no_grad():
        y = outcome(lambda: mixer(*args, **kwargs), bad + ["batch", "batch_size", "seqlen_offset", "max_seqlen"])
    valid_x = x_kind in ("ok", "bf16", "f64", "nan")
    valid_cache = cache_kind == "none" or (B > 0 and (cache_kind == "fresh" or
                                                     (cache_kind == "other" and mixer.is_identity)))
    valid_lengths = length_kind in ("none", "ok") or (B == 0 and length_kind in ("too_long", "negative"))
    if y is None:
        assert not (valid_x and valid_cache and valid_lengths and x_kind != "nan"), (
            f"{name}: a valid call was refused (x={x_kind}, cache={cache_kind}, lengths={length_kind})")
        return
    assert valid_x and valid_lengths, f"{name}: invalid input accepted (x={x_kind}, lengths={length_kind})"
    assert valid_cache or mixer.is_identity, f"{name}: invalid cache accepted ({cache_kind})"
    assert_correct(y, (B, T, D), x.dtype, finite=x_kind != "nan")
    if cache_kind == "fresh" and x_kind == "ok" and B * T > 0 and not mixer.is_identity:
        with torch.no_grad():
            full = mixer(x, **kwargs)
        torch.testing.assert_close(y, full, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("name", MIXER_NAMES)
@_settings(CI_EXAMPLES)
@given(data=st.data())
def test_mixer_inputs(name, data):
    _mixer_inputs(name, data)


@pytest.mark.parametrize("name", MIXER_NAMES)
def test_integer_cache_refused(name):
    """An int64 cache used to truncate keys and values (decode differed from forward by 0.79)."""
    mixer = small_mixer(name)
    if not mixer.causal:
        pytest.skip(f"{name} is not causal")
    with pytest.raises(TypeError, match="cache dtype"):
        mixer.allocate_inference_cache(2, 8, dtype=torch.int64)
    for size in (0, -1):
        with pytest.raises(ValueError, match="batch_size"):
            mixer.allocate_inference_cache(size, 8)
        with pytest.raises(ValueError, match="max_seqlen"):
            mixer.allocate_inference_cache(2, size)


@pytest.mark.parametrize("name", MIXER_NAMES)
@pytest.mark.parametrize("shape", [(0, 5, D), (2, 0, D)])
def test_empty_batch_and_sequence_give_empty_result(name, shape):
    mixer = small_mixer(name)
    y = mixer(torch.randn(shape))
    assert y.shape == shape and y.dtype == torch.float32
    if mixer.causal and shape[0] > 0:
        cache = mixer.allocate_inference_cache(shape[0], 8)
        before = [t.clone() for _, t in cache.tensors()]
        assert mixer(torch.randn(shape), cache).shape == shape
        assert all(torch.equal(a, b) for a, (_, b) in zip(before, cache.tensors()))


@pytest.mark.parametrize("name", MIXER_NAMES)
def test_bf16_input_to_fp32_mixer_computes_in_fp32(name):
    mixer = small_mixer(name)
    x = torch.randn(2, 5, D)
    with torch.no_grad():
        y = mixer(x.bfloat16())
        ref = mixer(x.bfloat16().float())
    assert y.dtype == torch.bfloat16
    torch.testing.assert_close(y.float(), ref, atol=2e-2, rtol=2e-2)


# --------------------------------------------------------------------------------------------- models

def _lm(types: tuple[str, ...]) -> LRNNLMHeadModel:
    torch.manual_seed(0)
    kwargs = {n: SMALL[n] for n in types if n in SMALL}
    return LRNNLMHeadModel(D, 4, len(types), V, list(types), mixer_kwargs=kwargs).eval()


@functools.cache
def cached_lm(types: tuple[str, ...]) -> LRNNLMHeadModel:
    return _lm(types)


@functools.cache
def config_lm() -> LanguageModel:
    torch.manual_seed(0)
    layers = (BlockConfig(attention="mha", d_model=D, n_heads=2, d_ff=32),
              BlockConfig(attention="s5", d_model=D, n_heads=2, d_ff=32, d_state=4))
    return LanguageModel(LanguageModelConfig(vocab_size=V, blocks=layers)).eval()


CAUSAL = [n for n in MIXER_NAMES if getattr(small_mixer(n), "causal", True)]
IDS_KINDS = ["ok", "ok", "ok", "vocab", "padded", "negative", "float", "bool", "empty", "list", "3d"]
STEP_CACHE_KINDS = ["ok", "ok", "none", "dict", "list", "wrong_batch", "int"]


def _make_ids(kind: str, B: int, T: int, padded: int) -> Any:
    ids = torch.randint(0, V, (B, T))
    if kind == "vocab":
        ids[0, -1] = V
    elif kind == "padded":
        ids[0, 0] = max(padded - 1, V)  # a padded embedding row (or the first id past V without padding)
    elif kind == "negative":
        ids[-1, 0] = -1
    elif kind == "float":
        ids = ids.float()
    elif kind == "bool":
        ids = ids > 3
    elif kind == "empty":
        ids = ids[:, :0]
    elif kind == "list":
        ids = ids.tolist()
    elif kind == "3d":
        ids = ids[..., None]
    return ids


def _model_inputs(data: st.DataObject) -> None:
    if data.draw(st.booleans(), "config_lm"):
        model = config_lm()
    else:
        types = tuple(data.draw(st.lists(st.sampled_from(CAUSAL), min_size=1, max_size=2), "mixers"))
        model = cached_lm(types)
    B, T = data.draw(st.integers(1, 3), "B"), data.draw(st.integers(1, 4), "T")
    ids_kind = data.draw(st.sampled_from(IDS_KINDS), "input_ids")
    ids = _make_ids(ids_kind, B, T, model.padded_vocab_size)
    with torch.no_grad():
        out = outcome(lambda: model(ids), ["input_ids", "token ids"])
    if ids_kind != "ok":
        assert out is None, f"invalid input_ids ({ids_kind}) accepted"
        return
    assert out is not None, "valid input_ids refused"
    assert_correct(out.logits, (B, T, V), torch.float32, finite=True)

    step_kind = data.draw(st.sampled_from(STEP_CACHE_KINDS), "caches")
    step_ids_kind = data.draw(st.sampled_from(["ok", "ok", "vocab", "padded", "negative", "float"]), "step_ids")
    if step_kind == "int":
        assert outcome(lambda: model.allocate_inference_cache(B, T + 1, dtype=torch.int32), ["dtype"]) is None
        return
    caches = model.allocate_inference_cache(B + (step_kind == "wrong_batch"), T + 1)
    with torch.no_grad():
        if step_kind != "wrong_batch":
            model(ids, inference_params=caches)
        given_caches = {"none": None, "dict": {}, "list": [caches]}.get(step_kind, caches)
        step_ids = _make_ids(step_ids_kind, B, 1, model.padded_vocab_size)
        logits = outcome(lambda: model.step(step_ids, given_caches), ["caches", "input_ids", "token ids"])
    if step_kind != "ok" or step_ids_kind != "ok":
        assert logits is None, f"step accepted caches={step_kind}, ids={step_ids_kind}"
        return
    assert logits is not None
    assert_correct(logits.logits, (B, 1, V), torch.float32, finite=True)
    with torch.no_grad():
        full = model(torch.cat([ids, step_ids], 1)).logits[:, -1:]
    torch.testing.assert_close(logits.logits, full, atol=1e-4, rtol=1e-4)


@_settings(CI_EXAMPLES * 4)
@given(data=st.data())
def test_model_inputs(data):
    _model_inputs(data)


def test_step_token_ids_checked_against_vocab_not_padded_rows():
    model = cached_lm(("mha",))
    assert model.padded_vocab_size > V
    caches = model.allocate_inference_cache(1, 4)
    for bad in (V, model.padded_vocab_size - 1, -1):
        with pytest.raises(ValueError, match=r"token ids must lie in \[0, 11\)"):
            model.step(torch.tensor([[bad]]), caches)
    with pytest.raises(TypeError, match="caches"):
        model.step(torch.tensor([[1]]), None)
    with pytest.raises(TypeError, match="cache dtype"):
        model.allocate_inference_cache(1, 4, dtype=torch.int64)


# ------------------------------------------------------------------------------------------ generate

GEN_VALUES: dict[str, list[Any]] = {
    "max_new_tokens": [1, 3, 0, -1, 2.0, True],
    "temperature": [0.0, 0.7, 1.0, math.nan, math.inf, -1.0, "1"],
    "top_k": [None, 1, 3, 0, -2, 2.5],
    "top_p": [None, 0.5, 1.0, 0.0, 1.5, math.nan],
    "min_p": [None, 0.0, 0.1, 1.0, -0.1, math.nan],
    "repetition_penalty": [1.0, 1.3, 0.0, -1.0, math.inf, math.nan],
    "pad_token_id": [0, 5, -1, 1.5],
    "stop_tokens": [None, 3, [1, 2], V, [-1], 2.0, []],
    "max_seqlen": [None, 16, 0, -3, 1],
    "seed": [None, 0, 7, "x"],
}
GEN_VALID: dict[str, Callable[[Any], bool]] = {
    "max_new_tokens": lambda v: v in (1, 3) and v is not True,
    "temperature": lambda v: v in (0.0, 0.7, 1.0),
    "top_k": lambda v: v in (None, 1, 3),
    "top_p": lambda v: v in (None, 0.5, 1.0),
    "min_p": lambda v: v in (None, 0.0, 0.1, 1.0),
    "repetition_penalty": lambda v: v in (1.0, 1.3),
    "pad_token_id": lambda v: v in (0, 5),
    "stop_tokens": lambda v: v in (None, 3, [1, 2]),
    "max_seqlen": lambda v: v in (None, 16),
    "seed": lambda v: v in (None, 0, 7),
}


def _generate(data: st.DataObject) -> None:
    model = cached_lm(("s5", "mha"))
    picked = data.draw(st.lists(st.sampled_from(sorted(GEN_VALUES)), min_size=1, max_size=3, unique=True), "args")
    kwargs = {k: data.draw(st.sampled_from(GEN_VALUES[k]), k) for k in picked}
    kwargs.setdefault("max_new_tokens", 3)
    B, T = 2, 3
    prompt = torch.randint(0, V, (B, T))
    out = outcome(lambda: generate(model, prompt, **kwargs), [*kwargs, "needs"])
    valid = all(GEN_VALID[k](v) for k, v in kwargs.items())
    if kwargs.get("max_seqlen") == 1:
        valid = False
    if out is None:
        assert not valid, f"valid generate arguments refused: {kwargs}"
        return
    assert valid, f"invalid generate arguments accepted: {kwargs}"
    N = kwargs["max_new_tokens"]
    assert out.tokens.shape == (B, N) and out.tokens.dtype == torch.long
    assert bool(((out.tokens >= 0) & (out.tokens < V)).all())
    assert out.sequences.shape == (B, T + N)


@_settings(CI_EXAMPLES * 4)
@given(data=st.data())
def test_generate_parameters(data):
    _generate(data)


# ---------------------------------------------------------------------------------------- blocks

BLOCK_VALUES = {"d_model": [16, 0, -4, 15, 2.0], "n_heads": [2, 0, -1, 3], "d_ff": [32, 0, -8],
                "dropout": [0.0, 0.1, -0.1, 1.0, math.nan], "norm_eps": [1e-5, 0.0, -1e-5, math.nan, math.inf]}


def _blocks(data: st.DataObject) -> None:
    kind = data.draw(st.sampled_from(["configurable", "encoder", "decoder", "block"]), "kind")
    picked = data.draw(st.lists(st.sampled_from(sorted(BLOCK_VALUES)), min_size=1, max_size=2, unique=True), "args")
    values = {k: data.draw(st.sampled_from(BLOCK_VALUES[k]), k) for k in picked}
    d = values.get("d_model", D)
    heads, d_ff, dropout = values.get("n_heads", 2), values.get("d_ff", 32), values.get("dropout", 0.0)
    eps = values.get("norm_eps", 1e-5)
    aliases = {"d_model": ["dim", "embed_dim"], "n_heads": ["num_heads"],
               "dropout": ["dropout_rate", "attention_dropout"], "norm_eps": ["eps"]}
    names = list(values) + [alias for k in values for alias in aliases.get(k, [])]

    def build() -> torch.nn.Module:
        if kind == "configurable":
            return ConfigurableBlock(BlockConfig(attention="mha", d_model=d, n_heads=heads, d_ff=d_ff,
                                                 dropout=dropout, norm_eps=eps))
        if kind == "encoder":
            return EncoderBlock(d, heads, d_ff, dropout_rate=dropout, norm_eps=eps)
        if kind == "decoder":
            return DecoderBlock(d, heads, d_ff, dropout_rate=dropout, norm_eps=eps)
        mixer = functools.partial(MIXERS.get("mha"), num_heads=heads, dropout=dropout)
        mlp = functools.partial(torch.nn.Linear, out_features=d)
        norm = functools.partial(torch.nn.LayerNorm, eps=eps)
        return Block(d, mixer, mlp, norm_cls=norm)

    block = outcome(build, names)
    def size(v: Any) -> bool:
        return isinstance(v, int) and not isinstance(v, bool) and v > 0

    valid = (size(d) and size(heads) and size(d_ff) and d % heads == 0 and dropout in (0.0, 0.1)
             and eps == 1e-5)
    if block is None:
        assert not valid, f"valid {kind} block refused: {values}"
        return
    if kind == "block" and eps != 1e-5:
        return  # torch's LayerNorm takes the eps it is given (not seqblocks' to check)
    assert valid or (kind == "block" and d_ff != 32), f"invalid {kind} block accepted: {values}"
    block.eval()
    x = torch.randn(2, 5, d)
    with torch.no_grad():
        if kind == "block":
            y, _ = block(x, None)
        elif kind == "decoder":
            y = block(x, torch.randn(2, 3, d))
        else:
            y = block(x)
        y = y[0] if isinstance(y, tuple) else y
    assert_correct(y, (2, 5, d), torch.float32, finite=True)


@_settings(CI_EXAMPLES * 3)
@given(data=st.data())
def test_block_constructors(data):
    _blocks(data)


# ------------------------------------------------------------------------------------ the long sweep

@pytest.mark.slow
@pytest.mark.parametrize("name", MIXER_NAMES)
@_settings(SLOW_EXAMPLES)
@given(data=st.data())
def test_mixer_sweep_long(name, data):
    _mixer_constructor(name, data)
    _mixer_inputs(name, data)


@pytest.mark.slow
@_settings(SLOW_EXAMPLES)
@given(data=st.data())
def test_model_generate_block_sweep_long(data):
    _model_inputs(data)
    _generate(data)
    _blocks(data)


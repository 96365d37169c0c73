"""Hugging Face interop: for every family, a randomly initialised tiny transformers model (built here,
saved with ``save_pretrained``, no network) loads into seqblocks with the same logits (fp32, max
relative error <= 1e-5) and the same greedy tokens decoded with the cache; ``save_hf`` writes a folder
the transformers class loads back with the same logits; damaged or foreign folders raise clearly."""

from __future__ import annotations

import json

import pytest
import torch

import seqblocks
from seqblocks import LanguageModel, LRNNLMHeadModel, generate
from seqblocks.interop import FAMILIES, detect_family, family_of

transformers = pytest.importorskip("transformers")

V = 96


def hf_class(folder):
    """The transformers class the folder's config names. Not the Auto mapping: importing fla (which other
    test modules do) re-registers the "mamba" / "mamba2" model types there with fla's own classes."""
    return getattr(transformers, json.loads((folder / "config.json").read_text())["architectures"][0])


def _configs():
    T = transformers
    llama3 = {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
              "high_freq_factor": 4.0, "original_max_position_embeddings": 32}
    common = dict(vocab_size=V, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, tie_word_embeddings=False)
    return {
        "mamba": T.MambaConfig(vocab_size=V, hidden_size=32, state_size=8, num_hidden_layers=2, expand=2,
                               conv_kernel=4, time_step_rank=4, tie_word_embeddings=True),
        "mamba2": T.Mamba2Config(vocab_size=V, hidden_size=32, state_size=8, num_hidden_layers=2, head_dim=8,
                                 num_heads=8, n_groups=2, expand=2, chunk_size=16, tie_word_embeddings=False),
        "llama": T.LlamaConfig(**common, rope_parameters=llama3),
        "mistral": T.MistralConfig(**common, sliding_window=5),
        "qwen2": T.Qwen2Config(**common, use_sliding_window=True, sliding_window=5, max_window_layers=1),
        "qwen3": T.Qwen3Config(**common, head_dim=16),
        "recurrent_gemma": T.RecurrentGemmaConfig(vocab_size=V, hidden_size=32, intermediate_size=96,
                                                  num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=1,
                                                  lru_width=32, attention_window_size=6, conv1d_width=4,
                                                  block_types=["recurrent", "attention"]),
        "gpt2": T.GPT2Config(vocab_size=V, n_embd=32, n_layer=2, n_head=4, n_positions=64),
    }


def _hf_model(family: str, seed: int = 0):
    torch.manual_seed(seed)
    config = _configs()[family]
    config._attn_implementation = "eager"
    model = transformers.AutoModelForCausalLM.from_config(config).eval()
    with torch.no_grad():  # move norms, biases and the SSM parameters off their init values so every one matters
        for name, p in model.named_parameters():
            if "norm" in name or "bias" in name or name.endswith(("ln_1.weight", "ln_2.weight", "ln_f.weight",
                                                                   "layernorm.weight", ".D", "recurrent_param")):
                p.add_(0.2 * torch.randn_like(p))
    return model


def _rel(got: torch.Tensor, want: torch.Tensor) -> float:
    return ((got - want).abs().max() / want.abs().max()).item()


def _greedy_reference(hf, prompt: torch.Tensor, n: int) -> torch.Tensor:
    """Greedy tokens from full (uncached) transformers forwards."""
    ids = prompt
    with torch.no_grad():
        for _ in range(n):
            nxt = hf(ids, use_cache=False).logits[:, -1].argmax(-1, keepdim=True)
            ids = torch.cat([ids, nxt], 1)
    return ids[:, prompt.shape[1]:]


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """family -> (transformers model, folder it was saved to)."""
    out = {}
    for family in FAMILIES:
        hf = _hf_model(family)
        folder = tmp_path_factory.mktemp(family)
        hf.save_pretrained(folder)
        out[family] = (hf, folder)
    return out


@pytest.mark.parametrize("family", list(FAMILIES))
def test_import_matches_logits_and_greedy_tokens(saved, family):
    hf, folder = saved[family]
    assert detect_family(json.loads((folder / "config.json").read_text())) == family
    ours = seqblocks.from_hf(folder)
    assert isinstance(ours, LRNNLMHeadModel if family.startswith("mamba") else LanguageModel)
    windows = {"mistral": [5, 5], "qwen2": [None, 5], "recurrent_gemma": [None, 6, None]}.get(family)
    if windows is not None:  # the windows are shorter than the inputs below, so they matter
        assert [b.window_size for b in ours.config.blocks] == windows
    ids = torch.randint(0, V, (2, 21), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        want = hf(ids, use_cache=False).logits
        got = ours(ids).logits
    rel = _rel(got, want)
    assert rel <= 1e-5, f"{family}: max relative logit error {rel:.2e}"
    prompt = ids[:1, :7]
    want_tokens = _greedy_reference(hf, prompt, 8)
    got_tokens = generate(ours, prompt, max_new_tokens=8, temperature=0.0).tokens
    assert torch.equal(got_tokens, want_tokens), (family, got_tokens, want_tokens)


@pytest.mark.parametrize("family", list(FAMILIES))
def test_export_loads_back_into_transformers(saved, family, tmp_path):
    hf, folder = saved[family]
    ours = seqblocks.from_hf(folder)
    assert family_of(ours) == family
    out = ours.save_hf(tmp_path / "out")
    config = json.loads((out / "config.json").read_text())
    assert config["architectures"] == [FAMILIES[family]]
    back = hf_class(out).from_pretrained(out).eval()
    assert type(back).__name__ == FAMILIES[family]
    ids = torch.randint(0, V, (2, 19), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        want = hf(ids, use_cache=False).logits
        got = back(ids, use_cache=False).logits
    assert _rel(got, want) <= 1e-5
    # and a second import of the export is the same seqblocks model
    again = seqblocks.from_hf(out)
    with torch.no_grad():
        torch.testing.assert_close(again(ids).logits, ours(ids).logits, rtol=0, atol=0)


def test_lrnn_from_hf_checks_the_class(saved):
    assert isinstance(LRNNLMHeadModel.from_hf(saved["mamba"][1]), LRNNLMHeadModel)
    assert isinstance(LanguageModel.from_hf(saved["llama"][1]), LanguageModel)
    with pytest.raises(TypeError, match="LanguageModel"):
        LRNNLMHeadModel.from_hf(saved["llama"][1])


def test_overrides_reach_the_config(saved):
    model = seqblocks.from_hf(saved["recurrent_gemma"][1], scale_first_input=True, norm_eps=1e-5)
    assert all(layer.attention.scale_first_input for layer in model.layers if hasattr(layer.attention, "a_param"))
    assert {b.norm_eps for b in model.config.blocks} == {1e-5}
    model = seqblocks.from_hf(saved["mamba2"][1], chunk_size=8, residual_in_fp32=False)
    assert model.mixers()[0].chunk_size == 8 and not model.config.residual_in_fp32
    with pytest.raises(ValueError, match="unknown overrides"):
        seqblocks.from_hf(saved["llama"][1], not_an_option=1)


def test_first_position_rule_is_what_recurrent_gemma_needs(saved):
    """RecurrentGemma's first input enters unscaled: the scaled rule (seqblocks' default) differs there."""
    hf, folder = saved["recurrent_gemma"]
    ids = torch.randint(0, V, (1, 9), generator=torch.Generator().manual_seed(3))
    scaled = seqblocks.from_hf(folder, scale_first_input=True)
    with torch.no_grad():
        assert _rel(scaled(ids).logits, hf(ids, use_cache=False).logits) > 1e-3


def test_bf16_import_runs(saved):
    model = seqblocks.from_hf(saved["qwen3"][1], dtype=torch.bfloat16)
    assert model.embedding.weight.dtype == torch.bfloat16
    ids = torch.randint(0, V, (1, 8))
    hf = saved["qwen3"][0]
    with torch.no_grad():
        got = model(ids).logits.float()
        want = hf(ids, use_cache=False).logits
    assert _rel(got, want) < 5e-2


def test_sharded_and_bin_checkpoints(tmp_path):
    hf = _hf_model("llama")
    ids = torch.randint(0, V, (1, 11))
    with torch.no_grad():
        want = hf(ids, use_cache=False).logits
    sharded = tmp_path / "sharded"
    hf.save_pretrained(sharded, max_shard_size="40KB")
    assert (sharded / "model.safetensors.index.json").is_file()
    with torch.no_grad():
        assert _rel(seqblocks.from_hf(sharded)(ids).logits, want) <= 1e-5
    binary = tmp_path / "bin"
    binary.mkdir()
    (binary / "config.json").write_text((sharded / "config.json").read_text())
    torch.save(hf.state_dict(), binary / "pytorch_model.bin")
    with torch.no_grad():
        assert _rel(seqblocks.from_hf(binary)(ids).logits, want) <= 1e-5


class _Payload:
    def __reduce__(self):
        return (print, ("this must never run",))


def test_bin_with_objects_is_refused_without_running_them(tmp_path, saved, capsys):
    folder = tmp_path / "evil"
    folder.mkdir()
    (folder / "config.json").write_text((saved["gpt2"][1] / "config.json").read_text())
    torch.save({"transformer.wte.weight": torch.zeros(2), "x": _Payload()}, folder / "pytorch_model.bin")
    with pytest.raises(ValueError, match="weights_only=True"):
        seqblocks.from_hf(folder)
    assert "must never run" not in capsys.readouterr().out


def test_corrupted_and_foreign_folders_raise_clearly(tmp_path, saved):
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "config.json").write_text((saved["mistral"][1] / "config.json").read_text())
    (broken / "model.safetensors").write_bytes(b"\x00\x01 not a safetensors file")
    with pytest.raises(ValueError, match="model.safetensors"):
        seqblocks.from_hf(broken)
    foreign = tmp_path / "bert"
    foreign.mkdir()
    (foreign / "config.json").write_text(json.dumps({"architectures": ["BertForMaskedLM"], "model_type": "bert"}))
    with pytest.raises(ValueError, match="BertForMaskedLM.*supported: MambaForCausalLM"):
        seqblocks.from_hf(foreign)
    with pytest.raises(FileNotFoundError, match="config.json"):
        seqblocks.from_hf(tmp_path)
    # weights of another family under a config: named missing tensors
    mixed = tmp_path / "mixed"
    mixed.mkdir()
    (mixed / "config.json").write_text((saved["qwen2"][1] / "config.json").read_text())
    (mixed / "model.safetensors").write_bytes((saved["gpt2"][1] / "model.safetensors").read_bytes())
    with pytest.raises(ValueError, match="lacks the tensor 'model.embed_tokens.weight'"):
        seqblocks.from_hf(mixed)
    # NaN weights are refused unless asked for; mis-shaped ones are named
    from safetensors.torch import load_file, save_file

    state = load_file(str(saved["mistral"][1] / "model.safetensors"))
    nan = dict(state, **{"model.norm.weight": torch.full_like(state["model.norm.weight"], float("nan"))})
    save_file(nan, str(broken / "model.safetensors"))
    with pytest.raises(ValueError, match="model.norm.weight.*NaN"):
        seqblocks.from_hf(broken)
    assert seqblocks.from_hf(broken, allow_non_finite=True).norm_f.weight.isnan().all()
    cut = dict(state, **{"model.norm.weight": state["model.norm.weight"][:7]})
    save_file(cut, str(broken / "model.safetensors"))
    with pytest.raises(ValueError, match=r"mis-shaped \['norm_f.weight: \(7,\) for \(32,\)'\]"):
        seqblocks.from_hf(broken)
    # a truncated sharded checkpoint: the missing shard is named
    hf = saved["llama"][0]
    shards = tmp_path / "shards"
    hf.save_pretrained(shards, max_shard_size="40KB")
    index = json.loads((shards / "model.safetensors.index.json").read_text())
    victim = sorted(set(index["weight_map"].values()))[-1]
    (shards / victim).unlink()
    with pytest.raises(FileNotFoundError, match=victim):
        seqblocks.from_hf(shards)


def test_export_refuses_what_the_family_cannot_express(tmp_path):
    from seqblocks import LanguageModelConfig

    config = LanguageModelConfig.tiny_llama(vocab_size=V, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2,
                                            attn_logit_softcapping=30.0)
    with pytest.raises(ValueError, match="attn_logit_softcapping"):
        LanguageModel(config).save_hf(tmp_path / "a")
    config = LanguageModelConfig.tiny_llama(vocab_size=V, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2,
                                            mtp_n_predict=1)
    with pytest.raises(ValueError, match="mtp_n_predict"):
        LanguageModel(config).save_hf(tmp_path / "b")
    hybrid = LRNNLMHeadModel(32, 8, 2, V, ["mamba", "S5"])
    with pytest.raises(ValueError, match="every layer is Mamba"):
        hybrid.save_hf(tmp_path / "c")


def test_a_model_built_in_seqblocks_exports(tmp_path):
    """Not only imported models: a tiny_llama built here loads into transformers with its logits."""
    from seqblocks import LanguageModelConfig

    torch.manual_seed(0)
    model = LanguageModel(LanguageModelConfig.tiny_llama(vocab_size=V, d_model=32, n_layers=2, n_heads=4,
                                                         n_kv_heads=2, norm_eps=1e-6)).eval()
    out = model.save_hf(tmp_path / "llama")
    back = hf_class(out).from_pretrained(out).eval()
    ids = torch.randint(0, V, (2, 13))
    with torch.no_grad():
        assert _rel(back(ids, use_cache=False).logits, model(ids).logits) <= 1e-5


def test_tokenizer_files_are_loaded_and_copied(tmp_path, saved):
    tokenizers = pytest.importorskip("tokenizers")
    folder = tmp_path / "with_tok"
    folder.mkdir()
    for f in saved["gpt2"][1].iterdir():
        (folder / f.name).write_bytes(f.read_bytes())
    tok = tokenizers.Tokenizer(tokenizers.models.WordLevel({"a": 0, "b": 1, "[UNK]": 2}, unk_token="[UNK]"))
    tok.pre_tokenizer = tokenizers.pre_tokenizers.Whitespace()
    tok.save(str(folder / "tokenizer.json"))
    model = seqblocks.from_hf(folder)
    assert model.tokenizer_path == str(folder)
    assert model.tokenizer.encode("a b").ids == [0, 1]
    out = model.save_hf(tmp_path / "exported")
    assert (out / "tokenizer.json").is_file()


def test_mamba_ssm_hybrid_round_trip(tmp_path):
    """Mamba-2 + attention layers with a gated MLP and a padded vocabulary: written in mamba_ssm's format
    and read back, the same model."""
    torch.manual_seed(0)
    model = LRNNLMHeadModel(32, 8, 3, V - 3, ["mamba2", "attn", "mamba2"], d_intermediate=48,
                            mixer_kwargs={"mamba2": {"headdim": 8, "ngroups": 2, "chunk_size": 8},
                                          "attn": {"num_heads": 4, "num_heads_kv": 2, "rotary_emb_dim": 4}}).eval()
    out = seqblocks.save_mamba_ssm(model, tmp_path / "native")
    config = json.loads((out / "config.json").read_text())
    assert config["ssm_cfg"]["layer"] == "Mamba2" and config["attn_layer_idx"] == [1]
    assert config["attn_cfg"]["causal"] is True and config["attn_cfg"]["num_heads_kv"] == 2
    back = seqblocks.from_hf(out)
    ids = torch.randint(0, V - 3, (2, 13))
    with torch.no_grad():
        torch.testing.assert_close(back(ids).logits, model(ids).logits, rtol=0, atol=0)
    with pytest.raises(ValueError, match="all Mamba or all Mamba-2"):
        seqblocks.save_mamba_ssm(LRNNLMHeadModel(32, 8, 2, V, ["mamba", "mamba2"]), tmp_path / "mixed")

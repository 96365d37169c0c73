"""``seqblocks convert SRC DST``: HF folder -> seqblocks checkpoint -> HF folder, mamba_ssm's format both
ways, tokenizer files carried along, clear errors (exit status 2) for what cannot be converted."""

from __future__ import annotations

import json

import pytest
import torch

import seqblocks
from seqblocks.checkpoint import load_pretrained
from seqblocks.cli import main

transformers = pytest.importorskip("transformers")

V = 80


def _rel(got, want):
    return ((got - want).abs().max() / want.abs().max()).item()


def _hf_llama(tmp_path):
    torch.manual_seed(0)
    config = transformers.Qwen2Config(vocab_size=V, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True)
    hf = transformers.AutoModelForCausalLM.from_config(config).eval()
    with torch.no_grad():
        for name, p in hf.named_parameters():
            if "norm" in name or "bias" in name:
                p.add_(0.2 * torch.randn_like(p))
    folder = tmp_path / "hf"
    hf.save_pretrained(folder)
    (folder / "tokenizer_config.json").write_text(json.dumps({"model_max_length": 64}))
    return hf, folder


def _hf_mamba(tmp_path):
    torch.manual_seed(1)
    config = transformers.MambaConfig(vocab_size=V, hidden_size=32, state_size=8, num_hidden_layers=2,
                                      time_step_rank=4, tie_word_embeddings=True)
    hf = transformers.MambaForCausalLM(config).eval()
    with torch.no_grad():
        for name, p in hf.named_parameters():
            if "norm" in name or name.endswith(".D"):
                p.add_(0.2 * torch.randn_like(p))
    return hf


def test_hf_to_seqblocks_and_back(tmp_path, capsys):
    hf, src = _hf_llama(tmp_path)
    ids = torch.randint(0, V, (2, 15))
    with torch.no_grad():
        want = hf(ids, use_cache=False).logits
    assert main(["convert", str(src), str(tmp_path / "ours")]) == 0
    assert "(hf) ->" in capsys.readouterr().out
    config = json.loads((tmp_path / "ours" / "config.json").read_text())
    assert config["model_type"] == "LanguageModel"
    assert (tmp_path / "ours" / "tokenizer_config.json").is_file()
    ours = load_pretrained(tmp_path / "ours")
    with torch.no_grad():
        assert _rel(ours(ids).logits, want) <= 1e-5
    assert main(["convert", str(tmp_path / "ours"), str(tmp_path / "back")]) == 0
    assert (tmp_path / "back" / "tokenizer_config.json").is_file()
    back = transformers.Qwen2ForCausalLM.from_pretrained(tmp_path / "back").eval()  # not Auto: fla re-registers
    assert type(back).__name__ == "Qwen2ForCausalLM"
    with torch.no_grad():
        assert _rel(back(ids, use_cache=False).logits, want) <= 1e-5


def test_mamba_ssm_format_both_ways(tmp_path):
    """An HF Mamba folder converted to mamba_ssm's format and back gives the same logits; the written
    folder has mamba_ssm's layout (MambaConfig fields, pytorch_model.bin with backbone.* keys)."""
    hf = _hf_mamba(tmp_path)
    hf.save_pretrained(tmp_path / "hf")
    ids = torch.randint(0, V, (2, 17))
    with torch.no_grad():
        want = hf(ids).logits
    assert main(["convert", str(tmp_path / "hf"), str(tmp_path / "native"), "--to", "mamba_ssm"]) == 0
    config = json.loads((tmp_path / "native" / "config.json").read_text())
    assert config["ssm_cfg"]["layer"] == "Mamba1" and config["n_layer"] == 2 and "model_type" not in config
    state = torch.load(tmp_path / "native" / "pytorch_model.bin", weights_only=True)
    assert "backbone.embedding.weight" in state and state["backbone.layers.0.mixer.conv1d.weight"].dim() == 3
    assert main(["convert", str(tmp_path / "native"), str(tmp_path / "ours")]) == 0
    with torch.no_grad():
        assert _rel(load_pretrained(tmp_path / "ours")(ids).logits, want) <= 1e-5


def test_native_mamba_ssm_folder_written_by_hand(tmp_path):
    """A folder in mamba_ssm's layout built from an HF Mamba (whose numerics follow mamba_ssm's), with
    a padded vocabulary and an attention layer's absence spelt out, imports with its logits."""
    hf = _hf_mamba(tmp_path)
    folder = tmp_path / "native"
    folder.mkdir()
    config = {"d_model": 32, "d_intermediate": 0, "n_layer": 2, "vocab_size": V,
              "ssm_cfg": {"d_state": 8, "dt_rank": 4, "use_fast_path": True}, "attn_layer_idx": [], "attn_cfg": {},
              "rms_norm": True, "residual_in_fp32": True, "fused_add_norm": True, "pad_vocab_size_multiple": 32,
              "tie_embeddings": True}
    (folder / "config.json").write_text(json.dumps(config))
    state = {k.replace("backbone.embeddings.", "backbone.embedding."): v for k, v in hf.state_dict().items()}
    pad = torch.zeros(96 - V, 32)
    state["backbone.embedding.weight"] = torch.cat([state["backbone.embedding.weight"], pad])
    state["lm_head.weight"] = state["backbone.embedding.weight"]
    torch.save(state, folder / "pytorch_model.bin")
    model = seqblocks.from_hf(folder)
    assert model.padded_vocab_size == 96
    ids = torch.randint(0, V, (1, 12))
    with torch.no_grad():
        assert _rel(model(ids).logits, hf(ids).logits) <= 1e-5


def test_errors_exit_with_status_2(tmp_path, capsys):
    foreign = tmp_path / "t5"
    foreign.mkdir()
    (foreign / "config.json").write_text(json.dumps({"architectures": ["T5ForConditionalGeneration"]}))
    assert main(["convert", str(foreign), str(tmp_path / "out")]) == 2
    assert "supported: MambaForCausalLM" in capsys.readouterr().err
    _, src = _hf_llama(tmp_path)
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x").write_text("keep me")
    assert main(["convert", str(src), str(tmp_path / "full")]) == 2
    assert "overwrite" in capsys.readouterr().err
    assert main(["convert", str(tmp_path / "missing"), str(tmp_path / "out")]) == 2
    ours = seqblocks.LRNNLMHeadModel(32, 8, 2, V, ["mamba", "S5"])
    ours.save_pretrained(tmp_path / "hybrid")
    assert main(["convert", str(tmp_path / "hybrid"), str(tmp_path / "out2")]) == 2
    assert "every layer is Mamba" in capsys.readouterr().err

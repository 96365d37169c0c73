"""save_pretrained / from_pretrained / push_to_hub: round trips, strictness, clear errors, no pickle."""

from __future__ import annotations

import json

import pytest
import torch
from test_lm import ALL_TYPES, STAND_INS, no_grad, pattern_lm, stand_in_mixers, tiny_lm  # noqa: F401 (fixtures)
from torch import nn

from seqblocks import LanguageModel, LRNNLMHeadModel
from seqblocks.checkpoint import CONFIG_NAME, WEIGHTS_NAME, load_pretrained


class WideMLP(nn.Module):
    """A user MLP class, saved in config.json by import path."""

    def __init__(self, in_features, hidden_features=None, out_features=None, device=None, dtype=None):
        super().__init__()
        self.fc1 = nn.Linear(in_features, hidden_features, device=device, dtype=dtype)
        self.fc2 = nn.Linear(hidden_features, out_features, device=device, dtype=dtype)

    def forward(self, x):
        return self.fc2(torch.tanh(self.fc1(x)))


@pytest.mark.parametrize("mixer_type", ALL_TYPES)
def test_round_trip_each_mixer(mixer_type, tmp_path):
    model = tiny_lm([mixer_type, mixer_type], d_intermediate=24)
    model.save_pretrained(tmp_path)
    loaded = LRNNLMHeadModel.from_pretrained(tmp_path)  # nothing but the path
    ids = torch.randint(0, 37, (2, 6))
    assert torch.equal(loaded(ids).logits, model(ids).logits)
    assert loaded.config == model.config and loaded.embedding.weight.dtype == torch.float64
    assert loaded.lm_head.weight is loaded.embedding.weight


def test_full_config_in_config_json(tmp_path):
    kwargs = {"sbtest_attn": {"num_heads": 2}, "sbtest_decay": {"d_state": 3}}
    model = tiny_lm(["sbtest_decay", "sbtest_attn"], mixer_kwargs=kwargs, d_intermediate=16, rms_norm=False,
                    residual_in_fp32=True, pad_vocab_size_multiple=4, mlp_cls=WideMLP)
    model.save_pretrained(tmp_path)
    config = json.loads((tmp_path / CONFIG_NAME).read_text())
    assert config["mixer_kwargs"] == kwargs and config["model_type"] == "LRNNLMHeadModel"
    assert config["mlp_cls"] == "test_checkpoint:WideMLP" and config["torch_dtype"] == "float64"
    assert config["initializer_cfg"] == {"initializer_range": 1.0}
    loaded = LRNNLMHeadModel.from_pretrained(tmp_path, dtype=torch.float32)
    assert isinstance(loaded.layers[0].mlp, WideMLP) and loaded.layers[1].mixer.num_heads == 2
    assert loaded.embedding.weight.dtype == torch.float32
    ids = torch.randint(0, 37, (2, 5))
    assert_ = torch.testing.assert_close
    assert_(loaded(ids).logits, model(ids).logits.float(), atol=1e-4, rtol=1e-4)


def test_language_model_round_trip_and_dispatch(tmp_path):
    model = pattern_lm(["sbtest_decay", "sbtest_attn"], position="learned", max_seq_len=32, tie_embeddings=False)
    model.save_pretrained(tmp_path)
    loaded = LanguageModel.from_pretrained(tmp_path)
    assert loaded.config == model.config
    ids = torch.randint(0, 29, (1, 7))
    assert torch.equal(loaded(ids).logits, model(ids).logits)
    assert isinstance(load_pretrained(tmp_path), LanguageModel)
    with pytest.raises(ValueError, match="describes a 'LanguageModel'"):
        LRNNLMHeadModel.from_pretrained(tmp_path)


def saved(tmp_path):
    model = tiny_lm(["sbtest_decay", "sbtest_attn"])
    model.save_pretrained(tmp_path)
    return model


def test_corrupted_weights(tmp_path):
    saved(tmp_path)
    weights = tmp_path / WEIGHTS_NAME
    weights.write_bytes(weights.read_bytes()[:100])
    with pytest.raises(ValueError, match="model.safetensors is not a readable safetensors file"):
        LRNNLMHeadModel.from_pretrained(tmp_path)
    weights.write_bytes(b"\x00" * 64)
    with pytest.raises(ValueError, match="corrupted"):
        LRNNLMHeadModel.from_pretrained(tmp_path)


def test_corrupted_or_missing_config(tmp_path):
    saved(tmp_path)
    (tmp_path / CONFIG_NAME).write_text("{not json")
    with pytest.raises(ValueError, match="config.json is not valid JSON"):
        LRNNLMHeadModel.from_pretrained(tmp_path)
    (tmp_path / CONFIG_NAME).unlink()
    with pytest.raises(FileNotFoundError, match="no config.json"):
        LRNNLMHeadModel.from_pretrained(tmp_path)
    with pytest.raises(FileNotFoundError, match="not a checkpoint directory"):
        LRNNLMHeadModel.from_pretrained(tmp_path / "missing")


def edit_config(tmp_path, **changes):
    path = tmp_path / CONFIG_NAME
    config = json.loads(path.read_text())
    config.update(changes)
    path.write_text(json.dumps(config))


def test_mismatched_checkpoints(tmp_path):
    saved(tmp_path)
    edit_config(tmp_path, d_model=32)
    with pytest.raises(ValueError, match="shape mismatches.*embedding.weight"):
        LRNNLMHeadModel.from_pretrained(tmp_path)
    edit_config(tmp_path, d_model=16, d_intermediate=8)
    with pytest.raises(ValueError, match="missing from the checkpoint.*mlp"):
        LRNNLMHeadModel.from_pretrained(tmp_path)
    edit_config(tmp_path, d_intermediate=0, tie_embeddings=False)
    with pytest.raises(ValueError, match=r"missing from the checkpoint: \['lm_head.weight'\]"):
        LRNNLMHeadModel.from_pretrained(tmp_path)
    edit_config(tmp_path, tie_embeddings=True, n_layer=1, mixer_types=["sbtest_decay"])
    with pytest.raises(ValueError, match="not in the model.*layers.1"):
        LRNNLMHeadModel.from_pretrained(tmp_path)
    edit_config(tmp_path, n_layer=2, mixer_types=["sbtest_decay", "sbtest_attn"], d_modle=3)
    with pytest.raises(ValueError, match=r"unknown fields \['d_modle'\]"):
        LRNNLMHeadModel.from_pretrained(tmp_path)


def test_never_unpickles(tmp_path):
    model = saved(tmp_path)
    (tmp_path / WEIGHTS_NAME).unlink()
    torch.save(model.state_dict(), tmp_path / "pytorch_model.bin")
    with pytest.raises(FileNotFoundError, match="never unpickles"):
        LRNNLMHeadModel.from_pretrained(tmp_path)


def test_argument_errors(tmp_path):
    saved(tmp_path)
    with pytest.raises(TypeError, match="unexpected arguments"):
        LRNNLMHeadModel.from_pretrained(tmp_path, d_model=16)
    model = tiny_lm(["sbtest_decay"], mixer_kwargs={"sbtest_decay": {"d_state": torch.tensor(3)}})
    with pytest.raises(ValueError, match="JSON"):
        model.save_pretrained(tmp_path / "bad")


def test_push_to_hub_and_hub_ids_go_through_the_mixin(tmp_path, monkeypatch):
    """push_to_hub and loading by Hub id use huggingface_hub's mixin; the network is faked here."""
    import huggingface_hub.hub_mixin as hub_mixin

    import seqblocks.checkpoint as ckpt

    uploaded = {}

    class FakeApi:
        def __init__(self, token=None):
            pass

        def create_repo(self, repo_id, private=None, exist_ok=False):
            return type("Repo", (), {"repo_id": repo_id})()

        def upload_folder(self, repo_id, folder_path, **kwargs):
            for f in folder_path.iterdir():
                target = tmp_path / "hub" / repo_id / f.name
                target.parent.mkdir(parents=True, exist_ok=True)
                target.write_bytes(f.read_bytes())
                uploaded[f.name] = target
            return f"https://hub.example/{repo_id}/commit/1"

    def fake_download(repo_id, filename, **kwargs):
        return str(tmp_path / "hub" / repo_id / filename)

    monkeypatch.setattr(hub_mixin, "HfApi", FakeApi)
    monkeypatch.setattr(hub_mixin, "hf_hub_download", fake_download)
    monkeypatch.setattr(ckpt, "hf_hub_download", fake_download)
    model = tiny_lm(sorted(STAND_INS))
    assert model.push_to_hub("someone/tiny").endswith("commit/1")
    assert {CONFIG_NAME, WEIGHTS_NAME} <= set(uploaded)
    loaded = LRNNLMHeadModel.from_pretrained("someone/tiny")
    ids = torch.randint(0, 37, (1, 4))
    assert torch.equal(loaded(ids).logits, model(ids).logits)


def test_torch_dtype_is_accepted_as_transformers_spells_it(tmp_path):
    saved(tmp_path)  # a float64 model
    for kwargs in ({"torch_dtype": torch.bfloat16}, {"torch_dtype": "bfloat16"}, {"dtype": "torch.bfloat16"},
                   {"dtype": torch.bfloat16, "torch_dtype": "bfloat16"}):
        assert LRNNLMHeadModel.from_pretrained(tmp_path, **kwargs).embedding.weight.dtype == torch.bfloat16
        assert load_pretrained(tmp_path, **kwargs).embedding.weight.dtype == torch.bfloat16
    assert load_pretrained(tmp_path, torch_dtype="auto").embedding.weight.dtype == torch.float64  # as saved
    with pytest.raises(TypeError, match="disagree"):
        load_pretrained(tmp_path, dtype=torch.float32, torch_dtype=torch.bfloat16)
    with pytest.raises(ValueError, match="unknown torch dtype 'float7'"):
        load_pretrained(tmp_path, torch_dtype="float7")
    with pytest.raises(ValueError, match="not a floating-point dtype"):
        load_pretrained(tmp_path, torch_dtype=torch.int64)
    with pytest.raises(TypeError, match="must be a torch.dtype"):
        load_pretrained(tmp_path, torch_dtype=16)


def test_model_card_describes_the_model(tmp_path):
    from seqblocks.model_card import compress_pattern

    model = LRNNLMHeadModel(d_model=32, d_state=4, n_layer=4, vocab_size=50, mixer_types=["rglru", "attn"] * 2,
                            d_intermediate=64, mixer_kwargs={"attn": {"num_heads": 2}})
    model.save_pretrained(tmp_path)
    card = (tmp_path / "README.md").read_text()
    total = sum(p.numel() for p in model.parameters())
    assert "More Information Needed" not in card and card.startswith("---\nlibrary_name: seqblocks\n")
    assert "# LRNNLMHeadModel" in card and f"| parameters | {total:,} (" in card
    assert "| layers | 4: (rglru, attn) x 2 |" in card and "| width (d_model) | 32 |" in card
    assert "| vocabulary | 50 (embedding padded to 56 rows) |" in card and "| weights | float32 |" in card
    mixer_params = sum(p.numel() for p in model.layers[0].mixer.parameters())
    assert "| 0 | rglru (`RGLRU`) | Griffin's recurrent block" in card and f"| {mixer_params:,} | GatedMLP |" in card
    assert "how the model was trained is not recorded" in card
    config_lm = pattern_lm(["sbtest_decay", "sbtest_attn"], position="learned", max_seq_len=32)
    config_lm.save_pretrained(tmp_path / "lm")
    assert "| layers | 2: sbtest_decay, sbtest_attn |" in (tmp_path / "lm" / "README.md").read_text()
    assert compress_pattern(["m"] * 3) == "m x 3" and compress_pattern(["a", "b", "a"]) == "a, b, a"
    assert compress_pattern(["a", "a", "b"] * 2) == "(a, a, b) x 2"

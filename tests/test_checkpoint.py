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
    """A user MLP class, saved in config.json by its registered name."""

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


@pytest.fixture
def wide_mlp():
    from seqblocks.registry import MLPS

    with MLPS.scoped():
        MLPS.register("test_wide_mlp", WideMLP)
        yield WideMLP


def test_full_config_in_config_json(tmp_path, wide_mlp):
    kwargs = {"sbtest_attn": {"num_heads": 2}, "sbtest_decay": {"d_state": 3}}
    model = tiny_lm(["sbtest_decay", "sbtest_attn"], mixer_kwargs=kwargs, d_intermediate=16, rms_norm=False,
                    residual_in_fp32=True, pad_vocab_size_multiple=4, mlp_cls=WideMLP)
    model.save_pretrained(tmp_path)
    config = json.loads((tmp_path / CONFIG_NAME).read_text())
    assert config["model_type"] == "LRNNLMHeadModel" and config["layers"][1]["mixer_config"]["num_heads"] == 2
    assert config["layers"][0]["mixer_config"]["d_state"] == 3
    assert config["mlp"] == "test_wide_mlp" and config["torch_dtype"] == "float64"
    assert config["initializer"]["initializer_range"] == 1.0
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
    edit_config(tmp_path, vocab_size=64)
    with pytest.raises(ValueError, match="shape mismatches.*embedding.weight"):
        LRNNLMHeadModel.from_pretrained(tmp_path)
    edit_config(tmp_path, vocab_size=37, d_model=32)
    with pytest.raises(ValueError, match="widths.*d_model=32"):
        LRNNLMHeadModel.from_pretrained(tmp_path)
    edit_config(tmp_path, d_model=16, d_intermediate=8)
    with pytest.raises(ValueError, match="missing from the checkpoint.*mlp"):
        LRNNLMHeadModel.from_pretrained(tmp_path)
    edit_config(tmp_path, d_intermediate=0, tie_embeddings=False)
    with pytest.raises(ValueError, match=r"missing from the checkpoint: \['lm_head.weight'\]"):
        LRNNLMHeadModel.from_pretrained(tmp_path)
    layers = json.loads((tmp_path / CONFIG_NAME).read_text())["layers"]
    edit_config(tmp_path, tie_embeddings=True, layers=layers[:1])
    with pytest.raises(ValueError, match="not in the model.*layers.1"):
        LRNNLMHeadModel.from_pretrained(tmp_path)
    edit_config(tmp_path, layers=layers, d_modle=3)
    with pytest.raises(ValueError, match=r"unknown ModelConfig fields \['d_modle'\]"):
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
    with pytest.raises(TypeError, match="d_state must be int"):  # a config holds JSON values only
        tiny_lm(["sbtest_decay"], mixer_kwargs={"sbtest_decay": {"d_state": torch.tensor(3)}})


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


@pytest.mark.parametrize("field", ["model_type", "mlp_cls"])
def test_planted_foreign_module_is_never_imported(tmp_path, monkeypatch, field):
    """A config.json naming a module of its own is refused, and the module is not imported."""
    import sys

    marker = tmp_path / "imported.txt"
    pkg = tmp_path / "site"
    pkg.mkdir()
    (pkg / "planted_module.py").write_text(
        f"import pathlib\npathlib.Path({str(marker)!r}).write_text('ran')\nclass Evil:\n    pass\n")
    monkeypatch.syspath_prepend(str(pkg))
    saved(tmp_path / "ckpt")
    config = json.loads((tmp_path / "ckpt" / CONFIG_NAME).read_text())
    if field == "model_type":
        config["model_type"] = "planted_module:Evil"
    else:  # the constructor-argument form older checkpoints used
        config = {"model_type": "LRNNLMHeadModel", "d_model": 16, "d_state": 4, "n_layer": 2, "vocab_size": 37,
                  "mixer_types": ["sbtest_decay", "sbtest_attn"], "d_intermediate": 8,
                  "mlp_cls": "planted_module:Evil"}
    (tmp_path / "ckpt" / CONFIG_NAME).write_text(json.dumps(config))
    with pytest.raises(ValueError, match="never import"):
        load_pretrained(tmp_path / "ckpt")
    with pytest.raises(ValueError, match="never import"):
        LRNNLMHeadModel.from_pretrained(tmp_path / "ckpt")
    assert not marker.exists() and "planted_module" not in sys.modules


def test_older_argument_checkpoints_still_load(tmp_path):
    """A config.json in the constructor-argument form (older checkpoints) loads, its mlp_cls matched by name."""
    from seqblocks.checkpoint import save_weights

    model = saved(tmp_path)
    save_weights(model, tmp_path / WEIGHTS_NAME)  # as older versions wrote them: no config digest
    config = json.loads((tmp_path / CONFIG_NAME).read_text())
    (tmp_path / CONFIG_NAME).write_text(json.dumps({
        "model_type": "LRNNLMHeadModel", "torch_dtype": config["torch_dtype"], "d_model": 16, "d_state": 4,
        "n_layer": 2, "vocab_size": 37, "mixer_types": ["sbtest_decay", "sbtest_attn"],
        "mixer_kwargs": {"sbtest_attn": {"num_heads": config["layers"][1]["mixer_config"]["num_heads"]}},
        "d_intermediate": config["d_intermediate"], "mlp_cls": "seqblocks.layers.ffn:GatedMLP",
        "pad_vocab_size_multiple": config["pad_vocab_size_multiple"],
        "initializer_cfg": config["initializer"]}))
    loaded = LRNNLMHeadModel.from_pretrained(tmp_path)
    ids = torch.randint(0, 37, (1, 5))
    assert torch.equal(loaded(ids).logits, model(ids).logits)


def test_a_flipped_bit_or_swapped_tensor_is_reported(tmp_path):
    import safetensors.torch

    saved(tmp_path)
    path = tmp_path / WEIGHTS_NAME
    clean = path.read_bytes()
    header = 8 + int.from_bytes(clean[:8], "little")
    for offset in (header + 3, len(clean) - 5, header + (len(clean) - header) // 2):
        data = bytearray(clean)
        data[offset] ^= 0x10
        path.write_bytes(bytes(data))
        with pytest.raises(ValueError, match="not the ones that were saved"):
            LRNNLMHeadModel.from_pretrained(tmp_path)
    path.write_bytes(clean)
    tensors = safetensors.torch.load_file(str(path))
    with safetensors.safe_open(str(path), framework="pt") as f:
        metadata = f.metadata()
    a, b = [k for k, v in tensors.items() if v.shape == tensors["layers.0.mixer.in_proj.weight"].shape][:2]
    tensors[a], tensors[b] = tensors[b], tensors[a]
    safetensors.torch.save_file(tensors, str(path), metadata=metadata)
    with pytest.raises(ValueError, match="not the ones that were saved"):
        LRNNLMHeadModel.from_pretrained(tmp_path)


def test_config_edits_that_keep_shapes_are_reported(tmp_path):
    saved(tmp_path)
    edit_config(tmp_path, norm_epsilon=1e-3)
    with pytest.raises(ValueError, match="config.json was changed"):
        LRNNLMHeadModel.from_pretrained(tmp_path)


def test_non_finite_weights_are_refused_unless_allowed(tmp_path):
    model = tiny_lm(["sbtest_decay", "sbtest_attn"])
    with torch.no_grad():
        model.layers[0].mixer.out_proj.weight[0, 0] = float("nan")
    model.save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="NaN or Inf.*allow_non_finite"):
        LRNNLMHeadModel.from_pretrained(tmp_path)
    loaded = LRNNLMHeadModel.from_pretrained(tmp_path, allow_non_finite=True)
    assert torch.isnan(loaded.layers[0].mixer.out_proj.weight[0, 0])


@pytest.mark.parametrize("change", [{"n_layer": 20000}, {"d_state": 10_000_000}, {"vocab_size": 1 << 30}])
def test_oversize_configs_are_refused_before_allocation(tmp_path, change):
    """A config.json asking for huge sizes fails at once naming the field, building nothing."""
    import time

    config = {"model_type": "LRNNLMHeadModel", "d_model": 16, "d_state": 4, "n_layer": 2, "vocab_size": 37,
              "mixer_types": ["sbtest_decay", "sbtest_attn"]}
    config.update(change)
    if "n_layer" in change:
        config["mixer_types"] = ["sbtest_decay"] * change["n_layer"]
    (tmp_path / CONFIG_NAME).write_text(json.dumps(config))
    saved(tmp_path / "other")
    (tmp_path / WEIGHTS_NAME).write_bytes((tmp_path / "other" / WEIGHTS_NAME).read_bytes())
    start = time.perf_counter()
    with pytest.raises(ValueError, match=f"{next(iter(change))}.*exceeds the size limit"):
        LRNNLMHeadModel.from_pretrained(tmp_path)
    assert time.perf_counter() - start < 5.0


def test_missing_local_paths_fail_at_once_and_offline_never_asks_the_hub(tmp_path, monkeypatch):
    import time

    from huggingface_hub import constants

    start = time.perf_counter()
    for path in (tmp_path / "missing", "./nope", "../x/y", str(tmp_path / "a" / "b")):
        with pytest.raises(FileNotFoundError, match="not a checkpoint directory"):
            LRNNLMHeadModel.from_pretrained(path)
    (tmp_path / "runs").mkdir()
    monkeypatch.chdir(tmp_path)
    with pytest.raises(FileNotFoundError, match="not a checkpoint directory"):
        load_pretrained("runs/tiny")  # shaped like a repo id, but runs/ is a local directory
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(FileNotFoundError, match="offline"):
        LRNNLMHeadModel.from_pretrained("someone/model")
    assert time.perf_counter() - start < 5.0
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


def test_constructor_ranges_are_checked_before_weights_are_read(tmp_path, monkeypatch):
    """A config value out of range (dt_min > dt_max) fails on the meta device, before any real module is
    built or the weights file is opened."""
    import seqblocks.checkpoint as ckpt

    model = tiny_lm(["S5", "sbtest_attn"])
    model.save_pretrained(tmp_path)
    config = json.loads((tmp_path / CONFIG_NAME).read_text())
    config["layers"][0]["mixer_config"]["dt_min"] = 0.5
    (tmp_path / CONFIG_NAME).write_text(json.dumps(config))
    opened = []
    monkeypatch.setattr(ckpt, "load_weights", lambda *a, **k: opened.append(a))
    with pytest.raises(ValueError, match="dt_max"):
        LRNNLMHeadModel.from_pretrained(tmp_path)
    assert not opened

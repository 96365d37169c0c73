"""Checkpoint folders in other training code's layouts load into seqblocks models with the same outputs."""

from __future__ import annotations

import collections
import json

import pytest
import safetensors.torch
import torch
from torch.testing import assert_close

from seqblocks import BlockConfig, LanguageModel, LanguageModelConfig, LRNNLMHeadModel
from seqblocks.compat import load_backbone_checkpoint, load_mlx_checkpoint

KW = dict(d_model=16, d_state=4, n_layer=2, vocab_size=40, mixer_types=["attn", "Mamba"], d_intermediate=32)
HEADS = {"attn": {"num_heads": 4}}


def _write_backbone_folder(folder, model, config):
    """The folder as that training code writes it: config.json and a torch.save'd state dict."""
    folder.mkdir()
    state = collections.OrderedDict()
    for key, value in model.state_dict().items():
        if key == "lm_head.weight":
            state[key] = value
            continue
        key = "backbone." + key
        if key.endswith("mixer.conv_weight"):
            key, value = key.replace("conv_weight", "conv1d.weight"), value.unsqueeze(1)  # [E, 1, W]
        elif key.endswith("mixer.conv_bias"):
            key = key.replace("conv_bias", "conv1d.bias")
        state[key] = value.clone()
    mamba = [k for k in state if k.endswith("mixer.dt_proj.bias")][0]
    state[mamba.replace("dt_proj", "dtA_proj")] = torch.zeros_like(state[mamba])
    state[mamba.replace("dt_proj.bias", "dtA_proj.weight")] = torch.zeros(state[mamba].shape[0], 1)
    torch.save(state, folder / "pytorch_model.bin")
    (folder / "config.json").write_text(json.dumps(config))


def test_backbone_folder_loads_with_the_same_logits(tmp_path):
    torch.manual_seed(0)
    model = LRNNLMHeadModel(**KW, mixer_kwargs=HEADS).eval()
    config = {**KW, "norm_epsilon": 1e-5, "rms_norm": True, "fused_add_norm": True, "residual_in_fp32": False,
              "tie_embeddings": True, "pad_vocab_size_multiple": 8}
    _write_backbone_folder(tmp_path / "ckpt", model, config)
    with pytest.warns(UserWarning, match="dtA_proj"):
        loaded = load_backbone_checkpoint(tmp_path / "ckpt", mixer_kwargs=HEADS)
    ids = torch.randint(0, 40, (2, 9))
    with torch.no_grad():
        assert_close(loaded(ids).logits, model(ids).logits)
    with pytest.raises(ValueError, match="num_heads"):
        load_backbone_checkpoint(tmp_path / "ckpt")


def test_backbone_folder_errors(tmp_path):
    folder = tmp_path / "c"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({**KW, "mixer_types": ["S5", "attn"]}))
    with pytest.raises(ValueError, match="S5"):
        load_backbone_checkpoint(folder, mixer_kwargs=HEADS)
    (folder / "config.json").write_text(json.dumps(KW))
    with pytest.raises(ValueError, match="pytorch_model.bin"):
        load_backbone_checkpoint(folder, mixer_kwargs=HEADS)
    torch.save({"weights": collections.Counter(a=1)}, folder / "pytorch_model.bin")  # not tensors only
    with pytest.raises(ValueError, match="tensors"):
        load_backbone_checkpoint(folder, mixer_kwargs=HEADS)
    torch.save({"backbone.embedding.weight": torch.zeros(40, 16)}, folder / "pytorch_model.bin")
    with pytest.raises(ValueError, match="missing"):
        load_backbone_checkpoint(folder, mixer_kwargs=HEADS)


def _mlx_keys(model: LanguageModel, config: LanguageModelConfig) -> dict[str, torch.Tensor]:
    """The model's weights under the MLX trainer's names (separate q / k / v, gate / up)."""
    out = {}
    for key, value in model.state_dict().items():
        if key == "embedding.weight":
            out["embed.weight"] = value
        elif key == "lm_head.weight":
            if not config.tie_embeddings:
                out["head.weight"] = value
        elif key.startswith("norm_f."):
            out[key.replace("norm_f.", "final_norm.")] = value
        else:
            i, rest = key.split(".", 2)[1:]
            block = config.blocks[int(i)]
            if rest.startswith("attention.in_proj."):
                kv = (block.n_kv_heads or block.n_heads) * block.effective_head_dim
                q, k, v = value.split((block.n_heads * block.effective_head_dim, kv, kv), 0)
                for name, part in zip("qkv", (q, k, v), strict=True):
                    out[f"blocks.{i}.attention.{name}_proj.{rest.rsplit('.', 1)[1]}"] = part
            elif rest.startswith("attention.out_proj."):
                out[f"blocks.{i}.{rest.replace('out_proj', 'o_proj')}"] = value
            elif rest.startswith("ffn.gate_up."):
                gate, up = value.chunk(2, 0)
                out[f"blocks.{i}.ffn.gate.{rest.rsplit('.', 1)[1]}"] = gate
                out[f"blocks.{i}.ffn.up.{rest.rsplit('.', 1)[1]}"] = up
            else:
                out[f"blocks.{i}.{rest}"] = value
    return {k: v.contiguous() for k, v in out.items()}


@pytest.mark.parametrize("tie", [True, False])
def test_mlx_folder_loads_with_the_same_logits(tmp_path, tie):
    block = BlockConfig(attention="gqa", ffn="gated", norm="rms_norm", position="rope", d_model=16, n_heads=4,
                        n_kv_heads=2, d_ff=32, bias=False)
    std = BlockConfig(attention="mha", ffn="standard", norm="layer_norm", position="rope", d_model=16, n_heads=4,
                      d_ff=32)
    config = LanguageModelConfig(vocab_size=40, blocks=[block, std], tie_embeddings=tie)
    torch.manual_seed(0)
    model = LanguageModel(config).eval()
    safetensors.torch.save_file(_mlx_keys(model, config), str(tmp_path / "model.safetensors"))
    (tmp_path / "metadata.json").write_text(json.dumps({"step": 7}))
    loaded = load_mlx_checkpoint(tmp_path, config)
    assert loaded.checkpoint_metadata == {"step": 7}
    ids = torch.randint(0, 40, (2, 9))
    with torch.no_grad():
        assert_close(loaded(ids).logits, model(ids).logits)
    wrong = LanguageModelConfig(vocab_size=40, blocks=[block, block], tie_embeddings=tie)
    with pytest.raises(ValueError, match="do not fit|lacks"):
        load_mlx_checkpoint(tmp_path, wrong)

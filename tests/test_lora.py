"""LoRA / QLoRA through peft: only adapters train, merged == unmerged outputs, adapters-only save /
load, merge_and_unload, NF4 bases, errors, and `seqblocks lora` end to end."""

from __future__ import annotations

import json

import pytest
import torch
from post_fixtures import TINY, one_thread, tiny_checkpoint, tiny_model  # noqa: F401
from safetensors.torch import load_file

from seqblocks.models.lrnn_lm import LRNNLMHeadModel
from seqblocks.post.lora import (
    DEFAULT_TARGET_MODULES,
    apply_lora,
    apply_qlora,
    load_adapters,
    lora_targets,
    merge_and_unload,
    merge_lora,
    save_adapters,
    unmerge_lora,
)

HYBRID = {"d_model": 32, "mixer_types": ["gated_deltanet", "mamba"],
          "mixer_kwargs": {"gated_deltanet": {"num_heads": 2, "head_dim": 16}}}

pytestmark = pytest.mark.usefixtures("one_thread")


def _randomise_adapters(model: torch.nn.Module) -> None:
    with torch.no_grad():
        for name, p in model.named_parameters():
            if ".lora_B." in name:
                p.normal_(0, 0.05)


def test_default_targets_are_every_mixer_projection_and_the_mlp():
    model = tiny_model(**HYBRID)
    targets = lora_targets(model)
    last = {t.rsplit(".", 1)[-1] for t in targets}
    assert last == {"q_proj", "k_proj", "v_proj", "g_proj", "o_proj", "in_proj", "x_proj", "out_proj", "fc1", "fc2"}
    assert last <= set(DEFAULT_TARGET_MODULES) and "lm_head" not in targets
    with pytest.raises(ValueError, match=r"match no linear layer.*named \["):
        lora_targets(model, ["nope"])


def test_only_adapters_train():
    model = apply_lora(tiny_model(**HYBRID), r=4, target_modules=["q_proj", "v_proj", "fc1"])
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all(".lora_A." in n or ".lora_B." in n for n in trainable)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    for _ in range(2):
        model(torch.randint(0, 16, (2, 8))).logits.square().mean().backward()
        optimizer.step()
        optimizer.zero_grad()
    changed = {k for k, v in model.state_dict().items() if not torch.equal(v, before[k])}
    assert changed and all(".lora_" in k for k in changed)


def test_fresh_adapters_leave_outputs_unchanged_and_merge_equals_unmerged():
    base = tiny_model(**HYBRID)
    ids = torch.randint(0, 16, (2, 9))
    ref = base(ids).logits
    model = apply_lora(tiny_model(**HYBRID), r=4, alpha=8.0)
    torch.testing.assert_close(model(ids).logits, ref)  # B = 0 at the start
    _randomise_adapters(model)
    unmerged = model(ids).logits
    assert not torch.allclose(unmerged, ref)
    merge_lora(model)
    torch.testing.assert_close(model(ids).logits, unmerged, atol=1e-5, rtol=1e-5)
    unmerge_lora(model)
    torch.testing.assert_close(model(ids).logits, unmerged, atol=1e-5, rtol=1e-5)
    plain = merge_and_unload(model)
    assert type(plain.layers[0].mixer.q_proj) is torch.nn.Linear
    torch.testing.assert_close(plain(ids).logits, unmerged, atol=1e-5, rtol=1e-5)
    fresh = LRNNLMHeadModel.from_config(plain.config)
    fresh.load_state_dict(plain.state_dict())  # the base architecture's keys again


def test_adapters_save_and_load_alone(tmp_path):
    ids = torch.randint(0, 16, (2, 9))
    model = apply_lora(tiny_model(), r=2, target_modules=["in_proj", "fc2"])
    _randomise_adapters(model)
    expected = model(ids).logits
    save_adapters(model, tmp_path / "adapters")
    saved = load_file(str(tmp_path / "adapters" / "adapter_model.safetensors"))
    assert saved and all(".lora_A." in k or ".lora_B." in k for k in saved)
    meta = json.loads((tmp_path / "adapters" / "adapter_config.json").read_text())
    assert meta["r"] == 2 and meta["base_model_config"]["d_model"] == TINY["d_model"]
    restored = load_adapters(tiny_model(), tmp_path / "adapters")
    torch.testing.assert_close(restored(ids).logits, expected)
    with pytest.raises(ValueError, match="do not fit"):
        load_adapters(apply_lora(tiny_model(), r=2, target_modules=["fc1"]), tmp_path / "adapters")
    merge_lora(model)
    with pytest.raises(ValueError, match="unmerge_lora before save_adapters"):
        save_adapters(model, tmp_path / "again")


def test_qlora_stores_nf4_bases_and_trains_adapters():
    ids = torch.randint(0, 16, (2, 9))
    ref = tiny_model()(ids).logits
    model = apply_qlora(tiny_model(), r=4)
    weight = model.layers[0].mixer.in_proj.base_layer.weight
    assert type(weight).__name__ == "NF4Tensor" and not weight.requires_grad
    out = model(ids).logits
    assert ((out - ref).norm() / ref.norm()).item() < 0.25  # NF4 bases, zero adapters
    out.square().mean().backward()
    grads = [n for n, p in model.named_parameters() if p.grad is not None]
    assert grads and all(".lora_" in n for n in grads)
    _randomise_adapters(model)
    unmerged = model(ids).logits
    merge_lora(model)  # dequantises the bases first
    torch.testing.assert_close(model(ids).logits, unmerged, atol=1e-4, rtol=1e-4)


def test_lora_in_bf16():
    model = apply_lora(tiny_model().to(torch.bfloat16), r=4)
    out = model(torch.randint(0, 16, (2, 8))).logits
    assert out.dtype == torch.bfloat16
    out.float().square().mean().backward()


def test_lora_rejects_bad_arguments():
    with pytest.raises(ValueError, match="r=0"):
        apply_lora(tiny_model(), r=0)
    with pytest.raises(ValueError, match="dropout"):
        apply_lora(tiny_model(), dropout=1.0)
    model = apply_lora(tiny_model())
    with pytest.raises(ValueError, match="already has LoRA"):
        apply_lora(model)
    with pytest.raises(ValueError, match="no LoRA adapters"):
        merge_lora(tiny_model())


def test_lora_command_end_to_end(tmp_path):
    from seqblocks.cli import main

    base = tiny_checkpoint(tmp_path / "base")
    out = tmp_path / "run"
    args = ["lora", str(base), "--out", str(out), "--steps", "2", "--batch-size", "4", "--lora-r", "2",
            "--device", "cpu", "--no-progress", "--threads", "1"]
    assert main(args + ["--merge"]) == 0
    ckpt = out / "checkpoints" / "step_0000002"
    assert (ckpt / "adapter_model.safetensors").is_file() and not (ckpt / "model.safetensors").exists()
    assert (out / "merged" / "model.safetensors").is_file()
    assert main(["eval", str(out / "merged"), "--device", "cpu", "--threads", "1"]) == 0
    assert main(args[:5] + ["3"] + args[6:] + ["--resume"]) == 0
    assert (out / "checkpoints" / "step_0000003").is_dir()

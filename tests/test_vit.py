"""VisionTransformer, PatchEmbedding, Bidirectional and the shapes task: patch embedding against a
hand-written unfold, forward / backward for attention and SSM token mixers, save / load, the task's
determinism, a short CPU run that learns it, and ``seqblocks train --task shapes``."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F

from seqblocks import Bidirectional, PatchEmbedding, VisionTransformer, VisionTransformerConfig
from seqblocks.checkpoint import load_pretrained
from seqblocks.layers.attention import causal_mask
from seqblocks.tasks import ImageBatch, get_task
from seqblocks.tasks.images import SHAPE_NAMES, draw_shapes


def tiny(**kw) -> VisionTransformerConfig:
    base = dict(image_size=16, patch_size=4, num_channels=1, num_classes=4, d_model=32, num_heads=4, num_layers=2,
                d_ff=64)
    return VisionTransformerConfig(**{**base, **kw})


def hand_patches(images: torch.Tensor, ph: int, pw: int) -> torch.Tensor:
    """[B, C, H, W] -> [B, N, C * ph * pw]: patches in row-major grid order, pixels channel-major."""
    B, C, H, W = images.shape
    x = images.reshape(B, C, H // ph, ph, W // pw, pw)
    return x.permute(0, 2, 4, 1, 3, 5).reshape(B, (H // ph) * (W // pw), C * ph * pw)


@pytest.mark.parametrize("image_size,patch_size", [(8, 2), ((8, 12), (4, 3))])
def test_patch_embedding_is_a_linear_map_of_unfolded_patches(image_size, patch_size):
    torch.manual_seed(0)
    emb = PatchEmbedding(image_size, patch_size, 3, 16).double()
    H, W = (image_size, image_size) if isinstance(image_size, int) else image_size
    ph, pw = (patch_size, patch_size) if isinstance(patch_size, int) else patch_size
    images = torch.randn(2, 3, H, W, dtype=torch.float64)
    expected = hand_patches(images, ph, pw) @ emb.proj.weight.reshape(16, -1).T + emb.proj.bias
    assert emb.num_patches == (H // ph) * (W // pw)
    torch.testing.assert_close(emb(images), expected)
    # also against torch's unfold, the same order
    unfolded = F.unfold(images, kernel_size=(ph, pw), stride=(ph, pw)).transpose(1, 2)
    torch.testing.assert_close(unfolded, hand_patches(images, ph, pw))
    last = PatchEmbedding(image_size, patch_size, 3, 16, channels_last=True).double()
    last.load_state_dict(emb.state_dict())
    torch.testing.assert_close(last(images.permute(0, 2, 3, 1)), expected)


def test_patch_embedding_errors_name_the_values():
    with pytest.raises(ValueError, match="divisible by patch_size"):
        PatchEmbedding(10, 4, 3, 8)
    emb = PatchEmbedding(8, 4, 3, 8)
    with pytest.raises(ValueError, match=r"\[B, 3, 8, 8\]"):
        emb(torch.randn(2, 8, 8, 3))
    with pytest.raises(TypeError, match="floating point"):
        emb(torch.zeros(1, 3, 8, 8, dtype=torch.long))


def test_config_defaults_and_errors():
    cfg = VisionTransformerConfig()
    assert (cfg.image_size, cfg.patch_size, cfg.d_model, cfg.num_layers, cfg.num_tokens) == (224, 16, 768, 12, 197)
    with pytest.raises(ValueError, match="use_cls_token"):
        VisionTransformerConfig(use_cls_token=False)
    with pytest.raises(ValueError, match="divisible"):
        VisionTransformerConfig(image_size=(224, 100))
    with pytest.raises(ValueError, match="token_mixer"):
        tiny(token_mixer="no-such-mixer")
    with pytest.raises(ValueError, match="pool"):
        tiny(pool="max")
    assert VisionTransformerConfig.from_dict(json.loads(json.dumps(tiny(image_size=(16, 8)).to_dict()))) == \
        tiny(image_size=(16, 8))
    with pytest.raises(ValueError, match="unknown keys"):
        VisionTransformerConfig.from_dict({"imagesize": 3})


MIXERS = [
    {},
    {"token_mixer": "mamba", "use_cls_token": False, "pool": "mean", "mixer_kwargs": {"d_state": 4}},
    {"token_mixer": "lru"},
    {"token_mixer": "s5", "mixer_kwargs": {"bidirectional": True}},
]


@pytest.mark.parametrize("kw", MIXERS, ids=["attention", "vim", "lru", "s5-bidirectional"])
def test_forward_backward_and_save_load(kw, tmp_path):
    torch.manual_seed(0)
    model = VisionTransformer(tiny(**kw))
    images = torch.randn(3, 1, 16, 16)
    logits = model(images)
    assert logits.shape == (3, 4)
    logits.square().sum().backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
    model.eval()
    model.save_pretrained(tmp_path)
    loaded = load_pretrained(tmp_path)
    assert type(loaded) is VisionTransformer and loaded.config == model.config
    torch.testing.assert_close(loaded(images), model(images), rtol=0, atol=0)


@pytest.mark.parametrize("kw", MIXERS[:2], ids=["attention", "vim"])
def test_every_patch_reaches_every_output(kw):
    """Bidirectional token mixing: the first token's features depend on the last patch."""
    model = VisionTransformer(tiny(num_classes=None, **kw))
    images = torch.randn(1, 1, 16, 16, requires_grad=True)
    tokens = model(images)
    assert tokens.shape == (1, model.config.num_tokens, 32)
    tokens[0, 0].sum().backward()
    assert images.grad[0, 0, 12:, 12:].abs().sum() > 0  # the bottom-right patch


def test_bf16_and_per_call_score_mod():
    model = VisionTransformer(tiny(num_classes=None)).eval()  # the tokens (the head starts at zero)
    images = torch.randn(2, 1, 16, 16)
    out = model.to(torch.bfloat16)(images.bfloat16())
    assert out.dtype == torch.bfloat16 and torch.isfinite(out.float()).all()
    model = model.float()
    torch.testing.assert_close(model(images, score_mod=lambda s, b, h, q, kv: s), model(images))
    assert not torch.allclose(model(images, score_mod=causal_mask), model(images))
    with pytest.raises(ValueError, match="score_mod acts on attention"):
        VisionTransformer(tiny(token_mixer="lru"))(images, score_mod=causal_mask)


def test_bidirectional_with_lengths_matches_the_trimmed_rows():
    from seqblocks.layers.build import build_mixer, mixer_config

    torch.manual_seed(0)
    cfg = mixer_config("lru", 8, d_state=4, causal=False)
    bi = Bidirectional(build_mixer("lru", cfg), build_mixer("lru", cfg)).double()
    x = torch.randn(2, 7, 8, dtype=torch.float64)
    lengths = torch.tensor([7, 4])
    y = bi(x, lengths=lengths)
    torch.testing.assert_close(y[1:, :4], bi(x[1:, :4]))
    torch.testing.assert_close(y[:1], bi(x[:1]))
    assert (y[1, 4:] == 0).all()
    expected = bi.forward_mixer(x[:1]) + bi.backward_mixer(x[:1].flip(1)).flip(1)
    torch.testing.assert_close(y[:1], expected)
    with pytest.raises(TypeError, match="nn.Module"):
        Bidirectional(bi.forward_mixer, "lru")


def test_shapes_task_is_deterministic_and_labelled_by_shape():
    task = get_task("shapes")
    a, b = task.batch("train", 3, 16, seed=1), task.batch("train", 3, 16, seed=1)
    assert isinstance(a, ImageBatch) and a.images.shape == (16, 1, 16, 16) and a.targets.shape == (16, 1)
    assert a.images.dtype == torch.float32 and a.targets.dtype == torch.long
    torch.testing.assert_close(a.images, b.images, rtol=0, atol=0)
    assert torch.equal(a.labels, b.labels)
    assert not torch.equal(a.images, task.batch("train", 4, 16, seed=1).images)
    assert not torch.equal(a.images, task.batch("val", 3, 16, seed=1).images)
    assert task.vocab_size == 4 and task.seq_len == 1 and task.model_fields()["num_classes"] == 4
    full = task.eval_batches(512)[0]
    assert torch.equal(torch.cat([e.images for e in task.eval_batches(100)]), full.images)
    assert set(full.labels.tolist()) == {0, 1, 2, 3}
    assert isinstance(full[2:5], ImageBatch)
    # noiseless drawings: a square covers its corners, a circle does not; a cross leaves the corners empty
    masks = draw_shapes(torch.arange(4), torch.full((4,), 8.0), torch.full((4,), 8.0), torch.full((4,), 6.0), 16)
    corner = masks[:, 3, 3]  # offset (-4.5, -4.5): inside the square's half-side 4.8, outside the disc of radius 6
    assert corner.tolist() == [0.0, 1.0, 0.0, 0.0]
    assert masks[0, 8, 8] == masks[1, 8, 8] == masks[3, 8, 8] == 1.0
    assert task.decode([0, 3]) == f"{SHAPE_NAMES[0]} {SHAPE_NAMES[3]}"
    with pytest.raises(ValueError, match="num_classes"):
        get_task("shapes", num_classes=5)
    with pytest.raises(ValueError, match="max_radius"):
        get_task("shapes", max_radius=9.0)


def test_a_short_cpu_run_learns_the_shapes():
    """200 steps of a 1-layer ViT on 2 CPU cores (a few seconds): accuracy far above chance (0.25)."""
    torch.manual_seed(0)
    task = get_task("shapes")
    model = VisionTransformer(tiny(num_layers=1))
    opt = torch.optim.AdamW(model.parameters(), lr=5e-3, weight_decay=0.0)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # small matmuls: one thread is fastest, and spares a busy machine
    try:
        for step in range(200):
            batch = task.batch("train", step, 32)
            loss = F.cross_entropy(model(batch.images), batch.labels)
            opt.zero_grad()
            loss.backward()
            opt.step()
    finally:
        torch.set_num_threads(threads)
    model.eval()
    with torch.no_grad():
        held_out = task.eval_batches(256)[0]
        acc = (model(held_out.images).argmax(-1) == held_out.labels).float().mean().item()
    assert acc > 0.5, acc


def test_seqblocks_train_task_shapes(tmp_path):
    from seqblocks.cli import main

    out = tmp_path / "run"
    assert main(["train", "--task", "shapes", "--steps", "6", "--eval-every", "0", "--ckpt-every", "0",
                 "--batch-size", "8", "--out", str(out), "--no-progress"]) == 0
    run = json.loads((out / "run.json").read_text())
    assert run["model"]["model_type"] == "VisionTransformer" and run["model"]["num_classes"] == 4
    ckpt = out / "checkpoints" / "step_0000006"
    model = load_pretrained(ckpt)
    assert isinstance(model, VisionTransformer)
    assert main(["eval", str(ckpt), "--json"]) == 0


def test_the_image_classifier_is_a_trainer_model_kind():
    from seqblocks.train.models import build_train_model, choose_model_config, forward_logits, kind_of_model, model_kind

    task = get_task("shapes")
    config = choose_model_config({"d_model": 16}, "shapes")  # the kind the task needs: vit-tiny's model
    assert model_kind(config) == "image_classifier" and config["model_type"] == "VisionTransformer"
    assert choose_model_config({"d_model": 16}, "chars", "image_classifier") == config
    model = build_train_model(config, task)
    assert isinstance(model, VisionTransformer) and kind_of_model(model) == "image_classifier"
    batch = task.batch("train", 0, 4)
    _, logits = forward_logits(model, batch, "image_classifier")
    assert logits.shape == (4, 1, 4)
    with pytest.raises(ValueError, match="image_classifier"):
        build_train_model({"d_model": 16, "d_state": 4, "n_layer": 1, "mixer_types": ["lru"]}, task)

"""Every model class the package exports saves and loads: safetensors weights plus ``config.json``,
rebuilt by ``load_pretrained`` from the model registry, computing the same function."""

from __future__ import annotations

import inspect

import pytest
import torch
from torch import nn

import seqblocks
from seqblocks.checkpoint import CheckpointMixin, load_pretrained
from seqblocks.registry import MODELS

#: Layers that live beside a model in ``seqblocks.models`` (parts of it, not models of their own):
#: ``LRNNModel`` is ``LRNNLMHeadModel``'s backbone (``lm.backbone``), saved with its language model.
LAYERS = {"PatchEmbedding", "LRNNModel"}


def exported_models() -> list[type]:
    """The ``nn.Module`` classes in ``seqblocks.__all__`` that live in ``seqblocks.models`` (but ``LAYERS``)."""
    out = []
    for name in seqblocks.__all__:
        obj = getattr(seqblocks, name)
        if (inspect.isclass(obj) and issubclass(obj, nn.Module) and obj.__module__.startswith("seqblocks.models.")
                and name not in LAYERS):
            out.append(obj)
    return out


def _tokens(vocab: int, *shape: int) -> torch.Tensor:
    return torch.randint(0, vocab, shape)


def _lm_pattern():
    config = seqblocks.LanguageModelConfig.from_pattern(["lru", "gqa"], vocab_size=30, d_model=16, n_heads=2)
    return seqblocks.LanguageModel(config), lambda m: m(_tokens(30, 2, 5)).logits


# One small instance per exported model class, and how to run it.
EXAMPLES = {
    "LanguageModel": _lm_pattern,
    "LRNNLMHeadModel": lambda: (
        seqblocks.LRNNLMHeadModel(d_model=16, d_state=4, n_layer=2, vocab_size=30, mixer_types=["lru", "attn"],
                                  mixer_kwargs={"attn": {"num_heads": 2}}),
        lambda m: m(_tokens(30, 2, 5)).logits),
    "Classifier": lambda: (
        seqblocks.Classifier(input_dim=3, num_classes=4, d_model=16, d_state=4, n_layers=2, lrnn_cls=["LRU", "S5"],
                             intermediate_pooling=["mean", "none"]),
        lambda m: m(torch.randn(2, 6, 3))),
    "TransformerEncoder": lambda: (
        seqblocks.TransformerEncoder(30, 16, 2, 2, 32, position="learned", max_seq_len=16),
        lambda m: m(_tokens(30, 2, 5))),
    "TransformerDecoder": lambda: (
        seqblocks.TransformerDecoder(30, 16, 2, 2, 32, position="rope", max_seq_len=16),
        lambda m: m(_tokens(30, 2, 5), torch.randn(2, 4, 16))),
    "TransformerEncoderDecoder": lambda: (
        seqblocks.TransformerEncoderDecoder(seqblocks.TransformerConfig(vocab_size=30, d_model=16, num_heads=2,
                                                                        num_layers=1, d_ff=32, max_len=16)),
        lambda m: m(_tokens(30, 2, 5), _tokens(30, 2, 3))),
    "VisionTransformer": lambda: (
        seqblocks.VisionTransformer(seqblocks.VisionTransformerConfig(
            image_size=8, patch_size=4, num_channels=2, num_classes=None, d_model=16, num_heads=2, num_layers=1,
            d_ff=32)),
        lambda m: m(torch.randn(2, 2, 8, 8))),
    "Forecaster": lambda: (
        seqblocks.Forecaster(input_dim=2, d_model=16, mixer_types=["S5", "Mamba"]),
        lambda m: m(torch.randn(2, 6, 2), integration_timesteps=torch.rand(2, 6))),
    "LRUUnet": lambda: (
        seqblocks.LRUUnet(in_channels=1, out_channels=1, channels=[4, 8], resample_factors=[2, 2], causal=True),
        lambda m: m(torch.randn(2, 1, 17))),
}


def test_every_exported_model_is_a_registered_checkpoint_class():
    classes = exported_models()
    assert {"Classifier", "TransformerEncoder", "VisionTransformer"} <= {c.__name__ for c in classes}
    for cls in classes:
        assert issubclass(cls, CheckpointMixin), f"{cls.__name__} has no save_pretrained / from_pretrained"
        assert MODELS.get(cls.__name__) is cls, f"{cls.__name__} is not in the model registry"
        assert cls.__name__ in EXAMPLES, f"add a small {cls.__name__} to EXAMPLES in this test"


@pytest.mark.parametrize("name", sorted(EXAMPLES))
def test_round_trip(name, tmp_path):
    torch.manual_seed(0)
    model, run = EXAMPLES[name]()
    model.eval()
    model.save_pretrained(tmp_path)
    assert (tmp_path / "model.safetensors").is_file() and (tmp_path / "config.json").is_file()
    assert not any(p.suffix in (".bin", ".pt", ".pth") for p in tmp_path.iterdir())
    loaded = load_pretrained(tmp_path)
    assert type(loaded) is type(model) and not loaded.training
    torch.manual_seed(1)
    expected = run(model)
    torch.manual_seed(1)
    torch.testing.assert_close(run(loaded), expected, rtol=0, atol=0)
    same_class = type(model).from_pretrained(tmp_path, dtype="bfloat16")
    assert next(same_class.parameters()).dtype == torch.bfloat16

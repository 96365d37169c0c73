"""Models build under ``with torch.device("meta"):`` (shapes and parameter counts without memory),
with the same parameters as on the CPU, and initialisation values that do not depend on the default
device."""

from __future__ import annotations

import pytest
import torch
from test_lm import MIXER_TYPES, TEST_MIXER_KWARGS

from seqblocks import LRNNLMHeadModel
from seqblocks.layers.ssm_init import nplr, s4d_init
from seqblocks.models.config_lm import LanguageModel, LanguageModelConfig


def _shapes(model: torch.nn.Module) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
    return {k: (tuple(v.shape), v.dtype) for k, v in model.state_dict().items()}


def _lm(mixer_type: str) -> LRNNLMHeadModel:
    kw = TEST_MIXER_KWARGS.get(mixer_type.lower())
    return LRNNLMHeadModel(d_model=32, d_state=8, n_layer=2, vocab_size=50, mixer_types=[mixer_type, "attn"],
                           d_intermediate=64, mixer_kwargs={mixer_type: kw} if kw else None)


@pytest.mark.parametrize("mixer_type", MIXER_TYPES)
def test_every_mixer_builds_on_the_meta_device(mixer_type):
    with torch.device("meta"):
        meta = _lm(mixer_type)
    tensors = dict(meta.named_parameters()) | dict(meta.named_buffers())
    assert tensors and all(t.device.type == "meta" for t in tensors.values())
    assert _shapes(meta) == _shapes(_lm(mixer_type))


@pytest.mark.parametrize("mixer_type", MIXER_TYPES)
def test_block_config_language_model_builds_on_the_meta_device(mixer_type):
    config = LanguageModelConfig.from_pattern([mixer_type], vocab_size=29, d_model=16, n_heads=2, d_state=4,
                                              mixer_kwargs=TEST_MIXER_KWARGS.get(mixer_type, {}))
    with torch.device("meta"):
        meta = LanguageModel(config)
    assert all(p.device.type == "meta" for p in meta.parameters())
    assert _shapes(meta) == _shapes(LanguageModel(config))


def test_initial_values_do_not_depend_on_the_default_device():
    """The HiPPO / S4D initialisations are computed on the CPU whatever the device context."""
    with torch.device("meta"):
        lam_meta, P_meta, B_meta, V_meta = nplr("fourier", 8)  # the branch with a data-dependent check
        s4d_meta = s4d_init("legs", 8)
    lam, P, B, V = nplr("fourier", 8)
    assert lam_meta.device.type == "cpu"
    for a, b in zip((lam_meta, P_meta, B_meta, V_meta, *s4d_meta), (lam, P, B, V, *s4d_init("legs", 8))):
        assert torch.equal(a, b)


def test_info_sizes_recurrent_presets_on_the_meta_device():
    from seqblocks.cli.commands import _build_for_info
    from seqblocks.presets import PRESETS

    for name in ("tiny-s4", "tiny-s4d", "tiny-s5"):
        model, where = _build_for_info(PRESETS[name]["model"])
        assert where == "meta" and next(model.parameters()).device.type == "meta"

import pytest
import torch
from torch import nn

import seqblocks
from seqblocks import BlockConfig, ConfigurableBlock, Registry, attention_registry, ffn_registry
from seqblocks.layers.ffn import FFNBase


def test_register_get_keys_contains_case_insensitive():
    reg = Registry("widget")

    @reg.register("Foo")
    class Foo:
        """A foo widget."""

    assert reg.get("foo") is Foo and reg.get("FOO") is Foo
    assert "fOo" in reg and "bar" not in reg and 3 not in reg
    assert reg.keys() == ["foo"]
    assert reg.describe("foo") == "A foo widget."
    reg.register("bar", int, description="the int")
    assert reg.keys() == ["bar", "foo"] and list(reg) == ["bar", "foo"] and len(reg) == 2
    assert reg.describe("BAR") == "the int"

    @reg.register("wrapped")
    class Wrapped:
        """A first sentence that
        wraps onto a second line.

        Details that are not part of the summary.
        """

    assert reg.describe("wrapped") == "A first sentence that wraps onto a second line."


def test_unknown_name_lists_valid_keys():
    reg = Registry("widget")
    reg.register("alpha", object)
    reg.register("beta", object)
    with pytest.raises(ValueError, match=r"unknown widget 'gamma'.*\['alpha', 'beta'\]"):
        reg.get("gamma")


def test_primary_names_skip_aliases():
    reg = Registry("widget")
    reg.register("zeta", int, description="the integers")
    reg.register("a_int", int, description="alias of 'zeta'")
    reg.register("only_alias", float, description="alias of nothing registered")
    reg.register("beta", str)
    assert reg.primary_names() == ["beta", "only_alias", "zeta"]


def test_duplicate_registration_lists_valid_keys():
    reg = Registry("widget")
    reg.register("alpha", object)
    with pytest.raises(ValueError, match=r"'ALPHA' is already registered.*\['alpha'\]"):
        reg.register("ALPHA", int)


def test_bad_names_are_type_errors():
    reg = Registry("widget")
    with pytest.raises(TypeError):
        reg.register("", object)
    with pytest.raises(TypeError):
        reg.get(3)


def test_scoped_restores_entries():
    reg = Registry("widget")
    reg.register("keep", object)
    with reg.scoped():
        reg.register("temp", int)
        reg.unregister("keep")
        assert reg.keys() == ["temp"]
    assert reg.keys() == ["keep"]


def test_public_registries_are_exported_under_seed_names():
    assert seqblocks.attention_registry is seqblocks.mixer_registry
    for name in ("layer_norm", "rms_norm"):
        assert name in seqblocks.norm_registry
    for name in ("standard", "relu", "gated", "geglu", "relu2"):
        assert name in seqblocks.ffn_registry
    for name in ("rope", "alibi", "sinusoidal", "learned", "none"):
        assert name in seqblocks.position_registry
    assert "none" in attention_registry


def test_user_registers_components_and_builds_them_by_name():
    with attention_registry.scoped(), ffn_registry.scoped():

        @ffn_registry.register("doubler")
        class Doubler(FFNBase):
            def forward(self, x):
                return 2 * x

        @attention_registry.register("zero_attention")
        class Zero(nn.Module):
            def __init__(self, config):
                super().__init__()
                self.config = config

            def forward(self, x, mask=None, cache=None):
                return torch.zeros_like(x), cache

        config = BlockConfig(attention="zero_attention", ffn="doubler", norm="rms_norm", d_model=8, n_heads=2)
        block = ConfigurableBlock(config)
        x = torch.randn(2, 3, 8)
        out, cache = block(x)
        # attention adds zero; the FFN adds 2 * rms_norm(x)
        expected = x + 2 * block.ffn_norm(x)
        torch.testing.assert_close(out, expected)
        assert cache is None
    assert "doubler" not in ffn_registry and "zero_attention" not in attention_registry


def test_unknown_component_in_config_lists_valid_names():
    with pytest.raises(ValueError, match="unknown ffn 'nope'.*standard"):
        ConfigurableBlock(BlockConfig(attention="none", ffn="nope", d_model=8, n_heads=2))

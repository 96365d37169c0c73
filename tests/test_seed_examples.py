"""The seed documents' own examples, run as written with only the import lines changed.

Each snippet is cut out of its seed document (``<repo>/../shared/seeds/NNN_*.txt``) between two marker
lines; where that folder is absent (a clone elsewhere), the copies committed in ``tests/seed_examples/``
are used, and where it is present the copies are checked against it. Only ``import`` lines are rewritten
(``from lrnnx.<module> import X`` -> ``from seqblocks import X``). A snippet that uses names the document
leaves to the reader (``blocks``, ``SomeMixerClass``) gets them in its namespace, said per test.

Seeds 001 (MLX), 003 and 004 (JAX / Flax) are not PyTorch; their documented examples are written out
below in PyTorch with the seeds' argument names and defaults.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch
from torch import nn

import seqblocks
from seqblocks import MHA, Block, BlockConfig, ConfigurableBlock, DecoderBlock, EncoderBlock, GatedMLP

HERE = Path(__file__).resolve().parent
SEEDS = HERE.parent.parent / "shared" / "seeds"
COPIES = HERE / "seed_examples"

# name -> (seed number, first line of the snippet, the line after its end)
SNIPPETS = {
    "000_class_definition": ("000", "from lrnnx.layers.block import Block", "Parameters"),
    "000_forward": ("000", "hidden_states, residual = block.forward(", "Pass the input through the block"),
    "000_allocate_inference_cache": ("000", "cache = block.allocate_inference_cache(", "Allocate inference cache"),
    "000_usage_example": ("000", "import torch", "Architecture Integration"),
    "000_architecture_integration": ("000", "class MyModel(nn.Module):", "Notes"),
    "002_basic_language_model": ("002", "import torch", "Hybrid Architecture with Attention"),
    "002_hybrid_architecture": ("002", "# Mix different LRNN types with attention", "Autoregressive Generation"),
    "002_autoregressive_generation": ("002", "# Allocate cache for efficient generation", "Save and Load"),
    "002_save_and_load": ("002", "# Save model", "Methods"),
}


def _extract(text: str, start: str, end: str) -> str:
    lines = text.splitlines()
    first = next(i for i, line in enumerate(lines) if line.startswith(start))
    last = next(i for i in range(first + 1, len(lines)) if lines[i].strip() == end or lines[i].startswith(end))
    return "\n".join(lines[first:last]).strip() + "\n"


def snippet(name: str) -> str:
    """The snippet as the seed document has it (from the seeds folder, else the committed copy)."""
    number, start, end = SNIPPETS[name]
    found = sorted(SEEDS.glob(f"{number}_*.txt")) if SEEDS.is_dir() else []
    if found:
        return _extract(found[0].read_text(encoding="utf-8"), start, end)
    return (COPIES / f"{name}.txt").read_text(encoding="utf-8")


_FROM = re.compile(r"^(\s*)from lrnnx(?:\.[\w.]+)? import (.+)$")
_IMPORT = re.compile(r"^(\s*)import lrnnx(?:\.[\w.]+)?\s*$")


def to_seqblocks(code: str) -> str:
    """Rewrite the import lines only; every other line is left as the document wrote it."""
    out = []
    for line in code.splitlines():
        line = _FROM.sub(r"\1from seqblocks import \2", line)
        line = _IMPORT.sub(r"\1import seqblocks as lrnnx", line)
        out.append(line)
    return "\n".join(out) + "\n"


def run(name: str, namespace: dict | None = None) -> dict:
    namespace = {} if namespace is None else namespace
    exec(compile(to_seqblocks(snippet(name)), f"<seed {name}>", "exec"), namespace)  # noqa: S102
    return namespace


@pytest.mark.skipif(not SEEDS.is_dir(), reason="the seeds folder is not beside this clone")
@pytest.mark.parametrize("name", sorted(SNIPPETS))
def test_committed_copies_match_the_seeds(name):
    assert (COPIES / f"{name}.txt").read_text(encoding="utf-8") == snippet(name)


def test_import_rewrite_touches_only_imports():
    code = "from lrnnx.layers.block import Block\nx = 'from lrnnx.a import b'\nimport lrnnx\n"
    assert to_seqblocks(code) == "from seqblocks import Block\nx = 'from lrnnx.a import b'\nimport seqblocks as lrnnx\n"


# ---------------------------------------------------------------- seed 000: Block


def test_000_usage_example_and_forward_and_cache():
    # The document loops over ``blocks`` without defining it: we stack two blocks built its way.
    code = to_seqblocks(snippet("000_usage_example"))
    head, tail = code.split("# Stack multiple blocks")
    ns: dict = {}
    exec(compile(head, "<seed 000 usage>", "exec"), ns)  # noqa: S102
    assert ns["hidden_states"].shape == (2, 128, 768) and ns["residual"].shape == (2, 128, 768)
    make = ns["Block"]
    ns["blocks"] = [make(dim=768, mixer_cls=lambda dim: ns["MHA"](embed_dim=dim, num_heads=12, causal=True),
                         mlp_cls=lambda dim: ns["GatedMLP"](in_features=dim), norm_cls=nn.LayerNorm,
                         fused_add_norm=True) for _ in range(2)]
    with torch.no_grad():
        exec(compile(tail, "<seed 000 usage, stacking>", "exec"), ns)  # noqa: S102
    assert ns["hidden_states"].shape == (2, 128, 768) and torch.isfinite(ns["hidden_states"]).all()

    ns["mixer_kwargs"] = {}  # the document's ``**mixer_kwargs``: none
    ns["hidden_states"] = ns["x"]
    run("000_forward", ns)
    assert ns["hidden_states"].shape == (2, 128, 768)
    run("000_allocate_inference_cache", ns)
    assert ns["cache"] is not None


def test_000_class_definition():
    # ``SomeMixerClass`` is the reader's: any mixer built from ``dim``.
    class SomeMixerClass(MHA):
        def __init__(self, dim):
            super().__init__(dim, num_heads=12)

    ns = run("000_class_definition", {"SomeMixerClass": SomeMixerClass, "GatedMLP": GatedMLP, "nn": nn})
    block = ns["block"]
    assert isinstance(block, Block) and isinstance(block.mixer, SomeMixerClass)
    h, r = block(torch.randn(1, 5, 768))
    assert h.shape == r.shape == (1, 5, 768)


def test_000_architecture_integration():
    ns = run("000_architecture_integration", {"Block": Block, "MHA": MHA, "GatedMLP": GatedMLP, "nn": nn})
    model = ns["MyModel"](dim=48, n_layers=2)
    assert model(torch.randn(2, 6, 48)).shape == (2, 6, 48)


# ---------------------------------------------------------------- seed 002: LRNNLMHeadModel


# The examples build GPT-2-sized models (50,257-token vocabulary, widths 512 and 768): tens of seconds on
# a 2-core CPU, so they run with the slow tests.
pytestmark_lm = pytest.mark.slow


@pytest.fixture(scope="module")
def lm_examples():
    """The basic and hybrid examples, then generation, in one namespace as the document reads."""
    torch.manual_seed(0)
    ns = run("002_basic_language_model")
    basic_logits = ns["logits"]
    run("002_hybrid_architecture", ns)
    with torch.no_grad():
        run("002_autoregressive_generation", ns)
    return ns, basic_logits


@pytestmark_lm
def test_002_basic_language_model(lm_examples):
    ns, logits = lm_examples
    assert logits.shape == (2, 128, 50257) and torch.isfinite(logits).all()


@pytestmark_lm
def test_002_hybrid_and_generation(lm_examples):
    ns, _ = lm_examples
    model = ns["model"]
    assert model.mixer_types == ["S5", "S5", "attn", "Mamba", "Mamba", "attn"]
    assert model.layers[2].mixer.num_heads == 12
    assert ns["input_ids"].shape == (1, 1) and 0 <= int(ns["input_ids"]) < 50257


def _save_load(ns, tmp_path, monkeypatch, code):
    monkeypatch.chdir(tmp_path)
    exec(compile(code, "<seed 002 save and load>", "exec"), ns)  # noqa: S102
    loaded, model = ns["loaded_model"], ns["model"]
    ids = torch.randint(0, 50257, (1, 9))
    with torch.no_grad():
        expected = model(ids).logits
        got = loaded(ids.to(loaded.embedding.weight.device)).logits.cpu()
    torch.testing.assert_close(got, expected)


@pytestmark_lm
@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="the example loads onto CUDA")
def test_002_save_and_load_as_written(lm_examples, tmp_path, monkeypatch):
    _save_load(dict(lm_examples[0]), tmp_path, monkeypatch, to_seqblocks(snippet("002_save_and_load")))


@pytestmark_lm
def test_002_save_and_load_on_cpu(lm_examples, tmp_path, monkeypatch):
    # The one change: the document loads onto torch.device("cuda"); this machine may have none.
    code = to_seqblocks(snippet("002_save_and_load"))
    assert 'torch.device("cuda")' in code
    _save_load(dict(lm_examples[0]), tmp_path, monkeypatch, code.replace('torch.device("cuda")', 'torch.device("cpu")'))


# ---------------------------------------------------------------- seed 001 (MLX): ConfigurableBlock


def test_001_config_and_call_contract():
    config = BlockConfig(attention="sliding_window", ffn="gated", norm="rms_norm", position="rope",
                         d_model=512, n_heads=8)
    block = ConfigurableBlock(config)
    x = torch.randn(1, 16, 512)
    out, cache = block(x)  # training: (output, None)
    assert out.shape == x.shape and cache is None
    # "populated during generation": outside training the call returns a cache that continues.
    block.eval()
    with torch.no_grad():
        full, _ = block(x)
        head, cache = block(x[:, :10])
        assert cache is not None
        pieces = [head]
        for t in range(10, 16):
            y, cache = block(x[:, t : t + 1], cache=cache)
            pieces.append(y)
    torch.testing.assert_close(torch.cat(pieces, 1), full, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("pre_norm", [True, False])
def test_001_pre_and_post_norm(pre_norm):
    config = BlockConfig(attention="gqa", ffn="gated", norm="rms_norm", position="rope", d_model=32, n_heads=4,
                         n_kv_heads=2, d_ff=64, pre_norm=pre_norm)
    block = ConfigurableBlock(config)
    x = torch.randn(2, 5, 32)
    h = block.attention(block.attn_norm(x) if pre_norm else x)
    if pre_norm:
        x1 = x + h
        expected = x1 + block.ffn(block.ffn_norm(x1))
    else:
        x1 = block.attn_norm(x + h)
        expected = block.ffn_norm(x1 + block.ffn(x1))
    torch.testing.assert_close(block(x)[0], expected)


@pytest.mark.parametrize("name", ["mha", "gqa", "mla", "sliding_window_gqa", "chunked_gqa", "sparse_gqa",
                                  "gated_deltanet", "mamba2", "mamba3", "none"])
def test_001_mixer_names(name):
    fields = dict(d_model=32, n_heads=4, n_kv_heads=2, d_ff=64, norm="rms_norm", ffn="gated", position="rope")
    fields.update({"mla": dict(kv_lora_rank=8, rope_dim=4), "sliding_window_gqa": dict(window_size=4),
                   "chunked_gqa": dict(attention_chunk_size=4), "sparse_gqa": dict(sparse_select_k=4)}.get(name, {}))
    block = ConfigurableBlock(BlockConfig(attention=name, **fields))
    assert block(torch.randn(2, 6, 32))[0].shape == (2, 6, 32)


# ---------------------------------------------------------------- seeds 003 / 004 (JAX): encoder / decoder


@pytest.mark.parametrize("norm_type", ["layer", "rms"])
@pytest.mark.parametrize("attention_type", ["standard", "memory_efficient", "flash", "pallas_flash", "linear", "lite"])
def test_003_encoder_block(norm_type, attention_type):
    block = EncoderBlock(d_model=32, num_heads=4, d_ff=64, dropout_rate=0.1, pre_norm=True,
                         attention_type=attention_type, attention_block_size=512, linear_attention_chunk_size=64,
                         norm_type=norm_type, ff_activation="gelu", num_kv_heads=2)
    block.eval()
    x = torch.randn(2, 7, 32)
    assert block(x).shape == x.shape
    assert type(block.ln1).__name__ == {"layer": "LayerNorm", "rms": "RMSNorm"}[norm_type]


def test_003_decoder_block():
    block = DecoderBlock(d_model=32, num_heads=4, d_ff=64, norm_type="rms", attention_type="pallas_flash",
                         num_kv_heads=1, attention_window=4, use_rope=True).eval()
    x, memory = torch.randn(2, 5, 32), torch.randn(2, 9, 32)
    assert block(x, memory).shape == x.shape


def test_004_pre_ln_encoder_block():
    # The tutorial's block: x + attn(ln1(x)), then x + ff2(relu(ff1(ln2(x)))), two LayerNorms.
    torch.manual_seed(0)
    block = EncoderBlock(d_model=16, num_heads=4, d_ff=32, pre_norm=True, norm_type="layer", ff_activation="relu")
    x = torch.randn(1, 6, 16)
    h = x + block.attn(block.ln1(x))
    expected = h + block.ff2(torch.relu(block.ff1(block.ln2(h))))
    torch.testing.assert_close(block(x), expected)
    assert isinstance(seqblocks.EncoderBlock(16, 4, 32), EncoderBlock)

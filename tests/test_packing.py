"""Packed documents (cu_seqlens / document_ids) through every registered mixer and both language models:
the packed forward and its gradients equal each document run alone."""

from __future__ import annotations

import pytest
import torch

from seqblocks import LRNNLMHeadModel
from seqblocks.config import BlockConfig
from seqblocks.layers.mixer import run_mixer
from seqblocks.layers.packing import (
    cu_seqlens_from_document_ids,
    packed_positions,
    packed_targets,
    packing_offsets,
)
from seqblocks.models.config_lm import LanguageModel, LanguageModelConfig
from seqblocks.registry import MIXERS
from seqblocks.testing import assert_close


def registered_types() -> list[str]:
    """One name per registered mixer class, identity mixers excluded (iterated, never a hand list)."""
    seen, names = set(), []
    for name, cls in MIXERS.items():
        if cls not in seen and not getattr(cls, "is_identity", False):
            seen.add(cls)
            names.append(name)
    return names


MIXER_TYPES = registered_types()
SMALL = {"sliding_window": {"window_size": 3}, "mamba2": {"headdim": 8}, "mamba3": {"headdim": 8},
         "chunked_gqa": {"attention_chunk_size": 4}, "sparse_gqa": {"sparse_select_k": 2}}
DOCS = (5, 3, 4)  # one row of 12 tokens: three documents
ROW2 = (2, 6, 4)  # a second row


def tiny_lm(name: str, **kwargs) -> LRNNLMHeadModel:
    torch.manual_seed(0)
    mixer_kwargs = {name: SMALL[name]} if name in SMALL else None
    return LRNNLMHeadModel(d_model=16, d_state=4, n_layer=2, vocab_size=29, mixer_types=[name, name],
                           d_intermediate=24, mixer_kwargs=mixer_kwargs, dtype=torch.float64,
                           initializer_cfg={"initializer_range": 1.0}, **kwargs).eval()


def offsets(*rows: tuple[int, ...]) -> torch.Tensor:
    lengths = torch.tensor([n for row in rows for n in row])
    return torch.cat([torch.zeros(1, dtype=torch.long), lengths.cumsum(0)])


def separate(model, ids: torch.Tensor, rows: tuple[tuple[int, ...], ...]) -> list[torch.Tensor]:
    """Each document run alone: its logits."""
    out = []
    for b, row in enumerate(rows):
        start = 0
        for n in row:
            out.append(model(ids[b:b + 1, start:start + n]).logits[0])
            start += n
    return out


@pytest.mark.parametrize("name", MIXER_TYPES)
def test_packed_equals_separate(name):
    model = tiny_lm(name)
    rows = (DOCS, ROW2)
    ids = torch.randint(0, 29, (2, 12), generator=torch.Generator().manual_seed(1))
    packed = model(ids, cu_seqlens=offsets(*rows)).logits  # [2, 12, V]
    alone = separate(model, ids, rows)
    assert_close(packed.reshape(-1, packed.shape[-1]), torch.cat(alone), atol=1e-9,
                 msg=f"{name}: packed logits != each document alone")
    # gradients of a loss over the packed batch == the sum of the documents' losses
    weight = torch.randn(packed.shape, dtype=packed.dtype, generator=torch.Generator().manual_seed(2))
    model.zero_grad()
    (model(ids, cu_seqlens=offsets(*rows)).logits * weight).sum().backward()
    g_packed = {k: p.grad.clone() for k, p in model.named_parameters() if p.grad is not None}
    model.zero_grad()
    (torch.cat(separate(model, ids, rows)) * weight.reshape(-1, weight.shape[-1])).sum().backward()
    g_alone = {k: p.grad.clone() for k, p in model.named_parameters() if p.grad is not None}
    assert g_packed.keys() == g_alone.keys()
    for k in g_alone:
        assert_close(g_packed[k], g_alone[k], atol=1e-7, rtol=1e-5, msg=f"{name}: gradient of {k}")


@pytest.mark.parametrize("name", MIXER_TYPES)
def test_mixer_takes_cu_seqlens(name):
    """At the mixer level: every registered mixer takes cu_seqlens over a batch of one."""
    model = tiny_lm(name)
    mixer = model.layers[0].mixer
    x = torch.randn(1, 12, 16, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    cu = offsets(DOCS)
    y = run_mixer(mixer, x, None, {"cu_seqlens": cu})
    alone = torch.cat([run_mixer(mixer, x[:, s:e]) for s, e in zip(cu[:-1].tolist(), cu[1:].tolist(), strict=True)],
                      1)
    assert_close(y, alone, atol=1e-9, msg=f"{name}: packed mixer output != documents alone")


def test_document_ids_equal_cu_seqlens():
    model = tiny_lm("mha")
    ids = torch.randint(0, 29, (2, 12), generator=torch.Generator().manual_seed(4))
    doc = torch.tensor([[0] * 5 + [1] * 3 + [2] * 4, [7] * 2 + [3] * 6 + [7] * 4])
    a = model(ids, document_ids=doc).logits
    b = model(ids, cu_seqlens=offsets(DOCS, ROW2)).logits
    assert torch.equal(a, b)
    assert cu_seqlens_from_document_ids(doc).tolist() == offsets(DOCS, ROW2).tolist()


def test_row_starts_are_boundaries():
    # A document never spans rows: offsets without the row start give the same result.
    cu = packing_offsets("t", 2, 6, cu_seqlens=torch.tensor([0, 2, 9, 12], dtype=torch.int32))
    assert cu.tolist() == [0, 2, 6, 9, 12]
    assert packed_positions(cu, 12).tolist() == [0, 1, 0, 1, 2, 3, 0, 1, 2, 0, 1, 2]


def test_additive_positions_restart():
    config = LanguageModelConfig.tiny_gpt2(vocab_size=29)
    model = LanguageModel(config, dtype=torch.float64).eval()
    ids = torch.randint(0, 29, (1, 12), generator=torch.Generator().manual_seed(5))
    packed = model(ids, cu_seqlens=offsets(DOCS)).logits[0]
    alone = torch.cat(separate(model, ids, (DOCS,)))
    assert_close(packed, alone, atol=1e-9, msg="LanguageModel (learned positions): packed != alone")


def test_language_model_hybrid_packed():
    config = LanguageModelConfig.from_pattern(["mamba", "mha", "s4d"], vocab_size=29, d_model=16)
    model = LanguageModel(config, dtype=torch.float64).eval()
    ids = torch.randint(0, 29, (2, 12), generator=torch.Generator().manual_seed(6))
    packed = model(ids, cu_seqlens=offsets(DOCS, ROW2)).logits
    alone = torch.cat(separate(model, ids, (DOCS, ROW2)))
    assert_close(packed.reshape(-1, 29), alone, atol=1e-9, msg="LanguageModel hybrid: packed != alone")


def test_packed_targets():
    ids = torch.arange(12).view(2, 6)
    t = packed_targets(ids, cu_seqlens=torch.tensor([0, 2, 6, 9, 12]))
    assert t.tolist() == [[1, -100, 3, 4, 5, -100], [7, 8, -100, 10, 11, -100]]
    doc = torch.tensor([[0, 0, 1, 1, 1, 1], [1, 1, 1, 2, 2, 2]])
    assert torch.equal(packed_targets(ids, document_ids=doc), t)
    with pytest.raises(ValueError, match="cu_seqlens or document_ids"):
        packed_targets(ids)


def test_packing_errors():
    model = tiny_lm("s4d")
    ids = torch.zeros(2, 6, dtype=torch.long)
    with pytest.raises(TypeError, match="cu_seqlens must be an int32 / int64 tensor"):
        model(ids, cu_seqlens=torch.tensor([0.0, 12.0]))
    with pytest.raises(ValueError, match=r"rise from 0 to T=12"):
        model(ids, cu_seqlens=torch.tensor([0, 5, 10]))
    with pytest.raises(ValueError, match=r"rise from 0 to T=12"):
        model(ids, cu_seqlens=torch.tensor([0, 7, 5, 12]))
    with pytest.raises(ValueError, match=r"\[num_docs \+ 1\]"):
        model(ids, cu_seqlens=torch.tensor([[0, 12]]))
    with pytest.raises(ValueError, match="not both"):
        model(ids, cu_seqlens=torch.tensor([0, 12]), document_ids=torch.zeros(2, 6, dtype=torch.long))
    with pytest.raises(ValueError, match=r"document_ids must be \[B, T\] = \[2, 6\]"):
        model(ids, document_ids=torch.zeros(2, 5, dtype=torch.long))
    with pytest.raises(TypeError, match="document_ids must be an int32 / int64 tensor"):
        model(ids, document_ids=torch.zeros(2, 6))
    with pytest.raises(ValueError, match=r"take no \['lengths'\]"):
        model(ids, cu_seqlens=torch.tensor([0, 12]), lengths=torch.tensor([6, 6]))
    with pytest.raises(ValueError, match=r"take no \['inference_params'\]"):
        model(ids, cu_seqlens=torch.tensor([0, 12]), inference_params=model.allocate_inference_cache(2, 6))
    with pytest.raises(ValueError, match="multi-token prediction"):
        tiny_lm("s4d", mtp_n_predict=1)(ids, cu_seqlens=torch.tensor([0, 12]))


def test_mixer_level_errors():
    mixer = tiny_lm("s4d").layers[0].mixer
    x = torch.randn(2, 6, 16, dtype=torch.float64)
    with pytest.raises(ValueError, match="batch of 1"):
        run_mixer(mixer, x, None, {"cu_seqlens": torch.tensor([0, 6])})
    with pytest.raises(ValueError, match="either lengths or cu_seqlens"):
        run_mixer(mixer, x[:1], None, {"cu_seqlens": torch.tensor([0, 6]), "lengths": torch.tensor([6])})


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_packed_low_precision(dtype):
    model = tiny_lm("mha").to(dtype)
    ids = torch.randint(0, 29, (1, 12), generator=torch.Generator().manual_seed(7))
    with torch.no_grad():
        packed = model(ids, cu_seqlens=offsets(DOCS)).logits[0].float()
        alone = torch.cat(separate(model, ids, (DOCS,))).float()
    assert packed.dtype == torch.float32 and torch.isfinite(packed).all()
    assert_close(packed, alone, atol=0.1 * float(alone.abs().max()), msg=f"{dtype}: packed != alone")


def test_configurable_block_gqa_packed():
    """A ConfigurableBlock-built attention (GQA with a block RoPE) takes cu_seqlens too."""
    config = LanguageModelConfig(vocab_size=29, blocks=(BlockConfig(d_model=16, n_heads=2, attention="gqa",
                                                                    n_kv_heads=1, position="rope"),) * 2)
    model = LanguageModel(config, dtype=torch.float64).eval()
    ids = torch.randint(0, 29, (1, 12), generator=torch.Generator().manual_seed(8))
    packed = model(ids, cu_seqlens=offsets(DOCS)).logits[0]
    assert_close(packed, torch.cat(separate(model, ids, (DOCS,))), atol=1e-9, msg="rope GQA: packed != alone")


def _mha_alone(mixer, x, cu):
    return torch.cat([mixer(x[:, s:e]) for s, e in zip(cu[:-1].tolist(), cu[1:].tolist(), strict=True)], 1)


@pytest.mark.parametrize("options", [
    {"rotary_emb_dim": 8},
    {"rotary_emb_dim": 8, "window_size": 2, "softcap": 5.0},
    {"causal": False},
    {"attention_type": "standard", "mask_mod": lambda b, h, q, kv: (q - kv) % 2 == 0},
    {"attention_type": "flex"},
])
def test_mha_block_diagonal(options):
    """MHA's native packed path (a document mask, in-document positions) == each document alone."""
    from seqblocks.layers.attention.mha import MHA

    torch.manual_seed(0)
    mixer = MHA(16, 2, dtype=torch.float64, **options).eval()
    x = torch.randn(1, 12, 16, dtype=torch.float64)
    cu = offsets(DOCS)
    with torch.no_grad():  # flex has no CPU backward
        assert_close(mixer(x, cu_seqlens=cu), _mha_alone(mixer, x, cu), atol=1e-9, msg=f"MHA {options}")


@pytest.mark.parametrize("causal", [True, False])
def test_nonfinite_stays_in_its_document(causal):
    from seqblocks.layers.attention.mha import MHA

    torch.manual_seed(0)
    mixer = MHA(16, 2, causal=causal, dtype=torch.float64).eval()
    x = torch.randn(1, 12, 16, dtype=torch.float64)
    x[0, 1] = float("nan")  # in the first document (tokens 0..4)
    y = mixer(x, cu_seqlens=offsets(DOCS))
    assert torch.isnan(y[0, 1 if causal else 0:5]).all()
    assert torch.isfinite(y[0, 5:]).all()
    assert_close(y[0, 5:], _mha_alone(mixer, x[:, 5:], offsets(DOCS[1:]))[0], atol=1e-9, msg="later documents")


@pytest.mark.parametrize("position", ["sinusoidal", "learned", "rope", "alibi"])
@pytest.mark.parametrize("stack", ["encoder", "decoder_only"])
def test_transformer_stacks_packed(position, stack):
    from seqblocks.models.transformer import TransformerDecoder, TransformerEncoder

    torch.manual_seed(0)
    common = dict(d_model=16, num_layers=2, num_heads=2, d_ff=32, position=position, max_seq_len=16,
                  dtype=torch.float64)
    model = (TransformerEncoder(29, **common) if stack == "encoder"
             else TransformerDecoder(29, cross_attention=False, **common)).eval()
    ids = torch.randint(0, 29, (2, 12), generator=torch.Generator().manual_seed(9))
    packed = model(ids, cu_seqlens=offsets(DOCS, ROW2))
    alone = []
    for b, row in enumerate((DOCS, ROW2)):
        start = 0
        for n in row:
            alone.append(model(ids[b:b + 1, start:start + n])[0])
            start += n
    assert_close(packed.reshape(-1, packed.shape[-1]), torch.cat(alone), atol=1e-9, msg=f"{stack} {position}")
    doc = torch.tensor([[0] * 5 + [1] * 3 + [2] * 4, [7] * 2 + [3] * 6 + [7] * 4])
    assert torch.equal(model(ids, document_ids=doc), packed)
    with pytest.raises(ValueError, match=r"take no \['mask'\]"):
        model(ids, mask=torch.ones(2, 12, dtype=torch.bool), cu_seqlens=offsets(DOCS, ROW2))


def test_cross_attention_decoder_refuses_packing():
    from seqblocks.models.transformer import TransformerDecoder

    model = TransformerDecoder(29, d_model=16, num_layers=1, num_heads=2, d_ff=32)
    with pytest.raises(ValueError, match="decoder-only stack"):
        model(torch.zeros(1, 4, dtype=torch.long), torch.zeros(1, 3, 16), cu_seqlens=torch.tensor([0, 4]))

"""Speculative self-drafting on CUDA: the same greedy tokens as plain decoding, bf16 included.

Run on a GPU machine: ``python -m pytest tests/test_mtp_gpu.py -m gpu``.
"""

from __future__ import annotations

import pytest
import torch

import seqblocks  # noqa: F401  (registers the mixers)
from seqblocks.generation import generate
from seqblocks.models.lrnn_lm import LRNNLMHeadModel

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]


@pytest.mark.parametrize("types", [["attn", "attn"], ["mamba2", "attn"], ["mamba", "mla"]])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_mtp_draft_greedy_equals_plain_greedy_on_cuda(types, dtype):
    torch.manual_seed(0)
    model = LRNNLMHeadModel(128, 16, len(types), 97, types, d_intermediate=256, mtp_n_predict=3,
                            mixer_kwargs={"attn": {"num_heads": 4}, "mamba2": {"headdim": 32}, "mla": {"num_heads": 4}},
                            device="cuda", dtype=dtype).eval()
    prompt = torch.randint(0, 97, (4, 16), device="cuda")
    plain = generate(model, prompt, 32, temperature=0, return_scores=True)
    drafted = generate(model, prompt, 32, temperature=0, mtp_draft=True)
    if dtype == torch.float32:
        assert torch.equal(drafted.tokens, plain.tokens)
    else:
        # A verification call over several tokens and a one-token step may round bf16 differently, so
        # a row may leave plain greedy's path, but only where plain greedy's top two logits nearly tie.
        for row in range(prompt.shape[0]):
            differ = (drafted.tokens[row] != plain.tokens[row]).nonzero()
            if len(differ):
                top2 = plain.scores[row, int(differ[0])].topk(2).values
                assert float(top2[0] - top2[1]) < 0.25
    assert 0.0 <= drafted.draft_acceptance <= 1.0

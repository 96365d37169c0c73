"""torch.compile traces the language model in one graph, silently.

Host-side checks (token ids in range, lengths, cache capacity) read tensor values and would break the
graph; they are skipped while compiling (``seqblocks.cache.host_sync_unsafe``). Dynamo runs here with the
"eager" backend, which traces exactly as Inductor does but needs no compiler.
"""

from __future__ import annotations

import warnings

import pytest
import torch

from seqblocks.models import LRNNLMHeadModel

# Mamba's CPU selective scan recomputes its chunks with torch.autograd.grad in backward, which Dynamo
# does not trace (a graph break, still correct); on CUDA the Triton kernel serves it instead.
HYBRIDS = [["attn", "lru"], ["s4d", "gqa"], ["rglru", "s5"], ["s4", "centaurus"], ["s7", "mla"], ["mamba2", "attn"]]


@pytest.mark.parametrize("types", HYBRIDS, ids=lambda t: "+".join(t))
def test_lm_compiles_to_one_graph_without_warnings(types):
    torch.manual_seed(0)
    model = LRNNLMHeadModel(d_model=32, d_state=8, n_layer=len(types), vocab_size=50, mixer_types=types,
                            d_intermediate=64)
    ids = torch.randint(0, 50, (2, 12))
    torch._dynamo.reset()
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)  # the warnings Dynamo gives about user code
        explained = torch._dynamo.explain(model)(ids)
    assert explained.graph_break_count == 0, [str(b.reason)[:200] for b in explained.break_reasons]
    compiled = torch.compile(model, backend="eager")
    torch.testing.assert_close(compiled(ids).logits, model(ids).logits)

"""The CUDA-graph decoder cache of ``seqblocks.generation``: its keys and invalidation, on the CPU.

Capturing needs a GPU (``tests/test_decode_gpu.py`` checks the tokens there); here a stand-in decoder
records every capture so that reuse and invalidation can be checked anywhere.
"""

from __future__ import annotations

import pytest
import torch
from test_lm import tiny_lm

from seqblocks import generation
from seqblocks.generation import clear_graph_cache, count_aten_calls, graph_cache_key, graph_decoder


class StandInDecoder:
    """Records its construction in ``captures`` and keeps the caches, as ``CUDAGraphDecoder`` does."""

    captures: list = []

    def __init__(self, model, caches, timestep_dtype=None):
        self.caches = caches
        StandInDecoder.captures.append((model, caches.batch_size, caches.max_seqlen, timestep_dtype))


@pytest.fixture
def stand_in(monkeypatch):
    StandInDecoder.captures = []
    monkeypatch.setattr(generation, "CUDAGraphDecoder", StandInDecoder)
    yield StandInDecoder.captures
    clear_graph_cache()


CUDA = torch.device("cuda")  # never touched: the stand-in captures nothing


def test_key_follows_shapes_mode_and_parameters():
    model = tiny_lm(["mamba"], dtype=torch.float32)
    key = graph_cache_key(model, 2, 16, CUDA)
    assert graph_cache_key(model, 2, 16, CUDA) == key
    assert graph_cache_key(model, 3, 16, CUDA)[0] != key[0]
    assert graph_cache_key(model, 2, 17, CUDA)[0] != key[0]
    assert graph_cache_key(model, 2, 16, CUDA, torch.float32)[0] != key[0]
    assert graph_cache_key(model, 2, 16, torch.device("cuda", 1))[0] != key[0]
    model.train()
    assert graph_cache_key(model, 2, 16, CUDA)[1] != key[1]
    model.eval()
    assert graph_cache_key(model, 2, 16, CUDA) == key
    with torch.no_grad():
        next(model.parameters()).add_(1.0)  # an optimizer step: same storage, new version
    assert graph_cache_key(model, 2, 16, CUDA)[1] != key[1]
    key = graph_cache_key(model, 2, 16, CUDA)
    model.to(torch.float64)  # cast: new storages and dtypes
    assert graph_cache_key(model, 2, 16, CUDA)[1] != key[1]
    key = graph_cache_key(model, 2, 16, CUDA)
    name, p = next(model.named_parameters())
    model.get_submodule(name.rsplit(".", 1)[0]).register_parameter(name.rsplit(".", 1)[1],
                                                                    torch.nn.Parameter(p.detach().clone()))
    assert graph_cache_key(model, 2, 16, CUDA)[1] != key[1]  # a replaced parameter


def test_decoder_is_reused_with_its_caches_reset(stand_in):
    model = tiny_lm(["mamba", "attn"], dtype=torch.float32)
    first = graph_decoder(model, 2, 16, CUDA)
    for t in first.caches.tensors():
        t.fill_(3)
    again = graph_decoder(model, 2, 16, CUDA)
    assert again is first and len(stand_in) == 1
    assert all(not bool(t.any()) for t in again.caches.tensors())  # reset to an empty prefix
    other = graph_decoder(model, 4, 16, CUDA)
    assert other is not first and len(stand_in) == 2
    assert graph_decoder(model, 2, 16, CUDA) is first  # both shapes stay cached


def test_changed_parameters_capture_again_and_drop_stale_graphs(stand_in):
    model = tiny_lm(["mamba"], dtype=torch.float32)
    first = graph_decoder(model, 2, 16, CUDA)
    graph_decoder(model, 4, 16, CUDA)
    with torch.no_grad():
        next(model.parameters()).mul_(0.5)
    fresh = graph_decoder(model, 2, 16, CUDA)
    assert fresh is not first and len(stand_in) == 3
    assert list(generation._GRAPHS[model]) == [graph_cache_key(model, 2, 16, CUDA)[0]]  # the stale one is gone
    clear_graph_cache(model)
    assert model not in generation._GRAPHS
    assert graph_decoder(model, 2, 16, CUDA) is not fresh


def test_graph_decoder_refuses_a_cpu_device(stand_in):
    model = tiny_lm(["mamba"], dtype=torch.float32)
    with pytest.raises(ValueError, match="CUDA"):
        graph_decoder(model, 2, 16, torch.device("cpu"))
    assert stand_in == []


def test_the_cache_does_not_keep_the_model_alive(stand_in):
    import gc

    model = tiny_lm(["mamba"], dtype=torch.float32)
    graph_decoder(model, 2, 16, CUDA)
    stand_in.clear()  # the stand-in's record holds the model; a real decoder does not
    del model
    gc.collect()
    assert len(generation._GRAPHS) == 0


def test_count_aten_calls_counts_the_eager_step():
    model = tiny_lm(["mamba"], dtype=torch.float32)
    caches = model.allocate_inference_cache(1, 8)
    tokens = torch.zeros(1, 1, dtype=torch.long)
    with torch.no_grad():
        model.step(tokens, caches)
        top, total = count_aten_calls(lambda: model.step(tokens, caches))
    assert 0 < top <= total


@pytest.mark.parametrize("lengths", [None, torch.tensor([5, 2, 4])])
def test_fast_bookkeeping_equals_the_general_loop(lengths):
    """Without stop conditions ``generate`` writes one column per step; a stop sequence that never
    matches sends it through the general loop, which must give the same everything."""
    from seqblocks import generate

    model = tiny_lm(["mamba", "attn"], dtype=torch.float32)
    prompt = torch.randint(0, 37, (3, 5))
    runs = []
    for stop in (None, [list(range(1, 12))]):
        calls = []
        out = generate(model, prompt, 9, lengths=lengths, temperature=1.0, seed=3, repetition_penalty=1.3,
                       return_scores=True, stop_sequences=stop,
                       callback=lambda t, a, calls=calls: calls.append((t.clone(), a.clone())))
        runs.append((out, calls))
    (fast, fast_calls), (general, general_calls) = runs
    for field in ("sequences", "tokens", "lengths", "num_generated", "scores"):
        assert torch.equal(getattr(fast, field), getattr(general, field)), field
    assert len(fast_calls) == len(general_calls) == 9
    for (t1, a1), (t2, a2) in zip(fast_calls, general_calls):
        assert torch.equal(t1, t2) and torch.equal(a1, a2)

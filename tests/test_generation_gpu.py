"""CUDA-graph decoding gives eager decoding's tokens; checkpoints load onto CUDA; decode speed (printed).

Run on a GPU machine: ``python -m pytest tests/test_generation_gpu.py -m gpu -s``.
"""

from __future__ import annotations

import time

import pytest
import torch
from test_lm import REAL_TYPES, STAND_INS, DecayMixer, no_grad, stand_in_mixers, tiny_lm  # noqa: F401 (fixtures)

from seqblocks import LRNNLMHeadModel, generate
from seqblocks.generation import CUDAGraphDecoder
from seqblocks.registry import MIXERS
from seqblocks.testing import assert_close

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]


def cuda_lm(types, **kwargs):
    return tiny_lm(types, dtype=torch.float32, d_model=64, device=torch.device("cuda"), **kwargs)


TYPES = REAL_TYPES + list(STAND_INS)


@pytest.fixture(scope="module")
def capture_errors() -> dict[str, str | None]:
    """Per mixer type, why its decode step cannot be captured in a CUDA graph (None: it can)."""
    errors = {}
    for t in TYPES:
        model = cuda_lm([t])
        try:
            CUDAGraphDecoder(model, model.allocate_inference_cache(2, 8))
            errors[t] = None
        except RuntimeError as err:
            errors[t] = str(err).splitlines()[0]
    return errors


@pytest.mark.parametrize("mixer_type", TYPES)
def test_cuda_graph_tokens_equal_eager(mixer_type, capture_errors):
    if capture_errors[mixer_type] is not None:
        pytest.xfail(f"{mixer_type}'s decode step cannot be captured: {capture_errors[mixer_type]}")
    check_graph_matches_eager(cuda_lm([mixer_type, mixer_type]))


def test_cuda_graph_hybrid(capture_errors):
    check_graph_matches_eager(cuda_lm([t for t in TYPES if capture_errors[t] is None]))


class HostSyncMixer(DecayMixer):
    """A decay mixer whose step reads a value on the host, which a CUDA graph cannot capture."""

    def forward(self, x, cache=None, **kwargs):
        if cache is not None and float(x.float().abs().sum()) < 0:
            raise AssertionError("unreachable")
        return super().forward(x, cache, **kwargs)


def test_failed_capture_is_clear_and_eager_still_works():
    """A step that cannot be captured raises naming the cause, and leaves the device usable."""
    with MIXERS.scoped():
        MIXERS.register("sbtest_host_sync", HostSyncMixer)
        model = cuda_lm(["sbtest_host_sync", "sbtest_decay"])
        prompt = torch.randint(0, 37, (2, 4), device="cuda")
        with pytest.raises(RuntimeError, match="could not capture the decode step"):
            generate(model, prompt, 3, cuda_graph=True)
        out = generate(model, prompt, 3, temperature=1.0, seed=0)
    assert out.tokens.shape == (2, 3) and torch.randn(3, device="cuda").isfinite().all()


def check_graph_matches_eager(model):
    prompt = torch.randint(0, 37, (3, 7), device="cuda")
    eager = generate(model, prompt, 12, temperature=0, return_scores=True)
    graph = generate(model, prompt, 12, temperature=0, return_scores=True, cuda_graph=True)
    assert torch.equal(graph.tokens, eager.tokens)
    assert_close(graph.scores, eager.scores, atol=1e-4)
    sampled = [generate(model, prompt, 12, temperature=1.0, top_p=0.9, seed=7, cuda_graph=g).tokens for g in (0, 1)]
    assert torch.equal(sampled[0], sampled[1])


def capturable(names, capture_errors) -> list[str]:
    """The registered names among ``names`` whose mixer class can be captured."""
    ok = {MIXERS.get(t) for t, err in capture_errors.items() if err is None}
    return [t for t in names if t in MIXERS and MIXERS.get(t) in ok]


def test_cuda_graph_with_prompts_of_different_lengths(capture_errors):
    types = capturable(("mamba", "attn", "s5", "lru", "sbtest_decay"), capture_errors)
    model = cuda_lm(types)
    prompt = torch.randint(0, 37, (3, 8), device="cuda")
    lengths = torch.tensor([8, 3, 5], device="cuda")
    eager = generate(model, prompt, 6, lengths=lengths, temperature=0)
    graph = generate(model, prompt, 6, lengths=lengths, temperature=0, cuda_graph=True)
    assert torch.equal(graph.sequences, eager.sequences)


def test_seed_save_load_onto_cuda(tmp_path):
    model = tiny_lm(["sbtest_decay", "sbtest_attn"], dtype=torch.float32)
    model.save_pretrained(tmp_path / "my_lrnn_lm")
    loaded_model = LRNNLMHeadModel.from_pretrained(tmp_path / "my_lrnn_lm", device=torch.device("cuda"))
    assert loaded_model.embedding.weight.is_cuda
    ids = torch.randint(0, 37, (2, 5))
    assert_close(loaded_model(ids.cuda()).logits.cpu(), model(ids).logits, atol=1e-5)


def _tokens_per_second(model, prompt, new_tokens, cuda_graph):
    generate(model, prompt, 8, temperature=0, cuda_graph=cuda_graph)  # warm-up (kernels, autotuning)
    torch.cuda.synchronize()
    start = time.perf_counter()
    out = generate(model, prompt, new_tokens, temperature=0, cuda_graph=cuda_graph)
    torch.cuda.synchronize()
    return out, prompt.shape[0] * new_tokens / (time.perf_counter() - start)


def test_cuda_graph_decode_speed():
    """Eager vs CUDA-graph decode throughput of a small hybrid (printed, not asserted)."""
    types = [t for t in ("mamba", "attn", "lru", "rglru", "mamba", "attn", "lru", "rglru") if t in MIXERS]
    model = LRNNLMHeadModel(d_model=256, d_state=16, n_layer=len(types), vocab_size=1024, mixer_types=types,
                            d_intermediate=512, device=torch.device("cuda"), dtype=torch.bfloat16).eval()
    for batch in (1, 8):
        prompt = torch.randint(0, 1024, (batch, 32), device="cuda")
        eager, eager_tps = _tokens_per_second(model, prompt, 256, False)
        graph, graph_tps = _tokens_per_second(model, prompt, 256, True)
        same = torch.equal(eager.tokens, graph.tokens)
        print(f"\ndecode {types} d_model=256 bf16 batch={batch} 256 new tokens: eager {eager_tps:.0f} tok/s, "
              f"CUDA graph {graph_tps:.0f} tok/s, speed-up {graph_tps / eager_tps:.2f}x, same tokens: {same}")

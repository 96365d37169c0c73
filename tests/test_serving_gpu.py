"""The serving engine on a GPU: CUDA-graph replay of each bucket's decode step and paged caches on CUDA
give every request exactly the tokens it gets alone from eager ``generate``, for hybrids of the real
mixers (Mamba, Mamba-2, GQA, MLA, sliding window)."""

from __future__ import annotations

import pytest
import torch

from seqblocks import LRNNLMHeadModel, generate
from seqblocks.serving import Engine, SamplingParams

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
pytestmark = [pytest.mark.gpu]

HYBRIDS = {
    "mamba+gqa": (["mamba", "gqa"], {"gqa": {"num_heads": 4, "num_heads_kv": 2}}),
    "mamba2+mla+swa": (["mamba2", "mla", "sliding_window"],
                       {"mamba2": {"headdim": 16}, "mla": {"num_heads": 4},
                        "sliding_window": {"num_heads": 4, "window_size": 6}}),
}


def model_for(name: str) -> LRNNLMHeadModel:
    types, kwargs = HYBRIDS[name]
    torch.manual_seed(0)
    return LRNNLMHeadModel(d_model=64, d_state=16, n_layer=len(types), vocab_size=97, mixer_types=types,
                           mixer_kwargs=kwargs, device=DEVICE, dtype=torch.float32).eval()


def prompts(n: int, seed: int = 0) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, 97, (int(torch.randint(2, 12, (1,), generator=g)),), generator=g).tolist()
            for _ in range(n)]


def alone(model, prompt, params: SamplingParams) -> list[int]:
    out = generate(model, torch.tensor([prompt], device=DEVICE), params.max_tokens, temperature=params.temperature,
                   top_k=params.top_k, seed=params.seed)
    return out.tokens[0, : int(out.num_generated[0])].tolist()


@pytest.mark.parametrize("paged", [False, True], ids=["slots", "paged"])
@pytest.mark.parametrize("name", list(HYBRIDS))
def test_cuda_graph_engine_gives_each_request_its_tokens_alone(name, paged):
    model = model_for(name)
    pages = {"page_size": 8, "num_pages": 20} if paged else {}
    ps = prompts(7)
    params = [SamplingParams(max_tokens=n, temperature=0) for n in (9, 3, 12, 5, 7, 2, 10)]
    params[3] = SamplingParams(max_tokens=6, temperature=0.8, top_k=20, seed=3)  # seeded sampling rides along
    want = [alone(model, p, s) for p, s in zip(ps, params)]
    with torch.no_grad():
        eager = Engine(model, max_batch_size=4, max_seqlen=32, prefill_chunk_size=5, **pages).generate(ps, params)
        graph_engine = Engine(model, max_batch_size=4, max_seqlen=32, prefill_chunk_size=5, cuda_graph=True, **pages)
        graphed = graph_engine.generate(ps, params)
        again = graph_engine.generate(ps[::-1], params[::-1])  # the captured graphs are reused
    assert eager == want
    assert graphed == want
    assert again == want[::-1]


def test_bf16_graph_engine_matches_its_eager_engine():
    model = model_for("mamba+gqa").to(torch.bfloat16)
    ps = prompts(5, seed=1)
    params = [SamplingParams(max_tokens=8, temperature=0)] * 5
    with torch.no_grad():
        eager = Engine(model, max_batch_size=4, max_seqlen=32, page_size=8, num_pages=24).generate(ps, params)
        graphed = Engine(model, max_batch_size=4, max_seqlen=32, page_size=8, num_pages=24,
                         cuda_graph=True).generate(ps, params)
    assert graphed == eager


def test_graphs_captured_up_front_serve_the_same_tokens():
    model = model_for("mamba+gqa")
    ps = prompts(6, seed=2)
    params = [SamplingParams(max_tokens=n, temperature=0) for n in (5, 9, 2, 7, 4, 6)]
    with torch.no_grad():
        engine = Engine(model, max_batch_size=8, max_seqlen=32, cuda_graph=True, page_size=8, num_pages=40)
        assert engine.capture_graphs() == len(engine.buckets) == 4  # buckets 1, 2, 4, 8
        graphs = dict(engine.decoders)
        got = engine.generate(ps, params)
    assert got == [alone(model, p, s) for p, s in zip(ps, params)]
    assert engine.decoders == graphs  # nothing captured while serving

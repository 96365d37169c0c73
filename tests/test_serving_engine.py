"""The continuous-batching engine: every request gets exactly the tokens ``generate`` gives it alone
(greedy, for every registered mixer; seeded sampling), while requests join, leave and prefill in
chunks between decode steps; cancellation frees the slot; bad requests raise."""

from __future__ import annotations

import pytest
import torch
from test_lm import ALL_TYPES, STAND_INS, no_grad, stand_in_mixers, tiny_lm  # noqa: F401 (fixtures)

from seqblocks import generate
from seqblocks.serving import Engine, SamplingParams


def prompts(n, vocab=37, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, vocab, (int(torch.randint(1, 8, (1,), generator=g)),), generator=g).tolist()
            for _ in range(n)]


def alone(model, prompt, params: SamplingParams):
    out = generate(model, torch.tensor([prompt]), params.max_tokens, temperature=params.temperature,
                   top_k=params.top_k, top_p=params.top_p, seed=params.seed,
                   stop_tokens=list(params.stop_tokens) or None)
    return out.tokens[0, : int(out.num_generated[0])].tolist()


@pytest.mark.parametrize("mixer_type", ALL_TYPES)
def test_each_request_gets_its_tokens_alone(mixer_type):
    """5 requests through 2 slots with 3-token prefill chunks: joins, leaves, chunked prefill between decodes."""
    model = tiny_lm([mixer_type, "sbtest_attn"])
    engine = Engine(model, max_batch_size=2, max_seqlen=24, prefill_chunk_size=3)
    ps = prompts(5)
    params = [SamplingParams(max_tokens=n, temperature=0) for n in (4, 2, 5, 3, 4)]
    got = engine.generate(ps, params)
    for p, s, tokens in zip(ps, params, got):
        assert tokens == alone(model, p, s)
    assert not engine.has_work() and engine.num_running == 0


def test_seeded_sampling_and_per_request_options():
    model = tiny_lm(["mamba", "sbtest_attn"])
    engine = Engine(model, max_batch_size=3, max_seqlen=32, prefill_chunk_size=4)
    ps = prompts(6, seed=1)
    params = [SamplingParams(max_tokens=6, temperature=t, top_k=k, seed=s)
              for t, k, s in ((1.0, None, 1), (0.7, 5, 2), (0, None, None), (1.3, 3, 4), (1.0, None, 5), (0.5, 2, 6))]
    got = engine.generate(ps, params)
    for p, s, tokens in zip(ps, params, got):
        assert tokens == alone(model, p, s)


def test_stop_tokens_length_and_streaming_callbacks():
    model = tiny_lm(["sbtest_decay", "sbtest_attn"])
    free_run = alone(model, [1, 2, 3], SamplingParams(max_tokens=8, temperature=0))
    stop = free_run[2]
    engine = Engine(model, max_batch_size=2, max_seqlen=10)
    seen = []
    r1 = engine.add_request([1, 2, 3], SamplingParams(max_tokens=8, temperature=0, stop_tokens=(stop,)),
                            on_token=lambda r, t: seen.append((r.request_id, t)))
    r2 = engine.add_request([4, 5, 6, 7, 8], SamplingParams(max_tokens=50, temperature=0))
    engine.run()
    assert r1.tokens == free_run[: free_run.index(stop) + 1] and r1.finish_reason == "stop"
    assert [t for _, t in seen] == r1.tokens + [-1]  # every token, then the end marker
    assert r2.finish_reason == "length" and len(r2.prompt) + len(r2.tokens) == 10  # the engine's max_seqlen
    assert r1.first_token_time is not None and r1.finish_time >= r1.first_token_time


def test_cancel_frees_the_slot_and_others_are_unaffected():
    model = tiny_lm(["mamba", "sbtest_attn"])
    engine = Engine(model, max_batch_size=1, max_seqlen=32)
    a = engine.add_request([1, 2], SamplingParams(max_tokens=20, temperature=0))
    b = engine.add_request([3, 4, 5], SamplingParams(max_tokens=4, temperature=0))
    for _ in range(3):
        engine.step()
    assert a.slot == 0 and len(a.tokens) >= 1 and b.slot is None  # b waits for the only slot
    assert engine.cancel(a.request_id) and a.finish_reason == "cancelled"
    engine.run()
    assert b.tokens == alone(model, [3, 4, 5], SamplingParams(max_tokens=4, temperature=0))
    assert not engine.cancel("nobody")


def test_bad_requests_and_options_raise():
    model = tiny_lm(["sbtest_attn"])
    engine = Engine(model, max_batch_size=2, max_seqlen=8)
    with pytest.raises(ValueError, match="empty"):
        engine.add_request([])
    with pytest.raises(ValueError, match=r"\[0, 37\)"):
        engine.add_request([1, 99])
    with pytest.raises(ValueError, match="max_seqlen=8"):
        engine.add_request(list(range(8)))
    with pytest.raises(ValueError, match="max_tokens=0"):
        SamplingParams(max_tokens=0)
    with pytest.raises(ValueError, match="top_p"):
        SamplingParams(top_p=1.5)
    with pytest.raises(ValueError, match="stop_tokens"):
        engine.add_request([1], SamplingParams(stop_tokens=(40,)))
    with pytest.raises(ValueError, match="max_batch_size=0"):
        Engine(model, max_batch_size=0)
    with pytest.raises(ValueError, match="CUDA"):
        Engine(model, cuda_graph=True)
    with pytest.raises(ValueError, match="cuda_graph=True"):
        engine.capture_graphs()
    with pytest.raises(TypeError, match="language model"):
        Engine(torch.nn.Linear(2, 2))

"""Beam search (against an exhaustive search and the model's own full-forward log-probabilities) and
speculative decoding with a draft model (greedy tokens == plain greedy; sampled tokens distributed as
the target's)."""

from __future__ import annotations

import itertools

import pytest
import torch

from seqblocks import LRNNLMHeadModel, generate
from seqblocks.beam_search import beam_search

KW = {"attn": {"num_heads": 2}, "mamba": {"expand": 1}, "s5": {}}


def lm(types, vocab_size=13, d_model=32, seed=0, sharpen=1.0) -> LRNNLMHeadModel:
    torch.manual_seed(seed)
    model = LRNNLMHeadModel(d_model, 4, len(types), vocab_size, list(types), d_intermediate=2 * d_model,
                            mixer_kwargs=KW, pad_vocab_size_multiple=1).eval()
    with torch.no_grad():
        model.embedding.weight.mul_(sharpen)
    return model


@torch.no_grad()
def logprob(model, prompt, tokens) -> float:
    """Summed log-probability of ``tokens`` after ``prompt`` by one full forward, no cache."""
    seq = torch.tensor([prompt + tokens])
    logp = model(seq[:, :-1]).logits[0, len(prompt) - 1:].float().log_softmax(-1)
    return float(logp.gather(-1, torch.tensor(tokens)[:, None]).sum())


def brute_force(model, prompt, N, eos, length_penalty):
    """Every hypothesis up to N tokens (ending at the first eos), scored as beam search scores them."""
    V = model.vocab_size
    hyps = []
    for n in range(1, N + 1):
        for tokens in itertools.product(range(V), repeat=n):
            tokens = list(tokens)
            if eos in tokens[:-1] or (n < N and tokens[-1] != eos):
                continue
            hyps.append((logprob(model, prompt, tokens) / n ** length_penalty, tokens))
    return sorted(hyps, key=lambda h: -h[0])


@pytest.mark.parametrize("length_penalty", [1.0, 0.0, -0.5])
def test_beam_search_with_every_hypothesis_kept_is_exhaustive(length_penalty):
    model = lm(["mamba", "attn"], vocab_size=4, sharpen=3.0)
    prompt, N, eos = [1, 2], 3, 3
    out = beam_search(model, torch.tensor([prompt]), N, num_beams=4 ** N, eos_token_id=eos,
                      length_penalty=length_penalty, early_stopping="never", num_return_sequences=5)
    expected = brute_force(model, prompt, N, eos, length_penalty)[:5]
    for r, (score, tokens) in enumerate(expected):
        got = out.sequences[0, r, 2:out.lengths[0, r]].tolist()
        assert got == tokens, (r, got, tokens)
        assert abs(float(out.scores[0, r]) - score) < 1e-4


def test_beam_search_scores_are_the_models_log_probabilities_across_cache_reorders():
    model = lm(["mamba", "s5", "attn"], seed=1, sharpen=2.0)
    prompts = torch.tensor([[1, 5, 7], [2, 2, 9]])
    out = beam_search(model, prompts, 6, num_beams=3, num_return_sequences=3)
    assert out.sequences.shape == (2, 3, 9) and (out.lengths == 9).all()
    for b in range(2):
        for r in range(3):
            tokens = out.sequences[b, r, 3:].tolist()
            assert abs(logprob(model, prompts[b].tolist(), tokens) / 6 - float(out.scores[b, r])) < 1e-4
        assert (out.scores[b, :-1] >= out.scores[b, 1:]).all()  # best first
        assert len({tuple(s) for s in out.sequences[b].tolist()}) == 3  # distinct hypotheses


def test_one_beam_is_greedy_decoding():
    model = lm(["mamba", "attn"], seed=2)
    prompt = torch.tensor([[3, 1, 4]])
    out = beam_search(model, prompt, 8, num_beams=1)
    assert out.sequences[0, 0].tolist() == generate(model, prompt, 8, temperature=0).sequences[0].tolist()


def test_beam_search_eos_and_early_stopping():
    model = lm(["attn"], vocab_size=6, seed=3, sharpen=3.0)
    prompt = torch.tensor([[1, 2]])
    for early in (True, False, "never"):
        out = beam_search(model, prompt, 5, num_beams=3, eos_token_id=0, early_stopping=early,
                          num_return_sequences=3, pad_token_id=5)
        for r in range(3):
            n = int(out.lengths[0, r])
            row = out.sequences[0, r].tolist()
            assert all(t == 5 for t in row[n:])  # padding after the end
            if n < 7:
                assert row[n - 1] == 0  # a hypothesis shorter than the limit ended with eos


def test_beam_search_errors():
    model = lm(["attn"])
    prompt = torch.tensor([[1, 2]])
    with pytest.raises(ValueError, match="num_beams=0"):
        beam_search(model, prompt, 4, num_beams=0)
    with pytest.raises(ValueError, match="num_return_sequences=3 exceeds num_beams=2"):
        beam_search(model, prompt, 4, num_beams=2, num_return_sequences=3)
    with pytest.raises(ValueError, match="early_stopping='sometimes'"):
        beam_search(model, prompt, 4, early_stopping="sometimes")
    with pytest.raises(ValueError, match="eos_token_id=99"):
        beam_search(model, prompt, 4, eos_token_id=99)
    with pytest.raises(TypeError, match="int64"):
        beam_search(model, prompt.float(), 4)
    with pytest.raises(ValueError, match="outside"):
        beam_search(model, torch.tensor([[1, 20]]), 4)


# ---- speculative decoding with a draft model -------------------------------------------------------------


@pytest.mark.parametrize("k", [1, 3])
def test_draft_model_greedy_equals_plain_greedy(k):
    target = lm(["mamba", "attn", "s5"], seed=4)
    draft = lm(["attn"], d_model=16, seed=5)
    prompt = torch.randint(0, 13, (3, 5), generator=torch.Generator().manual_seed(0))
    plain = generate(target, prompt, 12, temperature=0, return_scores=True)
    spec = generate(target, prompt, 12, temperature=0, draft_model=draft, num_draft_tokens=k, return_scores=True)
    assert spec.sequences.tolist() == plain.sequences.tolist()
    torch.testing.assert_close(spec.scores, plain.scores, atol=1e-4, rtol=1e-4)
    assert spec.draft_acceptance is not None and 0.0 <= spec.draft_acceptance <= 1.0
    same = generate(target, prompt, 12, temperature=0, draft_model=target, num_draft_tokens=k)
    assert same.draft_acceptance == 1.0 and same.sequences.tolist() == plain.sequences.tolist()


def test_draft_model_stop_tokens():
    target, draft = lm(["mamba", "attn"], seed=6), lm(["s5"], d_model=16, seed=7)
    prompt = torch.tensor([[1, 2, 3]])
    plain = generate(target, prompt, 16, temperature=0, stop_tokens=[4, 7])
    spec = generate(target, prompt, 16, temperature=0, stop_tokens=[4, 7], draft_model=draft, num_draft_tokens=2)
    assert spec.sequences.tolist() == plain.sequences.tolist()
    assert spec.num_generated.tolist() == plain.num_generated.tolist()


def test_draft_model_sampling_matches_the_target_joint_distribution():
    """Three sampled tokens over a 4-token vocabulary against the target's exact joint probabilities."""
    V, N, R = 4, 3, 12_000
    target = lm(["attn"], vocab_size=V, d_model=16, seed=8, sharpen=8.0)
    draft = lm(["attn"], vocab_size=V, d_model=16, seed=9, sharpen=8.0)
    prompt = torch.tensor([[1, 2, 0]])
    seqs = torch.tensor(list(itertools.product(range(V), repeat=N)))
    with torch.no_grad():
        logits = target(torch.cat([prompt.expand(len(seqs), -1), seqs], 1)[:, :-1]).logits[:, 2:]
        exact = logits.log_softmax(-1).gather(-1, seqs[..., None])[..., 0].sum(-1).exp()
    out = generate(target, prompt.expand(R, -1), N, seed=1, draft_model=draft, num_draft_tokens=2)
    index = (out.tokens * V ** torch.arange(N - 1, -1, -1)).sum(-1)
    freq = torch.bincount(index, minlength=V**N).float() / R
    assert 0.5 * (freq - exact).abs().sum() < 0.04  # plain sampling's own noise here is ~0.02
    assert 0.05 < out.draft_acceptance < 0.95  # the draft is a different model: some drafts rejected


def test_draft_model_errors():
    target = lm(["attn"])
    prompt = torch.tensor([[1, 2]])
    with pytest.raises(ValueError, match="vocab"):
        generate(target, prompt, 4, draft_model=lm(["attn"], vocab_size=7))
    with pytest.raises(ValueError, match="num_draft_tokens=0"):
        generate(target, prompt, 4, draft_model=target, num_draft_tokens=0)
    with pytest.raises(TypeError, match="draft_model"):
        generate(target, prompt, 4, draft_model="small")
    with pytest.raises(ValueError, match="repetition_penalty"):
        generate(target, prompt, 4, draft_model=target, repetition_penalty=1.3)

"""Best-of-n and majority-vote sampling helpers."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from post_fixtures import one_thread, tiny_model  # noqa: F401

from seqblocks.post.sampling import best_of_n, completion_logprob, majority, majority_vote, sample_n

pytestmark = pytest.mark.usefixtures("one_thread")


def test_majority_counts_and_breaks_ties_by_first_seen():
    assert majority([3, 1, 1, 3, 2]) == (3, 2)
    assert majority([None, "a", None, "b", "b"]) == ("b", 2)
    assert majority([None, None]) == (None, 0)


def test_sample_n_groups_the_completions_of_each_prompt():
    model = tiny_model()
    prompts = torch.tensor([[2, 3, 4], [5, 6, 7]])
    samples = sample_n(model, prompts, 4, 5, temperature=0)
    assert samples.tokens.shape == (2, 4, 5) and samples.num_generated.shape == (2, 4)
    assert (samples.tokens == samples.tokens[:, :1]).all()  # greedy: the n copies agree
    with pytest.raises(ValueError, match="n=0"):
        sample_n(model, prompts, 0, 5)


def test_best_of_n_keeps_the_highest_score():
    model = tiny_model()
    prompts = torch.tensor([[2, 3, 4]])
    best, samples = best_of_n(model, prompts, 6, 4, score_fn=lambda b, ids: ids.count(5), seed=0)
    assert samples.scores.shape == (1, 6)
    assert best[0].count(5) == int(samples.scores.max())
    assert best[0] == samples.completion(0, int(samples.scores.argmax()))


def test_best_of_n_default_score_is_the_mean_token_logprob():
    model = tiny_model()
    prompts = torch.tensor([[2, 3, 4]])
    best, samples = best_of_n(model, prompts, 3, 4, seed=1)
    for i in range(3):
        ids = torch.tensor([[2, 3, 4] + samples.completion(0, i)])
        logp = F.log_softmax(model(ids).logits[0, 2:-1].float(), -1)
        expected = logp.gather(-1, ids[0, 3:, None]).mean()
        assert samples.scores[0, i].item() == pytest.approx(expected.item(), rel=1e-5)
    torch.testing.assert_close(completion_logprob(model, prompts, samples.tokens, samples.num_generated),
                               samples.scores)


def test_majority_vote_returns_the_most_frequent_answer():
    model = tiny_model()
    prompts = torch.tensor([[2, 3, 4], [9, 9, 9]])
    winners, votes, samples = majority_vote(model, prompts, 5, 3, answer_fn=lambda ids: ids[0], seed=0)
    for b in range(2):
        answers = [samples.completion(b, i)[0] for i in range(5)]
        assert (winners[b], votes[b]) == majority(answers)

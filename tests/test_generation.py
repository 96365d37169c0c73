"""generate(): greedy / sampling, scores, seeds, stop tokens, streaming, batched prompts of different
lengths, integration timesteps, and the logits processors."""

from __future__ import annotations

import pytest
import torch
from test_lm import ALL_TYPES, STAND_INS, no_grad, stand_in_mixers, tiny_lm  # noqa: F401 (fixtures)

from seqblocks import generate
from seqblocks.generation import process_logits, sample
from seqblocks.testing import assert_close


def teacher_forced_logits(model, out, T):
    """Forward logits over the generated sequences, at the positions that predicted each new token."""
    return model(out.sequences[:, :-1]).logits[:, T - 1 :]


@pytest.mark.parametrize("mixer_type", ALL_TYPES)
def test_generation_for_each_mixer(mixer_type):
    model = tiny_lm([mixer_type, mixer_type])
    prompt = torch.randint(0, 37, (2, 5))
    greedy = generate(model, prompt, 4, temperature=0, return_scores=True)
    assert greedy.sequences.shape == (2, 9) and greedy.scores.shape == (2, 4, 37)
    assert torch.equal(greedy.sequences[:, :5], prompt)
    # Teacher forcing: the scores are the full forward's logits over the generated sequence.
    assert_close(greedy.scores, teacher_forced_logits(model, greedy, 5).float(), atol=1e-4)
    assert torch.equal(greedy.tokens, greedy.scores.argmax(-1))
    top1 = generate(model, prompt, 4, top_k=1, seed=3)
    assert torch.equal(top1.tokens, greedy.tokens)
    a = generate(model, prompt, 4, temperature=1.5, seed=11)
    b = generate(model, prompt, 4, temperature=1.5, generator=torch.Generator().manual_seed(11))
    assert torch.equal(a.tokens, b.tokens)


@pytest.mark.parametrize("mixer_type", ALL_TYPES)
def test_batched_prompts_of_different_lengths(mixer_type):
    """Each row of a right-padded batch gets exactly the tokens it gets alone."""
    model = tiny_lm([mixer_type, mixer_type])
    prompt = torch.randint(0, 37, (3, 6))
    lengths = torch.tensor([6, 2, 4])
    out = generate(model, prompt, 3, lengths=lengths, temperature=0, return_scores=True, pad_token_id=36)
    assert out.lengths.tolist() == [9, 5, 7]
    for b in range(3):
        n = int(lengths[b])
        alone = generate(model, prompt[b : b + 1, :n], 3, temperature=0, return_scores=True)
        assert torch.equal(out.tokens[b], alone.tokens[0])
        assert torch.equal(out.sequences[b, : n + 3], alone.sequences[0])
        assert (out.sequences[b, n + 3 :] == 36).all()
        assert_close(out.scores[b], alone.scores[0], atol=1e-4)


@pytest.mark.parametrize("types", [["sbtest_decay"] * 2, ["sbtest_decay", "sbtest_attn"]], ids=["padded", "lockstep"])
def test_both_batching_modes(types):
    model = tiny_lm(types)
    assert model.accepts_lengths() == (types[1] == "sbtest_decay")
    prompt = torch.randint(0, 37, (2, 7))
    lengths = torch.tensor([3, 7])
    out = generate(model, prompt, 5, lengths=lengths, temperature=0)
    for b in range(2):
        alone = generate(model, prompt[b : b + 1, : int(lengths[b])], 5, temperature=0)
        assert torch.equal(out.tokens[b], alone.tokens[0])


def test_stop_tokens_streaming_and_padding():
    model = tiny_lm(["sbtest_decay", "sbtest_attn"])
    prompt = torch.randint(0, 37, (2, 4))
    free = generate(model, prompt, 6, temperature=0)
    stop = int(free.tokens[0, 2])
    first_stop = [int((row == stop).nonzero()[0]) if (row == stop).any() else None for row in free.tokens]
    seen = []
    out = generate(model, prompt, 6, temperature=0, stop_tokens=[stop], pad_token_id=35,
                   callback=lambda tokens, active: seen.append((tokens.clone(), active.clone())))
    for b in range(2):
        k = first_stop[b]
        n = 6 if k is None else k + 1
        assert int(out.num_generated[b]) == n
        assert torch.equal(out.tokens[b, :n], free.tokens[b, :n]) and (out.tokens[b, n:] == 35).all()
    streamed = torch.stack([t for t, _ in seen], 1)
    actives = torch.stack([a for _, a in seen], 1)
    assert torch.equal(torch.where(actives, streamed, 35)[:, : out.tokens.shape[1]], out.tokens[:, : len(seen)])
    assert len(seen) == int(out.num_generated.max())


def _first_end(row: list[int], seq: list[int]) -> int | None:
    """Tokens up to and including the first occurrence of ``seq`` in ``row``, or None."""
    for j in range(len(row) - len(seq) + 1):
        if row[j : j + len(seq)] == seq:
            return j + len(seq)
    return None


def test_stop_sequences_stop_on_the_whole_sequence():
    """A multi-token stop sequence ends a row where the whole sequence is generated, not at its first
    token (``--stop "se"`` once stopped at every "s")."""
    model = tiny_lm(["sbtest_decay", "sbtest_attn"])
    prompt = torch.randint(0, 37, (3, 4))
    free = generate(model, prompt, 24, temperature=1.0, seed=3).tokens.tolist()
    # A pair from row 0 whose first token occurs earlier without the second after it.
    row = free[0]
    pair = next([row[j], row[j + 1]] for j in range(1, len(row) - 1)
                if row[j] in row[:j] and _first_end(row, [row[j], row[j + 1]]) == j + 2)
    out = generate(model, prompt, 24, temperature=1.0, seed=3, stop_sequences=[pair], pad_token_id=36)
    for b in range(3):
        n = _first_end(free[b], pair) or 24
        assert int(out.num_generated[b]) == n
        assert out.tokens[b, :n].tolist() == free[b][:n] and (out.tokens[b, n:] == 36).all()
    assert int(out.num_generated[0]) > row.index(pair[0]) + 1  # its first token alone did not stop it
    # Only generated tokens count: a sequence completed across the prompt's end does not stop.
    last = int(prompt[0, -1])
    across = generate(model, prompt[:1], 24, temperature=1.0, seed=3, stop_sequences=[[last, free[0][0]]])
    assert int(across.num_generated[0]) == (_first_end(free[0], [last, free[0][0]]) or 24)
    # Length-1 sequences are stop tokens.
    one = generate(model, prompt, 24, temperature=1.0, seed=3, stop_sequences=[[pair[0]]])
    assert torch.equal(one.num_generated, generate(model, prompt, 24, temperature=1.0, seed=3,
                                                   stop_tokens=[pair[0]]).num_generated)
    for bad in ([[]], [[37]], [3], "ab", [[1.5]]):
        with pytest.raises((ValueError, TypeError), match="stop"):
            generate(model, prompt, 4, stop_sequences=bad)


def test_sampling_seed_and_temperature():
    model = tiny_lm(["sbtest_decay", "sbtest_attn"])
    prompt = torch.randint(0, 37, (4, 3))
    runs = [generate(model, prompt, 8, temperature=2.0, seed=s).tokens for s in (1, 1, 2)]
    assert torch.equal(runs[0], runs[1]) and not torch.equal(runs[0], runs[2])
    greedy = generate(model, prompt, 8, temperature=0).tokens
    assert torch.equal(generate(model, prompt, 8, temperature=1e-6, seed=5).tokens, greedy)
    restricted = generate(model, prompt, 8, temperature=3.0, top_p=0.3, min_p=0.2, top_k=4, seed=0)
    assert restricted.tokens.shape == (4, 8)


def test_integration_timesteps_in_generation():
    model = tiny_lm(["sbtest_decay", "sbtest_attn"])
    prompt = torch.randint(0, 37, (2, 4))
    ts = torch.rand(2, 4 + 5 - 1, dtype=torch.float64) + 0.2
    out = generate(model, prompt, 5, temperature=0, return_scores=True, integration_timesteps=ts)
    full = model(out.sequences[:, :-1], integration_timesteps=ts).logits[:, 3:]
    assert_close(out.scores, full.float(), atol=1e-5)
    prompt_only = generate(model, prompt, 5, temperature=0, integration_timesteps=ts[:, :4])
    assert prompt_only.tokens.shape == (2, 5)
    with pytest.raises(ValueError, match="columns"):
        generate(model, prompt, 5, integration_timesteps=ts[:, :6])


def test_repetition_penalty():
    logits = torch.tensor([[2.0, -1.0, 0.5, 3.0]])
    seen = torch.tensor([[True, True, False, False]])
    out = process_logits(logits, repetition_penalty=2.0, seen=seen, temperature=0)
    assert out.tolist() == [[1.0, -2.0, 0.5, 3.0]]
    model = tiny_lm(["sbtest_decay"])
    prompt = torch.randint(0, 37, (1, 4))
    out = generate(model, prompt, 10, temperature=0, repetition_penalty=1e6)
    generated = out.tokens[0].tolist()
    assert len(set(generated)) == 10 and not set(generated) & set(prompt[0].tolist())  # never repeats


def test_logits_processors():
    probs = torch.tensor([[0.5, 0.3, 0.15, 0.05]])
    logits = probs.log()
    keep = lambda out: torch.isfinite(out)[0].tolist()
    assert keep(process_logits(logits, top_k=2)) == [True, True, False, False]
    assert keep(process_logits(logits, top_p=0.8)) == [True, True, False, False]
    assert keep(process_logits(logits, top_p=0.81)) == [True, True, True, False]
    assert keep(process_logits(logits, top_p=0.1)) == [True, False, False, False]
    assert keep(process_logits(logits, min_p=0.5)) == [True, True, False, False]
    assert_close(process_logits(logits, temperature=2.0), logits / 2, atol=1e-7)
    # The exponential race draws token i with probability p_i.
    many = logits.expand(20000, 4)
    draws = sample(process_logits(many), generator=torch.Generator().manual_seed(0))
    freq = torch.bincount(draws, minlength=4).float() / 20000
    assert_close(freq, probs[0], atol=0.015)


def test_generate_errors():
    model = tiny_lm(["sbtest_decay"])
    prompt = torch.randint(0, 37, (2, 3))
    for kwargs, match in (({"temperature": -1}, "temperature"), ({"top_k": 0}, "top_k"), ({"top_p": 0}, "top_p"),
                          ({"min_p": 2}, "min_p"), ({"repetition_penalty": 0}, "repetition_penalty"),
                          ({"stop_tokens": [37]}, "stop_tokens"), ({"lengths": torch.tensor([0, 3])}, "lengths"),
                          ({"max_seqlen": 3}, "max_seqlen"), ({"cuda_graph": True}, "CUDA")):
        with pytest.raises(ValueError, match=match):
            generate(model, prompt, 4, **kwargs)
    with pytest.raises(ValueError, match="max_new_tokens"):
        generate(model, prompt, 0)


def test_generate_wraps_the_model_from_outside():
    model = tiny_lm(sorted(STAND_INS))
    prompt = torch.randint(0, 37, (1, 3))
    expected = generate(model, prompt, 5, temperature=0).tokens
    assert not hasattr(model, "generate")  # generation sits above the models and wraps them
    assert torch.equal(generate(model, prompt, 5, temperature=0).tokens, expected)

"""Best-of-n and majority-vote sampling: draw ``n`` completions per prompt with ``generate`` and keep
the best-scored one, or the most frequent answer.

Shapes: B batch (prompts), N samples per prompt, T prompt length, L new tokens.
"""

from __future__ import annotations

import collections
import dataclasses
from collections.abc import Callable, Hashable, Sequence
from typing import Any

import torch
import torch.nn.functional as F

__all__ = ["SampledSet", "sample_n", "best_of_n", "majority_vote", "majority", "completion_logprob"]


@dataclasses.dataclass
class SampledSet:
    """``n`` completions of each prompt.

    Attributes:
        tokens (Tensor): [B, N, L] generated tokens, ``pad_token_id`` after a row stopped.
        num_generated (Tensor): [B, N] tokens generated per completion.
        scores (Tensor | None): [B, N] the score of each completion, when one was computed.
    """

    tokens: torch.Tensor
    num_generated: torch.Tensor
    scores: torch.Tensor | None = None

    def completion(self, b: int, i: int) -> list[int]:
        """Completion ``i`` of prompt ``b`` as a list of ids, cut at its generated length."""
        return self.tokens[b, i, : int(self.num_generated[b, i])].tolist()


def _check_n(n: Any) -> None:
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ValueError(f"n={n!r} must be a positive integer (samples per prompt)")


def sample_n(model: Any, input_ids: torch.Tensor, n: int, max_new_tokens: int, *, temperature: float = 1.0,
             seed: int | None = None, **generate_kwargs: Any) -> SampledSet:
    """``n`` sampled completions of each prompt, in one batched ``generate`` call.

    Args:
        model: a seqblocks causal LM.
        input_ids (Tensor): [B, T] prompts of equal length.
        n (int): completions per prompt.
        max_new_tokens (int): tokens per completion.
        temperature (float): sampling temperature (0 is greedy, so every completion is the same).
            Default: 1.0.
        seed (int | None): seed of the draws. Default: None.
        **generate_kwargs: further ``generate`` arguments (``top_p``, ``stop_tokens``, ...).

    Returns:
        SampledSet: ``tokens`` [B, N, L], ``num_generated`` [B, N].
    """
    from seqblocks.generation import generate

    _check_n(n)
    if not isinstance(input_ids, torch.Tensor) or input_ids.dim() != 2:
        raise ValueError(f"input_ids must be a [B, T] tensor, got {getattr(input_ids, 'shape', type(input_ids))}")
    B = input_ids.shape[0]
    repeated = input_ids.repeat_interleave(n, dim=0)  # [B * N, T], the n copies of a prompt adjacent
    out = generate(model, repeated, max_new_tokens=max_new_tokens, temperature=temperature, seed=seed,
                   **generate_kwargs)
    return SampledSet(out.tokens.view(B, n, -1), out.num_generated.view(B, n))


@torch.no_grad()
def completion_logprob(model: Any, input_ids: torch.Tensor, tokens: torch.Tensor,
                       num_generated: torch.Tensor) -> torch.Tensor:
    """Mean log-probability per generated token of each completion under ``model``.

    Args:
        model: the causal LM.
        input_ids (Tensor): [B, T] prompts.
        tokens (Tensor): [B, N, L] completions.
        num_generated (Tensor): [B, N] valid length of each completion.

    Returns:
        Tensor: [B, N] fp32 mean token log-probability (0 for an empty completion).
    """
    B, N, L = tokens.shape
    T = input_ids.shape[1]
    full = torch.cat([input_ids.repeat_interleave(N, 0), tokens.reshape(B * N, L)], dim=1)  # [B N, T + L]
    logits = model(full).logits[:, T - 1: -1].float()  # the positions that predict the completion
    logp = torch.gather(F.log_softmax(logits, -1), -1, tokens.reshape(B * N, L, 1)).squeeze(-1)
    valid = torch.arange(L, device=tokens.device)[None] < num_generated.reshape(B * N, 1)
    total = (logp * valid).sum(-1)
    return (total / valid.sum(-1).clamp(min=1)).view(B, N)


def best_of_n(model: Any, input_ids: torch.Tensor, n: int, max_new_tokens: int,
              score_fn: Callable[[int, list[int]], float] | None = None, **kwargs: Any) -> tuple[list[list[int]],
                                                                                                  SampledSet]:
    """Sample ``n`` completions per prompt and keep the best one.

    Args:
        model: a seqblocks causal LM.
        input_ids (Tensor): [B, T] prompts of equal length.
        n (int): completions per prompt.
        max_new_tokens (int): tokens per completion.
        score_fn (Callable[[int, list[int]], float] | None): ``score_fn(b, completion_ids)``, higher is
            better (a verifier or reward model). Default: None (the model's own mean token
            log-probability).
        **kwargs: ``sample_n`` / ``generate`` arguments (``temperature``, ``seed``, ...).

    Returns:
        tuple: the best completion of each prompt (lists of ids; the first of equal scores) and the
        ``SampledSet`` with its ``scores`` [B, N].
    """
    samples = sample_n(model, input_ids, n, max_new_tokens, **kwargs)
    B = input_ids.shape[0]
    if score_fn is None:
        scores = completion_logprob(model, input_ids, samples.tokens, samples.num_generated)
    else:
        scores = torch.tensor([[float(score_fn(b, samples.completion(b, i))) for i in range(n)] for b in range(B)])
    samples.scores = scores
    best = scores.argmax(dim=1)
    return [samples.completion(b, int(best[b])) for b in range(B)], samples


def majority(answers: Sequence[Hashable | None]) -> tuple[Hashable | None, int]:
    """The most frequent answer that is not None and its count; ties go to the answer seen first.
    ``(None, 0)`` when every answer is None."""
    counts = collections.Counter(a for a in answers if a is not None)
    if not counts:
        return None, 0
    top = max(counts.values())
    for answer in answers:  # first seen among the most frequent
        if answer is not None and counts[answer] == top:
            return answer, top
    raise AssertionError("unreachable: a counted answer exists")


def majority_vote(model: Any, input_ids: torch.Tensor, n: int, max_new_tokens: int,
                  answer_fn: Callable[[list[int]], Hashable | None] = tuple, **kwargs: Any
                  ) -> tuple[list[Hashable | None], list[int], SampledSet]:
    """Self-consistency: sample ``n`` completions per prompt, extract each one's answer, keep the most
    frequent.

    Args:
        model: a seqblocks causal LM.
        input_ids (Tensor): [B, T] prompts of equal length.
        n (int): completions per prompt.
        max_new_tokens (int): tokens per completion.
        answer_fn (Callable[[list[int]], Hashable | None]): the answer of one completion; None for a
            completion with no answer (it gets no vote). Default: ``tuple`` (the whole completion).
        **kwargs: ``sample_n`` / ``generate`` arguments.

    Returns:
        tuple: per prompt the winning answer (None if no completion had one), its vote count, and the
        ``SampledSet``.
    """
    samples = sample_n(model, input_ids, n, max_new_tokens, **kwargs)
    winners, votes = [], []
    for b in range(input_ids.shape[0]):
        answer, count = majority([answer_fn(samples.completion(b, i)) for i in range(n)])
        winners.append(answer)
        votes.append(count)
    return winners, votes, samples

"""Beam search over a seqblocks language model: ``beam_search``.

Each prompt keeps ``num_beams`` running hypotheses. A step scores every continuation of every beam by
its summed log-probability, keeps the ``2 * num_beams`` best candidates, moves those that end with an
end-of-sequence token into the prompt's finished list (only those ranked among the first
``num_beams``, as the usual implementations do) and continues with the ``num_beams`` best others. A
finished hypothesis is ranked by ``sum log p / generated_length ** length_penalty``: above 0 the penalty
favours longer outputs, below 0 shorter ones. The caches follow the beams: after each step every cache
tensor (all of them are batch-first by the mixer contract) is gathered along the batch by the index
of the beam each new row continues, so attention and recurrent layers alike continue the right
prefix.

``early_stopping`` says when a prompt is done, with the usual meanings: True stops once ``num_beams``
hypotheses have finished; False stops once the best running beam, scored as if it ended now, cannot
beat the worst finished one (a heuristic for ``length_penalty > 0``); "never" stops only when no running
beam can beat it at any length up to ``max_new_tokens`` (exact). When ``max_new_tokens`` runs out,
the running beams of unfinished prompts count as finished hypotheses.

Shapes: B prompts, T prompt length, W beams, N new tokens, V vocabulary, R returned sequences.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch

__all__ = ["BeamSearchOutput", "beam_search"]


@dataclasses.dataclass
class BeamSearchOutput:
    """What ``beam_search`` returns.

    Attributes:
        sequences (Tensor): [B, R, T + N] prompt then generated tokens of each returned hypothesis, best
            first, right-padded with ``pad_token_id``.
        scores (Tensor): [B, R] fp32 length-penalised log-probabilities.
        lengths (Tensor): [B, R] valid length of each row of ``sequences`` (prompt included).
    """

    sequences: torch.Tensor
    scores: torch.Tensor
    lengths: torch.Tensor


class _Finished:
    """The finished hypotheses of one prompt: at most ``num_beams``, the best by score."""

    def __init__(self, num_beams: int, length_penalty: float, early_stopping: bool | str, max_new: int) -> None:
        self.num_beams, self.length_penalty = num_beams, length_penalty
        self.early_stopping, self.max_new = early_stopping, max_new
        self.items: list[tuple[float, list[int]]] = []

    def score(self, logprob: float, length: int) -> float:
        return logprob / (length ** self.length_penalty)

    @property
    def worst(self) -> float:
        return min(s for s, _ in self.items) if self.items else float("-inf")

    def add(self, logprob: float, tokens: list[int]) -> None:
        s = self.score(logprob, len(tokens))
        if len(self.items) < self.num_beams or s > self.worst:
            self.items.append((s, tokens))
            if len(self.items) > self.num_beams:
                self.items.remove(min(self.items, key=lambda item: item[0]))

    def done(self, best_running: float, generated: int) -> bool:
        """Whether no running beam (the best has summed log-prob ``best_running`` after ``generated``
        tokens) can still enter the list."""
        if len(self.items) < self.num_beams:
            return False
        if self.early_stopping is True:
            return True
        if self.early_stopping is False or self.length_penalty <= 0:
            # log-probs only fall, so with a penalty <= 0 the best a beam can do is end now
            return self.worst >= self.score(best_running, generated)
        return self.worst >= self.score(best_running, self.max_new)  # "never", penalty > 0: longest length


def _check(model: Any, input_ids: Any, max_new_tokens: Any, num_beams: Any, length_penalty: Any,
           early_stopping: Any, eos_token_id: Any, num_return_sequences: Any) -> None:
    if not isinstance(input_ids, torch.Tensor) or input_ids.dim() != 2 or input_ids.dtype != torch.long:
        raise TypeError(f"beam_search: input_ids must be an int64 [B, T] tensor, got "
                        f"{getattr(input_ids, 'dtype', type(input_ids).__name__)} "
                        f"{tuple(getattr(input_ids, 'shape', ()))}")
    if input_ids.shape[0] == 0 or input_ids.shape[1] == 0:
        raise ValueError(f"beam_search: input_ids must be non-empty, got shape {tuple(input_ids.shape)}")
    for name, value in (("max_new_tokens", max_new_tokens), ("num_beams", num_beams),
                        ("num_return_sequences", num_return_sequences)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"beam_search: {name}={value!r} must be a positive int")
    if num_return_sequences > num_beams:
        raise ValueError(f"beam_search: num_return_sequences={num_return_sequences} exceeds num_beams={num_beams}")
    if isinstance(length_penalty, bool) or not isinstance(length_penalty, (int, float)):
        raise TypeError(f"beam_search: length_penalty must be a float, got {length_penalty!r}")
    if early_stopping not in (True, False, "never"):
        raise ValueError(f"beam_search: early_stopping={early_stopping!r} must be True, False or 'never'")
    V = model.vocab_size
    if eos_token_id is not None and (isinstance(eos_token_id, bool) or not isinstance(eos_token_id, int)
                                     or not 0 <= eos_token_id < V):
        raise ValueError(f"beam_search: eos_token_id={eos_token_id!r} must be a token id in [0, {V})")
    if int(input_ids.min()) < 0 or int(input_ids.max()) >= V:
        raise ValueError(f"beam_search: input_ids hold ids outside [0, {V})")


def _reorder(caches: Any, index: torch.Tensor) -> None:
    """Gather every cache tensor along its batch dimension by ``index`` [B * W], in place."""
    for t in caches.tensors():
        if t.dim() > 0:
            t.copy_(t.index_select(0, index))


@torch.no_grad()
def beam_search(model: Any, input_ids: torch.Tensor, max_new_tokens: int = 20, *, num_beams: int = 4,
                length_penalty: float = 1.0, early_stopping: bool | str = False, eos_token_id: int | None = None,
                num_return_sequences: int = 1, pad_token_id: int = 0) -> BeamSearchOutput:
    """Beam search after each prompt (see the module docstring for the rules).

    Args:
        model: a seqblocks language model (``forward`` / ``step`` / ``allocate_inference_cache`` /
            ``vocab_size``), any mixers.
        input_ids (Tensor): [B, T] int64 prompts of equal length.
        max_new_tokens (int): the most tokens a hypothesis generates. Default: 20.
        num_beams (int): beams per prompt W. Default: 4.
        length_penalty (float): exponent of the generated length that divides a finished hypothesis's
            log-probability. Default: 1.0.
        early_stopping (bool | str): True, False or "never" (module docstring). Default: False.
        eos_token_id (int | None): the end-of-sequence token; None: every hypothesis runs
            ``max_new_tokens`` tokens. Default: None.
        num_return_sequences (int): hypotheses returned per prompt R, at most W. Default: 1.
        pad_token_id (int): filler after a hypothesis's end. Default: 0.

    Returns:
        BeamSearchOutput

    Raises:
        ValueError / TypeError: invalid arguments (the message names them).
    """
    _check(model, input_ids, max_new_tokens, num_beams, length_penalty, early_stopping, eos_token_id,
           num_return_sequences)
    B, T = input_ids.shape
    W, N, V = num_beams, max_new_tokens, model.vocab_size
    device = input_ids.device
    caches = model.allocate_inference_cache(B * W, T + N)
    rows = input_ids.repeat_interleave(W, dim=0)  # [B W, T]
    logits = model(rows, inference_params=caches, num_last_tokens=1).logits[:, -1]
    beam_scores = torch.full((B, W), float("-inf"), device=device)
    beam_scores[:, 0] = 0.0  # the W copies of a prompt are one hypothesis until the first step
    generated = torch.zeros(B * W, 0, dtype=torch.long, device=device)
    finished = [_Finished(W, float(length_penalty), early_stopping, N) for _ in range(B)]
    done = [False] * B
    for step in range(N):
        logp = logits.float().log_softmax(-1).view(B, W, V)
        cand = (beam_scores[:, :, None] + logp).view(B, W * V)
        top_scores, top_index = cand.topk(min(2 * W, W * V), dim=1)  # best first
        next_scores = torch.full((B, W), float("-inf"), device=device)
        next_tokens = torch.full((B, W), pad_token_id, dtype=torch.long, device=device)
        next_beams = torch.arange(W, device=device).repeat(B, 1)
        top_scores_h, top_index_h = top_scores.tolist(), top_index.tolist()
        for b in range(B):
            if done[b]:
                continue
            kept = 0
            for rank, (score, index) in enumerate(zip(top_scores_h[b], top_index_h[b])):
                if score == float("-inf"):
                    break
                beam, token = divmod(index, V)
                if eos_token_id is not None and token == eos_token_id:
                    if rank < W:
                        finished[b].add(score, generated[b * W + beam].tolist() + [token])
                    continue
                next_scores[b, kept], next_tokens[b, kept], next_beams[b, kept] = score, token, beam
                kept += 1
                if kept == W:
                    break
            done[b] = finished[b].done(float(next_scores[b, 0]), step + 1) or kept == 0
        source = (torch.arange(B, device=device)[:, None] * W + next_beams).view(-1)  # [B W]
        generated = torch.cat([generated.index_select(0, source), next_tokens.view(-1, 1)], dim=1)
        beam_scores = next_scores
        if all(done) or step == N - 1:
            break
        _reorder(caches, source)
        logits = model.step(next_tokens.view(-1, 1), caches).logits[:, -1]
    for b in range(B):
        if not done[b]:
            for w in range(W):
                if beam_scores[b, w] > float("-inf"):
                    finished[b].add(float(beam_scores[b, w]), generated[b * W + w].tolist())

    R = num_return_sequences
    sequences = torch.full((B, R, T + N), pad_token_id, dtype=torch.long, device=device)
    sequences[:, :, :T] = input_ids[:, None]
    scores = torch.full((B, R), float("-inf"), device=device)
    lengths = torch.full((B, R), T, dtype=torch.long, device=device)
    for b in range(B):
        best = sorted(finished[b].items, key=lambda item: -item[0])[:R]
        for r, (score, tokens) in enumerate(best):
            sequences[b, r, T:T + len(tokens)] = torch.tensor(tokens, dtype=torch.long, device=device)
            scores[b, r] = score
            lengths[b, r] = T + len(tokens)
    return BeamSearchOutput(sequences=sequences, scores=scores, lengths=lengths)

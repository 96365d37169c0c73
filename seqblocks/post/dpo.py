"""Direct Preference Optimization (Rafailov et al. 2023) on (prompt, chosen, rejected) triples.

The loss of one pair, with policy log-probabilities ``pc`` / ``pr`` of the chosen / rejected
response given the prompt and the frozen reference model's ``rc`` / ``rr``::

    z    = beta * ((pc - rc) - (pr - rr))
    loss = -(1 - eps) * log sigmoid(z) - eps * log sigmoid(-z)

``eps`` is ``label_smoothing`` (conservative DPO: the label is right with probability 1 - eps).
A response's log-probability is the sum over its tokens, the prompt unscored.

Shapes: B pairs, T tokens, V vocabulary.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from seqblocks.post.runner import LoopConfig, LoopResult, run_loop

__all__ = ["dpo_loss", "sequence_logprobs", "PreferencePair", "load_preferences", "collate_pairs", "DPOConfig",
           "train_dpo"]


def dpo_loss(policy_chosen: torch.Tensor, policy_rejected: torch.Tensor, ref_chosen: torch.Tensor,
             ref_rejected: torch.Tensor, beta: float = 0.1, label_smoothing: float = 0.0
             ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The DPO loss of a batch of pairs (see the module docstring).

    Args:
        policy_chosen, policy_rejected (Tensor): [B] summed log-probabilities under the policy.
        ref_chosen, ref_rejected (Tensor): [B] the same under the reference model.
        beta (float): > 0, the inverse temperature of the implicit reward. Default: 0.1.
        label_smoothing (float): in [0, 0.5), the assumed label noise. Default: 0.0.

    Returns:
        tuple: the mean loss (scalar, fp32), and the implicit rewards ``beta * (p - r)`` of the chosen
        and of the rejected responses ([B] each, detached).

    Raises:
        ValueError: beta <= 0, label_smoothing outside [0, 0.5), tensors of different shapes.
    """
    if not beta > 0:
        raise ValueError(f"beta={beta!r} must be positive")
    if not 0.0 <= label_smoothing < 0.5:
        raise ValueError(f"label_smoothing={label_smoothing!r} must be in [0, 0.5)")
    shapes = {tuple(t.shape) for t in (policy_chosen, policy_rejected, ref_chosen, ref_rejected)}
    if len(shapes) != 1:
        raise ValueError(f"the four log-probability tensors must have one shape, got {sorted(shapes)}")
    chosen = policy_chosen.float() - ref_chosen.float()
    rejected = policy_rejected.float() - ref_rejected.float()
    z = beta * (chosen - rejected)
    loss = -(1.0 - label_smoothing) * F.logsigmoid(z) - label_smoothing * F.logsigmoid(-z)
    return loss.mean(), (beta * chosen).detach(), (beta * rejected).detach()


def sequence_logprobs(model: nn.Module, input_ids: torch.Tensor, response_mask: torch.Tensor) -> torch.Tensor:
    """Summed log-probability of the masked tokens of each row.

    Args:
        model (nn.Module): causal LM, ``model(ids).logits`` [B, T, V].
        input_ids (Tensor): [B, T] prompt + response (+ padding).
        response_mask (Tensor): [B, T] 1 where a token is scored (the response), 0 elsewhere; position
            0 is never scored (nothing predicts it).

    Returns:
        Tensor: [B] fp32 sum over scored tokens of ``log p(token | earlier tokens)``.
    """
    if input_ids.shape != response_mask.shape:
        raise ValueError(f"input_ids {tuple(input_ids.shape)} and response_mask {tuple(response_mask.shape)} "
                         f"must have one shape")
    logits = model(input_ids).logits[:, :-1].float()  # position t predicts token t + 1
    logp = torch.gather(F.log_softmax(logits, dim=-1), -1, input_ids[:, 1:, None]).squeeze(-1)  # [B, T - 1]
    return (logp * response_mask[:, 1:].to(logp.dtype)).sum(-1)


@dataclasses.dataclass(frozen=True)
class PreferencePair:
    """One preference example as token ids: the prompt and the chosen / rejected continuations."""

    prompt: tuple[int, ...]
    chosen: tuple[int, ...]
    rejected: tuple[int, ...]


def load_preferences(path: str | Path, encode: Callable[[str], list[int]] | None = None,
                     vocab_size: int | None = None) -> list[PreferencePair]:
    """Read a JSONL file of ``{"prompt": ..., "chosen": ..., "rejected": ...}`` lines.

    Each field is a string (tokenised with ``encode``) or a list of token ids. Blank lines are skipped.

    Raises:
        ValueError: a line that is not such an object (its number is given), an empty response, a
            string without ``encode``, ids outside [0, vocab_size), an empty file.
    """
    pairs = []
    for number, line in enumerate(Path(path).read_text().splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as err:
            raise ValueError(f"{path}:{number}: not JSON ({err})") from None
        if not isinstance(row, dict) or not {"prompt", "chosen", "rejected"} <= set(row):
            raise ValueError(f"{path}:{number}: expected an object with prompt, chosen and rejected")
        fields = []
        for key in ("prompt", "chosen", "rejected"):
            value = row[key]
            if isinstance(value, str):
                if encode is None:
                    raise ValueError(f"{path}:{number}: {key} is text but no tokenizer was given (use token ids, "
                                     f"or a checkpoint with a tokenizer)")
                value = encode(value)
            if not isinstance(value, list) or not all(isinstance(i, int) and not isinstance(i, bool) for i in value):
                raise ValueError(f"{path}:{number}: {key} must be a string or a list of token ids")
            if vocab_size is not None and any(not 0 <= i < vocab_size for i in value):
                raise ValueError(f"{path}:{number}: {key} has token ids outside [0, {vocab_size})")
            fields.append(tuple(value))
        if not fields[1] or not fields[2]:
            raise ValueError(f"{path}:{number}: chosen and rejected must be non-empty")
        if not fields[0]:
            raise ValueError(f"{path}:{number}: the prompt must be non-empty (its last token predicts the response)")
        pairs.append(PreferencePair(*fields))
    if not pairs:
        raise ValueError(f"{path}: no preference pairs")
    return pairs


def collate_pairs(pairs: Sequence[PreferencePair], pad_token_id: int = 0,
                  max_len: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-padded ``[2B, T]`` ids and response masks: rows ``0..B-1`` prompt + chosen, rows ``B..2B-1``
    prompt + rejected (one forward scores both). ``max_len`` cuts long rows from the right."""
    rows = [p.prompt + p.chosen for p in pairs] + [p.prompt + p.rejected for p in pairs]
    starts = [len(p.prompt) for p in pairs] * 2
    T = max(len(r) for r in rows) if max_len is None else min(max_len, max(len(r) for r in rows))
    ids = torch.full((len(rows), T), pad_token_id, dtype=torch.long)
    mask = torch.zeros((len(rows), T), dtype=torch.long)
    for i, (row, start) in enumerate(zip(rows, starts)):
        row = row[:T]
        ids[i, : len(row)] = torch.tensor(row)
        mask[i, start: len(row)] = 1
    return ids, mask


@dataclasses.dataclass(frozen=True, kw_only=True)
class DPOConfig(LoopConfig):
    """A DPO run: ``LoopConfig`` plus

    Args:
        beta (float): inverse temperature of the implicit reward. Default: 0.1.
        label_smoothing (float): assumed label noise, in [0, 0.5). Default: 0.0.
        batch_size (int): pairs per step. Default: 8.
        max_len (int): prompt + response tokens kept per row. Default: 512.
    """

    lr: float = 5e-5
    beta: float = 0.1
    label_smoothing: float = 0.0
    batch_size: int = 8
    max_len: int = 512

    def __post_init__(self) -> None:
        super().__post_init__()
        if not self.beta > 0:
            raise ValueError(f"DPOConfig.beta={self.beta!r} must be positive")
        if not 0.0 <= self.label_smoothing < 0.5:
            raise ValueError(f"DPOConfig.label_smoothing={self.label_smoothing!r} must be in [0, 0.5)")
        if self.batch_size <= 0:
            raise ValueError(f"DPOConfig.batch_size={self.batch_size!r} must be a positive integer")
        if self.max_len < 2:
            raise ValueError(f"DPOConfig.max_len={self.max_len!r} must be at least 2")


def _batch_indices(n: int, batch_size: int, step: int, seed: int) -> list[int]:
    """Rows of step ``step``: epochs of seeded permutations, a pure function of (seed, step)."""
    out = []
    position = step * batch_size
    while len(out) < batch_size:
        epoch, offset = divmod(position, n)
        order = torch.randperm(n, generator=torch.Generator().manual_seed(seed * 1_000_003 + epoch)).tolist()
        take = order[offset: offset + batch_size - len(out)]
        out.extend(take)
        position += len(take)
    return out


def train_dpo(policy: nn.Module, reference: nn.Module, pairs: Sequence[PreferencePair], config: DPOConfig,
              out_dir: str | Path, **loop_kwargs: Any) -> LoopResult:
    """Train ``policy`` with DPO against the frozen ``reference`` on ``pairs``.

    Logged per step: ``loss``, ``reward_margin`` (mean chosen minus rejected implicit reward) and
    ``reward_acc`` (fraction of pairs whose chosen reward is higher). Checkpoints, resume and the
    run directory are ``run_loop``'s.

    Args:
        policy (nn.Module): the model trained (a LoRA-wrapped model trains its adapters only).
        reference (nn.Module): the frozen reference (usually the policy's starting point).
        pairs (Sequence[PreferencePair]): the data.
        config (DPOConfig): the run.
        out_dir (str | Path): run directory.
        **loop_kwargs: ``run_loop`` options (``resume``, ``overwrite``, ``save_fn``, ...).
    """
    if not pairs:
        raise ValueError("train_dpo: no preference pairs")
    device = next(policy.parameters()).device
    reference.eval().requires_grad_(False)

    def objective(step: int) -> tuple[torch.Tensor, dict[str, float]]:
        rows = [pairs[i] for i in _batch_indices(len(pairs), config.batch_size, step, config.seed)]
        ids, mask = collate_pairs(rows, max_len=config.max_len)
        ids, mask = ids.to(device), mask.to(device)
        B = len(rows)
        policy_logp = sequence_logprobs(policy, ids, mask)
        with torch.no_grad():
            ref_logp = sequence_logprobs(reference, ids, mask)
        loss, chosen, rejected = dpo_loss(policy_logp[:B], policy_logp[B:], ref_logp[:B], ref_logp[B:],
                                          config.beta, config.label_smoothing)
        return loss, {"reward_margin": float((chosen - rejected).mean()),
                      "reward_acc": float((chosen > rejected).float().mean())}

    return run_loop(policy, objective, config, out_dir, recipe="dpo", **loop_kwargs)

"""Group Relative Policy Optimization (Shao et al. 2024, DeepSeekMath) with a verifiable reward.

Each step samples ``group_size`` completions of every prompt with ``generate`` from the current
policy, scores them with a reward function, and normalises the rewards within each prompt's group::

    A_i = (r_i - mean(r)) / (std(r) + eps)          (std: the group's, unbiased; scale_rewards=False drops it)

Every completion token then gets the clipped surrogate plus a KL penalty to the frozen reference,
with ``ratio = exp(logp - logp_old)`` (``logp_old``: the policy that sampled, detached) and the
non-negative k3 estimator of KL(policy || reference) (Schulman 2020)::

    kl_t   = exp(ref_t - logp_t) - (ref_t - logp_t) - 1
    loss_t = -min(ratio_t * A, clip(ratio_t, 1 - clip_eps, 1 + clip_eps) * A) + kl_coeff * kl_t

averaged over each completion's tokens, then over completions. With one update per rollout (as
here) ``ratio`` is 1 in value and the clip never binds; its gradient is the policy gradient.

Shapes: B prompts, G group size, P prompt length, L completion length.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from seqblocks.post.runner import LoopConfig, LoopResult, run_loop

__all__ = ["group_advantages", "kl_k3", "grpo_loss", "completion_token_logprobs", "copy_reward", "CopyPrompts",
           "GRPOConfig", "train_grpo"]


def group_advantages(rewards: torch.Tensor, eps: float = 1e-4, scale_rewards: bool = True) -> torch.Tensor:
    """Group-normalised advantages.

    Args:
        rewards (Tensor): [B, G] the rewards of the G completions of each prompt.
        eps (float): added to the standard deviation. Default: 1e-4.
        scale_rewards (bool): divide by the group's standard deviation (Dr. GRPO leaves it out).
            Default: True.

    Returns:
        Tensor: [B, G] fp32 ``(r - mean) / (std + eps)`` per group (0 for a group of equal rewards).
    """
    if rewards.dim() != 2 or rewards.shape[1] < 2:
        raise ValueError(f"rewards must be [B, G] with G >= 2 completions per prompt, got {tuple(rewards.shape)}")
    rewards = rewards.float()
    centred = rewards - rewards.mean(dim=1, keepdim=True)
    if not scale_rewards:
        return centred
    return centred / (rewards.std(dim=1, keepdim=True) + eps)


def kl_k3(logp: torch.Tensor, ref_logp: torch.Tensor) -> torch.Tensor:
    """Per-token k3 estimate of KL(policy || reference): ``exp(d) - d - 1`` with ``d = ref - logp``; >= 0."""
    d = ref_logp.float() - logp.float()
    return torch.exp(d) - d - 1.0


def grpo_loss(logp: torch.Tensor, old_logp: torch.Tensor, ref_logp: torch.Tensor, advantages: torch.Tensor,
              mask: torch.Tensor, clip_eps: float = 0.2, kl_coeff: float = 0.04
              ) -> tuple[torch.Tensor, dict[str, float]]:
    """The GRPO objective of a batch of completions (see the module docstring).

    Args:
        logp (Tensor): [N, L] per-token log-probabilities under the policy (with gradient).
        old_logp (Tensor): [N, L] under the policy that sampled (detached).
        ref_logp (Tensor): [N, L] under the reference.
        advantages (Tensor): [N] one per completion.
        mask (Tensor): [N, L] 1 on completion tokens, 0 on padding.
        clip_eps (float): the ratio's clip range. Default: 0.2.
        kl_coeff (float): weight of the KL penalty (beta); 0 drops it. Default: 0.04.

    Returns:
        tuple: the scalar loss and floats ``kl`` (mean per token) and ``clip_frac``.
    """
    if logp.shape != old_logp.shape or logp.shape != ref_logp.shape or logp.shape != mask.shape:
        raise ValueError(f"logp {tuple(logp.shape)}, old_logp {tuple(old_logp.shape)}, ref_logp "
                         f"{tuple(ref_logp.shape)} and mask {tuple(mask.shape)} must have one shape")
    if advantages.shape != logp.shape[:1]:
        raise ValueError(f"advantages must be [N] = [{logp.shape[0]}], got {tuple(advantages.shape)}")
    if clip_eps < 0 or kl_coeff < 0:
        raise ValueError(f"clip_eps={clip_eps!r} and kl_coeff={kl_coeff!r} must be >= 0")
    mask = mask.float()
    ratio = torch.exp(logp.float() - old_logp.float())
    adv = advantages.float()[:, None]
    surrogate = torch.minimum(ratio * adv, ratio.clamp(1 - clip_eps, 1 + clip_eps) * adv)
    kl = kl_k3(logp, ref_logp)
    per_token = -surrogate + kl_coeff * kl
    lengths = mask.sum(-1).clamp(min=1)
    loss = ((per_token * mask).sum(-1) / lengths).mean()
    total = mask.sum().clamp(min=1)
    clipped = ((ratio - 1).abs() > clip_eps).float()
    return loss, {"kl": float((kl.detach() * mask).sum() / total),
                  "clip_frac": float((clipped * mask).sum() / total)}


def completion_token_logprobs(model: nn.Module, prompts: torch.Tensor, completions: torch.Tensor) -> torch.Tensor:
    """[N, L] fp32 log-probability of each completion token given the prompt and the earlier completion.

    Args:
        prompts (Tensor): [N, P] prompts (equal length).
        completions (Tensor): [N, L] completion tokens.
    """
    P = prompts.shape[1]
    logits = model(torch.cat([prompts, completions], dim=1)).logits[:, P - 1: -1].float()
    return torch.gather(F.log_softmax(logits, -1), -1, completions[..., None]).squeeze(-1)


def copy_reward(reference: list[int], completion: list[int]) -> float:
    """The copying task's verifiable reward: the fraction of the reference string reproduced in place
    (a completion shorter than the reference scores its missing positions as wrong)."""
    if not reference:
        raise ValueError("copy_reward: the reference string is empty")
    right = sum(1 for a, b in zip(reference, completion) if a == b)
    return right / len(reference)


class CopyPrompts:
    """Prompts and references from the embedded ``copying`` task: the prompt is a random string and
    the separator, the reference is the string; a pure function of (seed, step).

    Args:
        vocab_size (int): the task's vocabulary. Default: 16.
        num_tokens (int): string length. Default: 8.
    """

    def __init__(self, vocab_size: int = 16, num_tokens: int = 8) -> None:
        from seqblocks.tasks import get_task

        self.task = get_task("copying", vocab_size=vocab_size, num_tokens=num_tokens)
        self.num_tokens = num_tokens

    @property
    def vocab_size(self) -> int:
        return self.task.vocab_size

    def __call__(self, step: int, batch_size: int, seed: int) -> tuple[torch.Tensor, list[list[int]]]:
        """(prompts [B, num_tokens + 1], references: the B strings to reproduce)."""
        ids = self.task.batch("train", step, batch_size, seed).input_ids
        M = self.num_tokens
        return ids[:, : M + 1].clone(), ids[:, :M].tolist()


@dataclasses.dataclass(frozen=True, kw_only=True)
class GRPOConfig(LoopConfig):
    """A GRPO run: ``LoopConfig`` plus

    Args:
        batch_size (int): prompts per step. Default: 8.
        group_size (int): completions sampled per prompt (G >= 2). Default: 8.
        max_new_tokens (int): completion length. Default: 8.
        temperature (float): sampling temperature (> 0). Default: 1.0.
        clip_eps (float): the ratio's clip range. Default: 0.2.
        kl_coeff (float): weight of the KL to the reference. Default: 0.04.
        scale_rewards (bool): divide advantages by the group's std. Default: True.
    """

    lr: float = 1e-4
    batch_size: int = 8
    group_size: int = 8
    max_new_tokens: int = 8
    temperature: float = 1.0
    clip_eps: float = 0.2
    kl_coeff: float = 0.04
    scale_rewards: bool = True

    def __post_init__(self) -> None:
        super().__post_init__()
        for name in ("batch_size", "max_new_tokens"):
            if getattr(self, name) <= 0:
                raise ValueError(f"GRPOConfig.{name}={getattr(self, name)!r} must be a positive integer")
        if self.group_size < 2:
            raise ValueError(f"GRPOConfig.group_size={self.group_size!r} must be at least 2 (advantages compare "
                             f"completions of one prompt)")
        if not self.temperature > 0:
            raise ValueError(f"GRPOConfig.temperature={self.temperature!r} must be positive (sampling)")
        for name in ("clip_eps", "kl_coeff"):
            if getattr(self, name) < 0:
                raise ValueError(f"GRPOConfig.{name}={getattr(self, name)!r} must be >= 0")


def train_grpo(policy: nn.Module, reference: nn.Module,
               prompts: Callable[[int, int, int], tuple[torch.Tensor, list[Any]]],
               reward_fn: Callable[[Any, list[int]], float], config: GRPOConfig, out_dir: str | Path,
               **loop_kwargs: Any) -> LoopResult:
    """Train ``policy`` with GRPO.

    Logged per step: ``loss``, ``reward`` (mean over all completions), ``reward_std`` (mean
    within-group std), ``kl`` and ``clip_frac``.

    Args:
        policy (nn.Module): the model trained; it samples its own completions.
        reference (nn.Module): the frozen KL anchor.
        prompts (Callable): ``prompts(step, batch_size, seed) -> (ids [B, P], references)``, e.g.
            ``CopyPrompts``.
        reward_fn (Callable): ``reward_fn(reference, completion_ids) -> float``, e.g. ``copy_reward``.
        config (GRPOConfig): the run.
        out_dir (str | Path): run directory.
        **loop_kwargs: ``run_loop`` options.
    """
    from seqblocks.generation import generate

    device = next(policy.parameters()).device
    reference.eval().requires_grad_(False)
    B, G = config.batch_size, config.group_size

    def objective(step: int) -> tuple[torch.Tensor, dict[str, float]]:
        ids, refs = prompts(step, B, config.seed)
        ids = ids.to(device)
        group_prompts = ids.repeat_interleave(G, dim=0)  # [B G, P]
        policy.eval()
        with torch.no_grad():
            out = generate(policy, group_prompts, max_new_tokens=config.max_new_tokens,
                           temperature=config.temperature, seed=config.seed * 1_000_003 + step)
        policy.train()
        completions = out.tokens  # [B G, L]
        L = completions.shape[1]
        mask = (torch.arange(L, device=device)[None] < out.num_generated[:, None]).float()
        rewards = torch.tensor([[reward_fn(refs[b], completions[b * G + g, : int(out.num_generated[b * G + g])]
                                           .tolist()) for g in range(G)] for b in range(B)], device=device)
        advantages = group_advantages(rewards, scale_rewards=config.scale_rewards).flatten()  # [B G]
        logp = completion_token_logprobs(policy, group_prompts, completions)
        with torch.no_grad():
            ref_logp = completion_token_logprobs(reference, group_prompts, completions)
        loss, stats = grpo_loss(logp, logp.detach(), ref_logp, advantages, mask, config.clip_eps, config.kl_coeff)
        return loss, {"reward": float(rewards.mean()), "reward_std": float(rewards.std(dim=1).mean()), **stats}

    return run_loop(policy, objective, config, out_dir, recipe="grpo", **loop_kwargs)

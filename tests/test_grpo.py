"""GRPO: advantages, the KL estimator and the loss on constructed batches, the copying reward, a run
through the loop, and `seqblocks grpo` end to end."""

from __future__ import annotations

import json
import math

import pytest
import torch
from post_fixtures import one_thread, tiny_checkpoint, tiny_model  # noqa: F401

from seqblocks.post.grpo import (
    CopyPrompts,
    GRPOConfig,
    copy_reward,
    group_advantages,
    grpo_loss,
    kl_k3,
    train_grpo,
)

pytestmark = pytest.mark.usefixtures("one_thread")


def test_group_advantages_on_a_constructed_batch():
    rewards = torch.tensor([[1.0, 0.0, 0.0, 1.0], [0.5, 0.5, 0.5, 0.5], [3.0, 1.0, 2.0, 2.0]])
    adv = group_advantages(rewards, eps=0.0 + 1e-4)
    std0 = math.sqrt(1 / 3)  # unbiased std of (1, 0, 0, 1)
    torch.testing.assert_close(adv[0], torch.tensor([0.5, -0.5, -0.5, 0.5]) / (std0 + 1e-4))
    assert adv[1].abs().max() == 0  # a group of equal rewards teaches nothing
    std2 = math.sqrt(2 / 3)
    torch.testing.assert_close(adv[2], torch.tensor([1.0, -1.0, 0.0, 0.0]) / (std2 + 1e-4))
    torch.testing.assert_close(group_advantages(rewards, scale_rewards=False)[2], torch.tensor([1.0, -1.0, 0.0, 0.0]))
    with pytest.raises(ValueError, match="G >= 2"):
        group_advantages(torch.ones(3, 1))


def test_kl_k3_is_the_estimator_and_non_negative():
    logp = torch.tensor([-1.0, -2.0, -0.5])
    ref = torch.tensor([-1.5, -2.0, -0.1])
    d = ref - logp
    torch.testing.assert_close(kl_k3(logp, ref), torch.exp(d) - d - 1)
    assert kl_k3(logp, logp).abs().max() == 0
    assert (kl_k3(torch.randn(100), torch.randn(100)) >= 0).all()


def test_grpo_loss_on_a_constructed_batch():
    logp = torch.tensor([[-1.0, -2.0, -3.0], [-0.5, -0.5, 0.0]], requires_grad=True)
    old = torch.tensor([[-1.0, -2.5, -3.0], [-0.5, -0.2, 0.0]])
    ref = torch.tensor([[-1.2, -2.0, -2.0], [-0.4, -0.5, 0.0]])
    adv = torch.tensor([1.0, -2.0])
    mask = torch.tensor([[1.0, 1.0, 1.0], [1.0, 1.0, 0.0]])
    loss, stats = grpo_loss(logp, old, ref, adv, mask, clip_eps=0.2, kl_coeff=0.1)
    expected, kls = 0.0, []
    for n in range(2):
        terms = []
        for t in range(3):
            if not mask[n, t]:
                continue
            ratio = math.exp(logp[n, t].item() - old[n, t].item())
            a = adv[n].item()
            surrogate = min(ratio * a, min(max(ratio, 0.8), 1.2) * a)
            d = ref[n, t].item() - logp[n, t].item()
            kls.append(math.exp(d) - d - 1)
            terms.append(-surrogate + 0.1 * kls[-1])
        expected += sum(terms) / len(terms) / 2
    assert loss.item() == pytest.approx(expected, rel=1e-6)
    assert stats["kl"] == pytest.approx(sum(kls) / len(kls), rel=1e-6)
    assert stats["clip_frac"] == pytest.approx(2 / 5)  # exp(0.5) and exp(-0.3) leave [0.8, 1.2]
    loss.backward()
    assert logp.grad[1, 2] == 0  # padding gets no gradient


def test_grpo_loss_gradient_is_the_policy_gradient_on_policy():
    logp = torch.tensor([[-1.0, -2.0], [-0.5, -0.7]], requires_grad=True)
    adv = torch.tensor([1.5, -1.5])
    loss, _ = grpo_loss(logp, logp.detach(), logp.detach(), adv, torch.ones(2, 2), kl_coeff=0.5)
    loss.backward()
    # ratio = 1 in value, KL and its gradient are 0 at ref = logp: d loss / d logp = -A / (L * N).
    torch.testing.assert_close(logp.grad, -adv[:, None].expand(2, 2) / 4)


def test_copy_reward():
    assert copy_reward([3, 4, 5, 6], [3, 4, 9, 6]) == 0.75
    assert copy_reward([3, 4], [3]) == 0.5
    with pytest.raises(ValueError, match="empty"):
        copy_reward([], [1])


def test_copy_prompts_are_the_copying_task():
    prompts = CopyPrompts(vocab_size=16, num_tokens=4)
    ids, refs = prompts(3, 5, seed=0)
    assert ids.shape == (5, 5) and (ids[:, -1] == 1).all()  # the separator
    assert refs == ids[:, :4].tolist()
    again, _ = prompts(3, 5, seed=0)
    assert torch.equal(ids, again)


def test_grpo_config_validates():
    with pytest.raises(ValueError, match="group_size"):
        GRPOConfig(group_size=1)
    with pytest.raises(ValueError, match="temperature"):
        GRPOConfig(temperature=0.0)


def test_train_grpo_logs_rewards_and_kl(tmp_path):
    config = GRPOConfig(steps=3, lr=1e-2, batch_size=2, group_size=4, max_new_tokens=4, log_every=1)
    result = train_grpo(tiny_model(), tiny_model(), CopyPrompts(16, 4), copy_reward, config, tmp_path / "run",
                        log=lambda m: None)
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3]
    assert rows[0]["kl"] == pytest.approx(0.0, abs=1e-6)  # the policy starts at the reference
    assert rows[-1]["kl"] > 0  # and leaves it
    assert all(0.0 <= r["reward"] <= 1.0 for r in rows)
    assert result.checkpoint is not None and (result.checkpoint / "model.safetensors").is_file()


def test_grpo_command_end_to_end(tmp_path):
    from seqblocks.cli import main

    base = tiny_checkpoint(tmp_path / "base")
    out = tmp_path / "run"
    assert main(["grpo", str(base), "--out", str(out), "--steps", "2", "--batch-size", "2", "--group-size", "3",
                 "--device", "cpu", "--no-progress", "--threads", "1"]) == 0
    task = json.loads((out / "checkpoints" / "step_0000002" / "task.json").read_text())
    assert task == {"name": "copying", "options": {"vocab_size": 16, "num_tokens": 4}}
    assert main(["eval", str(out), "--device", "cpu", "--threads", "1"]) == 0

"""DPO: the loss against its formula, sequence log-probabilities, the JSONL reader, a training run
with resume, and `seqblocks dpo` end to end."""

from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn.functional as F
from post_fixtures import one_thread, tiny_checkpoint, tiny_model  # noqa: F401

from seqblocks.post.dpo import (
    DPOConfig,
    PreferencePair,
    collate_pairs,
    dpo_loss,
    load_preferences,
    sequence_logprobs,
    train_dpo,
)

pytestmark = pytest.mark.usefixtures("one_thread")


def _log_sigmoid(x: float) -> float:
    return -math.log1p(math.exp(-x))


def test_dpo_loss_equals_the_formula_on_constructed_logprobs():
    pc, pr = torch.tensor([-3.0, -5.0, -1.0]), torch.tensor([-4.0, -2.0, -1.5])
    rc, rr = torch.tensor([-3.5, -4.0, -1.2]), torch.tensor([-3.0, -2.5, -1.0])
    for beta, eps in ((0.1, 0.0), (0.5, 0.0), (0.3, 0.2)):
        loss, chosen, rejected = dpo_loss(pc, pr, rc, rr, beta=beta, label_smoothing=eps)
        expected = []
        for i in range(3):
            z = beta * ((pc[i] - rc[i]) - (pr[i] - rr[i])).item()
            expected.append(-(1 - eps) * _log_sigmoid(z) - eps * _log_sigmoid(-z))
        assert loss.item() == pytest.approx(sum(expected) / 3, rel=1e-6)
        torch.testing.assert_close(chosen, beta * (pc - rc))
        torch.testing.assert_close(rejected, beta * (pr - rr))
    # Equal policy and reference: z = 0, loss log 2 whatever the smoothing.
    assert dpo_loss(pc, pr, pc, pr, 0.1, 0.1)[0].item() == pytest.approx(math.log(2))


def test_dpo_loss_rejects_bad_arguments():
    t = torch.zeros(2)
    with pytest.raises(ValueError, match="beta"):
        dpo_loss(t, t, t, t, beta=0.0)
    with pytest.raises(ValueError, match="label_smoothing"):
        dpo_loss(t, t, t, t, label_smoothing=0.5)
    with pytest.raises(ValueError, match="one shape"):
        dpo_loss(t, t, t, torch.zeros(3))


def test_sequence_logprobs_sums_the_masked_tokens():
    model = tiny_model()
    ids = torch.randint(0, 16, (2, 7))
    mask = torch.zeros(2, 7, dtype=torch.long)
    mask[0, 3:] = 1
    mask[1, 5:6] = 1
    got = sequence_logprobs(model, ids, mask)
    logp = F.log_softmax(model(ids).logits.float(), -1)
    expected = torch.stack([sum(logp[b, t - 1, ids[b, t]] for t in range(1, 7) if mask[b, t]) for b in range(2)])
    torch.testing.assert_close(got, expected)


def test_dpo_works_in_bf16():
    model = tiny_model().to(torch.bfloat16)
    ids, mask = collate_pairs([PreferencePair((1, 2), (3, 4), (5,))])
    logp = sequence_logprobs(model, ids, mask)
    assert logp.dtype == torch.float32 and torch.isfinite(logp).all()


def test_load_preferences_reads_text_and_ids(tmp_path):
    path = tmp_path / "pairs.jsonl"
    path.write_text(json.dumps({"prompt": "ab", "chosen": "c", "rejected": "dd"}) + "\n\n" +
                    json.dumps({"prompt": [1, 2], "chosen": [3], "rejected": [4, 5]}) + "\n")
    pairs = load_preferences(path, encode=lambda s: [ord(c) - 96 for c in s], vocab_size=16)
    assert pairs == [PreferencePair((1, 2), (3,), (4, 4)), PreferencePair((1, 2), (3,), (4, 5))]
    with pytest.raises(ValueError, match="no tokenizer"):
        load_preferences(path)
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": [1], "chosen": [2]}\n')
    with pytest.raises(ValueError, match=r"bad.jsonl:1: expected an object"):
        load_preferences(bad)
    bad.write_text('{"prompt": [1], "chosen": [99], "rejected": [2]}\n')
    with pytest.raises(ValueError, match=r"outside \[0, 16\)"):
        load_preferences(bad, vocab_size=16)


def test_collate_pairs_masks_only_the_responses():
    ids, mask = collate_pairs([PreferencePair((1, 2), (3, 4), (5,)), PreferencePair((6,), (7,), (8, 9, 10))])
    assert ids.tolist() == [[1, 2, 3, 4], [6, 7, 0, 0], [1, 2, 5, 0], [6, 8, 9, 10]]
    assert mask.tolist() == [[0, 0, 1, 1], [0, 1, 0, 0], [0, 0, 1, 0], [0, 1, 1, 1]]


def _pairs() -> list[PreferencePair]:
    g = torch.Generator().manual_seed(1)
    out = []
    for _ in range(6):
        prompt = tuple(torch.randint(2, 16, (3,), generator=g).tolist())
        out.append(PreferencePair(prompt, prompt[:2], (1, 1)))
    return out


def test_train_dpo_raises_the_margin_and_resumes_exactly(tmp_path):
    pairs = _pairs()
    config = DPOConfig(steps=6, lr=3e-3, beta=0.5, batch_size=4, log_every=1, ckpt_every=3)
    policy, reference = tiny_model(), tiny_model()
    full = train_dpo(policy, reference, pairs, config, tmp_path / "full", log=lambda m: None)
    rows = [json.loads(line) for line in (tmp_path / "full" / "metrics.jsonl").read_text().splitlines()]
    assert rows[0]["loss"] == pytest.approx(math.log(2), abs=1e-4)  # policy == reference at step 0
    assert rows[-1]["reward_margin"] > rows[0]["reward_margin"]
    assert rows[-1]["loss"] < rows[0]["loss"]

    half = train_dpo(tiny_model(), tiny_model(), pairs, DPOConfig(**{**config.to_dict(), "steps": 3}),
                     tmp_path / "split", log=lambda m: None)
    assert half.step == 3
    resumed = train_dpo(tiny_model(), tiny_model(), pairs, config, tmp_path / "split", resume=True,
                        log=lambda m: None)
    for (name, a), b in zip(full.model.state_dict().items(), resumed.model.state_dict().values()):
        torch.testing.assert_close(a, b, msg=name)
    with pytest.raises(ValueError, match="configuration differs"):
        train_dpo(tiny_model(), tiny_model(), pairs, DPOConfig(**{**config.to_dict(), "beta": 0.2}),
                  tmp_path / "split", resume=True, log=lambda m: None)


def test_dpo_command_end_to_end(tmp_path):
    from seqblocks.cli import main

    base = tiny_checkpoint(tmp_path / "base")
    data = tmp_path / "pairs.jsonl"
    data.write_text("\n".join(json.dumps({"prompt": list(p.prompt), "chosen": list(p.chosen),
                                          "rejected": list(p.rejected)}) for p in _pairs()))
    out = tmp_path / "run"
    args = ["dpo", str(base), "--data", str(data), "--out", str(out), "--steps", "2", "--batch-size", "2",
            "--device", "cpu", "--no-progress", "--lora-r", "2", "--threads", "1"]
    assert main(args) == 0
    ckpt = out / "checkpoints" / "step_0000002"
    assert (ckpt / "adapter_model.safetensors").is_file() and not (ckpt / "model.safetensors").exists()
    assert main(args[:-4] + ["--lora-r", "2", "--threads", "1", "--resume", "--steps", "3"]) == 0
    assert (out / "checkpoints" / "step_0000003").is_dir()


def test_run_loop_refuses_what_it_cannot_do(tmp_path):
    from seqblocks.post.runner import LoopConfig, run_loop

    model = tiny_model()
    ids = torch.randint(0, 16, (2, 6))

    def objective(step):
        return model(ids).logits.float().square().mean(), {}

    config = LoopConfig(steps=1, log_every=1)
    run_loop(model, objective, config, tmp_path / "run", recipe="demo", log=lambda m: None)
    with pytest.raises(ValueError, match="'demo' checkpoint, not 'dpo'"):
        run_loop(model, objective, config, tmp_path / "run", recipe="dpo", resume=True, log=lambda m: None)
    with pytest.raises(ValueError, match="holds a previous run|overwrite"):
        run_loop(model, objective, config, tmp_path / "run", recipe="demo", log=lambda m: None)
    done = run_loop(model, objective, config, tmp_path / "run", recipe="demo", resume=True, log=lambda m: None)
    assert done.already_complete and done.step == 1
    with pytest.raises(FileNotFoundError, match="no checkpoint"):
        run_loop(model, objective, config, tmp_path / "empty", recipe="demo", resume=True, log=lambda m: None)
    with pytest.raises(FloatingPointError, match="the loss is nan"):
        run_loop(model, lambda step: (objective(step)[0] * float("nan"), {}), config, tmp_path / "nan",
                 recipe="demo", log=lambda m: None)
    frozen = tiny_model().requires_grad_(False)
    with pytest.raises(ValueError, match="no trainable parameters"):
        run_loop(frozen, objective, config, tmp_path / "frozen", recipe="demo", log=lambda m: None)

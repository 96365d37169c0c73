"""Sequence-length warmup (``TrainConfig.seq_len_warmup``)."""

from __future__ import annotations

import pytest
import torch
from post_fixtures import TINY, one_thread  # noqa: F401

from seqblocks.tasks import Batch
from seqblocks.train.config import TrainConfig
from seqblocks.train.curriculum import curriculum_batch, curriculum_seq_len

pytestmark = pytest.mark.usefixtures("one_thread")


def test_the_length_grows_linearly_in_multiples_of_8():
    lengths = [curriculum_seq_len(s, 128, 10, 16) for s in range(12)]
    assert lengths == [16, 27 // 8 * 8, 38 // 8 * 8, 49 // 8 * 8, 60 // 8 * 8, 72, 83 // 8 * 8, 94 // 8 * 8,
                       105 // 8 * 8, 116 // 8 * 8, 128, 128]
    assert curriculum_seq_len(3, 128, 0, 16) == 128  # off
    assert curriculum_seq_len(0, 12, 10, 16) == 12  # never longer than the task


def test_curriculum_batch_keeps_each_rows_prefix():
    batch = Batch(torch.arange(64).view(2, 32), torch.arange(64).view(2, 32) + 1)
    cut = curriculum_batch(batch, 0, 4, 8)
    assert torch.equal(cut.input_ids, batch.input_ids[:, :8]) and torch.equal(cut.targets, batch.targets[:, :8])
    assert curriculum_batch(batch, 4, 4, 8) is batch


def test_train_config_validates_the_warmup():
    with pytest.raises(ValueError, match="seq_len_start"):
        TrainConfig(seq_len_start=0)
    with pytest.raises(ValueError, match="seq_len_warmup"):
        TrainConfig(seq_len_warmup=-1)


def test_training_with_the_warmup_sees_short_rows_first(tmp_path, monkeypatch):
    from seqblocks.train import trainer

    seen = []
    original = trainer._micro_batches

    def spy(task, step, config, info):
        parts, count = original(task, step, config, info)
        seen.append(parts[0].input_ids.shape[1])
        return parts, count

    monkeypatch.setattr(trainer, "_micro_batches", spy)
    config = TrainConfig(task="induction_heads", task_options={"vocab_size": 16, "seq_len": 32, "eval_examples": 8},
                         steps=4, batch_size=4, seq_len_warmup=2, seq_len_start=8, eval_every=0, ckpt_every=0,
                         sample_tokens=0, device="cpu", precision="fp32", warmup_steps=0)
    trainer.train(dict(TINY), config, tmp_path / "run", progress=False, log=lambda m: None)
    assert seen == [8, 16, 32, 32]

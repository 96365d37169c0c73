"""Tiny models and checkpoints shared by the post-training tests (seconds on a 2-core CPU)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from seqblocks.models.lrnn_lm import LRNNLMHeadModel
from seqblocks.presets import build_model

TINY = {"d_model": 32, "d_state": 8, "n_layer": 2, "vocab_size": 16, "mixer_types": ["attn", "attn"],
        "d_intermediate": 64, "mixer_kwargs": {"attn": {"num_heads": 2}}}


def tiny_model(seed: int = 0, **overrides) -> LRNNLMHeadModel:
    torch.manual_seed(seed)
    return build_model({**TINY, **overrides})


def tiny_checkpoint(directory: Path, task: str = "copying", options: dict | None = None, seed: int = 0,
                    **overrides) -> Path:
    """A saved tiny model with the task.json that `seqblocks` commands read."""
    model = tiny_model(seed, **overrides)
    model.save_pretrained(directory)
    (directory / "task.json").write_text(json.dumps({"name": task, "options": options or {"vocab_size": 16,
                                                                                          "num_tokens": 4}}))
    return directory


@pytest.fixture
def one_thread():
    """One torch thread for the test: these models are tiny, and on a busy 2-core machine one thread is
    several times faster than two that other processes keep waiting."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)

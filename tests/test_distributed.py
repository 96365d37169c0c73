"""Data parallelism on CPU with gloo: two processes train exactly what one process trains on the same
global batch (DDP, and FSDP2 ``fully_shard``), and rank 0 alone writes the checkpoint (DDP's full one;
FSDP2's is sharded, every rank writing its shards: tests/test_distributed_checkpoint.py)."""

from __future__ import annotations

import json
import os
import socket

import pytest
import torch
import torch.multiprocessing as mp

from seqblocks.checkpoint import load_pretrained
from seqblocks.train import TrainConfig, latest_checkpoint, train

TINY = {"d_model": 32, "d_state": 4, "n_layer": 2, "vocab_size": 0, "mixer_types": ["mamba", "attn"],
        "d_intermediate": 32, "mixer_kwargs": {"attn": {"num_heads": 2}, "mamba": {"expand": 1}}}


def _config(parallel: str) -> TrainConfig:
    return TrainConfig(task="mqar", task_options={"vocab_size": 24, "num_kv_pairs": 2, "seq_len": 12,
                                                  "eval_examples": 8},
                       steps=3, batch_size=4, lr=1e-2, warmup_steps=1, eval_every=0, ckpt_every=0, log_every=1,
                       sample_tokens=0, device="cpu", parallel=parallel)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, world_size: int, port: int, out_dir: str, parallel: str, stop_after: int | None = None,
            resume: bool = False) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world_size),
                      LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    import seqblocks  # noqa: F401

    try:
        train(TINY, _config(parallel), out_dir, progress=False, log=lambda m: None, stop_after=stop_after,
              resume=resume)
    finally:
        torch.distributed.destroy_process_group()


def _train_losses(run_dir) -> list[float]:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [r["loss"] for r in rows if r["type"] == "train"]


def _start(worker, args: tuple) -> None:
    # Forked, not spawned: the children inherit the imported torch and seqblocks (seconds each on 2 cores).
    mp.start_processes(worker, args=args, nprocs=2, join=True, start_method="fork")


@pytest.mark.parametrize("parallel", ["ddp", "fsdp"])
def test_two_gloo_processes_match_one_process(tmp_path, parallel):
    single = tmp_path / "single"
    train(TINY, _config(parallel), single, progress=False, log=lambda m: None)
    multi = tmp_path / "multi"
    _start(_worker, (2, _free_port(), str(multi), parallel))

    assert _train_losses(multi) == pytest.approx(_train_losses(single), rel=1e-5)
    a = load_pretrained(latest_checkpoint(single))
    b = load_pretrained(latest_checkpoint(multi))
    for (name, p), q in zip(a.named_parameters(), b.parameters()):
        # Adam turns float-rounding differences of near-zero gradients into updates of up to ~lr.
        torch.testing.assert_close(p, q, rtol=0, atol=2e-3, msg=name)
    close = sum(torch.allclose(p, q, rtol=1e-4, atol=1e-6) for p, q in zip(a.parameters(), b.parameters()))
    assert close >= 0.8 * len(list(a.parameters()))
    state = torch.load(latest_checkpoint(multi) / "train_state.pt", weights_only=True)
    assert state["world_size"] == 2 and state["step"] == 3
    assert state["checkpoint_format"] == ("sharded" if parallel == "fsdp" else "full")


@pytest.mark.slow
def test_fsdp_run_resumes_exactly(tmp_path):
    single = tmp_path / "single"
    train(TINY, _config("fsdp"), single, progress=False, log=lambda m: None)
    split = tmp_path / "split"
    _start(_worker, (2, _free_port(), str(split), "fsdp", 2))
    assert latest_checkpoint(split).name == "step_0000002"
    _start(_worker, (2, _free_port(), str(split), "fsdp", None, True))
    assert _train_losses(split) == pytest.approx(_train_losses(single), rel=1e-5)
    assert latest_checkpoint(split).name == "step_0000003"

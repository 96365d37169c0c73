"""Data parallelism over NCCL on two GPUs, through the command line as a user runs it:
``torchrun --nproc_per_node 2 -m seqblocks train ...`` with DDP, FSDP2 and FSDP2 under a bf16 policy
trains what one GPU trains on the same global batch (within bf16 rounding: the runs use bf16 autocast),
and an FSDP2 run stopped after half its steps (sharded checkpoint) resumes on two GPUs and on one.

Needs two CUDA devices; NVLink multicast is kept off (``NCCL_NVLS_ENABLE=0``).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from seqblocks.checkpoint import load_pretrained
from seqblocks.train import latest_checkpoint, load_train_state

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA devices")]

REPO = Path(__file__).resolve().parents[1]
MODEL = {"d_model": 128, "d_state": 16, "n_layer": 4, "vocab_size": 64,
         "mixer_types": ["mamba", "attn", "mamba2", "attn"], "d_intermediate": 256,
         "mixer_kwargs": {"attn": {"num_heads": 4}, "mamba2": {"headdim": 32}}}
TASK = {"vocab_size": 64, "num_kv_pairs": 4, "seq_len": 128, "eval_examples": 64}
STEPS, LR = 8, 3e-3
TRAIN = ["--task", "mqar", *[a for k, v in TASK.items() for a in ("--task-opt", f"{k}={v}")],
         "--steps", str(STEPS), "--batch-size", "16", "--lr", str(LR), "--warmup-steps", "2", "--eval-every", "0",
         "--ckpt-every", "0", "--log-every", "1", "--sample-tokens", "0", "--device", "cuda"]


def _torchrun(nproc: int, *args: str) -> None:
    env = {**os.environ, "NCCL_NVLS_ENABLE": "0", "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
           "-m", "seqblocks", "train", "--no-progress", *args]
    done = subprocess.run(cmd, env=env, cwd=REPO, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, f"{' '.join(cmd)}\n{done.stdout[-3000:]}\n{done.stderr[-6000:]}"


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("nccl")
    config = root / "model.json"
    config.write_text(json.dumps(MODEL))
    _torchrun(1, str(config), "--out", str(root / "single"), *TRAIN)
    _torchrun(2, str(config), "--out", str(root / "ddp"), *TRAIN, "--parallel", "ddp")
    _torchrun(2, str(config), "--out", str(root / "fsdp"), *TRAIN, "--parallel", "fsdp")
    _torchrun(2, str(config), "--out", str(root / "fsdp_bf16"), *TRAIN, "--parallel", "fsdp",
              "--fsdp-param-dtype", "bf16", "--fsdp-reduce-dtype", "fp32")
    # Stopped half way (the checkpoint a killed job leaves), then resumed on two GPUs and on one.
    _torchrun(2, str(config), "--out", str(root / "stopped"), *TRAIN, "--parallel", "fsdp",
              "--stop-after", str(STEPS // 2))
    for name, nproc in (("resumed_2", 2), ("resumed_1", 1)):
        shutil.copytree(root / "stopped", root / name)
        _torchrun(nproc, "--out", str(root / name), "--resume")
    return root


def _losses(run: Path) -> list[float]:
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return [r["loss"] for r in rows if r["type"] == "train"]


def _initial_model():
    from seqblocks.tasks import get_task
    from seqblocks.train.models import build_train_model

    task = get_task("mqar", **TASK)
    torch.manual_seed(0)  # the trainer's order: the task, then the seed, then the model
    return build_train_model({**MODEL, **task.model_fields()}, task)


def _assert_close_training(run: Path, reference: Path, *, loss_rel: float, cosine: float) -> None:
    """Losses within ``loss_rel``; the parameter updates (final - initial, all tensors together) point
    the same way within ``cosine``, and no tensor's update differs by more than 2 lr per step."""
    assert _losses(run) == pytest.approx(_losses(reference), rel=loss_rel)
    init = _initial_model()
    a, b = load_pretrained(latest_checkpoint(reference)), load_pretrained(latest_checkpoint(run))
    steps, others = [], []
    with torch.no_grad():
        for (name, p0), p, q in zip(init.named_parameters(), a.parameters(), b.parameters()):
            assert q.dtype == torch.float32, name
            torch.testing.assert_close(q, p, rtol=0, atol=2 * LR * STEPS, msg=name)
            steps.append((p - p0).flatten())
            others.append((q - p0).flatten())
        assert float(torch.cosine_similarity(torch.cat(steps), torch.cat(others), dim=0)) > cosine


@pytest.mark.parametrize("name", ["ddp", "fsdp", "fsdp_bf16"])
def test_two_gpus_train_what_one_gpu_trains(runs, name):
    assert load_train_state(latest_checkpoint(runs / name))["world_size"] == 2
    _assert_close_training(runs / name, runs / "single", loss_rel=2e-2, cosine=0.95)


def test_fsdp_checkpoints_are_sharded(runs):
    ckpt = latest_checkpoint(runs / "stopped")
    assert ckpt.name == f"step_{STEPS // 2:07d}"
    assert sorted(p.name for p in (ckpt / "dcp").iterdir()) == [".metadata", "__0_0.distcp", "__1_0.distcp"]
    assert load_train_state(ckpt)["checkpoint_format"] == "sharded"


@pytest.mark.parametrize("name", ["resumed_2", "resumed_1"])
def test_stopped_fsdp_run_resumes_on_any_gpu_count(runs, name):
    assert latest_checkpoint(runs / name).name == f"step_{STEPS:07d}"
    tight = name == "resumed_2"  # the same world size: the same arithmetic, up to kernel nondeterminism
    _assert_close_training(runs / name, runs / "fsdp", loss_rel=2e-3 if tight else 2e-2,
                           cosine=0.99 if tight else 0.95)

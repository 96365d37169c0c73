"""FSDP2 mixed precision and sharded (torch.distributed.checkpoint) training checkpoints, on CPU with gloo.

Two process groups are started for the whole module (spawning is the slow part): two processes train
with FSDP2 under a bf16 policy, and stop FSDP2 and DDP runs after 2 of 4 steps with sharded
checkpoints (one of which they resume themselves); three processes then resume copies of those.
Every resumed run must continue exactly as the uninterrupted single-process run: the same losses,
and parameters equal up to float rounding (Adam amplifies rounding differences of near-zero gradients
into updates of up to ~lr).
"""

from __future__ import annotations

import json
import os
import pickle
import shutil
import socket
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp

from seqblocks.checkpoint import load_pretrained
from seqblocks.train import TrainConfig, latest_checkpoint, load_train_state, train
from seqblocks.train.distributed import DistInfo, mixed_precision_policy, wrap_model

TINY = {"d_model": 32, "d_state": 4, "n_layer": 2, "vocab_size": 0, "mixer_types": ["mamba", "attn"],
        "d_intermediate": 32, "mixer_kwargs": {"attn": {"num_heads": 2}, "mamba": {"expand": 1}}}
LR = 1e-2


def _config(**overrides) -> TrainConfig:
    # 12 rows per step: a slice per rank for 1, 2, 3 or 4 processes.
    base = dict(task="mqar", task_options={"vocab_size": 24, "num_kv_pairs": 2, "seq_len": 12, "eval_examples": 8},
                steps=4, batch_size=12, lr=LR, warmup_steps=1, eval_every=0, ckpt_every=0, log_every=1,
                sample_tokens=0, device="cpu")
    return TrainConfig(**{**base, **overrides})


RUNS = {  # name: (TrainConfig overrides, stop_after)
    "fsdp_bf16": ({"parallel": "fsdp", "fsdp_param_dtype": "bf16"}, None),
    "fsdp": ({"parallel": "fsdp"}, 2),  # checkpoint_format "auto": sharded under FSDP2 with 2 processes
    "ddp": ({"parallel": "ddp", "checkpoint_format": "sharded"}, 2),
}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _join(rank: int, world_size: int, port: int) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world_size),
                      LOCAL_RANK=str(rank))
    torch.set_num_threads(1)


def _quiet(**kwargs):
    return dict(progress=False, log=lambda m: None, **kwargs)


def _record_dtypes(root: Path):
    """Patch the trainer's wrap_model so that rank 0 records the dtypes the first block's parameters
    have inside its forward (what FSDP2's policy gathered)."""
    import seqblocks.train.trainer as trainer

    wrap = trainer.wrap_model

    def recording(module, info, mode, **kwargs):
        wrapped = wrap(module, info, mode, **kwargs)
        block = module.backbone.layers[0]

        def hook(mod, args):
            if info.rank == 0:
                dtypes = {name: str(p.dtype) for name, p in mod.named_parameters()}
                (root / "dtypes.json").write_text(json.dumps(dtypes))

        block.register_forward_pre_hook(hook)
        return wrapped

    trainer.wrap_model = recording
    return lambda: setattr(trainer, "wrap_model", wrap)


def _two(rank: int, port: int, root: str) -> None:
    _join(rank, 2, port)
    root = Path(root)
    try:
        restore = _record_dtypes(root)
        overrides, _ = RUNS["fsdp_bf16"]
        train(TINY, _config(**overrides), root / "fsdp_bf16", **_quiet())
        restore()
        for name in ("fsdp", "ddp"):
            overrides, stop = RUNS[name]
            train(TINY, _config(**overrides), root / name, **_quiet(stop_after=stop))
        if rank == 0:  # the same world size resumes a copy of the FSDP2 run
            shutil.copytree(root / "fsdp", root / "fsdp_2to2")
        torch.distributed.barrier()
        train(TINY, _config(), root / "fsdp_2to2", **_quiet(resume=True))
    finally:
        torch.distributed.destroy_process_group()


def _three(rank: int, port: int, root: str) -> None:
    _join(rank, 3, port)
    try:
        for name in ("fsdp_2to3", "ddp_2to3"):
            train(TINY, _config(), Path(root) / name, **_quiet(resume=True))
    finally:
        torch.distributed.destroy_process_group()


def _start(fn, root: Path, nprocs: int) -> None:
    # Forked, not spawned: the children inherit the imported torch and seqblocks (seconds each on 2 cores).
    mp.start_processes(fn, args=(_free_port(), str(root)), nprocs=nprocs, join=True, start_method="fork")


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("dist")
    torch.manual_seed(0)
    train(TINY, _config(), root / "single", **_quiet())
    _start(_two, root, 2)
    for name in ("fsdp", "ddp"):
        for copy in (f"{name}_2to1", f"{name}_2to3"):
            shutil.copytree(root / name, root / copy)
        train(TINY, _config(), root / f"{name}_2to1", **_quiet(resume=True))  # one process
    _start(_three, root, 3)
    return root


def _losses(run_dir: Path) -> list[float]:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [r["loss"] for r in rows if r["type"] == "train"]


def _assert_same_training(run: Path, reference: Path) -> None:
    assert _losses(run) == pytest.approx(_losses(reference), rel=1e-5)
    a, b = load_pretrained(latest_checkpoint(reference)), load_pretrained(latest_checkpoint(run))
    for (name, p), q in zip(a.named_parameters(), b.parameters()):
        torch.testing.assert_close(q, p, rtol=0, atol=2e-3, msg=name)
    close = sum(torch.allclose(p, q, rtol=1e-4, atol=1e-6) for p, q in zip(a.parameters(), b.parameters()))
    assert close >= 0.8 * len(list(a.parameters()))


def test_sharded_checkpoint_layout(runs):
    for name, ranks in (("fsdp", 2), ("ddp", 2), ("fsdp_2to3", 3)):
        ckpt = latest_checkpoint(runs / name)
        assert not (ckpt / "model.safetensors").exists()
        files = sorted(p.name for p in (ckpt / "dcp").iterdir())
        if name.startswith("fsdp"):  # every rank holds shards (DDP's replicated tensors are spread over ranks)
            assert files == [".metadata"] + [f"__{r}_0.distcp" for r in range(ranks)]
        state = load_train_state(ckpt)
        assert state["checkpoint_format"] == "sharded" and "optimizer" not in state
        assert state["world_size"] == ranks and state["step"] == (2 if name in ("fsdp", "ddp") else 4)
    # A single process writes the full format ("auto"), also after resuming a sharded run.
    assert (latest_checkpoint(runs / "single") / "model.safetensors").is_file()
    assert load_train_state(latest_checkpoint(runs / "fsdp_2to1"))["checkpoint_format"] == "full"


@pytest.mark.parametrize("name", ["fsdp_2to2", "fsdp_2to1", "fsdp_2to3", "ddp_2to1", "ddp_2to3"])
def test_sharded_resume_on_any_world_size(runs, name):
    """Stopped after 2 of 4 steps by 2 processes, resumed by 2, 1 or 3: the uninterrupted run."""
    _assert_same_training(runs / name, runs / "single")


def test_fsdp_bf16_policy(runs):
    """Under fsdp_param_dtype="bf16" the blocks compute with bf16 parameters (the mixers' fp32-kept A_log
    and D included: FSDP2's policy is per module), the fp32 masters train every parameter, and the run
    follows the fp32 single-process run within bf16 rounding."""
    dtypes = json.loads((runs / "dtypes.json").read_text())
    assert set(dtypes.values()) == {"torch.bfloat16"}, dtypes
    assert "mixer.A_log" in dtypes
    assert _losses(runs / "fsdp_bf16") == pytest.approx(_losses(runs / "single"), rel=2e-2)
    assert _losses(runs / "fsdp_bf16") != _losses(runs / "single")  # the policy did change the arithmetic
    ref, mixed = load_pretrained(latest_checkpoint(runs / "single")), load_pretrained(latest_checkpoint(runs /
                                                                                                       "fsdp_bf16"))
    from seqblocks.tasks import get_task
    from seqblocks.train.models import build_train_model

    task = get_task("mqar", **_config().task_options)
    torch.manual_seed(0)  # the trainer's order: the task, then the seed, then the model
    init = build_train_model({**TINY, **task.model_fields()}, task)
    steps, mixed_steps = [], []
    with torch.no_grad():
        for (name, p0), p, q in zip(init.named_parameters(), ref.parameters(), mixed.parameters()):
            assert q.dtype == torch.float32, name  # the masters
            steps.append((p - p0).flatten())
            mixed_steps.append((q - p0).flatten())
            assert mixed_steps[-1].abs().max() > 0, f"{name} did not train"
            # Loose per tensor: an attention key bias has no gradient, so both runs move it by noise alone.
            assert float(torch.cosine_similarity(steps[-1], mixed_steps[-1], dim=0)) > 0.5, name
        assert float(torch.cosine_similarity(torch.cat(steps), torch.cat(mixed_steps), dim=0)) > 0.95


def test_load_pretrained_and_consolidate_sharded(runs, tmp_path):
    from seqblocks.train.sharded import consolidate_checkpoint

    ckpt = latest_checkpoint(runs / "fsdp_2to3")
    model = load_pretrained(ckpt)
    out = consolidate_checkpoint(runs / "fsdp_2to3", tmp_path / "plain")
    assert (out / "model.safetensors").is_file() and (out / "task.json").is_file()
    plain = load_pretrained(out)
    for (name, p), q in zip(model.named_parameters(), plain.parameters()):
        assert torch.equal(p, q), name
    with pytest.raises(ValueError, match="not a sharded checkpoint"):
        consolidate_checkpoint(out, tmp_path / "again")


# ---------------------------------------------------------------- loading never runs what a checkpoint names


class _Payload:
    def __reduce__(self):
        return (os.system, ("touch pwned",))


def _single_sharded(tmp_path: Path) -> Path:
    """A one-process sharded checkpoint of a tiny run."""
    run = tmp_path / "run"
    train(TINY, _config(steps=1, checkpoint_format="sharded"), run, **_quiet())
    return latest_checkpoint(run)


def test_sharded_index_is_unpickled_safely(tmp_path, monkeypatch):
    from seqblocks.train.sharded import read_model_state

    monkeypatch.chdir(tmp_path)
    ckpt = _single_sharded(tmp_path)
    assert read_model_state(ckpt)  # the genuine index reads
    index = ckpt / "dcp" / ".metadata"
    genuine = index.read_bytes()
    index.write_bytes(pickle.dumps(_Payload()))
    for load in (lambda: read_model_state(ckpt), lambda: load_pretrained(ckpt),
                 lambda: train(TINY, _config(steps=2), tmp_path / "run", **_quiet(resume=True, steps=2))):
        with pytest.raises(ValueError, match="names posix.system|names os.system"):
            load()
    assert not (tmp_path / "pwned").exists()
    # An index pointing outside the checkpoint directory is refused too.
    from torch.distributed.checkpoint.filesystem import _StorageInfo

    metadata = pickle.loads(genuine)
    key = next(iter(metadata.storage_data))
    metadata.storage_data[key] = _StorageInfo("../../../etc/passwd", 0, 10)
    index.write_bytes(pickle.dumps(metadata))
    with pytest.raises(ValueError, match="plain file"):
        read_model_state(ckpt)


def test_sharded_entries_load_as_plain_values_only():
    import io

    from torch.distributed.checkpoint.metadata import MetadataIndex
    from torch.distributed.checkpoint.planner import LoadItemType, ReadItem

    from seqblocks.checkpoint_dcp import safe_planner

    planner = safe_planner()
    item = ReadItem(type=LoadItemType.BYTE_IO, dest_index=MetadataIndex("optimizer.param_groups"), dest_offsets=(),
                    storage_index=MetadataIndex("optimizer.param_groups"), storage_offsets=(), lengths=())
    buffer = io.BytesIO()
    torch.save({"evil": _Payload()}, buffer)
    buffer.seek(0)
    with pytest.raises(ValueError, match="not a plain value"):
        planner.load_bytes(item, buffer)


# ---------------------------------------------------------------- configuration


def test_fsdp_options_are_checked():
    with pytest.raises(ValueError, match="fsdp_param_dtype='fp8'"):
        TrainConfig(parallel="fsdp", fsdp_param_dtype="fp8")
    with pytest.raises(ValueError, match="fsdp_reduce_dtype='float32'"):
        TrainConfig(parallel="fsdp", fsdp_reduce_dtype="float32")
    with pytest.raises(ValueError, match="needs parallel='fsdp'"):
        TrainConfig(parallel="ddp", fsdp_param_dtype="bf16")
    with pytest.raises(ValueError, match="fsdp_reshard_after_forward=False needs parallel='fsdp'"):
        TrainConfig(fsdp_reshard_after_forward=False)
    with pytest.raises(ValueError, match="checkpoint_format='dcp'"):
        TrainConfig(checkpoint_format="dcp")
    fsdp = TrainConfig(parallel="fsdp")
    assert fsdp.sharded_checkpoints(2) and not fsdp.sharded_checkpoints(1)
    assert TrainConfig(checkpoint_format="sharded").sharded_checkpoints(1)
    assert not TrainConfig(parallel="fsdp", checkpoint_format="full").sharded_checkpoints(8)
    policy = mixed_precision_policy("bf16", "fp32")
    assert (policy.param_dtype, policy.reduce_dtype) == (torch.bfloat16, torch.float32)
    with pytest.raises(ValueError, match="param_dtype='half'"):
        mixed_precision_policy("half")
    with pytest.raises(ValueError, match="mode 'ddp' takes none"):
        wrap_model(torch.nn.Linear(2, 2), DistInfo(), "ddp", param_dtype="bf16")

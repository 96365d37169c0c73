"""Process-group setup and model wrapping for data-parallel training (DDP or FSDP2 ``fully_shard``).

``torchrun --nproc_per_node N -m seqblocks train ...`` sets ``RANK`` / ``WORLD_SIZE`` / ``LOCAL_RANK``;
``init_distributed`` reads them, picks NCCL on CUDA and gloo on CPU, and returns a ``DistInfo``.
Without those variables training runs in one process and nothing here touches torch.distributed.
"""

from __future__ import annotations

import dataclasses
import os

import torch
import torch.distributed as dist
from torch import nn

__all__ = ["DistInfo", "resolve_device", "init_distributed", "wrap_model", "unwrap_model", "reshard", "barrier"]

PARALLEL_MODES = ("ddp", "fsdp")


@dataclasses.dataclass(frozen=True)
class DistInfo:
    """Where this process sits: ``rank`` of ``world_size``; ``device`` it computes on."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = dataclasses.field(default_factory=lambda: torch.device("cpu"))

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def resolve_device(requested: str | torch.device = "auto", local_rank: int = 0) -> torch.device:
    """The device a run asks for, checked: "auto" (CUDA when available, else the CPU), "cpu", "cuda",
    "cuda:N", or another device type this torch build has and can use ("mps", "xpu", ...).

    Raises:
        ValueError: not a device name, or a device this machine / torch build cannot use.
    """
    if isinstance(requested, torch.device):
        device = requested
    else:
        if requested == "auto":
            requested = "cuda" if torch.cuda.is_available() else "cpu"
        try:
            device = torch.device(requested)
        except (RuntimeError, TypeError, ValueError):
            raise ValueError(f"device {requested!r} is not a device name; expected auto, cpu, cuda or cuda:N "
                             f"(or another type this torch build supports, e.g. mps)") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"device {str(device)!r} requested but torch.cuda.is_available() is False "
                             f"(no GPU, or a CPU-only torch build); use --device cpu or auto")
        if device.index is None:
            device = torch.device("cuda", local_rank)
        if device.index >= torch.cuda.device_count():
            raise ValueError(f"device {str(device)!r} requested but only {torch.cuda.device_count()} CUDA "
                             f"device(s) are visible")
    elif device.type != "cpu":
        backend = getattr(torch, device.type, None) or getattr(torch.backends, device.type, None)
        available = getattr(backend, "is_available", None)
        if available is None or not available():
            raise ValueError(f"device {str(device)!r} is not available on this machine / torch build; "
                             f"use auto, cpu or cuda")
    return device


def _pick_device(requested: str, local_rank: int) -> torch.device:
    device = resolve_device(requested, local_rank)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    return device


def init_distributed(device: str = "auto") -> DistInfo:
    """Join the process group torchrun describes in the environment, or run alone.

    Args:
        device (str): "auto" (CUDA when available), "cpu", "cuda" or "cuda:N". Default: "auto".
    """
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    dev = _pick_device(device, local_rank)
    if world_size > 1 and not dist.is_initialized():
        dist.init_process_group(backend="nccl" if dev.type == "cuda" else "gloo")
    if dist.is_initialized():
        rank, world_size = dist.get_rank(), dist.get_world_size()
    return DistInfo(rank=rank, world_size=world_size, local_rank=local_rank, device=dev)


def wrap_model(model: nn.Module, info: DistInfo, mode: str = "ddp") -> nn.Module:
    """Wrap ``model`` for data parallelism: DDP, or FSDP2 (``fully_shard`` each block, then the root).

    A single process gets ``model`` back unchanged.
    """
    if mode not in PARALLEL_MODES:
        raise ValueError(f"parallel mode {mode!r} is not one of {PARALLEL_MODES}")
    if not info.distributed:
        return model
    if mode == "ddp":
        from torch.nn.parallel import DistributedDataParallel

        ids = [info.device.index] if info.device.type == "cuda" else None
        return DistributedDataParallel(model, device_ids=ids)
    from torch.distributed.fsdp import fully_shard

    for block in _blocks(model):
        fully_shard(block)
    fully_shard(model)
    return model


def _blocks(model: nn.Module) -> list[nn.Module]:
    """The repeated layers to shard one by one: the children of the first ``ModuleList`` found."""
    for module in model.modules():
        if isinstance(module, nn.ModuleList) and len(module) > 0:
            return list(module)
    return []


def reshard(model: nn.Module) -> None:
    """Return FSDP2 modules to their sharded parameters.

    A forward without backward (evaluation) leaves the root module's parameters unsharded; the
    optimizer and state-dict helpers expect the sharded ones again.
    """
    from torch.distributed.fsdp import FSDPModule

    for module in model.modules():
        if isinstance(module, FSDPModule):
            module.reshard()


def unwrap_model(model: nn.Module) -> nn.Module:
    """The module underneath a DDP wrapper (FSDP2 shards in place and needs no unwrapping)."""
    return model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model


def barrier(info: DistInfo) -> None:
    if info.distributed:
        dist.barrier()

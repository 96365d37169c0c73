"""Process-group setup and model wrapping for data-parallel training (DDP or FSDP2 ``fully_shard``).

``torchrun --nproc_per_node N -m seqblocks train ...`` sets ``RANK`` / ``WORLD_SIZE`` / ``LOCAL_RANK``;
``init_distributed`` reads them, puts each process on ``cuda:LOCAL_RANK`` (or the CPU), picks NCCL on
CUDA and gloo on CPU, and returns a ``DistInfo``. Without those variables training runs in one process
and nothing here touches torch.distributed.

``wrap_model`` applies DDP, or FSDP2: ``fully_shard`` on every block, then on the root, with an optional
mixed-precision policy (parameters gathered and computed in bf16 / fp16, gradients reduced in fp32) and
the choice of freeing the gathered parameters after each block's forward.
"""

from __future__ import annotations

import dataclasses
import os

import torch
import torch.distributed as dist
from torch import nn

__all__ = ["DistInfo", "resolve_device", "init_distributed", "wrap_model", "unwrap_model", "reshard", "barrier",
           "mixed_precision_policy", "broadcast_object"]

PARALLEL_MODES = ("ddp", "fsdp")
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


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
            # One GPU visible to this process (CUDA_VISIBLE_DEVICES set per rank): that one.
            device = torch.device("cuda", 0 if torch.cuda.device_count() == 1 else local_rank)
            if device.index >= torch.cuda.device_count():
                raise ValueError(f"LOCAL_RANK={local_rank} but only {torch.cuda.device_count()} CUDA device(s) are "
                                 f"visible: start at most {torch.cuda.device_count()} processes per node")
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
    local_world = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    if (device.type == "cuda" and local_world > 1 and isinstance(requested, str) and ":" in requested
            and torch.cuda.device_count() > 1):
        raise ValueError(f"device {requested!r} names one GPU for each of the {local_world} processes of this "
                         f"node; give --device cuda (or auto): each process then takes cuda:LOCAL_RANK")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    return device


def init_distributed(device: str = "auto") -> DistInfo:
    """Join the process group torchrun describes in the environment, or run alone.

    Each process computes on ``cuda:LOCAL_RANK`` (``cuda:0`` when it sees a single GPU) or the CPU;
    the group uses NCCL on CUDA and gloo on the CPU.

    Args:
        device (str): "auto" (CUDA when available), "cpu", "cuda" or "cuda:N". Default: "auto".

    Raises:
        ValueError: a device this machine cannot use, more processes per node than GPUs, or one
            ``cuda:N`` named for several processes of a node.
    """
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    dev = _pick_device(device, local_rank)
    if world_size > 1 and not dist.is_initialized():
        if dev.type == "cuda":
            # Binding the group to this rank's GPU lets NCCL set up at once, on the right device.
            dist.init_process_group(backend="nccl", device_id=dev)
        else:
            dist.init_process_group(backend="gloo")
    if dist.is_initialized():
        rank, world_size = dist.get_rank(), dist.get_world_size()
    return DistInfo(rank=rank, world_size=world_size, local_rank=local_rank, device=dev)


def mixed_precision_policy(param_dtype: str = "fp32", reduce_dtype: str = "fp32"):
    """FSDP2's ``MixedPrecisionPolicy`` for dtype names: ``param_dtype`` is the dtype parameters are
    all-gathered and computed in, ``reduce_dtype`` the one gradients are reduce-scattered in ("fp32",
    "bf16", "fp16"; "fp32" on fp32 parameters means no cast). The sharded parameters the optimizer
    steps stay in their own dtype.

    Raises:
        ValueError: a dtype name that is not one of "fp32", "bf16", "fp16".
    """
    from torch.distributed.fsdp import MixedPrecisionPolicy

    for name, value in (("param_dtype", param_dtype), ("reduce_dtype", reduce_dtype)):
        if value not in DTYPES:
            raise ValueError(f"FSDP {name}={value!r} must be one of {tuple(DTYPES)}")
    return MixedPrecisionPolicy(param_dtype=DTYPES[param_dtype], reduce_dtype=DTYPES[reduce_dtype])


def wrap_model(model: nn.Module, info: DistInfo, mode: str = "ddp", *, param_dtype: str = "fp32",
               reduce_dtype: str = "fp32", reshard_after_forward: bool = True) -> nn.Module:
    """Wrap ``model`` for data parallelism: DDP, or FSDP2 (``fully_shard`` each block, then the root).

    A single process gets ``model`` back unchanged (the FSDP options then do nothing).

    Args:
        model (nn.Module): the model, on ``info.device``.
        info (DistInfo): this process's place.
        mode (str): "ddp" or "fsdp". Default: "ddp".
        param_dtype (str): FSDP2 only: the dtype of the gathered parameters and of the compute ("fp32",
            "bf16", "fp16"; ``mixed_precision_policy``). Default: "fp32".
        reduce_dtype (str): FSDP2 only: the dtype of the gradient reduce-scatter. Default: "fp32".
        reshard_after_forward (bool): FSDP2 only: free each block's gathered parameters after its
            forward (gathered again in the backward). Default: True.

    Returns:
        nn.Module: the DDP wrapper, or ``model`` itself (sharded in place by FSDP2, or unchanged).

    Raises:
        ValueError: an unknown ``mode`` or dtype name; FSDP options given with ``mode="ddp"``.
    """
    if mode not in PARALLEL_MODES:
        raise ValueError(f"parallel mode {mode!r} is not one of {PARALLEL_MODES}")
    policy = mixed_precision_policy(param_dtype, reduce_dtype)
    if mode == "ddp" and (param_dtype != "fp32" or reduce_dtype != "fp32" or not reshard_after_forward):
        raise ValueError(f"param_dtype={param_dtype!r}, reduce_dtype={reduce_dtype!r} and reshard_after_forward="
                         f"{reshard_after_forward!r} are FSDP2 options; mode 'ddp' takes none of them")
    if not info.distributed:
        return model
    if mode == "ddp":
        from torch.nn.parallel import DistributedDataParallel

        ids = [info.device.index] if info.device.type == "cuda" else None
        return DistributedDataParallel(model, device_ids=ids)
    from torch.distributed.fsdp import fully_shard

    # Passed explicitly: the default of reshard_after_forward differs between torch releases.
    for block in _blocks(model):
        fully_shard(block, mp_policy=policy, reshard_after_forward=reshard_after_forward)
    fully_shard(model, mp_policy=policy, reshard_after_forward=reshard_after_forward)
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


def broadcast_object(value, info: DistInfo, src: int = 0):
    """``value`` of rank ``src`` on every rank (a picklable object; the others pass anything)."""
    if not info.distributed:
        return value
    box = [value]
    dist.broadcast_object_list(box, src=src, device=info.device if info.device.type == "cuda" else None)
    return box[0]

"""``TrainConfig``: everything a training run needs besides the model, as validated, JSON-able data."""

from __future__ import annotations

import dataclasses
from typing import Any

from seqblocks.config import ConfigBase
from seqblocks.parallel.context import ATTENTION_METHODS

__all__ = ["TrainConfig"]

PRECISIONS = ("auto", "fp32", "bf16")
PARALLEL = ("ddp", "fsdp")
FSDP_DTYPES = ("fp32", "bf16", "fp16")
CHECKPOINT_FORMATS = ("auto", "full", "sharded")


@dataclasses.dataclass(frozen=True, kw_only=True)
class TrainConfig(ConfigBase):
    """A training run.

    Args:
        task (str): task name (``seqblocks.tasks.TASKS``). Default: "chars".
        task_options (dict): the task's constructor options (``seq_len``, ...). Default: {}.
        steps (int): optimizer steps of the whole schedule. Default: 300.
        batch_size (int): sequences per optimizer step, over all processes and accumulation steps.
            Default: 16.
        grad_accum (int): micro-batches per optimizer step; must divide ``batch_size / world_size``.
            Default: 1.
        lr (float): peak learning rate. Default: 3e-3.
        min_lr_ratio (float): final learning rate as a fraction of the peak. Default: 0.1.
        warmup_steps (int): linear warmup steps (compressed into the run when ``steps`` is smaller).
            Default: 30.
        weight_decay (float): AdamW decay of matrices (not norms, biases, embeddings). Default: 0.1.
        beta1 (float): AdamW beta1. Default: 0.9.
        beta2 (float): AdamW beta2. Default: 0.95.
        grad_clip (float): clip the global gradient norm to this; 0 disables. Default: 1.0.
        seed (int): seeds the model initialisation and the data. Default: 0.
        precision (str): "auto" (bf16 autocast on a CUDA device with bf16, else fp32), "fp32" or "bf16".
            Default: "auto".
        compile (bool): ``torch.compile`` the model. Default: False.
        compile_backend (str): the ``torch.compile`` backend. Default: "inductor".
        parallel (str): data parallelism under torchrun: "ddp" or "fsdp" (FSDP2 ``fully_shard``).
            Default: "ddp".
        fsdp_param_dtype (str): FSDP2 mixed precision (``MixedPrecisionPolicy.param_dtype``): the dtype the
            parameters are all-gathered in and the forward and backward compute in, "fp32", "bf16" or
            "fp16"; the sharded master parameters and the optimizer stay fp32. "fp32": no cast.
            Only with ``parallel="fsdp"``. Default: "fp32".
        fsdp_reduce_dtype (str): the dtype FSDP2 reduce-scatters gradients in
            (``MixedPrecisionPolicy.reduce_dtype``), "fp32", "bf16" or "fp16". Default: "fp32".
        fsdp_reshard_after_forward (bool): FSDP2 frees each block's gathered parameters after its forward
            and gathers them again for the backward (less memory, one more all-gather per block); False
            keeps them until the backward. Default: True.
        checkpoint_format (str): "full" (rank 0 gathers the whole state and writes ``model.safetensors``
            and ``train_state.pt``), "sharded" (every rank writes its own shards of the model and
            optimizer with ``torch.distributed.checkpoint`` into ``dcp/``; ``seqblocks.train.sharded``), or
            "auto": sharded for FSDP2 with several processes, else full. Either resumes on any number of
            processes. Default: "auto".
        device (str): "auto", "cpu", "cuda", "cuda:N". Default: "auto".
        eval_every (int): evaluate on the held-out split every N steps (and at the end); 0: only at the
            end. Default: 100.
        eval_batch_size (int): batch size of evaluation. Default: 64.
        eval_steps (int): evaluate on the first N batches of the held-out set only; 0: all of it.
            Default: 0.
        ckpt_every (int): checkpoint every N steps (and at the end); 0: only at the end. Default: 100.
        keep_checkpoints (int): checkpoints kept, newest first; 0 keeps all. Default: 2.
        log_every (int): write a metrics line every N steps. Default: 10.
        sample_tokens (int): characters sampled at the end of a language task; 0: none. Default: 300.
        sample_prompt (str): prompt of that sample. Default: "def ".
        sample_temperature (float): its temperature. Default: 0.8.
        seq_len_warmup (int): sequence-length warmup: over the first N steps the rows are cut to a
            length growing linearly from ``seq_len_start`` to the task's (``seqblocks.train.curriculum``);
            0: off. Default: 0.
        seq_len_start (int): the first length of that warmup. Default: 16.
        pack_boundaries (bool): pass the packed rows' document boundaries to the model as
            ``cu_seqlens=`` (a task of packed rows, such as ``shards``, and a model whose forward takes
            it); without it the loss across boundaries is still masked by the task. Default: False.
        tensorboard (bool): also write the metrics as TensorBoard events under ``RUN/tensorboard``
            (needs the ``tensorboard`` package). Default: False.
        wandb (bool): also log to Weights & Biases in offline mode under ``RUN/wandb`` (needs ``wandb``).
            Default: False.
        peak_flops (float): the device's peak FLOP/s that MFU is measured against; 0: a known CUDA
            device's bf16 peak, and no MFU on others. Default: 0.0.
        activation_checkpointing (int): recompute the activations of every N-th block in the backward
            pass instead of storing them (``torch.utils.checkpoint``; 1: every block); the gradients are
            the same. 0: off. Default: 0.
        context_parallel (int): processes that share each sequence along time (context parallelism,
            ``seqblocks.parallel``; a causal LM only): ranks ``[i * N, (i + 1) * N)`` form one group,
            each holding one time chunk of the same rows; the world size must be a multiple of N and the
            rows are split over the ``world_size / N`` groups. 1: off. Default: 1.
        context_parallel_attention (str): how attention exchanges keys and values under context
            parallelism: "ring" (memory O(T / N)) or "allgather". Default: "ring".
    """

    task: str = "chars"
    task_options: dict[str, Any] = dataclasses.field(default_factory=dict)
    steps: int = 300
    batch_size: int = 16
    grad_accum: int = 1
    lr: float = 3e-3
    min_lr_ratio: float = 0.1
    warmup_steps: int = 30
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    grad_clip: float = 1.0
    seed: int = 0
    precision: str = "auto"
    compile: bool = False
    compile_backend: str = "inductor"
    parallel: str = "ddp"
    fsdp_param_dtype: str = "fp32"
    fsdp_reduce_dtype: str = "fp32"
    fsdp_reshard_after_forward: bool = True
    checkpoint_format: str = "auto"
    device: str = "auto"
    eval_every: int = 100
    eval_batch_size: int = 64
    eval_steps: int = 0
    ckpt_every: int = 100
    keep_checkpoints: int = 2
    log_every: int = 10
    sample_tokens: int = 300
    sample_prompt: str = "def "
    sample_temperature: float = 0.8
    seq_len_warmup: int = 0
    seq_len_start: int = 16
    pack_boundaries: bool = False
    tensorboard: bool = False
    wandb: bool = False
    peak_flops: float = 0.0
    activation_checkpointing: int = 0
    context_parallel: int = 1
    context_parallel_attention: str = "ring"

    def __post_init__(self) -> None:
        super().__post_init__()
        positive = ("steps", "batch_size", "grad_accum", "eval_batch_size", "log_every")
        for name in positive:
            if getattr(self, name) <= 0:
                raise ValueError(f"TrainConfig.{name}={getattr(self, name)!r} must be a positive integer")
        if self.context_parallel <= 0:
            raise ValueError(f"TrainConfig.context_parallel={self.context_parallel!r} must be a positive integer "
                             f"(1: no context parallelism)")
        if self.context_parallel_attention not in ATTENTION_METHODS:
            raise ValueError(f"TrainConfig.context_parallel_attention={self.context_parallel_attention!r} must be "
                             f"one of {ATTENTION_METHODS}")
        if self.seq_len_start <= 0:
            raise ValueError(f"TrainConfig.seq_len_start={self.seq_len_start!r} must be a positive integer")
        for name in ("warmup_steps", "eval_every", "ckpt_every", "keep_checkpoints", "sample_tokens", "grad_clip",
                     "weight_decay", "seq_len_warmup", "peak_flops", "activation_checkpointing", "eval_steps"):
            if getattr(self, name) < 0:
                raise ValueError(f"TrainConfig.{name}={getattr(self, name)!r} must be >= 0")
        if self.lr <= 0:
            raise ValueError(f"TrainConfig.lr={self.lr!r} must be positive")
        if not 0.0 <= self.min_lr_ratio <= 1.0:
            raise ValueError(f"TrainConfig.min_lr_ratio={self.min_lr_ratio!r} must be in [0, 1]")
        for name in ("beta1", "beta2"):
            if not 0.0 <= getattr(self, name) < 1.0:
                raise ValueError(f"TrainConfig.{name}={getattr(self, name)!r} must be in [0, 1)")
        if self.precision not in PRECISIONS:
            raise ValueError(f"TrainConfig.precision={self.precision!r} must be one of {PRECISIONS}")
        if self.parallel not in PARALLEL:
            raise ValueError(f"TrainConfig.parallel={self.parallel!r} must be one of {PARALLEL}")
        for name in ("fsdp_param_dtype", "fsdp_reduce_dtype"):
            value = getattr(self, name)
            if value not in FSDP_DTYPES:
                raise ValueError(f"TrainConfig.{name}={value!r} must be one of {FSDP_DTYPES}")
            if value != "fp32" and self.parallel != "fsdp":
                raise ValueError(f"TrainConfig.{name}={value!r} is FSDP2's mixed precision and needs "
                                 f"parallel='fsdp' (got parallel={self.parallel!r}); DDP runs use precision=")
        if not self.fsdp_reshard_after_forward and self.parallel != "fsdp":
            raise ValueError(f"TrainConfig.fsdp_reshard_after_forward=False needs parallel='fsdp' "
                             f"(got parallel={self.parallel!r})")
        if self.checkpoint_format not in CHECKPOINT_FORMATS:
            raise ValueError(f"TrainConfig.checkpoint_format={self.checkpoint_format!r} must be one of "
                             f"{CHECKPOINT_FORMATS}")
        if self.batch_size % self.grad_accum:
            raise ValueError(f"TrainConfig.batch_size={self.batch_size} must be a multiple of "
                             f"grad_accum={self.grad_accum}")
        if self.sample_temperature < 0:
            raise ValueError(f"TrainConfig.sample_temperature={self.sample_temperature!r} must be >= 0")

    def sharded_checkpoints(self, world_size: int) -> bool:
        """Whether a run of ``world_size`` processes writes sharded checkpoints (``checkpoint_format``)."""
        if self.checkpoint_format == "auto":
            return self.parallel == "fsdp" and world_size > 1
        return self.checkpoint_format == "sharded"

"""Weight-only quantisation for inference through torchao: int8 and int4 for every seqblocks model.

``quantize(model, "int8")`` stores every ``nn.Linear`` weight (mixer projections, MLPs, the LM head)
as int8 with one scale per output channel; ``"int4"`` as int4 with one scale per group of
``group_size`` input elements. Activations, embeddings, norms and the recurrent parameters (A, D,
dt, convolutions) stay in their dtype, so the recurrences are unchanged.

What runs where (torchao 0.18, measured):

- ``int8`` on any device: torchao's ``Int8WeightOnlyConfig`` (its matmul dequantises on the CPU;
  on CUDA it is the weight-only int8 kernel).
- ``int4`` on CUDA (bf16 / fp16 weights): ``Int4WeightOnlyConfig`` with the tinygemm tile-packed
  layout, the fast decode kernel.
- ``int4`` on the CPU: ``IntxWeightOnlyConfig(int4, PerGroup)``, int4 values held unpacked in int8
  and dequantised in the matmul. It gives int4's accuracy, not its speed or memory; the CUDA path is
  the one to measure speed with (``benchmarks/quantization.py``).

A layer whose input width ``group_size`` does not divide keeps its weight (``skipped`` says which).
Quantised weights are torchao tensor subclasses: they run forward / ``step`` / ``generate``, but are
not saved with ``save_pretrained``; quantise after loading instead.

Requires the ``post`` extra (``pip install 'seqblocks[post]'``).
"""

from __future__ import annotations

import copy
import dataclasses
import math

import torch
from torch import nn

__all__ = ["QUANT_MODES", "QuantizeReport", "quantize", "quantize_reference", "quantized_perplexity"]

QUANT_MODES = ("int8", "int4")


@dataclasses.dataclass
class QuantizeReport:
    """What ``quantize`` did: ``mode``, the torchao ``config`` class used, the ``quantized`` and
    ``skipped`` layer names (with the reason)."""

    mode: str
    config: str
    quantized: list[str]
    skipped: dict[str, str]


def _torchao():
    try:
        import torchao.quantization as q
    except ImportError:
        raise ImportError("quantize needs torchao: pip install 'seqblocks[post]'") from None
    return q


def quantize(model: nn.Module, mode: str = "int8", *, group_size: int = 32, inplace: bool = False
             ) -> tuple[nn.Module, QuantizeReport]:
    """Weight-only quantisation of every ``nn.Linear`` of ``model`` (see the module docstring).

    Args:
        model (nn.Module): any seqblocks model (fp32, bf16 or fp16).
        mode (str): "int8" or "int4". Default: "int8".
        group_size (int): int4 group width along the input dimension (32, 64, 128, 256). Default: 32.
        inplace (bool): quantise ``model`` itself instead of a copy. Default: False.

    Returns:
        tuple: the quantised model (in eval mode) and a ``QuantizeReport``.

    Raises:
        ValueError: an unknown mode or group size; a model without linear layers.
        ImportError: torchao is not installed.
    """
    if mode not in QUANT_MODES:
        raise ValueError(f"mode={mode!r} must be one of {QUANT_MODES}")
    if group_size not in (32, 64, 128, 256):
        raise ValueError(f"group_size={group_size!r} must be 32, 64, 128 or 256")
    q = _torchao()
    target = model if inplace else copy.deepcopy(model)
    target.eval()
    linears = {name: m for name, m in target.named_modules() if type(m) is nn.Linear}
    if not linears:
        raise ValueError(f"{type(model).__name__} has no nn.Linear layers to quantise")
    skipped: dict[str, str] = {}
    if mode == "int8":
        config = q.Int8WeightOnlyConfig()
    else:
        weight = next(iter(linears.values())).weight
        if weight.is_cuda and weight.dtype in (torch.bfloat16, torch.float16):
            config = q.Int4WeightOnlyConfig(group_size=group_size, int4_packing_format="tile_packed_to_4d")
        else:
            config = q.IntxWeightOnlyConfig(weight_dtype=torch.int4, granularity=q.PerGroup(group_size))
        for name, m in linears.items():
            if m.in_features % group_size:
                skipped[name] = f"in_features={m.in_features} is not a multiple of group_size={group_size}"
    chosen = [name for name in linears if name not in skipped]

    def select(module: nn.Module, fqn: str) -> bool:
        return type(module) is nn.Linear and fqn in linears and fqn not in skipped

    # Tied weights (embedding = LM head) would otherwise be quantised in the head and left a float in
    # the embedding: untie by giving the head its own copy first.
    embedding = getattr(target, "embedding", None)
    head = getattr(target, "lm_head", None)
    if embedding is not None and head is not None and head.weight is getattr(embedding, "weight", None):
        head.weight = nn.Parameter(head.weight.detach().clone(), requires_grad=False)
    q.quantize_(target, config, filter_fn=select)
    return target, QuantizeReport(mode, type(config).__name__, chosen, skipped)


def quantize_reference(weight: torch.Tensor, bits: int, group_size: int | None = None) -> tuple[torch.Tensor,
                                                                                             torch.Tensor]:
    """The readable spec of symmetric weight-only quantisation: per output row (``group_size`` None)
    or per group of ``group_size`` input elements, ``scale = absmax / ((qmax - qmin) / 2)`` and
    ``q = clamp(round(w / scale), qmin, qmax)`` with ``[qmin, qmax] = [-2^(bits-1), 2^(bits-1) - 1]``.

    Args:
        weight (Tensor): [N, K] a linear layer's weight.
        bits (int): 8 or 4.
        group_size (int | None): group width along K (must divide it). Default: None (whole rows).

    Returns:
        tuple: the dequantised weight ``q * scale`` [N, K] (fp32) and the scales [N, K / group].
    """
    if bits not in (4, 8):
        raise ValueError(f"bits={bits!r} must be 4 or 8")
    N, K = weight.shape
    group = K if group_size is None else group_size
    if K % group:
        raise ValueError(f"group_size={group} must divide the input width {K}")
    qmax, qmin = 2 ** (bits - 1) - 1, -(2 ** (bits - 1))
    w = weight.detach().float().reshape(N, K // group, group)
    scale = (w.abs().amax(-1, keepdim=True) / ((qmax - qmin) / 2)).clamp(min=torch.finfo(torch.float32).tiny)
    q = torch.clamp(torch.round(w / scale), qmin, qmax)
    return (q * scale).reshape(N, K), scale.squeeze(-1)


@torch.no_grad()
def quantized_perplexity(model: nn.Module, input_ids: torch.Tensor) -> float:
    """Perplexity of ``model`` on ``input_ids`` [B, T] (next-token, every position after the first)."""
    logits = model(input_ids).logits[:, :-1].float()
    loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), input_ids[:, 1:].flatten())
    return math.exp(float(loss))

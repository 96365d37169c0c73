"""LoRA and QLoRA adapters on any seqblocks model, through ``peft``.

``apply_lora`` injects peft's LoRA layers into the model in place (the model keeps its class, so
``generate``, ``step`` and the caches work unchanged) and freezes everything but the adapters.
Targets are our module names: a name in ``target_modules`` matches every ``nn.Linear`` whose last
name component it is (``"q_proj"`` matches ``layers.3.mixer.q_proj``), or a full dotted name.
``merge_lora`` folds ``W + (alpha / r) B A`` into the base weights (outputs unchanged, no adapter
cost at inference), ``unmerge_lora`` takes it out again, ``merge_and_unload`` leaves a plain model
(savable with ``save_pretrained``). ``save_adapters`` writes the adapter tensors only (safetensors)
with their configuration; ``load_adapters`` puts them back into a model of the same architecture.

QLoRA (``apply_qlora``): the targeted base weights are stored as torchao's NF4 (4-bit NormalFloat,
double-quantised block scales) and frozen, and LoRA adapters in full precision train on top. NF4
runs on the CPU (its matmul dequantises to the activation dtype); merging dequantises the base to
full precision first.

Requires the ``post`` extra (``pip install 'seqblocks[post]'``: peft, torchao).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

__all__ = ["DEFAULT_TARGET_MODULES", "ADAPTER_WEIGHTS", "ADAPTER_CONFIG", "lora_targets", "apply_lora",
           "apply_qlora", "has_lora", "lora_state_dict", "merge_lora", "unmerge_lora", "merge_and_unload",
           "save_adapters", "load_adapters", "trainable_parameters"]

# The projections of every mixer family (attention's fused in_proj / out_proj, the linear-attention
# family's q/k/v/g/o_proj, Mamba's in/x/dt/out_proj, Mamba-2's in/out_proj) and the MLP's fc1 / fc2.
DEFAULT_TARGET_MODULES: tuple[str, ...] = ("in_proj", "out_proj", "q_proj", "k_proj", "v_proj", "o_proj",
                                           "g_proj", "x_proj", "fc1", "fc2")
ADAPTER_WEIGHTS = "adapter_model.safetensors"
ADAPTER_CONFIG = "adapter_config.json"
_ADAPTER = "default"


def _require(package: str):
    try:
        return __import__(package)
    except ImportError:
        raise ImportError(f"this feature needs {package!r}: pip install 'seqblocks[post]'") from None


def lora_targets(model: nn.Module, target_modules: Sequence[str] | None = None) -> list[str]:
    """The full names of the ``nn.Linear`` modules that ``target_modules`` selects (see the module doc).

    Raises:
        ValueError: a name that matches no linear layer of the model (the valid last names are listed).
    """
    names = tuple(DEFAULT_TARGET_MODULES if target_modules is None else target_modules)
    if isinstance(target_modules, str) or not names or not all(isinstance(n, str) and n for n in names):
        raise ValueError(f"target_modules={target_modules!r} must be a non-empty list of module names")
    linears = [(full, full.rsplit(".", 1)[-1]) for full, m in model.named_modules()
               if type(m) is nn.Linear and ".lora_" not in full and not full.endswith("base_layer")]
    chosen = [full for full, last in linears if last in names or full in names]
    unmatched = [n for n in names if not any(n == last or n == full for full, last in linears)]
    if target_modules is not None and unmatched:
        raise ValueError(f"target_modules {unmatched} match no linear layer of {type(model).__name__}; its linear "
                         f"layers are named {sorted({last for _, last in linears})}")
    if not chosen:
        raise ValueError(f"no linear layer of {type(model).__name__} matches {list(names)}; its linear layers are "
                         f"named {sorted({last for _, last in linears})}")
    return chosen


def has_lora(model: nn.Module) -> bool:
    """Whether ``model`` holds LoRA adapters."""
    return any(".lora_A." in name for name, _ in model.named_parameters())


def _lora_layers(model: nn.Module) -> list[nn.Module]:
    from peft.tuners.lora import LoraLayer

    return [m for m in model.modules() if isinstance(m, LoraLayer)]


def apply_lora(model: nn.Module, r: int = 8, alpha: float = 16.0, dropout: float = 0.0,
               target_modules: Sequence[str] | None = None) -> nn.Module:
    """Add LoRA adapters to ``model`` in place and freeze every other parameter.

    Args:
        model (nn.Module): any seqblocks model.
        r (int): adapter rank. Default: 8.
        alpha (float): scaling numerator; the update is ``(alpha / r) * B @ A``. Default: 16.0.
        dropout (float): dropout on the adapter's input, in [0, 1). Default: 0.0.
        target_modules (Sequence[str] | None): module names (see the module doc). Default: None
            (``DEFAULT_TARGET_MODULES``, those the model has).

    Returns:
        nn.Module: ``model`` itself. B starts at zero, so its outputs are unchanged.

    Raises:
        ValueError: r < 1, alpha <= 0, dropout outside [0, 1), targets matching nothing, a model that
            already has adapters.
        ImportError: peft is not installed.
    """
    _require("peft")
    from peft import LoraConfig, inject_adapter_in_model

    if isinstance(r, bool) or not isinstance(r, int) or r < 1:
        raise ValueError(f"r={r!r} must be a positive integer (the adapter rank)")
    if not alpha > 0:
        raise ValueError(f"alpha={alpha!r} must be positive")
    if not 0.0 <= dropout < 1.0:
        raise ValueError(f"dropout={dropout!r} must be in [0, 1)")
    if has_lora(model):
        raise ValueError(f"{type(model).__name__} already has LoRA adapters; merge_and_unload it first")
    targets = lora_targets(model, target_modules)
    config = LoraConfig(r=r, lora_alpha=alpha, lora_dropout=dropout, target_modules=targets, bias="none")
    inject_adapter_in_model(config, model, adapter_name=_ADAPTER)
    for name, param in model.named_parameters():
        param.requires_grad_(".lora_" in name)
    model._lora_settings = {"r": r, "alpha": float(alpha), "dropout": float(dropout),
                            "target_modules": [t for t in (target_modules or DEFAULT_TARGET_MODULES)],
                            "targets": targets, "nf4": bool(getattr(model, "_lora_nf4", False))}
    return model


def _nf4(weight: torch.Tensor, block_size: int) -> torch.Tensor:
    """torchao's NF4 of ``weight`` with the largest scaler block (<= 256) that divides the block count."""
    from torchao.quantization.quantize_.workflows.nf4.nf4_tensor import to_nf4

    n = weight.numel()
    if n % block_size:
        raise ValueError(f"NF4: a weight of {n} elements does not split into blocks of {block_size}")
    blocks = n // block_size
    scaler = next(s for s in range(min(256, blocks), 0, -1) if blocks % s == 0)
    return to_nf4(weight.detach(), block_size, scaler)


def apply_qlora(model: nn.Module, r: int = 8, alpha: float = 16.0, dropout: float = 0.0,
                target_modules: Sequence[str] | None = None, block_size: int = 64) -> nn.Module:
    """QLoRA: store the targeted base weights as frozen NF4 (torchao), then ``apply_lora``.

    Args:
        block_size (int): elements per NF4 absmax block; must divide each targeted weight's size.
            Default: 64.
        (the others as ``apply_lora``)

    Returns:
        nn.Module: ``model`` itself.

    Raises:
        ValueError: as ``apply_lora``; a weight whose size ``block_size`` does not divide.
        ImportError: peft or torchao is not installed.
    """
    _require("torchao")
    targets = lora_targets(model, target_modules)
    modules = dict(model.named_modules())
    for name in targets:
        linear = modules[name]
        linear.weight = nn.Parameter(_nf4(linear.weight, block_size), requires_grad=False)
    model._lora_nf4 = True
    return apply_lora(model, r, alpha, dropout, target_modules)


def _dequantize_bases(model: nn.Module) -> None:
    """Replace NF4 base weights by their full-precision dequantisation (merging needs real tensors)."""
    for layer in _lora_layers(model):
        base = layer.get_base_layer()
        weight = base.weight
        if type(weight).__name__ == "NF4Tensor" or type(getattr(weight, "data", None)).__name__ == "NF4Tensor":
            base.weight = nn.Parameter(weight.get_original_weight(), requires_grad=False)


def merge_lora(model: nn.Module) -> nn.Module:
    """Fold every adapter into its base weight (QLoRA: the base is dequantised first). Idempotent."""
    if not has_lora(model):
        raise ValueError(f"{type(model).__name__} has no LoRA adapters to merge")
    _dequantize_bases(model)
    for layer in _lora_layers(model):
        if not layer.merged:
            layer.merge()
    return model


def unmerge_lora(model: nn.Module) -> nn.Module:
    """Take merged adapters out of the base weights again (up to rounding). Idempotent."""
    if not has_lora(model):
        raise ValueError(f"{type(model).__name__} has no LoRA adapters to unmerge")
    for layer in _lora_layers(model):
        if layer.merged:
            layer.unmerge()
    return model


def merge_and_unload(model: nn.Module) -> nn.Module:
    """Merge the adapters and put the plain ``nn.Linear`` modules back: a model without LoRA whose
    ``state_dict`` and ``save_pretrained`` are the base architecture's. In place; returns ``model``."""
    merge_lora(model)
    modules = dict(model.named_modules())
    for name in list(model._lora_settings["targets"]):
        parent_name, _, child = name.rpartition(".")
        parent = modules[parent_name] if parent_name else model
        base = getattr(parent, child).get_base_layer()
        base.weight.requires_grad_(True)
        setattr(parent, child, base)
    for name in ("_lora_settings", "_lora_nf4", "peft_config"):
        if hasattr(model, name):
            delattr(model, name)
    for param in model.parameters():
        param.requires_grad_(True)
    return model


def lora_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The adapter tensors only: ``{name: tensor}`` of every ``lora_A`` / ``lora_B`` weight."""
    if not has_lora(model):
        raise ValueError(f"{type(model).__name__} has no LoRA adapters")
    return {k: v for k, v in model.state_dict().items() if ".lora_A." in k or ".lora_B." in k}


def trainable_parameters(model: nn.Module) -> tuple[int, int]:
    """(trainable, total) parameter counts (NF4 weights count their logical elements)."""
    total = sum(p.numel() for p in model.parameters())
    return sum(p.numel() for p in model.parameters() if p.requires_grad), total


def save_adapters(model: nn.Module, directory: str | Path) -> Path:
    """Write the adapters only: ``adapter_model.safetensors`` and ``adapter_config.json`` (rank,
    alpha, dropout, targets, and the base model's config when it has one).

    Raises:
        ValueError: the model has no adapters, or they are merged (unmerge first, so the saved
            tensors are the adapters and not already inside the weights the base checkpoint lacks).
    """
    from safetensors.torch import save_file

    state = lora_state_dict(model)
    if any(layer.merged for layer in _lora_layers(model)):
        raise ValueError("the adapters are merged into the weights; unmerge_lora before save_adapters")
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    save_file({k: v.detach().contiguous().cpu() for k, v in state.items()}, str(directory / ADAPTER_WEIGHTS))
    config = getattr(model, "config", None)
    meta: dict[str, Any] = {"format": "seqblocks-lora", **model._lora_settings}
    if config is not None and hasattr(config, "to_dict"):
        meta["base_model_config"] = config.to_dict()
    (directory / ADAPTER_CONFIG).write_text(json.dumps(meta, indent=2, default=str))
    return directory


def load_adapters(model: nn.Module, directory: str | Path, qlora: bool | None = None) -> nn.Module:
    """Load adapters saved by ``save_adapters`` into ``model`` (adding LoRA layers with the saved rank,
    alpha and targets when it has none). Only safetensors are read.

    Args:
        model (nn.Module): the base model (or the same model with adapters).
        directory (str | Path): where ``save_adapters`` wrote.
        qlora (bool | None): quantise the base to NF4 (QLoRA) when adding the layers. Default: None
            (as the adapters were trained).

    Raises:
        FileNotFoundError: the directory holds no adapters.
        ValueError: adapter names or shapes that do not fit the model.
    """
    from safetensors.torch import load_file

    directory = Path(directory)
    if not (directory / ADAPTER_WEIGHTS).is_file() or not (directory / ADAPTER_CONFIG).is_file():
        raise FileNotFoundError(f"{str(directory)!r} holds no {ADAPTER_WEIGHTS} / {ADAPTER_CONFIG}")
    meta = json.loads((directory / ADAPTER_CONFIG).read_text())
    if not has_lora(model):
        use_nf4 = meta.get("nf4", False) if qlora is None else qlora
        build = apply_qlora if use_nf4 else apply_lora
        build(model, meta["r"], meta["alpha"], meta["dropout"], meta["targets"])
    state = load_file(str(directory / ADAPTER_WEIGHTS))
    own = lora_state_dict(model)
    missing, unexpected = sorted(set(own) - set(state)), sorted(set(state) - set(own))
    if missing or unexpected:
        raise ValueError(f"the adapters in {directory} do not fit this model: missing {missing[:4]}, unexpected "
                         f"{unexpected[:4]}")
    for key, value in state.items():
        if value.shape != own[key].shape:
            raise ValueError(f"adapter {key} has shape {tuple(value.shape)}, the model's {tuple(own[key].shape)}")
    model.load_state_dict(state, strict=False)
    return model

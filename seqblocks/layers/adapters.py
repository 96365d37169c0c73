"""Where the other calling conventions meet the one mixer contract.

Inside seqblocks every mixer is a ``Mixer`` called as ``forward(x, cache=None, *, <declared inputs>)
-> y`` (``seqblocks.layers.mixer``). Two other conventions also reach the blocks, and this module is
the only place that knows them:

- an attention built from a ``BlockConfig`` (an ``AttentionBase`` subclass, or any class registered in the attention
  registry and built as ``cls(config)``) is called ``forward(x, mask=None, cache=None) -> (y, cache)``
  and may hand back a new cache object;
- a foreign module given to ``Block(mixer_cls=...)`` (the plain-module convention: any ``nn.Module``,
  e.g. a mamba-style mixer) is called ``forward(x)`` without a cache and
  ``forward(x, inference_params=cache)`` with one; a tuple result contributes its first element.

Under context parallelism (``seqblocks.parallel``) both conventions run through the full-sequence
fallback (``layers.mixer.run_gathered``): such a module knows nothing of time chunks.

Shapes: B batch, T time, D width.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from seqblocks.layers.mixer import AttentionBase, Mixer, active_context_parallel, run_gathered, run_mixer

__all__ = ["follows_contract", "call_block_attention", "call_foreign_mixer", "call_any_mixer"]


def follows_contract(module: nn.Module) -> bool:
    """Whether ``module`` is called under the mixer contract (a ``Mixer`` not built from a ``BlockConfig``)."""
    return isinstance(module, Mixer) and not isinstance(module, AttentionBase)


def call_block_attention(module: nn.Module, x: torch.Tensor, cache: Any, mask: torch.Tensor | None,
                         inputs: dict[str, Any]) -> tuple[torch.Tensor, Any]:
    """``ConfigurableBlock``'s call: ``(y, cache)`` for contract mixers and ``BlockConfig`` classes alike."""
    if follows_contract(module):
        return run_mixer(module, x, cache, {"mask": mask, **inputs}), cache
    extra = sorted(k for k, v in inputs.items() if v is not None)
    if extra:
        raise TypeError(f"{type(module).__name__} is called as forward(x, mask, cache) and takes no {extra}")
    cp = active_context_parallel(type(module).__name__, cache)
    if cp is not None:
        def full_call(x_full: torch.Tensor, given: dict[str, Any]) -> torch.Tensor:
            return _block_attention_output(module, module(x_full, mask=given.get("mask"), cache=None))

        given = {} if mask is None else {"mask": mask}
        return run_gathered(type(module).__name__, x, given, full_call, cp), None
    out = module(x, mask=mask, cache=cache)
    y = _block_attention_output(module, out)
    new_cache = out[1]
    return y, (cache if new_cache is None else new_cache)


def _block_attention_output(module: nn.Module, out: Any) -> torch.Tensor:
    """y of a ``BlockConfig`` attention's ``(y, cache)``."""
    if not isinstance(out, tuple) or len(out) != 2:
        raise TypeError(f"{type(module).__name__}.forward must return (y, cache), got {type(out).__name__}")
    return out[0]


def call_foreign_mixer(module: nn.Module, x: torch.Tensor, cache: Any, inputs: dict[str, Any]) -> torch.Tensor:
    """``Block``'s call of a module that is not a contract mixer (the plain-module convention)."""
    if isinstance(module, AttentionBase):
        y, _ = call_block_attention(module, x, cache, None, inputs)
        return y
    extra = sorted(k for k, v in inputs.items() if v is not None)
    if extra:
        raise TypeError(f"{type(module).__name__} is not a seqblocks Mixer and takes no {extra}; declare them "
                        f"by subclassing seqblocks.Mixer with inputs = frozenset({extra})")
    cp = active_context_parallel(type(module).__name__, cache)
    if cp is not None:
        return run_gathered(type(module).__name__, x, {},
                            lambda x_full, _: call_foreign_mixer(module, x_full, None, {}), cp)
    out = module(x) if cache is None else module(x, inference_params=cache)
    return out[0] if isinstance(out, tuple) else out


def call_any_mixer(module: nn.Module, x: torch.Tensor, cache: Any = None,
                   inputs: dict[str, Any] | None = None) -> torch.Tensor:
    """Run any mixer a block may hold and return ``y``: the contract call, or the seed adapters."""
    inputs = inputs or {}
    if follows_contract(module):
        return run_mixer(module, x, cache, inputs)
    return call_foreign_mixer(module, x, cache, inputs)

"""``Bidirectional``: a causal mixer made bidirectional by a second pass over the reversed sequence.

    y = forward_mixer(x) + reverse(backward_mixer(reverse(x)))

``reverse`` flips each row's valid prefix (``lengths``), leaving padding in place, so with padding a
token still sees exactly the real tokens before it (forward pass) and after it (backward pass). The
two mixers have their own parameters (Vision Mamba's forward and backward scans). Any mixer runs
inside: a seqblocks ``Mixer`` under the mixer contract, or a plain module ``forward(x)``.

Shapes: B batch, T time, D width.
"""

from __future__ import annotations

import torch
from torch import nn

from seqblocks.layers.adapters import call_any_mixer
from seqblocks.layers.checks import check_lengths
from seqblocks.layers.mixers._lti import reverse_rows

__all__ = ["Bidirectional"]


class Bidirectional(nn.Module):
    """Sum of a forward pass and a reversed pass of two mixers of the same kind.

    Args:
        forward_mixer (nn.Module): the left-to-right mixer, [B, T, D] -> [B, T, D].
        backward_mixer (nn.Module): the mixer run on the reversed sequence (its own parameters).

    Raises:
        TypeError: either is not an ``nn.Module``.
    """

    #: Output t depends on every token, so it cannot decode with a cache.
    causal = False

    def __init__(self, forward_mixer: nn.Module, backward_mixer: nn.Module) -> None:
        super().__init__()
        for name, module in (("forward_mixer", forward_mixer), ("backward_mixer", backward_mixer)):
            if not isinstance(module, nn.Module):
                raise TypeError(f"Bidirectional: {name} must be an nn.Module, got {type(module).__name__}")
        self.forward_mixer = forward_mixer
        self.backward_mixer = backward_mixer

    def forward(self, x: torch.Tensor, lengths: torch.Tensor | None = None) -> torch.Tensor:
        """x [B, T, D] -> y [B, T, D]; ``lengths`` [B] valid prefix of each row (padding stays last).

        Padded positions of the output are 0 when ``lengths`` is given.
        """
        if not isinstance(x, torch.Tensor) or x.dim() != 3:
            raise ValueError(f"Bidirectional: expected x [B, T, D], got "
                             f"{tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__}")
        check_lengths("Bidirectional", lengths, x.shape[0], x.shape[1])
        if lengths is not None:
            lengths = lengths.to(device=x.device, dtype=torch.long)
            valid = (torch.arange(x.shape[1], device=x.device) < lengths[:, None])[..., None]  # [B, T, 1]
            x = x.masked_fill(~valid, 0.0)
        inputs = {"lengths": lengths} if lengths is not None else {}
        fwd = call_any_mixer(self.forward_mixer, x, None, self._inputs(self.forward_mixer, inputs))
        back = call_any_mixer(self.backward_mixer, reverse_rows(x, lengths), None,
                              self._inputs(self.backward_mixer, inputs))
        y = fwd + reverse_rows(back, lengths)
        return y if lengths is None else y.masked_fill(~valid, 0.0)

    @staticmethod
    def _inputs(mixer: nn.Module, inputs: dict) -> dict:
        """The inputs ``mixer`` declares (a causal mixer without ``lengths`` is still exact on a valid
        prefix: later padding cannot reach earlier tokens)."""
        return {k: v for k, v in inputs.items() if k in getattr(mixer, "inputs", frozenset())}

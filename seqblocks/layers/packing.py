"""Packed documents at the model level: boundaries, positions, loss targets, and the padded fallback.

A packed batch holds several documents per row of ``input_ids`` [B, T]. Their boundaries are given
either as ``cu_seqlens`` [N + 1] (offsets of N documents over the flattened B * T tokens, rising from
0 to B * T; a document never spans rows, so each row start is a boundary whether listed or not) or as
``document_ids`` [B, T] (a new document starts wherever the id changes, and at every row start).

Inside the model the rows are flattened to one packed row [1, B * T, D] and every mixer gets the same
``cu_seqlens``: recurrences restart at each boundary, attention is block-diagonal, convolutions do not
reach across, and positions restart at 0. Mixers that run packed input natively declare
``cu_seqlens`` in ``Mixer.inputs``; ``run_mixer`` serves every other mixer that declares ``lengths``
by unpacking into a right-padded batch of documents (``run_unpacked``), which is exact because a
padded row is the document alone.

Shapes: B batch, T time, D width, N documents, L longest document.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from seqblocks.cache import host_sync_unsafe
from seqblocks.ops._packing import check_cu_seqlens, pack, unpack

__all__ = ["packing_offsets", "cu_seqlens_from_document_ids", "document_index", "packed_positions",
           "packed_targets", "run_unpacked"]


def _check_int_tensor(owner: str, name: str, value: Any, dims: int, shape_text: str) -> torch.Tensor:
    if not isinstance(value, torch.Tensor) or value.dtype not in (torch.int32, torch.int64):
        got = value.dtype if isinstance(value, torch.Tensor) else type(value).__name__
        raise TypeError(f"{owner}: {name} must be an int32 / int64 tensor {shape_text}, got {got}")
    if value.dim() != dims:
        raise ValueError(f"{owner}: {name} must be {shape_text}, got shape {tuple(value.shape)}")
    return value


def cu_seqlens_from_document_ids(document_ids: torch.Tensor) -> torch.Tensor:
    """Offsets [N + 1] (int64) over the flattened B * T tokens of ``document_ids`` [B, T]: a document
    starts at every row start and wherever the id differs from the previous token's."""
    B, T = document_ids.shape
    starts = torch.ones(B, T, dtype=torch.bool, device=document_ids.device)
    starts[:, 1:] = document_ids[:, 1:] != document_ids[:, :-1]
    offsets = starts.reshape(-1).nonzero().squeeze(1)
    end = torch.tensor([B * T], dtype=offsets.dtype, device=offsets.device)
    return torch.cat([offsets, end])


def packing_offsets(owner: str, batch: int, T: int, *, cu_seqlens: Any = None, document_ids: Any = None,
                    device: torch.device | None = None) -> torch.Tensor:
    """Check the packing inputs of a [B, T] batch and return int64 offsets over its B * T tokens,
    each row start included (empty documents removed).

    Raises:
        TypeError: a non-integer tensor (or not a tensor). ValueError: both inputs given, a wrong
            shape, offsets that do not rise from 0 to B * T.
    """
    if cu_seqlens is not None and document_ids is not None:
        raise ValueError(f"{owner}: pass cu_seqlens or document_ids, not both")
    if document_ids is not None:
        _check_int_tensor(owner, "document_ids", document_ids, 2, f"[B, T] = [{batch}, {T}]")
        if tuple(document_ids.shape) != (batch, T):
            raise ValueError(f"{owner}: document_ids must be [B, T] = [{batch}, {T}], got "
                             f"{tuple(document_ids.shape)}")
        return cu_seqlens_from_document_ids(document_ids.to(device))
    _check_int_tensor(owner, "cu_seqlens", cu_seqlens, 1, "[num_docs + 1]")
    check_cu_seqlens(owner, cu_seqlens, 1, batch * T)
    cu = cu_seqlens.to(device=device, dtype=torch.long)
    rows = torch.arange(0, batch * T + 1, T, device=cu.device)
    if host_sync_unsafe():  # no value-dependent shapes while capturing / compiling: the offsets as given
        return cu
    return torch.unique(torch.cat([cu, rows]))  # sorted; repeated offsets (empty documents) merged


def document_index(cu_seqlens: torch.Tensor, total: int) -> torch.Tensor:
    """[total] the document each token belongs to (0-based)."""
    t = torch.arange(total, device=cu_seqlens.device)
    return torch.searchsorted(cu_seqlens[1:].contiguous(), t, right=True)


def packed_positions(cu_seqlens: torch.Tensor, total: int) -> torch.Tensor:
    """[total] int64 position of each token within its document (restarting at 0 at each boundary)."""
    t = torch.arange(total, device=cu_seqlens.device)
    return t - cu_seqlens.long()[document_index(cu_seqlens, total)]


def packed_targets(input_ids: torch.Tensor, *, cu_seqlens: torch.Tensor | None = None,
                   document_ids: torch.Tensor | None = None, ignore_index: int = -100) -> torch.Tensor:
    """Next-token targets [B, T] of a packed batch ``input_ids`` [B, T]: ``input_ids`` shifted left by
    one, with ``ignore_index`` at each document's last token (no prediction across a boundary) and at
    each row's last token.

    Args:
        input_ids (Tensor): [B, T] token ids.
        cu_seqlens (Tensor | None): [N + 1] offsets over the B * T tokens. Default: None.
        document_ids (Tensor | None): [B, T] document ids (instead of ``cu_seqlens``). Default: None.
        ignore_index (int): the target of unscored positions. Default: -100.

    Raises:
        ValueError / TypeError: as ``packing_offsets``; neither boundary input given.
    """
    if not isinstance(input_ids, torch.Tensor) or input_ids.dim() != 2:
        shape = tuple(input_ids.shape) if isinstance(input_ids, torch.Tensor) else type(input_ids).__name__
        raise ValueError(f"packed_targets: input_ids must be a [B, T] tensor, got {shape}")
    if cu_seqlens is None and document_ids is None:
        raise ValueError("packed_targets: pass cu_seqlens or document_ids (the document boundaries)")
    B, T = input_ids.shape
    cu = packing_offsets("packed_targets", B, T, cu_seqlens=cu_seqlens, document_ids=document_ids,
                         device=input_ids.device)
    flat = input_ids.reshape(-1)
    targets = torch.full_like(flat, ignore_index)
    targets[:-1] = flat[1:]
    last = cu[1:] - 1  # each document's last token
    targets[last[last >= 0]] = ignore_index
    return targets.view(B, T)


def run_unpacked(mixer: Any, x: torch.Tensor, cache: Any, inputs: dict[str, Any],
                 run_mixer: Callable[..., torch.Tensor]) -> torch.Tensor:
    """Run ``mixer`` (which declares ``lengths``) on documents packed in x [1, total, D]: unpack into a
    right-padded batch [N, L, D] with ``lengths`` [N], call it through ``run_mixer`` (the contract call,
    ``seqblocks.layers.mixer.run_mixer``, which calls this), pack the valid outputs back.

    Other [1, total]-shaped inputs (``integration_timesteps``, ``position_ids``) are unpacked alongside;
    a cache holds one row per document, each advancing by its document's length. A mixer unpacking
    itself may pass a ``run_mixer`` of its own (MHA's carries its per-call ``score_mod``).
    """

    owner = type(mixer).__name__
    inputs = dict(inputs)
    cu = inputs.pop("cu_seqlens")
    if "lengths" in inputs:
        raise ValueError(f"{owner}: pass either lengths or cu_seqlens, not both")
    if not isinstance(x, torch.Tensor) or x.dim() != 3:
        raise ValueError(f"{owner}: with cu_seqlens x must be [1, total, D], got "
                         f"{tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__}")
    check_cu_seqlens(owner, cu, x.shape[0], x.shape[1])
    cu = cu.to(x.device)
    padded, lengths = unpack(x, cu)
    for name, value in list(inputs.items()):
        if isinstance(value, torch.Tensor) and value.dim() >= 2 and tuple(value.shape[:2]) == (1, x.shape[1]):
            inputs[name] = unpack(value, cu)[0]
        elif isinstance(value, torch.Tensor) and value.dim() == 1 and value.shape[0] == x.shape[1]:
            inputs[name] = unpack(value[None], cu)[0]
    y = run_mixer(mixer, padded, cache, {**inputs, "lengths": lengths})
    return pack(y, cu)

"""Transformer encoder, decoder and encoder-decoder models over ``EncoderBlock`` / ``DecoderBlock``.

- ``TransformerEncoder``: embeddings (or [B, T, D] inputs), positions, N encoder blocks, final norm.
- ``TransformerDecoder``: N decoder blocks with cross-attention to a memory (or, with
  ``cross_attention=False``, causal encoder blocks: a decoder-only LM), final norm, LM head.
- ``TransformerEncoderDecoder``: both, with ``encode`` / ``decode`` / ``forward`` and greedy ``generate``.

Each takes its sizes as arguments or one frozen ``TransformerConfig`` (``TransformerEncoder(config)``),
and each saves and loads with ``save_pretrained`` / ``from_pretrained`` (``config.json`` with every
constructor argument, ``model.safetensors``; see ``seqblocks.checkpoint``). A per-call ``score_mod``
(``forward(..., score_mod=)``) acts on every block's self-attention on top of the blocks' own.

Positions (``position``): "sinusoidal" or "learned" are added to the embeddings at the model input at
absolute positions (cache offset + index); "rope" and "alibi" act inside self-attention; "none".
While decoding, each layer caches its self-attention K/V, and its cross-attention K/V are computed
once, on the first decode call after ``allocate_inference_cache`` (or ``cache.reset()``).

Context parallelism (``seqblocks.parallel.context_parallel``): ``TransformerEncoder`` and the
decoder-only ``TransformerDecoder`` (``cross_attention=False``) take this rank's time chunk [B, T_local]
and return its outputs; additive positions start at the chunk's offset and the self-attention is
``MHA``'s (global positions, ring or all-gather). A decoder with cross-attention refuses it.

Shapes: B batch, T time, S source length, D width, V vocabulary.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from seqblocks.blocks.encoder_decoder import DecoderBlock, EncoderBlock
from seqblocks.cache import Cache
from seqblocks.checkpoint import CheckpointMixin
from seqblocks.layers.packing import packed_positions, packing_offsets
from seqblocks.layers.position import LearnedPosition, SinusoidalPosition, positions_from_offset
from seqblocks.models.transformer_config import TransformerConfig
from seqblocks.parallel.context import current_context_parallel
from seqblocks.registry import MODELS, NORMS

__all__ = ["TransformerEncoder", "TransformerDecoder", "TransformerEncoderDecoder", "TransformerCache",
           "POSITION_TYPES"]

POSITION_TYPES = ("sinusoidal", "learned", "rope", "alibi", "none")
_SIZES = ("vocab_size", "d_model", "num_layers", "num_heads", "d_ff")
#: The stack arguments a ``TransformerConfig`` gives (left out of a checkpoint that stores the config).
_CONFIG_KEYS = (*_SIZES, "position", "max_seq_len", "padding_idx", "kv_cache_max_len")


@dataclasses.dataclass(eq=False)
class TransformerCache(Cache):
    """Per-layer caches of a transformer stack; ``seqlen_offset`` is the model's own token counter."""

    layers: list = dataclasses.field(default_factory=list)

    def reset(self) -> None:
        self.seqlen_offset.zero_()
        for c in self.layers:
            c.reset()


#: Block arguments that hold code (functions): a model built with them cannot be saved, since a
#: checkpoint never stores or imports code.
_CODE_ARGS = ("score_mod", "mask_mod", "attention_fn")


def _from_config(owner: str, config: TransformerConfig, given: dict[str, tuple[Any, Any]],
                 block_kwargs: dict[str, Any]) -> dict[str, Any]:
    """The stack arguments ``config`` stands for, merged with the extra ``block_kwargs``.

    ``given`` maps each size argument to (value passed, its default): one that differs from its
    default was given beside the config, which is refused rather than silently overridden.

    Raises:
        TypeError: an argument given both by the config and explicitly.
    """
    clash = sorted(name for name, (value, default) in given.items() if value != default)
    args = config.stack_kwargs()
    clash += sorted(set(block_kwargs) & set(args["block_kwargs"]))
    if clash:
        raise TypeError(f"{owner}: {clash} given beside a TransformerConfig, which sets them; change the config "
                        f"instead (dataclasses.replace(config, ...))")
    args["block_kwargs"] = {**args["block_kwargs"], **block_kwargs}
    return args


def _checkpoint_args(owner: str, args: dict[str, Any], config: TransformerConfig | None,
                     config_keys: tuple[str, ...]) -> dict[str, Any]:
    """A stack's ``checkpoint_config``: its constructor arguments (``transformer_config`` in place of
    those a ``TransformerConfig`` gave).

    Raises:
        ValueError: a block argument holds code (a score / mask mod, an attention kernel).
    """
    block = dict(args.get("block_kwargs", {}))
    code = sorted(k for k in _CODE_ARGS if block.get(k) is not None)
    if code:
        raise ValueError(f"{owner}: {code} are functions, which a checkpoint cannot hold (checkpoints never store "
                         f"or import code); save a model built without them, load it and rebuild the functions "
                         f"in code (a per-call score_mod= needs no rebuilding)")
    out = {k: v for k, v in args.items() if k != "block_kwargs"}
    if config is not None:
        config_block = config.stack_kwargs()["block_kwargs"]
        block = {k: v for k, v in block.items() if k not in config_block}
        out = {k: v for k, v in out.items() if k not in config_keys}
        out["transformer_config"] = config.to_dict()
    out.update(block)
    return out


def _checkpoint_kwargs(data: dict[str, Any]) -> tuple[TransformerConfig | None, dict[str, Any]]:
    """(config or None, the remaining constructor arguments) of a stack's ``checkpoint_config``."""
    data = dict(data)
    config = data.pop("transformer_config", None)
    return (None if config is None else TransformerConfig.from_dict(config)), data


class _Stack(nn.Module):
    def _build_io(self, vocab_size, d_model, position, max_seq_len, norm_type, norm_eps, pre_norm, dropout_rate,
                  padding_idx, device, dtype) -> None:
        owner = type(self).__name__
        if position not in POSITION_TYPES:
            raise ValueError(f"{owner}: position={position!r}; expected one of {POSITION_TYPES}")
        if vocab_size is not None and vocab_size <= 0:
            raise ValueError(f"{owner}: vocab_size={vocab_size} must be positive or None")
        self.vocab_size, self.d_model, self.position_type, self.max_seq_len = vocab_size, d_model, position, max_seq_len
        factory = {"device": device, "dtype": dtype}
        self.embedding = (nn.Embedding(vocab_size, d_model, padding_idx=padding_idx, **factory)
                          if vocab_size is not None else None)
        if position == "sinusoidal":
            self.pos_embedding = SinusoidalPosition(d_model, device=device)
        elif position == "learned":
            self.pos_embedding = LearnedPosition(max_seq_len, d_model, **factory)
        else:
            self.pos_embedding = None
        self.embed_dropout = nn.Dropout(dropout_rate)
        # Pre-norm stacks leave the residual stream unnormalised: a final norm closes them.
        self.final_norm = NORMS.get(norm_type)(d_model, eps=norm_eps, **factory) if pre_norm else None

    def _block_kwargs(self, position: str, rope_max: int) -> dict[str, Any]:
        return {"use_rope": position == "rope", "alibi": position == "alibi", "rope_max_positions": rope_max}

    def _embed(self, inputs: torch.Tensor, offset: torch.Tensor | None,
               positions: torch.Tensor | None = None) -> torch.Tensor:
        owner = type(self).__name__
        if self.embedding is not None:
            if inputs.dim() != 2 or inputs.dtype.is_floating_point:
                raise ValueError(f"{owner}: expected token ids [B, T], got {inputs.dtype} {tuple(inputs.shape)}")
            x = self.embedding(inputs)
        else:
            if inputs.dim() != 3 or inputs.shape[-1] != self.d_model:
                raise ValueError(f"{owner}: expected embeddings [B, T, {self.d_model}], got {tuple(inputs.shape)}")
            x = inputs
        if self.pos_embedding is not None:
            T = x.shape[1]
            if offset is None:  # no cache: position 0, or this rank's chunk under context parallelism
                cp = current_context_parallel()
                offset = 0 if cp is None else cp.offset(T)
            pos = positions if positions is not None else positions_from_offset(offset, T, device=x.device)
            x = self.pos_embedding.embed(x, pos)
        return self.embed_dropout(x)

    def _packed(self, inputs: torch.Tensor, cu_seqlens, document_ids, given: dict[str, Any]):
        """The packed run's (offsets over B * T tokens, in-document positions [B, T]); None unpacked."""
        if cu_seqlens is None and document_ids is None:
            return None, None
        owner = type(self).__name__
        clash = sorted(k for k, v in given.items() if v is not None)
        if clash:
            raise ValueError(f"{owner}: packed documents (cu_seqlens / document_ids) take no {clash}")
        B, T = inputs.shape[:2]
        cu = packing_offsets(owner, B, T, cu_seqlens=cu_seqlens, document_ids=document_ids, device=inputs.device)
        return cu, packed_positions(cu, B * T).view(B, T)

    def _run_blocks(self, x: torch.Tensor, cu: torch.Tensor | None, call) -> tuple[torch.Tensor, list]:
        """Each block as ``call(i, block, x, cu)``; packed (``cu``) on the rows flattened to [1, B * T, D]."""
        B, T, D = x.shape
        if cu is not None:
            x = x.reshape(1, B * T, D)
        hidden_states = []
        for i, blk in enumerate(self.layers):
            hidden_states.append(x if cu is None else x.view(B, T, D))
            x = call(i, blk, x, cu)
        return (x if cu is None else x.view(B, T, D)), hidden_states

    def _finish(self, x: torch.Tensor) -> torch.Tensor:
        return x if self.final_norm is None else self.final_norm(x)


def _stack_args(owner: str, config: TransformerConfig, d_model: int, num_layers: int, num_heads: int, d_ff: int,
                position: str, max_seq_len: int, padding_idx: int | None, kv_cache_max_len: int | None,
                block_kwargs: dict[str, Any]) -> tuple:
    """The stack's sizes from a ``TransformerConfig`` (an argument also given explicitly raises, in
    ``_from_config``): (vocab_size, d_model, num_layers, num_heads, d_ff, position, max_seq_len,
    padding_idx, kv_cache_max_len, block_kwargs)."""
    args = _from_config(owner, config, {
        "d_model": (d_model, 512), "num_layers": (num_layers, 6), "num_heads": (num_heads, 8),
        "d_ff": (d_ff, 2048), "position": (position, "sinusoidal"), "max_seq_len": (max_seq_len, 2048),
        "padding_idx": (padding_idx, None), "kv_cache_max_len": (kv_cache_max_len, None)}, block_kwargs)
    return (*(args[k] for k in _SIZES), args["position"], args["max_seq_len"], args["padding_idx"],
            args["kv_cache_max_len"], args["block_kwargs"])


@MODELS.register("TransformerEncoder")
class TransformerEncoder(_Stack, CheckpointMixin, library_name="seqblocks", tags=["seqblocks", "encoder"]):
    """A stack of ``EncoderBlock``: bidirectional by default.

    Args:
        vocab_size (int | TransformerConfig | None): token vocabulary; None takes [B, T, d_model]
            inputs; a ``TransformerConfig`` gives every size, position and block option at once (the
            other sizes are then left at their defaults). Default: None.
        d_model (int): width. Default: 512.
        num_layers (int): blocks. Default: 6.
        num_heads (int): heads. Default: 8.
        d_ff (int): FFN width. Default: 2048.
        position (str): "sinusoidal", "learned", "rope", "alibi" or "none". Default: "sinusoidal".
        max_seq_len (int): longest sequence (learned / rope tables). Default: 2048.
        causal (bool): causal self-attention. Default: False.
        padding_idx (int | None): embedding padding index. Default: None.
        kv_cache_max_len (int | None): the length ``allocate_inference_cache`` allocates when none is
            given. Default: None (max_seq_len).
        **block_kwargs: further ``EncoderBlock`` arguments (dropout_rate, pre_norm, attention_type,
            norm_type, ff_activation, num_kv_heads, attention_window, score_mod, rope_base,
            attention_fn, ...).
        device, dtype: parameter placement. Default: None.
    """

    def __init__(self, vocab_size: int | TransformerConfig | None = None, d_model: int = 512, num_layers: int = 6,
                 num_heads: int = 8, d_ff: int = 2048, *, position: str = "sinusoidal", max_seq_len: int = 2048,
                 causal: bool = False, padding_idx: int | None = None, kv_cache_max_len: int | None = None,
                 device=None, dtype=None, **block_kwargs: Any) -> None:
        super().__init__()
        self.config = None
        if isinstance(vocab_size, TransformerConfig):
            self.config = vocab_size
            (vocab_size, d_model, num_layers, num_heads, d_ff, position, max_seq_len, padding_idx, kv_cache_max_len,
             block_kwargs) = _stack_args("TransformerEncoder", vocab_size, d_model, num_layers, num_heads, d_ff,
                                         position, max_seq_len, padding_idx, kv_cache_max_len, block_kwargs)
        self._init_args = {"vocab_size": vocab_size, "d_model": d_model, "num_layers": num_layers,
                           "num_heads": num_heads, "d_ff": d_ff, "position": position, "max_seq_len": max_seq_len,
                           "causal": causal, "padding_idx": padding_idx, "kv_cache_max_len": kv_cache_max_len,
                           "block_kwargs": dict(block_kwargs)}
        self.kv_cache_max_len = kv_cache_max_len or max_seq_len
        if num_layers <= 0:
            raise ValueError(f"TransformerEncoder: num_layers={num_layers} must be positive")
        pre_norm = block_kwargs.get("pre_norm", True)
        self._build_io(vocab_size, d_model, position, max_seq_len, block_kwargs.get("norm_type", "layer_norm"),
                       block_kwargs.get("norm_eps", 1e-5), pre_norm, block_kwargs.get("dropout_rate", 0.0),
                       padding_idx, device, dtype)
        self.causal = causal
        self.layers = nn.ModuleList(
            EncoderBlock(d_model, num_heads, d_ff, causal=causal, layer_idx=i, device=device, dtype=dtype,
                         **self._block_kwargs(position, max_seq_len), **block_kwargs)
            for i in range(num_layers)
        )

    def allocate_inference_cache(self, batch_size: int, max_seqlen: int | None = None,
                                 dtype: torch.dtype | None = None, **kwargs: Any) -> TransformerCache:
        """Per-layer self-attention caches (causal encoders only) for ``max_seqlen`` tokens (default
        ``kv_cache_max_len``)."""
        max_seqlen = self.kv_cache_max_len if max_seqlen is None else max_seqlen
        layers = [blk.allocate_inference_cache(batch_size, max_seqlen, dtype=dtype) for blk in self.layers]
        offset = torch.zeros(batch_size, dtype=torch.long, device=layers[0].seqlen_offset.device)
        return TransformerCache(seqlen_offset=offset, max_seqlen=max_seqlen, layers=layers)

    def forward(self, inputs: torch.Tensor, mask: torch.Tensor | None = None, cache: TransformerCache | None = None,
                lengths: torch.Tensor | None = None, return_hidden: bool = False, score_mod: Callable | None = None,
                *, cu_seqlens: torch.Tensor | None = None, document_ids: torch.Tensor | None = None,
                ) -> torch.Tensor | tuple[torch.Tensor, tuple[torch.Tensor, ...]]:
        """inputs: token ids [B, T] (or embeddings [B, T, D]) -> hidden states [B, T, D].

        ``mask`` [B, T] bool marks real tokens (key padding) or is a full attention mask;
        ``score_mod`` is a per-call score mod (or mask mod) of every block's self-attention. With
        ``return_hidden=True`` it returns ``(output, hidden_states)``: the input of each block (the
        embedding output first) and then ``output`` itself, num_layers + 1 tensors [B, T, D].
        ``cu_seqlens`` ([N + 1] offsets over the B * T tokens) or ``document_ids`` ([B, T]) pack several
        documents per row: each attends only to itself and its positions restart (as
        ``seqblocks.layers.packing``; not with ``mask``, ``cache`` or ``lengths``).
        """
        cu, positions = self._packed(inputs, cu_seqlens, document_ids, {"mask": mask, "cache": cache,
                                                                         "lengths": lengths})
        x = self._embed(inputs, None if cache is None else cache.seqlen_offset, positions)

        def call(i, blk, h, cu):
            if cu is not None:
                return blk(h, cu_seqlens=cu, score_mod=score_mod)
            return blk(h, mask=mask, cache=None if cache is None else cache.layers[i], lengths=lengths,
                       score_mod=score_mod)

        x, hidden_states = self._run_blocks(x, cu, call)
        if cache is not None:
            cache.advance(x.shape[1] if lengths is None else lengths.to(cache.seqlen_offset))
        x = self._finish(x)
        return (x, (*hidden_states, x)) if return_hidden else x

    def checkpoint_config(self) -> dict[str, Any]:
        return _checkpoint_args("TransformerEncoder", self._init_args, self.config, _CONFIG_KEYS)

    @classmethod
    def from_checkpoint_config(cls, config: dict[str, Any], device=None, dtype=None) -> TransformerEncoder:
        transformer_config, kwargs = _checkpoint_kwargs(config)
        if transformer_config is None:
            return cls(**kwargs, device=device, dtype=dtype)
        return cls(transformer_config, **kwargs, device=device, dtype=dtype)


@MODELS.register("TransformerDecoder")
class TransformerDecoder(_Stack, CheckpointMixin, library_name="seqblocks", tags=["seqblocks", "decoder"]):
    """A stack of ``DecoderBlock`` with an LM head (or of causal ``EncoderBlock`` without cross-attention).

    Args:
        vocab_size (int | TransformerConfig): target vocabulary, or a ``TransformerConfig`` (as
            ``TransformerEncoder``; the JAX libraries' decoder-only stack is
            ``TransformerDecoder(config, cross_attention=False)``, here with an LM head).
        d_model, num_layers, num_heads, d_ff, position, max_seq_len, padding_idx, kv_cache_max_len: as
            ``TransformerEncoder``.
        cross_attention (bool): attend to a memory (encoder output). Default: True.
        memory_dim (int | None): memory width. Default: None (= d_model).
        tie_embeddings (bool): share the LM head with the token embedding. Default: True.
        **block_kwargs: further ``DecoderBlock`` arguments.
    """

    def __init__(self, vocab_size: int | TransformerConfig, d_model: int = 512, num_layers: int = 6,
                 num_heads: int = 8, d_ff: int = 2048, *, position: str = "sinusoidal", max_seq_len: int = 2048,
                 cross_attention: bool = True, memory_dim: int | None = None, tie_embeddings: bool = True,
                 padding_idx: int | None = None, kv_cache_max_len: int | None = None, device=None, dtype=None,
                 **block_kwargs: Any) -> None:
        super().__init__()
        self.config = None
        if isinstance(vocab_size, TransformerConfig):
            self.config = vocab_size
            (vocab_size, d_model, num_layers, num_heads, d_ff, position, max_seq_len, padding_idx, kv_cache_max_len,
             block_kwargs) = _stack_args("TransformerDecoder", vocab_size, d_model, num_layers, num_heads, d_ff,
                                         position, max_seq_len, padding_idx, kv_cache_max_len, block_kwargs)
        self._init_args = {"vocab_size": vocab_size, "d_model": d_model, "num_layers": num_layers,
                           "num_heads": num_heads, "d_ff": d_ff, "position": position, "max_seq_len": max_seq_len,
                           "cross_attention": cross_attention, "memory_dim": memory_dim,
                           "tie_embeddings": tie_embeddings, "padding_idx": padding_idx,
                           "kv_cache_max_len": kv_cache_max_len, "block_kwargs": dict(block_kwargs)}
        self.kv_cache_max_len = kv_cache_max_len or max_seq_len
        if vocab_size is None:
            raise ValueError("TransformerDecoder needs vocab_size")
        if num_layers <= 0:
            raise ValueError(f"TransformerDecoder: num_layers={num_layers} must be positive")
        pre_norm = block_kwargs.get("pre_norm", True)
        self._build_io(vocab_size, d_model, position, max_seq_len, block_kwargs.get("norm_type", "layer_norm"),
                       block_kwargs.get("norm_eps", 1e-5), pre_norm, block_kwargs.get("dropout_rate", 0.0),
                       padding_idx, device, dtype)
        self.cross_attention = cross_attention
        pos_kwargs = self._block_kwargs(position, max_seq_len)
        if cross_attention:
            self.layers = nn.ModuleList(
                DecoderBlock(d_model, num_heads, d_ff, memory_dim=memory_dim, layer_idx=i, device=device,
                             dtype=dtype, **pos_kwargs, **block_kwargs) for i in range(num_layers))
        else:
            self.layers = nn.ModuleList(
                EncoderBlock(d_model, num_heads, d_ff, causal=True, layer_idx=i, device=device, dtype=dtype,
                             **pos_kwargs, **block_kwargs) for i in range(num_layers))
        self.lm_head = nn.Linear(d_model, vocab_size, bias=False, device=device, dtype=dtype)
        if tie_embeddings:
            self.lm_head.weight = self.embedding.weight

    def allocate_inference_cache(self, batch_size: int, max_seqlen: int | None = None,
                                 dtype: torch.dtype | None = None, *, memory_seqlen: int | None = None,
                                 **kwargs: Any) -> TransformerCache:
        """Per-layer caches for ``max_seqlen`` target tokens (default ``kv_cache_max_len``) and a memory
        of ``memory_seqlen`` tokens."""
        max_seqlen = self.kv_cache_max_len if max_seqlen is None else max_seqlen
        if self.cross_attention:
            if memory_seqlen is None:
                raise ValueError("TransformerDecoder.allocate_inference_cache needs memory_seqlen (the encoder "
                                 "output's length) when cross_attention=True")
            layers = [blk.allocate_inference_cache(batch_size, max_seqlen, dtype=dtype, memory_seqlen=memory_seqlen)
                      for blk in self.layers]
        else:
            layers = [blk.allocate_inference_cache(batch_size, max_seqlen, dtype=dtype) for blk in self.layers]
        offset = torch.zeros(batch_size, dtype=torch.long, device=self.lm_head.weight.device)
        return TransformerCache(seqlen_offset=offset, max_seqlen=max_seqlen, layers=layers)

    def forward(self, tokens: torch.Tensor, memory: torch.Tensor | None = None,
                memory_mask: torch.Tensor | None = None, mask: torch.Tensor | None = None,
                cache: TransformerCache | None = None, lengths: torch.Tensor | None = None,
                return_hidden: bool = False, score_mod: Callable | None = None, *,
                cu_seqlens: torch.Tensor | None = None, document_ids: torch.Tensor | None = None,
                ) -> torch.Tensor | tuple[torch.Tensor, tuple[torch.Tensor, ...]]:
        """tokens [B, T] -> logits [B, T, V].

        Args:
            memory (Tensor | None): [B, S, Dm] encoder output (cross_attention=True); with a cache, needed
                on the first call only.
            memory_mask (Tensor | None): [B, S] bool, True for real source tokens.
            mask (Tensor | None): [B, T] bool target key padding.
            cache (TransformerCache | None): from ``allocate_inference_cache``.
            lengths (Tensor | None): [B] valid prefix of each target row.
            return_hidden (bool): return ``(logits, hidden_states)``: the input of each block (the
                embedding output first), then the final-norm output the LM head reads; num_layers + 1
                tensors [B, T, D]. Default: False.
            score_mod (Callable | None): a per-call score mod (or mask mod) of every block's
                self-attention. Default: None.
            cu_seqlens, document_ids (Tensor | None): packed documents, as ``TransformerEncoder``
                (a decoder-only stack, ``cross_attention=False``, only). Default: None.
        """
        cp = current_context_parallel()
        if self.cross_attention and cp is not None and cp.world_size > 1:
            raise ValueError("TransformerDecoder: context parallelism needs a decoder-only stack "
                             "(cross_attention=False); the memory of cross-attention does not split with the targets")
        if self.cross_attention and (cu_seqlens is not None or document_ids is not None):
            raise ValueError("TransformerDecoder: packed documents (cu_seqlens / document_ids) need a decoder-only "
                             "stack (cross_attention=False); with cross-attention each target row has one source")
        if self.cross_attention and memory is None and (cache is None or not self._memory_cached(cache)):
            raise ValueError("TransformerDecoder: memory is required (cross_attention=True and no cached memory)")
        cu, positions = self._packed(tokens, cu_seqlens, document_ids, {"mask": mask, "cache": cache,
                                                                        "lengths": lengths})
        x = self._embed(tokens, None if cache is None else cache.seqlen_offset, positions)

        def call(i, blk, h, cu):
            layer_cache = None if cache is None else cache.layers[i]
            if cu is not None:
                return blk(h, cu_seqlens=cu, score_mod=score_mod)
            if self.cross_attention:
                return blk(h, memory, mask=mask, memory_mask=memory_mask, cache=layer_cache, lengths=lengths,
                           score_mod=score_mod)
            return blk(h, mask=mask, cache=layer_cache, lengths=lengths, score_mod=score_mod)

        x, hidden_states = self._run_blocks(x, cu, call)
        if cache is not None:
            cache.advance(x.shape[1] if lengths is None else lengths.to(cache.seqlen_offset))
        x = self._finish(x)
        logits = self.lm_head(x)
        return (logits, (*hidden_states, x)) if return_hidden else logits

    @staticmethod
    def _memory_cached(cache: TransformerCache) -> bool:
        return all(c.cross_attn.filled for c in cache.layers)

    def checkpoint_config(self) -> dict[str, Any]:
        return _checkpoint_args("TransformerDecoder", self._init_args, self.config, _CONFIG_KEYS)

    @classmethod
    def from_checkpoint_config(cls, config: dict[str, Any], device=None, dtype=None) -> TransformerDecoder:
        transformer_config, kwargs = _checkpoint_kwargs(config)
        if transformer_config is None:
            return cls(**kwargs, device=device, dtype=dtype)
        return cls(transformer_config, **kwargs, device=device, dtype=dtype)


@MODELS.register("TransformerEncoderDecoder")
class TransformerEncoderDecoder(nn.Module, CheckpointMixin, library_name="seqblocks",
                                tags=["seqblocks", "encoder-decoder"]):
    """Encoder-decoder transformer (Vaswani et al.) over ``TransformerEncoder`` and ``TransformerDecoder``.

    Args:
        src_vocab_size (int | TransformerConfig): source vocabulary, or a ``TransformerConfig``
            (one vocabulary for both sides, ``num_layers`` blocks in each stack).
        tgt_vocab_size (int | None): target vocabulary. Default: None (= src_vocab_size).
        d_model, num_heads, d_ff: sizes. Defaults: 512, 8, 2048.
        num_encoder_layers, num_decoder_layers (int): depths. Default: 6 each.
        position (str): position encoding of both stacks. Default: "sinusoidal".
        max_seq_len (int): longest sequence. Default: 2048.
        share_embeddings (bool): one embedding for source and target (same vocabulary). Default: False.
        padding_idx (int | None): embedding padding index of both stacks. Default: None.
        kv_cache_max_len (int | None): the target length ``allocate_inference_cache`` allocates when none
            is given. Default: None (max_seq_len).
        **block_kwargs: further block arguments for both stacks.
    """

    def __init__(self, src_vocab_size: int | TransformerConfig, tgt_vocab_size: int | None = None,
                 d_model: int = 512, num_heads: int = 8, d_ff: int = 2048, num_encoder_layers: int = 6,
                 num_decoder_layers: int = 6, *, position: str = "sinusoidal", max_seq_len: int = 2048,
                 share_embeddings: bool = False, padding_idx: int | None = None,
                 kv_cache_max_len: int | None = None, device=None, dtype=None, **block_kwargs: Any) -> None:
        super().__init__()
        self.config = None
        if isinstance(src_vocab_size, TransformerConfig):
            self.config = src_vocab_size
            args = _from_config("TransformerEncoderDecoder", src_vocab_size, {
                "tgt_vocab_size": (tgt_vocab_size, None), "d_model": (d_model, 512), "num_heads": (num_heads, 8),
                "d_ff": (d_ff, 2048), "num_encoder_layers": (num_encoder_layers, 6),
                "num_decoder_layers": (num_decoder_layers, 6), "position": (position, "sinusoidal"),
                "max_seq_len": (max_seq_len, 2048), "padding_idx": (padding_idx, None),
                "kv_cache_max_len": (kv_cache_max_len, None)}, block_kwargs)
            src_vocab_size, d_model, num_heads, d_ff = (args[k] for k in ("vocab_size", "d_model", "num_heads", "d_ff"))
            num_encoder_layers = num_decoder_layers = args["num_layers"]
            position, max_seq_len, padding_idx = args["position"], args["max_seq_len"], args["padding_idx"]
            kv_cache_max_len, block_kwargs = args["kv_cache_max_len"], args["block_kwargs"]
        tgt_vocab_size = src_vocab_size if tgt_vocab_size is None else tgt_vocab_size
        self._init_args = {"src_vocab_size": src_vocab_size, "tgt_vocab_size": tgt_vocab_size, "d_model": d_model,
                           "num_heads": num_heads, "d_ff": d_ff, "num_encoder_layers": num_encoder_layers,
                           "num_decoder_layers": num_decoder_layers, "position": position,
                           "max_seq_len": max_seq_len, "share_embeddings": share_embeddings,
                           "padding_idx": padding_idx, "kv_cache_max_len": kv_cache_max_len,
                           "block_kwargs": dict(block_kwargs)}
        common = dict(d_model=d_model, num_heads=num_heads, d_ff=d_ff, position=position, max_seq_len=max_seq_len,
                      padding_idx=padding_idx, kv_cache_max_len=kv_cache_max_len, device=device, dtype=dtype,
                      **block_kwargs)
        self.encoder = TransformerEncoder(src_vocab_size, num_layers=num_encoder_layers, **common)
        self.decoder = TransformerDecoder(tgt_vocab_size, num_layers=num_decoder_layers, **common)
        if share_embeddings:
            if src_vocab_size != tgt_vocab_size:
                raise ValueError(f"share_embeddings needs equal vocabularies, got {src_vocab_size} and "
                                 f"{tgt_vocab_size}")
            self.decoder.embedding.weight = self.encoder.embedding.weight
            self.decoder.lm_head.weight = self.encoder.embedding.weight

    def encode(self, src: torch.Tensor, src_mask: torch.Tensor | None = None,
               score_mod: Callable | None = None) -> torch.Tensor:
        """src [B, S] -> memory [B, S, D]; ``src_mask`` [B, S] bool marks real source tokens;
        ``score_mod`` is a per-call score mod (or mask mod) of the encoder's self-attention."""
        return self.encoder(src, mask=src_mask, score_mod=score_mod)

    def decode(self, tgt: torch.Tensor, memory: torch.Tensor | None, src_mask: torch.Tensor | None = None,
               cache: TransformerCache | None = None, tgt_mask: torch.Tensor | None = None,
               score_mod: Callable | None = None) -> torch.Tensor:
        """tgt [B, T] -> logits [B, T, V] given the memory (None once a cache holds its K/V);
        ``score_mod`` is a per-call score mod (or mask mod) of the decoder's self-attention."""
        return self.decoder(tgt, memory, memory_mask=src_mask, mask=tgt_mask, cache=cache, score_mod=score_mod)

    def forward(self, src: torch.Tensor, tgt: torch.Tensor, src_mask: torch.Tensor | None = None,
                tgt_mask: torch.Tensor | None = None, return_hidden: bool = False, *,
                src_score_mod: Callable | None = None, tgt_score_mod: Callable | None = None,
                ) -> torch.Tensor | tuple[torch.Tensor, tuple[torch.Tensor, ...], tuple[torch.Tensor, ...]]:
        """Teacher-forced logits [B, T, V] of ``tgt`` given ``src``; with ``return_hidden=True``,
        ``(logits, encoder_hidden_states, decoder_hidden_states)`` (each as the stack's own
        ``return_hidden``; the encoder's last entry is the memory the decoder attends to).
        ``src_score_mod`` / ``tgt_score_mod``: per-call mods of the encoder's / decoder's self-attention."""
        if not return_hidden:
            return self.decode(tgt, self.encode(src, src_mask, src_score_mod), src_mask, tgt_mask=tgt_mask,
                               score_mod=tgt_score_mod)
        memory, encoder_hidden = self.encoder(src, mask=src_mask, return_hidden=True, score_mod=src_score_mod)
        logits, decoder_hidden = self.decoder(tgt, memory, memory_mask=src_mask, mask=tgt_mask, return_hidden=True,
                                              score_mod=tgt_score_mod)
        return logits, encoder_hidden, decoder_hidden

    def allocate_inference_cache(self, batch_size: int, max_seqlen: int | None = None,
                                 dtype: torch.dtype | None = None, *, memory_seqlen: int,
                                 **kwargs: Any) -> TransformerCache:
        """The decoder's caches for ``max_seqlen`` target tokens (default ``kv_cache_max_len``) and a
        source of ``memory_seqlen`` tokens."""
        return self.decoder.allocate_inference_cache(batch_size, max_seqlen, dtype=dtype, memory_seqlen=memory_seqlen)

    def checkpoint_config(self) -> dict[str, Any]:
        return _checkpoint_args("TransformerEncoderDecoder", self._init_args, self.config,
                                ("src_vocab_size", "tgt_vocab_size", "d_model", "num_heads", "d_ff",
                                 "num_encoder_layers", "num_decoder_layers", "position", "max_seq_len",
                                 "padding_idx", "kv_cache_max_len"))

    @classmethod
    def from_checkpoint_config(cls, config: dict[str, Any], device=None, dtype=None) -> TransformerEncoderDecoder:
        transformer_config, kwargs = _checkpoint_kwargs(config)
        if transformer_config is None:
            return cls(**kwargs, device=device, dtype=dtype)
        return cls(transformer_config, **kwargs, device=device, dtype=dtype)

    @torch.no_grad()
    def generate(self, src: torch.Tensor, bos_token_id: int, max_new_tokens: int,
                 src_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Greedy decoding with caches: returns [B, 1 + max_new_tokens] tokens starting with BOS."""
        if max_new_tokens <= 0:
            raise ValueError(f"generate: max_new_tokens={max_new_tokens} must be positive")
        memory = self.encode(src, src_mask)
        B, S = src.shape
        cache = self.allocate_inference_cache(B, max_new_tokens + 1, memory_seqlen=S)
        tokens = torch.full((B, 1), bos_token_id, dtype=torch.long, device=src.device)
        out = [tokens]
        logits = self.decode(tokens, memory, src_mask, cache=cache)
        for _ in range(max_new_tokens):
            nxt = logits[:, -1].argmax(dim=-1, keepdim=True)
            out.append(nxt)
            if len(out) > max_new_tokens:
                break
            logits = self.decode(nxt, None, src_mask, cache=cache)
        return torch.cat(out, dim=1)

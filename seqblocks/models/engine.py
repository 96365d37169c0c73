"""The causal-LM engine shared by seqblocks' language models.

``CausalLM`` owns everything a decoder-only language model does around its layers: token embedding
(with an optional additive position encoding at absolute positions), routing of the optional inputs
(``lengths``, ``integration_timesteps``, ``position_ids``, extra mixer inputs) to exactly the mixers
that declare them in ``Mixer.inputs``, the per-layer inference caches, prefill through ``forward``,
``step``, and the (tied, vocabulary-padded) LM head. Two front doors build on it:
``LRNNLMHeadModel`` (``lrnn_lm.py``: ``Block`` s over any registered mixers) and ``LanguageModel``
(``config_lm.py``: ``ConfigurableBlock`` s from ``BlockConfig`` s).

Caches: ``allocate_inference_cache`` returns an ``InferenceCaches`` (``seqblocks.cache``).
``forward(..., inference_params=caches)`` is a prefill (or a chunk of one); ``step`` feeds one token.
Both update the caches in place, so a decode step can be captured in a CUDA graph.

Context parallelism (``seqblocks.parallel.context_parallel``): ``forward`` takes this rank's time chunk
``input_ids`` [B, T_local] (tokens ``[r * T_local, (r + 1) * T_local)`` of every row) and returns the
logits of those tokens: the additive position encoding and every mixer use global positions
(``offset + arange(T_local)``), each layer exchanges what crosses the chunks (native mixers) or runs
the whole sequence (``run_mixer``'s fallback). ``lengths`` [B] then counts the whole sequence's
tokens; ``position_ids`` and other per-token inputs are this rank's chunks. Not with caches,
``num_last_tokens``, packed documents or MTP modules (``ValueError``).

Shapes: B batch, T time, D width, V vocabulary.
"""

from __future__ import annotations

import math
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from seqblocks.cache import Cache, InferenceCaches, cache_offset, host_sync_unsafe
from seqblocks.checkpoint import CheckpointMixin
from seqblocks.layers.checks import check_allocation, check_lengths, check_position_ids, check_timesteps
from seqblocks.layers.mixer import Mixer, accepted_inputs
from seqblocks.layers.moe import MoEFeedForward, moe_modules
from seqblocks.layers.packing import packed_positions, packing_offsets
from seqblocks.layers.position import LearnedPosition, PositionBase
from seqblocks.models.init import InitConfig, init_embeddings, rescale_residual_projections
from seqblocks.models.mtp import MTPModule
from seqblocks.models.mup import MupSpec, apply_mup
from seqblocks.parallel.context import ContextParallel, current_context_parallel
from seqblocks.registry import CONVERTERS

__all__ = ["CausalLMOutput", "CausalLM", "mixer_inputs"]


class CausalLMOutput(NamedTuple):
    """What a language model's ``forward`` / ``step`` return."""

    logits: torch.Tensor  # [B, T, V]
    mtp_logits: tuple[torch.Tensor, ...] | None = None  # depth k: [B, T - k, V]; None without MTP
    #: with ``return_hidden=True``: the residual stream entering each layer (the embedding output
    #: first), then the final-norm output the head reads (last); n_layers + 1 tensors [B, T, D].
    hidden_states: tuple[torch.Tensor, ...] | None = None
    #: in training, the sum of the MoE FFNs' weighted balance / z-losses of this call (``docs/moe.md``);
    #: the trainer adds it to the objective. None without MoE layers or in eval mode.
    aux_loss: torch.Tensor | None = None


def mixer_inputs(mixer: nn.Module) -> frozenset[str]:
    """The optional inputs ``mixer`` takes (``Mixer.inputs``, plus ``cu_seqlens`` for a mixer that
    declares ``lengths``: ``layers.mixer.accepted_inputs``; none for a module that is not a Mixer)."""
    return accepted_inputs(mixer) if isinstance(mixer, Mixer) else getattr(mixer, "inputs", frozenset())


class CausalLM(nn.Module, CheckpointMixin, library_name="seqblocks", tags=["seqblocks", "causal-lm"]):
    """The engine shared by seqblocks' language models (see the module docstring).

    Subclasses build ``self.layers`` and call ``_build_embedding`` / ``_build_head``; they implement
    ``mixers()`` (the mixer of each layer), ``_backbone(hidden, caches, inputs, hidden_states)`` (layers
    and final norm; it appends each layer's input and the final output to ``hidden_states`` when that
    is a list) and the checkpoint hooks.
    """

    vocab_size: int
    d_model: int
    position: PositionBase | None
    #: the logits are multiplied by this (muP: mup_base_width / d_model; ``docs/mup.md``).
    output_multiplier: float = 1.0

    def _build_embedding(self, vocab_size: int, d_model: int, pad_vocab_size_multiple: int,
                         tie_embeddings: bool, position: PositionBase | None, device=None, dtype=None) -> None:
        if not isinstance(vocab_size, int) or vocab_size <= 0:
            raise ValueError(f"vocab_size={vocab_size!r} must be a positive int")
        if not isinstance(pad_vocab_size_multiple, int) or pad_vocab_size_multiple <= 0:
            raise ValueError(f"pad_vocab_size_multiple={pad_vocab_size_multiple!r} must be a positive int")
        self.vocab_size = vocab_size
        self.d_model = d_model
        self.padded_vocab_size = math.ceil(vocab_size / pad_vocab_size_multiple) * pad_vocab_size_multiple
        self.tie_embeddings = tie_embeddings
        self.embedding = nn.Embedding(self.padded_vocab_size, d_model, device=device, dtype=dtype)
        self.position = position

    def _build_head(self, device=None, dtype=None) -> None:
        self.lm_head = nn.Linear(self.d_model, self.padded_vocab_size, bias=False, device=device, dtype=dtype)
        if self.tie_embeddings:
            self.lm_head.weight = self.embedding.weight

    def _build_mtp(self, n_predict: int, make_block: Any, eps: float, device=None, dtype=None) -> None:
        """``n_predict`` MTP modules (``seqblocks.models.mtp``), each around ``make_block()``; an empty
        ModuleList when 0. The embedding and head stay shared with the main model."""
        self.mtp = nn.ModuleList(MTPModule(self.d_model, make_block(), eps=eps, device=device, dtype=dtype)
                                 for _ in range(n_predict))

    def mixers(self) -> list[nn.Module]:
        raise NotImplementedError  # abstract: each front door knows where its mixers live

    # ---------------------------------------------------------------- other formats

    @classmethod
    def from_hf(cls, path: Any, **overrides: Any) -> CausalLM:
        """Load a local Hugging Face model folder (``seqblocks.from_hf``, which takes the same arguments:
        ``device``, ``dtype`` and config overrides). The folder must describe a model of this class
        (``LRNNLMHeadModel``: Mamba / Mamba-2 and mamba_ssm folders; ``LanguageModel``: the others).

        Raises:
            TypeError: the folder's family builds another class (the message names it).
        """
        model = CONVERTERS.get("hf").load(path, **overrides)
        if not isinstance(model, cls):
            raise TypeError(f"{cls.__name__}.from_hf: {path} holds a model that seqblocks builds as a "
                            f"{type(model).__name__}; use seqblocks.from_hf or {type(model).__name__}.from_hf")
        return model

    def save_hf(self, path: Any, **kwargs: Any) -> Any:
        """Write this model as a Hugging Face model folder (``seqblocks.save_hf``; ``family=`` picks the
        family, default read from the model). Returns the folder."""
        return CONVERTERS.get("hf").save(self, path, **kwargs)

    def _backbone(self, hidden: torch.Tensor, caches: Any, inputs: list[dict[str, Any]],
                  hidden_states: list[torch.Tensor] | None = None) -> torch.Tensor:
        raise NotImplementedError  # abstract

    def _apply_initializer(self, config: InitConfig, residual_modules: list[list[nn.Module | None]],
                           mup: MupSpec | None = None) -> None:
        """``seqblocks.models.init``'s rules: embedding init, (with ``mup``) the muP hidden-weight init,
        learning-rate tags and output multiplier, then the residual projections rescaled."""
        init_embeddings(self.embedding, self.lm_head, self.tie_embeddings, config)
        if mup is not None:
            self.output_multiplier = apply_mup(mup, config)
        rescale_residual_projections(residual_modules, self.d_model, config)

    # ---------------------------------------------------------------- routing

    def _route(self, inputs: dict[str, Any]) -> list[dict[str, Any]]:
        """Per layer, the inputs its mixer declares in ``Mixer.inputs``."""
        return [{k: v for k, v in inputs.items() if k in mixer_inputs(m)} for m in self.mixers()]

    def accepts_lengths(self) -> bool:
        """Whether every mixer can prefill a right-padded batch (it declares ``lengths``)."""
        return all("lengths" in mixer_inputs(m) or getattr(m, "is_identity", False) for m in self.mixers())

    # ---------------------------------------------------------------- forward

    def forward(self, input_ids: torch.Tensor, position_ids: torch.Tensor | None = None,
                inference_params: dict | None = None, num_last_tokens: int = 0,
                integration_timesteps: torch.Tensor | None = None, lengths: torch.Tensor | None = None,
                return_hidden: bool = False, output_hidden_states: bool | None = None,
                cu_seqlens: torch.Tensor | None = None, document_ids: torch.Tensor | None = None,
                **mixer_kwargs: Any) -> CausalLMOutput:
        """Logits for every position (or the last ``num_last_tokens``).

        Args:
            input_ids (Tensor): [B, T] int64 token ids in [0, vocab_size).
            position_ids (Tensor | None): [B, T] or [T] absolute positions, for the additive position
                encoding and the mixers that take ``position_ids``. Default: None (cache offset + 0..T-1).
            inference_params (dict | None): caches from ``allocate_inference_cache``; the call then
                prefills / continues them in place. Default: None.
            num_last_tokens (int): if > 0, only the last ``num_last_tokens`` positions. Default: 0.
            integration_timesteps (Tensor | None): [B, T] time deltas for time-varying / event mixers;
                reaches only the mixers that declare it. Default: None.
            lengths (Tensor | None): [B] valid prefix length of each right-padded row, in [0, T];
                reaches only mixers that take it. With caches, every stateful mixer must take it and
                each row's caches advance by its own length. Default: None.
            return_hidden (bool): also return ``hidden_states`` (see ``CausalLMOutput``), each cut to
                the last ``num_last_tokens`` positions like the logits. Default: False.
            output_hidden_states (bool | None): Hugging Face's spelling of ``return_hidden``; True or
                False overrides it. Default: None.
            cu_seqlens (Tensor | None): [N + 1] int32 / int64 offsets of N documents packed over the
                flattened B * T tokens (0 first, B * T last; each row start is a boundary too). Every
                mixer then sees each document alone: recurrences and convolutions restart,
                attention is block-diagonal, positions restart at 0 (``seqblocks.layers.packing``).
                Not with caches, ``lengths``, ``position_ids`` or other mixer inputs. Default: None.
            document_ids (Tensor | None): [B, T] integer document id of each token, instead of
                ``cu_seqlens``: a document starts where the id changes and at each row start.
                Default: None.
            **mixer_kwargs: further mixer inputs (``mask``, ...); each reaches the mixers that declare it.

        Returns:
            CausalLMOutput: ``logits`` [B, T or num_last_tokens, vocab_size]; with MTP modules and
            neither caches nor ``num_last_tokens``, also ``mtp_logits``: depth k's [B, T - k, vocab_size]
            (position i predicts the token k + 1 places after it); ``hidden_states`` with
            ``return_hidden`` (else None).

        Raises:
            ValueError / TypeError: malformed inputs, caches too small, or a keyword no mixer takes.
        """
        B, T = self._check_ids(input_ids)
        if not isinstance(num_last_tokens, int) or num_last_tokens < 0:
            raise ValueError(f"num_last_tokens={num_last_tokens!r} must be a non-negative int")
        owner = type(self).__name__
        cp = self._context_parallel(T, inference_params, num_last_tokens=num_last_tokens,
                                    packed=cu_seqlens is not None or document_ids is not None)
        check_lengths(owner, lengths, B, T if cp is None else T * cp.world_size)
        check_timesteps(owner, integration_timesteps, B, T)
        check_position_ids(owner, position_ids, B, T)
        if lengths is not None:
            lengths = lengths.to(device=input_ids.device, dtype=torch.long)
        if inference_params is not None:
            self._check_caches(inference_params, B, T)
            if lengths is not None and not self.accepts_lengths():
                bad = [type(m).__name__ for m in self.mixers()
                       if "lengths" not in mixer_inputs(m) and not getattr(m, "is_identity", False)]
                raise ValueError(f"a padded prefill (lengths with caches) needs mixers that take lengths; "
                                 f"{sorted(set(bad))} do not")
        extra = {k: v for k, v in mixer_kwargs.items() if v is not None}
        if extra:
            routes = self._route(extra)
            unused = sorted(set(extra) - set().union(*routes))
            if unused:
                raise TypeError(f"{owner}.forward: the inputs {unused} are declared by no mixer of this model")
        if output_hidden_states is not None:
            return_hidden = output_hidden_states
        packed = None
        if cu_seqlens is not None or document_ids is not None:
            packed = self._check_packing(B, T, cu_seqlens, document_ids, inference_params, lengths, position_ids,
                                         extra, input_ids.device)
        return self._run(input_ids, inference_params, position_ids, num_last_tokens, integration_timesteps,
                         lengths, extra, bool(return_hidden), cu_seqlens=packed)

    def _check_packing(self, B, T, cu_seqlens, document_ids, caches, lengths, position_ids, extra,
                       device) -> torch.Tensor:
        """The packed batch's offsets over its B * T tokens (``layers.packing.packing_offsets``)."""
        owner = type(self).__name__
        given = {"inference_params": caches, "lengths": lengths, "position_ids": position_ids, **extra}
        clash = sorted(k for k, v in given.items() if v is not None)
        if clash:
            raise ValueError(f"{owner}.forward: packed documents (cu_seqlens / document_ids) take no {clash}; "
                             f"positions restart per document and the rows carry no padding")
        if getattr(self, "mtp", None):
            raise ValueError(f"{owner}.forward: packed documents with multi-token prediction "
                             f"(mtp_n_predict={len(self.mtp)}) are not supported; pack without MTP")
        packed = packing_offsets(owner, B, T, cu_seqlens=cu_seqlens, document_ids=document_ids, device=device)
        unable = sorted({type(m).__name__ for m in self.mixers() if "cu_seqlens" not in mixer_inputs(m)
                         and not getattr(m, "is_identity", False)})
        if unable:
            raise TypeError(f"{owner}.forward: the mixers {unable} take neither cu_seqlens nor lengths, so they "
                            f"cannot run packed documents")
        return packed

    def step(self, input_ids: torch.Tensor, caches: dict, integration_timesteps: torch.Tensor | None = None,
             return_hidden: bool = False, **mixer_kwargs: Any) -> CausalLMOutput:
        """Feed one token per row and advance ``caches`` in place (no host synchronisation, so it can
        be captured in a CUDA graph).

        Args:
            input_ids (Tensor): [B, 1] (or [B]) token ids.
            caches (dict): from ``allocate_inference_cache``, after any prefill.
            integration_timesteps (Tensor | None): [B, 1] (or [B]) time delta of this token. Default: None.
            return_hidden (bool): also return ``hidden_states`` (as ``forward``). Default: False.

        Returns:
            CausalLMOutput: ``logits`` [B, 1, vocab_size].

        Raises:
            ValueError / TypeError: ids of the wrong shape, dtype or range, caches that are not this
                model's (``None`` included) or of another batch size. The id range is read on the host
                on CPU; on CUDA it is a device-side assert (no synchronisation); both are skipped while
                compiling or capturing.
        """
        if isinstance(input_ids, torch.Tensor) and input_ids.dim() == 1:
            input_ids = input_ids[:, None]
        if not isinstance(input_ids, torch.Tensor) or input_ids.dim() != 2 or input_ids.shape[1] != 1:
            shape = tuple(input_ids.shape) if isinstance(input_ids, torch.Tensor) else type(input_ids).__name__
            raise ValueError(f"step expects input_ids of shape [B, 1], got {shape}")
        B = self._check_ids(input_ids, sync=not input_ids.is_cuda)[0]
        self._check_cache_objects(caches, B)
        if isinstance(integration_timesteps, torch.Tensor) and integration_timesteps.dim() == 1:
            integration_timesteps = integration_timesteps[:, None]
        check_timesteps(type(self).__name__, integration_timesteps, B, 1)
        extra = {k: v for k, v in mixer_kwargs.items() if v is not None}
        return self._run(input_ids, caches, None, 0, integration_timesteps, None, extra, bool(return_hidden))

    def _run(self, input_ids, caches, position_ids, num_last_tokens, integration_timesteps, lengths, extra,
             return_hidden=False, cu_seqlens=None):
        moes = self._moe_modules()
        for moe in moes:
            moe.aux_loss = None
        hidden_states: list[torch.Tensor] | None = [] if return_hidden else None
        hidden = self._final_hidden(input_ids, caches, position_ids, integration_timesteps, lengths, extra,
                                    hidden_states, cu_seqlens=cu_seqlens)
        mtp_logits = None
        if getattr(self, "mtp", None) and caches is None and num_last_tokens == 0:
            mtp_logits = self.mtp_logits(hidden, input_ids)
        if num_last_tokens > 0:
            hidden = hidden[:, -num_last_tokens:]
            if hidden_states is not None:
                hidden_states = [h[:, -num_last_tokens:] for h in hidden_states]
        aux = [m.aux_loss for m in moes if m.aux_loss is not None]
        return CausalLMOutput(logits=self.head_logits(hidden), mtp_logits=mtp_logits,
                              hidden_states=tuple(hidden_states) if hidden_states is not None else None,
                              aux_loss=torch.stack(aux).sum() if aux else None)

    # ---------------------------------------------------------------- mixture of experts

    def _moe_modules(self) -> tuple[nn.Module, ...]:
        """The model's MoE FFNs (MTP modules included), found once and remembered."""
        found = self.__dict__.get("_moe_cache")
        if found is None:
            found = tuple(moe_modules(self))
            self.__dict__["_moe_cache"] = found
        return found

    def router_stats(self) -> dict[str, dict[str, Any]]:
        """Per MoE layer (by module name), its last call's ``load`` (assignments per expert, a list)
        and ``dropped`` (assignments over capacity, an int); empty without MoE layers."""
        stats = {}
        for name, module in self.named_modules():
            if isinstance(module, MoEFeedForward) and module.last_load is not None:
                stats[name] = {"load": module.last_load.tolist(), "dropped": int(module.last_dropped)}
        return stats

    def update_router_biases(self) -> None:
        """The auxiliary-loss-free balancing step of every MoE layer (``MoEFeedForward.update_router_bias``);
        the trainer calls it after each optimizer step. A no-op without MoE layers."""
        for moe in self._moe_modules():
            moe.update_router_bias()

    def _final_hidden(self, input_ids, caches, position_ids, integration_timesteps, lengths, extra,
                      hidden_states: list[torch.Tensor] | None = None, cu_seqlens=None) -> torch.Tensor:
        """Embedding, position encoding and backbone (final norm included): [B, T, D]; caches advance.
        With a list as ``hidden_states``, the backbone appends the residual stream entering each layer
        and then the final-norm output to it. With ``cu_seqlens`` (checked offsets over the B * T
        tokens) the backbone runs on the rows flattened into one packed row [1, B * T, D]."""
        B, T = input_ids.shape
        hidden = self.embedding(input_ids)
        if self.position is not None:
            if cu_seqlens is not None:
                positions = packed_positions(cu_seqlens, B * T).view(B, T)
            elif position_ids is None:
                cp = current_context_parallel()
                start = cache_offset(caches)[:, None] if caches is not None else 0
                if caches is None and cp is not None:
                    start = cp.offset(T)  # this rank's chunk of the sequence (context parallelism)
                positions = start + torch.arange(T, device=input_ids.device)
                positions = positions if caches is not None else positions[None]
            else:
                positions = position_ids
            hidden = self._add_position(hidden, positions)
        inputs = {"lengths": lengths, "integration_timesteps": integration_timesteps, "position_ids": position_ids,
                  **extra}
        inputs = {k: v for k, v in inputs.items() if v is not None}
        if cu_seqlens is not None:
            hidden = hidden.reshape(1, B * T, hidden.shape[-1])
            inputs = {k: v.reshape(1, B * T) for k, v in inputs.items()}  # integration_timesteps [B, T]
            inputs["cu_seqlens"] = cu_seqlens
            start = 0 if hidden_states is None else len(hidden_states)
            hidden = self._backbone(hidden, caches, self._route(inputs), hidden_states).view(B, T, -1)
            if hidden_states is not None:
                hidden_states[start:] = [h.view(B, T, -1) for h in hidden_states[start:]]
            return hidden
        hidden = self._backbone(hidden, caches, self._route(inputs), hidden_states)
        if caches is not None and isinstance(caches, InferenceCaches):
            caches.seqlen_offset.add_(lengths if lengths is not None else T)
        return hidden

    def head_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """The LM head: [B, T, D] final hidden -> [B, T, vocab_size] logits (padded rows dropped), times
        muP's ``output_multiplier``, then the final-logit soft-cap ``c * tanh(logits / c)`` (Gemma 2, in
        fp32) when the config sets one. Every path (forward, step, generate, MTP) reads logits here."""
        w = self.lm_head.weight
        hidden = hidden.to(w.dtype)
        logits = F.linear(hidden, w)
        if w.shape[0] != self.vocab_size:
            # The product runs over every padded row and the logits are a view of its first vocab_size
            # columns: slicing the weight instead would give the GEMM an output row of vocab_size
            # elements, which for an odd count puts cuBLAS on its unaligned kernels (3-4x slower for
            # the head's three GEMMs at 50,277 tokens on an H200); the padding is what keeps them aligned.
            logits = logits[..., : self.vocab_size]
        if self.output_multiplier != 1.0:
            logits = logits * self.output_multiplier
        cap = getattr(self.config, "final_logit_softcapping", None)
        if cap is not None:
            wide = logits.to(torch.promote_types(logits.dtype, torch.float32))
            logits = (cap * torch.tanh(wide / cap)).to(logits.dtype)
        return logits

    def mtp_logits(self, hidden: torch.Tensor, input_ids: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """Every MTP depth's logits over a whole sequence (no caches).

        Args:
            hidden (Tensor): [B, T, D] the main model's final hidden (``_final_hidden``).
            input_ids (Tensor): [B, T] the tokens it was computed from.

        Returns:
            tuple[Tensor, ...]: depth k's logits [B, T - k, V]; position i predicts token i + k + 1
            (empty once T - k <= 0).
        """
        T = input_ids.shape[1]
        out = []
        for k, module in enumerate(self.mtp, start=1):
            if T - k <= 0:
                out.append(hidden.new_zeros(hidden.shape[0], 0, self.vocab_size))
                continue
            hidden = module(hidden[:, :-1], self.embedding(input_ids[:, k:]))  # [B, T - k, D]
            out.append(self.head_logits(module.out_norm(hidden)))
        return tuple(out)

    def _context_parallel(self, T: int, caches: Any, *, num_last_tokens: int = 0,
                          packed: bool = False) -> ContextParallel | None:
        """The context-parallel group (more than one rank) this forward runs under, or None.

        Raises:
            ValueError: under context parallelism, caches, ``num_last_tokens``, packed documents, MTP
                modules, or a learned position table shorter than the whole sequence.
        """
        cp = current_context_parallel()
        if cp is None or cp.world_size == 1:
            return None
        owner = type(self).__name__
        mtp = getattr(self, "mtp", None) or ()
        given = {"caches (inference_params)": caches is not None, "num_last_tokens": num_last_tokens > 0,
                 "packed documents (cu_seqlens / document_ids)": packed,
                 f"MTP modules (mtp_n_predict={len(mtp)})": len(mtp) > 0}
        bad = [name for name, on in given.items() if on]
        if bad:
            raise ValueError(f"{owner}.forward under context parallelism ({cp.world_size} ranks, each with a "
                             f"time chunk) takes no {bad}; decode and sample outside context_parallel")
        if isinstance(self.position, LearnedPosition) and T * cp.world_size > self.position.max_seq_len:
            raise ValueError(f"{owner}: the whole sequence of {cp.world_size} x {T} tokens exceeds the learned "
                             f"position table (max_seq_len={self.position.max_seq_len})")
        return cp

    def _add_position(self, hidden: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        if isinstance(self.position, LearnedPosition):
            # The table lookup without LearnedPosition.embed's host-side range check, so a decode step
            # stays capturable; forward / generate check the range before calling.
            return hidden + self.position.table(positions).to(hidden.dtype)
        return self.position.embed(hidden, positions)

    # ---------------------------------------------------------------- checks

    def _check_ids(self, input_ids: torch.Tensor, sync: bool = True) -> tuple[int, int]:
        """Shape, dtype and range [0, vocab_size) of ``input_ids`` (never the padded embedding rows).
        ``sync=False`` checks the range on the device (``torch._assert_async``) instead of the host."""
        if not isinstance(input_ids, torch.Tensor) or input_ids.dim() != 2:
            shape = tuple(input_ids.shape) if isinstance(input_ids, torch.Tensor) else type(input_ids).__name__
            raise ValueError(f"input_ids must be a [B, T] tensor, got {shape}")
        if input_ids.dtype.is_floating_point or input_ids.dtype in (torch.bool, torch.complex64, torch.complex128):
            raise TypeError(f"input_ids must be an integer tensor, got {input_ids.dtype}")
        B, T = input_ids.shape
        if B == 0 or T == 0:
            raise ValueError(f"input_ids must be non-empty, got shape {(B, T)}")
        if host_sync_unsafe():
            return B, T
        if not sync:
            torch._assert_async(((input_ids >= 0) & (input_ids < self.vocab_size)).all(),
                                f"token ids must lie in [0, {self.vocab_size})")
            return B, T
        lo, hi = int(input_ids.min()), int(input_ids.max())
        if lo < 0 or hi >= self.vocab_size:
            raise ValueError(f"token ids must lie in [0, {self.vocab_size}), got values in [{lo}, {hi}]")
        return B, T

    def _check_cache_objects(self, caches: Any, B: int) -> None:
        """``caches`` must be this model's: an ``InferenceCaches`` (or a dict ``{layer: Cache}``) with one
        cache per layer, allocated for batch size ``B``. No tensor values are read."""
        n = len(self.mixers())
        if not isinstance(caches, dict):
            raise TypeError(f"caches must be the InferenceCaches from allocate_inference_cache, got "
                            f"{type(caches).__name__}")
        keys = sorted(caches, key=repr)
        if keys != sorted(range(n), key=repr):
            raise ValueError(f"caches must hold one cache per layer, keys 0..{n - 1}, got keys {keys}")
        for i, cache in caches.items():
            if not isinstance(cache, Cache):
                raise TypeError(f"caches[{i}] must be a seqblocks Cache, got {type(cache).__name__}")
        offset = cache_offset(caches)
        if offset.shape[0] != B:
            raise ValueError(f"caches were allocated for batch size {offset.shape[0]}, input has {B}")

    def _check_caches(self, caches: Any, B: int, T: int) -> None:
        self._check_cache_objects(caches, B)
        offset = cache_offset(caches)
        max_seqlen = getattr(caches, "max_seqlen", None)
        if max_seqlen is not None and int(offset.max()) + T > max_seqlen:
            raise ValueError(f"caches hold at most max_seqlen={max_seqlen} tokens; {int(offset.max())} are "
                             f"cached and {T} more were given")
        if isinstance(self.position, LearnedPosition) and int(offset.max()) + T > self.position.max_seq_len:
            raise ValueError(f"positions up to {int(offset.max()) + T - 1} exceed the learned position "
                             f"table (max_seq_len={self.position.max_seq_len})")

    # ---------------------------------------------------------------- inference

    def allocate_inference_cache(self, batch_size: int, max_seqlen: int, dtype: torch.dtype | None = None,
                                 **kwargs: Any) -> InferenceCaches:
        """Preallocated caches for ``batch_size`` sequences of up to ``max_seqlen`` tokens.

        Args:
            batch_size (int): rows.
            max_seqlen (int): the most tokens (prompt + generated) a row will hold.
            dtype (torch.dtype | None): state dtype. Default: None (the parameters' dtype).
            **kwargs: passed to each mixer's ``allocate_inference_cache``.

        Returns:
            InferenceCaches: ``{layer_idx: Cache}`` with a model-level ``seqlen_offset``.
        """
        check_allocation(type(self).__name__, batch_size, max_seqlen, dtype)
        dtype = dtype if dtype is not None else self.embedding.weight.dtype
        caches = {}
        for i, mixer in enumerate(self.mixers()):
            allocate = getattr(mixer, "allocate_inference_cache", None)
            if allocate is None:
                raise TypeError(f"layer {i}: {type(mixer).__name__} has no allocate_inference_cache; it cannot decode")
            caches[i] = allocate(batch_size, max_seqlen, dtype=dtype, **kwargs)
        offset = torch.zeros(batch_size, dtype=torch.long, device=self.embedding.weight.device)
        return InferenceCaches(caches, offset, max_seqlen)


"""Token generation for seqblocks language models, as small functions over a static cache (gpt-fast style).

- ``prefill(model, input_ids, caches, ...)``: run the prompt through ``model.forward`` with the caches,
  return the logits that predict each row's next token.
- ``decode_one_token(model, tokens, caches, ...)``: one ``model.step``; the caches advance in place.
- ``process_logits`` / ``sample``: repetition penalty, temperature, top-k, top-p, min-p, then a draw.
- ``CUDAGraphDecoder``: ``decode_one_token`` captured once in a CUDA graph and replayed;
  ``graph_decoder`` keeps one per (model, batch size, capacity, step input dtype) across ``generate``
  calls (``graph_cache_key`` says when a captured graph is still valid; ``clear_graph_cache`` frees them).
- ``count_kernels`` / ``count_aten_calls``: what one decode step launches (graph replay) or calls (eager).
- ``generate``: the loop, with stop tokens, a seed / generator, a streaming callback, batched prompts
  of different lengths and the returned scores.

Batched prompts of different lengths come right-padded with ``lengths``. When every mixer takes
``lengths``, the padded batch is prefilled in one call and each row's caches advance by its own length
(per-row ``seqlen_offset``). Otherwise the common prefix is prefilled and each row's remaining prompt
tokens are fed one per step, in lockstep with the other rows' generated tokens; both give each row
exactly what it would get alone.

Shapes: B batch, T prompt length, N new tokens, V vocabulary.
"""

from __future__ import annotations

import dataclasses
import itertools
import weakref
from collections.abc import Callable, Sequence
from typing import Any

import torch

from seqblocks.layers.checks import check_finite, check_lengths, check_positive, check_timesteps

__all__ = ["GenerationOutput", "generate", "prefill", "decode_one_token", "process_logits", "sample",
           "check_sampling_options", "CUDAGraphDecoder", "graph_decoder", "graph_cache_key", "clear_graph_cache",
           "count_kernels", "count_aten_calls"]


@dataclasses.dataclass
class GenerationOutput:
    """What ``generate`` returns.

    Attributes:
        sequences (Tensor): [B, T + N] each row's prompt then its generated tokens, right-padded with
            ``pad_token_id``.
        tokens (Tensor): [B, N] the generated tokens; ``pad_token_id`` after a row stopped.
        lengths (Tensor): [B] valid length of each row of ``sequences``.
        num_generated (Tensor): [B] tokens generated per row (a stop token included).
        scores (Tensor | None): [B, N, V] fp32 logits that each generated token was drawn from, before
            any processing (penalty, temperature, filtering); None unless ``return_scores``.
        draft_acceptance (float | None): with ``mtp_draft`` or a ``draft_model``, the fraction of draft
            tokens that the main model accepted (each row's own leading accepts); None otherwise.
    """

    sequences: torch.Tensor
    tokens: torch.Tensor
    lengths: torch.Tensor
    num_generated: torch.Tensor
    scores: torch.Tensor | None = None
    draft_acceptance: float | None = None


def process_logits(logits: torch.Tensor, *, temperature: float = 1.0, top_k: int | None = None,
                   top_p: float | None = None, min_p: float | None = None, repetition_penalty: float = 1.0,
                   seen: torch.Tensor | None = None) -> torch.Tensor:
    """Apply, in order, the repetition penalty, temperature, top-k, top-p and min-p to ``logits``.

    Args:
        logits (Tensor): [B, V].
        temperature (float): divide the logits by it; 0 means greedy (filters are then skipped, the
            argmax is unchanged by them). Default: 1.0.
        top_k (int | None): keep the k largest logits. Default: None.
        top_p (float | None): keep the smallest set of tokens whose probability reaches top_p. Default: None.
        min_p (float | None): drop tokens whose probability is below min_p times the largest. Default: None.
        repetition_penalty (float): CTRL's penalty on tokens in ``seen``: positive logits divided by it,
            negative ones multiplied. Default: 1.0 (off).
        seen (Tensor | None): [B, V] bool, tokens already in each row's context. Default: None.

    Returns:
        Tensor: [B, V] fp32 logits, removed tokens at -inf.
    """
    logits = logits.float()
    if repetition_penalty != 1.0 and seen is not None:
        penalized = torch.where(logits > 0, logits / repetition_penalty, logits * repetition_penalty)
        logits = torch.where(seen, penalized, logits)
    if temperature == 0:
        return logits
    logits = logits / temperature
    vocab = logits.shape[-1]
    if top_k is not None and top_k < vocab:
        kth = torch.topk(logits, top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and top_p < 1.0:
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        probs = sorted_logits.softmax(dim=-1)
        mass_before = probs.cumsum(dim=-1) - probs
        remove = mass_before >= top_p
        remove[..., 0] = False  # the most likely token always stays
        logits = torch.empty_like(logits).scatter_(-1, order, sorted_logits.masked_fill(remove, float("-inf")))
    if min_p is not None and min_p > 0:
        probs = logits.softmax(dim=-1)
        logits = logits.masked_fill(probs < min_p * probs.amax(dim=-1, keepdim=True), float("-inf"))
    return logits


def sample(logits: torch.Tensor, *, temperature: float = 1.0, generator: torch.Generator | None = None) -> torch.Tensor:
    """Draw one token per row from processed ``logits`` [B, V] -> [B] int64 (argmax when temperature is 0).

    The draw is ``argmax(p / E)`` with E ~ Exp(1) i.i.d., which picks token i with probability p_i
    (the race of exponential clocks) without a host synchronisation.
    """
    if temperature == 0:
        return logits.argmax(dim=-1)
    probs = logits.softmax(dim=-1)
    race = torch.empty_like(probs).exponential_(1, generator=generator)
    return (probs / race).argmax(dim=-1)


def prefill(model: Any, input_ids: torch.Tensor, caches: dict, *, lengths: torch.Tensor | None = None,
            integration_timesteps: torch.Tensor | None = None) -> torch.Tensor:
    """Run the prompt [B, T] through ``model.forward`` with ``caches``; return [B, V], the logits at each
    row's last valid position (``lengths - 1``, or T - 1)."""
    if lengths is None:
        out = model(input_ids, inference_params=caches, num_last_tokens=1,
                    integration_timesteps=integration_timesteps)
        return out.logits[:, -1]
    logits = model(input_ids, inference_params=caches, lengths=lengths,
                   integration_timesteps=integration_timesteps).logits
    return logits[torch.arange(logits.shape[0], device=logits.device), lengths - 1]


def decode_one_token(model: Any, tokens: torch.Tensor, caches: dict,
                     integration_timesteps: torch.Tensor | None = None) -> torch.Tensor:
    """Feed ``tokens`` [B, 1] and return the next-token logits [B, V]; ``caches`` advance in place."""
    return model.step(tokens, caches, integration_timesteps=integration_timesteps).logits[:, -1]


class CUDAGraphDecoder:
    """``decode_one_token`` captured in a CUDA graph over fixed input / cache / output buffers.

    Capture runs two warm-up steps and the captured step on the given caches, then restores every
    cache tensor, so build the decoder on freshly allocated caches before the prefill. Replays read
    the caches the prefill wrote in place.

    Args:
        model: a seqblocks language model on a CUDA device.
        caches (InferenceCaches): from ``model.allocate_inference_cache``.
        timestep_dtype (torch.dtype | None): dtype of a per-step ``integration_timesteps`` input;
            None captures a step without one. Default: None.

    Raises:
        ValueError: the caches are not on a CUDA device.
        RuntimeError: the step could not be captured (e.g. a mixer synchronises with the host in its
            step); the message carries the cause.
    """

    def __init__(self, model: Any, caches: Any, timestep_dtype: torch.dtype | None = None) -> None:
        self.caches = caches
        device = caches.seqlen_offset.device
        if device.type != "cuda":
            raise ValueError(f"cuda_graph=True needs the model and caches on a CUDA device, not {device}")
        batch = caches.batch_size
        self.tokens = torch.zeros(batch, 1, dtype=torch.long, device=device)
        self.timesteps = (None if timestep_dtype is None
                          else torch.ones(batch, 1, dtype=timestep_dtype, device=device))
        saved = [t.clone() for t in caches.tensors()]
        stream = torch.cuda.Stream(device)
        stream.wait_stream(torch.cuda.current_stream(device))
        try:
            # Decoding never records autograd; capturing without it also lets mixers use their
            # inference-only paths (e.g. S4's memoised discretisation) whatever the caller's grad mode.
            with torch.no_grad():
                with torch.cuda.stream(stream):
                    for _ in range(2):
                        decode_one_token(model, self.tokens, caches, self.timesteps)
                torch.cuda.current_stream(device).wait_stream(stream)
                self.graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(self.graph):
                    self.logits = decode_one_token(model, self.tokens, caches, self.timesteps)
        except RuntimeError as err:
            _release_rng_from_capture(device)
            raise RuntimeError(f"could not capture the decode step in a CUDA graph: {err}") from err
        finally:
            for t, s in zip(caches.tensors(), saved):
                t.copy_(s)

    def __call__(self, tokens: torch.Tensor, integration_timesteps: torch.Tensor | None = None) -> torch.Tensor:
        """Replay on ``tokens`` [B, 1]; returns the logits buffer [B, V] (overwritten by the next replay)."""
        self.tokens.copy_(tokens)
        if self.timesteps is not None:
            self.timesteps.copy_(integration_timesteps)
        self.graph.replay()
        return self.logits


# model -> {(batch, capacity, step input dtype, device): (parameter fingerprint, decoder)}. Weak in the
# model: a collected model takes its graphs (and their memory pools and caches) with it.
_GRAPHS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def graph_cache_key(model: Any, batch_size: int, max_seqlen: int, device: torch.device,
                    timestep_dtype: torch.dtype | None = None) -> tuple[tuple, tuple]:
    """(shape key, parameter fingerprint) that a captured decode step is valid for.

    A graph replays fixed device addresses, so it stays valid while every parameter and buffer is the
    same tensor storage, dtype and shape, unchanged in place (the version counter: values cached
    outside the graph during capture, such as a memoised discretisation, would otherwise go stale),
    and the model is in the same train / eval mode. Replacing, moving or casting a parameter, or an
    optimizer step, changes the fingerprint and the next ``graph_decoder`` call captures afresh.
    """
    fingerprint = tuple(
        (name, t.data_ptr(), t.dtype, t.device, tuple(t.shape), t._version)
        for name, t in itertools.chain(model.named_parameters(), model.named_buffers()))
    return (batch_size, max_seqlen, timestep_dtype, torch.device(device)), (bool(model.training), fingerprint)


def graph_decoder(model: Any, batch_size: int, max_seqlen: int, device: torch.device,
                  timestep_dtype: torch.dtype | None = None) -> CUDAGraphDecoder:
    """A ``CUDAGraphDecoder`` for ``model`` at this batch size and capacity, reused while valid.

    A valid cached decoder has its caches reset (``InferenceCaches.reset``) and is returned; otherwise
    the step is captured on fresh caches, and decoders of ``model`` whose parameters changed since
    their capture are dropped (they can never be valid again). ``decoder.caches`` are the caches to
    prefill. Sampling runs outside the graph, so its options may change freely between calls. The
    decoder and its caches are shared by every call with the same key, so two ``generate`` calls on
    one model must not run at the same time (e.g. from two threads); ``clear_graph_cache`` frees them.

    Raises:
        ValueError / RuntimeError: as ``CUDAGraphDecoder``.
    """
    device = torch.device(device)
    if device.type != "cuda":
        raise ValueError(f"cuda_graph=True needs the model and caches on a CUDA device, not {device}")
    shape_key, fingerprint = graph_cache_key(model, batch_size, max_seqlen, device, timestep_dtype)
    per_model = _GRAPHS.setdefault(model, {})
    hit = per_model.get(shape_key)
    if hit is not None and hit[0] == fingerprint:
        hit[1].caches.reset()
        return hit[1]
    for key in [k for k, (fp, _) in per_model.items() if fp != fingerprint]:
        del per_model[key]
    decoder = CUDAGraphDecoder(model, model.allocate_inference_cache(batch_size, max_seqlen), timestep_dtype)
    per_model[shape_key] = (fingerprint, decoder)
    return decoder


def clear_graph_cache(model: Any = None) -> None:
    """Drop the cached decoders of ``model`` (of every model when None), freeing their graphs and caches."""
    if model is None:
        _GRAPHS.clear()
    else:
        _GRAPHS.pop(model, None)


def count_kernels(fn: Callable[[], Any]) -> int:
    """Device kernels launched by one call of ``fn`` (e.g. a ``CUDAGraphDecoder`` replay), counted with
    ``torch.profiler``; memory copies and sets are not kernels and are not counted."""
    from torch.profiler import ProfilerActivity, profile

    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    kinds = {torch.autograd.DeviceType.CUDA}
    return sum(1 for e in prof.events() if e.device_type in kinds and not e.name.lower().startswith(
        ("memcpy", "memset")))


def count_aten_calls(fn: Callable[[], Any]) -> tuple[int, int]:
    """(top-level, all) ATen operator calls made by one call of ``fn``, counted with ``torch.profiler``
    on the host; top-level calls are those not made from inside another ATen call."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        fn()
    aten = [e for e in prof.events() if e.name.startswith("aten::")]

    def nested(e) -> bool:
        parent = e.cpu_parent
        while parent is not None:
            if parent.name.startswith("aten::"):
                return True
            parent = parent.cpu_parent
        return False

    return sum(1 for e in aten if not nested(e)), len(aten)


def _release_rng_from_capture(device: torch.device) -> None:
    """After a capture that failed midway, the device's default generator is left in capture mode and
    every later random op on the device raises; give it a fresh copy of its state (same seed and
    offset) so eager work, such as decoding without a graph, can go on."""
    index = device.index if device.index is not None else torch.cuda.current_device()
    generator = torch.cuda.default_generators[index]
    try:
        generator.graphsafe_set_state(generator.clone_state())
    except RuntimeError:  # nothing more can be done; the capture error is what the caller sees
        pass


def check_sampling_options(*, temperature: float = 1.0, top_k: int | None = None, top_p: float | None = None,
                           min_p: float | None = None, repetition_penalty: float = 1.0) -> None:
    """Raise ``ValueError`` / ``TypeError`` naming the first sampling option of the wrong kind, not finite
    or out of range (``generate`` calls it first; a caller that prints before generating can call it
    earlier). NaN or inf never reach the sampler (a NaN temperature would draw token 0 forever)."""
    owner = "generate"
    check_finite(owner, temperature=temperature)
    if not temperature >= 0:
        raise ValueError(f"temperature={temperature} must be >= 0 (0 is greedy)")
    if top_k is not None:
        if isinstance(top_k, bool) or not isinstance(top_k, int):
            raise TypeError(f"top_k={top_k!r} must be a positive int or None")
        if top_k < 1:
            raise ValueError(f"top_k={top_k!r} must be a positive int or None")
    if top_p is not None:
        check_finite(owner, top_p=top_p)
        if not 0 < top_p <= 1:
            raise ValueError(f"top_p={top_p!r} must lie in (0, 1]")
    if min_p is not None:
        check_finite(owner, min_p=min_p)
        if not 0 <= min_p <= 1:
            raise ValueError(f"min_p={min_p!r} must lie in [0, 1]")
    check_finite(owner, repetition_penalty=repetition_penalty)
    if not repetition_penalty > 0:
        raise ValueError(f"repetition_penalty={repetition_penalty!r} must be > 0")


def _check_generate_args(input_ids: Any, max_new_tokens: Any, temperature: Any, top_k: Any, top_p: Any, min_p: Any,
                         repetition_penalty: Any, pad_token_id: Any, seed: Any, generator: Any, callback: Any,
                         max_seqlen: Any) -> None:
    """``generate``'s parameters: each of the right kind, finite and in its range (``ValueError`` /
    ``TypeError`` naming it). NaN or inf never reach the sampler (a NaN temperature would draw token 0
    forever)."""
    owner = "generate"
    check_positive(owner, max_new_tokens=max_new_tokens)
    if not isinstance(input_ids, torch.Tensor) or input_ids.dim() != 2 or input_ids.numel() == 0:
        raise ValueError(f"input_ids must be a non-empty [B, T] tensor, got {getattr(input_ids, 'shape', input_ids)}")
    if input_ids.dtype.is_floating_point or input_ids.dtype.is_complex or input_ids.dtype == torch.bool:
        raise TypeError(f"input_ids must be an integer tensor, got {input_ids.dtype}")
    check_sampling_options(temperature=temperature, top_k=top_k, top_p=top_p, min_p=min_p,
                           repetition_penalty=repetition_penalty)
    if isinstance(pad_token_id, bool) or not isinstance(pad_token_id, int) or pad_token_id < 0:
        raise ValueError(f"pad_token_id={pad_token_id!r} must be an int >= 0")
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int)):
        raise TypeError(f"seed must be an int or None, got {type(seed).__name__} {seed!r}")
    if generator is not None and not isinstance(generator, torch.Generator):
        raise TypeError(f"generator must be a torch.Generator or None, got {type(generator).__name__}")
    if callback is not None and not callable(callback):
        raise TypeError(f"callback must be callable or None, got {type(callback).__name__}")
    if max_seqlen is not None:
        check_positive(owner, max_seqlen=max_seqlen)


def _stop_sequences(stop_sequences: Sequence[Sequence[int]] | None, vocab: int, device) -> list[torch.Tensor]:
    if stop_sequences is None:
        return []
    if isinstance(stop_sequences, torch.Tensor | str) or not isinstance(stop_sequences, Sequence):
        raise TypeError(f"stop_sequences must be a list of token-id lists, got {stop_sequences!r}")
    out = []
    for seq in stop_sequences:
        ids = seq.tolist() if isinstance(seq, torch.Tensor) else seq
        if isinstance(ids, int) or not isinstance(ids, Sequence) or not ids or any(
                isinstance(i, bool) or not isinstance(i, int) or not 0 <= i < vocab for i in ids):
            raise ValueError(f"each stop sequence must be a non-empty list of token ids in [0, {vocab}), "
                             f"got {seq!r}")
        out.append(torch.tensor(list(ids), dtype=torch.long, device=device))
    return out


def _stop_ids(stop_tokens: int | Sequence[int] | None, vocab: int, device) -> torch.Tensor | None:
    if stop_tokens is None:
        return None
    if not isinstance(stop_tokens, int | list | tuple | set | frozenset | range):
        raise TypeError(f"stop_tokens must be a token id or a sequence of them, got {type(stop_tokens).__name__}")
    ids = [stop_tokens] if isinstance(stop_tokens, int) else list(stop_tokens)
    if not ids or any(isinstance(i, bool) or not isinstance(i, int) or not 0 <= i < vocab for i in ids):
        raise ValueError(f"stop_tokens must be token ids in [0, {vocab}), got {stop_tokens!r}")
    return torch.tensor(ids, dtype=torch.long, device=device)


@torch.no_grad()
def generate(
    model: Any,
    input_ids: torch.Tensor,
    max_new_tokens: int = 20,
    *,
    lengths: torch.Tensor | None = None,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    min_p: float | None = None,
    repetition_penalty: float = 1.0,
    stop_tokens: int | Sequence[int] | None = None,
    stop_sequences: Sequence[Sequence[int]] | None = None,
    pad_token_id: int = 0,
    seed: int | None = None,
    generator: torch.Generator | None = None,
    callback: Callable[[torch.Tensor, torch.Tensor], None] | None = None,
    return_scores: bool = False,
    cuda_graph: bool = False,
    integration_timesteps: torch.Tensor | None = None,
    max_seqlen: int | None = None,
    mtp_draft: bool = False,
    draft_model: Any = None,
    num_draft_tokens: int = 4,
) -> GenerationOutput:
    """Generate up to ``max_new_tokens`` tokens after each prompt.

    Args:
        model: a seqblocks language model (``LRNNLMHeadModel``, ``LanguageModel``, or anything with
            their ``forward`` / ``step`` / ``allocate_inference_cache`` / ``vocab_size``).
        input_ids (Tensor): [B, T] prompts, right-padded when their lengths differ.
        max_new_tokens (int): tokens to generate per row. Default: 20.
        lengths (Tensor | None): [B] prompt lengths in [1, T]. Default: None (all T).
        temperature (float): sampling temperature; 0 is greedy decoding. Default: 1.0.
        top_k (int | None): sample among the k most likely tokens (1 is greedy). Default: None.
        top_p (float | None): nucleus sampling mass in (0, 1]. Default: None.
        min_p (float | None): drop tokens below min_p times the top probability, in [0, 1]. Default: None.
        repetition_penalty (float): > 0; penalise tokens already in the row (prompt or generated).
            Default: 1.0 (off).
        stop_tokens (int | Sequence[int] | None): a row stops after generating one of these (it is
            kept in the output); generation ends when every row has stopped. Default: None.
        stop_sequences (Sequence[Sequence[int]] | None): a row also stops once its generated tokens end
            with one of these token sequences (a multi-character stop string, encoded), which is kept
            in the output. Only generated tokens count, not the prompt. Default: None.
        pad_token_id (int): filler after a row's end in ``sequences`` / ``tokens``. Default: 0.
        seed (int | None): seed of a fresh generator for the draws. Default: None (torch's global RNG).
        generator (torch.Generator | None): the generator for the draws (on the model's device);
            overrides ``seed``. Default: None.
        callback (Callable | None): called after every decoding step as ``callback(tokens, active)``
            with tokens [B] (the token each row just generated) and active [B] bool (which rows did
            generate one). Default: None.
        return_scores (bool): return the raw logits of every generated token. Default: False.
        cuda_graph (bool): replay the decode step from a CUDA graph (CUDA only); same tokens as eager
            decoding. The graph (and its caches) is kept for later calls with the same model, batch
            size, ``max_seqlen`` and step inputs until the model's parameters change
            (``graph_decoder``; ``clear_graph_cache`` frees it). Default: False.
        integration_timesteps (Tensor | None): [B, C] time delta of each position, for event /
            time-varying mixers. C >= T + max_new_tokens - 1 covers prompts and generated tokens;
            C == T covers the prompts only, and generated tokens then get the mixers' default.
            Default: None.
        max_seqlen (int | None): cache capacity. Default: None (T + max_new_tokens).
        mtp_draft (bool): speculative self-drafting: the model's MTP modules draft up to
            ``mtp_n_predict`` tokens, the main model verifies them in one call, and the standard
            acceptance rule keeps the output distributed exactly as plain decoding's (greedy: the same
            tokens). Needs equal-length prompts; not with ``cuda_graph``, ``repetition_penalty``,
            ``integration_timesteps`` or ``stop_sequences``. ``draft_acceptance`` reports the rate.
            Default: False.
        draft_model: speculative decoding with a small draft model (any seqblocks language model with
            the same vocabulary, its own caches): it proposes ``num_draft_tokens`` tokens with the same
            sampling options, the model verifies them in one call, and the acceptance rule keeps the
            output distributed exactly as plain decoding's (greedy: the same tokens). Same restrictions
            as ``mtp_draft``; not both. Default: None.
        num_draft_tokens (int): tokens the draft model proposes per round. Default: 4.

    Returns:
        GenerationOutput

    Raises:
        ValueError / TypeError: invalid arguments (the message names them).
    """
    _check_generate_args(input_ids, max_new_tokens, temperature, top_k, top_p, min_p, repetition_penalty,
                         pad_token_id, seed, generator, callback, max_seqlen)
    B, T = input_ids.shape
    N = max_new_tokens
    V = model.vocab_size
    device = input_ids.device
    if lengths is None:
        lengths = torch.full((B,), T, dtype=torch.long, device=device)
    else:
        check_lengths("generate", lengths, B, T)
    lengths = lengths.to(device=device, dtype=torch.long)
    min_len, max_len = int(lengths.min()), int(lengths.max())
    if min_len < 1 or max_len > T:
        raise ValueError(f"lengths must lie in [1, {T}], got {lengths.tolist()}")
    uniform = min_len == T
    padded = not uniform and model.accepts_lengths()
    needed = T + N - 1 if uniform or padded else max_len + N - 1
    max_seqlen = max_seqlen if max_seqlen is not None else T + N
    if max_seqlen < needed:
        raise ValueError(f"max_seqlen={max_seqlen} is too small: generation needs {needed} cached tokens")
    position = getattr(model, "position", None)
    if position is not None and getattr(position, "max_seq_len", None) is not None and needed > position.max_seq_len:
        raise ValueError(f"prompt + new tokens ({needed}) exceed the learned positions ({position.max_seq_len})")
    stop_ids = _stop_ids(stop_tokens, V, device)
    stop_seqs = _stop_sequences(stop_sequences, V, device)
    stopping = stop_ids is not None or bool(stop_seqs)
    if generator is None and seed is not None:
        generator = torch.Generator(device=device).manual_seed(seed)

    if not isinstance(mtp_draft, bool):
        raise TypeError(f"mtp_draft must be a bool, got {type(mtp_draft).__name__} {mtp_draft!r}")
    if mtp_draft or draft_model is not None:
        options = {"temperature": temperature, "top_k": top_k, "top_p": top_p, "min_p": min_p}
        _check_speculative(lengths, T, cuda_graph, repetition_penalty, integration_timesteps, stop_sequences,
                           "mtp_draft=True" if mtp_draft else "draft_model")
        if mtp_draft and draft_model is not None:
            raise ValueError("give mtp_draft=True or a draft_model, not both")
        if mtp_draft:
            K = _check_mtp_draft(model)
            drafter = _MTPDrafter(model, input_ids, options, generator)
        else:
            K = _check_draft_model(model, draft_model, num_draft_tokens)
            drafter = _ModelDrafter(draft_model, input_ids, max_seqlen, options, generator)
        return _speculative_generate(model, input_ids, N, K, model.allocate_inference_cache(B, max_seqlen), options,
                                     stop_ids, pad_token_id, generator, callback, return_scores, drafter)

    ts_decode = False
    if integration_timesteps is not None:
        if not isinstance(integration_timesteps, torch.Tensor) or integration_timesteps.dim() != 2:
            raise TypeError(f"generate: integration_timesteps must be a floating-point [B, C] tensor, got "
                            f"{getattr(integration_timesteps, 'shape', type(integration_timesteps).__name__)}")
        check_timesteps("generate", integration_timesteps, B, integration_timesteps.shape[1])
        C = integration_timesteps.shape[-1]
        if integration_timesteps.shape[0] != B:
            raise ValueError(f"integration_timesteps must be [B, C] with B={B}, "
                             f"got {tuple(integration_timesteps.shape)}")
        if C >= needed:
            ts_decode = True
        elif C != T or not (uniform or padded):
            raise ValueError(f"integration_timesteps has {C} columns; give {T} (prompts only, equal-length or "
                             f"padded prefill) or at least {needed} (prompts and generated tokens)")

    decoder = None
    if cuda_graph:
        decoder = graph_decoder(model, B, max_seqlen, device, integration_timesteps.dtype if ts_decode else None)
        caches = decoder.caches
    else:
        caches = model.allocate_inference_cache(B, max_seqlen)

    ts = integration_timesteps
    if uniform or padded:
        logits = prefill(model, input_ids, caches, lengths=None if uniform else lengths,
                         integration_timesteps=None if ts is None else ts[:, :T])
        fed = lengths.clone()
    else:
        logits = prefill(model, input_ids[:, :min_len], caches,
                         integration_timesteps=None if ts is None else ts[:, :min_len])
        fed = torch.full((B,), min_len, dtype=torch.long, device=device)

    rows = torch.arange(B, device=device)
    valid = torch.arange(T, device=device)[None] < lengths[:, None]
    seen = None
    if repetition_penalty != 1.0:
        seen = torch.zeros(B, V + 1, dtype=torch.bool, device=device)
        seen[rows[:, None].expand(B, T), torch.where(valid, input_ids, V)] = True
        seen = seen[:, :V].contiguous()
    tokens = torch.full((B, N), pad_token_id, dtype=torch.long, device=device)
    scores = torch.zeros(B, N, V, dtype=torch.float32, device=device) if return_scores else None
    n_gen = torch.zeros(B, dtype=torch.long, device=device)
    finished = torch.zeros(B, dtype=torch.bool, device=device)

    iterations = int((lengths - fed).max()) + N
    # Prefilled prompts without stop conditions: every row draws one token per iteration, so the
    # bookkeeping below reduces to writing column ``it`` (a handful of launches per token).
    simple = (uniform or padded) and not stopping
    everyone = torch.ones(B, dtype=torch.bool, device=device) if simple else None
    for it in range(iterations):
        if simple:
            processed = process_logits(logits, temperature=temperature, top_k=top_k, top_p=top_p, min_p=min_p,
                                       repetition_penalty=repetition_penalty, seen=seen)
            drawn = sample(processed, temperature=temperature, generator=generator)
            tokens[:, it] = drawn
            if scores is not None:
                scores[:, it] = logits
            if seen is not None:
                seen[rows, drawn] = True
            if callback is not None:
                callback(drawn, everyone)
            if it == iterations - 1:
                break
            step_ts = ts.gather(1, fed[:, None]) if ts_decode else None
            if decoder is not None:
                logits = decoder(drawn[:, None], step_ts)
            else:
                logits = decode_one_token(model, drawn[:, None], caches, step_ts)
            if ts_decode:
                fed += 1
            continue
        in_prompt = fed < lengths
        active = ~in_prompt & ~finished & (n_gen < N)
        processed = process_logits(logits, temperature=temperature, top_k=top_k, top_p=top_p, min_p=min_p,
                                   repetition_penalty=repetition_penalty, seen=seen)
        drawn = sample(processed, temperature=temperature, generator=generator)
        slot = n_gen.clamp(max=N - 1)
        tokens[rows, slot] = torch.where(active, drawn, tokens[rows, slot])
        if scores is not None:
            scores[rows, slot] = torch.where(active[:, None], logits.float(), scores[rows, slot])
        if seen is not None:
            seen[rows, drawn] |= active
        if stop_ids is not None:
            finished |= active & torch.isin(drawn, stop_ids)
        n_gen += active.long()
        for seq in stop_seqs:
            # The last len(seq) generated tokens of each row (rows with fewer cannot match).
            L = seq.shape[0]
            idx = (n_gen[:, None] - L + torch.arange(L, device=device)).clamp(0, N - 1)
            ends = (tokens.gather(1, idx) == seq).all(dim=1) & (n_gen >= L)
            finished |= active & ends
        if callback is not None:
            callback(torch.where(active, drawn, torch.full_like(drawn, pad_token_id)), active)
        if it == iterations - 1:
            break
        if stopping and not bool((in_prompt | (~finished & (n_gen < N))).any()):
            break
        prompt_next = input_ids.gather(1, fed.clamp(max=T - 1)[:, None])[:, 0]
        next_tokens = torch.where(in_prompt, prompt_next, torch.where(active, drawn, torch.zeros_like(drawn)))
        step_ts = None
        if ts_decode:
            step_ts = ts.gather(1, fed[:, None])
        if decoder is not None:
            logits = decoder(next_tokens[:, None], step_ts)
        else:
            logits = decode_one_token(model, next_tokens[:, None], caches, step_ts)
        fed += 1

    if simple:
        n_gen.fill_(N)
    sequences = torch.full((B, T + N), pad_token_id, dtype=torch.long, device=device)
    sequences[:, :T] = torch.where(valid, input_ids, torch.full_like(input_ids, pad_token_id))
    offsets = torch.arange(N, device=device)[None]
    generated = torch.where(offsets < n_gen[:, None], tokens, torch.full_like(tokens, pad_token_id))
    sequences.scatter_(1, lengths[:, None] + offsets, generated)
    return GenerationOutput(sequences=sequences, tokens=generated, lengths=lengths + n_gen, num_generated=n_gen,
                            scores=scores)


# ---------------------------------------------------------------- speculative self-drafting with MTP

class _MTPDrafter:
    """Drafts from the model's own MTP modules (``generate(..., mtp_draft=True)``).

    Depth d at position j reads depth d - 1's hidden at j and the token d places ahead of j, so the
    depth-1 token stream is the fed tokens shifted by one with the newest (sampled, not yet fed) token
    appended, and each further depth shifts once more and appends the previous depth's draft. The
    modules run over the whole sequence without caches (drafts only have to be proposals; the main
    model verifies)."""

    def __init__(self, model: Any, input_ids: torch.Tensor, options: dict[str, Any],
                 generator: torch.Generator | None) -> None:
        self.model, self.options, self.generator = model, options, generator
        self.fed = input_ids
        self.hidden = None  # [B, n, D] the main model's final hidden at the fed positions

    def start(self, hidden: torch.Tensor) -> None:
        self.hidden = hidden

    def draft(self, newest: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(drafts [B, k] int64, the processed fp32 logits each was drawn from [B, k, V])."""
        model, hidden = self.model, self.hidden
        stream = torch.cat([self.fed[:, 1:], newest[:, None]], dim=1)  # [B, n]
        drafts, draft_logits = [], []
        for module in model.mtp[:k]:
            hidden = module(hidden, model.embedding(stream))
            logits = model.head_logits(module.out_norm(hidden[:, -1:]))[:, 0]
            processed = process_logits(logits, **self.options)
            token = sample(processed, temperature=self.options["temperature"], generator=self.generator)
            drafts.append(token)
            draft_logits.append(processed)
            stream = torch.cat([stream[:, 1:], token[:, None]], dim=1)
        B = self.fed.shape[0]
        if not drafts:
            return self.fed.new_zeros(B, 0), self.hidden.new_zeros(B, 0, model.vocab_size, dtype=torch.float32)
        return torch.stack(drafts, dim=1), torch.stack(draft_logits, dim=1)

    def commit(self, kept: torch.Tensor, kept_hidden: torch.Tensor, drafted: int) -> None:
        """The round fed ``kept`` [B, j + 1] to the main model, which gave ``kept_hidden``."""
        self.hidden = torch.cat([self.hidden, kept_hidden], dim=1)
        self.fed = torch.cat([self.fed, kept], dim=1)


class _ModelDrafter:
    """Drafts from a separate (small) language model with caches of its own.

    Each round the draft model is fed the newest token and then each draft but the last, sampling the
    next draft from its processed logits; its caches are snapshotted first and, when the main model
    rejects a draft, restored and fed the kept tokens again, which is right for every mixer."""

    def __init__(self, model: Any, input_ids: torch.Tensor, max_seqlen: int, options: dict[str, Any],
                 generator: torch.Generator | None) -> None:
        self.model, self.options, self.generator = model, options, generator
        self.caches = model.allocate_inference_cache(input_ids.shape[0], max_seqlen)
        self.saved: list[torch.Tensor] | None = None
        model(input_ids, inference_params=self.caches, num_last_tokens=1)  # the prompt, as the main model saw it

    def start(self, hidden: torch.Tensor) -> None:
        pass

    def draft(self, newest: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        B = newest.shape[0]
        if k == 0:
            self.saved = None
            return newest.new_zeros(B, 0), torch.zeros(B, 0, self.model.vocab_size, device=newest.device)
        self.saved = [t.clone() for t in self.caches.tensors()]
        drafts, draft_logits, token = [], [], newest
        for _ in range(k):
            logits = self.model.step(token[:, None], self.caches).logits[:, -1]
            processed = process_logits(logits, **self.options)
            token = sample(processed, temperature=self.options["temperature"], generator=self.generator)
            drafts.append(token)
            draft_logits.append(processed)
        return torch.stack(drafts, dim=1), torch.stack(draft_logits, dim=1)

    def commit(self, kept: torch.Tensor, kept_hidden: torch.Tensor, drafted: int) -> None:
        """The draft model has been fed the newest token and ``drafted - 1`` drafts; bring it to ``kept``."""
        if drafted > 0 and kept.shape[1] == drafted + 1:  # every draft accepted: feed the last one
            self.model.step(kept[:, -1:], self.caches)
            return
        if drafted > 0 and kept.shape[1] == drafted:  # all but the last: exactly what it was fed
            return
        if self.saved is not None:
            for t, s in zip(self.caches.tensors(), self.saved):
                t.copy_(s)
        self.model(kept, inference_params=self.caches, num_last_tokens=1)


def _verify(target: torch.Tensor, drafts: torch.Tensor, draft_logits: torch.Tensor, temperature: float,
            generator: torch.Generator | None) -> tuple[torch.Tensor, torch.Tensor]:
    """The standard speculative acceptance rule (Leviathan et al. 2023; Chen et al. 2023).

    Draft i (drawn from q_i) is accepted with probability min(1, p_i(d) / q_i(d)); greedy decoding
    accepts it when it is the target's argmax. Per row: the number of leading accepted drafts j, and
    the token that follows them: at a rejection, a draw from norm(max(0, p_j - q_j)) (greedy: the
    argmax of p_j); after all k accepted, a draw from p_k. Either way each emitted token is distributed
    exactly as the target's next token.

    Args:
        target (Tensor): [B, k + 1, V] processed target logits at the newest token and each draft.
        drafts (Tensor): [B, k].
        draft_logits (Tensor): [B, k, V] processed draft logits.

    Returns:
        (accepted [B, k] bool (leading accepts only), follow [B, k + 1]: the token emitted after j
        accepted drafts, for every j).
    """
    B, k = drafts.shape
    if temperature == 0:
        best = target.argmax(dim=-1)  # [B, k + 1]
        accept = drafts == best[:, :k]
        return accept.long().cumprod(dim=1).bool(), best
    p = target.softmax(dim=-1)  # [B, k + 1, V]
    q = draft_logits.softmax(dim=-1)  # [B, k, V]
    p_d = p[:, :k].gather(-1, drafts[..., None])[..., 0]
    q_d = q.gather(-1, drafts[..., None])[..., 0]
    u = torch.rand(B, k, device=target.device, generator=generator)
    accept = (u * q_d <= p_d).long().cumprod(dim=1).bool()
    residual = (p[:, :k] - q).clamp(min=0)
    residual = torch.where(residual.sum(-1, keepdim=True) > 0, residual, p[:, :k])
    follow = torch.cat([residual, p[:, k:]], dim=1)  # [B, k + 1, V]
    drawn = sample(follow.log().flatten(0, 1), temperature=1.0, generator=generator).view(B, k + 1)
    return accept, drawn


def _check_speculative(lengths: torch.Tensor, T: int, cuda_graph: bool, repetition_penalty: float,
                       integration_timesteps: Any, stop_sequences: Any, what: str) -> None:
    unsupported = {"cuda_graph": cuda_graph, "repetition_penalty != 1": repetition_penalty != 1.0,
                   "integration_timesteps": integration_timesteps is not None,
                   "stop_sequences": stop_sequences is not None, "prompts of different lengths": bool(
                       (lengths != T).any())}
    bad = [name for name, used in unsupported.items() if used]
    if bad:
        raise ValueError(f"{what} does not support {bad}; generate without it for those")


def _check_mtp_draft(model: Any) -> int:
    K = len(getattr(model, "mtp", ()))
    if K == 0:
        raise ValueError("mtp_draft=True needs a model with MTP modules (mtp_n_predict > 0), this one has none")
    return K


def _check_draft_model(model: Any, draft_model: Any, num_draft_tokens: Any) -> int:
    if isinstance(num_draft_tokens, bool) or not isinstance(num_draft_tokens, int) or num_draft_tokens < 1:
        raise ValueError(f"num_draft_tokens={num_draft_tokens!r} must be a positive int")
    for name in ("step", "allocate_inference_cache", "vocab_size"):
        if not hasattr(draft_model, name):
            raise TypeError(f"draft_model must be a seqblocks language model; {type(draft_model).__name__} has no "
                            f"{name!r}")
    if draft_model.vocab_size != model.vocab_size:
        raise ValueError(f"draft_model has vocab_size={draft_model.vocab_size}, the model {model.vocab_size}; "
                         f"they must share the vocabulary")
    return num_draft_tokens


def _speculative_generate(model: Any, input_ids: torch.Tensor, N: int, K: int, caches: Any, options: dict[str, Any],
                          stop_ids: torch.Tensor | None, pad_token_id: int, generator: torch.Generator | None,
                          callback: Callable | None, return_scores: bool, drafter: Any) -> GenerationOutput:
    """``generate(..., mtp_draft=True)`` or ``draft_model=``: draft up to K tokens (``drafter``), verify them in one
    main-model call over the caches, keep the accepted prefix (the smallest over the batch, so rows
    stay in lockstep; a row's own next token is still exact, see ``_verify``) and roll the caches back
    by restoring a snapshot and re-feeding the kept tokens when a draft was rejected, which is right
    for every mixer, recurrent states included."""
    B, T = input_ids.shape
    device = input_ids.device
    temperature = options["temperature"]
    hidden = model._final_hidden(input_ids, caches, None, None, None, {})  # [B, T, D]
    drafter.start(hidden)
    first_logits = model.head_logits(hidden[:, -1:])[:, 0]
    newest = sample(process_logits(first_logits, **options), temperature=temperature, generator=generator)
    emitted, raw = [newest], [first_logits.float()[:, None]]
    n, drafted, accepted_total = 1, 0, 0
    stopped = torch.zeros(B, dtype=torch.bool, device=device)
    n_gen = torch.zeros(B, dtype=torch.long, device=device)

    def emit(round_tokens: list[torch.Tensor]) -> None:
        # Rows that already stopped emit nothing more (their tokens are padded out below).
        nonlocal stopped
        for token in round_tokens:
            active = ~stopped
            n_gen.add_(active.long())
            if callback is not None:
                callback(torch.where(active, token, torch.full_like(token, pad_token_id)), active)
            if stop_ids is not None:
                stopped = stopped | (active & torch.isin(token, stop_ids))

    emit([newest])
    while n < N and not bool(stopped.all()):
        k = min(K, N - n - 1)
        drafts, draft_logits = drafter.draft(newest, k)
        block = torch.cat([newest[:, None], drafts], dim=1)  # [B, k + 1]
        saved = [t.clone() for t in caches.tensors()] if k > 0 else None
        block_hidden = model._final_hidden(block, caches, None, None, None, {})
        block_logits = model.head_logits(block_hidden)  # [B, k + 1, V]
        target = process_logits(block_logits.flatten(0, 1), **options).view(B, k + 1, -1)
        accept, follow = _verify(target, drafts, draft_logits, temperature, generator)
        per_row = accept.sum(dim=1)  # [B]
        j = int(per_row.min())
        drafted += B * k
        accepted_total += int(per_row.sum())
        # After the kept j drafts a row emits its accepted draft j + 1, or else its follow-up token.
        nxt = follow[:, j]
        if j < k:
            nxt = torch.where(accept[:, j], drafts[:, j], nxt)
            for t, s in zip(caches.tensors(), saved):
                t.copy_(s)
            block_hidden = model._final_hidden(block[:, : j + 1], caches, None, None, None, {})
        drafter.commit(block[:, : j + 1], block_hidden[:, : j + 1], k)
        round_tokens = [*drafts[:, :j].unbind(1), nxt]
        emit(round_tokens)
        emitted.extend(round_tokens)
        raw.append(block_logits[:, : j + 1].float())
        newest = nxt
        n += j + 1
    tokens = torch.stack(emitted, dim=1)[:, :N]  # [B, n]
    if tokens.shape[1] < N:
        tokens = torch.cat([tokens, tokens.new_full((B, N - tokens.shape[1]), pad_token_id)], dim=1)
    offsets = torch.arange(N, device=device)[None]
    generated = torch.where(offsets < n_gen[:, None], tokens, torch.full_like(tokens, pad_token_id))
    scores = None
    if return_scores:
        scores = torch.cat(raw, dim=1)[:, :N]
        scores = torch.cat([scores, scores.new_zeros(B, N - scores.shape[1], scores.shape[-1])], dim=1)
        scores = scores * (offsets < n_gen[:, None])[..., None]
    sequences = torch.cat([input_ids, generated], dim=1)
    return GenerationOutput(sequences=sequences, tokens=generated, lengths=T + n_gen, num_generated=n_gen,
                            scores=scores, draft_acceptance=accepted_total / drafted if drafted else None)

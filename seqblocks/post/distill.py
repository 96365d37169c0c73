"""Distil a seqblocks LM into a student with another layer pattern (attention -> linear RNN).

The recipe follows "The Mamba in the Llama" (Wang et al. 2024) and MOHAWK (Bick et al. 2024):

1. ``student_config`` swaps chosen attention layers of the teacher's config for a linear-RNN mixer
   sized so that attention's projections fit it (same heads, head width K).
2. ``init_student_from_teacher`` copies everything the two models share (embedding, LM head, norms,
   MLPs, the attention layers kept) and maps each replaced attention layer's weights into its
   linear RNN, reading linear attention ``y_t = q_t^T sum_s k_s v_s^T`` as the recurrence it is:

   ==================  ==========================  ==========================================
   student mixer        from attention's q, k, v    from attention's output projection
   ==================  ==========================  ==========================================
   gated_deltanet,      ``q_proj <- W_q``,           ``o_proj <- W_o``
   deltanet, gla        ``k_proj <- W_k``,
                        ``v_proj <- W_v``
   mamba2               ``in_proj``'s C <- W_q,      ``out_proj <- W_o``
                        B <- W_k, x <- W_v
   ==================  ==========================  ==========================================

   Key / value heads of a GQA / MQA teacher are repeated to the query heads. The short causal
   convolutions of the student are set to the identity (last tap 1, bias 0), so at step 0 q, k, v
   (and Mamba-2's x, B, C) are exactly attention's projections; the decay / gate parameters (A, dt,
   beta, the output gate and gated norm) keep their own initialisation; attention's q/k/v and output
   biases are dropped (the linear-RNN projections have none).
3. Training in two stages over one schedule: ``hidden_steps`` steps aligning the residual stream
   entering every layer and the final hidden (mean squared error over the teacher's mean square;
   only the replaced mixers train, as MOHAWK's alignment stages), then logit distillation
   ``temperature^2 * KL(teacher || student)`` at ``temperature``, mixed with the task's
   cross-entropy as ``alpha * KL + (1 - alpha) * CE``, every parameter training.

Shapes: B batch, T time, D width, V vocabulary, H query heads, Hkv key/value heads, K head width.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from seqblocks.post.runner import LoopConfig, LoopResult, run_loop

__all__ = ["LINEAR_RNN_TARGETS", "student_config", "init_student_from_teacher", "replaced_layers", "kd_loss",
           "hidden_alignment_loss", "DistillConfig", "distill"]

LINEAR_RNN_TARGETS = ("gated_deltanet", "deltanet", "gla", "mamba2")


def _attention_heads(mixer: nn.Module) -> tuple[int, int, int] | None:
    """(H, Hkv, K) of a softmax-attention mixer with a fused q/k/v ``in_proj`` (MHA / GQA / MQA /
    sliding window), else None."""
    from seqblocks.layers.attention.mha import MHA

    if not isinstance(mixer, MHA):
        return None
    return mixer.num_heads, mixer.num_heads_kv, mixer.head_dim


def _mixer_kwargs(target: str, d_model: int, H: int, K: int) -> dict[str, Any]:
    width = H * K
    if target == "gated_deltanet":
        return {"num_heads": H, "head_dim": K, "expand_v": 1.0}
    if target in ("deltanet", "gla"):
        extra = {"num_kv_heads": None} if target == "gla" else {}
        return {"num_heads": H, "expand_k": width / d_model, "expand_v": width / d_model, **extra}
    if target == "mamba2":
        if width % d_model:
            raise ValueError(f"mamba2 student: attention's H * K = {width} must be a multiple of d_model={d_model} "
                             f"(Mamba-2's inner width is expand * d_model)")
        return {"headdim": K, "d_state": K, "ngroups": H, "expand": width // d_model}
    raise ValueError(f"mixer {target!r} has no attention initialisation; choose one of {LINEAR_RNN_TARGETS}")


def student_config(teacher: nn.Module, mixer: str = "gated_deltanet", layers: Sequence[int] | str = "attention",
                   mixer_kwargs: dict[str, Any] | None = None):
    """The teacher's ``ModelConfig`` with attention layers replaced by ``mixer``.

    Args:
        teacher (nn.Module): an ``LRNNLMHeadModel``.
        mixer (str): one of ``LINEAR_RNN_TARGETS``. Default: "gated_deltanet".
        layers (Sequence[int] | str): indices of the layers to replace (each must be attention), or
            "attention" (every attention layer), or "alternate" (every other attention layer, the
            first kept, as the 50% hybrids of the Mamba-in-the-Llama paper). Default: "attention".
        mixer_kwargs (dict | None): further options of the new mixer (over the head sizes chosen to
            fit attention). Default: None.

    Returns:
        ModelConfig: build the student with ``LRNNLMHeadModel.from_config``.

    Raises:
        ValueError: an unknown mixer, a layer index out of range or not attention, no layer to replace.
    """
    from seqblocks.layers.build import mixer_config
    from seqblocks.models.model_config import LayerConfig

    config = teacher.config
    mixers = list(teacher.mixers())
    attention = [i for i, m in enumerate(mixers) if _attention_heads(m) is not None]
    if isinstance(layers, str):
        if layers == "attention":
            chosen = attention
        elif layers == "alternate":
            chosen = attention[1::2]
        else:
            raise ValueError(f"layers={layers!r} must be a list of indices, 'attention' or 'alternate'")
    else:
        chosen = sorted(set(int(i) for i in layers))
        bad = [i for i in chosen if i not in attention]
        if bad:
            raise ValueError(f"layers {bad} are not attention layers of the teacher (its attention layers: "
                             f"{attention}, of {len(mixers)})")
    if not chosen:
        raise ValueError(f"no layer to replace: the teacher's attention layers are {attention}")
    if mixer not in LINEAR_RNN_TARGETS:
        raise ValueError(f"mixer={mixer!r} has no attention initialisation; choose one of {LINEAR_RNN_TARGETS}")
    new_layers = list(config.layers)
    for i in chosen:
        H, _, K = _attention_heads(mixers[i])
        kwargs = {**_mixer_kwargs(mixer, config.d_model, H, K), **(mixer_kwargs or {})}
        new_layers[i] = LayerConfig(mixer=mixer, mixer_config=mixer_config(mixer, config.d_model, kwargs=kwargs))
    return dataclasses.replace(config, layers=tuple(new_layers))


def replaced_layers(teacher: nn.Module, student: nn.Module) -> list[int]:
    """Indices of the layers whose mixer class differs between teacher and student."""
    t, s = list(teacher.mixers()), list(student.mixers())
    if len(t) != len(s):
        raise ValueError(f"teacher and student must have as many layers, got {len(t)} and {len(s)}")
    return [i for i, (a, b) in enumerate(zip(t, s)) if type(a) is not type(b)]


def _repeat_heads(w: torch.Tensor, heads: int, K: int, H: int) -> torch.Tensor:
    # [heads K, D] -> [H K, D]: key/value head j serves query heads j * (H / heads) ... (MHA's grouping)
    return w.view(heads, K, -1).repeat_interleave(H // heads, dim=0).reshape(H * K, -1)


def _identity_conv(conv: nn.Conv1d) -> None:
    with torch.no_grad():
        conv.weight.zero_()
        conv.weight[:, 0, -1] = 1.0  # the last tap multiplies the current input (causal padding)
        if conv.bias is not None:
            conv.bias.zero_()


def _copy(dst: torch.Tensor, src: torch.Tensor, what: str) -> None:
    if dst.shape != src.shape:
        raise ValueError(f"{what}: the student's weight is {tuple(dst.shape)}, attention's {tuple(src.shape)}; build "
                         f"the student with student_config so the head sizes fit")
    with torch.no_grad():
        dst.copy_(src.to(dst.dtype))


def _map_attention(attn: nn.Module, mixer: nn.Module, where: str) -> str:
    H, Hkv, K = _attention_heads(attn)
    wq, wk, wv = attn.in_proj.weight.detach().split((H * K, Hkv * K, Hkv * K), dim=0)
    wk, wv = _repeat_heads(wk, Hkv, K, H), _repeat_heads(wv, Hkv, K, H)
    name = type(mixer).__name__
    if hasattr(mixer, "q_proj") and hasattr(mixer, "o_proj"):  # the linear-attention family
        _copy(mixer.q_proj.weight, wq, f"{where} q_proj")
        _copy(mixer.k_proj.weight, wk, f"{where} k_proj")
        _copy(mixer.v_proj.weight, wv, f"{where} v_proj")
        _copy(mixer.o_proj.weight, attn.out_proj.weight.detach(), f"{where} o_proj")
        convs = [getattr(mixer, n) for n in ("q_conv1d", "k_conv1d", "v_conv1d") if isinstance(getattr(mixer, n, None),
                                                                                               nn.Conv1d)]
        for conv in convs:
            _identity_conv(conv)
        return f"{name}: q/k/v/o_proj from attention" + (", short convs = identity" if convs else "")
    if hasattr(mixer, "conv_dim") and hasattr(mixer, "ngroups"):  # Mamba-2
        d_mlp, d_ssm, N, G = mixer.d_mlp, mixer.d_ssm, mixer.d_state, mixer.ngroups
        if d_ssm != H * K or G * N != H * K:
            raise ValueError(f"{where}: Mamba-2 needs d_ssm = ngroups * d_state = H * K = {H * K}, got d_ssm={d_ssm}, "
                             f"ngroups * d_state = {G * N}; build the student with student_config")
        start = 2 * d_mlp + d_ssm  # in_proj rows: z0, x0 (d_mlp each), z (d_ssm), then xBC = x, B, C, then dt
        with torch.no_grad():
            w = mixer.in_proj.weight
            w[start: start + d_ssm] = wv.to(w.dtype)
            w[start + d_ssm: start + d_ssm + G * N] = wk.to(w.dtype)
            w[start + d_ssm + G * N: start + d_ssm + 2 * G * N] = wq.to(w.dtype)
            if mixer.in_proj.bias is not None:
                mixer.in_proj.bias[start: start + d_ssm + 2 * G * N] = 0
        _copy(mixer.out_proj.weight, attn.out_proj.weight.detach(), f"{where} out_proj")
        _identity_conv(mixer.conv1d)
        return f"{name}: in_proj x/B/C from attention's v/k/q, out_proj from attention, conv = identity"
    raise ValueError(f"{where}: no attention initialisation for {name}; use one of {LINEAR_RNN_TARGETS}")


def init_student_from_teacher(student: nn.Module, teacher: nn.Module) -> dict[str, str]:
    """Initialise ``student`` from ``teacher`` (see the module docstring) in place.

    Returns:
        dict: per layer (``"layer 3"``) and for ``"shared"`` what was copied or mapped.

    Raises:
        ValueError: models of different widths / layer counts, or a replaced layer whose sizes do not fit.
    """
    replaced = replaced_layers(teacher, student)
    prefixes = tuple(f"layers.{i}.mixer." for i in replaced)
    t_state = teacher.state_dict()
    s_state = student.state_dict()
    copied, skipped = 0, []
    with torch.no_grad():
        for key, value in s_state.items():
            if key.startswith(prefixes):
                continue
            if key in t_state and t_state[key].shape == value.shape:
                value.copy_(t_state[key].to(value.dtype))
                copied += 1
            else:
                skipped.append(key)
    report = {"shared": f"{copied} tensors copied" + (f"; kept the student's own {skipped}" if skipped else "")}
    t_mixers, s_mixers = list(teacher.mixers()), list(student.mixers())
    for i in replaced:
        if _attention_heads(t_mixers[i]) is None:
            report[f"layer {i}"] = (f"{type(s_mixers[i]).__name__}: own initialisation (the teacher's "
                                    f"{type(t_mixers[i]).__name__} is not softmax attention)")
            continue
        report[f"layer {i}"] = _map_attention(t_mixers[i], s_mixers[i], f"layer {i}")
    return report


def kd_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float = 1.0,
            mask: torch.Tensor | None = None) -> torch.Tensor:
    """``temperature^2 * KL(softmax(t / T) || softmax(s / T))`` per token, averaged (over ``mask``).

    Args:
        student_logits, teacher_logits (Tensor): [B, T, V].
        temperature (float): > 0. Default: 1.0.
        mask (Tensor | None): [B, T] positions to average over. Default: None (all).
    """
    if student_logits.shape != teacher_logits.shape:
        raise ValueError(f"student logits {tuple(student_logits.shape)} and teacher logits "
                         f"{tuple(teacher_logits.shape)} must have one shape")
    if not temperature > 0:
        raise ValueError(f"temperature={temperature!r} must be positive")
    s = F.log_softmax(student_logits.float() / temperature, -1)
    t = F.log_softmax(teacher_logits.float() / temperature, -1)
    kl = (t.exp() * (t - s)).sum(-1)  # [B, T]
    if mask is None:
        return kl.mean() * temperature ** 2
    mask = mask.float()
    return (kl * mask).sum() / mask.sum().clamp(min=1) * temperature ** 2


def hidden_alignment_loss(student_hidden: Sequence[torch.Tensor], teacher_hidden: Sequence[torch.Tensor]
                          ) -> torch.Tensor:
    """Mean over layers of ``mean((s - t)^2) / mean(t^2)`` (each [B, T, D]); the embedding entry
    (index 0, the same in both after ``init_student_from_teacher``) is left out."""
    if len(student_hidden) != len(teacher_hidden):
        raise ValueError(f"{len(student_hidden)} student and {len(teacher_hidden)} teacher hidden states")
    terms = [F.mse_loss(s.float(), t.float()) / t.float().square().mean().clamp(min=1e-8)
             for s, t in zip(student_hidden[1:], teacher_hidden[1:])]
    return torch.stack(terms).mean()


@dataclasses.dataclass(frozen=True, kw_only=True)
class DistillConfig(LoopConfig):
    """A distillation run: ``LoopConfig`` plus

    Args:
        task (str): the embedded task whose training split feeds both models. Default: "chars".
        task_options (dict): its options. Default: {}.
        batch_size (int): sequences per step. Default: 16.
        hidden_steps (int): length of the hidden-alignment stage (the first steps). Default: 0.
        temperature (float): distillation temperature. Default: 1.0.
        alpha (float): weight of the KL against the task's cross-entropy, in [0, 1]. Default: 1.0.
    """

    lr: float = 1e-3
    task: str = "chars"
    task_options: dict[str, Any] = dataclasses.field(default_factory=dict)
    batch_size: int = 16
    hidden_steps: int = 0
    temperature: float = 1.0
    alpha: float = 1.0

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.batch_size <= 0:
            raise ValueError(f"DistillConfig.batch_size={self.batch_size!r} must be a positive integer")
        if not 0 <= self.hidden_steps <= self.steps:
            raise ValueError(f"DistillConfig.hidden_steps={self.hidden_steps!r} must be in [0, steps={self.steps}]")
        if not self.temperature > 0:
            raise ValueError(f"DistillConfig.temperature={self.temperature!r} must be positive")
        if not 0.0 <= self.alpha <= 1.0:
            raise ValueError(f"DistillConfig.alpha={self.alpha!r} must be in [0, 1]")


def distill(teacher: nn.Module, student: nn.Module, config: DistillConfig, out_dir: str | Path,
            **loop_kwargs: Any) -> LoopResult:
    """Distil ``teacher`` into ``student`` on ``config.task`` (the two stages of the module docstring).

    Logged per step: ``loss``, ``stage`` (1 hidden alignment, 2 logits), ``kl`` / ``hidden_mse``,
    ``ce`` (the student's task cross-entropy) and ``teacher_ce``.

    Args:
        teacher (nn.Module): frozen; any seqblocks causal LM with ``return_hidden``.
        student (nn.Module): the model trained (usually built from ``student_config`` and initialised
            with ``init_student_from_teacher``).
        config (DistillConfig): the run.
        out_dir (str | Path): run directory.
        **loop_kwargs: ``run_loop`` options.
    """
    from seqblocks.tasks import IGNORE_INDEX, get_task

    task = get_task(config.task, **config.task_options)
    for name, model in (("teacher", teacher), ("student", student)):
        if model.vocab_size < task.vocab_size:
            raise ValueError(f"the {name}'s vocabulary ({model.vocab_size}) is smaller than task {config.task!r}'s "
                             f"({task.vocab_size})")
    device = next(student.parameters()).device
    teacher.eval().requires_grad_(False)
    replaced = set(replaced_layers(teacher, student))
    names = [n for n, _ in student.named_parameters()]
    stage1 = {n for n in names if any(n.startswith(f"layers.{i}.mixer.") for i in replaced)}
    trainable = {n for n, p in student.named_parameters() if p.requires_grad}
    params = dict(student.named_parameters())

    def objective(step: int) -> tuple[torch.Tensor, dict[str, float]]:
        hidden_stage = step < config.hidden_steps
        for n in trainable:
            params[n].requires_grad_(n in stage1 if hidden_stage and stage1 else True)
        batch = task.batch("train", step, config.batch_size, config.seed).to(device)
        with torch.no_grad():
            t_out = teacher(batch.input_ids, return_hidden=hidden_stage)
        s_out = student(batch.input_ids, return_hidden=hidden_stage)
        V = task.vocab_size
        scored = batch.targets != IGNORE_INDEX
        ce = F.cross_entropy(s_out.logits[..., :V].float().flatten(0, 1), batch.targets.flatten(),
                             ignore_index=IGNORE_INDEX)
        teacher_ce = F.cross_entropy(t_out.logits[..., :V].float().flatten(0, 1), batch.targets.flatten(),
                                     ignore_index=IGNORE_INDEX)
        metrics = {"ce": float(ce.detach()), "teacher_ce": float(teacher_ce)}
        if hidden_stage:
            loss = hidden_alignment_loss(s_out.hidden_states, t_out.hidden_states)
            return loss, {**metrics, "stage": 1.0, "hidden_mse": float(loss.detach())}
        kl = kd_loss(s_out.logits[..., :V], t_out.logits[..., :V], config.temperature, scored)
        loss = config.alpha * kl + (1 - config.alpha) * ce
        return loss, {**metrics, "stage": 2.0, "kl": float(kl.detach())}

    run_info = {"teacher": teacher.config.to_dict() if hasattr(teacher, "config") else None,
                "replaced_layers": sorted(replaced)}
    try:
        return run_loop(student, objective, config, out_dir, recipe="distill", run_info=run_info,
                        parameters=[params[n] for n in sorted(trainable)], **loop_kwargs)
    finally:
        for n in trainable:
            params[n].requires_grad_(True)

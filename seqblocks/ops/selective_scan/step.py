"""Decode-step ops of Mamba: the conv step, and the whole step between in_proj and out_proj fused.

``conv_step`` is ``causal_conv1d_update`` with the cache's token count advanced in the same launch: the
first Triton launch of an RG-LRU step (the second is ``seqblocks.ops.scan.step.rglru_step``) and of
Mamba's unfused step. Its PyTorch path is ``causal_conv1d_update`` from ``seqblocks.ops.causal_conv1d``
followed by ``seqlen_offset += 1``, which is its specification.

``mamba_step`` is everything of a Mamba step between in_proj and out_proj (conv step, x_proj, dt_proj,
``selective_state_update``) in two Triton launches; its PyTorch path composes those four ops, which
is its specification (up to where x_proj's output is rounded, see its docstring).

``mamba_layer_step`` is ``mamba_step`` with in_proj, and optionally the block's residual add and norm
before it, folded into the same two launches; its PyTorch path (``add_norm``, ``F.linear``,
``mamba_step``) is its specification. Measured no faster than in_proj as a GEMM on the H200, so
``Mamba`` uses it only with ``fold_in_proj`` (docs/kernels.md, "Decode step kernels").

Shapes: B batch, D model width, E channels, W filter width, N state, R dt rank.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from seqblocks.ops._backend import outside_autocast, resolve_backend
from seqblocks.ops.add_norm import add_norm
from seqblocks.ops.causal_conv1d import ACTIVATIONS, causal_conv1d_update
from seqblocks.ops.discretize import DISCRETIZATIONS
from seqblocks.ops.selective_scan import selective_state_update

__all__ = ["conv_step", "mamba_step", "mamba_layer_step"]


def _check_conv_step(op: str, x, conv_state, weight, bias, activation, seqlen_offset) -> None:
    """The input checks of ``conv_step`` (shared with ``mamba_step``, whose conv part it is)."""
    if not isinstance(x, torch.Tensor) or not isinstance(conv_state, torch.Tensor) or not isinstance(
            weight, torch.Tensor):
        raise TypeError(f"{op}: x, conv_state and the conv weight must be Tensors")
    if bias is not None and not isinstance(bias, torch.Tensor):
        raise TypeError(f"{op}: the conv bias must be a Tensor or None, got {type(bias).__name__}")
    if x.dim() != 2 or weight.dim() != 2 or weight.shape[0] != x.shape[1] or weight.shape[1] < 1:
        raise ValueError(f"{op}: expected x [B, E] and weight [E, W >= 1], got x {tuple(x.shape)}, "
                         f"weight {tuple(weight.shape)}")
    if conv_state.shape != (x.shape[0], weight.shape[1] - 1, x.shape[1]):
        raise ValueError(f"{op}: conv_state must have shape [B, W - 1, E] = "
                         f"{[x.shape[0], weight.shape[1] - 1, x.shape[1]]}, got {tuple(conv_state.shape)}")
    if bias is not None and bias.shape != (x.shape[1],):
        raise ValueError(f"{op}: bias must have shape [{x.shape[1]}], got {tuple(bias.shape)}")
    if activation not in ACTIVATIONS:
        raise ValueError(f"{op}: unknown activation {activation!r}; expected one of {ACTIVATIONS}")
    if seqlen_offset is not None:
        if not isinstance(seqlen_offset, torch.Tensor) or seqlen_offset.dtype != torch.int64:
            raise TypeError(f"{op}: seqlen_offset must be an int64 tensor, got {seqlen_offset!r}")
        if seqlen_offset.shape != (x.shape[0],):
            raise ValueError(f"{op}: seqlen_offset must have shape [{x.shape[0]}], got "
                             f"{tuple(seqlen_offset.shape)}")


@outside_autocast
def conv_step(
    x: torch.Tensor,
    conv_state: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    activation: str | None = None,
    *,
    seqlen_offset: torch.Tensor | None = None,
    backend: str = "auto",
) -> torch.Tensor:
    """One decode step of the causal depthwise conv; shifts ``x`` into ``conv_state`` in place.

    Args:
        x (Tensor): [B, E] the new input (any strides: a view into in_proj's output is read in place).
        conv_state (Tensor): [B, W - 1, E] the previous W - 1 inputs, oldest first; updated in place.
        weight (Tensor): [E, W].
        bias (Tensor | None): [E]. Default: None.
        activation (str | None): None or "silu" / "swish". Default: None.
        seqlen_offset (Tensor | None): [B] int64 token count of the cache, advanced by one in place.
            Default: None (nothing advanced).
        backend (str): "auto", "torch" or "triton". Default: "auto".

    Returns:
        y (Tensor): [B, E] in x's dtype, equal to ``causal_conv1d_update``.

    Raises:
        TypeError: non-tensor or non-floating inputs, a non-int64 ``seqlen_offset``.
        ValueError: mismatched shapes, an unknown activation or backend.
    """
    _check_conv_step("conv_step", x, conv_state, weight, bias, activation, seqlen_offset)
    floats = all(t is None or (t.is_floating_point() and t.dtype.itemsize <= 4) for t in (x, conv_state, weight, bias))
    if resolve_backend(backend, x, conv_state, weight, op="conv_step", has_kernel=floats) == "triton":
        from seqblocks.ops.selective_scan.step_triton import conv_step_triton

        return conv_step_triton(x, conv_state, weight, bias, activation, seqlen_offset)
    y = causal_conv1d_update(x, conv_state, weight, bias, activation, backend="torch")
    if seqlen_offset is not None:
        seqlen_offset.add_(1)
    return y


def _check_mamba_step(x, conv_state, conv_weight, x_proj_weight, dt_proj_weight, ssm_state, A, conv_bias, D, z,
                      delta_bias, discretization, a_is_log, activation, seqlen_offset) -> None:
    op = "mamba_step"
    _check_conv_step(op, x, conv_state, conv_weight, conv_bias, activation, seqlen_offset)
    for name, t in (("x_proj_weight", x_proj_weight), ("dt_proj_weight", dt_proj_weight), ("ssm_state", ssm_state),
                    ("A", A), ("D", D), ("z", z), ("delta_bias", delta_bias)):
        if t is None and name in ("D", "z", "delta_bias"):
            continue
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{op}: {name} must be a Tensor, got {type(t).__name__}")
        if not (t.is_floating_point() or (t.is_complex() and name in ("ssm_state", "A"))):
            raise TypeError(f"{op}: {name} must be real floating point{' or complex' * (name in ('ssm_state', 'A'))}"
                            f", got {t.dtype}")
    for name, t in (("x", x), ("conv_state", conv_state), ("conv_weight", conv_weight), ("conv_bias", conv_bias)):
        if t is not None and not t.is_floating_point():
            raise TypeError(f"{op}: {name} must be real floating point, got {t.dtype}")
    Bsz, E = x.shape
    if A.dim() != 2 or A.shape[0] != E:
        raise ValueError(f"{op}: A must have shape [E={E}, N], got {tuple(A.shape)}")
    N = A.shape[1]
    if dt_proj_weight.dim() != 2 or dt_proj_weight.shape[0] != E:
        raise ValueError(f"{op}: dt_proj_weight must have shape [E={E}, R], got {tuple(dt_proj_weight.shape)}")
    R = dt_proj_weight.shape[1]
    if x_proj_weight.shape != (R + 2 * N, E):
        raise ValueError(f"{op}: x_proj_weight must have shape [R + 2N, E] = [{R + 2 * N}, {E}] (R={R} from "
                         f"dt_proj_weight, N={N} from A), got {tuple(x_proj_weight.shape)}")
    if x_proj_weight.dtype != x.dtype or dt_proj_weight.dtype != x.dtype:
        raise TypeError(f"{op}: x_proj_weight and dt_proj_weight must have x's dtype {x.dtype} (the projections "
                        f"read the conv output, which has it), got {x_proj_weight.dtype} and {dt_proj_weight.dtype}")
    if ssm_state.shape != (Bsz, E, N):
        raise ValueError(f"{op}: ssm_state must have shape [B, E, N] = {[Bsz, E, N]}, got {tuple(ssm_state.shape)}")
    if z is not None and z.shape != (Bsz, E):
        raise ValueError(f"{op}: z must have shape [B, E] = {[Bsz, E]}, got {tuple(z.shape)}")
    for name, t in (("D", D), ("delta_bias", delta_bias)):
        if t is not None and t.shape != (E,):
            raise ValueError(f"{op}: {name} must have shape [{E}], got {tuple(t.shape)}")
    if discretization not in DISCRETIZATIONS:
        raise ValueError(f"{op}: unknown discretization {discretization!r}; expected one of {DISCRETIZATIONS}")
    if a_is_log and A.is_complex():
        raise TypeError(f"{op}: a_is_log=True needs a real A (log(-A)), got {A.dtype}")


@outside_autocast
def mamba_step(
    x: torch.Tensor,
    conv_state: torch.Tensor,
    conv_weight: torch.Tensor,
    x_proj_weight: torch.Tensor,
    dt_proj_weight: torch.Tensor,
    ssm_state: torch.Tensor,
    A: torch.Tensor,
    conv_bias: torch.Tensor | None = None,
    D: torch.Tensor | None = None,
    z: torch.Tensor | None = None,
    *,
    delta_bias: torch.Tensor | None = None,
    delta_softplus: bool = True,
    discretization: str = "mamba",
    a_is_log: bool = False,
    activation: str | None = "silu",
    seqlen_offset: torch.Tensor | None = None,
    backend: str = "auto",
) -> torch.Tensor:
    """One Mamba decode step from in_proj's output to out_proj's input; updates both caches in place.

    The specification (the PyTorch path)::

        xs    = conv_step(x, conv_state, conv_weight, conv_bias, activation, seqlen_offset=seqlen_offset)
        x_dbl = xs @ x_proj_weight.T                                  # [B, R + 2N]
        delta = x_dbl[:, :R] @ dt_proj_weight.T                       # [B, E]
        y     = selective_state_update(ssm_state, xs, delta, A, x_dbl[:, R:R + N], x_dbl[:, R + N:], D, z,
                                       delta_bias=..., delta_softplus=..., discretization=..., a_is_log=...)

    The Triton path (``step_triton.mamba_step_triton``) is two launches: the conv step with each channel
    block's share of x_proj as fp32 partial sums, then the sum of those partials (in a fixed order:
    deterministic), dt_proj and the state update. It serves real states in fp32 with the "mamba",
    "bilinear" or "dirac" discretisation and fp16 / bf16 / fp32 inputs, in calls autograd does not record
    (the kernels have no backward); other calls run the PyTorch path, whose ops take their own kernels
    where they have them.

    Numerics: the Triton path keeps x_dbl (and so dt, B and C) in fp32, while the PyTorch path, as an
    unfused step of GEMMs, rounds x_dbl and delta to the activation dtype. In fp32 the two agree to
    rounding (~1e-5); in bf16 / fp16 the fused step is the more accurate one, and the two differ by
    about the activation dtype's precision (~1e-2 relative in bf16) in y and the new state.

    Args:
        x (Tensor): [B, E] the conv input, in_proj's x half (any strides: a view is read in place).
        conv_state (Tensor): [B, W - 1, E] the previous W - 1 conv inputs, oldest first; updated in place.
        conv_weight (Tensor): [E, W] depthwise filter.
        x_proj_weight (Tensor): [R + 2N, E] x_proj's weight (no bias), in x's dtype.
        dt_proj_weight (Tensor): [E, R] dt_proj's weight, in x's dtype (its bias is ``delta_bias``).
        ssm_state (Tensor): [B, E, N] the recurrent state (fp32, or complex64 / float64 on the PyTorch
            path); updated in place.
        A (Tensor): [E, N] the diagonal (``log(-A)`` when ``a_is_log``).
        conv_bias (Tensor | None): [E]. Default: None.
        D (Tensor | None): [E] skip. Default: None.
        z (Tensor | None): [B, E] gate, in_proj's z half (any strides). Default: None.
        delta_bias (Tensor | None): [E] added to delta (dt_proj's bias). Default: None.
        delta_softplus (bool): softplus of delta + bias. Default: True.
        discretization (str): as in ``selective_scan``. Default: "mamba".
        a_is_log (bool): ``A`` holds ``log(-A)``; ``-exp`` is taken in the kernel. Default: False.
        activation (str | None): the conv's activation, None or "silu" / "swish". Default: "silu".
        seqlen_offset (Tensor | None): [B] int64 token count of the cache, advanced by one in place.
            Default: None.
        backend (str): "auto", "torch" or "triton". Default: "auto".

    Returns:
        y (Tensor): [B, E] in x's dtype, out_proj's input.

    Raises:
        TypeError: non-tensor or non-floating inputs, projection weights not in x's dtype, a non-int64
            ``seqlen_offset``, ``a_is_log`` with a complex A.
        ValueError: mismatched shapes, an unknown activation, discretization or backend.
    """
    _check_mamba_step(x, conv_state, conv_weight, x_proj_weight, dt_proj_weight, ssm_state, A, conv_bias, D, z,
                      delta_bias, discretization, a_is_log, activation, seqlen_offset)
    tensors = (x, conv_state, conv_weight, x_proj_weight, dt_proj_weight, ssm_state, A, conv_bias, D, z, delta_bias)
    recorded = torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)
    served = (discretization != "zoh" and not recorded and ssm_state.dtype == torch.float32
              and all(t is None or (t.is_floating_point() and t.dtype.itemsize <= 4) for t in tensors))
    if resolve_backend(backend, x, conv_state, ssm_state, op="mamba_step", has_kernel=served) == "triton":
        from seqblocks.ops.selective_scan.step_triton import mamba_step_triton

        return mamba_step_triton(x, conv_state, conv_weight, x_proj_weight, dt_proj_weight, ssm_state, A, conv_bias,
                                 D, z, delta_bias=delta_bias, delta_softplus=delta_softplus,
                                 discretization=discretization, a_is_log=a_is_log, activation=activation,
                                 seqlen_offset=seqlen_offset)
    # The composed step; "auto" stays "auto" for the parts, which then pick their own kernels.
    R, N = dt_proj_weight.shape[1], A.shape[1]
    xs = conv_step(x, conv_state, conv_weight, conv_bias, activation, seqlen_offset=seqlen_offset, backend=backend)
    x_dbl = F.linear(xs, x_proj_weight)
    delta = F.linear(x_dbl[:, :R], dt_proj_weight)
    return selective_state_update(ssm_state, xs, delta, A, x_dbl[:, R:R + N], x_dbl[:, R + N:], D, z,
                                  delta_bias=delta_bias, delta_softplus=delta_softplus,
                                  discretization=discretization, a_is_log=a_is_log, backend=backend)


_NORMS = (None, "layernorm", "rmsnorm")


def _check_layer_step(x, in_proj_weight, in_proj_bias, conv_weight, residual, norm, norm_weight, norm_bias) -> None:
    op = "mamba_layer_step"
    for name, t in (("x", x), ("in_proj_weight", in_proj_weight), ("conv_weight", conv_weight)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{op}: {name} must be a Tensor, got {type(t).__name__}")
    for name, t in (("x", x), ("in_proj_weight", in_proj_weight), ("in_proj_bias", in_proj_bias),
                    ("residual", residual), ("norm_weight", norm_weight), ("norm_bias", norm_bias)):
        if t is not None and not (isinstance(t, torch.Tensor) and t.is_floating_point()):
            raise TypeError(f"{op}: {name} must be a real floating-point Tensor, got "
                            f"{getattr(t, 'dtype', type(t).__name__)}")
    if x.dim() != 2:
        raise ValueError(f"{op}: x must have shape [B, D], got {tuple(x.shape)}")
    Dm, E = x.shape[1], conv_weight.shape[0] if conv_weight.dim() == 2 else -1
    if in_proj_weight.shape != (2 * E, Dm):
        raise ValueError(f"{op}: in_proj_weight must have shape [2E, D] = [{2 * E}, {Dm}] (E from conv_weight, D "
                         f"from x), got {tuple(in_proj_weight.shape)}")
    if in_proj_weight.dtype != x.dtype:
        raise TypeError(f"{op}: in_proj_weight must have x's dtype {x.dtype}, got {in_proj_weight.dtype}")
    if in_proj_bias is not None and in_proj_bias.shape != (2 * E,):
        raise ValueError(f"{op}: in_proj_bias must have shape [{2 * E}], got {tuple(in_proj_bias.shape)}")
    if norm not in _NORMS:
        raise ValueError(f"{op}: unknown norm {norm!r}; expected one of {_NORMS}")
    if norm is None:
        given = [n for n, t in (("residual", residual), ("norm_weight", norm_weight), ("norm_bias", norm_bias))
                 if t is not None]
        if given:
            raise ValueError(f"{op}: {given} given without a norm; pass norm='layernorm' or 'rmsnorm'")
        return
    if residual is not None and residual.shape != x.shape:
        raise ValueError(f"{op}: residual shape {tuple(residual.shape)} != x shape {tuple(x.shape)}")
    for name, p in (("norm_weight", norm_weight), ("norm_bias", norm_bias)):
        if p is not None and p.shape != (Dm,):
            raise ValueError(f"{op}: {name} must have shape [{Dm}], got {tuple(p.shape)}")
    if norm == "rmsnorm" and norm_bias is not None:
        raise ValueError(f"{op}: RMSNorm takes no bias")


@outside_autocast
def mamba_layer_step(
    x: torch.Tensor,
    in_proj_weight: torch.Tensor,
    conv_state: torch.Tensor,
    conv_weight: torch.Tensor,
    x_proj_weight: torch.Tensor,
    dt_proj_weight: torch.Tensor,
    ssm_state: torch.Tensor,
    A: torch.Tensor,
    conv_bias: torch.Tensor | None = None,
    D: torch.Tensor | None = None,
    *,
    in_proj_bias: torch.Tensor | None = None,
    residual: torch.Tensor | None = None,
    norm: str | None = None,
    norm_weight: torch.Tensor | None = None,
    norm_bias: torch.Tensor | None = None,
    eps: float = 1e-5,
    residual_in_fp32: bool = False,
    delta_bias: torch.Tensor | None = None,
    delta_softplus: bool = True,
    discretization: str = "mamba",
    a_is_log: bool = False,
    activation: str | None = "silu",
    seqlen_offset: torch.Tensor | None = None,
    backend: str = "auto",
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """One Mamba decode step from the layer's input to out_proj's input, with in_proj (and optionally the
    block's residual add and norm before it) folded in; updates both caches in place.

    The specification (the PyTorch path)::

        h, r = add_norm(x, residual, norm_weight, norm_bias, eps, norm == "rmsnorm", residual_in_fp32,
                        prenorm=True)                                 # only with a norm; else h = x
        xz   = F.linear(h, in_proj_weight, in_proj_bias)              # [B, 2E]
        y    = mamba_step(xz[:, :E], conv_state, ..., z=xz[:, E:], ...)

    The Triton path is ``mamba_step``'s two launches with in_proj inside them: kernel A applies in_proj's
    x rows of its channel block to h before the conv (with a norm, each program forms the row's residual
    and norm itself; the row's first program stores them), kernel B applies the z rows of its channels
    for the gate. So a Mamba block's decode step is three launches: these two and out_proj. It serves
    what ``mamba_step``'s serves, with in_proj's weight in x's dtype, and rounds h, xz and x_proj's
    output where ``mamba_step``'s Triton path and ``add_norm`` round them.

    Args:
        x (Tensor): [B, D] the layer's input: the block's input (the previous branch output) with a norm,
            in_proj's input without.
        in_proj_weight (Tensor): [2E, D] in x's dtype (the x half, then the z half).
        conv_state, conv_weight, x_proj_weight, dt_proj_weight, ssm_state, A, conv_bias, D: as in
            ``mamba_step``.
        in_proj_bias (Tensor | None): [2E]. Default: None.
        residual (Tensor | None): [B, D] the residual stream (with a norm; None: the first block). Default:
            None.
        norm (str | None): None, "layernorm" or "rmsnorm". Default: None.
        norm_weight, norm_bias (Tensor | None): [D] the norm's scale and shift. Default: None.
        eps (float): the norm's epsilon. Default: 1e-5.
        residual_in_fp32 (bool): store the new residual in fp32 (as ``add_norm``). Default: False.
        delta_bias, delta_softplus, discretization, a_is_log, activation, seqlen_offset, backend: as in
            ``mamba_step``.

    Returns:
        y (Tensor): [B, E] in x's dtype, out_proj's input; with a norm ``(y, new_residual [B, D])``.

    Raises:
        TypeError / ValueError: as ``mamba_step``, and for in_proj's weight or bias, the residual or the
            norm's parameters of the wrong shape or dtype, an unknown norm, norm inputs without a norm.
    """
    _check_layer_step(x, in_proj_weight, in_proj_bias, conv_weight, residual, norm, norm_weight, norm_bias)
    E = conv_weight.shape[0]
    # mamba_step's checks on a stand-in for in_proj's x half (shape and dtype only).
    _check_mamba_step(x.new_empty((x.shape[0], E), device="meta"), conv_state, conv_weight, x_proj_weight,
                      dt_proj_weight, ssm_state, A, conv_bias, D, None, delta_bias, discretization, a_is_log,
                      activation, seqlen_offset)
    tensors = (x, in_proj_weight, in_proj_bias, residual, norm_weight, norm_bias, conv_state, conv_weight,
               x_proj_weight, dt_proj_weight, ssm_state, A, conv_bias, D, delta_bias)
    recorded = torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)
    served = (discretization != "zoh" and not recorded and ssm_state.dtype == torch.float32 and E > 0
              and all(t is None or (t.is_floating_point() and t.dtype.itemsize <= 4) for t in tensors))
    if resolve_backend(backend, x, conv_state, ssm_state, op="mamba_layer_step", has_kernel=served) == "triton":
        from seqblocks.ops.selective_scan.step_triton import mamba_layer_step_triton

        if norm is not None:  # the kernels read the rows with unit feature stride
            x = x if x.stride(-1) == 1 else x.contiguous()
            residual = residual if residual is None or residual.stride(-1) == 1 else residual.contiguous()
        return mamba_layer_step_triton(
            x, in_proj_weight, conv_state, conv_weight, x_proj_weight, dt_proj_weight, ssm_state, A, conv_bias, D,
            in_proj_bias=in_proj_bias, residual=residual, norm=norm, norm_weight=norm_weight, norm_bias=norm_bias,
            eps=eps, residual_in_fp32=residual_in_fp32, delta_bias=delta_bias, delta_softplus=delta_softplus,
            discretization=discretization, a_is_log=a_is_log, activation=activation, seqlen_offset=seqlen_offset)
    h, r = x, None
    if norm is not None:
        h, r = add_norm(x, residual, norm_weight, norm_bias, eps, norm == "rmsnorm", residual_in_fp32, prenorm=True,
                        backend=backend)
    xz = F.linear(h, in_proj_weight, in_proj_bias)
    y = mamba_step(xz[:, :E], conv_state, conv_weight, x_proj_weight, dt_proj_weight, ssm_state, A, conv_bias, D,
                   xz[:, E:], delta_bias=delta_bias, delta_softplus=delta_softplus, discretization=discretization,
                   a_is_log=a_is_log, activation=activation, seqlen_offset=seqlen_offset, backend=backend)
    return y if norm is None else (y, r)

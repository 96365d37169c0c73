"""The fused Mamba decode step (``mamba_step``: conv + x_proj + dt_proj + state update in two launches)
against its composed PyTorch path, and ``Mamba`` decoding through it, on the CPU.

The kernels run under Triton's interpreter (``TRITON_INTERPRET=1``); ``tests/interpreter.py`` says why
the cases run in a child process. Decoding has no backward, so only forward values and the in-place
state updates are compared.

Tolerances: in fp32 the fused step equals the composed one to rounding (1e-5). In bf16 the fused step
keeps x_dbl (dt, B, C) in fp32 where the composed one rounds it to bf16 before dt_proj and the update,
so the two differ by ~1e-2 relative (checked normwise); against a composed reference that keeps x_dbl
in fp32 too, the bf16 fused step agrees to rounding (one bf16 ulp in y). The interpreter may round a
bf16 value one ulp away from PyTorch, so that reference takes the conv output from the conv-step kernel.

Shapes: B batch, E channels, N state, R dt rank, W conv width.
"""

from __future__ import annotations

import importlib

import pytest
import torch
import torch.nn.functional as F
from interpreter import INTERPRETER, run_file_under_interpreter
from torch import nn

pytest.importorskip("triton", reason="Triton is not installed: the Triton kernels cannot be tested")

from seqblocks.ops import _backend  # noqa: E402
from seqblocks.ops.selective_scan import selective_state_update  # noqa: E402
from seqblocks.ops.selective_scan.step import conv_step, mamba_step  # noqa: E402

if not INTERPRETER:

    def test_kernels_under_interpreter():
        """Run this file's cases in a child process under TRITON_INTERPRET=1 (see tests/interpreter.py)."""
        run_file_under_interpreter(__file__)


def _inputs(Bsz, E, N, R, W, dtype, *, conv_bias=True, D=True, z=True, device="cpu"):
    g = torch.Generator().manual_seed(Bsz * 1000 + E + N + R + W)
    xz = torch.randn(Bsz, 2 * E, generator=g).to(dtype)  # x and z as views of one buffer, as the mixer has them
    t = {
        "x": xz[:, :E], "conv_state": torch.randn(Bsz, W - 1, E, generator=g).to(dtype),
        "conv_weight": (torch.randn(E, W, generator=g) / W ** 0.5).to(dtype),
        "x_proj_weight": (torch.randn(R + 2 * N, E, generator=g) / E ** 0.5).to(dtype),
        "dt_proj_weight": (torch.randn(E, R, generator=g) / R ** 0.5).to(dtype),
        "ssm_state": torch.randn(Bsz, E, N, generator=g),
        "A": torch.log(torch.rand(E, N, generator=g) * 2 + 0.1),  # A_log
        "conv_bias": torch.randn(E, generator=g).to(dtype) if conv_bias else None,
        "D": torch.randn(E, generator=g) if D else None,
        "z": xz[:, E:] if z else None,
    }
    t = {k: None if v is None else v.to(device) for k, v in t.items()}
    return t, (torch.randn(E, generator=g) * 0.5 - 1).to(device)


def _run(t, bias, backend, offset0, **kw):
    """One step on fresh copies of the caches: (y, conv_state, ssm_state, seqlen_offset)."""
    t = dict(t, conv_state=t["conv_state"].clone(), ssm_state=t["ssm_state"].clone())
    off = offset0.clone()
    ptrs = (t["conv_state"].data_ptr(), t["ssm_state"].data_ptr())
    fn = kw.pop("fn", mamba_step)
    y = fn(**t, delta_bias=bias, a_is_log=True, seqlen_offset=off, **kw, **({} if backend is None else
                                                                             {"backend": backend}))
    assert (t["conv_state"].data_ptr(), t["ssm_state"].data_ptr()) == ptrs  # updated in place
    return y, t["conv_state"], t["ssm_state"], off


def _fp32_xdbl_reference(t, bias, offset0, **kw):
    """The composed step with x_dbl and delta kept in fp32 (the fused kernel's arithmetic); the conv
    output comes from the conv-step kernel, rounded as the fused kernel A rounds it."""
    conv_state, ssm_state, off = t["conv_state"].clone(), t["ssm_state"].clone(), offset0.clone()
    xs = conv_step(t["x"], conv_state, t["conv_weight"], t["conv_bias"], kw.get("activation", "silu"),
                   seqlen_offset=off, backend="triton")
    R, N = t["dt_proj_weight"].shape[1], t["A"].shape[1]
    x_dbl = F.linear(xs.float(), t["x_proj_weight"].float())
    delta = F.linear(x_dbl[:, :R], t["dt_proj_weight"].float())
    y = selective_state_update(ssm_state, xs, delta, t["A"], x_dbl[:, R:R + N], x_dbl[:, R + N:], t["D"], t["z"],
                               delta_bias=bias, delta_softplus=kw.get("delta_softplus", True),
                               discretization=kw.get("discretization", "mamba"), a_is_log=True, backend="torch")
    return y, conv_state, ssm_state, off


def _check(t, bias, dtype, **kw):
    offset0 = torch.arange(t["x"].shape[0], device=t["x"].device) * 3
    y_ref, cs_ref, ss_ref, off_ref = _run(t, bias, "torch", offset0, **kw)
    y, cs, ss, off = _run(t, bias, "triton", offset0, **kw)
    assert y.dtype == dtype and y.shape == t["x"].shape
    assert torch.equal(cs, cs_ref)  # the window shift is a copy
    assert torch.equal(off, off_ref) and torch.equal(off, offset0 + 1)
    if dtype == torch.float32:
        torch.testing.assert_close(ss, ss_ref, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(y, y_ref, atol=1e-5, rtol=1e-5)
        return
    # bf16: the composed spec rounds x_dbl and delta to bf16 (~1e-2 relative apart) ...
    assert ((ss - ss_ref).norm() / ss_ref.norm()).item() < 3e-2
    assert ((y.float() - y_ref.float()).norm() / y_ref.float().norm()).item() < 3e-2
    # ... the same step with x_dbl in fp32 agrees to rounding.
    y32, cs32, ss32, off32 = _fp32_xdbl_reference(t, bias, offset0, **kw)
    assert torch.equal(cs, cs32) and torch.equal(off, off32)
    torch.testing.assert_close(ss, ss32, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(y.float(), y32.float(), atol=1e-5, rtol=2 ** -7)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("Bsz", [1, 3])
@pytest.mark.parametrize("W", [2, 4])
def test_fused_step_matches_composed(dtype, Bsz, W):
    """E = 149 is not a multiple of any block (three blocks of kernel A, the last masked)."""
    t, bias = _inputs(Bsz, 149, 5, 7, W, dtype)
    _check(t, bias, dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fused_step_options_off(dtype):
    """No conv bias, no D, no z, no dt bias, no softplus, no conv activation."""
    t, _ = _inputs(2, 37, 4, 3, 3, dtype, conv_bias=False, D=False, z=False)
    _check(t, None, dtype, delta_softplus=False, activation=None)
    t, bias = _inputs(2, 37, 4, 3, 3, dtype, conv_bias=False, D=True, z=False)
    _check(t, bias, dtype)


@pytest.mark.parametrize("discretization", ["bilinear", "dirac"])
def test_fused_step_discretizations(discretization):
    t, bias = _inputs(2, 45, 6, 5, 4, torch.float32)
    _check(t, bias, torch.float32, discretization=discretization)


def test_fused_step_chunked_loops():
    """Small blocks reach every loop of the kernels: 10 channel blocks of kernel A summed two at a
    time, a dt rank of 70 taken in chunks of 64, x_proj's 80 rows in chunks."""
    from seqblocks.ops.selective_scan.step_triton import mamba_step_config, mamba_step_triton

    cfg = mamba_step_config(3, 149, 5, 70, block_e_conv=16, block_k=2)
    assert (cfg["NBLK"], cfg["BLOCK_K"], cfg["BLOCK_R"]) == (10, 2, 64)
    t, bias = _inputs(3, 149, 5, 70, 4, torch.float32)
    offset0 = torch.zeros(3, dtype=torch.long)
    y_ref, cs_ref, ss_ref, off_ref = _run(t, bias, "torch", offset0)
    y, cs, ss, off = _run(t, bias, None, offset0, fn=mamba_step_triton, block_e_conv=16, block_k=2)
    assert torch.equal(cs, cs_ref) and torch.equal(off, off_ref)
    torch.testing.assert_close(ss, ss_ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(y, y_ref, atol=1e-5, rtol=1e-5)


def test_fused_step_deterministic():
    t, bias = _inputs(2, 149, 5, 7, 4, torch.bfloat16)
    a = _run(t, bias, "triton", torch.zeros(2, dtype=torch.long))
    b = _run(t, bias, "triton", torch.zeros(2, dtype=torch.long))
    assert all(torch.equal(u, v) for u, v in zip(a, b))


def test_fused_step_refuses_and_falls_back():
    t, bias = _inputs(2, 8, 4, 2, 4, torch.float32)
    t = dict(t, conv_state=t["conv_state"].clone(), ssm_state=t["ssm_state"].clone())
    with pytest.raises(ValueError, match="no Triton kernel"):
        mamba_step(**t, delta_bias=bias, discretization="zoh", backend="triton")
    with _backend.prefer_backend("triton"):  # "auto": zoh runs the composed path, the conv on its kernel
        y = mamba_step(**t, delta_bias=bias, discretization="zoh")
    assert y.shape == (2, 8)
    w = t["x_proj_weight"].clone().requires_grad_()
    with pytest.raises(ValueError, match="no Triton kernel"):  # autograd would record it: no kernel
        mamba_step(**dict(t, x_proj_weight=w), delta_bias=bias, backend="triton")
    y = mamba_step(**dict(t, x_proj_weight=w), delta_bias=bias, backend="torch")
    assert y.requires_grad
    with pytest.raises(ValueError, match="x_proj_weight must have shape"):
        mamba_step(**dict(t, x_proj_weight=t["x_proj_weight"][:-1]), backend="torch")
    with pytest.raises(TypeError, match="x's dtype"):
        mamba_step(**dict(t, dt_proj_weight=t["dt_proj_weight"].double()), backend="torch")
    with pytest.raises(ValueError, match="ssm_state must have shape"):
        mamba_step(**dict(t, ssm_state=t["ssm_state"][:, :, :3]), backend="torch")
    with pytest.raises(ValueError, match="activation"):
        mamba_step(**t, activation="relu")
    with pytest.raises(ValueError, match="discretization"):
        mamba_step(**t, discretization="euler")
    with pytest.raises(TypeError, match="seqlen_offset"):
        mamba_step(**t, seqlen_offset=torch.zeros(2))


# ---- the mixer ----------------------------------------------------------------------------------------------

STEP_OPS = {"mamba_step", "conv_step", "selective_state_update"}


@pytest.fixture
def triton_steps(monkeypatch):
    """Send the decode-step ops' "auto" to their kernels (on the CPU, through the interpreter); the set
    returned collects the ops that ran one."""
    real = _backend.resolve_backend
    served: set[str] = set()
    from seqblocks.layers.mixers.mamba import Mamba

    monkeypatch.setattr(Mamba, "fuse_decode_step", True)  # the default, pinned here (seqblocks/layers/mixers/mamba.py)

    def forced(backend, *tensors, op, has_kernel=True):
        if backend == "auto" and op in STEP_OPS and has_kernel:
            backend = "triton"
        chosen = real(backend, *tensors, op=op, has_kernel=has_kernel)
        if chosen == "triton" and op in STEP_OPS:
            served.add(op)
        return chosen

    for module in ("seqblocks.ops.selective_scan", "seqblocks.ops.selective_scan.step"):
        monkeypatch.setattr(importlib.import_module(module), "resolve_backend", forced)
    return served


def _decode(mixer, x, n_prefill=3, **kw):
    Bsz, T, _ = x.shape
    with torch.no_grad():
        cache = mixer.allocate_inference_cache(Bsz, T)
        ys = [mixer(x[:, :n_prefill], cache, **kw)]
        for t in range(n_prefill, T):
            ys.append(mixer(x[:, t:t + 1], cache, **kw))
    assert torch.equal(cache.seqlen_offset, torch.full((Bsz,), T))
    return torch.cat(ys, 1), cache


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("d_conv", [2, 4])
def test_mamba_decodes_through_the_fused_step(triton_steps, dtype, d_conv):
    from seqblocks.layers.mixers.mamba import Mamba

    torch.manual_seed(1)
    mixer = Mamba(20, d_state=5, d_conv=d_conv, dt_rank=3).to(dtype)
    x = torch.randn(2, 6, 20).to(dtype)
    with torch.no_grad():
        full = mixer(x)
    steps, _ = _decode(mixer, x)
    assert triton_steps == {"mamba_step"}
    tol = {"atol": 1e-5, "rtol": 1e-5} if dtype == torch.float32 else {"atol": 2e-2, "rtol": 2e-2}
    torch.testing.assert_close(steps.float(), full.float(), **tol)


def test_model_decodes_through_the_fused_step(triton_steps):
    """An LM of Mamba layers (bf16): logits of prefill + ``model.step`` equal the full forward's."""
    from seqblocks import LRNNLMHeadModel

    torch.manual_seed(4)
    model = LRNNLMHeadModel(d_model=16, d_state=4, n_layer=2, vocab_size=29, mixer_types=["mamba", "mamba"],
                            dtype=torch.bfloat16).eval()
    ids = torch.randint(0, 29, (2, 5))
    with torch.no_grad():
        full = model(ids).logits
        caches = model.allocate_inference_cache(2, 5)
        outs = [model(ids[:, :2], inference_params=caches).logits]
        outs += [model.step(ids[:, t:t + 1], caches).logits for t in range(2, 5)]
    assert triton_steps == {"mamba_step"}
    torch.testing.assert_close(torch.cat(outs, 1).float(), full.float(), atol=2e-2, rtol=2e-2)


def test_mamba_event_form_keeps_the_unfused_step(triton_steps):
    from seqblocks.layers.mixers.mamba import Mamba

    torch.manual_seed(2)
    mixer = Mamba(12, d_state=4)
    x, ts = torch.randn(2, 5, 12), torch.rand(2, 5) + 0.5
    with torch.no_grad():
        full = mixer(x, integration_timesteps=ts)
        cache = mixer.allocate_inference_cache(2, 5)
        ys = [mixer(x[:, :2], cache, integration_timesteps=ts[:, :2])]
        ys += [mixer(x[:, t:t + 1], cache, integration_timesteps=ts[:, t]) for t in range(2, 5)]
    assert triton_steps == {"conv_step", "selective_state_update"}
    torch.testing.assert_close(torch.cat(ys, 1), full, atol=1e-5, rtol=1e-5)


def _hook(m, args, out):
    m.calls = getattr(m, "calls", 0) + 1


@pytest.mark.parametrize("change", ["forward_hook", "forward_pre_hook", "global_hook", "x_proj_bias", "subclass",
                                    "autocast"])
def test_mamba_keeps_the_module_path_when_fusing_would_differ(triton_steps, change):
    """A hooked, biased or subclassed x_proj, a global module hook or an autocast region: the step calls
    the modules (four GEMMs) and gives what the fused step gives where the function is the same."""
    from seqblocks.layers.mixers.mamba import Mamba

    torch.manual_seed(3)
    mixer = Mamba(12, d_state=4, dt_rank=2)
    x = torch.randn(2, 5, 12)
    fused, _ = _decode(mixer, x)
    assert triton_steps == {"mamba_step"}
    triton_steps.clear()
    handle, context = None, torch.autocast("cpu", enabled=False)
    if change == "forward_hook":
        handle = mixer.x_proj.register_forward_hook(_hook)
    elif change == "forward_pre_hook":
        handle = mixer.x_proj.register_forward_pre_hook(lambda m, args: _hook(m, args, None))
    elif change == "global_hook":
        handle = nn.modules.module.register_module_forward_hook(_hook)
    elif change == "x_proj_bias":
        old = mixer.x_proj
        mixer.x_proj = nn.Linear(old.in_features, old.out_features, bias=True)
        with torch.no_grad():
            mixer.x_proj.weight.copy_(old.weight)
            mixer.x_proj.bias.zero_()
    elif change == "subclass":
        old = mixer.x_proj
        mixer.x_proj = type("MyLinear", (nn.Linear,), {})(old.in_features, old.out_features, bias=False)
        mixer.x_proj.load_state_dict(old.state_dict())
    else:
        context = torch.autocast("cpu", dtype=torch.bfloat16)
    try:
        with context:
            cache_x = mixer.allocate_inference_cache(2, 5)
            with torch.no_grad():
                mixer(x[:, :3], cache_x)
                assert mixer._fuses_step(mixer.in_proj(x[:, 3])) is False
                triton_steps.clear()
                mixer.x_proj.calls = 0  # the prefill called it too
                ys = [mixer(x[:, t:t + 1], cache_x) for t in range(3, 5)]
    finally:
        if handle is not None:
            handle.remove()
    assert "mamba_step" not in triton_steps
    if change == "autocast":
        return  # bf16 GEMMs: a different function by design
    assert triton_steps == {"conv_step", "selective_state_update"}
    if change in ("forward_hook", "forward_pre_hook"):
        assert mixer.x_proj.calls == 2
    torch.testing.assert_close(torch.cat(ys, 1), fused[:, 3:], atol=1e-5, rtol=1e-5)


if not INTERPRETER:
    # Outside the interpreter the cases above run in the child process only (see the module docstring);
    # the sm_90 compile check and the GPU cases stay.
    for _name in [n for n in list(globals()) if n.startswith("test_") and not n.startswith(("test_gpu", "test_sm90"))
                  and n != "test_kernels_under_interpreter"]:
        del globals()[_name]


# ---- sm_90 resources and GPU shapes -------------------------------------------------------------------------

# (E, N, R): mamba-130m's layer and a 2.8b-sized one.
REAL_SHAPES = [(1536, 16, 48), (5120, 16, 160)]


if not INTERPRETER:  # compiled on the host (the child under the interpreter would only skip it)

    @pytest.mark.parametrize(("E", "N", "R"), REAL_SHAPES)
    @pytest.mark.parametrize("Bsz", [1, 8])
    def test_sm90_fused_step_fits(E, N, R, Bsz, tmp_path):
        """Both kernels compile for sm_90 at the block sizes the launcher picks, with no local memory
        (spills); the register counts are printed (``-s``)."""
        pytest.importorskip("triton.backends.nvidia", reason="Triton's NVIDIA backend is not installed")
        from sm90 import compile_for_sm90, resource_usage

        from seqblocks.ops.selective_scan import step_triton as k

        cfg = k.mamba_step_config(Bsz, E, N, R)
        bf, f32, i32 = "*bf16", "*fp32", "i32"
        a = compile_for_sm90(k._mamba_conv_xproj_kernel, {
            "x_ptr": bf, "cs_ptr": bf, "cw_ptr": bf, "cb_ptr": bf, "wx_ptr": bf, "xs_ptr": bf, "part_ptr": f32,
            "off_ptr": "*i64", **{n: i32 for n in ("E", "J", "NBLK", "sxb", "sxe", "ssb", "ssw", "sse", "swe", "sww",
                                                    "swxj", "swxe", "sxsb")}},
            {"W": 4, "WP": 4, "HAS_BIAS": True, "SILU": True, "ADVANCE": True, "BLOCK_E": cfg["BLOCK_E_A"],
             "BLOCK_J": cfg["BLOCK_J"]}, cfg["WARPS_A"])
        b = compile_for_sm90(k._mamba_dt_ssu_kernel, {
            "part_ptr": f32, "wdt_ptr": bf, "xs_ptr": bf, "z_ptr": bf, "state_ptr": f32, "a_ptr": f32, "d_ptr": f32,
            "bias_ptr": f32, "y_ptr": bf, **{n: i32 for n in ("E", "N", "R", "J", "NBLK", "swde", "swdr", "sxsb", "szb",
                                                              "sze", "ssb", "sse", "ssn", "sae", "san", "syb")}},
            {"METHOD": 0, "A_IS_LOG": True, "SOFTPLUS": True, "HAS_D": True, "HAS_Z": True, "HAS_BIAS": True,
             "BLOCK_E": cfg["BLOCK_E"], "BLOCK_N": cfg["BLOCK_N"], "BLOCK_R": cfg["BLOCK_R"],
             "BLOCK_K": cfg["BLOCK_K"]}, cfg["WARPS_B"])
        usage = [resource_usage(a, str(tmp_path)), resource_usage(b, str(tmp_path))]
        assert a.asm["cubin"] and b.asm["cubin"]
        print(f"\nE={E} N={N} R={R} B={Bsz} {cfg}: kernel A {usage[0]}, kernel B {usage[1]}")
        if usage[0] is not None:
            assert all(u["LOCAL"] == 0 for u in usage), usage


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize(("E", "N", "R"), REAL_SHAPES)
@pytest.mark.parametrize("Bsz", [1, 8])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_gpu_fused_step_at_real_shapes(E, N, R, Bsz, dtype):
    """On CUDA ("auto" takes the kernels): the fused step against the composed one, and replayed from a
    captured CUDA graph equal to eager."""
    t, bias = _inputs(Bsz, E, N, R, 4, dtype, device="cuda")
    _check(t, bias, dtype)
    offset0 = torch.zeros(Bsz, dtype=torch.long, device="cuda")
    y_eager, cs_eager, ss_eager, off_eager = _run(t, bias, "auto", offset0)
    conv_state, ssm_state, off = t["conv_state"].clone(), t["ssm_state"].clone(), offset0.clone()
    args = dict(t, conv_state=conv_state, ssm_state=ssm_state)
    with torch.no_grad():
        mamba_step(**dict(args, conv_state=conv_state.clone(), ssm_state=ssm_state.clone()), delta_bias=bias,
                   a_is_log=True, seqlen_offset=off.clone())  # warm-up: compile outside the capture
        torch.cuda.synchronize()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            y = mamba_step(**args, delta_bias=bias, a_is_log=True, seqlen_offset=off)
        conv_state.copy_(t["conv_state"])
        ssm_state.copy_(t["ssm_state"])
        off.copy_(offset0)
        graph.replay()
    torch.cuda.synchronize()
    assert torch.equal(y, y_eager) and torch.equal(ssm_state, ss_eager)
    assert torch.equal(conv_state, cs_eager) and torch.equal(off, off_eager)

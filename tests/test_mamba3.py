"""Mamba-3: the op (sequential reference == chunked PyTorch path, forward and every gradient; SISO and MIMO;
odd lengths, initial state, lengths, cu_seqlens, bf16; the decode step; errors) and the ``Mamba3`` mixer
beyond the contract tests (mamba_ssm's names and defaults, options, presets, packed sequences, compile,
save / load). Parity with mamba_ssm's own ``Mamba3`` is the ``gpu`` test at the end (mamba_ssm needs CUDA)."""

from __future__ import annotations

import json
import os
import sys

import pytest
import torch
import torch.nn.functional as F

from seqblocks.layers.mixers import Mamba3
from seqblocks.ops.mamba3 import Mamba3State, mamba3, mamba3_ref, mamba3_step, zero_state
from seqblocks.presets import build_model, load_config
from seqblocks.registry import MIXERS
from seqblocks.testing import assert_close, check_prefill_then_steps

H, P, N, S = 2, 4, 8, 2
TIMED = ("q", "k", "v", "adt", "dt", "trap", "angles", "z")  # the inputs with a time axis


def make_inputs(Bsz, T, R, G=1, mimo=False, dtype=torch.float64, seed=0, heads=H):
    g = torch.Generator().manual_seed(seed)

    def r(*shape, scale=1.0):
        return (scale * torch.randn(*shape, generator=g, dtype=torch.float64)).to(dtype)

    dt = F.softplus(r(Bsz, T, heads).double() - 1).to(dtype)
    inputs = {
        "q": r(Bsz, T, R, G, N), "k": r(Bsz, T, R, G, N), "v": r(Bsz, T, heads, P),
        "adt": (-torch.rand(Bsz, T, heads, generator=g, dtype=torch.float64) * dt.double()).to(dtype), "dt": dt,
        "trap": r(Bsz, T, heads), "q_bias": r(heads, R, N), "k_bias": r(heads, R, N), "angles": r(Bsz, T, heads, S),
        "D": r(heads), "z": r(Bsz, T, heads, P),
    }
    if mimo:
        inputs.update(mimo_v=r(heads, R, P), mimo_z=r(heads, R, P), mimo_o=r(heads, R, P))
    return inputs


def random_state(rows, R, seed=1, heads=H):
    g = torch.Generator().manual_seed(seed)
    state = Mamba3State(*(torch.randn(*s.shape, generator=g, dtype=torch.float64)
                          for s in zero_state(rows, heads, P, N, R, S, device="cpu", dtype=torch.float64)))
    return state._replace(angle=torch.remainder(3 * state.angle, 2 * torch.pi))  # angles are kept in [0, 2 pi)


def split(inputs):
    args = [inputs[k] for k in ("q", "k", "v", "adt", "dt", "trap", "q_bias", "k_bias", "angles", "D", "z")]
    kwargs = {k: inputs[k] for k in ("mimo_v", "mimo_z", "mimo_o") if k in inputs}
    return args, kwargs


def outputs_and_grads(fn, inputs, state, **kw):
    leaves = {k: v.detach().clone().requires_grad_() for k, v in inputs.items()}
    st = None if state is None else Mamba3State(*(s.detach().clone().requires_grad_() for s in state))
    args, kwargs = split(leaves)
    y, final = fn(*args, **kwargs, initial_state=st, return_final_state=True, **kw)
    g = torch.Generator().manual_seed(7)
    outs = [y, *final]
    loss = sum((o * torch.randn(o.shape, generator=g, dtype=torch.float64).to(o.dtype)).sum()
               for o in outs)  # a random cotangent on each output, the same in every dtype
    named = {**leaves, **({} if st is None else {f"state.{f}": t for f, t in zip(Mamba3State._fields, st)})}
    grads = torch.autograd.grad(loss, list(named.values()), allow_unused=True)
    return outs, dict(zip(named, grads))


CASES = [(False, 1, 1), (True, 2, 1), (False, 1, 2)]  # (mimo, R, G); G = 2 with 4 heads


@pytest.mark.parametrize(("mimo", "R", "G"), CASES, ids=["siso", "mimo", "siso-groups"])
@pytest.mark.parametrize("T", [1, 7, 63, 65])
def test_chunked_equals_reference_forward_and_backward(mimo, R, G, T):
    heads = 4 if G == 2 else H
    inputs = make_inputs(2, T, R, G, mimo, heads=heads)
    state = random_state(2, R, heads=heads) if T != 63 else None
    ref_out, ref_grads = outputs_and_grads(mamba3_ref, inputs, state)
    out, grads = outputs_and_grads(mamba3, inputs, state, chunk_size=16)
    for name, a, b in zip(("y", *Mamba3State._fields), out, ref_out):
        assert_close(a, b, atol=1e-9, rtol=1e-9, msg=name)
    for name, g in ref_grads.items():
        assert g is not None and grads[name] is not None, name
        assert_close(grads[name], g, atol=1e-9, rtol=1e-9, msg=f"d{name}")


@pytest.mark.parametrize(("mimo", "R"), [(False, 1), (True, 2)], ids=["siso", "mimo"])
def test_lengths_equal_each_row_alone_and_padding_is_inert(mimo, R):
    inputs = make_inputs(3, 13, R, mimo=mimo)
    state = random_state(3, R)
    lengths = torch.tensor([13, 0, 6])
    args, kwargs = split(inputs)
    padded = {k: v.clone() for k, v in inputs.items()}
    for key in ("q", "k", "v", "adt", "dt", "trap", "angles", "z"):
        padded[key][2, 6:] = float("nan")  # padding neither reads nor writes anything
    pargs, _ = split(padded)
    out, final = mamba3(*pargs, **kwargs, initial_state=state, return_final_state=True, lengths=lengths,
                        chunk_size=4)
    ref, ref_final = mamba3_ref(*args, **kwargs, initial_state=state, return_final_state=True, lengths=lengths)
    assert_close(out, ref, atol=1e-10)
    assert torch.equal(out[1], torch.zeros_like(out[1])) and torch.equal(out[2, 6:], torch.zeros_like(out[2, 6:]))
    for a, b in zip(final, ref_final):
        assert_close(a, b, atol=1e-10)
    for a, b in zip(final, state):  # an empty row keeps its initial state
        assert_close(a[1], b[1], atol=0)
    for b, n in enumerate(lengths.tolist()):
        alone, _ = split({k: v[b: b + 1, :n] if k in TIMED else v for k, v in inputs.items()})
        y, f = mamba3(*alone, **kwargs, initial_state=Mamba3State(*(s[b: b + 1] for s in state)),
                      return_final_state=True, chunk_size=4)
        assert_close(out[b: b + 1, :n], y, atol=1e-10)
        for a, c in zip(final, f):
            assert_close(a[b: b + 1], c, atol=1e-10)


@pytest.mark.parametrize(("mimo", "R"), [(False, 1), (True, 2)], ids=["siso", "mimo"])
def test_cu_seqlens_equal_separate_sequences_forward_and_backward(mimo, R):
    cu = torch.tensor([0, 5, 5, 17, 20])
    inputs = make_inputs(1, 20, R, mimo=mimo)
    state = random_state(4, R)
    out, grads = outputs_and_grads(mamba3, inputs, state, cu_seqlens=cu, chunk_size=4)
    ref_out, ref_grads = outputs_and_grads(mamba3_ref, inputs, state, cu_seqlens=cu)
    for a, b in zip(out, ref_out):
        assert_close(a, b, atol=1e-10)
    for name, g in ref_grads.items():
        assert_close(grads[name], g, atol=1e-9, msg=f"d{name}")
    args, kwargs = split(inputs)
    y2, f2 = mamba3(*split({k: v[:, 5:17] if k in TIMED else v for k, v in inputs.items()})[0], **kwargs,
                    initial_state=Mamba3State(*(s[2:3] for s in state)), return_final_state=True)
    assert_close(out[0][:, 5:17], y2, atol=1e-10)  # the state restarts at every boundary
    assert_close(out[2][2:3], f2.ssm, atol=1e-10)


@pytest.mark.parametrize(("mimo", "R"), [(False, 1), (True, 2)], ids=["siso", "mimo"])
def test_bf16_inputs_fp32_state(mimo, R):
    inputs = make_inputs(2, 33, R, mimo=mimo)
    args, kwargs = split(inputs)
    ref = mamba3_ref(*args, **kwargs)
    low = {k: (v.to(torch.bfloat16) if k not in ("adt", "dt") else v.float()) for k, v in inputs.items()}
    largs, lkw = split(low)
    y, final = mamba3(*largs, **lkw, return_final_state=True, chunk_size=8)
    assert y.dtype == torch.bfloat16 and all(s.dtype == torch.float32 for s in final)
    # bf16 rounding of the inputs only: the scan accumulates in fp32.
    rounded = mamba3_ref(*[t.double() for t in largs], **{k: v.double() for k, v in lkw.items()})
    assert_close(y.double(), rounded, atol=2e-2 * rounded.abs().max().item())
    assert_close(y.double(), ref, atol=0.15 * ref.abs().max().item())


@pytest.mark.parametrize(("mimo", "R"), [(False, 1), (True, 3)], ids=["siso", "mimo"])
def test_decode_steps_equal_the_full_pass(mimo, R):
    inputs = make_inputs(2, 9, R, mimo=mimo)
    args, kwargs = split(inputs)
    state = random_state(2, R)
    full, final = mamba3(*args, **kwargs, initial_state=state, return_final_state=True, chunk_size=4)
    live = Mamba3State(*(s.clone() for s in state))
    ys = []
    for t in range(9):
        step_args, _ = split({k: v[:, t] if k in TIMED else v for k, v in inputs.items()})
        ys.append(mamba3_step(live, *step_args, **kwargs))
    assert_close(torch.stack(ys, 1), full, atol=1e-10)
    for a, b in zip(live, final):
        assert_close(a, b, atol=1e-10)


def test_mimo_without_out_projection_keeps_ranks():
    inputs = make_inputs(1, 5, 2, mimo=True)
    inputs.pop("mimo_o")
    inputs["z"] = None
    args, kwargs = split({k: v for k, v in inputs.items()})
    y = mamba3(*args, **kwargs)
    assert y.shape == (1, 5, 2, H, P)
    assert_close(y, mamba3_ref(*args, **kwargs), atol=1e-10)


def test_errors_name_the_argument():
    inputs = make_inputs(1, 4, 1)
    args, _ = split(inputs)
    with pytest.raises(ValueError, match="adt"):
        mamba3(*args[:3], args[3][:, :2], *args[4:])
    with pytest.raises(ValueError, match="even"):
        bad = make_inputs(1, 4, 1)
        bad["q"], bad["k"] = bad["q"][..., :7], bad["k"][..., :7]
        mamba3(*split(bad)[0])
    with pytest.raises(ValueError, match="MIMO"):
        mamba3(*split(make_inputs(1, 4, 2))[0])
    with pytest.raises(ValueError, match="at most N / 2"):
        wide = make_inputs(1, 4, 1)
        wide["angles"] = torch.zeros(1, 4, H, N // 2 + 1, dtype=torch.float64)
        mamba3(*split(wide)[0])
    with pytest.raises(TypeError, match="v must be a Tensor"):
        mamba3(*args[:2], [1.0], *args[3:])
    with pytest.raises(ValueError, match="lengths must lie"):
        mamba3(*args, lengths=torch.tensor([5]))
    with pytest.raises(ValueError, match="either lengths or cu_seqlens"):
        mamba3(*args, lengths=torch.tensor([4]), cu_seqlens=torch.tensor([0, 4]))
    with pytest.raises(ValueError, match="initial_state.ssm"):
        st = random_state(1, 1)
        mamba3(*args, initial_state=st._replace(ssm=st.ssm[..., :3]))
    with pytest.raises(ValueError, match="no Triton kernel"):
        mamba3(*args, backend="triton")
    with pytest.raises(ValueError, match="chunk_size"):
        mamba3(*args, chunk_size=0)


# The mixer.

def test_registered_under_both_spellings_with_mamba_ssm_defaults_and_names():
    assert MIXERS.get("mamba3") is Mamba3 and MIXERS.get("Mamba3") is Mamba3
    config = Mamba3.config_class()(d_model=64)
    assert (config.d_state, config.expand, config.headdim, config.ngroups, config.rope_fraction) == (128, 2, 64, 1, 0.5)
    assert (config.dt_min, config.dt_max, config.dt_init_floor, config.A_floor) == (0.001, 0.1, 1e-4, 1e-4)
    assert (config.is_outproj_norm, config.is_mimo, config.mimo_rank, config.chunk_size) == (False, False, 4, 64)
    assert type(config).from_json(config.to_json()) == config
    m = Mamba3(64)
    names = {k for k, _ in m.named_parameters()}
    assert names == {"in_proj.weight", "dt_bias", "B_bias", "C_bias", "B_norm.weight", "C_norm.weight", "D",
                     "out_proj.weight"}
    # [z, x, B, C, dd_dt, dd_A, trap, angles]: 2 * 128 + 2 * 128 + 3 * 2 + 128 / 4
    assert m.in_proj.out_features == 2 * 128 + 2 * 128 + 3 * 2 + 32 and m.B_bias.shape == (2, 1, 128)
    dt = F.softplus(m.dt_bias)
    assert ((dt >= 1e-4 * 0.999) & (dt <= 0.1 * 1.001)).all()
    mimo = Mamba3(64, is_mimo=True, mimo_rank=2, is_outproj_norm=True)
    assert {"mimo_x", "mimo_z", "mimo_o", "norm.weight"} <= {k for k, _ in mimo.named_parameters()}
    assert torch.allclose(mimo.mimo_x, torch.full_like(mimo.mimo_x, 0.5)) and mimo.C_bias.shape == (2, 2, 128)
    cast = mimo.to(torch.bfloat16)
    assert cast.dt_bias.dtype == cast.mimo_o.dtype == cast.B_bias.dtype == torch.float32
    assert cast.in_proj.weight.dtype == torch.bfloat16


@pytest.mark.parametrize("kwargs", [
    {"is_outproj_norm": True},
    {"is_mimo": True, "mimo_rank": 2},
    {"is_mimo": True, "mimo_rank": 2, "is_outproj_norm": True, "rope_fraction": 1.0},
    {"ngroups": 2},
], ids=["outproj-norm", "mimo", "mimo-outproj-norm-full-rope", "groups"])
def test_options_prefill_then_steps(kwargs):
    torch.manual_seed(0)
    m = Mamba3(16, d_state=8, headdim=8, chunk_size=4, dtype=torch.float64, **kwargs).eval()
    x = torch.randn(2, 9, 16, dtype=torch.float64)
    check_prefill_then_steps(m, x, prefill=5, atol=1e-10)


def test_packed_sequences_equal_separate_calls_and_fill_a_cache():
    torch.manual_seed(0)
    m = Mamba3(16, d_state=8, headdim=8, chunk_size=4, dtype=torch.float64).eval()
    x = torch.randn(1, 12, 16, dtype=torch.float64)
    cu = torch.tensor([0, 7, 12])
    cache = m.allocate_inference_cache(2, 20, dtype=torch.float64)
    y = m(x, cache, cu_seqlens=cu)
    assert_close(y[:, :7], m(x[:, :7]), atol=1e-10)
    assert_close(y[:, 7:], m(x[:, 7:]), atol=1e-10)
    assert cache.seqlen_offset.tolist() == [7, 5]
    nxt = torch.randn(2, 1, 16, dtype=torch.float64)
    stepped = m.step(nxt, cache)
    assert_close(stepped[0], m(torch.cat([x[:, :7], nxt[:1]], 1))[0, -1:], atol=1e-10)
    assert_close(stepped[1], m(torch.cat([x[:, 7:], nxt[1:]], 1))[0, -1:], atol=1e-10)
    with pytest.raises(ValueError):
        m(x, m.allocate_inference_cache(3, 20), cu_seqlens=cu)


def test_bf16_module_follows_fp32():
    torch.manual_seed(0)
    m = Mamba3(32, d_state=16, headdim=16, chunk_size=8)
    x = torch.randn(2, 20, 32)
    ref = m(x)
    low = m.to(torch.bfloat16)
    y = low(x.to(torch.bfloat16))
    assert y.dtype == torch.bfloat16 and torch.isfinite(y).all()
    assert_close(y.float(), ref, atol=0.05 * ref.abs().max().item())
    y.float().square().sum().backward()
    assert low.dt_bias.grad is not None and low.dt_bias.grad.dtype == torch.float32


def test_compiles_and_matches_eager():
    torch.manual_seed(0)
    m = Mamba3(16, d_state=8, headdim=8, chunk_size=4).eval()
    x = torch.randn(2, 9, 16)
    compiled = torch.compile(m, backend="eager", fullgraph=False)
    assert_close(compiled(x), m(x), atol=1e-5)


def test_save_load_round_trip(tmp_path):
    torch.manual_seed(0)
    m = Mamba3(16, d_state=8, headdim=8, is_mimo=True, mimo_rank=2)
    torch.save(m.state_dict(), tmp_path / "m.pt")
    other = Mamba3(16, d_state=8, headdim=8, is_mimo=True, mimo_rank=2)
    other.load_state_dict(torch.load(tmp_path / "m.pt"))
    x = torch.randn(1, 6, 16)
    assert torch.equal(other(x), m(x))


def test_tuning_errors():
    from seqblocks.ops.mamba3 import Mamba3Tuning

    with pytest.raises(ValueError, match="rows=24 must be a power of two >= 16"):
        Mamba3Tuning(rows=24)
    with pytest.raises(ValueError, match="block_n=8"):
        Mamba3Tuning(block_n=8)
    with pytest.raises(ValueError, match="bwd_num_warps=3"):
        Mamba3Tuning(bwd_num_warps=3)
    with pytest.raises(ValueError, match="num_stages=0"):
        Mamba3Tuning(num_stages=0)
    with pytest.raises(TypeError, match="block_p must be an int, got None"):
        Mamba3Tuning(block_p=None)
    args, _ = split(make_inputs(1, 4, 1))
    with pytest.raises(TypeError, match="tuning must be a Mamba3Tuning"):
        mamba3(*args, tuning={"rows": 16})
    step_args, _ = split({k: v[:, 0] if k in TIMED else v for k, v in make_inputs(1, 4, 1).items()})
    with pytest.raises(TypeError, match="tuning must be a Mamba3Tuning"):
        mamba3_step(random_state(1, 1), *step_args, tuning=16)


def test_constructor_errors():
    with pytest.raises(ValueError, match="headdim"):
        Mamba3(16, headdim=7)
    with pytest.raises(ValueError, match="rope_fraction"):
        Mamba3(16, headdim=8, rope_fraction=0.25)
    with pytest.raises(ValueError, match="even"):
        Mamba3(16, headdim=8, d_state=7)
    with pytest.raises(ValueError, match="ngroups"):
        Mamba3(16, headdim=8, ngroups=3)


@pytest.mark.parametrize("name", ["tiny-mamba3", "mamba3-130m"])
def test_presets_build(name):
    config = load_config(name)
    assert "mamba3" in config["model"]["mixer_types"]
    json.dumps(config)
    if name == "tiny-mamba3":
        torch.manual_seed(0)
        model = build_model(config["model"]).eval()
        ids = torch.randint(0, 98, (1, 12))
        packed = model(ids, cu_seqlens=torch.tensor([0, 5, 12])).logits  # reaches every Mamba3 layer
        assert packed.shape[:2] == (1, 12)
        assert_close(packed[:, :5], model(ids[:, :5]).logits, atol=1e-4)
        assert_close(packed[:, 5:], model(ids[:, 5:]).logits, atol=1e-4)


@pytest.mark.gpu
@pytest.mark.parametrize("kwargs", [{}, {"is_outproj_norm": True}, {"ngroups": 2},
                                    {"is_mimo": True, "mimo_rank": 4, "chunk_size": 16}],
                         ids=["siso", "siso-outproj-norm", "siso-groups", "mimo"])
def test_matches_mamba_ssm_mamba3(kwargs):
    """A randomly initialised mamba_ssm ``Mamba3`` (its Triton / TileLang kernels, bf16) loads into ours
    unchanged and gives the same output, at a real shape."""
    build_dir = os.environ.get("SEQBLOCKS_ANCHORS")  # /work/shared/anchors/build_anchors.py's BUILD_DIR
    if build_dir:
        sys.path[:0] = [build_dir, "/work/shared/anchors"]
        import build_anchors
        build_anchors.activate(build_dir)
    pytest.importorskip("mamba_ssm")
    try:
        from mamba_ssm.modules.mamba3 import Mamba3 as Theirs
        theirs = Theirs(d_model=768, d_state=128, headdim=64, layer_idx=0, device="cuda", dtype=torch.bfloat16,
                        **kwargs)
    except (ImportError, AssertionError) as err:  # MIMO needs TileLang
        pytest.skip(f"mamba_ssm's Mamba3 with {kwargs} is not available: {err}")
    torch.manual_seed(0)
    with torch.no_grad():
        for p in theirs.parameters():
            p.add_(0.1 * torch.randn_like(p))
    ours = Mamba3(768, d_state=128, headdim=64, device="cuda", dtype=torch.bfloat16, **kwargs)
    ours.load_state_dict(theirs.state_dict(), strict=True)
    x = torch.randn(2, 512, 768, device="cuda", dtype=torch.bfloat16)
    ref = theirs(x).float()
    y = ours(x).float()
    # mamba_ssm rounds q / k / v / trap / angles to bf16 inside its kernels and uses approximate sin / cos.
    assert_close(y, ref, atol=3e-2 * ref.abs().max().item())


@pytest.mark.parametrize("kwargs", [{}, {"is_mimo": True, "mimo_rank": 2}], ids=["siso", "mimo"])
def test_bidirectional_sees_both_ways_per_row_and_per_packed_sequence(kwargs):
    torch.manual_seed(0)
    m = Mamba3(16, d_state=8, headdim=8, chunk_size=4, bidirectional=True, dtype=torch.float64, **kwargs).eval()
    assert m.causal is False and Mamba3.config_class()(d_model=16).bidirectional is False
    x = torch.randn(3, 9, 16, dtype=torch.float64)
    y = m(x)
    x2 = x.clone()
    x2[:, 7] += 1.0
    assert not torch.allclose(m(x2)[:, :7], y[:, :7])  # a later token moves earlier outputs
    lengths = torch.tensor([9, 4, 6])
    padded = m(x, lengths=lengths)
    for b, n in enumerate(lengths.tolist()):
        assert_close(padded[b, :n], m(x[b: b + 1, :n])[0], atol=1e-10)
    packed = m(torch.cat([x[0, :4], x[1, :5]]).unsqueeze(0), cu_seqlens=torch.tensor([0, 4, 9]))
    assert_close(packed[0, :4], m(x[:1, :4])[0], atol=1e-10)
    assert_close(packed[0, 4:], m(x[1:2, :5])[0], atol=1e-10)
    with pytest.raises(ValueError, match="not causal"):
        m.allocate_inference_cache(1, 8)

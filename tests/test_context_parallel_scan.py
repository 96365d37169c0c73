"""Context-parallel scans and the mixers built on them (``seqblocks.parallel.scan`` / ``conv``): gloo
processes each holding one time chunk compute what one process computes on the whole sequence, in
float64: outputs, the final state, and the gradient of every input (random cotangents on the outputs
and on the final state). One spawn of three processes runs every case on a group of two and on all
three (four in a ``slow`` test) and writes its results to files; the parent compares them with the
single-process op. Time-sharded gradients are concatenated over the
ranks, gradients of inputs every rank holds whole (parameters, initial states) summed."""

from __future__ import annotations

import os
import socket
import zlib

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from seqblocks.ops.causal_conv1d import causal_conv1d
from seqblocks.ops.delta_rule import delta_rule, gated_delta_rule
from seqblocks.ops.gla import gla, simple_gla
from seqblocks.ops.scan import linear_scan
from seqblocks.ops.selective_scan import selective_scan
from seqblocks.ops.ssd import ssd
from seqblocks.parallel import context_parallel
from seqblocks.parallel.conv import causal_conv1d_cp
from seqblocks.parallel.scan import (
    delta_rule_cp,
    gated_delta_rule_cp,
    gla_cp,
    linear_scan_cp,
    selective_scan_cp,
    simple_gla_cp,
    ssd_cp,
)

TOTAL = 12  # tokens of the full sequence: 6 / 4 / 3 per rank over 2 / 3 / 4 ranks
# Packed documents: one empty, one crossing chunk boundaries, one starting exactly on a boundary (W = 3).
CU_A = [0, 3, 3, 7, 8, 12]
CU_B = [0, 1, 11, 12]  # a document that spans every middle chunk (its state passes through them)
DT = torch.float64


def _gen(name: str, salt: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(zlib.crc32(name.encode()) + salt)


def _r(g, *shape, dtype=DT):
    return torch.randn(*shape, generator=g, dtype=dtype)


def _cu(bounds):
    return torch.tensor(bounds, dtype=torch.int64)


def _op_cases() -> list[dict]:
    """Each case: full-sequence ``sharded`` (time dim 1) and ``replicated`` tensor inputs, ``static``
    keyword inputs, the plain op ``ref`` and its context-parallel ``cp`` (both return (out, final))."""
    cases = []

    def case(name, ref, cpf, sharded, replicated=None, static=None, tol=1e-9):
        cases.append(dict(name=name, ref=ref, cp=cpf, sharded=sharded, replicated=replicated or {},
                          static=static or {}, tol=tol))

    T = TOTAL
    # ---- linear scan
    g = _gen("ls_real")
    case("ls_real", linear_scan, linear_scan_cp,
         {"a": torch.rand(2, T, 3, generator=g, dtype=DT) * 1.6 - 0.8, "b": _r(g, 2, T, 3)},
         {"initial_state": _r(g, 2, 3)})
    g = _gen("ls_complex")
    a = torch.polar(torch.rand(2, T, 2, 2, generator=g, dtype=DT) * 0.3 + 0.65,
                    torch.rand(2, T, 2, 2, generator=g, dtype=DT) * 3)
    case("ls_complex", linear_scan, linear_scan_cp, {"a": a, "b": torch.complex(_r(g, 2, T, 2, 2), _r(g, 2, T, 2, 2))},
         {"initial_state": torch.complex(_r(g, 2, 2, 2), _r(g, 2, 2, 2))})
    g = _gen("ls_lengths")
    case("ls_lengths_invariant_a", linear_scan, linear_scan_cp, {"b": _r(g, 3, T, 4)},
         {"a": torch.rand(4, generator=g, dtype=DT) * 0.5 + 0.45, "initial_state": _r(g, 3, 4)},
         {"lengths": torch.tensor([T, 5, 0])})
    g = _gen("ls_reverse")
    case("ls_reverse_lengths", linear_scan, linear_scan_cp,
         {"a": torch.rand(2, T, 3, generator=g, dtype=DT) * 0.9, "b": _r(g, 2, T, 3)},
         {"initial_state": _r(g, 2, 3)}, {"reverse": True, "lengths": torch.tensor([7, T])})
    g = _gen("ls_packed")
    case("ls_packed", linear_scan, linear_scan_cp,
         {"a": torch.rand(1, T, 3, generator=g, dtype=DT) * 0.9 + 0.05, "b": _r(g, 1, T, 3)},
         {"initial_state": _r(g, 5, 3)}, {"cu_seqlens": _cu(CU_A)})
    g = _gen("ls_packed_rev")
    case("ls_packed_reverse", linear_scan, linear_scan_cp,
         {"a": torch.rand(1, T, 3, generator=g, dtype=DT) * 0.9 + 0.05, "b": _r(g, 1, T, 3)},
         {"initial_state": _r(g, 3, 3)}, {"cu_seqlens": _cu(CU_B), "reverse": True})

    # ---- selective scan
    D, N = 4, 3

    def sel_inputs(name, Bsz=2, groups=None, complex_A=False):
        g = _gen(name)
        bc = (Bsz, T, groups, N) if groups else (Bsz, T, N)
        sharded = {"u": _r(g, Bsz, T, D), "delta": _r(g, Bsz, T, D) * 0.5, "B": _r(g, *bc), "C": _r(g, *bc),
                   "z": _r(g, Bsz, T, D)}
        A = -torch.rand(D, N, generator=g, dtype=DT) - 0.2
        if complex_A:
            A = torch.complex(A, torch.rand(D, N, generator=g, dtype=DT) * 2)
        replicated = {"A": A, "D": _r(g, D), "delta_bias": _r(g, D) * 0.3}
        return g, sharded, replicated

    g, sh, rep = sel_inputs("sel_mamba", groups=2)
    rep["initial_state"] = _r(g, 2, D, N)
    case("sel_mamba_grouped", selective_scan, selective_scan_cp, sh, rep, {"delta_softplus": True})
    g, sh, rep = sel_inputs("sel_complex", complex_A=True)
    rep["initial_state"] = torch.complex(_r(g, 2, D, N), _r(g, 2, D, N))
    case("sel_complex", selective_scan, selective_scan_cp, sh, rep, {"delta_softplus": True})
    g, sh, rep = sel_inputs("sel_bilinear")
    case("sel_bilinear_lengths", selective_scan, selective_scan_cp, sh, rep,
         {"delta_softplus": True, "discretization": "bilinear", "lengths": torch.tensor([5, T])})
    g, sh, rep = sel_inputs("sel_event", Bsz=1)
    sh["delta_A"] = torch.rand(1, T, D, generator=g, dtype=DT)
    rep["initial_state"] = _r(g, 5, D, N)
    case("sel_event_packed", selective_scan, selective_scan_cp, sh, rep,
         {"delta_softplus": True, "cu_seqlens": _cu(CU_A)})
    g, sh, rep = sel_inputs("sel_zoh", Bsz=1)
    case("sel_zoh_packed", selective_scan, selective_scan_cp, sh, rep,
         {"delta_softplus": True, "discretization": "zoh", "cu_seqlens": _cu(CU_B)})

    # ---- SSD
    H, P, G = 4, 2, 2

    def ssd_inputs(name, Bsz=2):
        g = _gen(name)
        sharded = {"x": _r(g, Bsz, T, H, P), "dt": _r(g, Bsz, T, H), "B": _r(g, Bsz, T, G, N),
                   "C": _r(g, Bsz, T, G, N), "z": _r(g, Bsz, T, H, P)}
        replicated = {"A": -torch.rand(H, generator=g, dtype=DT) - 0.3, "D": _r(g, H), "dt_bias": _r(g, H) * 0.3}
        return g, sharded, replicated

    def ssd_ref(*args, **kw):
        return ssd(*args, return_final_state=True, chunk_size=4, **kw)

    def ssd_cpf(*args, **kw):
        return ssd_cp(*args, return_final_state=True, chunk_size=4, **kw)

    g, sh, rep = ssd_inputs("ssd")
    rep["initial_state"] = _r(g, 2, H, P, N)
    case("ssd", ssd_ref, ssd_cpf, sh, rep)
    g, sh, rep = ssd_inputs("ssd_lengths")
    sh.pop("z")
    case("ssd_lengths_limit", ssd_ref, ssd_cpf, sh, rep, {"lengths": torch.tensor([T, 7]), "dt_limit": (0.05, 2.0)})
    g, sh, rep = ssd_inputs("ssd_packed", Bsz=1)
    rep["initial_state"] = _r(g, 5, H, P, N)
    case("ssd_packed", ssd_ref, ssd_cpf, sh, rep, {"cu_seqlens": _cu(CU_A)})

    # ---- delta rule, GLA
    K, V = 3, 2

    def lin_inputs(name, Bsz=2, decay="none"):
        g = _gen(name)
        sharded = {"q": _r(g, Bsz, T, H, K), "k": _r(g, Bsz, T, H, K), "v": _r(g, Bsz, T, H, V)}
        if decay == "scalar":
            sharded["g"] = -torch.rand(Bsz, T, H, generator=g, dtype=DT) * 0.5
        elif decay == "key":
            sharded["g"] = -torch.rand(Bsz, T, H, K, generator=g, dtype=DT) * 0.5
        return g, sharded

    def with_final(fn, **fixed):
        def run(*args, **kw):
            return fn(*args, output_final_state=True, **fixed, **kw)
        return run

    g, sh = lin_inputs("delta")
    sh["beta"] = torch.rand(2, T, H, generator=g, dtype=DT)
    case("delta_rule", with_final(delta_rule, chunk_size=4, use_qk_l2norm=True),
         with_final(delta_rule_cp, chunk_size=4, use_qk_l2norm=True), sh, {"initial_state": _r(g, 2, H, K, V)})
    g, sh = lin_inputs("gdelta", Bsz=1, decay="scalar")
    sh["beta"] = torch.rand(1, T, H, generator=g, dtype=DT) * 2
    case("gated_delta_packed", with_final(gated_delta_rule, chunk_size=4, use_qk_l2norm=True),
         with_final(gated_delta_rule_cp, chunk_size=4, use_qk_l2norm=True), sh,
         {"initial_state": _r(g, 3, H, K, V)}, {"cu_seqlens": _cu(CU_B)})
    g, sh = lin_inputs("gdelta2", decay="scalar")
    sh["beta"] = torch.rand(2, T, H, generator=g, dtype=DT)
    case("gated_delta", with_final(gated_delta_rule, chunk_size=4, scale=0.7),
         with_final(gated_delta_rule_cp, chunk_size=4, scale=0.7), sh, {"initial_state": _r(g, 2, H, K, V)})
    g, sh = lin_inputs("gla", decay="key")
    case("gla", with_final(gla, chunk_size=4), with_final(gla_cp, chunk_size=4), sh,
         {"initial_state": _r(g, 2, H, K, V)})
    g, sh = lin_inputs("sgla", Bsz=1, decay="scalar")
    case("simple_gla_packed", with_final(simple_gla, chunk_size=4), with_final(simple_gla_cp, chunk_size=4), sh,
         {"initial_state": _r(g, 5, H, K, V)}, {"cu_seqlens": _cu(CU_A)})
    g, sh = lin_inputs("gla_packed", Bsz=1, decay="key")
    case("gla_packed", with_final(gla, chunk_size=4), with_final(gla_cp, chunk_size=4), sh, {},
         {"cu_seqlens": _cu(CU_B)})

    # bf16 inputs (state and corrections in fp32): against the single-process op on the same inputs
    g, sh, rep = ssd_inputs("ssd_bf16")
    case("ssd_bf16", ssd_ref, ssd_cpf, {k: v.bfloat16() for k, v in sh.items()}, {k: v.float() for k, v in rep.items()},
         tol=3e-2)
    g, sh = lin_inputs("gdelta_bf16", decay="scalar")
    sh["beta"] = torch.rand(2, T, H, generator=g, dtype=DT)
    case("gated_delta_bf16", with_final(gated_delta_rule, chunk_size=4, use_qk_l2norm=True),
         with_final(gated_delta_rule_cp, chunk_size=4, use_qk_l2norm=True),
         {k: v.bfloat16() for k, v in sh.items()}, tol=3e-2)

    # ---- causal conv (width 5: its halo of 4 is longer than a chunk of 3 on 4 ranks)
    g = _gen("conv")
    case("conv_lengths", causal_conv1d, causal_conv1d_cp, {"x": _r(g, 3, T, 4)},
         {"weight": _r(g, 4, 5), "bias": _r(g, 4), "initial_state": _r(g, 3, 4, 4)},
         {"activation": "silu", "lengths": torch.tensor([T, 5, 0])})
    g = _gen("conv_packed")
    case("conv_packed", causal_conv1d, causal_conv1d_cp, {"x": _r(g, 1, T, 4)},
         {"weight": _r(g, 4, 3), "initial_state": _r(g, 5, 2, 4)}, {"cu_seqlens": _cu(CU_A)})
    return cases


def _dot(x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
    if x.is_complex():
        return (torch.view_as_real(x) * torch.view_as_real(c)).sum()
    return (x * c).sum()


def _cotangent(name: str, like: torch.Tensor, salt: int) -> torch.Tensor:
    g = _gen(name, salt)
    if like.is_complex():
        return torch.complex(_r(g, *like.shape), _r(g, *like.shape))
    return _r(g, *like.shape)


def _final_rank(name: str, world: int) -> int:
    return zlib.crc32(name.encode()) % world  # the rank that puts the cotangent on the final state


def _run(fn, case, sharded, replicated):
    return fn(**sharded, **replicated, **case["static"])


def _reference(case) -> dict:
    """The single-process op on the full sequence, with its gradients."""
    sharded = {k: v.clone().requires_grad_() for k, v in case["sharded"].items()}
    replicated = {k: v.clone().requires_grad_() for k, v in case["replicated"].items()}
    out, final = _run(case["ref"], case, sharded, replicated)
    loss = _dot(out, _cotangent(case["name"], out, 1)) + _dot(final, _cotangent(case["name"], final, 2))
    leaves = {**sharded, **replicated}
    grads = torch.autograd.grad(loss, list(leaves.values()), allow_unused=True)
    return {"out": out.detach(), "final": final.detach(),
            "grads": {k: gr for k, gr in zip(leaves, grads)}}


def _distributed(case, rank: int, world: int) -> dict:
    """This rank's share: its chunk of every sharded input, the whole of every replicated one."""
    sharded = {k: v.chunk(world, dim=1)[rank].clone().requires_grad_() for k, v in case["sharded"].items()}
    replicated = {k: v.clone().requires_grad_() for k, v in case["replicated"].items()}
    out, final = _run(case["cp"], case, sharded, replicated)
    full_shape = (out.shape[0], out.shape[1] * world, *out.shape[2:])
    cot = _cotangent(case["name"], torch.empty(full_shape, dtype=out.dtype), 1).chunk(world, dim=1)[rank]
    loss = _dot(out, cot)
    if rank == _final_rank(case["name"], world):
        loss = loss + _dot(final, _cotangent(case["name"], final, 2))
    leaves = {**sharded, **replicated}
    grads = torch.autograd.grad(loss, list(leaves.values()), allow_unused=True)
    return {"out": out.detach(), "final": final.detach(), "grads": {k: gr for k, gr in zip(leaves, grads)}}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, world: int, port: int, out_dir: str, plan: tuple) -> None:
    """Run ``plan`` ((group size, which cases) pairs) on sub-groups of the first ranks of the world."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        groups = {size: dist.new_group(list(range(size))) for size, _ in plan}  # every rank creates every group
        results = {}
        for size, which in plan:
            if rank >= size:
                continue
            with context_parallel(groups[size]):
                part = results.setdefault(size, {})
                if "ops" in which:
                    for case in _op_cases():
                        part[case["name"]] = _distributed(case, rank, size)
                if "mixers" in which:
                    for case in _mixer_cases():
                        part[case["name"]] = _mixer_distributed(case, rank, size)
                if "errors" in which:
                    part["errors"] = _error_checks()
        torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def _spawn(tmp_path, plan: tuple) -> dict[int, list[dict]]:
    """{group size: [each rank's results]}."""
    world = max(size for size, _ in plan)
    mp.spawn(_worker, args=(world, _free_port(), str(tmp_path), plan), nprocs=world, join=True)
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in range(world)]
    return {size: [ranks[r][size] for r in range(size)] for size, _ in plan}


def _close(a, b, what, tol=1e-9):
    torch.testing.assert_close(a, b, rtol=tol, atol=tol, msg=what)


def _check_op_results(results: list[dict], world: int) -> None:
    for case in _op_cases():
        name = case["name"]
        ref = _reference(case)
        per_rank = [r[name] for r in results]
        tol = case["tol"]
        out = torch.cat([p["out"] for p in per_rank], dim=1)
        assert out.dtype == ref["out"].dtype, name
        _close(out, ref["out"], f"{name} (W={world}): outputs", tol)
        for r, p in enumerate(per_rank):
            _close(p["final"], ref["final"], f"{name} (W={world}): final state on rank {r}", tol)
        for k in case["sharded"]:
            got = torch.cat([p["grads"][k] for p in per_rank], dim=1)
            _close(got, ref["grads"][k], f"{name} (W={world}): grad of {k}", tol)
        for k in case["replicated"]:
            got = [p["grads"][k] for p in per_rank]
            got = sum(gr for gr in got if gr is not None)
            _close(got, ref["grads"][k], f"{name} (W={world}): grad of {k} (summed over ranks)", tol)


# ---- errors ---------------------------------------------------------------------------------------

def _error_checks() -> dict[str, str]:
    """Calls that must raise under a group of two: {name: "<exception type>: <message>" or "no error"}."""
    from seqblocks.layers.mixers.mamba import Mamba
    from seqblocks.layers.mixers.mamba2 import Mamba2

    T = TOTAL // 2
    g = _gen("errors")
    a, b = torch.rand(1, T, 3, generator=g, dtype=DT), _r(g, 1, T, 3)
    mamba = Mamba(8, d_state=4, expand=1).double()
    calls = {
        "cache": lambda: mamba(_r(g, 1, T, 8), mamba.allocate_inference_cache(1, 16)),
        "lengths": lambda: linear_scan_cp(a, b, lengths=torch.tensor([2 * T + 1])),
        "mixer_lengths": lambda: mamba(_r(g, 1, T, 8), lengths=torch.tensor([2 * T + 1])),
        "cu_seqlens": lambda: ssd_cp(_r(g, 1, T, 2, 2), _r(g, 1, T, 2), -torch.ones(2, dtype=DT), _r(g, 1, T, 1, 2),
                                     _r(g, 1, T, 1, 2), cu_seqlens=_cu([0, 3, T])),
        "cp_type": lambda: linear_scan_cp(a, b, cp="group"),
        "bidirectional": lambda: Mamba2(8, d_state=4, headdim=4, bidirectional=True).double()(_r(g, 1, T, 8)),
    }
    out = {}
    for name, call in calls.items():
        try:
            call()
            out[name] = "no error"
        except (TypeError, ValueError) as e:
            out[name] = f"{type(e).__name__}: {e}"
    return out


def _check_errors(results: list[dict]) -> None:
    expected = {"cache": ("ValueError", "not context-parallel"), "lengths": ("ValueError", "W * T = 12"),
                "mixer_lengths": ("ValueError", "W * T = 12"), "cu_seqlens": ("ValueError", "T=12"),
                "cp_type": ("TypeError", "ContextParallel"), "bidirectional": ("ValueError", "whole row")}
    for r in results:
        for name, (kind, text) in expected.items():
            got = r["errors"][name]
            assert got.startswith(kind) and text in got, f"{name}: {got}"


def test_outside_a_group_the_ops_are_the_plain_ops():
    g = _gen("plain")
    a, b = torch.rand(2, 5, 3, generator=g, dtype=DT), _r(g, 2, 5, 3)
    for got, want in zip(linear_scan_cp(a, b, reverse=True), linear_scan(a, b, reverse=True)):
        torch.testing.assert_close(got, want, rtol=0, atol=0)


# ---- mixers ---------------------------------------------------------------------------------------

def _mixer_cases() -> list[dict]:
    """Each case: a builder of the mixer (seeded, float64), its full-sequence input x, ``sharded`` extra
    inputs (time dim 1) and ``static`` ones (the full sequence's lengths / cu_seqlens)."""
    from seqblocks.layers.mixers.deltanet import DeltaNet
    from seqblocks.layers.mixers.gated_deltanet import GatedDeltaNet
    from seqblocks.layers.mixers.gla import GatedLinearAttention
    from seqblocks.layers.mixers.lru import LRU
    from seqblocks.layers.mixers.mamba import Mamba
    from seqblocks.layers.mixers.mamba2 import Mamba2
    from seqblocks.layers.mixers.retnet import MultiScaleRetention
    from seqblocks.layers.mixers.rglru import RGLRU
    from seqblocks.layers.mixers.s5 import S5
    from seqblocks.layers.mixers.s7 import S7

    T, D = TOTAL, 8
    cases = []

    def case(name, cls, kwargs, B=2, sharded=None, static=None):
        g = _gen(name)
        cases.append(dict(name=name, cls=cls, kwargs=kwargs, x=_r(g, B, T, D), sharded=sharded or {},
                          static=static or {}))

    lengths = torch.tensor([T, 5])
    packed = {"cu_seqlens": _cu(CU_A)}
    ts = torch.rand(2, T, generator=_gen("ts"), dtype=DT) * 2
    case("Mamba", Mamba, {"d_model": D, "d_state": 4, "expand": 1}, static={"lengths": lengths})
    case("Mamba_event", Mamba, {"d_model": D, "d_state": 4, "expand": 1, "d_conv": 3},
         sharded={"integration_timesteps": ts})
    case("Mamba2", Mamba2, {"d_model": D, "d_state": 4, "headdim": 4, "chunk_size": 4},
         static={"lengths": lengths})
    case("Mamba2_packed_gated", Mamba2, {"d_model": D, "d_state": 4, "headdim": 4, "chunk_size": 4,
                                         "rmsnorm": False, "d_ssm": 8}, B=1, static=packed)
    case("RGLRU", RGLRU, {"d_model": D, "num_heads": 2, "scale_first_input": False}, static={"lengths": lengths})
    case("S7", S7, {"d_model": D, "d_state": 4}, static={"lengths": lengths})
    case("LRU_bidirectional_conv", LRU, {"d_model": D, "d_state": 4, "mode": "conv", "bidirectional": True},
         static={"lengths": lengths})
    case("S5_event_bidirectional", S5, {"d_model": D, "d_state": 4, "bidirectional": True},
         sharded={"integration_timesteps": ts})
    case("DeltaNet", DeltaNet, {"d_model": D, "num_heads": 2, "chunk_size": 4}, static={"lengths": lengths})
    case("DeltaNet_packed", DeltaNet, {"d_model": D, "num_heads": 2, "chunk_size": 4, "conv_size": 5}, B=1,
         static=packed)
    case("GatedDeltaNet_packed", GatedDeltaNet, {"d_model": D, "head_dim": 4, "num_heads": 2, "chunk_size": 4},
         B=1, static={"cu_seqlens": _cu(CU_B)})
    case("GLA", GatedLinearAttention, {"d_model": D, "num_heads": 2, "chunk_size": 4}, static={"lengths": lengths})
    case("GLA_packed", GatedLinearAttention, {"d_model": D, "num_heads": 2, "chunk_size": 4}, B=1, static=packed)
    case("RetNet_packed", MultiScaleRetention, {"d_model": D, "num_heads": 2, "chunk_size": 4}, B=1,
         static=packed)
    case("RetNet", MultiScaleRetention, {"d_model": D, "num_heads": 2, "chunk_size": 4})
    return cases


def _build(case):
    torch.manual_seed(zlib.crc32(case["name"].encode()))
    return case["cls"](**case["kwargs"]).double()


def _mixer_grads(mixer, x, y, cot):
    params = dict(mixer.named_parameters())
    grads = torch.autograd.grad(_dot(y, cot), [x, *params.values()], allow_unused=True)
    return grads[0], {k: gr for k, gr in zip(params, grads[1:])}


def _mixer_reference(case) -> dict:
    mixer = _build(case)
    x = case["x"].clone().requires_grad_()
    y = mixer(x, **case["sharded"], **case["static"])
    gx, gp = _mixer_grads(mixer, x, y, _cotangent(case["name"], y, 1))
    return {"out": y.detach(), "grad_x": gx, "grads": gp}


def _mixer_distributed(case, rank: int, world: int) -> dict:
    mixer = _build(case)
    x = case["x"].chunk(world, dim=1)[rank].clone().requires_grad_()
    sharded = {k: v.chunk(world, dim=1)[rank] for k, v in case["sharded"].items()}
    y = mixer(x, **sharded, **case["static"])
    cot = _cotangent(case["name"], case["x"], 1).chunk(world, dim=1)[rank]
    gx, gp = _mixer_grads(mixer, x, y, cot)
    return {"out": y.detach(), "grad_x": gx, "grads": gp}


def _check_mixer_results(results: list[dict], world: int) -> None:
    for case in _mixer_cases():
        name = case["name"]
        assert case["cls"].context_parallel == "native", name
        ref = _mixer_reference(case)
        per_rank = [r[name] for r in results]
        _close(torch.cat([p["out"] for p in per_rank], dim=1), ref["out"], f"{name} (W={world}): outputs")
        _close(torch.cat([p["grad_x"] for p in per_rank], dim=1), ref["grad_x"], f"{name} (W={world}): grad of x")
        for k, want in ref["grads"].items():
            got = [p["grads"][k] for p in per_rank if p["grads"][k] is not None]
            if want is None:
                assert not got, f"{name}: {k} has a gradient only under context parallelism"
                continue
            _close(sum(got), want, f"{name} (W={world}): grad of {k} (summed over ranks)")


def test_ops_and_mixers_match_one_process(tmp_path):
    # One spawn of three processes: every op and mixer on the group of the first two, every op on all three.
    results = _spawn(tmp_path, ((2, ("ops", "mixers", "errors")), (3, ("ops",))))
    _check_errors(results[2])
    _check_op_results(results[2], 2)
    _check_mixer_results(results[2], 2)
    _check_op_results(results[3], 3)


@pytest.mark.slow
def test_four_processes_match_one_process(tmp_path):
    results = _spawn(tmp_path, ((4, ("ops", "mixers")), (3, ("mixers",))))
    _check_op_results(results[4], 4)
    _check_mixer_results(results[4], 4)
    _check_mixer_results(results[3], 3)

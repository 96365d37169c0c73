"""Context-parallel attention on CPU with gloo: ring attention and the all-gather path, over 2 and 4
processes, give the single-process attention and its q / k / v gradients (random cotangents) at
float64; the attention mixers wired for context parallelism and ``run_mixer``'s full-sequence fallback
give the single-process layer's outputs, input gradients and every parameter gradient.

Each spawn runs many checks (a spawn costs seconds of imports); a failure names its case."""

from __future__ import annotations

import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from seqblocks.layers.attention.score_mods import alibi_score_mod, chunked_causal_mask, compose, soft_cap
from seqblocks.layers.mixer import run_mixer
from seqblocks.ops.attention import attention
from seqblocks.parallel import context_parallel, current_context_parallel, using_context_parallel
from seqblocks.parallel.attention import allgather_attention, previous_tokens, ring_attention, ring_steps

B, H, HKV, T, K, V = 2, 4, 2, 16, 8, 6


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _entry(rank: int, world: int, port: int, body) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    torch.set_num_threads(1)
    try:
        body(rank, world)
    finally:
        dist.destroy_process_group()


def spawn(body, world: int) -> None:
    mp.spawn(_entry, args=(world, _free_port(), body), nprocs=world, join=True)


def _chunk(x: torch.Tensor, dim: int, rank: int, world: int) -> torch.Tensor:
    return x.chunk(world, dim=dim)[rank]


# ---------------------------------------------------------------- the ops


def _op_cases():
    g = torch.Generator().manual_seed(3)
    valid = torch.rand(B, T, generator=g) > 0.3
    slopes = torch.tensor([0.5, 0.25, 0.125, 0.0625], dtype=torch.float64)
    return {
        "causal": dict(causal=True),
        "window 3 (< T_local)": dict(causal=True, window=3),
        "window 9 (> T_local)": dict(causal=True, window=9),
        "not causal": dict(causal=False),
        "softcap + alibi score_mod": dict(causal=True, score_mod=compose(soft_cap(1.5), alibi_score_mod(H))),
        "alibi slopes, window 5, chunked mask": dict(causal=True, window=5, alibi_slopes=slopes,
                                                     mask_mod=chunked_causal_mask(6)),
        "key padding": dict(causal=True, key_valid=valid),
        "mqa": dict(causal=True, window=7, mqa=True),
    }


def _op_body(rank: int, world: int) -> None:
    g = torch.Generator().manual_seed(0)
    q = torch.randn(B, H, T, K, generator=g, dtype=torch.float64)
    k_full = torch.randn(B, HKV, T, K, generator=g, dtype=torch.float64)
    v_full = torch.randn(B, HKV, T, V, generator=g, dtype=torch.float64)
    dout = torch.randn(B, H, T, V, generator=g, dtype=torch.float64)
    for name, case in _op_cases().items():
        case = dict(case)
        k, v = (k_full[:, :1], v_full[:, :1]) if case.pop("mqa", False) else (k_full, v_full)
        ref_in = [t.clone().requires_grad_() for t in (q, k, v)]
        ref = attention(*ref_in, backend="standard", **case)
        ref.backward(dout)
        local_case = dict(case)
        if "key_valid" in case:
            local_case["key_valid"] = _chunk(case["key_valid"], 1, rank, world)
        for method in ("ring", "allgather"):
            with context_parallel(attention=method):
                mine = [_chunk(t, 2, rank, world).clone().requires_grad_() for t in (q, k, v)]
                if method == "ring":
                    out = ring_attention(*mine, block_size=3, **local_case)
                else:
                    out = allgather_attention(*mine, **local_case)
                out.backward(_chunk(dout, 2, rank, world))
            label = f"{method}, {name}, {world} ranks, rank {rank}"
            torch.testing.assert_close(out, _chunk(ref, 2, rank, world), msg=f"output: {label}")
            for what, a, b in zip("qkv", mine, ref_in):
                torch.testing.assert_close(a.grad, _chunk(b.grad, 2, rank, world), msg=f"d{what}: {label}")
    if world == 4:  # two groups of two ranks (point-to-point peers are global ranks)
        groups = [dist.new_group([0, 1]), dist.new_group([2, 3])]
        ref_in = [t.clone().requires_grad_() for t in (q, k_full, v_full)]
        ref = attention(*ref_in, window=9, backend="standard")
        ref.backward(dout)
        for method in ("ring", "allgather"):
            with context_parallel(groups[rank // 2], attention=method) as cp:
                assert (cp.rank, cp.world_size) == (rank % 2, 2)
                mine = [_chunk(t, 2, cp.rank, 2).clone().requires_grad_() for t in (q, k_full, v_full)]
                out = ring_attention(*mine, window=9) if method == "ring" else allgather_attention(*mine, window=9)
                out.backward(_chunk(dout, 2, cp.rank, 2))
                torch.testing.assert_close(out, _chunk(ref, 2, cp.rank, 2), msg=f"subgroup {method}")
                for a, b in zip(mine, ref_in):
                    torch.testing.assert_close(a.grad, _chunk(b.grad, 2, cp.rank, 2), msg=f"subgroup {method}")
    # the whole sequence's key mask [B, T] is taken as well as this rank's chunk
    valid = _op_cases()["key padding"]["key_valid"]
    with context_parallel():
        mine = [_chunk(t, 2, rank, world) for t in (q, k_full, v_full)]
        torch.testing.assert_close(ring_attention(*mine, key_valid=valid),
                                   ring_attention(*mine, key_valid=_chunk(valid, 1, rank, world)))
        # the halo of a causal conv: the n tokens before this rank's chunk (zeros before the start)
        x = torch.arange(B * T * 3, dtype=torch.float64).view(B, T, 3)
        halo = previous_tokens(_chunk(x, 1, rank, world), 5)
        start = rank * (T // world)
        expect = torch.cat((x.new_zeros(B, 5, 3), x), dim=1)[:, start: start + 5]
        torch.testing.assert_close(halo, expect)


@pytest.mark.parametrize("world", [2, 4])
def test_ring_and_allgather_attention_match_one_process(world):
    spawn(_op_body, world)


def test_ring_attention_alone_and_its_steps():
    # Outside a group (one process) ring attention is the blockwise attention itself, dropout included:
    # its backward regenerates the forward's masks (gradcheck with the seed fixed per call).
    g = torch.Generator().manual_seed(1)
    q, k, v = (torch.randn(1, 2, 7, 4, generator=g, dtype=torch.float64, requires_grad=True) for _ in range(3))
    out = ring_attention(q, k, v, window=3, block_size=2)
    torch.testing.assert_close(out, attention(q, k, v, window=3, backend="standard"))

    def dropped(q, k, v):
        torch.manual_seed(0)
        return ring_attention(q, k, v, dropout_p=0.3, block_size=3)

    assert torch.autograd.gradcheck(dropped, (q, k, v))
    assert not torch.equal(dropped(q, k, v), ring_attention(q, k, v))
    # how far back a causal window reaches: blocks of 4 tokens, 4 ranks
    assert [ring_steps(3, 4, 4, True, w) for w in (1, 2, 5, 6, 100, None)] == [0, 1, 1, 2, 3, 3]
    assert ring_steps(0, 4, 4, False, None) == 3
    with pytest.raises(ValueError, match="block_size"):
        ring_attention(q, k, v, block_size=0)
    with pytest.raises(ValueError, match="same 7 local tokens"):
        ring_attention(q, k[:, :, :3], v[:, :, :3])


def test_context_parallel_needs_a_process_group():
    with pytest.raises(ValueError, match="init_process_group"):
        with context_parallel():
            pass
    with pytest.raises(TypeError, match="ContextParallel"):
        with using_context_parallel("world"):
            pass
    assert current_context_parallel() is None


# ---------------------------------------------------------------- the layers


def _layers():
    """(name, factory, forward inputs beyond x as (full, local(rank, world)), methods) of the layer checks."""
    from seqblocks.layers.attention import MHA, MLA, ChunkedGQA, SlidingWindowAttention
    from seqblocks.layers.attention.sparse import SparseGQA
    from seqblocks.layers.bidirectional import Bidirectional
    from seqblocks.layers.mixers.s4d import S4D
    from seqblocks.layers.position import ALiBi

    D = 16
    lengths = torch.tensor([13, 16])
    g = torch.Generator().manual_seed(5)
    pad = torch.rand(B, T, generator=g) > 0.2
    rows = lambda x: (lambda r, w: _chunk(x, 1, r, w))  # noqa: E731
    both = ("ring", "allgather")
    return [
        ("gqa, rope, qk-norm, d_conv, softcap",
         lambda: MHA(D, num_heads=4, num_heads_kv=2, rotary_emb_dim=4, qk_norm=True, d_conv=3, softcap=3.0),
         {}, both),
        ("mqa + per-call score_mod", lambda: MHA(D, num_heads=4, num_heads_kv=1, mlp_dim=8),
         {"score_mod": (alibi_score_mod(4), None)}, both),
        ("sliding window 5", lambda: SlidingWindowAttention(D, num_heads=2, window_size=5, rotary_emb_dim=8), {},
         both),
        ("chunked 6 (Llama 4)", lambda: ChunkedGQA(D, num_heads=4, num_heads_kv=2, attention_chunk_size=6), {},
         both),
        ("alibi position", lambda: MHA(D, num_heads=4, position=ALiBi(4)), {}, both),
        ("lengths + key padding", lambda: MHA(D, num_heads=2, rotary_emb_dim=4),
         {"lengths": (lengths, lambda r, w: lengths), "mask": (pad, rows(pad))}, both),
        ("non-causal", lambda: MHA(D, num_heads=2, causal=False), {}, both),
        ("mla", lambda: MLA(D, num_heads=2, kv_lora_rank=8, qk_rope_head_dim=4),
         {"lengths": (lengths, lambda r, w: lengths)}, both),
        ("fallback: s4d", lambda: S4D(D, d_state=4), {"lengths": (lengths, lambda r, w: lengths)}, ("ring",)),
        ("fallback: sparse gqa", lambda: SparseGQA(D, num_heads=2, sparse_select_k=5, window_size=3), {},
         ("ring",)),
        ("fallback: bidirectional", lambda: Bidirectional(S4D(D, d_state=4), S4D(D, d_state=4)), {}, ("ring",)),
    ]


def _call(layer, x, inputs):
    from seqblocks.layers.adapters import call_any_mixer

    score_mod = inputs.pop("score_mod", None)
    if score_mod is not None:  # MHA's own keyword
        return layer(x, **inputs, score_mod=score_mod)
    return call_any_mixer(layer, x, None, inputs)


def _layer_body(rank: int, world: int) -> None:
    g = torch.Generator().manual_seed(2)
    x = torch.randn(B, T, 16, generator=g, dtype=torch.float64)
    dy = torch.randn(B, T, 16, generator=g, dtype=torch.float64)
    for name, make, extra, methods in _layers():
        torch.manual_seed(0)
        layer = make().double()
        full_in = {k: v[0] for k, v in extra.items()}
        xr = x.clone().requires_grad_()
        ref = _call(layer, xr, dict(full_in))
        ref.backward(dy)
        ref_grads = {n: p.grad.clone() for n, p in layer.named_parameters() if p.grad is not None}
        for method in methods:
            layer.zero_grad(set_to_none=True)
            local_in = {k: (v[1](rank, world) if v[1] is not None else v[0]) for k, v in extra.items()}
            xl = _chunk(x, 1, rank, world).clone().requires_grad_()
            with context_parallel(attention=method):
                out = _call(layer, xl, local_in)
            out.backward(_chunk(dy, 1, rank, world))
            label = f"{name}, {method}, rank {rank}"
            torch.testing.assert_close(out, _chunk(ref, 1, rank, world), msg=f"output: {label}")
            torch.testing.assert_close(xl.grad, _chunk(xr.grad, 1, rank, world), msg=f"dx: {label}")
            for n, p in layer.named_parameters():
                if n in ref_grads:  # parameters are replicated: their gradient is the sum over the ranks
                    grad = p.grad.clone()
                    dist.all_reduce(grad)
                    torch.testing.assert_close(grad, ref_grads[n], msg=f"d{n}: {label}")


def _layer_rules_body(rank: int, world: int) -> None:
    from seqblocks.layers.attention import MHA
    from seqblocks.layers.mixers.s4d import S4D

    torch.manual_seed(0)
    layer = MHA(16, num_heads=2, window_size=6).double()
    x = torch.randn(1, T, 16, dtype=torch.float64)
    # A NaN in a key of rank 0 poisons exactly the later queries that may see it, on every rank.
    x[0, 5, 3] = float("nan")
    ref = layer(x)
    with context_parallel():
        out = layer(_chunk(x, 1, rank, world))
    torch.testing.assert_close(out, _chunk(ref, 1, rank, world), equal_nan=True)
    assert out.isnan().any(-1).tolist() == _chunk(ref, 1, rank, world).isnan().any(-1).tolist()
    # Packed documents over the whole sequence (B = 1): cu_seqlens is the whole sequence's.
    cu = torch.tensor([0, 3, 11, T])
    y = torch.randn(1, T, 16, dtype=torch.float64)
    rotary = MHA(16, num_heads=2, rotary_emb_dim=4).double()
    ref = rotary(y, cu_seqlens=cu)
    for method in ("ring", "allgather"):
        with context_parallel(attention=method):
            torch.testing.assert_close(rotary(_chunk(y, 1, rank, world), cu_seqlens=cu), _chunk(ref, 1, rank, world))
    with context_parallel():
        cache = layer.allocate_inference_cache(1, T)
        with pytest.raises(ValueError, match="cache under context parallelism"):
            layer(_chunk(y, 1, rank, world), cache)
        with pytest.raises(ValueError, match="cache under context parallelism"):
            run_mixer(S4D(16, d_state=4).double(), _chunk(y, 1, rank, world), S4D(16, d_state=4).double()
                      .allocate_inference_cache(1, T))
        with pytest.raises(ValueError, match="key-padding chunk"):
            layer(_chunk(y, 1, rank, world), mask=torch.zeros(T // world, T // world))
        with pytest.raises(ValueError, match="lite"):
            MHA(16, num_heads=2, causal=False, attention_type="lite").double()(_chunk(y, 1, rank, world))


def test_attention_layers_and_the_fallback_match_one_process():
    spawn(_layer_body, 2)


def test_layer_rules_under_context_parallelism():
    spawn(_layer_rules_body, 2)

"""The Triton paged decode-attention kernel (``seqblocks/ops/attention/paged_triton.py``) against the
reference: page sizes 4 / 8 / 16, one or two kv heads, 1 or 4 query heads per kv head, head widths 16 /
64, lengths that are not multiples of the page size and length 1, a few queries per row, windows,
softcap, padding, one split or several; and the attention layers decoding on it through a paged cache.

The kernels run under Triton's interpreter (``TRITON_INTERPRET=1``) on the CPU; ``tests/interpreter.py``
says why the cases run in a child process. The ``gpu`` case runs real shapes (B 8, H 32, Hkv 8, K 128,
page 16, lengths up to 4096) on CUDA; the ``slow`` case compiles every kernel variant for sm_90.

Shapes: B batch, H query heads, Hkv key/value heads, G = H / Hkv, Tq queries, K head width, N page_size.
"""

from __future__ import annotations

import pytest
import torch
from interpreter import INTERPRETER, run_file_under_interpreter

triton = pytest.importorskip("triton", reason="Triton is not installed: the Triton kernels cannot be tested")

from seqblocks import MHA  # noqa: E402
from seqblocks.layers.attention.paged import new_block_table  # noqa: E402
from seqblocks.ops._backend import prefer_backend  # noqa: E402
from seqblocks.ops.attention.paged import paged_attention, paged_attention_reference  # noqa: E402
from seqblocks.testing import assert_close  # noqa: E402

if not INTERPRETER:

    def test_kernels_under_interpreter():
        """Run this file's cases in a child process under TRITON_INTERPRET=1 (see tests/interpreter.py)."""
        run_file_under_interpreter(__file__)


def _inputs(B, H, Hkv, Tq, K, N, lens, dtype, *, device="cpu", padding=0.0, seed=0, spare_pages=1):
    g = torch.Generator(device="cpu").manual_seed(seed)
    max_pages = -(-max(lens) // N) + spare_pages
    P = B * max_pages + 2

    def rnd(*shape):
        return torch.randn(*shape, generator=g).to(device=device, dtype=dtype)

    q, k_pages, v_pages = rnd(B, H, Tq, K), rnd(P, Hkv, N, K), rnd(P, Hkv, N, K)
    table = (torch.randperm(P - 1, generator=g)[: B * max_pages] + 1).view(B, max_pages).to(device)
    valid = (torch.rand(P, N, generator=g) >= padding).to(device)
    return q, k_pages, v_pages, table, torch.tensor(lens, device=device), valid


def _check(args, *, atol, **kwargs):
    q, kp, vp, table, lens, valid = args
    got = paged_attention(q, kp, vp, table, lens, valid_pages=valid, backend="triton", **kwargs)
    kwargs.pop("num_splits", None)
    want = paged_attention_reference(q.double(), kp.double(), vp.double(), table, lens, valid_pages=valid, **kwargs)
    assert got.dtype == q.dtype and got.shape == want.shape
    assert_close(got, want, atol=atol, msg=str(kwargs))
    return got


@pytest.mark.parametrize("N", [4, 8, 16])
@pytest.mark.parametrize(("H", "Hkv"), [(1, 1), (4, 1), (2, 2), (8, 2)])
@pytest.mark.parametrize("K", [16, 64])
def test_decode_against_reference(N, H, Hkv, K):
    lens = [1, 2 * N + 3, 5 * N - 1]  # length 1, lengths that are not multiples of the page size
    args = _inputs(3, H, Hkv, 1, K, N, lens, torch.float32, padding=0.1)
    one = _check(args, atol=2e-6, num_splits=1)
    many = _check(args, atol=2e-6, num_splits=3)
    assert_close(many, one, atol=2e-6)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision(dtype):
    args = _inputs(2, 8, 2, 1, 64, 16, [37, 70], dtype)
    _check(args, atol=1.5e-2, num_splits=2)


@pytest.mark.parametrize("Tq", [2, 5])
@pytest.mark.parametrize(("window", "softcap"), [(None, None), (6, None), (None, 1.5), (9, 4.0)])
def test_a_few_queries_windows_and_softcap(Tq, window, softcap):
    args = _inputs(3, 4, 2, Tq, 16, 4, [Tq, 13, 30], torch.float32, padding=0.15, seed=1)
    for splits in (1, 4):
        _check(args, atol=2e-6, window=window, softcap=softcap, scale=0.2, num_splits=splits)


def test_max_seqlen_default_splits_and_empty_rows():
    q, kp, vp, table, lens, valid = _inputs(3, 4, 1, 1, 16, 8, [9, 1, 20], torch.float32, spare_pages=3)
    valid[table[1, 0], 0] = False  # row 1's only key is padding: output 0
    out = _check((q, kp, vp, table, lens, valid), atol=2e-6)
    assert (out[1] == 0).all()
    _check((q, kp, vp, table, lens, valid), atol=2e-6, max_seqlen=20, num_splits=2)
    # "auto" runs the reference on CPU tensors, the kernel inside a prefer_backend("triton") region
    ref = paged_attention(q, kp, vp, table, lens, valid_pages=valid)
    with prefer_backend("triton"):
        kernel = paged_attention(q, kp, vp, table, lens, valid_pages=valid)
    assert_close(kernel, ref, atol=2e-6)


@pytest.mark.parametrize("variant", [dict(num_heads=4, num_heads_kv=1), dict(num_heads=4, num_heads_kv=2, window_size=3,
                                                                              softcap=2.0)])
def test_layer_decodes_on_the_kernel(variant, monkeypatch):
    """Prefill, steps and a 3-token call of MHA through shuffled pages on the kernel equal the full pass."""
    from seqblocks.ops.attention import paged_triton

    calls = []
    kernel = paged_triton.paged_attention_triton
    monkeypatch.setattr(paged_triton, "paged_attention_triton", lambda q, *a, **k: calls.append(q.shape[2]) or
                        kernel(q, *a, **k))
    torch.manual_seed(0)
    mixer = MHA(32, **variant).eval()
    B, T, N = 2, 12, 4
    x = torch.randn(B, T, 32)
    num_pages = B * T // N + 2
    table = new_block_table(B, T, N)
    table[:] = (torch.randperm(num_pages - 1)[: table.numel()] + 1).view_as(table)
    cache = mixer.allocate_paged_cache(table, num_pages, N, T)
    with torch.no_grad(), prefer_backend("triton"):
        full = mixer(x)
        ys = [mixer(x[:, :5], cache)] + [mixer(x[:, t:t + 1], cache) for t in range(5, 9)] + [mixer(x[:, 9:], cache)]
    assert_close(torch.cat(ys, 1), full, atol=2e-5)
    assert calls == [1, 1, 1, 1, 3]  # the first prefill attends to its own keys; every later call on the kernel


@pytest.mark.parametrize("variant", [dict(num_heads=4, num_heads_kv=1), dict(num_heads=4, num_heads_kv=2, softcap=2.0)])
def test_contiguous_cache_decodes_on_the_kernel(variant, monkeypatch):
    """A contiguous KVCache is read in place too (one page of S positions a row), with padded keys."""
    from seqblocks.ops.attention import paged_triton

    calls = []
    kernel = paged_triton.paged_attention_triton
    monkeypatch.setattr(paged_triton, "paged_attention_triton", lambda q, *a, **k: calls.append(q.shape[2]) or
                        kernel(q, *a, **k))
    torch.manual_seed(0)
    mixer = MHA(32, rotary_emb_dim=8, **variant).eval()
    B, T = 2, 11
    x = torch.randn(B, T, 32)
    mask = torch.ones(B, 5, dtype=torch.bool)
    mask[1, :2] = False  # left padding in the prompt of row 1
    with torch.no_grad():
        full = mixer(x, mask=torch.cat((mask, torch.ones(B, T - 5, dtype=torch.bool)), 1))
        cache = mixer.allocate_inference_cache(B, 16)
        with prefer_backend("triton"):
            ys = [mixer(x[:, :5], cache, mask=mask)] + [mixer(x[:, t:t + 1], cache) for t in range(5, 8)]
            ys.append(mixer(x[:, 8:], cache))
    got, want = torch.cat(ys, 1), full
    assert_close(got[1, 2:], want[1, 2:], atol=2e-5)
    assert_close(got[0], want[0], atol=2e-5)
    assert calls == [5, 1, 1, 1, 3]


def test_engine_serves_on_the_kernel():
    """Global and sliding-window (ring) layers decoding on the kernel: each request's tokens as alone."""
    from seqblocks import LRNNLMHeadModel, generate
    from seqblocks.serving import Engine, SamplingParams

    torch.manual_seed(0)
    model = LRNNLMHeadModel(d_model=32, d_state=4, n_layer=2, vocab_size=37, mixer_types=["gqa", "sliding_window"],
                            mixer_kwargs={"gqa": {"num_heads": 4, "num_heads_kv": 2},
                                          "sliding_window": {"num_heads": 4, "num_heads_kv": 1, "window_size": 5}},
                            initializer_cfg={"initializer_range": 1.0}).eval()
    prompts = [[3, 1, 4, 1, 5], [9, 2], [6, 5, 3, 5, 8, 9, 7]]
    params = SamplingParams(max_tokens=8, temperature=0)
    with prefer_backend("triton"):
        engine = Engine(model, max_batch_size=2, max_seqlen=24, prefill_chunk_size=4, page_size=4)
        got = engine.generate(prompts, params)
    assert engine.window_allocator is not None
    for p, tokens in zip(prompts, got):
        assert tokens == generate(model, torch.tensor([p]), 8, temperature=0).tokens[0].tolist()


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize(("window", "softcap", "Tq"), [(None, None, 1), (1024, None, 1), (None, 30.0, 4)])
def test_gpu_real_shapes(dtype, window, softcap, Tq):
    lens = [4096, 1, 17, 1000, 2048, 4095, 3333, 64]
    args = _inputs(8, 32, 8, Tq, 128, 16, lens, dtype, device="cuda", padding=0.01)
    atol = 2e-2 if dtype == torch.bfloat16 else 1e-4
    with torch.no_grad():
        got = _check(args, atol=atol, window=window, softcap=softcap)
        # "auto" takes the kernel on CUDA; the split count does not change the result beyond rounding
        q, kp, vp, table, seq_lens, valid = args
        auto = paged_attention(q, kp, vp, table, seq_lens, valid_pages=valid, window=window, softcap=softcap)
        assert torch.equal(auto, got)
        one = paged_attention(q, kp, vp, table, seq_lens, valid_pages=valid, window=window, softcap=softcap,
                              num_splits=1)
        assert_close(one, got, atol=atol)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_gpu_decode_step_captures_in_a_cuda_graph():
    args = _inputs(8, 32, 8, 1, 128, 16, [300, 7, 4000, 1, 64, 65, 2048, 999], torch.bfloat16, device="cuda")
    q, kp, vp, table, lens, valid = args
    with torch.no_grad():
        eager = paged_attention(q, kp, vp, table, lens, valid_pages=valid)
        paged_attention(q, kp, vp, table, lens, valid_pages=valid)  # compile before capture
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            out = paged_attention(q, kp, vp, table, lens, valid_pages=valid)
        graph.replay()
        assert torch.equal(out, eager)
        lens += 1  # the lengths are device data: the replay reads the new ones
        graph.replay()
        assert torch.equal(out, paged_attention(q, kp, vp, table, lens, valid_pages=valid))


@pytest.mark.slow
@pytest.mark.skipif(INTERPRETER, reason="compiles for the GPU")
def test_sm90_every_variant_compiles():
    """Every flag combination the launcher produces compiles for sm_90 with Triton's compiler (the
    interpreter accepts code the compiler rejects)."""
    import itertools

    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from seqblocks.ops.attention import paged_triton as k

    ints = ["sq_b", "sq_h", "sq_t", "sq_k", "sk_p", "sk_h", "sk_n", "sk_k", "sv_p", "sv_h", "sv_n", "sv_v",
            "sbt_b", "sbt_c", "sval_p", "sval_n", "H", "Hkv", "max_seqlen", "split_len", "num_splits"]

    def compile_(fn, signature, constexprs, num_warps=4):
        full = {**signature, **{name: "constexpr" for name in constexprs}}
        attrs = {(i,): [["tt.divisibility", 16]] for i, t in enumerate(full.values()) if t.startswith("*")}
        triton.compile(ASTSource(fn=fn, signature=full, constexprs=constexprs, attrs=attrs),
                       target=GPUTarget("cuda", 90, 32), options={"num_warps": num_warps})

    for dtype, (G, Tq), split, valid, window, softcap in itertools.product(
            ("bf16", "fp32"), ((1, 1), (4, 1), (4, 4)), (False, True), (False, True), (False, True), (False, True)):
        sig = {"q_ptr": f"*{dtype}", "k_ptr": f"*{dtype}", "v_ptr": f"*{dtype}", "bt_ptr": "*i64", "len_ptr": "*i64",
               "valid_ptr": "*u8", "o_ptr": "*fp32" if split else f"*{dtype}", "lse_ptr": "*fp32",
               **{name: "i32" for name in ints}, "scale": "fp32", "softcap": "fp32", "window": "i32"}
        block_m = max(16, triton.next_power_of_2(G * Tq))
        compile_(k._paged_attention_kernel, sig, dict(
            G=G, TQ=Tq, PAGE=16, K=128, V=128, BLOCK_M=block_m, BLOCK_N=64 if block_m <= 64 else 32, BLOCK_K=128,
            BLOCK_V=128, HAS_VALID=valid, HAS_WINDOW=window, HAS_SOFTCAP=softcap, SPLIT=split,
            IEEE=1 if dtype == "fp32" else 0))
    compile_(k._combine_kernel, {"part_ptr": "*fp32", "lse_ptr": "*fp32", "out_ptr": "*bf16", "num_splits": "i32"},
             dict(V=128, BLOCK_S=8, BLOCK_V=128), num_warps=2)


if not INTERPRETER:
    # Outside the interpreter the CPU cases run in the child process only (see the module docstring);
    # the gpu cases stay, to run on CUDA, and so does the sm_90 compile check.
    for _name in [n for n in list(globals()) if n.startswith("test_") and not n.startswith(("test_gpu", "test_sm90"))
                  and n != "test_kernels_under_interpreter"]:
        del globals()[_name]

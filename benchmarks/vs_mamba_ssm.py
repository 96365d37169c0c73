# ruff: noqa: B023  (closures are timed immediately, inside the loop that binds them)
"""seqblocks against mamba_ssm end to end (issue #14): one GPU run, one markdown table.

    python3 .anchors/build_anchors.py /tmp/anchors          # once per machine (about 150 s)
    PYTHONPATH=. python benchmarks/vs_mamba_ssm.py [--anchors /tmp/anchors] [--anchors-src .anchors] [--rows a,b]
        [--decode-modes graph,eager] [--json out.json]

Rows (bf16; training and layers under bf16 autocast with fp32 parameters, as in training):
- ``train``: mamba-130m LM train step (B8 T2048, cross entropy, fused AdamW): time and peak memory.
- ``layer``: the Mamba layer at d_model 768, B8 T2048, forward and forward + backward.
- ``scan``: the selective scan at (B, T, D, N) = (8, 2048, 1536, 16) and (8, 2048, 4096, 16), D skip, z
  gate, delta bias + softplus, forward and forward + backward (random cotangents on y).
- ``norm``: fused add + RMSNorm at (32768, 2048), bf16 input, fp32 residual kept in fp32.
- ``conv``: causal depthwise conv1d (B, T, D, W) = (8, 2048, 1536, 4) with silu.
- ``decode``: mamba-130m, 256 greedy tokens after a 16-token prompt, batch 1 and 8, CUDA graph and
  eager.
- ``hybrid``: the hybrid-130m preset (attention every 6th layer) train step and decode (batch 1, CUDA
  graph); mamba_ssm's attention layer needs flash_attn, so its column says why when it cannot build.
- ``llama``: llama-125m decode (batch 1 and 8, CUDA graph), ours only.

The anchor is mamba_ssm built by ``build_anchors.py``; where mamba_ssm's Mamba layer uses
causal_conv1d it is run twice: with its fast path (``mamba_inner_fn``) and with the fallback it takes
when ``causal_conv1d`` is not importable (forced in this process by setting the module attributes it
checks to None). Each row: our time, theirs, ratio (ours / theirs; < 1 is faster) and our fraction of
the roofline: max(bytes / copy bandwidth, FLOPs / bf16 matmul rate), both measured at the start of the
run. Times are medians of CUDA-event timings after warm-up. An anchor that does not import is
reported as "not installed". Needs a CUDA device.

Shapes: B batch, T time, D channels, N state, W conv width, V vocabulary.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import sys
import traceback

import torch
import torch.nn.functional as F

ROWS: list[dict] = []
ALL_ROWS = ("train", "layer", "scan", "norm", "conv", "decode", "hybrid", "llama")


def time_ms(fn, warmup: int = 3, reps: int = 10) -> float:
    """Median milliseconds of ``fn`` over ``reps`` CUDA-event timings after ``warmup`` calls."""
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    ts = []
    for _ in range(reps):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        fn()
        b.record()
        b.synchronize()
        ts.append(a.elapsed_time(b))
    return sorted(ts)[len(ts) // 2]


def copy_bandwidth() -> float:
    """Device copy bandwidth in bytes/s (read + write), 1 GiB buffers."""
    x = torch.empty(1 << 28, device="cuda")
    y = torch.empty_like(x)
    ms = time_ms(lambda: y.copy_(x), warmup=5, reps=20)
    return 2 * x.numel() * 4 / (ms * 1e-3)


def matmul_rate() -> float:
    """bf16 matmul FLOP/s at 8192^3."""
    a = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    ms = time_ms(lambda: a @ b, warmup=5, reps=20)
    return 2 * 8192 ** 3 / (ms * 1e-3)


class Roof:
    bw = 1.0
    flops = 1.0

    @classmethod
    def floor_ms(cls, nbytes: float = 0.0, flop: float = 0.0) -> float:
        return 1e3 * max(nbytes / cls.bw, flop / cls.flops)


def add_row(name: str, ours: float | None, theirs: float | str | None, floor_ms: float | None = None,
            note: str = "", **extra) -> None:
    """One table row; ``theirs`` is a time, or a string saying why there is none."""
    ratio = ours / theirs if isinstance(theirs, float) and ours else None
    roof = floor_ms / ours if floor_ms and ours else None
    row = dict(name=name, ours_ms=ours, theirs_ms=theirs if isinstance(theirs, float) else None,
               theirs_note=theirs if isinstance(theirs, str) else "", ratio=ratio, roofline=roof, note=note, **extra)
    ROWS.append(row)
    print(f"  {name:60s} ours {_fmt(ours)}  theirs {_fmt(theirs)}  ratio {_fmt(ratio, 'x')}  "
          f"roof {_fmt(roof, '%')}  {note}", flush=True)


def _fmt(v, kind: str = "ms") -> str:
    if v is None:
        return "-"
    if isinstance(v, str):
        return v
    if kind == "x":
        return f"{v:.2f}x"
    if kind == "%":
        return f"{100 * v:.0f}%"
    return f"{v:.3f} ms"


def markdown() -> str:
    lines = ["| row | ours | mamba_ssm | ours / theirs | our roofline fraction | note |",
             "| --- | ---: | ---: | ---: | ---: | --- |"]
    for r in ROWS:
        theirs = _fmt(r["theirs_ms"]) if r["theirs_ms"] is not None else r["theirs_note"] or "-"
        note = r["note"] + (f"; peak {r['ours_gb']:.1f} GB vs {_fmt_gb(r.get('theirs_gb'))}" if "ours_gb" in r else "")
        lines.append(f"| {r['name']} | {_fmt(r['ours_ms'])} | {theirs} | {_fmt(r['ratio'], 'x')} | "
                     f"{_fmt(r['roofline'], '%')} | {note} |")
    return "\n".join(lines)


def _fmt_gb(v) -> str:
    return "-" if v is None else f"{v:.1f} GB"


# ---- the anchor -------------------------------------------------------------------------------------

class Anchor:
    """mamba_ssm (and causal_conv1d) as built by build_anchors.py, or the reason they are missing."""

    def __init__(self, build_dir: str, src_dir: str = ".anchors") -> None:
        self.error = None
        try:
            sys.path[:0] = [build_dir, src_dir]  # build_anchors.py lives beside the source tarballs
            import build_anchors

            build_anchors.activate(build_dir)
            from mamba_ssm.models.config_mamba import MambaConfig
            from mamba_ssm.models.mixer_seq_simple import MambaLMHeadModel
            from mamba_ssm.modules import mamba_simple
            from mamba_ssm.modules.mamba_simple import Mamba
            from mamba_ssm.ops.selective_scan_interface import selective_scan_fn

            self.MambaConfig, self.MambaLMHeadModel, self.Mamba = MambaConfig, MambaLMHeadModel, Mamba
            self.selective_scan_fn, self.mamba_simple = selective_scan_fn, mamba_simple
        except Exception as e:  # noqa: BLE001  (any import failure means "not installed")
            self.error = f"not installed ({type(e).__name__}: {e})"[:160]
        self.rms_norm_fn = self.causal_conv1d_fn = None
        with contextlib.suppress(Exception):
            from mamba_ssm.ops.triton.layer_norm import rms_norm_fn

            self.rms_norm_fn = rms_norm_fn
        with contextlib.suppress(Exception):
            from causal_conv1d import causal_conv1d_fn

            self.causal_conv1d_fn = causal_conv1d_fn

    @contextlib.contextmanager
    def without_causal_conv1d(self):
        """mamba_ssm's Mamba as if causal_conv1d were not importable: its module-level names set to None
        (the layer then takes its PyTorch-conv path, still with the CUDA selective scan)."""
        m = self.mamba_simple
        saved = m.causal_conv1d_fn, m.causal_conv1d_update
        m.causal_conv1d_fn = m.causal_conv1d_update = None
        try:
            yield
        finally:
            m.causal_conv1d_fn, m.causal_conv1d_update = saved


def _guard(fn, *args):
    """Run an anchor measurement; a failure becomes the string shown in its column."""
    try:
        return fn(*args)
    except Exception as e:  # noqa: BLE001
        traceback.print_exc(limit=2)
        return f"failed ({type(e).__name__})"


# ---- models -----------------------------------------------------------------------------------------

def our_model(preset: str, device: str = "cuda"):
    from seqblocks.presets import build_model, get_preset

    return build_model(get_preset(preset)["model"], device=device)


def their_model(anchor: Anchor, ours, attn_every: int | None = None):
    cfg = ours.config
    attn = {}
    if attn_every:
        attn = dict(attn_layer_idx=[i for i in range(cfg.n_layer) if i % attn_every == attn_every - 1],
                    attn_cfg={"num_heads": 12, "rotary_emb_dim": 64, "causal": True})
    mc = anchor.MambaConfig(d_model=cfg.d_model, n_layer=cfg.n_layer, vocab_size=ours.vocab_size,
                            ssm_cfg={"layer": "Mamba1", "d_state": 16, "d_conv": 4, "expand": 2},
                            rms_norm=True, fused_add_norm=True, residual_in_fp32=cfg.residual_in_fp32,
                            d_intermediate=0, pad_vocab_size_multiple=8, tie_embeddings=True, **attn)
    return anchor.MambaLMHeadModel(mc, device="cuda")


def their_decode_model(anchor: Anchor, ours, attn_every: int | None = None):
    return their_model(anchor, ours, attn_every).to(torch.bfloat16).eval()


def train_step_fn(model, B: int = 8, T: int = 2048):
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)
    V = model.lm_head.weight.shape[0] if hasattr(model, "lm_head") else 50277
    ids = torch.randint(0, min(V, 50277), (B, T + 1), device="cuda")

    def step():
        opt.zero_grad(set_to_none=True)
        with torch.autocast("cuda", dtype=torch.bfloat16):
            logits = model(ids[:, :-1]).logits
        loss = F.cross_entropy(logits.float().flatten(0, 1), ids[:, 1:].flatten())
        loss.backward()
        opt.step()
    return step


def train_row(name, preset: str, anchor: Anchor, attn_every: int | None = None, B: int = 8, T: int = 2048):
    """Time and peak memory of a train step of our ``preset`` and of mamba_ssm's equal model. Peak memory
    counts from before each model is built (parameters, gradients, optimizer state and activations),
    with the other model freed."""
    def measure(build):
        gc.collect()
        torch.cuda.empty_cache()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        model = build()
        n_mat = sum(p.numel() for p in model.parameters() if p.dim() == 2)
        step = train_step_fn(model, B, T)
        ms = time_ms(step, warmup=2, reps=5)
        peak = (torch.cuda.max_memory_allocated() - base) / 1e9
        del model, step
        return ms, peak, n_mat

    ours_ms, ours_gb, n_mat = measure(lambda: our_model(preset))
    theirs, gb = anchor.error, None
    if not anchor.error:
        res = _guard(measure, lambda: their_model(anchor, our_model(preset, device="meta"), attn_every))
        theirs, gb = (res[0], res[1]) if isinstance(res, tuple) else (res, None)
    add_row(name, ours_ms, theirs, Roof.floor_ms(flop=6 * B * T * n_mat), note="FLOPs 6 x tokens x matrix params",
            ours_gb=ours_gb, theirs_gb=gb)


def decode_fn(model, B: int, cg: bool, anchor_model: bool, new: int = 256, prompt: int = 16):
    ids = torch.randint(0, 50000, (B, prompt), device="cuda")
    if anchor_model:
        return lambda: model.generate(ids, max_length=prompt + new, top_k=1, cg=cg)
    from seqblocks.generation import generate

    return lambda: generate(model, ids, new, temperature=0.0, cuda_graph=cg)


DECODE_MODES = {"graph": True, "eager": False}
DECODE_GRAPHS = (True, False)  # set from --decode-modes


def decode_rows(label, ours, theirs_model, batches=(1, 8), graphs=None, new=256):
    graphs = DECODE_GRAPHS if graphs is None else tuple(g for g in graphs if g in DECODE_GRAPHS)
    n_bytes = sum(p.numel() * 2 for p in ours.parameters())  # bf16 weights read once per token
    for B in batches:
        for cg in graphs:
            floor = Roof.floor_ms(nbytes=n_bytes) * new
            ours_ms = time_ms(decode_fn(ours, B, cg, False, new), warmup=1, reps=3)
            theirs = theirs_model if isinstance(theirs_model, str) else _guard(
                lambda: time_ms(decode_fn(theirs_model, B, cg, True, new), warmup=1, reps=3))
            add_row(f"{label} decode {new} greedy tokens, batch {B}, {'CUDA graph' if cg else 'eager'}", ours_ms,
                    theirs, floor, note="floor: bf16 weights read once per token")


# ---- rows -------------------------------------------------------------------------------------------

def rows_train(anchor):
    train_row("mamba-130m train step B8 T2048 (bf16 autocast, fused AdamW)", "mamba-130m", anchor)


def rows_layer(anchor):
    from seqblocks.layers.mixers.mamba import Mamba

    B, T, D = 8, 2048, 768
    ours = Mamba(D, device="cuda")
    x = torch.randn(B, T, D, device="cuda", requires_grad=True)
    gy = torch.randn(B, T, D, device="cuda", dtype=torch.bfloat16)
    n_mat = sum(p.numel() for p in ours.parameters() if p.dim() == 2 and p.shape[-1] != ours.d_conv)
    bytes_fwd = B * T * D * 2 * 2 + B * T * ours.d_inner * 2 * 6  # x, y; xz, u, delta, y_inner (bf16)

    def fwd(m):
        with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16):
            m(x)

    def fb(m):
        x.grad = None
        with torch.autocast("cuda", dtype=torch.bfloat16):
            y = m(x)
        y.backward(gy)

    theirs = None
    if not anchor.error:
        theirs = anchor.Mamba(d_model=D, d_state=16, d_conv=4, expand=2, device="cuda")
    for kind, fn, k in (("fwd", fwd, 1), ("fwd+bwd", fb, 3)):
        floor = Roof.floor_ms(nbytes=k * bytes_fwd, flop=2 * k * B * T * n_mat)
        ours_ms = time_ms(lambda: fn(ours))
        if theirs is None:
            add_row(f"Mamba layer d768 B8 T2048 {kind}", ours_ms, anchor.error, floor)
            continue
        t_fast = _guard(lambda: time_ms(lambda: fn(theirs)))
        add_row(f"Mamba layer d768 B8 T2048 {kind} (vs mamba_inner_fn + causal_conv1d)", ours_ms, t_fast, floor)
        with anchor.without_causal_conv1d():
            t_slow = _guard(lambda: time_ms(lambda: fn(theirs)))
        add_row(f"Mamba layer d768 B8 T2048 {kind} (vs mamba_ssm without causal_conv1d)", ours_ms, t_slow, floor)


def rows_scan(anchor):
    from seqblocks.ops.selective_scan import selective_scan

    for B, T, D, N in ((8, 2048, 1536, 16), (8, 2048, 4096, 16)):
        dev, dt = "cuda", torch.bfloat16
        u = torch.randn(B, T, D, device=dev, dtype=dt, requires_grad=True)
        delta = (torch.randn(B, T, D, device=dev) * 0.5 - 1).to(dt).requires_grad_()
        z = torch.randn(B, T, D, device=dev, dtype=dt, requires_grad=True)
        A = (-torch.rand(D, N, device=dev) * 4 - 0.5).requires_grad_()
        Bm = torch.randn(B, T, N, device=dev, dtype=dt, requires_grad=True)
        Cm = torch.randn(B, T, N, device=dev, dtype=dt, requires_grad=True)
        Dv = torch.randn(D, device=dev, requires_grad=True)
        bias = torch.randn(D, device=dev, requires_grad=True)
        gy = torch.randn(B, T, D, device=dev, dtype=dt)
        ours_ins = [u, delta, z, A, Bm, Cm, Dv, bias]
        # theirs in their own layout ([B, D, T], B / C [B, N, T]), copied outside the timing
        th = [t.detach().transpose(1, 2).contiguous().requires_grad_() for t in (u, delta, z, Bm, Cm)]
        th_ins = th + [A, Dv, bias]
        gy_t = gy.transpose(1, 2).contiguous()

        def ours_call():
            return selective_scan(u, delta, A, Bm, Cm, Dv, z, delta_bias=bias, delta_softplus=True)[0]

        def their_call():
            tu, td, tz, tB, tC = th
            return anchor.selective_scan_fn(tu, td, A, tB, tC, Dv, tz, delta_bias=bias, delta_softplus=True)

        elems = B * T * D
        bytes_fwd = elems * 2 * 4 + 2 * B * T * N * 2  # u, delta, z read, y written; B, C
        bytes_bwd = elems * 2 * 7 + 4 * B * T * N * 2  # u, delta, z, dy read; du, ddelta, dz written
        for kind, grad in (("fwd", False), ("fwd+bwd", True)):
            def run(call, ins, g):
                def f():
                    for t in ins:
                        t.grad = None
                    if grad:
                        call().backward(g)
                    else:
                        with torch.no_grad():
                            call()
                return f
            floor = Roof.floor_ms(nbytes=bytes_fwd + (bytes_bwd if grad else 0))
            ours_ms = time_ms(run(ours_call, ours_ins, gy), warmup=5, reps=20)
            theirs = anchor.error or _guard(lambda: time_ms(run(their_call, th_ins, gy_t), warmup=5, reps=20))
            add_row(f"selective scan ({B}, {T}, {D}, {N}) {kind}", ours_ms, theirs, floor,
                    note="CUDA kernel anchor; floor: HBM bytes")


def rows_norm(anchor):
    from seqblocks.ops.add_norm import add_norm

    M, D = 32768, 2048
    x = torch.randn(M, D, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    res = torch.randn(M, D, device="cuda", dtype=torch.float32, requires_grad=True)
    w = torch.ones(D, device="cuda", requires_grad=True)
    gy = torch.randn(M, D, device="cuda", dtype=torch.bfloat16)
    gr = torch.randn(M, D, device="cuda", dtype=torch.float32)

    def ours_call():
        return add_norm(x, res, w, None, 1e-5, True, residual_in_fp32=True, prenorm=True)

    def their_call():
        return anchor.rms_norm_fn(x, w, None, residual=res, eps=1e-5, prenorm=True, residual_in_fp32=True)

    elems = M * D
    for kind, grad in (("fwd", False), ("fwd+bwd", True)):
        nbytes = elems * (2 + 4 + 2 + 4) + (elems * (4 + 2 + 4 + 2 + 4) if grad else 0)

        def run(call):
            def f():
                x.grad = res.grad = w.grad = None
                if grad:
                    y, r = call()
                    torch.autograd.backward([y, r], [gy, gr])
                else:
                    with torch.no_grad():
                        call()
            return f
        theirs = "not installed" if anchor.rms_norm_fn is None else _guard(lambda: time_ms(run(their_call), 5, 20))
        add_row(f"fused add + RMSNorm (32768, 2048) {kind}", time_ms(run(ours_call), 5, 20), theirs,
                Roof.floor_ms(nbytes=nbytes), note="bf16 x, fp32 residual kept fp32; anchor: mamba_ssm Triton")


def rows_conv(anchor):
    from seqblocks.ops.causal_conv1d import causal_conv1d

    B, T, D, W = 8, 2048, 1536, 4
    x = torch.randn(B, T, D, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    w = torch.randn(D, W, device="cuda", requires_grad=True)
    b = torch.randn(D, device="cuda", requires_grad=True)
    gy = torch.randn(B, T, D, device="cuda", dtype=torch.bfloat16)

    def ours_call():
        return causal_conv1d(x, w, b, activation="silu")[0]

    def their_call():  # channel-last: the [B, T, D] memory seen as [B, D, T]
        return anchor.causal_conv1d_fn(x.transpose(1, 2), w, b, activation="silu").transpose(1, 2)

    elems = B * T * D
    for kind, grad in (("fwd", False), ("fwd+bwd", True)):
        nbytes = elems * 2 * 2 + (elems * 2 * 3 if grad else 0)

        def run(call):
            def f():
                x.grad = w.grad = b.grad = None
                if grad:
                    call().backward(gy)
                else:
                    with torch.no_grad():
                        call()
            return f
        theirs = ("not installed" if anchor.causal_conv1d_fn is None
                  else _guard(lambda: time_ms(run(their_call), 5, 20)))
        add_row(f"causal conv1d (8, 2048, 1536, 4) silu {kind}", time_ms(run(ours_call), 5, 20), theirs,
                Roof.floor_ms(nbytes=nbytes), note="anchor: causal_conv1d CUDA, channel-last")


def rows_decode(anchor):
    ours = our_model("mamba-130m").to(torch.bfloat16)
    theirs = anchor.error or _guard(their_decode_model, anchor, ours)
    with torch.inference_mode():
        decode_rows("mamba-130m", ours.eval(), theirs)
    del ours, theirs
    torch.cuda.empty_cache()


def rows_hybrid(anchor):
    train_row("hybrid-130m train step B8 T2048 (bf16 autocast, fused AdamW)", "hybrid-130m", anchor, attn_every=6)
    ours = our_model("hybrid-130m").to(torch.bfloat16).eval()
    theirs = anchor.error or _guard(their_decode_model, anchor, ours, 6)
    with torch.inference_mode():
        decode_rows("hybrid-130m", ours, theirs, batches=(1,), graphs=(True,))
    del ours, theirs
    torch.cuda.empty_cache()


def rows_llama(anchor):
    ours = our_model("llama-125m").to(torch.bfloat16).eval()
    with torch.inference_mode():
        decode_rows("llama-125m", ours, "no anchor (mamba_ssm has no Llama)", graphs=(True,))
    del ours
    torch.cuda.empty_cache()


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--anchors", default="/tmp/anchors", help="build folder of build_anchors.py")
    p.add_argument("--rows", default=",".join(ALL_ROWS), help=f"comma-separated subset of {ALL_ROWS}")
    p.add_argument("--json", default=None, help="write the rows here")
    p.add_argument("--anchors-src", default=".anchors", help="folder holding build_anchors.py")
    p.add_argument("--decode-modes", default="graph,eager", help="decode rows to time: graph, eager or both")
    args = p.parse_args(argv)
    global DECODE_GRAPHS
    modes = [m.strip() for m in args.decode_modes.split(",") if m.strip()]
    if not modes or set(modes) - set(DECODE_MODES):
        p.error(f"--decode-modes takes some of {sorted(DECODE_MODES)}, got {args.decode_modes!r}")
    DECODE_GRAPHS = tuple(DECODE_MODES[m] for m in modes)
    rows = [r.strip() for r in args.rows.split(",") if r.strip()]
    bad = sorted(set(rows) - set(ALL_ROWS))
    if bad:
        p.error(f"unknown rows {bad}; expected some of {ALL_ROWS}")
    if not torch.cuda.is_available():
        sys.exit("vs_mamba_ssm.py needs a CUDA device")
    torch.manual_seed(0)
    Roof.bw, Roof.flops = copy_bandwidth(), matmul_rate()
    print(f"{torch.cuda.get_device_name()}: copy {Roof.bw / 1e12:.2f} TB/s, bf16 matmul {Roof.flops / 1e12:.0f} "
          f"TFLOP/s", flush=True)
    anchor = Anchor(args.anchors, args.anchors_src)
    print(f"mamba_ssm: {anchor.error or 'imported'}", flush=True)
    for r in rows:
        print(f"[{r}]", flush=True)
        try:
            globals()[f"rows_{r}"](anchor)
        except Exception as e:  # noqa: BLE001  (one failing row must not lose the others)
            traceback.print_exc()
            add_row(f"{r}: failed ({type(e).__name__}: {e})"[:120], None, None)
        torch.cuda.empty_cache()
    print()
    print(markdown())
    if args.json:
        with open(args.json, "w") as f:
            json.dump(dict(device=torch.cuda.get_device_name(), copy_bw=Roof.bw, matmul_flops=Roof.flops,
                           anchor=anchor.error or "mamba_ssm", rows=ROWS), f, indent=1)


if __name__ == "__main__":
    main()

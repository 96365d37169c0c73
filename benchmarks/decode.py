# ruff: noqa: B023  (closures are timed immediately, inside the loop that binds them)
"""Decode benchmark: tokens/s of greedy generation, eager and CUDA graph, against mamba_ssm and a roofline.

    python benchmarks/decode.py [--presets mamba-130m,hybrid-130m,llama-125m] [--batches 1,8]
                                [--tokens 256] [--prompt-len 32] [--repeats 3] [--json out.json]
                                [--fused | --no-fused | --compare-fused] [--anchors /tmp/anchors]
    python benchmarks/decode.py --aten-counts          # CPU: ATen calls per decode step of each mixer

For each preset (random weights, bf16), batch size and mode (eager, CUDA graph) it prints our
tokens/s (median of ``--repeats`` timed ``generate`` calls after a warm-up call, which also captures
the graph that later calls reuse), the anchor's tokens/s in the same run, the ratio, the kernels one
decode step launches (per step and per layer, counted with ``torch.profiler``: a graph replay, or one
eager ``model.step``) and our fraction of the roofline. The roofline is the fewest bytes a step must
move, every weight once plus the recurrent state read and written (the whole KV capacity read for
attention layers: an upper bound), over the device-to-device copy bandwidth measured in this run.

The anchor is mamba_ssm's ``MambaLMHeadModel.generate(..., cg=True)`` (``cg=False`` for eager) with
a randomly initialised model of the same shape (24 layers, d_model 768, attention layers of the
hybrid at the same positions); it is reported as "not installed" when mamba_ssm does not import and
"no anchor" for the transformer. ``--anchors BUILD_DIR`` imports it as ``.anchors/build_anchors.py`` built
it there (``--anchors-src`` names the folder of that script).

Mamba layers decode through the fused ``mamba_step`` (conv + x_proj + dt_proj + state update + gate in
two launches, docs/kernels.md "Decode step kernels"; in_proj folded in too only with ``Mamba.fold_in_proj``,
off by default) by default; ``--no-fused`` times the unfused step
(x_proj and dt_proj as cuBLAS GEMMs around ``conv_step`` and ``selective_state_update``), and
``--compare-fused`` times both, one after the other, in the same run (rows carry ``fused``).

``--aten-counts`` runs on the CPU: per mixer family (d_model 768, the 130m shapes), the top-level
ATen calls of one decode step on the PyTorch path and on the Triton path (each Triton launch is
replaced by a no-op there, so the count is the host-side work that remains around the kernels).

Shapes: B batch, T prompt length, N new tokens.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import json
import statistics
import sys
import time

import torch

from seqblocks.generation import count_aten_calls, count_kernels, decode_one_token, generate, graph_decoder
from seqblocks.presets import build_model, get_preset

ROWS: list[dict] = []


@contextlib.contextmanager
def mamba_fusion(enabled: bool):
    """Within the region, Mamba's decode step takes the fused ``mamba_step`` (True, the default here)
    or the unfused one (False); ``Mamba.fuse_decode_step`` is the switch, on in the library."""
    from seqblocks.layers.mixers.mamba import Mamba

    real = Mamba.fuse_decode_step
    Mamba.fuse_decode_step = enabled
    try:
        yield
    finally:
        Mamba.fuse_decode_step = real


def copy_bandwidth() -> float:
    """Device-to-device copy bandwidth in bytes/s (read + write), 1 GiB buffers."""
    from triton.testing import do_bench

    x = torch.randn(1 << 28, device="cuda")
    y = torch.empty_like(x)
    ms = do_bench(lambda: y.copy_(x), warmup=25, rep=100, return_mode="median")
    return 2 * x.numel() * 4 / (ms * 1e-3)


def tokens_per_second(run, batch: int, tokens: int, repeats: int) -> float:
    run()  # warm-up: kernels compiled, graph captured (and cached for the timed calls)
    times = []
    for _ in range(repeats):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        run()
        torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    return batch * tokens / statistics.median(times)


def step_bytes(model, caches) -> int:
    """Weights once (a tied embedding counts once) plus every cache tensor read and written."""
    weights = sum(p.numel() * p.element_size() for p in {id(p): p for p in model.parameters()}.values())
    state = sum(t.numel() * t.element_size() for t in caches.tensors())
    return weights + 2 * state


def mamba_ssm_model(preset: dict, dtype: torch.dtype):
    """mamba_ssm's model of the preset's shape, or a string saying why there is none."""
    cfg = preset["model"]
    types = cfg["mixer_types"]
    if any(t not in ("mamba", "attn") for t in types) or "mamba" not in types:
        return "no anchor"
    try:
        from mamba_ssm.models.config_mamba import MambaConfig
        from mamba_ssm.models.mixer_seq_simple import MambaLMHeadModel
    except Exception:  # any import failure: missing package or a broken CUDA extension
        return "not installed"
    attn = (cfg.get("mixer_kwargs") or {}).get("attn", {})
    config = MambaConfig(d_model=cfg["d_model"], n_layer=cfg["n_layer"], vocab_size=cfg["vocab_size"],
                         d_intermediate=cfg.get("d_intermediate", 0), ssm_cfg={"layer": "Mamba1"},
                         attn_layer_idx=[i for i, t in enumerate(types) if t == "attn"],
                         attn_cfg={"num_heads": attn.get("num_heads", 12),
                                   "rotary_emb_dim": attn.get("rotary_emb_dim", 0)} if "attn" in types else {})
    try:
        return MambaLMHeadModel(config, device="cuda", dtype=dtype).eval()
    except Exception as err:  # e.g. an attention layer that needs flash_attn
        return f"failed: {type(err).__name__}"


def report(row: dict) -> None:
    ROWS.append(row)
    anchor = row["anchor_tps"]
    anchor_s = f"{anchor:8.0f}" if isinstance(anchor, float) else f"{anchor:>8s}"
    ratio = f"{row['ours_tps'] / anchor:5.2f}x" if isinstance(anchor, float) else "    -"
    fused = "fused  " if row["fused"] else "unfused"
    print(f"  {row['preset']:12s} B={row['batch']:<2d} {row['mode']:6s} {fused} ours {row['ours_tps']:8.0f} tok/s  "
          f"anchor {anchor_s}  ratio {ratio}  kernels/step {row['kernels_per_step']:5d} "
          f"({row['kernels_per_layer']:.1f}/layer)  roofline {100 * row['roofline_frac']:5.1f}%", flush=True)


def bench_preset(name: str, batches: list[int], tokens: int, prompt_len: int, repeats: int, bw: float,
                 fused: bool = True) -> None:
    preset = get_preset(name)
    dtype = torch.bfloat16
    torch.manual_seed(0)
    model = build_model(preset["model"], device=torch.device("cuda"), dtype=dtype).eval()
    anchor = mamba_ssm_model(preset, dtype)
    n_layer = preset["model"]["n_layer"]
    vocab = preset["model"]["vocab_size"]
    for batch in batches:
        prompt = torch.randint(0, vocab, (batch, prompt_len), device="cuda")
        capacity = prompt_len + tokens
        for mode in ("eager", "graph"):
            cg = mode == "graph"
            ours = tokens_per_second(lambda: generate(model, prompt, tokens, temperature=0, cuda_graph=cg),
                                     batch, tokens, repeats)
            with torch.no_grad():
                if cg:
                    decoder = graph_decoder(model, batch, capacity, prompt.device)
                    caches = decoder.caches
                    run_step = decoder.graph.replay
                else:
                    caches = model.allocate_inference_cache(batch, capacity)
                    step = prompt[:, :1]
                    decode_one_token(model, step, caches)
                    run_step = lambda: decode_one_token(model, step, caches)  # noqa: E731
                try:
                    kernels = count_kernels(run_step)
                except Exception as err:  # the profiler is a diagnostic: report, go on
                    print(f"  (kernel count failed: {err!r})")
                    kernels = -1
            if isinstance(anchor, str):
                anchor_tps = anchor
            else:
                def run_anchor():
                    anchor.generate(prompt, max_length=capacity, cg=cg, top_k=1, return_dict_in_generate=True)
                try:
                    anchor_tps = tokens_per_second(run_anchor, batch, tokens, repeats)
                except Exception as err:  # the anchor's own failure is reported, not fatal
                    anchor_tps = f"failed: {type(err).__name__}"
            floor_s = step_bytes(model, caches) / bw
            report({"preset": name, "batch": batch, "mode": mode, "fused": fused, "tokens": tokens,
                    "prompt_len": prompt_len,
                    "ours_tps": ours, "anchor_tps": anchor_tps, "kernels_per_step": kernels,
                    "kernels_per_layer": kernels / n_layer, "step_bytes": step_bytes(model, caches),
                    "roofline_tps": batch / floor_s, "roofline_frac": ours / (batch / floor_s)})


@contextlib.contextmanager
def triton_launches_stubbed():
    """Every decode-step op takes its Triton path, and each kernel launch does nothing (CPU counting)."""
    from seqblocks.ops import _backend

    real = _backend.resolve_backend
    ops = {"mamba_step", "selective_state_update", "conv_step", "linear_scan_step", "rglru_step", "s7_step",
           "add_norm"}

    def forced(backend, *tensors, op, has_kernel=True):
        return "triton" if (op in ops and has_kernel) else real(backend, *tensors, op=op, has_kernel=has_kernel)

    class NoLaunch:
        def __getitem__(self, grid):
            return lambda *args, **kwargs: None

    patched = []
    for module, attr in [("seqblocks.ops.selective_scan", "resolve_backend"),
                         ("seqblocks.ops.selective_scan.step", "resolve_backend"),
                         ("seqblocks.ops.scan.step", "resolve_backend"),
                         ("seqblocks.ops.add_norm", "resolve_backend")]:
        mod = importlib.import_module(module)
        patched.append((mod, attr, getattr(mod, attr)))
        setattr(mod, attr, forced)
    for module in ("seqblocks.ops.selective_scan.step_triton", "seqblocks.ops.scan.step_triton",
                   "seqblocks.ops.add_norm.triton"):
        mod = importlib.import_module(module)
        for attr in [a for a in vars(mod) if a.endswith("_kernel")]:
            patched.append((mod, attr, getattr(mod, attr)))
            setattr(mod, attr, NoLaunch())
    try:
        yield
    finally:
        for mod, attr, value in patched:
            setattr(mod, attr, value)


def aten_counts() -> None:
    from seqblocks.registry import MIXERS

    print("== ATen calls per decode step (one mixer, d_model 768, batch 1, CPU) ==")
    for name, kwargs in [("Mamba", {}), ("RGLRU", {}), ("S5", {"d_state": 64}), ("LRU", {"d_state": 64}),
                         ("S7", {})]:
        counts = {}
        for path in ("torch", "triton"):
            torch.manual_seed(0)
            mixer = MIXERS.get(name)(768, **kwargs).eval()
            cache = mixer.allocate_inference_cache(1, 16)
            x = torch.randn(1, 1, 768)
            with torch.no_grad(), (triton_launches_stubbed() if path == "triton" else contextlib.nullcontext()):
                mixer(x, cache)
                counts[path] = count_aten_calls(lambda: mixer(x, cache))[0]
        ROWS.append({"mixer": name, "aten_torch": counts["torch"], "aten_triton": counts["triton"]})
        print(f"  {name:6s} PyTorch path {counts['torch']:4d} top-level ATen calls; Triton path "
              f"{counts['triton']:4d} plus its launches", flush=True)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--presets", default="mamba-130m,hybrid-130m,llama-125m")
    p.add_argument("--batches", default="1,8")
    p.add_argument("--tokens", type=int, default=256)
    p.add_argument("--prompt-len", type=int, default=32)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--aten-counts", action="store_true", help="count ATen calls per step on the CPU and exit")
    p.add_argument("--json", default=None, help="write the rows to this JSON file")
    p.add_argument("--anchors", default=None,
                   help="build folder of .anchors/build_anchors.py: mamba_ssm imported from there")
    p.add_argument("--anchors-src", default=".anchors", help="folder holding build_anchors.py")
    fusion = p.add_mutually_exclusive_group()
    fusion.add_argument("--fused", dest="fused", action="store_const", const="fused", default="fused",
                        help="Mamba steps through the fused mamba_step (default)")
    fusion.add_argument("--no-fused", dest="fused", action="store_const", const="unfused",
                        help="Mamba steps through the unfused step (x_proj and dt_proj as GEMMs)")
    fusion.add_argument("--compare-fused", dest="fused", action="store_const", const="both",
                        help="time the fused and the unfused step, one after the other")
    args = p.parse_args()
    if args.anchors:
        sys.path[:0] = [args.anchors_src]
        import build_anchors

        build_anchors.activate(args.anchors)
    if args.aten_counts:
        aten_counts()
    else:
        if not torch.cuda.is_available():
            raise SystemExit("benchmarks/decode.py needs a CUDA device (or --aten-counts on the CPU)")
        bw = copy_bandwidth()
        print(f"copy bandwidth {bw / 1e12:.2f} TB/s; {torch.cuda.get_device_name()}, torch {torch.__version__}")
        fusions = {"fused": (True,), "unfused": (False,), "both": (True, False)}[args.fused]
        for name in args.presets.split(","):
            print(f"\n== {name}: {args.tokens} greedy tokens after a {args.prompt_len}-token prompt, bf16 ==",
                  flush=True)
            for fused in fusions:
                with mamba_fusion(fused):
                    bench_preset(name, [int(b) for b in args.batches.split(",")], args.tokens, args.prompt_len,
                                 args.repeats, bw, fused)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(ROWS, f, indent=1)


if __name__ == "__main__":
    main()

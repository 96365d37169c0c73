"""``seqblocks bench``: mixer speed on this machine, ``bench tasks``: MQAR across mixer types, and
``bench mup``: learning-rate transfer across widths with and without muP.

Speed: each causal mixer is built alone at width D and timed on [B, T, D] inputs: forward,
forward + backward, and one decode step after a prefill of T tokens (median of ``--repeats`` runs
after a warm-up). Tasks: a 2-layer model per mixer type (with gated MLPs) is trained on MQAR and
scored on held-out rows; attention and input-dependent mixers (Mamba) should recall the pairs, LTI
mixers (S4D, LRU) should fall behind (Arora et al., "Zoology", 2023).

muP: a 2-layer attention LM (untied head) is trained at two widths over a sweep of learning rates on
the embedded character task, in the standard parameterisation and in muP (base width = the narrower
one); with muP the best learning rate of the narrow model should also be (near) the best of the wide one.

Each writes ``<name>.md`` (a markdown table), ``<name>.json`` and ``<name>.png`` (when matplotlib is
installed) into ``--out``.

Shapes: B batch, T time, D width.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch

__all__ = ["run_speed_bench", "run_task_bench", "run_mup_bench", "speed_rows", "task_rows", "mup_rows",
           "markdown_table"]

TASK_MIXERS = ("attn", "mamba", "rglru", "s4d", "lru")
MUP_LRS = (1e-3, 3e-3, 1e-2, 3e-2, 1e-1)


def markdown_table(headers: list[str], rows: list[list[Any]]) -> str:
    def cell(v: Any) -> str:
        return f"{v:.3f}" if isinstance(v, float) else str(v)

    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def _device(name: str) -> torch.device:
    from seqblocks.train.distributed import resolve_device

    return resolve_device(name)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _time(fn, device: torch.device, repeats: int) -> float:
    """Median wall time of ``fn()`` in milliseconds, after two warm-up calls."""
    fn()
    fn()
    _sync(device)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        _sync(device)
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def _distinct_mixers() -> list[str]:
    """One name per registered mixer class (its primary name, not an alias), without the identity mixer."""
    from seqblocks.registry import MIXERS

    return [n for n in MIXERS.primary_names() if not getattr(MIXERS.get(n), "is_identity", False)]


def speed_rows(mixers: list[str], d_model: int, seq_len: int, batch_size: int, repeats: int,
               device: torch.device, dtype: torch.dtype = torch.float32) -> list[dict[str, Any]]:
    """Time each mixer; a mixer that cannot run here gets its reason in ``note``."""
    rows = []
    for name in mixers:
        row: dict[str, Any] = {"mixer": name, "params": None, "forward_ms": None, "fwd_bwd_ms": None,
                               "step_ms": None, "note": ""}
        try:
            _measure(row, name, d_model, seq_len, batch_size, repeats, device, dtype)
        except Exception as err:  # any mixer that cannot run here is reported, not fatal
            row["note"] = f"{type(err).__name__}: {str(err).splitlines()[0][:120]}"
        rows.append(row)
    return rows


def _measure(row: dict[str, Any], name: str, d_model: int, seq_len: int, batch_size: int, repeats: int,
             device: torch.device, dtype: torch.dtype) -> None:
    """Fill ``row`` with the parameter count and the three timings of mixer ``name``."""
    from seqblocks.layers.adapters import call_any_mixer
    from seqblocks.layers.build import build_mixer, mixer_config

    torch.manual_seed(0)
    config = mixer_config(name, d_model, d_state=16, kwargs=_bench_kwargs(name, d_model, seq_len))
    mixer = build_mixer(name, config, layer_idx=0)
    call_mixer = lambda m, x, cache=None: (call_any_mixer(m, x, cache), cache)  # noqa: E731
    mixer = mixer.to(device=device, dtype=dtype)
    row["params"] = sum(p.numel() for p in mixer.parameters())
    x = torch.randn(batch_size, seq_len, d_model, device=device, dtype=dtype)
    with torch.no_grad():
        row["forward_ms"] = _time(lambda: call_mixer(mixer, x), device, repeats)
    xg = x.clone().requires_grad_(True)
    grad = torch.randn_like(x)

    def fwd_bwd() -> None:
        y, _ = call_mixer(mixer, xg)
        y.backward(grad)

    row["fwd_bwd_ms"] = _time(fwd_bwd, device, repeats)
    mixer.zero_grad(set_to_none=True)
    with torch.no_grad():
        cache = mixer.allocate_inference_cache(batch_size, seq_len + repeats + 2, dtype=dtype)
        call_mixer(mixer, x, cache=cache)
        x1 = x[:, -1:]
        row["step_ms"] = _time(lambda: call_mixer(mixer, x1, cache=cache), device, repeats)


def _bench_kwargs(name: str, d_model: int, seq_len: int) -> dict[str, Any]:
    """Constructor arguments some mixers need that have no default, and head sizes that fit ``d_model``."""
    from seqblocks.layers.build import accepted_keys, mixer_class

    params = accepted_keys(mixer_class(name))
    kw: dict[str, Any] = {}
    if "num_heads" in params:
        kw["num_heads"] = max(1, d_model // 16) if d_model < 256 else d_model // 64
        if "rotary_emb_dim" in params:  # attention needs positions; the recurrent mixers have their own
            kw["rotary_emb_dim"] = d_model // kw["num_heads"]
        if "head_dim" in params:  # heads that split the width (Gated DeltaNet's default, 256, is for d_model 2048)
            kw["head_dim"] = max(1, d_model // kw["num_heads"])
    if "window_size" in params and name.lower().startswith("sliding"):
        kw["window_size"] = max(1, seq_len // 4)
    return kw


def _plot_speed(rows: list[dict[str, Any]], path: Path, title: str) -> bool | str:
    from seqblocks.train.plot import MISSING_MATPLOTLIB, pyplot

    plt = pyplot()
    if plt is None:
        return MISSING_MATPLOTLIB
    ok = [r for r in rows if r["forward_ms"] is not None]
    fig, ax = plt.subplots(figsize=(max(6, 0.9 * len(ok) + 2), 4), dpi=100)
    width = 0.27
    for k, (key, label) in enumerate((("forward_ms", "forward"), ("fwd_bwd_ms", "forward+backward"),
                                      ("step_ms", "decode step"))):
        xs = [i + (k - 1) * width for i in range(len(ok))]
        ax.bar(xs, [r[key] or 0.0 for r in ok], width, label=label)
    ax.set_xticks(range(len(ok)), [r["mixer"] for r in ok], rotation=30)
    ax.set_yscale("log")
    ax.set_ylabel("milliseconds (log)")
    ax.set_title(title, fontsize=9)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return True


def _write(out: Path, stem: str, table: str, payload: dict[str, Any]) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{stem}.md").write_text(table)
    (out / f"{stem}.json").write_text(json.dumps(payload, indent=2))


def run_speed_bench(args: argparse.Namespace) -> int:
    import seqblocks  # noqa: F401

    device = _device(args.device)
    dtype = torch.bfloat16 if args.dtype == "bf16" else torch.float32
    mixers = _mixer_names(args.mixers) if args.mixers else _distinct_mixers()
    d, T, B = args.d_model or 256, args.seq_len or 512, args.batch_size or 4
    where = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU, {torch.get_num_threads()} threads"
    title = f"mixer speed on {device} ({where}), B={B} T={T} D={d} {args.dtype}"
    rows = speed_rows(mixers, d, T, B, args.repeats, device, dtype)
    headers = ["mixer", "params", "forward ms", "fwd+bwd ms", "decode step ms", "note"]
    table = f"{title}\n\n" + markdown_table(headers, [[r["mixer"], r["params"] or "-",
                                                        r["forward_ms"] if r["forward_ms"] is not None else "-",
                                                        r["fwd_bwd_ms"] if r["fwd_bwd_ms"] is not None else "-",
                                                        r["step_ms"] if r["step_ms"] is not None else "-",
                                                        r["note"]] for r in rows])
    out = Path(args.out)
    _write(out, "speed", table, {"title": title, "rows": rows})
    print(table)
    plotted = _plot_speed(rows, out / "speed.png", title)
    print(f"wrote {out / 'speed.md'}, {out / 'speed.json'}" + (f", {out / 'speed.png'}" if plotted is True
                                                                 else f" ({plotted})"))
    return 0


# ---------------------------------------------------------------- bench tasks


def task_rows(mixers: list[str], pair_counts: list[int], *, d_model: int, seq_len: int, batch_size: int,
              steps: int, lrs: list[float], device: str, out: Path, progress: bool,
              step_hook=None) -> list[dict[str, Any]]:
    """Train one 2-layer model per (mixer, pair count, learning rate) on MQAR and score it on held-out
    rows; each (mixer, pair count) row keeps its best learning rate (Zoology reports the best of a
    sweep too), with every rate's accuracy in ``row["sweep"]``."""
    from seqblocks.registry import MIXERS
    from seqblocks.train import TrainConfig, train

    rows = []
    for pairs in pair_counts:
        T = max(seq_len, 4 * pairs)
        for name in mixers:
            row = {"mixer": name, "num_kv_pairs": pairs, "seq_len": T, "params": None, "acc": None,
                   "seq_acc": None, "lr": None, "train_s": 0.0, "note": "", "sweep": {}}
            if name not in MIXERS:
                row["note"] = "not registered"
                rows.append(row)
                continue
            # Untied embeddings initialised at std 0.3: with the LM's default (tied, std 0.02) even
            # attention sits for thousands of steps on the plateau of guessing among the context's
            # values before it forms the recall circuit; with this init it does so in a few hundred.
            model = {"d_model": d_model, "d_state": 16, "n_layer": 2, "vocab_size": 0,
                     "mixer_types": [name, name], "d_intermediate": 2 * d_model,
                     "mixer_kwargs": {name: _bench_kwargs(name, d_model, T)}, "tie_embeddings": False,
                     "initializer_cfg": {"initializer_range": 0.3}}
            errors = []
            for lr in lrs:
                config = TrainConfig(task="mqar", task_options={"num_kv_pairs": pairs, "seq_len": T,
                                                                "vocab_size": max(64, 4 * pairs + 2)},
                                     steps=steps, batch_size=batch_size, lr=lr, warmup_steps=steps // 10,
                                     eval_every=0, ckpt_every=0, keep_checkpoints=1,
                                     log_every=max(1, steps // 20), sample_tokens=0, device=device,
                                     weight_decay=0.0)
                t0 = time.perf_counter()
                try:
                    # Each bench run is scratch, replaced by the next bench into the same --out.
                    result = train(model, config, out / "runs" / f"{name}-{pairs}-lr{lr:g}", overwrite=True,
                                   progress=progress, log=lambda msg: None, step_hook=step_hook)
                except Exception as err:  # one mixer failing must not lose the others' results
                    errors.append(f"lr {lr:g}: {type(err).__name__}: {str(err).splitlines()[0][:120]}")
                    acc = None
                else:
                    acc = result.metrics["val_acc"]
                    row["sweep"][f"{lr:g}"] = acc
                    if row["acc"] is None or acc > row["acc"]:
                        row.update(acc=acc, seq_acc=result.metrics["val_seq_acc"], lr=lr,
                                   params=sum(p.numel() for p in result.model.parameters()))
                elapsed = time.perf_counter() - t0
                row["train_s"] += elapsed
                print(f"  {name:<10} pairs={pairs:<3} lr={lr:<8g} acc={acc if acc is None else round(acc, 3)} "
                      f"({elapsed:.0f}s) {errors[-1] if acc is None else ''}",
                      file=sys.stderr, flush=True)
            notes = errors + ([", ".join(f"{k}: {v:.3f}" for k, v in row["sweep"].items())]
                              if len(lrs) > 1 and row["sweep"] else [])
            row["note"] = "; ".join(notes)
            rows.append(row)
    return rows


def _plot_tasks(rows: list[dict[str, Any]], path: Path, title: str) -> bool | str:
    from seqblocks.train.plot import MISSING_MATPLOTLIB, pyplot

    plt = pyplot()
    if plt is None:
        return MISSING_MATPLOTLIB
    fig, ax = plt.subplots(figsize=(6, 4), dpi=100)
    pair_counts = sorted({r["num_kv_pairs"] for r in rows})
    mixers = list(dict.fromkeys(r["mixer"] for r in rows))
    # A model that has not learned recall guesses among the context's values: 1 / pairs.
    chance_label = "chance: a guess among the context's values"
    if len(pair_counts) > 1:
        for name in mixers:
            pts = [(r["num_kv_pairs"], r["acc"]) for r in rows if r["mixer"] == name and r["acc"] is not None]
            if pts:
                ax.plot(*zip(*pts), "o-", label=name)
        ax.plot(pair_counts, [1 / p for p in pair_counts], "k--", linewidth=1, label=chance_label)
        ax.set_xlabel("key-value pairs")
    else:
        ok = [r for r in rows if r["acc"] is not None]
        ax.bar([r["mixer"] for r in ok], [r["acc"] for r in ok])
        ax.axhline(1 / pair_counts[0], color="k", linestyle="--", linewidth=1,
                   label=f"{chance_label} (1/{pair_counts[0]})")
        ax.set_xlabel("mixer")
    ax.legend(fontsize=8)
    ax.set_ylim(0, 1.02)
    ax.set_ylabel("MQAR accuracy (held-out)")
    ax.set_title(title, fontsize=9)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return True


def run_task_bench(args: argparse.Namespace) -> int:
    import seqblocks  # noqa: F401
    from seqblocks.registry import MIXERS

    mixers = _mixer_names(args.mixers) if args.mixers else [m for m in TASK_MIXERS if m in MIXERS]
    pairs = [int(p) for p in args.num_kv_pairs.split(",")] if args.num_kv_pairs else [4]
    d, T, B = args.d_model or 64, args.seq_len or 32, args.batch_size or 64
    steps = args.steps or 2000
    lrs = _learning_rates(args.lr)
    out = Path(args.out)
    lr_text = f"lr {lrs[0]:g}" if len(lrs) == 1 else "best lr of " + ", ".join(f"{lr:g}" for lr in lrs)
    title = f"MQAR: 2 layers, d_model {d}, seq_len {T}, {steps} steps of {B} rows, {lr_text}"
    print(title, file=sys.stderr)
    t0 = time.perf_counter()
    threads = getattr(args, "cpu_threads", None)
    if threads is not None:
        print(threads.describe(), file=sys.stderr)
    rows = task_rows(mixers, pairs, d_model=d, seq_len=T, batch_size=B, steps=steps, lrs=lrs, device=args.device,
                     out=out, progress=not args.no_progress, step_hook=threads.update if threads is not None else None)
    headers = ["mixer", "kv pairs", "params", "accuracy", "sequence accuracy", "lr", "train s", "note"]
    table = f"{title}\n\n" + markdown_table(headers, [
        [r["mixer"], r["num_kv_pairs"], r["params"] or "-", r["acc"] if r["acc"] is not None else "-",
         r["seq_acc"] if r["seq_acc"] is not None else "-", f"{r['lr']:g}" if r["lr"] else "-",
         round(r["train_s"], 1) if r["train_s"] else "-", r["note"]] for r in rows])
    _write(out, "tasks", table, {"title": title, "rows": rows, "total_s": time.perf_counter() - t0})
    print(table)
    plotted = _plot_tasks(rows, out / "tasks.png", title)
    print(f"wrote {out / 'tasks.md'}, {out / 'tasks.json'}" + (f", {out / 'tasks.png'}" if plotted is True
                                                                 else f" ({plotted})"))
    return 0


def _mixer_names(text: str) -> list[str]:
    """``--mixers a,b``: registered mixer names; an unknown one is a usage error (exit status 2)."""
    from seqblocks.registry import MIXERS

    names = [n.strip() for n in text.split(",") if n.strip()]
    if not names:
        raise ValueError(f"--mixers {text!r} names no mixer; give comma-separated names from `seqblocks list`")
    for name in names:
        MIXERS.get(name)  # raises ValueError naming the registered mixers
    return names


def _learning_rates(text: str | None) -> list[float]:
    """``--lr``: one rate or a comma-separated sweep (default 1e-2)."""
    if not text:
        return [1e-2]
    try:
        lrs = [float(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise ValueError(f"--lr must be a number or comma-separated numbers, got {text!r}") from None
    if not lrs or any(not lr > 0 for lr in lrs):
        raise ValueError(f"--lr values must be positive, got {text!r}")
    return lrs


# ---------------------------------------------------------------- bench mup


def mup_rows(widths: list[int], lrs: list[float], *, base_width: int, steps: int, seq_len: int, batch_size: int,
             device: torch.device, n_layers: int = 2, n_heads: int = 4, seed: int = 0) -> list[dict[str, Any]]:
    """Held-out loss of a ``n_layers`` attention LM per (parameterisation, width, learning rate) after
    ``steps`` Adam steps on the character task; muP runs use ``mup_base_width=base_width``. A diverged
    run has loss None."""
    import torch.nn.functional as F

    from seqblocks.models.config_lm import LanguageModel, LanguageModelConfig
    from seqblocks.tasks import IGNORE_INDEX, get_task
    from seqblocks.train import make_optimizer

    task = get_task("chars", seq_len=seq_len, max_chars=200_000, eval_examples=64)

    def loss_of(model, batch) -> torch.Tensor:
        logits = model(batch.input_ids.to(device)).logits
        return F.cross_entropy(logits.flatten(0, 1).float(), batch.targets.to(device).flatten(),
                               ignore_index=IGNORE_INDEX)

    rows = []
    for mup in (False, True):
        for width in widths:
            for lr in lrs:
                torch.manual_seed(seed)
                extra = {"mup": True, "mup_base_width": base_width} if mup else {}
                config = LanguageModelConfig.from_pattern(["mha"] * n_layers, vocab_size=task.vocab_size,
                                                          d_model=width, n_heads=n_heads, tie_embeddings=False,
                                                          max_seq_len=seq_len, **extra)
                model = LanguageModel(config, device=device)
                optimizer = make_optimizer(model, lr, weight_decay=0.0)
                t0 = time.perf_counter()
                for step in range(steps):
                    loss = loss_of(model, task.batch("train", step, batch_size, seed=seed))
                    optimizer.zero_grad(set_to_none=True)
                    loss.backward()
                    optimizer.step()
                with torch.no_grad():
                    val = loss_of(model.eval(), task.batch("val", 0, task.eval_examples)).item()
                rows.append({"parameterisation": "muP" if mup else "SP", "width": width, "lr": lr,
                             "loss": val if math.isfinite(val) else None, "train_s": time.perf_counter() - t0})
                print(f"  {rows[-1]['parameterisation']:<3} width={width:<5} lr={lr:<8g} loss={val:.4f}",
                      file=sys.stderr, flush=True)
    return rows


def _best_lrs(rows: list[dict[str, Any]]) -> dict[tuple[str, int], float | None]:
    best: dict[tuple[str, int], tuple[float, float] | None] = {}
    for r in rows:
        key = (r["parameterisation"], r["width"])
        if r["loss"] is not None and (best.get(key) is None or r["loss"] < best[key][1]):
            best[key] = (r["lr"], r["loss"])
        best.setdefault(key, None)
    return {k: v[0] if v is not None else None for k, v in best.items()}


def _plot_mup(rows: list[dict[str, Any]], path: Path, title: str) -> bool | str:
    from seqblocks.train.plot import MISSING_MATPLOTLIB, pyplot

    plt = pyplot()
    if plt is None:
        return MISSING_MATPLOTLIB
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.8), dpi=100, sharey=True)
    best = _best_lrs(rows)
    for ax, name in zip(axes, ("SP", "muP")):
        for width in sorted({r["width"] for r in rows}):
            pts = [(r["lr"], r["loss"]) for r in rows
                   if r["parameterisation"] == name and r["width"] == width and r["loss"] is not None]
            if not pts:
                continue
            line, = ax.plot(*zip(*pts), "o-", label=f"width {width}")
            if best.get((name, width)) is not None:
                ax.axvline(best[(name, width)], color=line.get_color(), linestyle=":", linewidth=1)
        ax.set_xscale("log")
        ax.set_xlabel("learning rate")
        ax.set_title("standard parameterisation" if name == "SP" else "muP", fontsize=9)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    axes[0].set_ylabel("held-out loss (dotted: best lr)")
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return True


def run_mup_bench(args: argparse.Namespace) -> int:
    import seqblocks  # noqa: F401

    device = _device(args.device)
    base = args.d_model or 32
    widths = _widths(args.widths) if args.widths else [base, 4 * base]
    if min(widths) != base:
        raise ValueError(f"--widths {args.widths!r}: the narrowest width must be the base width --d-model={base}")
    T, B, steps = args.seq_len or 32, args.batch_size or 16, args.steps or 80
    lrs = _learning_rates(args.lr) if args.lr else list(MUP_LRS)
    title = (f"muP: 2-layer attention LM on chars, widths {', '.join(map(str, widths))} (base {base}), "
             f"{steps} Adam steps of {B} x {T}")
    print(title, file=sys.stderr)
    threads = getattr(args, "cpu_threads", None)
    if threads is not None:
        print(threads.describe(), file=sys.stderr)
    t0 = time.perf_counter()
    rows = mup_rows(widths, lrs, base_width=base, steps=steps, seq_len=T, batch_size=B, device=device)
    best = _best_lrs(rows)
    table_rows = []
    for (name, width), best_lr in best.items():
        losses = {r["lr"]: r["loss"] for r in rows if r["parameterisation"] == name and r["width"] == width}
        table_rows.append([name, width] + [losses[lr] if losses[lr] is not None else "diverged" for lr in lrs]
                          + [f"{best_lr:g}" if best_lr is not None else "-"])
    headers = ["parameterisation", "width"] + [f"lr {lr:g}" for lr in lrs] + ["best lr"]
    table = f"{title}\n\n" + markdown_table(headers, table_rows)
    transfer = {name: len({best.get((name, w)) for w in widths}) == 1 for name in ("SP", "muP")}
    table += "\n" + "\n".join(f"{name}: the best lr is {'the same' if same else 'not the same'} at every width"
                               for name, same in transfer.items()) + "\n"
    out = Path(args.out)
    _write(out, "mup", table, {"title": title, "rows": rows, "best_lr": {f"{k[0]}/{k[1]}": v for k, v in best.items()},
                               "total_s": time.perf_counter() - t0})
    print(table)
    plotted = _plot_mup(rows, out / "mup.png", title)
    print(f"wrote {out / 'mup.md'}, {out / 'mup.json'}" + (f", {out / 'mup.png'}" if plotted is True
                                                             else f" ({plotted})"))
    return 0


def _widths(text: str) -> list[int]:
    """``--widths a,b``: positive model widths."""
    try:
        widths = sorted({int(x) for x in text.split(",") if x.strip()})
    except ValueError:
        raise ValueError(f"--widths must be comma-separated integers, got {text!r}") from None
    if len(widths) < 2 or widths[0] <= 0:
        raise ValueError(f"--widths needs at least two positive widths, got {text!r}")
    return widths

"""Event form vs regular form on irregularly sampled time series (the ``oscillators`` task).

    python benchmarks/irregular_timeseries.py                       # S5 and Mamba, seeds 0 1 2, CPU
    python benchmarks/irregular_timeseries.py --mixers S5 --seeds 0 1 2 3 4 --steps 300

Each mixer is trained as a two-layer ``Forecaster`` twice per seed on the same data: in its event
form, where the sampling gaps reach the mixer as ``integration_timesteps`` (S5: ``Ā = exp(Λ Δ τ)``;
Mamba: ``Ā = exp(A dt τ)``), and in its regular form, which sees only the values. Both share the
initialisation (the same seed) and the step range ``dt in [0.01, 1]``. Prints the held-out next-sample
MSE of each run, then per mixer the mean, the event / regular ratio and on how many seeds the event
form won; ``--json`` writes the rows. The last-value forecast is the baseline.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

from seqblocks.models.forecaster import Forecaster
from seqblocks.tasks.signals import CoupledOscillators
from seqblocks.train.regression import fit_regression


def run(mixer: str, event: bool, seed: int, args: argparse.Namespace) -> dict:
    torch.manual_seed(seed)
    task = CoupledOscillators(seq_len=args.seq_len, timesteps=event, eval_examples=args.eval_examples)
    model = Forecaster(task.num_features, d_model=args.d_model, n_layer=args.n_layer, mixer_types=mixer,
                       mixer_kwargs={"dt_min": 0.01, "dt_max": 1.0} if mixer.lower() in ("s5", "mamba") else None)
    start = time.perf_counter()
    result = fit_regression(model, task, steps=args.steps, batch_size=args.batch_size, lr=args.lr, seed=seed)
    return {"mixer": mixer, "form": "event" if event else "regular", "seed": seed, "mse": result.after["mse"],
            "persistence_mse": result.after["persistence_mse"], "seconds": time.perf_counter() - start}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--mixers", nargs="+", default=["S5", "Mamba"])
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    p.add_argument("--steps", type=int, default=150)
    p.add_argument("--seq-len", type=int, default=64)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--d-model", type=int, default=32)
    p.add_argument("--n-layer", type=int, default=2)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--eval-examples", type=int, default=64)
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1)")
    p.add_argument("--json", help="write the rows to this file")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    rows = []
    print(f"{'mixer':>6} {'form':>8} {'seed':>4} {'MSE':>8} {'last-value':>10} {'s':>6}")
    for mixer in args.mixers:
        for seed in args.seeds:
            for event in (True, False):
                row = run(mixer, event, seed, args)
                rows.append(row)
                print(f"{mixer:>6} {row['form']:>8} {seed:>4} {row['mse']:8.4f} {row['persistence_mse']:10.4f} "
                      f"{row['seconds']:6.1f}", flush=True)
    print()
    print(f"{'mixer':>6} {'event MSE':>10} {'regular MSE':>12} {'ratio':>6} {'event wins':>10}")
    for mixer in args.mixers:
        ev = {r["seed"]: r["mse"] for r in rows if r["mixer"] == mixer and r["form"] == "event"}
        rg = {r["seed"]: r["mse"] for r in rows if r["mixer"] == mixer and r["form"] == "regular"}
        wins = sum(ev[s] < rg[s] for s in ev)
        e, g = statistics.mean(ev.values()), statistics.mean(rg.values())
        print(f"{mixer:>6} {e:10.4f} {g:12.4f} {e / g:6.3f} {wins:>5}/{len(ev)}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"args": vars(args), "rows": rows}, f, indent=2)


if __name__ == "__main__":
    main()

#!/usr/bin/env bash
# MQAR across mixer types on one GPU: one `seqblocks bench tasks` process per (mixer, setting), all at
# once, so a slow or failing mixer costs no other its result. Usage (repository root):
#   OUT=results bash benchmarks/mqar_gpu.sh [steps (2000)] [time limit s (540)]
# (MIXERS, LR, PYTHON and DEVICE override the mixer list, the learning rate (1e-2), the interpreter and
# the device.)
# Writes $OUT/mqar.md (every row, in one table) and $OUT/mqar.log. Train times are measured while the
# processes share the GPU, so they compare only with each other.
set -u
steps=${1:-2000}
limit=${2:-540}
out=${OUT:-results}
work=$(mktemp -d)
mkdir -p "$out"
export OMP_NUM_THREADS=1 PYTHONPATH=${PYTHONPATH:+$PYTHONPATH:}$PWD
mixers=${MIXERS:-attn mamba rglru s4d lru}
py=${PYTHON:-python3}
device=${DEVICE:-cuda}
lr=${LR:-1e-2}
# setting name: extra arguments of `bench tasks`
declare -A settings=(
  [small]="--d-model 64 --seq-len 32 --num-kv-pairs 4"
  [wide]="--d-model 128 --seq-len 64 --num-kv-pairs 8"
)
for s in "${!settings[@]}"; do
  for m in $mixers; do
    timeout "$limit" "$py" -m seqblocks bench tasks --mixers "$m" --steps "$steps" --lr "$lr" --device "$device" \
      ${settings[$s]} --out "$work/$s-$m" --no-progress >"$work/$s-$m.log" 2>&1 &
  done
done
wait
"$py" - "$work" "$out" <<'PY'
import json, sys
from pathlib import Path
work, out = Path(sys.argv[1]), Path(sys.argv[2])
lines, logs = [], []
for log in sorted(work.glob("*.log")):
    logs.append(f"==== {log.stem}\n{log.read_text()}")
    f = work / log.stem / "tasks.json"
    if not f.exists():
        lines.append(f"| {log.stem} | - | - | - | - | - | did not finish |")
        continue
    d = json.loads(f.read_text())
    for r in d["rows"]:
        acc = "-" if r["acc"] is None else f"{r['acc']:.3f}"
        sacc = "-" if r["seq_acc"] is None else f"{r['seq_acc']:.3f}"
        lines.append(f"| {log.stem.split('-')[0]} | {r['mixer']} | {r['num_kv_pairs']} | {r['seq_len']} | {acc} | "
                     f"{sacc} | {r['train_s']:.0f} s {r['note']} |")
        title = d["title"]
table = ("| setting | mixer | kv pairs | seq len | accuracy | sequence accuracy | train time / note |\n"
         "| --- | --- | --- | --- | --- | --- | --- |\n" + "\n".join(lines))
(out / "mqar.md").write_text(table + "\n")
(out / "mqar.log").write_text("\n".join(logs))
print(table)
PY

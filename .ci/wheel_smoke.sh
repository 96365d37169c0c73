#!/usr/bin/env bash
# The first hour of a user who installs the wheel: build it, install it into a fresh virtual environment
# with nothing but its declared dependencies (after the CPU build of torch, as the README says), train a
# few steps with checkpoints, then sample from the checkpoint. Runs outside the source tree, without
# stdin, so only the installed package can be imported.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
say() { echo "[wheel smoke, ${SECONDS}s] $*"; }

say "fresh virtual environment, CPU torch"
"$PYTHON" -m venv "$work/venv"
py="$work/venv/bin/python"
"$py" -m pip install --quiet torch==2.13.0
say "build the wheel and install it with its declared dependencies"
"$py" -m pip wheel --quiet --no-deps --wheel-dir "$work/dist" .
wheel=$(ls "$work"/dist/seqblocks-*.whl)
"$py" -m pip install --quiet "$wheel"
"$py" -m pip check

"$py" - "$wheel" <<'PY'
import sys, zipfile
names = zipfile.ZipFile(sys.argv[1]).namelist()
for wanted in ("seqblocks/py.typed", "seqblocks/cli/__init__.py"):
    assert wanted in names, f"{wanted} is missing from the wheel"
assert any(n.endswith(".dist-info/licenses/LICENSE") for n in names), "LICENSE is missing from the wheel"
import importlib.util
for extra in ("triton", "matplotlib", "pytest"):  # extras, not dependencies: a plain install lacks them
    assert importlib.util.find_spec(extra) is None, f"{extra} was installed by a plain wheel install"
PY

cd "$work"
say "train a few steps with checkpoints"
seqblocks="$work/venv/bin/seqblocks"
"$seqblocks" train tiny --out run --steps 6 --batch-size 4 --eval-every 3 --ckpt-every 3 --sample-tokens 20 \
    --task-opt seq_len=64 --task-opt max_chars=200000 --task-opt eval_examples=8 --no-progress </dev/null
for step in 0000003 0000006; do
    test -f "run/checkpoints/step_$step/model.safetensors"
    test -f "run/checkpoints/step_$step/README.md"
done
grep -q "step_0000006" run/checkpoints/latest
say "sample and evaluate from the checkpoint"
"$seqblocks" generate run --prompt "def " -n 40 --seed 1 </dev/null
"$seqblocks" eval run --json </dev/null
say "passed: $(basename "$wheel")"

"""Run files: TOML / YAML sections onto the configs, errors that name the dotted field, command-line
overrides, and the metrics sinks they switch on (TensorBoard, offline W&B)."""

from __future__ import annotations

import json
import sys
import types

import pytest

from seqblocks.cli import main
from seqblocks.train import TrainConfig
from seqblocks.train.config_file import load_run_file, parse_overrides, resolve_run

RUN = """
[model]
preset = "tiny"
d_model = 64

[data]
path = "my_data"
seq_len = 64
val_fraction = 0.05
pack_boundaries = false

[tokenizer]
name = "char"

[optim]
lr = 1e-3
weight_decay = 0.05

[schedule]
steps = 50
warmup_steps = 5

[train]
batch_size = 8
seed = 3

[parallel]
strategy = "fsdp"

[log]
every = 5
tensorboard = true
"""

# A tiny model on an embedded task: the CLI runs below take seconds.
TINY_RUN = """
[model]
d_model = 32
d_state = 4
n_layer = 2
mixer_types = ["mamba", "attn"]
d_intermediate = 32
mixer_kwargs = {attn = {num_heads = 2}, mamba = {expand = 1}}

[data]
task = "mqar"
options = {vocab_size = 24, num_kv_pairs = 2, seq_len = 12, eval_examples = 8}

[schedule]
steps = 3
warmup_steps = 1

[train]
batch_size = 4
device = "cpu"

[eval]
every = 0
batch_size = 8

[log]
every = 1

[sample]
tokens = 0
"""


def _write(tmp_path, text, name="run.toml"):
    path = tmp_path / name
    path.write_text(text)
    return path


def test_a_toml_run_maps_onto_the_model_and_train_config(tmp_path):
    spec = load_run_file(_write(tmp_path, RUN))
    assert spec.model["d_model"] == 64 and spec.model["mixer_types"] == ["rglru", "attn", "rglru", "attn"]
    config = TrainConfig.from_dict({**TrainConfig().to_dict(), **spec.train})
    assert (config.lr, config.weight_decay, config.steps, config.warmup_steps) == (1e-3, 0.05, 50, 5)
    assert (config.batch_size, config.seed, config.parallel, config.log_every) == (8, 3, "fsdp", 5)
    assert config.tensorboard and not config.pack_boundaries
    assert config.task == "shards" and config.task_options == {"seq_len": 64}
    assert spec.data == {"path": "my_data", "val_fraction": 0.05} and spec.tokenizer == "char"


def test_yaml_reads_the_same(tmp_path):
    pytest.importorskip("yaml")
    yaml_text = ("model: {preset: tiny, d_model: 64}\noptim: {lr: 0.001}\nschedule: {steps: 50}\n"
                 "data: {path: my_data, seq_len: 64}\n")
    spec = load_run_file(_write(tmp_path, yaml_text, "run.yaml"))
    toml = load_run_file(_write(tmp_path, '[model]\npreset = "tiny"\nd_model = 64\n[optim]\nlr = 0.001\n'
                                          '[schedule]\nsteps = 50\n[data]\npath = "my_data"\nseq_len = 64\n'))
    assert (spec.model, spec.train, spec.data) == (toml.model, toml.train, toml.data)


@pytest.mark.parametrize("text, message", [
    ('[optim]\nlr = "fast"', r"optim.lr = 'fast' must be a number \(TrainConfig.lr\)"),
    ("[optim]\nlrr = 0.1", r"unknown key optim.lrr; valid keys in \[optim\]: \['beta1', 'beta2', 'grad_clip', "
                           r"'lr', 'weight_decay'\]"),
    ("[optimizer]\nlr = 0.1", r"unknown section \[optimizer\]"),
    ("[schedule]\nsteps = 0", r"schedule.steps \(TrainConfig.steps\)=0 must be a positive integer"),
    ("[schedule]\nsteps = 2.5", r"schedule.steps = 2.5 must be an integer"),
    ("[log]\ntensorboard = 1", r"log.tensorboard = 1 must be true or false"),
    ("[data]\nseq_len = \"long\"", r"data.seq_len = 'long' must be an integer"),
    ("[data]\nshuffle = true", r"unknown key data.shuffle; valid keys in \[data\]"),
    ("[tokenizer]\nvocab = 10", r"unknown key tokenizer.vocab"),
    ("[model]\nd_modle = 64", r"run file .*\[model\].*d_modle"),
    ("[model]\npreset = \"huge-thing\"", r"huge-thing"),
    ("[optim\nlr = 1", r"is not valid TOML"),
    ('[data]\ntask = "mqar"\npath = "x"', r"data.path .* or data.task .*, not both"),
])
def test_run_file_errors_name_the_field(tmp_path, text, message):
    with pytest.raises(ValueError, match=message):
        load_run_file(_write(tmp_path, text))


def test_overrides_parse_like_toml_and_win_over_the_file(tmp_path):
    pairs = ["--optim.lr", "3e-4", "--log.tensorboard=true", "--sample.prompt", "Once", "--model.mixer_types",
             '["attn", "attn"]', "--model.n_layer", "2"]
    overrides = parse_overrides(pairs)
    assert overrides == {"optim.lr": 3e-4, "log.tensorboard": True, "sample.prompt": "Once",
                         "model.mixer_types": ["attn", "attn"], "model.n_layer": 2}
    spec = load_run_file(_write(tmp_path, RUN), overrides)
    assert spec.train["lr"] == 3e-4 and spec.train["sample_prompt"] == "Once" and spec.model["n_layer"] == 2
    with pytest.raises(ValueError, match=r"optim.lr = 'x' must be a number"):
        resolve_run({}, parse_overrides(["--optim.lr", "x"]), "command line")
    with pytest.raises(ValueError, match="--optimizer.lr: unknown section"):
        resolve_run({}, {"optimizer.lr": 1.0})
    with pytest.raises(ValueError, match="needs a value"):
        parse_overrides(["--optim.lr"])


def test_cli_trains_from_a_run_file_with_overrides_and_writes_tensorboard(tmp_path, capsys):
    event_accumulator = pytest.importorskip("tensorboard.backend.event_processing.event_accumulator")
    run = _write(tmp_path, TINY_RUN)
    out = tmp_path / "out"
    assert main(["train", "--config", str(run), "--optim.lr", "2e-2", "--log.tensorboard", "true", "--out", str(out),
                 "--no-progress", "--steps", "4"]) == 0
    saved = json.loads((out / "run.json").read_text())["train"]
    assert saved["lr"] == 2e-2 and saved["steps"] == 4 and saved["task"] == "mqar" and saved["tensorboard"]
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    train_rows = [r for r in rows if r["type"] == "train"]
    assert len(train_rows) == 4 and all(r["memory_gib"] > 0 and r["tokens"] > 0 for r in train_rows)
    assert "mfu" not in train_rows[0]  # a CPU has no known peak
    events = event_accumulator.EventAccumulator(str(out / "tensorboard"))
    events.Reload()
    assert [e.step for e in events.Scalars("train/loss")] == [1, 2, 3, 4]
    assert [e.value for e in events.Scalars("train/loss")] == pytest.approx([r["loss"] for r in train_rows])
    assert events.Scalars("eval/loss")[0].step == 4
    # A bad override is one line naming the field, before anything trains.
    assert main(["train", "--config", str(run), "--optim.lr", "fast", "--out", str(tmp_path / "o2")]) == 2
    assert "optim.lr = 'fast' must be a number" in capsys.readouterr().err


def test_mfu_with_a_given_peak_and_offline_wandb(tmp_path, monkeypatch):
    calls = []

    class FakeRun:
        def log(self, data, step):
            calls.append(("log", step, data))

        def finish(self):
            calls.append(("finish",))

    fake = types.ModuleType("wandb")
    fake.init = lambda **kw: calls.append(("init", kw)) or FakeRun()
    monkeypatch.setitem(sys.modules, "wandb", fake)
    run = _write(tmp_path, TINY_RUN.replace("[log]\n", "[log]\npeak_flops = 1e12\nwandb = true\n"))
    out = tmp_path / "out"
    assert main(["train", "--config", str(run), "--out", str(out), "--no-progress"]) == 0
    init = calls[0][1]
    assert init["mode"] == "offline" and init["dir"] == str(out / "wandb") and init["config"]["train"]["wandb"]
    logged = [c for c in calls if c[0] == "log"]
    assert [c[1] for c in logged if "train/loss" in c[2]] == [1, 2, 3] and calls[-1] == ("finish",)
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    train_row = next(r for r in rows if r["type"] == "train")
    n_active = train_row["mfu"] * 1e12 / (6 * train_row["tokens_per_s"])
    assert 1_000 < n_active < 100_000  # 6 * N * tokens/s / peak with the model's non-embedding parameters

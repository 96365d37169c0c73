"""The ``seqblocks`` command line end to end on tiny configurations."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys

import pytest
import torch

from seqblocks.cli import main
from seqblocks.presets import PRESETS, build_model, load_config

TINY_MODEL = {"d_model": 32, "d_state": 4, "n_layer": 2, "vocab_size": 98, "mixer_types": ["mamba", "attn"],
              "d_intermediate": 32, "mixer_kwargs": {"attn": {"num_heads": 2}, "mamba": {"expand": 1}}}
TINY_TRAIN = {"task": "chars", "task_options": {"seq_len": 24, "max_chars": 60_000, "eval_examples": 8},
              "steps": 3, "batch_size": 4, "lr": 3e-3, "warmup_steps": 1, "eval_every": 0, "ckpt_every": 2,
              "log_every": 1, "sample_tokens": 12, "device": "cpu"}


@pytest.fixture
def config_file(tmp_path):
    path = tmp_path / "tiny.json"
    path.write_text(json.dumps({"description": "test model", "model": TINY_MODEL, "train": TINY_TRAIN}))
    return path


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory):
    """One tiny character run shared by the generate / eval / resume tests."""
    tmp = tmp_path_factory.mktemp("run")
    path = tmp / "tiny.json"
    path.write_text(json.dumps({"model": TINY_MODEL, "train": TINY_TRAIN}))
    out = tmp / "out"
    assert main(["train", str(path), "--out", str(out), "--no-progress"]) == 0
    return out


def test_list_shows_every_registry_presets_and_tasks(capsys):
    assert main(["list"]) == 0
    text = capsys.readouterr().out
    for word in ("mixers:", "mamba", "attn", "ffns:", "norms:", "positions:", "presets:", "tiny", "tasks:", "mqar",
                 "chars"):
        assert word in text
    assert main(["list", "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert set(data) == {"mixers", "ffns", "norms", "positions", "presets", "tasks"}
    assert set(data["presets"]) == set(PRESETS) and data["mixers"]["mamba"]


def test_module_entry_point_runs():
    proc = subprocess.run([sys.executable, "-m", "seqblocks", "list", "--json"], capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0 and "presets" in json.loads(proc.stdout)


def test_info_reports_parameters_layers_and_memory(capsys, config_file):
    assert main(["info"]) == 0
    text = capsys.readouterr().out
    model = build_model(PRESETS["tiny"]["model"])
    assert f"{sum(p.numel() for p in model.parameters()):,}" in text
    assert "layers:" in text and "RGLRU" in text and "MHA" in text and "decode cache" in text
    assert main(["info", str(config_file), "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["parameters"] == sum(p.numel() for p in build_model(TINY_MODEL).parameters())
    assert [row["mixer"] for row in data["layers"]] == ["mamba", "attn"]
    assert data["memory"]["train_state_fp32_adamw"] == 16 * data["parameters"]
    assert main(["info", "mamba-130m", "--json"]) == 0  # built on the meta device: instant
    assert 120e6 < json.loads(capsys.readouterr().out)["parameters"] < 140e6


def test_presets_are_json_configs_that_build():
    import seqblocks  # noqa: F401
    from seqblocks.registry import MIXERS

    for name, preset in PRESETS.items():
        assert json.loads(json.dumps(preset)) == preset
        config = load_config(name)
        # an image-classifier preset (model_type VisionTransformer) names no mixer_types
        if all(m in MIXERS for m in config["model"].get("mixer_types", [])) and config["model"]["d_model"] <= 128:
            build_model(config["model"])


def test_unknown_preset_and_bad_config_files_give_clear_errors(tmp_path, capsys):
    assert main(["info", "nope"]) == 2
    err = capsys.readouterr().err
    assert "unknown preset 'nope'" in err and "tiny" in err and "mamba-130m" in err
    bad_json = tmp_path / "bad.json"
    bad_json.write_text("{not json")
    assert main(["train", str(bad_json)]) == 2
    assert "not valid JSON" in capsys.readouterr().err
    bad_field = tmp_path / "field.json"
    bad_field.write_text(json.dumps({**TINY_MODEL, "d_modle": 3}))
    assert main(["info", str(bad_field)]) == 2
    err = capsys.readouterr().err
    assert "unknown fields ['d_modle']" in err and "valid fields" in err and "mixer_types" in err
    bad_train = tmp_path / "train.json"
    bad_train.write_text(json.dumps({"model": TINY_MODEL, "train": {"stepz": 3}}))
    assert main(["train", str(bad_train)]) == 2
    assert "unknown training options ['stepz']" in capsys.readouterr().err
    assert main(["info", str(tmp_path / "missing.json")]) == 2
    assert "does not exist" in capsys.readouterr().err
    bad_mixer = tmp_path / "mixer.json"
    bad_mixer.write_text(json.dumps({**TINY_MODEL, "mixer_types": ["mamba", "transformerz"]}))
    assert main(["info", str(bad_mixer)]) == 2
    assert "unknown mixer 'transformerz'" in capsys.readouterr().err
    assert main(["train", "--task", "nope", "--out", str(tmp_path / "x")]) == 2
    assert "registered task names" in capsys.readouterr().err


def _the_error_line(err: str, command: str) -> str:
    """The single error line a misuse ends with: after any progress lines, never a traceback."""
    lines = [line for line in err.splitlines() if line.strip()]
    errors = [line for line in lines if ": error:" in line]
    assert "Traceback" not in err and len(errors) == 1 and lines[-1] == errors[0], err
    assert errors[0].startswith(f"seqblocks {command}: error: ")
    return errors[0]


MISUSE = {
    "unknown device": (["train", "--device", "tpu"], "device 'tpu' is not a device name; expected auto, cpu"),
    "malformed device": (["train", "--device", "cuda:x"], "device 'cuda:x' is not a device name"),
    "task option type": (["train", "--task-opt", "seq_len=abc"], "option seq_len='abc' must be an integer"),
    "diverged loss": (["train", "CONFIG", "--lr", "1e6"], "the loss is nan; lower the learning rate"),
    "unknown bench mixer": (["bench", "--mixers", "attn,nope"], "unknown mixer 'nope'; registered mixer names"),
    "unknown task-bench mixer": (["bench", "tasks", "--mixers", "nope"], "unknown mixer 'nope'"),
    "eval device": (["eval", "RUN", "--device", "tpu"], "device 'tpu' is not a device name"),
    "negative temperature": (["generate", "RUN", "--temperature", "-1"], "temperature=-1.0 must be >= 0"),
    "top-p": (["generate", "RUN", "--top-p", "0"], "top_p=0.0 must lie in (0, 1]"),
    "no new tokens": (["generate", "RUN", "-n", "0"], "must be a positive integer"),
    "empty stop": (["generate", "RUN", "--stop", ""], "--stop '' is empty"),
    "stop outside the alphabet": (["generate", "RUN", "--stop", "\u00e9"], "the tokenizer has no"),
    "threads": (["generate", "RUN", "--threads", "0"], "--threads 0 must be a positive integer"),
}


@pytest.mark.parametrize("case", sorted(MISUSE))
def test_misuse_ends_with_one_line_and_status_2(case, trained_run, config_file, tmp_path, capsys):
    argv, message = MISUSE[case]
    argv = [str(trained_run) if a == "RUN" else str(config_file) if a == "CONFIG" else a for a in argv]
    if argv[0] in ("train", "bench"):
        argv += ["--out", str(tmp_path / "out"), "--no-progress"]
    assert main(argv) == 2
    captured = capsys.readouterr()
    assert message in _the_error_line(captured.err, argv[0])
    if argv[0] == "generate":
        assert captured.out == ""  # checked before anything is streamed


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message of a machine without CUDA")
def test_cuda_without_cuda_is_one_line(trained_run, capsys):
    assert main(["generate", str(trained_run), "--device", "cuda"]) == 2
    assert "torch.cuda.is_available() is False" in _the_error_line(capsys.readouterr().err, "generate")


def test_debug_variable_shows_the_traceback(tmp_path):
    argv = [sys.executable, "-m", "seqblocks", "train", "--device", "tpu", "--out", str(tmp_path)]
    plain = subprocess.run(argv, capture_output=True, text=True, timeout=120, stdin=subprocess.DEVNULL)
    assert plain.returncode == 2 and plain.stdout == ""
    assert "is not a device name" in _the_error_line(plain.stderr, "train")
    env = {**os.environ, "SEQBLOCKS_DEBUG": "1"}
    debug = subprocess.run(argv, capture_output=True, text=True, timeout=120, env=env, stdin=subprocess.DEVNULL)
    assert debug.returncode == 1 and "Traceback" in debug.stderr and "ValueError" in debug.stderr


def test_generate_draws_a_fresh_seed_and_prints_it(trained_run, capsys):
    seeds, texts = [], []
    for _ in range(2):
        assert main(["generate", str(trained_run), "-n", "40", "--temperature", "1.0"]) == 0
        captured = capsys.readouterr()
        match = re.search(r"seed (\d+); --seed \1 repeats this", captured.err)
        assert match, captured.err
        seeds.append(int(match.group(1)))
        texts.append(captured.out)
    assert seeds[0] != seeds[1]  # two draws from 2**31 seeds
    assert main(["generate", str(trained_run), "-n", "40", "--temperature", "1.0", "--seed", str(seeds[0])]) == 0
    again = capsys.readouterr()
    assert again.out == texts[0] and f"seed {seeds[0]}]" in again.err and "repeats this" not in again.err


def test_generate_stops_on_the_whole_stop_string(trained_run, capsys):
    assert main(["generate", str(trained_run), "-n", "120", "--temperature", "1.0", "--seed", "7",
                 "--prompt", "x"]) == 0
    free = capsys.readouterr().out.rstrip("\n")[1:]  # the generated text, without the prompt
    # Two characters whose first occurs earlier without the second after it.
    stop = next(free[j : j + 2] for j in range(1, len(free) - 1)
                if free[j] in free[:j] and free.find(free[j : j + 2]) == j and "\n" not in free[j : j + 2])
    assert main(["generate", str(trained_run), "-n", "120", "--temperature", "1.0", "--seed", "7", "--prompt", "x",
                 "--stop", stop]) == 0
    stopped = capsys.readouterr().out.rstrip("\n")[1:]
    assert stopped == free[: free.find(stop) + 2] and stopped.endswith(stop)


def test_an_error_while_streaming_starts_on_its_own_line(trained_run, capsys, monkeypatch):
    import seqblocks.generation

    def failing(model, input_ids, max_new_tokens, *, callback, **kwargs):
        for token in (5, 6, 7):
            callback(torch.tensor([token]), torch.tensor([True]))
        raise ValueError("the model broke")

    monkeypatch.setattr(seqblocks.generation, "generate", failing)
    assert main(["generate", str(trained_run), "--prompt", "ab", "--seed", "0"]) == 2
    captured = capsys.readouterr()
    assert captured.out.startswith("ab") and captured.out.endswith("\n") and captured.out.count("\n") == 1
    assert _the_error_line(captured.err, "generate") == "seqblocks generate: error: the model broke"


def test_train_prints_a_sample_and_writes_the_run(trained_run, capsys):
    assert {"metrics.jsonl", "loss.png", "run.json", "checkpoints"} <= {p.name for p in trained_run.iterdir()}
    names = sorted(p.name for p in (trained_run / "checkpoints").glob("step_*"))
    assert names == ["step_0000002", "step_0000003"]
    assert (trained_run / "checkpoints" / "step_0000003" / "tokenizer.json").is_file()


def test_checkpoints_carry_a_model_card_of_the_training(trained_run):
    final = (trained_run / "checkpoints" / "step_0000003" / "README.md").read_text()
    assert "More Information Needed" not in final and "# LRNNLMHeadModel" in final
    assert "| layers | 2: mamba, attn |" in final
    assert "Trained with `seqblocks train` for 3 of 3 steps on the task `chars`: character-level LM" in final
    assert "`seq_len=24`" in final and "4 sequences of 24 tokens per step; 288 tokens in all" in final
    assert "peak learning rate 0.003" in final and "seed 0; precision fp32" in final
    rows = [json.loads(line) for line in (trained_run / "metrics.jsonl").read_text().splitlines()]
    final_eval = [r for r in rows if r["type"] == "eval"][-1]
    assert f"Held-out split at this step: loss {final_eval['loss']:.4f}" in final
    assert 'seqblocks generate path/to/this/directory --prompt "def "' in final
    earlier = (trained_run / "checkpoints" / "step_0000002" / "README.md").read_text()
    assert "for 2 of 3 steps" in earlier and "Held-out" not in earlier  # no evaluation at step 2


def test_train_output_includes_sample(tmp_path, config_file, capsys):
    out = tmp_path / "run"
    assert main(["train", str(config_file), "--out", str(out), "--no-progress", "--steps", "2",
                 "--task-opt", "seq_len=16", "--sample-prompt", "class "]) == 0
    text = capsys.readouterr().out
    assert "final: train loss" in text and "--- sample" in text and "\nclass " in text
    assert f"seqblocks generate {out}" in text
    run = json.loads((out / "run.json").read_text())
    assert run["train"]["steps"] == 2 and run["task"]["seq_len"] == 16  # flags override the file


def test_generate_streams_from_a_run_directory(trained_run, capsys):
    assert main(["generate", str(trained_run), "--prompt", "import ", "-n", "10", "--seed", "1"]) == 0
    first = capsys.readouterr().out
    assert first.startswith("import ") and len(first.rstrip("\n")) >= len("import ")
    assert main(["generate", str(trained_run), "--prompt", "import ", "-n", "10", "--seed", "1", "--top-k", "5",
                 "--top-p", "0.9", "--min-p", "0.01", "--repetition-penalty", "1.1", "--stop", "\n"]) == 0
    assert capsys.readouterr().out.startswith("import ")
    assert main(["generate", str(trained_run), "--greedy", "-n", "8", "--no-stream", "--num-samples", "2"]) == 0
    text = capsys.readouterr().out
    assert text.count("--- sample") == 2
    assert main(["generate", str(trained_run / "missing")]) == 2
    assert "does not exist" in capsys.readouterr().err


def test_eval_reports_loss_perplexity_accuracy(trained_run, capsys):
    assert main(["eval", str(trained_run), "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["task"] == "chars" and result["tokens"] > 0 and 0 <= result["acc"] <= 1
    rows = [json.loads(line) for line in (trained_run / "metrics.jsonl").read_text().splitlines()]
    final_eval = [r for r in rows if r["type"] == "eval"][-1]
    assert result["loss"] == pytest.approx(final_eval["loss"], rel=1e-5)
    assert main(["eval", str(trained_run / "checkpoints" / "step_0000002")]) == 0
    assert "perplexity" in capsys.readouterr().out


def test_resume_from_the_command_line(tmp_path, config_file, capsys):
    out = tmp_path / "run"
    assert main(["train", str(config_file), "--out", str(out), "--no-progress", "--stop-after", "2"]) == 0
    assert "--- sample" not in capsys.readouterr().out  # the schedule is not finished
    assert main(["train", "--out", str(out), "--resume", "--no-progress"]) == 0
    assert "--- sample" in capsys.readouterr().out
    steps = [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [s for s in steps] == [1, 2, 3, 3]  # train 1..3, then the final eval


def test_bench_speed_writes_table_json_and_plot(tmp_path, capsys):
    out = tmp_path / "bench"
    assert main(["bench", "--mixers", "mamba,attn,rglru", "--d-model", "32", "--seq-len", "16", "--batch-size", "2",
                 "--repeats", "1", "--out", str(out)]) == 0
    table = (out / "speed.md").read_text()
    assert "| mamba |" in table and "| attn |" in table and "decode step ms" in table
    rows = json.loads((out / "speed.json").read_text())["rows"]
    assert all(r["forward_ms"] > 0 and r["fwd_bwd_ms"] > 0 and r["step_ms"] > 0 for r in rows)
    assert (out / "speed.png").stat().st_size > 1000
    assert main(["bench", "--mixers", "nope", "--d-model", "32", "--seq-len", "8", "--batch-size", "1",
                 "--repeats", "1", "--out", str(out)]) == 2
    assert "unknown mixer 'nope'" in capsys.readouterr().err


def test_bench_tasks_writes_table_and_plot(tmp_path, capsys):
    out = tmp_path / "bench"
    assert main(["bench", "tasks", "--mixers", "attn,rglru", "--steps", "2", "--d-model", "16", "--seq-len", "16",
                 "--batch-size", "4", "--num-kv-pairs", "2,4", "--out", str(out), "--no-progress"]) == 0
    table = (out / "tasks.md").read_text()
    assert "| attn | 2 |" in table and "| rglru | 4 |" in table
    rows = json.loads((out / "tasks.json").read_text())["rows"]
    assert len(rows) == 4 and all(0 <= r["acc"] <= 1 for r in rows)
    assert (out / "tasks.png").stat().st_size > 1000


@pytest.mark.parametrize("pairs", ["4", "2,4"])
def test_bench_tasks_plot_shows_the_chance_line(tmp_path, monkeypatch, pairs):
    """Guessing among the context's values scores 1 / pairs: the plot draws that line."""
    from matplotlib.axes import Axes

    drawn = []
    real_plot, real_axhline = Axes.plot, Axes.axhline
    monkeypatch.setattr(Axes, "plot", lambda self, *a, **kw: drawn.append((a, kw)) or real_plot(self, *a, **kw))
    monkeypatch.setattr(Axes, "axhline", lambda self, y=0, *a, **kw: drawn.append(((y,), kw))
                        or real_axhline(self, y, *a, **kw))
    assert main(["bench", "tasks", "--mixers", "attn", "--steps", "1", "--d-model", "16", "--seq-len", "16",
                 "--batch-size", "4", "--num-kv-pairs", pairs, "--out", str(tmp_path), "--no-progress"]) == 0
    chance = [args for args, kw in drawn if kw.get("label", "").startswith("chance")]
    counts = [int(p) for p in pairs.split(",")]
    assert len(chance) == 1
    if len(counts) == 1:
        assert chance[0] == (0.25,)
    else:
        assert list(chance[0][0]) == counts and list(chance[0][1]) == [1 / p for p in counts]


def test_bench_tasks_sweeps_learning_rates_and_keeps_the_best(tmp_path):
    out = tmp_path / "bench"
    assert main(["bench", "tasks", "--mixers", "attn", "--steps", "2", "--d-model", "16", "--seq-len", "16",
                 "--batch-size", "4", "--lr", "1e-3,3e-2", "--out", str(out), "--no-progress"]) == 0
    (row,) = json.loads((out / "tasks.json").read_text())["rows"]
    assert set(row["sweep"]) == {"0.001", "0.03"}
    assert row["acc"] == max(row["sweep"].values()) and row["sweep"][f"{row['lr']:g}"] == row["acc"]
    assert "best lr of 0.001, 0.03" in (out / "tasks.md").read_text()


@pytest.mark.parametrize("bad", ["fast", "0", "-1e-3", "1e-3,x"])
def test_bench_tasks_rejects_bad_learning_rates(tmp_path, capsys, bad):
    assert main(["bench", "tasks", "--mixers", "attn", "--steps", "1", f"--lr={bad}", "--out", str(tmp_path)]) != 0
    assert "--lr" in capsys.readouterr().err

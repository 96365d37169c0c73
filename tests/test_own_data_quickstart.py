"""The README's "train on your own text" quickstart runs as written, on a generated folder of stories."""

from __future__ import annotations

import json
import pathlib
import random
import re
import shlex
import time

import pytest

from seqblocks.cli import main
from seqblocks.tokenizers import train_bpe

README = pathlib.Path(__file__).resolve().parents[1] / "README.md"
NAMES = ["Ada", "Bo", "Cleo", "Dev", "Emi", "Finn"]
PLACES = ["the forest", "a small town", "the sea", "the old mill", "the hills"]
THINGS = ["a red kite", "a lost key", "an old map", "a song", "a lantern"]


def _story(seed: int) -> str:
    rng = random.Random(seed)
    name, place, thing = rng.choice(NAMES), rng.choice(PLACES), rng.choice(THINGS)
    lines = [f"Once upon a time, {name} lived near {place}."]
    for _ in range(rng.randint(6, 12)):
        lines.append(rng.choice([
            f"The wind was cold, and {name} walked to {rng.choice(PLACES)}.",
            f"There {name} found {rng.choice(THINGS)} and smiled.",
            f"{name} asked a friend about {thing}.",
            f"The friend said: \"Keep {thing} safe, and you will see.\"",
            f"The day was long, and the night was quiet near {place}.",
        ]))
    lines.append(f"In the end, {name} went home with {thing}. The end.")
    return "\n".join(lines) + "\n"


def _commands() -> list[list[str]]:
    section = README.read_text().split("## Quickstart: train on your own text", 1)[1].split("\n## ", 1)[0]
    block = re.search(r"```bash\n(.*?)```", section, flags=re.S).group(1)
    commands = [shlex.split(line, comments=True) for line in block.strip().splitlines()]
    assert len(commands) == 3 and all(c[0] == "seqblocks" for c in commands)
    return [c[1:] for c in commands]


@pytest.fixture
def my_texts(tmp_path, monkeypatch):
    folder = tmp_path / "my_texts"
    folder.mkdir()
    for i in range(60):
        (folder / f"story_{i:02d}.txt").write_text(_story(i))
    monkeypatch.chdir(tmp_path)
    return tmp_path


def _run(commands: list[list[str]], extra_train: list[str], capsys) -> str:
    tokenize, prepare, train = commands
    assert main(tokenize) == 0
    assert main(prepare) == 0
    assert main(train + extra_train) == 0
    return capsys.readouterr().out


def _check_run(root: pathlib.Path, out: str, capsys) -> None:
    assert "--- sample" in out and "The " in out.split("--- sample", 1)[1]
    ckpt = root / "runs" / "my_text"
    assert json.loads((root / "my_tokenizer.json").read_text())["type"] == "hf"
    saved = json.loads((sorted((ckpt / "checkpoints").glob("step_*"))[-1] / "tokenizer.json").read_text())
    assert saved == json.loads((root / "my_data" / "tokenizer.json").read_text())
    # generate and eval find the tokenizer in the checkpoint: nothing to give again.
    assert main(["generate", "runs/my_text", "--prompt", "Once", "-n", "12", "--seed", "0", "--no-stream"]) == 0
    assert capsys.readouterr().out.startswith("Once")
    assert main(["eval", "runs/my_text", "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["task"] == "shards" and result["tokens"] > 0


def test_own_data_quickstart_commands_run(my_texts, capsys):
    """The three commands as the README gives them, the training shortened to keep the suite fast."""
    out = _run(_commands(), ["--steps", "8", "--eval-every", "0", "--sample-tokens", "24", "--no-progress"], capsys)
    _check_run(my_texts, out, capsys)


@pytest.mark.slow
def test_own_data_quickstart_runs_as_written_in_under_two_minutes(my_texts, capsys):
    start = time.perf_counter()
    out = _run(_commands(), [], capsys)
    elapsed = time.perf_counter() - start
    _check_run(my_texts, out, capsys)
    assert elapsed < 120, f"the own-data quickstart took {elapsed:.0f} s"
    assert "val loss" in out


def test_train_prepares_raw_text_given_to_data(my_texts, capsys):
    """`--data` with text (not shards) prepares it into RUN/data with `--tokenizer`, then trains."""
    run = my_texts / "run.toml"
    run.write_text('[model]\nd_model = 32\nd_state = 4\nn_layer = 2\nmixer_types = ["mamba", "attn"]\n'
                   'd_intermediate = 32\nmixer_kwargs = {attn = {num_heads = 2}, mamba = {expand = 1}}\n'
                   '[data]\nseq_len = 16\neval_examples = 4\nval_fraction = 0.2\n'
                   '[schedule]\nsteps = 2\nwarmup_steps = 1\n[train]\nbatch_size = 2\ndevice = "cpu"\n'
                   '[sample]\ntokens = 0\n')
    assert main(["train", "--config", str(run), "--data", "my_texts/*.txt", "--tokenizer", "char", "-o", "raw",
                 "--no-progress"]) == 0
    manifest = json.loads((my_texts / "raw" / "data" / "manifest.json").read_text())
    assert manifest["val_fraction"] == 0.2 and manifest["splits"]["val"]["documents"] > 0
    task = json.loads((sorted((my_texts / "raw" / "checkpoints").glob("step_*"))[-1] / "task.json").read_text())
    assert task["name"] == "shards" and task["options"]["path"] == str((my_texts / "raw" / "data").resolve())
    # Prepared shards with another tokenizer than the one named: refused before training.
    train_bpe([_story(i) for i in range(5)], vocab_size=300).save(my_texts / "other.json")
    capsys.readouterr()
    assert main(["train", "--config", str(run), "--data", "raw/data", "--tokenizer", "other.json", "-o", "x"]) == 2
    assert "raw/data was prepared with another tokenizer than 'other.json'" in capsys.readouterr().err

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
    out = _run(_commands(), ["--steps", "8", "--eval-every", "0", "--no-progress"], capsys)
    _check_run(my_texts, out, capsys)


@pytest.mark.slow
def test_own_data_quickstart_runs_as_written_in_under_two_minutes(my_texts, capsys):
    start = time.perf_counter()
    out = _run(_commands(), [], capsys)
    elapsed = time.perf_counter() - start
    _check_run(my_texts, out, capsys)
    assert elapsed < 120, f"the own-data quickstart took {elapsed:.0f} s"
    assert "val loss" in out

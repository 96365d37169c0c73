"""The trainer on every model kind: packed causal-LM rows (resume bit-exact), the encoder-decoder on a
seq2seq task, the classifier on a CSV / JSONL file; activation checkpointing; bits per byte."""

from __future__ import annotations

import json
import math

import pytest
import torch

import seqblocks  # noqa: F401  (registers the mixers)
from seqblocks.checkpoint import WEIGHTS_NAME, load_weights
from seqblocks.tasks import IGNORE_INDEX, get_task
from seqblocks.tasks.seq2seq import BOS_ID, EOS_ID, PAD_ID
from seqblocks.train import TrainConfig, latest_checkpoint, train
from seqblocks.train.models import activation_checkpointing, build_train_model, forward_logits, model_kind
from seqblocks.train.trainer import _loss_sum, evaluate

TINY = {"d_model": 32, "d_state": 4, "n_layer": 2, "vocab_size": 0, "mixer_types": ["mamba", "attn"],
        "d_intermediate": 32, "mixer_kwargs": {"attn": {"num_heads": 2}, "mamba": {"expand": 1}}}
ENC_DEC = {"model": "encoder_decoder", "d_model": 32, "num_heads": 2, "d_ff": 64, "num_encoder_layers": 2,
           "num_decoder_layers": 2, "max_seq_len": 32}
CLASSIFIER = {"model": "classifier", "d_model": 32, "d_state": 8, "n_layers": 2, "lrnn_cls": "s4d",
              "pooling": "mean", "dropout": 0.1}


def _quiet(**kw):
    return dict(progress=False, log=lambda m: None, **kw)


def _config(task: str, options: dict, **kw) -> TrainConfig:
    base = dict(task=task, task_options=options, steps=6, batch_size=4, lr=1e-2, warmup_steps=2, eval_every=3,
                ckpt_every=3, log_every=1, sample_tokens=0, device="cpu", eval_batch_size=8)
    base.update(kw)
    return TrainConfig(**base)


def _rows(run_dir, kind: str) -> list[dict]:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [r for r in rows if r["type"] == kind]


@pytest.fixture
def corpus(tmp_path):
    """A small directory of .py files standing in for the standard library (many short documents)."""
    root = tmp_path / "corpus"
    root.mkdir()
    for i in range(40):
        body = "".join(f"def f{i}_{j}(x):\n    return x * {j} + {i}\n" for j in range(1 + i % 4))
        (root / f"mod_{i:02d}.py").write_text(body)
    return str(root)


def _packed_options(corpus: str) -> dict:
    return {"seq_len": 32, "max_chars": 20_000, "root": corpus, "eval_examples": 8, "pack_documents": True}


def test_packed_rows_mark_documents(corpus):
    task = get_task("chars", **_packed_options(corpus))
    batch = task.batch("train", 0, 8)
    assert batch.document_ids is not None and batch.document_ids.shape == batch.input_ids.shape
    changes = batch.document_ids[:, 1:] != batch.document_ids[:, :-1]
    assert changes.any()  # rows do span files
    # no target across a boundary: the last character of a file does not predict the next file's first
    assert (batch.targets[:, :-1][changes] == IGNORE_INDEX).all()
    assert (batch.targets != IGNORE_INDEX).sum() == batch.targets.numel() - changes.sum()
    assert batch[1:3].document_ids.shape == (2, 32)


def test_resume_is_bit_exact_with_packed_rows(tmp_path, corpus):
    config = _config("chars", _packed_options(corpus), steps=4, eval_every=2, ckpt_every=2)
    full = tmp_path / "full"
    train(TINY, config, full, **_quiet())
    split = tmp_path / "split"
    train(TINY, config, split, stop_after=2, **_quiet())
    resumed = train({}, config, split, resume=True, **_quiet())
    assert resumed.step == 4
    assert [r["loss"] for r in _rows(split, "train")] == [r["loss"] for r in _rows(full, "train")]
    a = build_train_model(TINY, get_task("chars", **_packed_options(corpus)))
    b = build_train_model(TINY, get_task("chars", **_packed_options(corpus)))
    load_weights(a, latest_checkpoint(full) / WEIGHTS_NAME)
    load_weights(b, latest_checkpoint(split) / WEIGHTS_NAME)
    for (name, p), q in zip(a.named_parameters(), b.parameters(), strict=True):
        assert torch.equal(p, q), name
    # bits per byte next to the loss; the alphabet is ASCII, one byte a character
    for row in _rows(full, "train") + _rows(full, "eval"):
        assert row["bpb"] == pytest.approx(row["loss"] / math.log(2))


def test_packed_training_sees_each_document_alone(corpus):
    task = get_task("chars", **_packed_options(corpus))
    torch.manual_seed(0)
    model = build_train_model(TINY, task).double().eval()
    batch = task.batch("train", 0, 2)
    packed = forward_logits(model, batch, "causal_lm")[1]
    row, doc = batch.input_ids[0], batch.document_ids[0]
    start = 0
    for end in [*(torch.nonzero(doc[1:] != doc[:-1]).squeeze(1) + 1).tolist(), doc.numel()]:
        alone = model(row[None, start:end]).logits[0]
        torch.testing.assert_close(packed[0, start:end], alone, atol=1e-9, rtol=0)
        start = end


def test_seq2seq_task():
    task = get_task("seq2seq", op="reverse", max_len=6, min_len=2, num_letters=5)
    b = task.batch("train", 0, 16)
    assert b.src_ids.shape == (16, 6) and b.input_ids.shape == (16, 7) == b.targets.shape
    for i in range(16):
        n = int((b.src_ids[i] != PAD_ID).sum())
        src = b.src_ids[i, :n].tolist()
        assert b.input_ids[i, 0] == BOS_ID and b.input_ids[i, 1:n + 1].tolist() == src[::-1]
        assert b.targets[i, :n].tolist() == src[::-1] and b.targets[i, n] == EOS_ID
        assert (b.targets[i, n + 1:] == IGNORE_INDEX).all()
    s = get_task("seq2seq", op="sort", max_len=6).batch("val", 1, 8)
    for i in range(8):
        n = int((s.src_ids[i] != PAD_ID).sum())
        assert s.targets[i, :n].tolist() == sorted(s.src_ids[i, :n].tolist())
    with pytest.raises(ValueError, match="op='rot13'"):
        get_task("seq2seq", op="rot13")


def test_encoder_decoder_trains_and_resumes(tmp_path):
    options = {"op": "reverse", "max_len": 6, "num_letters": 4, "eval_examples": 8}
    config = _config("seq2seq", options, steps=12, lr=1e-2, eval_every=6, ckpt_every=6, batch_size=8,
                     warmup_steps=2)
    result = train(ENC_DEC, config, tmp_path / "full", **_quiet())
    losses = [r["loss"] for r in _rows(tmp_path / "full", "train")]
    assert sum(losses[-3:]) < sum(losses[:3]) - 0.3
    assert set(result.metrics) >= {"val_loss", "val_acc", "val_seq_acc"}
    assert "val_bpb" not in result.metrics  # not a text task
    assert (latest_checkpoint(tmp_path / "full") / "config.json").exists()
    train(ENC_DEC, config, tmp_path / "split", stop_after=20, **_quiet())
    train({}, config, tmp_path / "split", resume=True, **_quiet())
    assert [r["loss"] for r in _rows(tmp_path / "split", "train")] == losses


def _labelled_rows(n: int = 120) -> list[dict]:
    g = torch.Generator().manual_seed(0)
    words = {"pos": ["good", "great", "fine"], "neg": ["bad", "awful", "poor"]}
    rows = []
    for i in range(n):
        label = "pos" if i % 2 else "neg"
        pick = words[label][int(torch.randint(0, 3, (1,), generator=g))]
        rows.append({"text": f"it was {pick} {'!' * (i % 3)}", "label": label})
    return rows


@pytest.mark.parametrize("fmt", ["csv", "jsonl"])
def test_classifier_trains_from_a_file(tmp_path, fmt):
    rows = _labelled_rows()
    path = tmp_path / f"data.{fmt}"
    if fmt == "csv":
        path.write_text("text,label\n" + "".join(f"{r['text']},{r['label']}\n" for r in rows))
    else:
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    options = {"path": str(path), "seq_len": 24, "eval_examples": 64}
    task = get_task("classification", **options)
    assert task.labels == ["neg", "pos"] and task.num_classes == 2
    steps = 20 if fmt == "csv" else 4  # one format learns; the other only has to train
    config = _config("classification", options, steps=steps, lr=1e-2, eval_every=steps // 2, ckpt_every=steps,
                     batch_size=16, warmup_steps=3)
    result = train(CLASSIFIER, config, tmp_path / "run", **_quiet())
    evals = _rows(tmp_path / "run", "eval")
    assert [r["step"] for r in evals] == [steps // 2, steps]  # every eval_every steps, on held-out rows
    if fmt == "csv":
        assert result.metrics["val_acc"] > 0.75
    # eval_steps: the first N held-out batches only
    assert evaluate(build_train_model(CLASSIFIER, task), task, batch_size=4, max_batches=2)["tokens"] == 8
    assert evals[-1]["tokens"] == min(64, len(task.eval_batches(64)[0].targets))


def test_classification_file_errors(tmp_path):
    with pytest.raises(ValueError, match="path=FILE"):
        get_task("classification")
    bad = tmp_path / "data.txt"
    bad.write_text("x")
    with pytest.raises(ValueError, match=r"\.csv or \.jsonl"):
        get_task("classification", path=str(bad))
    missing = tmp_path / "data.jsonl"
    missing.write_text(json.dumps({"sentence": "a", "label": 1}) + "\n")
    with pytest.raises(ValueError, match="lacks the field 'text'"):
        get_task("classification", path=str(missing))
    with pytest.raises(FileNotFoundError):
        get_task("classification", path=str(tmp_path / "nope.csv"))


def test_model_and_task_kinds_must_match(tmp_path, corpus):
    with pytest.raises(ValueError, match="needs model='encoder_decoder'"):
        train(TINY, _config("seq2seq", {}), tmp_path / "a", **_quiet())
    with pytest.raises(ValueError, match="a classifier cannot train on"):
        train(CLASSIFIER, _config("chars", _packed_options(corpus)), tmp_path / "b", **_quiet())
    with pytest.raises(ValueError, match="model='rnn' is not a model kind"):
        model_kind({"model": "rnn"})


def _grads(model, batch, kind, seed=0):
    model.zero_grad()
    torch.manual_seed(seed)  # the same dropout masks in both runs
    out, logits = forward_logits(model, batch, kind)
    _loss_sum(logits, batch.targets).backward()
    return {k: p.grad.clone() for k, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("kind", ["causal_lm", "packed", "encoder_decoder", "classifier", "language_model"])
def test_activation_checkpointing_gives_identical_gradients(kind, corpus, tmp_path):
    if kind in ("causal_lm", "packed"):
        task = get_task("chars", **{**_packed_options(corpus), "pack_documents": kind == "packed"})
        config, model_type = TINY, "causal_lm"
    elif kind == "encoder_decoder":
        task, config, model_type = get_task("seq2seq", max_len=6), {**ENC_DEC, "dropout_rate": 0.1}, kind
    elif kind == "classifier":
        path = tmp_path / "d.jsonl"
        path.write_text("".join(json.dumps(r) + "\n" for r in _labelled_rows(40)))
        task, config, model_type = get_task("classification", path=str(path), seq_len=16), CLASSIFIER, kind
    else:
        from seqblocks.models.config_lm import LanguageModel, LanguageModelConfig

        task = get_task("chars", **_packed_options(corpus))
        model_type = "causal_lm"
    torch.manual_seed(0)
    if kind == "language_model":
        model = LanguageModel(LanguageModelConfig.from_pattern(["mamba", "mha"], vocab_size=task.vocab_size,
                                                               d_model=16)).double().train()
    else:
        model = build_train_model(config, task).double().train()
    batch = task.batch("train", 0, 4)
    plain = _grads(model, batch, model_type)
    assert activation_checkpointing(model, 1) >= 2
    checkpointed = _grads(model, batch, model_type)
    assert plain.keys() == checkpointed.keys()
    for k in plain:
        torch.testing.assert_close(checkpointed[k], plain[k], atol=0, rtol=0, msg=k)


def test_activation_checkpointing_every_n_and_in_training(tmp_path):
    from seqblocks.presets import build_model

    model = build_model({**TINY, "n_layer": 4, "mixer_types": ["mamba", "attn"] * 2, "vocab_size": 24})
    assert activation_checkpointing(model, 2) == 2
    assert activation_checkpointing(model, 1) == 2  # the other two; none twice
    with pytest.raises(ValueError, match="every=0"):
        activation_checkpointing(model, 0)
    mqar = {"vocab_size": 24, "num_kv_pairs": 2, "seq_len": 12, "eval_examples": 16}
    short = {"steps": 3, "eval_every": 0, "ckpt_every": 0}
    plain = train(TINY, _config("mqar", mqar, **short), tmp_path / "a", **_quiet())
    ckpt = train(TINY, _config("mqar", mqar, activation_checkpointing=1, **short), tmp_path / "b", **_quiet())
    assert [r["loss"] for r in _rows(tmp_path / "a", "train")] == [r["loss"] for r in _rows(tmp_path / "b", "train")]
    assert plain.metrics["val_loss"] == ckpt.metrics["val_loss"]
    with pytest.raises(ValueError, match="activation_checkpointing=-1"):
        TrainConfig(activation_checkpointing=-1)


def test_evaluate_bits_per_byte(corpus):
    task = get_task("chars", **{**_packed_options(corpus), "pack_documents": False})
    torch.manual_seed(0)
    model = build_train_model(TINY, task)
    result = evaluate(model, task, batch_size=4)
    assert result["bpb"] == pytest.approx(result["loss"] / math.log(2))
    table = task.token_bytes()
    assert table.shape == (task.vocab_size,) and int(table[task.tokenizer.unk_id]) == 3


def test_cli_trains_and_evaluates_each_kind(tmp_path, capsys):
    from seqblocks.cli import main

    flags = ["--steps", "2", "--batch-size", "4", "--eval-every", "0", "--eval-batch-size", "4", "--eval-steps", "1",
             "--no-progress", "--device", "cpu", "--sample-tokens", "0"]
    out = tmp_path / "s2s"
    # the task picks the model kind: an encoder-decoder for seq2seq
    assert main(["train", "--task", "seq2seq", "--task-opt", "max_len=5", "--task-opt", "eval_examples=8",
                 "--activation-checkpointing", "1", "--out", str(out), *flags]) == 0
    config = json.loads((out / "run.json").read_text())
    assert config["model"]["model"] == "encoder_decoder" and config["train"]["activation_checkpointing"] == 1
    assert main(["eval", str(out), "--json"]) == 0
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["task"] == "seq2seq"
    data = tmp_path / "d.csv"
    data.write_text("text,label\n" + "".join(f"{r['text']},{r['label']}\n" for r in _labelled_rows(40)))
    out = tmp_path / "cls"
    assert main(["train", "--task", "classification", "--task-opt", f"path={data}", "--task-opt", "seq_len=16",
                 "--out", str(out), *flags]) == 0
    assert json.loads((out / "run.json").read_text())["model"]["model"] == "classifier"
    assert main(["eval", str(out), "--json"]) == 0
    assert main(["train", "--task", "chars", "--model", "classifier", "--out", str(tmp_path / "bad"), *flags]) == 2
    assert "cannot train on" in capsys.readouterr().err


def test_activation_checkpointing_survives_a_deep_copy():
    import copy

    from seqblocks.presets import build_model

    model = build_model({**TINY, "vocab_size": 24}).double()
    activation_checkpointing(model, 1)
    twin = copy.deepcopy(model)
    assert twin.layers[0].forward.args[0] is twin.layers[0]  # bound to the copy, not the original
    ids = torch.randint(0, 24, (2, 8))
    torch.testing.assert_close(twin(ids).logits, model(ids).logits, atol=0, rtol=0)

"""The training loop: schedule, weight-decay groups, resume equivalence, atomic checkpoints, options."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn

import seqblocks  # noqa: F401  (registers the mixers)
import seqblocks.presets
from seqblocks.checkpoint import load_pretrained
from seqblocks.train import (
    TrainConfig,
    checkpointing,
    evaluate,
    latest_checkpoint,
    load_train_state,
    lr_factor,
    param_groups,
    train,
)
from seqblocks.train.optim import make_optimizer, make_scheduler

# Tiny hybrid over mixers that exist from the start: a recurrent layer and attention.
TINY = {"d_model": 32, "d_state": 4, "n_layer": 2, "vocab_size": 0, "mixer_types": ["mamba", "attn"],
        "d_intermediate": 32, "mixer_kwargs": {"attn": {"num_heads": 2}, "mamba": {"expand": 1}}}
MQAR = {"task": "mqar", "task_options": {"vocab_size": 24, "num_kv_pairs": 2, "seq_len": 12, "eval_examples": 16}}


def _config(**kw) -> TrainConfig:
    base = dict(MQAR, steps=6, batch_size=4, lr=1e-2, warmup_steps=2, eval_every=0, ckpt_every=3, log_every=1,
                sample_tokens=0, device="cpu", eval_batch_size=16)
    base.update(kw)
    return TrainConfig(**base)


def _losses(run_dir, key: str = "loss") -> list[float]:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [r[key] for r in rows if r["type"] == "train"]


def test_lr_schedule_warmup_cosine_and_short_runs():
    f = [lr_factor(s, 10, 4, 0.1) for s in range(10)]
    assert f[:4] == [0.25, 0.5, 0.75, 1.0]
    assert f[4] == pytest.approx(1.0) and f[-1] == pytest.approx(0.1)
    assert all(a >= b for a, b in zip(f[3:], f[4:]))
    # max_steps <= warmup: the warmup is compressed into the run, ending at the peak, never dividing by zero.
    for steps in (1, 2, 3, 5):
        g = [lr_factor(s, steps, 5) for s in range(steps)]
        assert g[-1] == 1.0 and all(0 < x <= 1 for x in g) and g == sorted(g)
    assert lr_factor(0, 1, 0) == 1.0 and lr_factor(1, 2, 1) == 1.0
    assert [lr_factor(s, 3, 0, 0.0) for s in range(3)] == pytest.approx([1.0, 0.5, 0.0])
    with pytest.raises(ValueError):
        lr_factor(0, 0, 1)
    opt = torch.optim.AdamW([nn.Parameter(torch.zeros(2))], lr=2.0)
    sched = make_scheduler(opt, 10, 4, 0.1)
    seen = []
    for _ in range(10):
        seen.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert seen == pytest.approx([2.0 * x for x in f])


def test_param_groups_skip_norms_biases_embeddings_and_flagged():
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.emb = nn.Embedding(10, 4)
            self.lin = nn.Linear(4, 4)
            self.norm = nn.LayerNorm(4)
            self.head = nn.Linear(4, 10, bias=False)
            self.head.weight = self.emb.weight  # tied
            self.A_log = nn.Parameter(torch.zeros(4, 3))
            self.A_log._no_weight_decay = True
            self.gain = nn.Parameter(torch.ones(4))

    net = Net()
    decay, keep = param_groups(net, 0.1)
    assert decay["weight_decay"] == 0.1 and keep["weight_decay"] == 0.0
    assert [id(p) for p in decay["params"]] == [id(net.lin.weight)]
    kept = {id(p) for p in keep["params"]}
    assert kept == {id(net.emb.weight), id(net.lin.bias), id(net.norm.weight), id(net.norm.bias), id(net.A_log),
                    id(net.gain)}
    assert len(keep["params"]) == len(kept)  # the tied head is listed once


def test_train_writes_metrics_plot_and_loadable_checkpoints(tmp_path):
    result = train(TINY, _config(eval_every=3), tmp_path, progress=False, log=lambda m: None)
    assert result.step == 6 and result.checkpoint == latest_checkpoint(tmp_path)
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if r["type"] == "train"] == [1, 2, 3, 4, 5, 6]
    assert [r["step"] for r in rows if r["type"] == "eval"] == [3, 6]
    assert all(r["tokens_per_s"] > 0 and r["lr"] > 0 for r in rows if r["type"] == "train")
    assert (tmp_path / "loss.png").stat().st_size > 1000
    ckpt = result.checkpoint
    assert {"config.json", "model.safetensors", "task.json", "train_state.pt"} <= {p.name for p in ckpt.iterdir()}
    assert json.loads((ckpt / "task.json").read_text())["name"] == "mqar"
    state = load_train_state(ckpt)
    assert state["step"] == 6 and state["data"]["next_step"] == 6 and "optimizer" in state
    model = load_pretrained(ckpt)
    ids = torch.randint(0, 24, (2, 12))
    torch.testing.assert_close(model(ids).logits, result.model.eval()(ids).logits)
    metrics = evaluate(model, result.task, batch_size=8)
    assert metrics["loss"] == pytest.approx(result.metrics["val_loss"], rel=1e-5)
    assert 0.0 <= metrics["acc"] <= 1.0 and metrics["ppl"] == pytest.approx(torch.tensor(metrics["loss"]).exp().item())


def test_resume_continues_exactly(tmp_path):
    full = tmp_path / "full"
    train(TINY, _config(), full, progress=False, log=lambda m: None)
    split = tmp_path / "split"
    first = train(TINY, _config(), split, stop_after=3, progress=False, log=lambda m: None)
    assert first.step == 3 and latest_checkpoint(split).name == "step_0000003"
    # A crash after step 3 may leave metrics of later steps behind: resuming drops them.
    with open(split / "metrics.jsonl", "a") as f:
        f.write(json.dumps({"type": "train", "step": 4, "loss": 123.0}) + "\n")
    # The configuration given to a resumed run is ignored: the checkpoint's is used.
    resumed = train({}, _config(lr=5.0, steps=99), split, resume=True, progress=False, log=lambda m: None)
    assert resumed.step == 6
    assert _losses(split) == _losses(full)  # bit-for-bit
    a = load_pretrained(latest_checkpoint(full))
    b = load_pretrained(latest_checkpoint(split))
    for (name, p), q in zip(a.named_parameters(), b.parameters()):
        assert torch.equal(p, q), name
    with pytest.raises(FileNotFoundError, match="no checkpoint"):
        train(TINY, _config(), tmp_path / "empty", resume=True, progress=False)


def test_interrupted_checkpoint_write_leaves_the_previous_one_loadable(tmp_path, monkeypatch):
    train(TINY, _config(steps=3, ckpt_every=3), tmp_path, progress=False, log=lambda m: None)
    before = latest_checkpoint(tmp_path)
    weights = (before / "model.safetensors").read_bytes()

    real_save = torch.save

    def crash_midway(obj, path, *args, **kwargs):
        real_save(obj, path, *args, **kwargs)
        with open(path, "r+b") as f:  # a half-written file, then the process "dies"
            f.truncate(100)
        raise KeyboardInterrupt("killed while writing the checkpoint")

    monkeypatch.setattr(checkpointing.torch, "save", crash_midway)
    with pytest.raises(KeyboardInterrupt):
        checkpointing.save_checkpoint(tmp_path, 6, lambda d: torch.save({"x": 1}, d / "train_state.pt"))
    monkeypatch.undo()
    assert latest_checkpoint(tmp_path) == before
    assert not (tmp_path / "checkpoints" / "step_0000006").exists()
    assert (before / "model.safetensors").read_bytes() == weights
    assert load_train_state(before)["step"] == 3
    load_pretrained(before)
    # A temporary directory left by a hard kill is ignored by readers and removed by the next save.
    stale = tmp_path / "checkpoints" / ".tmp-step_0000009-1"
    stale.mkdir()
    (stale / "config.json").write_text("{")
    assert latest_checkpoint(tmp_path) == before
    checkpointing.save_checkpoint(tmp_path, 9, lambda d: (d / "note.txt").write_text("ok"), keep=0)
    assert not stale.exists() and latest_checkpoint(tmp_path).name == "step_0000009"


def test_keep_checkpoints_prunes_old_ones(tmp_path):
    for step in (1, 2, 3):
        checkpointing.save_checkpoint(tmp_path, step, lambda d: (d / "f").write_text("x"), keep=2)
    assert sorted(p.name for p in (tmp_path / "checkpoints").glob("step_*")) == ["step_0000002", "step_0000003"]


def test_gradient_accumulation_matches_one_big_batch(tmp_path):
    a = train(TINY, _config(steps=2, grad_accum=1), tmp_path / "a", progress=False, log=lambda m: None)
    b = train(TINY, _config(steps=2, grad_accum=2), tmp_path / "b", progress=False, log=lambda m: None)
    # Same losses and gradient norms (so the same gradient scale); Adam amplifies float-rounding
    # differences in near-zero gradients, hence the looser parameter tolerance.
    assert _losses(tmp_path / "a") == pytest.approx(_losses(tmp_path / "b"), rel=1e-5)
    assert _losses(tmp_path / "a", "grad_norm") == pytest.approx(_losses(tmp_path / "b", "grad_norm"), rel=1e-4)
    for p, q in zip(a.model.parameters(), b.model.parameters()):
        torch.testing.assert_close(p, q, rtol=0, atol=2e-3)


def test_bf16_autocast_runs_on_cpu(tmp_path):
    result = train(TINY, _config(steps=2, precision="bf16", ckpt_every=0), tmp_path, progress=False,
                   log=lambda m: None)
    assert all(torch.isfinite(torch.tensor(_losses(tmp_path))))
    assert next(result.model.parameters()).dtype == torch.float32  # autocast keeps fp32 master weights


@pytest.mark.filterwarnings("ignore:Dynamo detected a call")
def test_compile_path_matches_eager(tmp_path):
    # The "eager" backend exercises the torch.compile wiring (dynamo tracing) without a C++ toolchain.
    small = {**TINY, "n_layer": 1, "mixer_types": ["attn"]}
    compiled = train(small, _config(steps=2, compile=True, compile_backend="eager", ckpt_every=0), tmp_path / "c",
                     progress=False, log=lambda m: None)
    train(small, _config(steps=2, ckpt_every=0), tmp_path / "e", progress=False, log=lambda m: None)
    assert _losses(tmp_path / "c") == pytest.approx(_losses(tmp_path / "e"), rel=1e-5)
    assert compiled.step == 2


def test_loss_plot_is_redrawn_at_each_evaluation_and_checkpoint_and_when_interrupted(tmp_path, monkeypatch):
    from seqblocks.train import plot, trainer

    titles = []
    real = plot.plot_loss_curve
    monkeypatch.setattr(plot, "plot_loss_curve",
                        lambda metrics, png, title=None: titles.append(title) or real(metrics, png, title=title))
    n_params = sum(p.numel() for p in seqblocks.presets.build_model({**TINY, "vocab_size": 24}).parameters())
    train(TINY, _config(eval_every=2, ckpt_every=3), tmp_path / "run", progress=False, log=lambda m: None)
    assert titles == [f"run: mqar, {n_params / 1e6:.2f}M parameters, step {s} of 6" for s in (2, 3, 4, 6)]
    assert (tmp_path / "run" / "loss.png").stat().st_size > 1000

    # Ctrl-C during step 5: the plot shows the run up to step 4, and says so.
    real_batches = trainer._micro_batches

    def interrupt(task, step, config, info):
        if step == 4:
            raise KeyboardInterrupt
        return real_batches(task, step, config, info)

    monkeypatch.setattr(trainer, "_micro_batches", interrupt)
    titles.clear()
    messages = []
    with pytest.raises(KeyboardInterrupt):
        train(TINY, _config(eval_every=0, ckpt_every=0), tmp_path / "stopped", progress=False, log=messages.append)
    assert titles[-1].endswith("step 4 of 6") and (tmp_path / "stopped" / "loss.png").stat().st_size > 1000
    assert messages[-1] == f"loss curve so far: {tmp_path / 'stopped' / 'loss.png'}"


def test_loss_plot_has_a_title(tmp_path, monkeypatch):
    from matplotlib.axes import Axes

    from seqblocks.train.plot import plot_loss_curve

    (tmp_path / "metrics.jsonl").write_text('{"type": "train", "step": 1, "loss": 3.0}\n'
                                            '{"type": "eval", "step": 1, "loss": 2.5}\n')
    seen = []
    real = Axes.set_title
    monkeypatch.setattr(Axes, "set_title", lambda self, label, *a, **kw: seen.append(label) or real(self, label, *a,
                                                                                                     **kw))
    assert plot_loss_curve(tmp_path / "metrics.jsonl", tmp_path / "a.png", title="my run, step 1") is True
    assert plot_loss_curve(tmp_path / "metrics.jsonl", tmp_path / "b.png") is True
    assert seen == ["my run, step 1", f"{tmp_path.name}: loss"]
    assert (tmp_path / "a.png").stat().st_size > 1000 and not list(tmp_path.glob(".*tmp*"))


def test_missing_matplotlib_degrades_with_a_clear_message(tmp_path, monkeypatch):
    from seqblocks.train import plot

    monkeypatch.setattr(plot, "pyplot", lambda: None)
    messages = []
    train(TINY, _config(steps=1, ckpt_every=0), tmp_path, progress=False, log=messages.append)
    assert any("matplotlib is not installed" in m and "seqblocks[plot]" in m for m in messages)
    assert not (tmp_path / "loss.png").exists()


def test_train_config_validation():
    with pytest.raises(ValueError, match="precision"):
        TrainConfig(precision="fp8")
    with pytest.raises(ValueError, match="multiple of grad_accum"):
        TrainConfig(batch_size=6, grad_accum=4)
    with pytest.raises(ValueError, match="steps"):
        TrainConfig(steps=0)
    assert TrainConfig.from_json(TrainConfig(task="mqar").to_json()) == TrainConfig(task="mqar")


def test_s4_lr_and_wd_reach_the_optimizer():
    """S4 / S4D's lr / wd arguments are not dead knobs: their SSM parameters get their own group."""
    from seqblocks import S4D

    model = nn.Sequential(S4D(8, 4, lr=1e-3, wd=0.0), nn.Linear(8, 8))
    groups = param_groups(model, weight_decay=0.1)
    hinted = [g for g in groups if g.get("lr") == 1e-3]
    assert len(hinted) == 1 and hinted[0]["weight_decay"] == 0.0
    ssm = {id(p) for p in (model[0].log_dt, model[0].A_real)}
    assert ssm <= {id(p) for p in hinted[0]["params"]}
    opt = make_optimizer(model, lr=1e-2)
    assert sorted(g["lr"] for g in opt.param_groups) == [1e-3, 1e-2, 1e-2]

"""Distillation: the student config, the documented attention -> linear-RNN initialisation, the
losses, a tiny run in which the student approaches the teacher's loss, and `seqblocks distill`."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
from post_fixtures import one_thread, tiny_checkpoint, tiny_model  # noqa: F401

from seqblocks.models.lrnn_lm import LRNNLMHeadModel
from seqblocks.ops.causal_conv1d import causal_conv1d
from seqblocks.post.distill import (
    DistillConfig,
    distill,
    hidden_alignment_loss,
    init_student_from_teacher,
    kd_loss,
    replaced_layers,
    student_config,
)

GQA = {"n_layer": 3, "mixer_types": ["attn", "attn", "attn"], "mixer_kwargs": {"attn": {"num_heads": 4,
                                                                                       "num_heads_kv": 2}}}

pytestmark = pytest.mark.usefixtures("one_thread")


def _student(teacher, mixer, layers):
    student = LRNNLMHeadModel.from_config(student_config(teacher, mixer, layers))
    return student, init_student_from_teacher(student, teacher)


def _qkv(attn):
    H, Hkv, K = attn.num_heads, attn.num_heads_kv, attn.head_dim
    q, k, v = attn.in_proj.weight.detach().split((H * K, Hkv * K, Hkv * K))
    rep = lambda w: w.view(Hkv, K, -1).repeat_interleave(H // Hkv, 0).reshape(H * K, -1)  # noqa: E731
    return q, rep(k), rep(v)


def test_student_config_replaces_the_chosen_attention_layers():
    teacher = tiny_model(**GQA)
    assert [layer.mixer for layer in student_config(teacher, "gated_deltanet").layers] == ["gated_deltanet"] * 3
    assert [layer.mixer for layer in student_config(teacher, "mamba2", "alternate").layers] == ["attn", "mamba2",
                                                                                               "attn"]
    with pytest.raises(ValueError, match="not attention layers"):
        student_config(tiny_model(mixer_types=["attn", "mamba"]), "gla", [1])
    with pytest.raises(ValueError, match="no attention initialisation"):
        student_config(teacher, "s5")


@pytest.mark.parametrize("mixer", ["gated_deltanet", "deltanet", "gla"])
def test_linear_attention_students_get_attention_projections(mixer):
    teacher = tiny_model(**GQA)
    student, report = _student(teacher, mixer, [0, 2])
    assert replaced_layers(teacher, student) == [0, 2]
    for i in (0, 2):
        attn, rnn = teacher.layers[i].mixer, student.layers[i].mixer
        q, k, v = _qkv(attn)
        torch.testing.assert_close(rnn.q_proj.weight, q)
        torch.testing.assert_close(rnn.k_proj.weight, k)  # GQA key / value heads repeated to the query heads
        torch.testing.assert_close(rnn.v_proj.weight, v)
        torch.testing.assert_close(rnn.o_proj.weight, attn.out_proj.weight)
        assert "from attention" in report[f"layer {i}"]
        for name in ("q_conv1d", "k_conv1d", "v_conv1d"):
            conv = getattr(rnn, name, None)
            if conv is not None:  # the identity: the conv passes its input through
                x = torch.randn(2, 7, conv.weight.shape[0])
                torch.testing.assert_close(causal_conv1d(x, conv.weight[:, 0], conv.bias)[0], x)
    # Everything shared is the teacher's: embedding, norms, MLPs and the attention layer kept.
    t_state = teacher.state_dict()
    for key, value in student.state_dict().items():
        if not key.startswith(("layers.0.mixer.", "layers.2.mixer.")):
            torch.testing.assert_close(value, t_state[key], msg=key)


def test_mamba2_student_gets_x_b_c_from_v_k_q():
    teacher = tiny_model(**GQA)
    student, _ = _student(teacher, "mamba2", [1])
    attn, m = teacher.layers[1].mixer, student.layers[1].mixer
    q, k, v = _qkv(attn)
    d_ssm, GN = m.d_ssm, m.ngroups * m.d_state
    start = 2 * m.d_mlp + d_ssm
    w = m.in_proj.weight
    torch.testing.assert_close(w[start: start + d_ssm], v)
    torch.testing.assert_close(w[start + d_ssm: start + d_ssm + GN], k)
    torch.testing.assert_close(w[start + d_ssm + GN: start + d_ssm + 2 * GN], q)
    torch.testing.assert_close(m.out_proj.weight, attn.out_proj.weight)
    x = torch.randn(1, 5, m.conv1d.weight.shape[0])
    torch.testing.assert_close(causal_conv1d(x, m.conv1d.weight[:, 0], m.conv1d.bias)[0], x)


def test_kd_and_hidden_losses():
    s, t = torch.randn(2, 5, 16), torch.randn(2, 5, 16)
    assert kd_loss(t, t).item() == pytest.approx(0.0, abs=1e-6)
    for T in (1.0, 2.0):
        pt, ls = F.softmax(t / T, -1), F.log_softmax(s / T, -1)
        expected = (pt * (pt.log() - ls)).sum(-1).mean() * T * T
        assert kd_loss(s, t, T).item() == pytest.approx(expected.item(), rel=1e-5)
    mask = torch.tensor([[1, 1, 0, 0, 0], [0, 0, 0, 0, 1]])
    pt, ls = F.softmax(t, -1), F.log_softmax(s, -1)
    per = (pt * (pt.log() - ls)).sum(-1)
    assert kd_loss(s, t, mask=mask).item() == pytest.approx((per[0, :2].sum() + per[1, 4]).item() / 3, rel=1e-5)
    hs = [torch.zeros(2, 3, 4), torch.ones(2, 3, 4), 2 * torch.ones(2, 3, 4)]
    ht = [torch.zeros(2, 3, 4), torch.ones(2, 3, 4), torch.ones(2, 3, 4)]
    assert hidden_alignment_loss(hs, ht).item() == pytest.approx(0.5)  # (0 + 1) / 2, embedding left out


def _trained_teacher() -> torch.nn.Module:
    """An attention model that learns the copying task in a few dozen steps."""
    from seqblocks.tasks import IGNORE_INDEX, get_task

    task = get_task("copying", vocab_size=8, num_tokens=4)
    teacher = tiny_model()
    optimizer = torch.optim.AdamW(teacher.parameters(), lr=1e-2)
    for step in range(60):
        batch = task.batch("train", step, 32, 0)
        loss = F.cross_entropy(teacher(batch.input_ids).logits[..., :8].flatten(0, 1), batch.targets.flatten(),
                               ignore_index=IGNORE_INDEX)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    return teacher


def test_distillation_brings_the_student_to_the_teachers_loss(tmp_path):
    teacher = _trained_teacher()
    student, _ = _student(teacher, "gated_deltanet", [1])
    frozen = {n: p.detach().clone() for n, p in student.named_parameters() if not n.startswith("layers.1.mixer.")}
    config = DistillConfig(task="copying", task_options={"vocab_size": 8, "num_tokens": 4}, steps=30, hidden_steps=5,
                           lr=3e-3, batch_size=16, log_every=5, ckpt_every=0)
    distill(teacher, student, DistillConfig(**{**config.to_dict(), "steps": 5}), tmp_path / "stage1",
            log=lambda m: None)
    # The alignment stage trains only the replaced mixers.
    for name, value in frozen.items():
        torch.testing.assert_close(dict(student.named_parameters())[name], value, msg=name)
    student, _ = _student(teacher, "gated_deltanet", [1])
    distill(teacher, student, config, tmp_path / "run", log=lambda m: None)
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert rows[0]["stage"] == 1 and rows[-1]["stage"] == 2
    assert rows[0]["hidden_mse"] > 0
    kl = [r["kl"] for r in rows if r["stage"] == 2]
    assert kl[-1] < kl[0]
    teacher_ce = rows[-1]["teacher_ce"]
    assert teacher_ce < 1.5  # the teacher learned the task (chance: ln 6 = 1.79)
    first_gap, last_gap = rows[0]["ce"] - rows[0]["teacher_ce"], rows[-1]["ce"] - rows[-1]["teacher_ce"]
    assert last_gap < 0.5 * first_gap


def test_distill_command_end_to_end(tmp_path):
    from seqblocks.cli import main

    base = tiny_checkpoint(tmp_path / "teacher")
    out = tmp_path / "run"
    args = ["distill", str(base), "--mixer", "mamba2", "--layers", "1", "--out", str(out), "--steps", "3",
            "--hidden-steps", "1", "--batch-size", "4", "--device", "cpu", "--no-progress", "--threads", "1"]
    assert main(args) == 0
    config = json.loads((out / "checkpoints" / "step_0000003" / "config.json").read_text())
    assert [layer["mixer"] for layer in config["layers"]] == ["attn", "mamba2"]
    assert main(["eval", str(out), "--device", "cpu", "--threads", "1"]) == 0
    assert main(["generate", str(out), "--prompt", "2 3 4", "--max-new-tokens", "3", "--device", "cpu",
                 "--threads", "1"]) == 0

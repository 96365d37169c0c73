"""Embedded tasks: determinism, the meaning of inputs and targets, the char corpus and tokenizer."""

from __future__ import annotations

import pytest
import torch

from seqblocks.tasks import (
    IGNORE_INDEX,
    MQAR,
    TASKS,
    CharTokenizer,
    Copying,
    InductionHeads,
    SelectiveCopying,
    StdlibChars,
    get_task,
)
from seqblocks.tasks.chars import stdlib_files

SYNTHETIC = [MQAR(vocab_size=40, num_kv_pairs=4, seq_len=24), SelectiveCopying(vocab_size=10, num_tokens=4,
             context_len=12), Copying(vocab_size=10, num_tokens=5), InductionHeads(vocab_size=10, seq_len=16)]


@pytest.mark.parametrize("task", SYNTHETIC, ids=lambda t: t.name)
def test_synthetic_batches_are_deterministic_and_well_formed(task):
    a = task.batch("train", 3, 8, seed=1)
    b = task.batch("train", 3, 8, seed=1)
    assert torch.equal(a.input_ids, b.input_ids) and torch.equal(a.targets, b.targets)
    assert not torch.equal(a.input_ids, task.batch("train", 4, 8, seed=1).input_ids)
    assert not torch.equal(a.input_ids, task.batch("val", 3, 8, seed=1).input_ids)
    assert not torch.equal(a.input_ids, task.batch("train", 3, 8, seed=2).input_ids)
    assert a.input_ids.shape == a.targets.shape == (8, task.seq_len)
    assert a.input_ids.dtype == a.targets.dtype == torch.long
    assert 0 <= int(a.input_ids.min()) and int(a.input_ids.max()) < task.vocab_size
    scored = a.targets[a.targets != IGNORE_INDEX]
    assert scored.numel() > 0 and int(scored.min()) >= 0 and int(scored.max()) < task.vocab_size
    # get_task(name, **config()) rebuilds the same task.
    again = get_task(task.name, **task.config())
    assert torch.equal(again.batch("val", 0, 4).input_ids, task.batch("val", 0, 4).input_ids)


def test_mqar_targets_are_the_values_bound_to_the_queried_keys():
    task = MQAR(vocab_size=40, num_kv_pairs=4, seq_len=24)
    batch = task.batch("train", 0, 16)
    for ids, targets in zip(batch.input_ids.tolist(), batch.targets.tolist()):
        keys, values = ids[0:8:2], ids[1:8:2]
        assert len(set(keys)) == 4 and all(2 <= k < 2 + task.num_keys for k in keys)
        assert all(v >= 2 + task.num_keys for v in values)
        binding = dict(zip(keys, values))
        queries = [(t, ids[t]) for t in range(len(ids)) if targets[t] != IGNORE_INDEX]
        assert sorted(k for _, k in queries) == sorted(keys)  # every key is queried once, after the context
        for t, key in queries:
            assert t >= 8 and targets[t] == binding[key]
        assert all(x == 0 for t, x in enumerate(ids[8:], 8) if targets[t] == IGNORE_INDEX)  # answers not shown


def test_selective_copying_and_copying_targets_reproduce_the_content_in_order():
    sc = SelectiveCopying(vocab_size=10, num_tokens=4, context_len=12)
    batch = sc.batch("train", 0, 8)
    for ids, targets in zip(batch.input_ids.tolist(), batch.targets.tolist()):
        content = [x for x in ids[:12] if x != 0]
        assert len(content) == 4 and ids[12] == 1
        assert [t for t in targets if t != IGNORE_INDEX] == content
    cp = Copying(vocab_size=10, num_tokens=5)
    batch = cp.batch("train", 0, 8)
    for ids, targets in zip(batch.input_ids.tolist(), batch.targets.tolist()):
        assert ids[5] == 1 and [t for t in targets if t != IGNORE_INDEX] == ids[:5]


def test_induction_heads_target_is_the_token_after_the_first_trigger():
    task = InductionHeads(vocab_size=10, seq_len=16)
    batch = task.batch("train", 0, 32)
    for ids, targets in zip(batch.input_ids.tolist(), batch.targets.tolist()):
        triggers = [t for t, x in enumerate(ids) if x == 1]
        assert len(triggers) == 2 and triggers[1] == 15
        assert targets[15] == ids[triggers[0] + 1] and sum(t != IGNORE_INDEX for t in targets) == 1


def test_eval_batches_cover_eval_examples():
    task = Copying(vocab_size=10, num_tokens=5, eval_examples=10)
    batches = task.eval_batches(4)
    assert [b.input_ids.shape[0] for b in batches] == [4, 4, 2]
    assert torch.equal(batches[0].input_ids, task.eval_batches(4)[0].input_ids)


def test_bad_task_names_and_options_list_what_is_valid():
    with pytest.raises(ValueError, match="registered task names.*mqar"):
        get_task("nope")
    with pytest.raises(ValueError, match="valid options.*num_kv_pairs"):
        get_task("mqar", pairs=3)
    with pytest.raises(ValueError, match="seq_len=8 must be at least"):
        MQAR(num_kv_pairs=4, seq_len=8)
    with pytest.raises(ValueError, match="split"):
        SYNTHETIC[0].batch("test", 0, 2)
    # Options of the wrong type (as --task-opt seq_len=abc gives) name the option and its default.
    with pytest.raises(TypeError, match=r"option seq_len='abc' must be an integer \(default 128\)"):
        get_task("chars", seq_len="abc")
    with pytest.raises(TypeError, match="num_kv_pairs=2.5 must be an integer"):
        get_task("mqar", num_kv_pairs=2.5)
    with pytest.raises(TypeError, match="must be an integer"):
        get_task("mqar", seq_len=True)
    with pytest.raises(TypeError, match="val_fraction='x' must be a number"):
        get_task("chars", val_fraction="x")
    assert get_task("copying", vocab_size=12).vocab_size >= 12
    assert {"chars", "mqar", "selective_copying", "induction_heads", "copying"} <= set(TASKS.keys())


def test_char_tokenizer_round_trip_unknowns_and_save(tmp_path):
    tok = CharTokenizer()
    text = "def f(x):\n\treturn x + 1  # ok\n"
    assert tok.decode(tok.encode(text)) == text
    ids = tok.encode("aé\x00b")
    assert ids[1] == ids[2] == tok.unk_id and tok.decode(ids) == "a\ufffd\ufffdb"
    assert tok.vocab_size == len(tok.alphabet) + 1 == 98
    tok.save(tmp_path / "tok.json")
    assert CharTokenizer.load(tmp_path / "tok.json").encode(text) == tok.encode(text)
    custom = CharTokenizer("abé")  # a non-ASCII alphabet takes the slow path, same contract
    assert custom.encode("abéz") == [0, 1, 2, 3]


def test_stdlib_chars_is_deterministic_with_disjoint_splits():
    task = StdlibChars(seq_len=32, max_chars=150_000)
    again = StdlibChars(seq_len=32, max_chars=150_000)
    assert task.files == again.files and torch.equal(task.train_ids, again.train_ids)
    assert task.vocab_size == 98 and task.is_language
    n_train, n_val = task.train_ids.numel(), task.val_ids.numel()
    assert 100_000 < n_train + n_val < 250_000 and n_val > 0
    assert all(not f.startswith(("test/", "site-packages/")) for f in task.files)
    batch = task.batch("train", 0, 4)
    assert batch.input_ids.shape == (4, 32) and torch.equal(batch.input_ids[:, 1:], batch.targets[:, :-1])
    evals = task.eval_batches(8)
    assert sum(b.input_ids.shape[0] for b in evals) == min(task.eval_examples, (n_val - 1) // 32)
    # The validation text is made of whole files that the training text does not contain.
    train_text, val_text = task.decode(task.train_ids.tolist()), task.decode(task.val_ids.tolist())
    val_names = [line for line in val_text.splitlines() if line.startswith("# file: ")]
    assert val_names and not any(name + "\n" in train_text for name in val_names)


def test_stdlib_chars_reads_a_given_root_and_rejects_tiny_corpora(tmp_path):
    (tmp_path / "a.py").write_text("x = 1\n" * 200)
    (tmp_path / "b.py").write_text("y = 2\n" * 200)
    (tmp_path / "test").mkdir()
    (tmp_path / "test" / "c.py").write_text("z = 3\n" * 200)
    assert [p.name for p in stdlib_files(str(tmp_path))] == ["a.py", "b.py"]
    with pytest.raises(ValueError, match="too small"):
        StdlibChars(seq_len=4096, root=str(tmp_path), val_fraction=0.5)
    with pytest.raises(ValueError, match="does not exist"):
        stdlib_files(str(tmp_path / "missing"))

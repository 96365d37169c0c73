"""Data: sources of every kind, ``prepare`` into shards (re-read, stable split, crash safety), the
``shards`` task's packed rows and boundaries, streaming, and bit-exact resume on shards."""

from __future__ import annotations

import json
import random

import numpy as np
import pytest
import torch

import seqblocks  # noqa: F401  (registers the mixers)
from seqblocks.checkpoint import load_pretrained
from seqblocks.data import (
    PackedBatch,
    Shards,
    ShardTask,
    document_in_val,
    iter_documents,
    pack_rows,
    prepare,
    stream_batches,
)
from seqblocks.data import shards as shards_module
from seqblocks.tasks import IGNORE_INDEX, get_task
from seqblocks.tokenizers import CharTokenizer, load_tokenizer, train_bpe
from seqblocks.train import TrainConfig, latest_checkpoint, train

WORDS = ["the", "cat", "sat", "on", "a", "mat", "and", "dog", "ran", "far", "café"]


def _doc(seed: int, lines: int = 6) -> str:
    rng = random.Random(seed)
    return "\n".join(" ".join(rng.choice(WORDS) for _ in range(10)) for _ in range(lines)) + "\n"


@pytest.fixture
def corpus(tmp_path):
    """A folder of 40 small text files, some in a subfolder, and a hidden one that is skipped."""
    root = tmp_path / "corpus"
    (root / "sub").mkdir(parents=True)
    docs = {}
    for i in range(40):
        path = root / ("sub" if i % 3 == 0 else "") / f"doc{i:02d}.txt"
        docs[path] = _doc(i)
        path.write_text(docs[path], encoding="utf-8")
    (root / ".hidden.txt").write_text("never read")
    (root / "notes.bin").write_bytes(b"\x00\x01")
    return root, [docs[p] for p in sorted(docs)]


def _expected_stream(docs: list[str], tok, val_fraction: float) -> dict[str, list[int]]:
    out = {"train": [], "val": []}
    for text in docs:
        out["val" if document_in_val(text, val_fraction) else "train"] += [*tok.encode(text), tok.eos_id]
    return out


def test_sources_folders_globs_jsonl_parquet_arrow_and_datasets(tmp_path, corpus):
    root, docs = corpus
    assert list(iter_documents(root)) == docs
    recursive = list(iter_documents(str(root / "**" / "doc0*.txt")))
    assert recursive == [p.read_text() for p in sorted(root.rglob("doc0*.txt"), key=str)] and len(recursive) == 10
    globbed = list(iter_documents(str(root / "sub" / "*.txt")))
    assert globbed == [(root / "sub" / f"doc{i:02d}.txt").read_text() for i in range(0, 40, 3)]
    jsonl = tmp_path / "d.jsonl"
    jsonl.write_text("".join(json.dumps({"id": i, "body": d}) + "\n" for i, d in enumerate(docs[:5])) + "\n")
    assert list(iter_documents(jsonl, text_field="body")) == docs[:5]
    with pytest.raises(ValueError, match=r"d.jsonl:1 has no string field 'text' \(it has \['body', 'id'\]\)"):
        list(iter_documents(jsonl))

    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    table = pa.table({"text": docs[:7], "n": list(range(7))})
    pq.write_table(table, tmp_path / "d.parquet", row_group_size=3)
    assert list(iter_documents(tmp_path / "d.parquet")) == docs[:7]
    with pa.OSFile(str(tmp_path / "file.arrow"), "wb") as sink, pa.ipc.new_file(sink, table.schema) as writer:
        writer.write_table(table)
    with pa.OSFile(str(tmp_path / "stream.arrow"), "wb") as sink, pa.ipc.new_stream(sink, table.schema) as writer:
        writer.write_table(table)
    assert list(iter_documents(tmp_path / "file.arrow")) == list(iter_documents(tmp_path / "stream.arrow")) == docs[:7]
    with pytest.raises(ValueError, match="has no column 'body'"):
        list(iter_documents(tmp_path / "d.parquet", text_field="body"))
    # Several sources read in the order given.
    assert list(iter_documents([tmp_path / "d.parquet", tmp_path / "file.arrow"])) == docs[:7] * 2

    datasets = pytest.importorskip("datasets")
    datasets.Dataset.from_dict({"text": docs[:4]}).save_to_disk(str(tmp_path / "saved"))
    assert list(iter_documents(tmp_path / "saved")) == docs[:4]
    with pytest.raises(FileNotFoundError, match="does not exist"):
        list(iter_documents(tmp_path / "nothing-here"))


def test_prepare_shards_reread_to_the_same_tokens_for_any_worker_count(tmp_path, corpus):
    root, docs = corpus
    tok = train_bpe(docs, vocab_size=300)
    one = prepare(root, tok, tmp_path / "one", val_fraction=0.2, shard_tokens=500, workers=1, chunk_chars=700,
                  progress=False)
    two = prepare(root, tok, tmp_path / "two", val_fraction=0.2, shard_tokens=500, workers=2, chunk_chars=700,
                  progress=False)
    assert one["splits"] == two["splits"]  # token counts, shard files and their SHA-256
    assert one["dtype"] == "uint16" and len(one["splits"]["train"]["shards"]) > 2
    expected = _expected_stream(docs, tok, 0.2)
    shards = Shards(tmp_path / "one", verify=True)
    for split in ("train", "val"):
        assert shards.num_tokens(split) == len(expected[split]) > 0
        assert shards.read(split, 0, shards.num_tokens(split)).tolist() == expected[split]
    # A read across a shard's end.
    assert shards.read("train", 490, 20).tolist() == expected["train"][490:510]
    # The tokenizer travels with the shards.
    assert shards.tokenizer().encode(docs[0]) == tok.encode(docs[0])
    assert json.loads((tmp_path / "one" / "tokenizer.json").read_text())["type"] == "hf"


def test_prepare_uses_uint32_when_the_vocabulary_needs_it(tmp_path):
    alphabet = "".join(chr(c) for c in range(0x10000, 0x10000 + 70_000))
    tok = CharTokenizer(alphabet, eos=True)
    docs = [alphabet[-50:] + alphabet[:50], alphabet[1000:1100]]
    for i, d in enumerate(docs):
        (tmp_path / f"{i}.txt").write_text(d, encoding="utf-8")
    manifest = prepare(str(tmp_path / "*.txt"), tok, tmp_path / "out", val_fraction=0.5, workers=1, progress=False)
    assert manifest["dtype"] == "uint32"
    shards = Shards(tmp_path / "out")
    got = shards.read("train", 0, shards.num_tokens("train")).tolist() + shards.read(
        "val", 0, shards.num_tokens("val")).tolist()
    assert sorted(got) == sorted([*tok.encode(docs[0]), tok.eos_id, *tok.encode(docs[1]), tok.eos_id])
    assert max(got) > 65535


def test_the_split_is_stable_under_reordering_and_new_documents(tmp_path, corpus):
    root, docs = corpus
    tok = load_tokenizer("char")
    prepare(root, tok, tmp_path / "a", val_fraction=0.25, workers=1, progress=False)
    # The same documents in another order, plus new ones: every old document stays on its side.
    shuffled = tmp_path / "shuffled"
    shuffled.mkdir()
    order = list(range(40))
    random.Random(1).shuffle(order)
    for rank, i in enumerate(order):
        (shuffled / f"{rank:02d}.txt").write_text(docs[i], encoding="utf-8")
    for j in range(40, 50):
        (shuffled / f"new{j}.txt").write_text(_doc(j), encoding="utf-8")
    prepare(shuffled, tok, tmp_path / "b", val_fraction=0.25, workers=2, progress=False)

    def documents(path, split):
        shards = Shards(path)
        ids = shards.read(split, 0, shards.num_tokens(split)).tolist()
        out, current = set(), []
        for i in ids:
            if i == tok.eos_id:
                out.add(tok.decode(current))
                current = []
            else:
                current.append(i)
        return out

    for split in ("train", "val"):
        a, b = documents(tmp_path / "a", split), documents(tmp_path / "b", split)
        assert a and a <= b
    assert documents(tmp_path / "a", "val") == {tok.decode(tok.encode(d)) for d in docs if document_in_val(d, 0.25)}


def test_a_tiny_corpus_still_gets_both_splits(tmp_path):
    (tmp_path / "only.txt").write_text(_doc(0, lines=20))
    manifest = prepare(tmp_path / "only.txt", "char", tmp_path / "one", val_fraction=0.1, workers=1, progress=False)
    train_tokens, val_tokens = manifest["splits"]["train"]["tokens"], manifest["splits"]["val"]["tokens"]
    assert val_tokens > 0 and train_tokens > 5 * val_tokens
    shards = Shards(tmp_path / "one")
    tok = shards.tokenizer()
    whole = shards.read("train", 0, train_tokens).tolist() + shards.read("val", 0, val_tokens).tolist()
    assert tok.decode(whole) == tok.decode(tok.encode(_doc(0, lines=20)))


def test_a_crash_mid_prepare_leaves_no_shard_taken_for_complete(tmp_path, corpus, monkeypatch):
    root, docs = corpus
    out = tmp_path / "out"
    prepare(root, "char", out, val_fraction=0.2, shard_tokens=400, workers=1, progress=False)
    assert Shards(out).num_tokens("train") > 0
    finished = []
    original = shards_module._ShardWriter._finish

    def crash_on_third(self):
        if len(finished) == 2:
            raise KeyboardInterrupt  # as if killed while writing the third shard
        finished.append(self.split)
        original(self)

    monkeypatch.setattr(shards_module._ShardWriter, "_finish", crash_on_third)
    with pytest.raises(KeyboardInterrupt):
        prepare(root, "char", out, val_fraction=0.2, shard_tokens=400, workers=1, progress=False)
    # The old manifest went first, so neither the old shards nor the new ones are taken as complete.
    with pytest.raises(ValueError, match="not a prepared data directory"):
        Shards(out)
    assert not [p for p in out.iterdir() if ".tmp-" in p.name]  # the interrupted shard is removed
    monkeypatch.undo()
    prepare(root, "char", out, val_fraction=0.2, shard_tokens=400, workers=1, progress=False)
    shards = Shards(out, verify=True)
    # A shard cut short after the fact (a disk error) is refused, naming it.
    first = out / shards.manifest["splits"]["train"]["shards"][0]["file"]
    first.write_bytes(first.read_bytes()[:-2])
    with pytest.raises(ValueError, match=f"shard {first} is .* bytes, the manifest says 800 bytes"):
        Shards(out)


def test_packed_rows_mark_documents_and_mask_the_loss_across_them():
    eos = 9
    rows = torch.tensor([[1, 2, eos, 3, 4, 5, eos, 6], [eos, 1, 1, 1, 1, 1, 1, 1]])
    batch = pack_rows(rows, eos)
    assert isinstance(batch, PackedBatch)
    assert batch.input_ids.tolist() == [[1, 2, eos, 3, 4, 5, eos], [eos, 1, 1, 1, 1, 1, 1]]
    assert batch.targets.tolist() == [[2, eos, IGNORE_INDEX, 4, 5, eos, IGNORE_INDEX],
                                      [IGNORE_INDEX, 1, 1, 1, 1, 1, 1]]
    assert batch.doc_ids.tolist() == [[0, 0, 0, 1, 1, 1, 1], [0, 1, 1, 1, 1, 1, 1]]
    assert batch.cu_seqlens().tolist() == [0, 3, 7, 8, 14]
    assert batch.cu_seqlens().dtype == torch.int32
    assert batch[1:].cu_seqlens().tolist() == [0, 1, 7]
    assert pack_rows(rows, eos, mask_boundaries=False).targets.tolist()[0] == rows[0, 1:].tolist()


def test_shard_task_batches_are_deterministic_and_valid(tmp_path, corpus):
    root, docs = corpus
    prepare(root, "char", tmp_path / "d", val_fraction=0.2, shard_tokens=1000, workers=1, progress=False)
    task = get_task("shards", path=str(tmp_path / "d"), seq_len=32, eval_examples=10)
    assert isinstance(task, ShardTask) and task.is_language and task.vocab_size == 99
    a, b = task.batch("train", 3, 4, seed=1), task.batch("train", 3, 4, seed=1)
    assert torch.equal(a.input_ids, b.input_ids)
    assert not torch.equal(a.input_ids, task.batch("train", 4, 4, 1).input_ids)
    assert a.input_ids.shape == (4, 32) and a.input_ids.dtype == torch.long
    scored = a.targets != IGNORE_INDEX
    assert torch.equal(a.targets[scored], torch.cat([a.input_ids[:, 1:], a.targets[:, -1:]], 1)[scored])
    assert (a.targets[a.input_ids == task.tokenizer.eos_id] == IGNORE_INDEX).all()
    evals = task.eval_batches(4)
    assert sum(len(e.input_ids) for e in evals) == 10 and isinstance(evals[0], PackedBatch)
    assert "cat" in task.decode(a.input_ids[0].tolist()) or "the" in task.decode(a.input_ids[0].tolist())
    with pytest.raises(ValueError, match="needs path=DIR"):
        get_task("shards")
    with pytest.raises(ValueError, match="train split .* fewer than seq_len"):
        get_task("shards", path=str(tmp_path / "d"), seq_len=100_000)
    # A validation split shorter than a row is scored as one shorter row.
    n_val = task.shards.num_tokens("val")
    short = get_task("shards", path=str(tmp_path / "d"), seq_len=n_val + 10)
    (row,) = short.eval_batches(4)
    assert row.input_ids.shape == (1, n_val - 1)


def test_stream_batches_pack_raw_text_without_prepare(corpus):
    root, docs = corpus
    tok = load_tokenizer("char")
    stream = [tok.encode(d) + [tok.eos_id] for d in docs]
    flat = [i for ids in stream for i in ids]
    batches = list(stream_batches(root, tok, seq_len=15, batch_size=3))
    assert len(batches) == len(flat) // 48
    rows = torch.cat([torch.cat([b.input_ids, b.input_ids.new_zeros(3, 1)], 1) for b in batches])
    first = np.array(flat[:48]).reshape(3, 16)
    assert rows[:3, :15].tolist() == first[:, :15].tolist()


def test_resume_is_bit_exact_on_packed_shards(tmp_path, corpus):
    root, _ = corpus
    data = tmp_path / "data"
    prepare(root, "char", data, val_fraction=0.2, workers=1, progress=False)
    model = {"d_model": 32, "d_state": 4, "n_layer": 2, "vocab_size": 0, "mixer_types": ["mamba", "attn"],
             "d_intermediate": 32, "mixer_kwargs": {"attn": {"num_heads": 2}, "mamba": {"expand": 1}}}
    config = TrainConfig(task="shards", task_options={"path": str(data), "seq_len": 16, "eval_examples": 8}, steps=4,
                         batch_size=4, lr=1e-2, warmup_steps=1, eval_every=0, ckpt_every=2, log_every=1,
                         sample_tokens=0, device="cpu", eval_batch_size=8)
    full = train(model, config, tmp_path / "full", progress=False, log=lambda m: None)
    train(model, config, tmp_path / "split", stop_after=2, progress=False, log=lambda m: None)
    resumed = train({}, config, tmp_path / "split", resume=True, progress=False, log=lambda m: None)
    assert resumed.step == 4 and resumed.metrics["val_loss"] == full.metrics["val_loss"]
    a, b = load_pretrained(latest_checkpoint(tmp_path / "full")), load_pretrained(latest_checkpoint(tmp_path / "split"))
    for (name, p), q in zip(a.named_parameters(), b.parameters()):
        assert torch.equal(p, q), name
    # The checkpoint holds the tokenizer of the data.
    saved = json.loads((latest_checkpoint(tmp_path / "full") / "tokenizer.json").read_text())
    assert saved == load_tokenizer("char").to_dict()

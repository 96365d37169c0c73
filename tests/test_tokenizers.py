"""Tokenizers: each round-trips text, saves and loads whole, and BPE training is deterministic."""

from __future__ import annotations

import base64
import json

import pytest

from seqblocks.tokenizers import (
    CharTokenizer,
    HFTokenizer,
    TiktokenTokenizer,
    Tokenizer,
    load_tokenizer,
    tokenizer_from_dict,
    train_bpe,
)

TEXT = "def f(x):\n\treturn x + 1  # the cat sat on the mat\n"
UNICODE = "naïve café, 数字 and 😀 <|endoftext|> end"


def _corpus() -> list[str]:
    words = ["the", "cat", "sat", "on", "mat", "def", "return", "café", "数字", "\n", "  "]
    return [" ".join(words[(i * 7 + j * 3) % len(words)] for j in range(40)) for i in range(60)]


def _tiny_tiktoken_file(path) -> None:
    """The 256 byte tokens, then a few merges: a complete, local tiktoken encoding."""
    tokens = [bytes([b]) for b in range(256)] + [b"th", b"he", b"the", b" the", b"at", b" c", b" cat"]
    path.write_text("".join(f"{base64.b64encode(t).decode()} {rank}\n" for rank, t in enumerate(tokens)))


def test_char_tokenizer_round_trips_and_has_an_end_of_document_token(tmp_path):
    tok = load_tokenizer("char")
    assert isinstance(tok, Tokenizer)
    assert tok.decode(tok.encode(TEXT)) == TEXT
    assert tok.eos_id == tok.vocab_size - 1 and tok.eos_id not in tok.encode(TEXT)
    assert tok.decode([tok.encode("a")[0], tok.eos_id]) == "a"
    tok.save(tmp_path / "t.json")
    again = load_tokenizer(tmp_path / "t.json")
    assert again.encode(TEXT) == tok.encode(TEXT) and again.eos_id == tok.eos_id
    # The task's tokenizer keeps its vocabulary (and old checkpoints theirs): no EOS unless asked.
    assert CharTokenizer().vocab_size == tok.vocab_size - 1 and CharTokenizer().eos_id is None
    assert CharTokenizer.from_dict(CharTokenizer().to_dict()).eos_id is None


def test_bpe_training_is_deterministic_and_round_trips(tmp_path):
    first = train_bpe(_corpus(), vocab_size=300)
    second = train_bpe(iter(_corpus()), vocab_size=300)
    assert first.tokenizer.to_str() == second.tokenizer.to_str()
    assert first.eos_id == 0 and 256 < first.vocab_size <= 300
    for text in (TEXT, UNICODE, ""):
        assert first.decode(first.encode(text)) == text
    # Text that spells the special token is text: only the data pipeline places EOS.
    assert first.eos_id not in first.encode("<|endoftext|>")
    assert len(first.encode("the cat sat")) < len("the cat sat")  # merges were learned
    first.save(tmp_path / "bpe.json")
    loaded = load_tokenizer(str(tmp_path / "bpe.json"))
    assert isinstance(loaded, HFTokenizer) and loaded.encode(UNICODE) == first.encode(UNICODE)
    # A plain tokenizers-library file (as an HF model ships it) loads too.
    (tmp_path / "plain.json").write_text(first.tokenizer.to_str())
    plain = load_tokenizer(tmp_path / "plain.json")
    assert plain.encode(UNICODE) == first.encode(UNICODE) and plain.eos_id == first.eos_id
    with pytest.raises(ValueError, match="vocab_size=100 must be at least 257"):
        train_bpe(_corpus(), vocab_size=100)


def test_tiktoken_encoding_from_a_local_file_round_trips(tmp_path):
    pytest.importorskip("tiktoken")
    path = tmp_path / "tiny.tiktoken"
    _tiny_tiktoken_file(path)
    tok = load_tokenizer(path)
    assert isinstance(tok, TiktokenTokenizer)
    assert tok.vocab_size == 264 and tok.eos_id == 263
    for text in (TEXT, UNICODE):
        assert tok.decode(tok.encode(text)) == text
    assert tok.encode(" the cat") == [259, 262]
    assert tok.eos_id not in tok.encode("<|endoftext|>")
    # The saved form holds the whole vocabulary: it loads without the file.
    data = json.loads(json.dumps(tok.to_dict()))
    path.unlink()
    again = tokenizer_from_dict(data)
    assert again.encode(UNICODE) == tok.encode(UNICODE) and again.eos_id == tok.eos_id
    with pytest.raises(FileNotFoundError, match="missing.tiktoken"):
        load_tokenizer(f"tiktoken:{tmp_path / 'missing.tiktoken'}")


def test_named_tiktoken_encoding_says_it_needs_a_download(tmp_path, monkeypatch):
    pytest.importorskip("tiktoken")
    import tiktoken.load
    import tiktoken.registry

    monkeypatch.setenv("TIKTOKEN_CACHE_DIR", str(tmp_path))  # an empty cache
    monkeypatch.setattr(tiktoken.registry, "ENCODINGS", {})

    def offline(url):
        raise ConnectionError(f"no network for {url}")

    monkeypatch.setattr(tiktoken.load, "read_file", offline)
    with pytest.raises(ValueError, match="'gpt2' needs a download.*bundles no encoding files"):
        load_tokenizer("gpt2")
    with pytest.raises(ValueError, match="unknown tiktoken encoding 'nope'"):
        load_tokenizer("tiktoken:nope")


def test_unknown_tokenizer_spec_lists_the_forms(tmp_path):
    with pytest.raises(ValueError, match="unknown tokenizer 'bpe-please'.*'char'"):
        load_tokenizer("bpe-please")
    with pytest.raises(FileNotFoundError):
        load_tokenizer(tmp_path / "none.json")
    (tmp_path / "bad.json").write_text(json.dumps({"type": "sentencepiece"}))
    with pytest.raises(ValueError, match="unknown tokenizer type 'sentencepiece'"):
        load_tokenizer(tmp_path / "bad.json")

"""Tokenizers: one small protocol over the character tokenizer, tiktoken encodings and HF ``tokenizers`` files.

Every tokenizer has

- ``encode(text) -> list[int]`` and ``decode(ids) -> str`` (``decode(encode(text)) == text`` for the
  text it covers; ``encode`` never produces a special token, however the text spells it);
- ``vocab_size`` (ids are ``0 .. vocab_size - 1``), ``eos_id`` (the end-of-document token that
  separates documents in a prepared corpus, or None) and ``unk_id`` (or None);
- ``to_dict()`` / ``save(path)``: a JSON description that holds the whole vocabulary, so a
  checkpoint's ``tokenizer.json`` decodes without the original file or a download.

``load_tokenizer(spec)`` builds one from what a user types (``char``, ``gpt2``, ``tiktoken:cl100k_base``,
a ``.tiktoken`` file, a ``tokenizer.json`` file) and ``tokenizer_from_dict`` from a saved description.
``train_bpe`` trains a byte-level BPE on the user's text with the ``tokenizers`` library.

The ``tokenizers`` and ``tiktoken`` packages are the optional extra ``data``; they are imported only
when a tokenizer needs them. tiktoken ships no encoding files: its named encodings are downloaded
once from the address tiktoken knows and cached (``TIKTOKEN_CACHE_DIR``); without network, give a
local ``.tiktoken`` file instead.
"""

from __future__ import annotations

import base64
import json
import os
from collections.abc import Iterable
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

from seqblocks.tasks.chars import CharTokenizer

__all__ = ["Tokenizer", "CharTokenizer", "TiktokenTokenizer", "HFTokenizer", "MissingExtraError", "load_tokenizer",
           "tokenizer_from_dict", "train_bpe", "TIKTOKEN_NAMES", "EOS_TOKEN"]

EOS_TOKEN = "<|endoftext|>"
# The encodings tiktoken knows by name (all downloaded on first use; none is bundled with the package).
TIKTOKEN_NAMES = ("gpt2", "r50k_base", "p50k_base", "p50k_edit", "cl100k_base", "o200k_base", "o200k_harmony")
# The split pattern of a local ``.tiktoken`` file when none is given: contractions, letters, digits,
# other symbols, each with an optional leading space, then runs of whitespace.
DEFAULT_PATTERN = r"""'(?:[sdmt]|ll|ve|re)| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""


class MissingExtraError(ImportError):
    """An optional package is missing; the message names the extra that installs it."""


def missing_extra(module: str, extra: str = "data") -> MissingExtraError:
    """The error for a missing optional package: it names the extra that installs it."""
    return MissingExtraError(f"this needs the {module!r} package: pip install 'seqblocks[{extra}]' "
                             f"(or pip install {module})")


@runtime_checkable
class Tokenizer(Protocol):
    """What the trainer, ``prepare`` and ``generate`` need of a tokenizer."""

    @property
    def vocab_size(self) -> int: ...

    eos_id: int | None
    unk_id: int | None

    def encode(self, text: str) -> list[int]: ...

    def decode(self, ids: list[int]) -> str: ...

    def to_dict(self) -> dict[str, Any]: ...

    def save(self, path: str | os.PathLike) -> None: ...


class TiktokenTokenizer:
    """A tiktoken encoding.

    Args:
        encoding (tiktoken.Encoding): the encoding.
        eos (str | None): the special token that ends a document. Default: "<|endoftext|>" when the
            encoding has it, else None.
    """

    unk_id = None

    def __init__(self, encoding, eos: str | None = EOS_TOKEN) -> None:
        self.encoding = encoding
        specials = encoding._special_tokens
        if eos is not None and eos not in specials:
            if eos != EOS_TOKEN:
                raise ValueError(f"tiktoken encoding {encoding.name!r} has no special token {eos!r}; it has "
                                 f"{sorted(specials)}")
            eos = None
        self.eos = eos
        self.eos_id = specials[eos] if eos is not None else None

    @classmethod
    def from_name(cls, name: str) -> TiktokenTokenizer:
        """A named encoding (``gpt2``, ``cl100k_base``, ...): read from tiktoken's cache, else downloaded once.

        Raises:
            ValueError: an unknown name, or the encoding is not cached and cannot be downloaded; the
                message says how to get it.
        """
        try:
            import tiktoken
        except ImportError:
            raise missing_extra("tiktoken") from None
        known = tiktoken.list_encoding_names()
        if name not in known:
            raise ValueError(f"unknown tiktoken encoding {name!r}; known: {sorted(known)} (or a local .tiktoken file)")
        try:
            return cls(tiktoken.get_encoding(name))
        except Exception as err:  # requests' connection errors, OSError, a hash mismatch: one clear line
            cache = os.environ.get("TIKTOKEN_CACHE_DIR") or os.environ.get("DATA_GYM_CACHE_DIR") or \
                os.path.join(__import__("tempfile").gettempdir(), "data-gym-cache")
            raise ValueError(
                f"tiktoken encoding {name!r} needs a download: the tiktoken package bundles no encoding files, "
                f"it fetches them once and caches them in {cache} (TIKTOKEN_CACHE_DIR), and the fetch failed "
                f"({type(err).__name__}: {err}). Run once where there is network, copy that cache, or give a "
                f"local .tiktoken file") from None

    @classmethod
    def from_file(cls, path: str | os.PathLike, pat_str: str = DEFAULT_PATTERN, eos: str | None = EOS_TOKEN,
                  name: str | None = None) -> TiktokenTokenizer:
        """An encoding from a local ``.tiktoken`` file (one ``base64(token) rank`` per line).

        Args:
            path (str | PathLike): the file.
            pat_str (str): the pre-tokenizing regular expression. Default: a GPT-2-style pattern.
            eos (str | None): the end-of-document token, added after the ranks. Default: "<|endoftext|>".
            name (str | None): the encoding's name. Default: the file's stem.
        """
        try:
            import tiktoken
        except ImportError:
            raise missing_extra("tiktoken") from None
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"tiktoken file {str(path)!r} does not exist")
        ranks = _parse_ranks(path.read_text(), str(path))
        specials = {eos: max(ranks.values()) + 1} if eos is not None else {}
        encoding = tiktoken.Encoding(name or path.stem, pat_str=pat_str, mergeable_ranks=ranks,
                                     special_tokens=specials)
        return cls(encoding, eos)

    @property
    def vocab_size(self) -> int:
        return self.encoding.n_vocab

    def encode(self, text: str) -> list[int]:
        return self.encoding.encode_ordinary(text)

    def decode(self, ids: list[int]) -> str:
        if not isinstance(ids, list):
            ids = ids.tolist()
        return self.encoding.decode(ids, errors="replace")

    def to_dict(self) -> dict[str, Any]:
        ranks = "".join(f"{base64.b64encode(token).decode()} {rank}\n"
                        for token, rank in sorted(self.encoding._mergeable_ranks.items(), key=lambda kv: kv[1]))
        return {"type": "tiktoken", "name": self.encoding.name, "pat_str": self.encoding._pat_str, "ranks": ranks,
                "special_tokens": dict(self.encoding._special_tokens), "eos": self.eos}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TiktokenTokenizer:
        try:
            import tiktoken
        except ImportError:
            raise missing_extra("tiktoken") from None
        encoding = tiktoken.Encoding(data["name"], pat_str=data["pat_str"],
                                     mergeable_ranks=_parse_ranks(data["ranks"], "tokenizer.json"),
                                     special_tokens=data["special_tokens"])
        return cls(encoding, data.get("eos"))

    def save(self, path: str | os.PathLike) -> None:
        Path(path).write_text(json.dumps(self.to_dict()))


def _parse_ranks(text: str, where: str) -> dict[bytes, int]:
    ranks = {}
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        token, _, rank = line.partition(" ")
        try:
            ranks[base64.b64decode(token, validate=True)] = int(rank)
        except ValueError:
            raise ValueError(f"{where}:{number}: expected 'BASE64TOKEN RANK', got {line[:60]!r}") from None
    if not ranks:
        raise ValueError(f"{where} holds no tokens")
    return ranks


class HFTokenizer:
    """A tokenizer of the HF ``tokenizers`` library (any ``tokenizer.json``).

    Args:
        tokenizer (tokenizers.Tokenizer): the tokenizer.
        eos (str | None): the token that ends a document. Default: None: the first of
            "<|endoftext|>", "</s>", "<eos>", "<|end_of_text|>" the vocabulary has, else none.
    """

    _EOS_CANDIDATES = (EOS_TOKEN, "</s>", "<eos>", "<|end_of_text|>")

    def __init__(self, tokenizer, eos: str | None = None) -> None:
        self.tokenizer = tokenizer
        # Text that spells a special token is encoded as text: only the data pipeline places EOS.
        tokenizer.encode_special_tokens = True
        vocab = tokenizer.get_vocab(with_added_tokens=True)
        if eos is None:
            eos = next((t for t in self._EOS_CANDIDATES if t in vocab), None)
        elif eos not in vocab:
            raise ValueError(f"tokenizer has no token {eos!r} to end documents with")
        self.eos = eos
        self.eos_id = vocab[eos] if eos is not None else None
        unk = getattr(tokenizer.model, "unk_token", None)
        self.unk_id = vocab.get(unk) if unk else None

    @classmethod
    def from_file(cls, path: str | os.PathLike, eos: str | None = None) -> HFTokenizer:
        try:
            import tokenizers
        except ImportError:
            raise missing_extra("tokenizers") from None
        return cls(tokenizers.Tokenizer.from_file(str(path)), eos)

    @property
    def vocab_size(self) -> int:
        return self.tokenizer.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str) -> list[int]:
        return self.tokenizer.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        """``encode`` of each text, in parallel threads of the ``tokenizers`` library."""
        return [e.ids for e in self.tokenizer.encode_batch(texts, add_special_tokens=False)]

    def decode(self, ids: list[int]) -> str:
        if not isinstance(ids, list):
            ids = ids.tolist()
        return self.tokenizer.decode(ids, skip_special_tokens=False)

    def to_dict(self) -> dict[str, Any]:
        return {"type": "hf", "tokenizer": json.loads(self.tokenizer.to_str()), "eos": self.eos}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> HFTokenizer:
        try:
            import tokenizers
        except ImportError:
            raise missing_extra("tokenizers") from None
        return cls(tokenizers.Tokenizer.from_str(json.dumps(data["tokenizer"])), data.get("eos"))

    def save(self, path: str | os.PathLike) -> None:
        Path(path).write_text(json.dumps(self.to_dict()))


def tokenizer_from_dict(data: dict[str, Any]) -> Tokenizer:
    """The tokenizer a ``to_dict()`` describes (or a plain HF ``tokenizer.json``'s content).

    Raises:
        ValueError: the description is none of these.
    """
    if not isinstance(data, dict):
        raise ValueError(f"a tokenizer description is a JSON object, got {type(data).__name__}")
    kind = data.get("type")
    if kind == "char":
        return CharTokenizer.from_dict(data)
    if kind == "tiktoken":
        return TiktokenTokenizer.from_dict(data)
    if kind == "hf":
        return HFTokenizer.from_dict(data)
    if "model" in data and "version" in data:  # a tokenizer.json of the tokenizers library itself
        return HFTokenizer.from_dict({"tokenizer": data})
    raise ValueError(f"unknown tokenizer type {kind!r}; expected 'char', 'tiktoken', 'hf' or a tokenizers-library "
                     f"tokenizer.json")


def load_tokenizer(spec: str | os.PathLike | Tokenizer) -> Tokenizer:
    """A tokenizer from what a user names.

    Args:
        spec: one of

            - ``"char"``: the character tokenizer (ASCII, an unknown token and an end-of-document token);
            - a tiktoken encoding: ``"gpt2"``, ``"cl100k_base"``, ... or ``"tiktoken:NAME"`` (downloaded
              once, see ``TiktokenTokenizer.from_name``);
            - a ``.tiktoken`` file, or ``"tiktoken:PATH"``;
            - a ``.json`` file: a tokenizers-library ``tokenizer.json`` (from ``seqblocks tokenizer
              train`` or any HF model) or a checkpoint's saved tokenizer;
            - a tokenizer object, returned as it is.

    Raises:
        ValueError: a spec that is none of these (the message lists them).
        FileNotFoundError: a path that does not exist.
    """
    if not isinstance(spec, str | os.PathLike):
        if isinstance(spec, Tokenizer):
            return spec
        raise TypeError(f"tokenizer must be a name, a path or a tokenizer, got {type(spec).__name__}")
    text = os.fspath(spec)
    if text == "char":
        return CharTokenizer(eos=True)
    name = text.removeprefix("tiktoken:")
    if text.startswith("tiktoken:") or name in TIKTOKEN_NAMES:
        if name.endswith(".tiktoken") or os.sep in name:
            return TiktokenTokenizer.from_file(name)
        return TiktokenTokenizer.from_name(name)
    path = Path(text)
    if path.suffix == ".tiktoken":
        return TiktokenTokenizer.from_file(path)
    if path.suffix == ".json" or path.is_file():
        if not path.is_file():
            raise FileNotFoundError(f"tokenizer file {text!r} does not exist")
        try:
            data = json.loads(path.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            raise ValueError(f"tokenizer file {text!r} is not JSON: {err}") from None
        return tokenizer_from_dict(data)
    raise ValueError(f"unknown tokenizer {text!r}; give 'char', a tiktoken encoding ({', '.join(TIKTOKEN_NAMES)}, "
                     f"or tiktoken:NAME), a .tiktoken file, or a tokenizer .json file")


def train_bpe(texts: Iterable[str], vocab_size: int, *, min_frequency: int = 2,
              special_tokens: tuple[str, ...] = (EOS_TOKEN,)) -> HFTokenizer:
    """Train a byte-level BPE tokenizer on ``texts`` with the ``tokenizers`` library.

    Byte-level: every string encodes (no unknown token) and decodes back to itself. The first
    special token ends documents. The same texts in the same order give the same tokenizer.

    Args:
        texts (Iterable[str]): the training documents (an iterator is read once).
        vocab_size (int): the vocabulary size, 256 byte tokens and the special tokens included.
        min_frequency (int): merges of pairs seen fewer times are not learned. Default: 2.
        special_tokens (tuple[str, ...]): added first, so they get ids 0, 1, ... Default: ("<|endoftext|>",).

    Raises:
        ValueError: ``vocab_size`` too small for the byte alphabet and the special tokens.
    """
    try:
        import tokenizers
    except ImportError:
        raise missing_extra("tokenizers") from None
    if vocab_size < 256 + len(special_tokens):
        raise ValueError(f"vocab_size={vocab_size} must be at least {256 + len(special_tokens)} (the 256 byte tokens "
                         f"and {len(special_tokens)} special token(s))")
    if min_frequency < 1:
        raise ValueError(f"min_frequency={min_frequency} must be at least 1")
    from tokenizers import decoders, models, pre_tokenizers, trainers

    tokenizer = tokenizers.Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, min_frequency=min_frequency,
                                  special_tokens=list(special_tokens), show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tokenizer.train_from_iterator(texts, trainer=trainer)
    return HFTokenizer(tokenizer, special_tokens[0] if special_tokens else None)

"""Text a user reads (help, messages, `seqblocks list`, docstrings, model cards) says what a thing is,
not which project it came from: no internal code names and no names of the systems we compared with
(docs/ keeps those where it compares)."""

from __future__ import annotations

import ast
import json
import re
from pathlib import Path

from seqblocks.cli import build_parser, main

PACKAGE = Path(__file__).resolve().parents[1] / "seqblocks"
NAMES = re.compile(r"seed[ -]?0\d\d|\blrnnx\b|\blmxlab\b|\battnax\b", re.IGNORECASE)


def test_no_string_in_the_package_names_them():
    """Every string literal: docstrings, help texts, error messages, registry descriptions."""
    found = []
    for path in sorted(PACKAGE.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Constant) and isinstance(node.value, str) and NAMES.search(node.value):
                found.append(f"{path.relative_to(PACKAGE.parent)}:{node.lineno}: {NAMES.search(node.value).group()}")
    assert not found, found


def test_help_and_listings_name_none_of_them(capsys):
    parser = build_parser()
    texts = [parser.format_help()]
    for action in parser._subparsers._group_actions:  # every subcommand's --help
        texts += [sub.format_help() for sub in action.choices.values()]
    assert main(["list", "--json"]) == 0
    texts.append(capsys.readouterr().out)
    assert json.loads(texts[-1])["mixers"]["attn"].startswith("alias of 'mha': multi-head attention")
    assert not [t for t in texts if NAMES.search(t)]

"""The test corpus (tests/fixtures/conversations.jsonl) is what its script writes, and holds
every kind of conversation the tests rely on, spread through the file."""

from __future__ import annotations

from collections import Counter

from tests.fixtures.make_corpus import CORPUS, corpus_text
from tests.support import FIXTURE_CORPUS, corpus


def test_the_corpus_file_is_what_make_corpus_writes() -> None:
    assert FIXTURE_CORPUS == CORPUS
    assert CORPUS.read_text(encoding="utf-8") == corpus_text(), "run: python -m tests.fixtures.make_corpus"


def test_every_kind_of_conversation_is_there_early_and_often() -> None:
    rows = [row for row in corpus() if row["id"].startswith("t")]  # this repository's own rows
    first = Counter(tag for row in rows[:80] for tag in row["tags"])  # the protocol tests take the first 80
    every = Counter(tag for row in rows for tag in row["tags"])
    kinds = ("images", "tools", "tool_calls", "reasoning", "long", "system", "unicode", "whitespace", "traps")
    assert all(first[kind] >= 5 for kind in kinds), first
    assert every["images"] >= 30, every  # the VLM parity tests count media samples
    formats = Counter(
        part["image_url"]["url"].split(";")[0]
        for row in rows
        for message in row["messages"]
        if isinstance(message["content"], list)
        for part in message["content"]
        if part["type"] == "image_url"
    )
    assert formats["data:image/png"] >= 20 and formats["data:image/jpeg"] >= 20, formats
    assert len({row["id"] for row in corpus()}) == len(corpus()), "ids are unique across corpora"

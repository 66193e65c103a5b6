"""Measuring tokenizers on a profile's held-out documents (``ramgpt tokenizer stats``, #16)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from ramgpt.cli import app
from ramgpt.config import load_profile
from ramgpt.data import documents
from ramgpt.tokenizer import EOS_TOKEN, TextTokenizer, load_tokenizer
from ramgpt.tokenizer_stats import measure, profile_stats


@pytest.fixture(scope="module")
def embedded() -> TextTokenizer:
    return load_tokenizer("embedded")


def _word_level(vocab: list[str]) -> TextTokenizer:
    """A whitespace word-level tokenizer with an unknown token: not byte-level, can fail to encode."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    ids = {w: i for i, w in enumerate([EOS_TOKEN, "[UNK]", *vocab])}
    backend = Tokenizer(models.WordLevel(ids, unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return TextTokenizer(backend, 0, "words")


def test_counts_match_a_hand_count(embedded: TextTokenizer) -> None:
    texts = ["今日はいい天気です。", "Hello world", "東京"]
    s = measure(embedded, texts)
    tokens = sum(len(embedded.encode(t)) for t in texts)
    assert (s.documents, s.characters, s.tokens) == (3, sum(map(len, texts)), tokens)
    assert s.bytes == sum(len(t.encode()) for t in texts)
    assert s.chars_per_token == pytest.approx(s.characters / tokens)
    assert s.tokens_per_document == pytest.approx(tokens / 3)
    assert s.unknown_tokens == 0 and s.byte_fallback_tokens == 0


def test_characters_spelled_in_bytes_count_as_byte_fallback(embedded: TextTokenizer) -> None:
    sushi = "🍣"  # not in the embedded corpus: its 4 bytes do not form one learned token
    ids = embedded.encode(sushi)
    assert len(ids) > 1
    s = measure(embedded, [sushi, "abc"])
    assert s.byte_fallback_tokens == len(ids)
    assert s.byte_fallback_rate == pytest.approx(len(ids) / s.tokens)


def test_unknown_and_sentencepiece_byte_tokens_are_counted() -> None:
    tok = _word_level(["a", "b", "<0xE3>"])
    s = measure(tok, ["a b zzz", "<0xE3> qq a"])
    assert s.tokens == 6
    assert s.unknown_tokens == 2 and s.unknown_rate == pytest.approx(2 / 6)
    assert s.byte_fallback_tokens == 1


def test_profile_stats_measure_the_held_out_documents(embedded: TextTokenizer, tmp_path: Path) -> None:
    prof = load_profile("micro-test", [], use_env=False)
    held_out = list(documents(prof.data, "eval"))
    assert len(held_out) == prof.data.max_eval_samples
    rows = profile_stats(prof)
    assert [r.tokenizer for r in rows] == ["embedded"]
    assert rows[0] == measure(embedded, held_out)
    capped = profile_stats(prof, ["embedded", "embedded"], max_docs=5)
    assert [r.documents for r in capped] == [5, 5] and capped[0] == measure(embedded, held_out[:5])


def test_cli_tokenizer_stats_compares_tokenizers(tmp_path: Path) -> None:
    from ramgpt.tokenizer_train import train_profile_tokenizer

    mine = tmp_path / "mine"
    train_profile_tokenizer(load_profile("micro-test", [], use_env=False), mine, vocab_size=1000, samples=200)
    res = CliRunner().invoke(app, ["tokenizer", "stats", "--tokenizer", "embedded", "--tokenizer", str(mine), "--json"])
    assert res.exit_code == 0, res.output
    rows = json.loads(res.output)
    assert [r["tokenizer"] for r in rows] == ["embedded", str(mine)]
    assert all(r["documents"] == 24 and r["chars_per_token"] > 1.0 for r in rows)
    table = CliRunner().invoke(app, ["tokenizer", "stats", "--docs", "3"])
    assert table.exit_code == 0, table.output
    assert "chars/token" in table.output and "embedded" in table.output and "3 held-out documents" in table.output


def test_cli_tokenizer_stats_unknown_tokenizer_is_one_line(tmp_path: Path) -> None:
    res = CliRunner().invoke(app, ["tokenizer", "stats", "--tokenizer", str(tmp_path / "nope")])
    assert res.exit_code == 3
    assert "does not exist" in res.output and "Traceback" not in res.output

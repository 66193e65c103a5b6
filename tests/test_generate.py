"""Generation: sampling functions, the valid-UTF-8 mask, KV cache vs full recompute, UTF-8
streaming for Japanese, stop strings, the interactive loop, device choice, and the CLI."""

from __future__ import annotations

import io
import math
import sys
import types
from collections.abc import Sequence
from pathlib import Path

import pytest
import torch

from ramgpt.config import ModelConfig
from ramgpt.errors import ConfigError, RamgptError
from ramgpt.generate import (
    GenerateOptions,
    PromptTooLongError,
    StopStringFilter,
    Utf8Streamer,
    apply_repetition_penalty,
    choose_device,
    generate_text,
    generate_tokens,
    inference_memory_bytes,
    interactive_loop,
    mask_invalid_utf8,
    sample_next,
    stream_text,
    top_k_filter,
    top_p_filter,
    utf8_table_for,
    utf8_token_table,
    valid_utf8_mask,
)
from ramgpt.model import GPT, count_parameters_by_component
from ramgpt.probe import Gpu, Machine

JA = "こんにちは、世界！日本語の文章です。🎌テスト"
GREEDY = GenerateOptions(temperature=0.0, repetition_penalty=1.0, top_k=None, top_p=None, max_new_tokens=8)


# -- fakes ----------------------------------------------------------------------------------------
class ByteTokenizer:
    """Byte-level: id b < 256 is the byte b, 256 is EOS. The smallest tokenizer that cuts
    Japanese characters into pieces (3 tokens each)."""

    eos_id = 256
    vocab_size = 257
    name = "bytes"

    def __init__(self) -> None:
        self.encoded: list[str] = []

    def encode(self, text: str) -> list[int]:
        self.encoded.append(text)
        return list(text.encode("utf-8"))

    def decode(self, ids: Sequence[int]) -> str:
        return self.token_bytes(ids).decode("utf-8", errors="replace")

    def token_bytes(self, ids: Sequence[int]) -> bytes:
        return bytes(i for i in ids if i < 256)


class ChunkTokenizer:
    """Each id is an arbitrary byte chunk (to cut text at chosen byte offsets)."""

    eos_id = None

    def __init__(self, chunks: list[bytes], with_token_bytes: bool = True) -> None:
        self.chunks = chunks
        self.vocab_size = len(chunks)
        if with_token_bytes:
            self.token_bytes = lambda ids: b"".join(self.chunks[i] for i in ids)

    def encode(self, text: str) -> list[int]:  # pragma: no cover - not used
        raise NotImplementedError

    def decode(self, ids: Sequence[int]) -> str:
        return b"".join(self.chunks[i] for i in ids).decode("utf-8", errors="replace")


class _Cfg:
    def __init__(self, block_size: int, vocab_size: int) -> None:
        self.block_size = block_size
        self.vocab_size = vocab_size


class ScriptedModel:
    """Emits a fixed token sequence (one-hot logits), whatever the context. Records its calls."""

    def __init__(self, script: list[int], vocab_size: int = 257, block_size: int = 1024, raise_at: int | None = None):
        self.cfg = _Cfg(block_size, vocab_size)
        self.script = script
        self.emitted = 0
        self.calls: list[tuple[int, int, bool]] = []  # (T, pos_offset, had_cache)
        self.raise_at = raise_at

    def forward_logits(self, idx, kv_caches=None, pos_offset=0):
        self.calls.append((idx.shape[1], pos_offset, kv_caches is not None))
        if self.raise_at is not None and len(self.calls) > self.raise_at:
            raise KeyboardInterrupt
        logits = torch.full((idx.shape[0], self.cfg.vocab_size), -10.0)
        logits[:, self.script[min(self.emitted, len(self.script) - 1)]] = 10.0
        self.emitted += 1
        return logits, ["cache"]


def tiny_gpt(block_size: int = 32, vocab_size: int = 64, seed: int = 0) -> GPT:
    torch.manual_seed(seed)
    m = GPT(ModelConfig(n_layer=2, n_head=2, n_embd=32, block_size=block_size, vocab_size=vocab_size))
    with torch.no_grad():  # larger weights than GPT-2's init so greedy argmax has clear winners
        for p in m.parameters():
            p.normal_(0.0, 0.1)
    return m.eval()


# -- sampling functions ---------------------------------------------------------------------------
def test_repetition_penalty_ctrl_style():
    logits = torch.tensor([2.0, -2.0, 1.0, 0.0, 3.0])
    out = apply_repetition_penalty(logits, [0, 1, 1, 3, 99, -1], 2.0)
    assert out.tolist() == [1.0, -4.0, 1.0, 0.0, 3.0]  # 0 stays 0; ids out of range ignored
    assert logits.tolist() == [2.0, -2.0, 1.0, 0.0, 3.0]  # input untouched
    assert apply_repetition_penalty(logits, [0, 1], 1.0) is logits
    with pytest.raises(ConfigError):
        apply_repetition_penalty(logits, [0], 0.0)


def test_top_k_keeps_exactly_k_even_with_ties():
    logits = torch.tensor([1.0, 3.0, 3.0, 3.0, 0.0, 2.0])
    out = top_k_filter(logits, 2)
    assert int(torch.isfinite(out).sum()) == 2
    assert out[torch.isfinite(out)].tolist() == [3.0, 3.0]
    out4 = top_k_filter(logits, 4)
    assert sorted(torch.nonzero(torch.isfinite(out4)).flatten().tolist()) == [1, 2, 3, 5]
    assert top_k_filter(logits, 6) is logits and top_k_filter(logits, None) is logits


def test_top_p_keeps_minimal_nucleus():
    # probabilities 0.125, 0.5, 0.125, 0.25 (shuffled, so the sort has to be undone)
    logits = torch.log(torch.tensor([0.125, 0.5, 0.125, 0.25]))

    def kept(p):
        return torch.nonzero(torch.isfinite(top_p_filter(logits, p))).flatten().tolist()

    assert kept(0.4) == [1]
    assert kept(0.7) == [1, 3]
    assert len(kept(0.8)) == 3 and {1, 3} <= set(kept(0.8))
    assert kept(0.0) == [1]  # always at least one token
    assert kept(1.0) == [0, 1, 2, 3]
    assert top_p_filter(logits, None) is logits


def test_greedy_is_argmax_and_ignores_filters():
    g = torch.Generator().manual_seed(0)
    for _ in range(20):
        row = torch.randn(50, generator=g)
        assert sample_next(row, 0.0, top_k=5, top_p=0.1) == int(row.argmax())
    assert sample_next(torch.tensor([[0.0, 5.0, 1.0]]), 0.0) == 1  # (1, V) accepted


def test_seeded_sampling_is_reproducible_and_respects_filters():
    row = torch.randn(100, generator=torch.Generator().manual_seed(1))
    draws = [[sample_next(row, 1.0, 10, 0.9, torch.Generator().manual_seed(s)) for s in range(30)] for _ in range(2)]
    assert draws[0] == draws[1]
    g = torch.Generator().manual_seed(3)
    top2 = set(torch.topk(row, 2).indices.tolist())
    assert {sample_next(row, 1.5, 2, None, g) for _ in range(200)} == top2
    assert {sample_next(row, 1.0, 1, None, g) for _ in range(20)} == {int(row.argmax())}
    with pytest.raises(ConfigError):
        sample_next(row, -1.0)


def test_options_validate_early():
    for bad in (
        dict(max_new_tokens=0),
        dict(temperature=-0.1),
        dict(temperature=math.inf),
        dict(top_k=0),
        dict(top_p=1.5),
        dict(repetition_penalty=0.0),
        dict(stop=("",)),
    ):
        with pytest.raises(ConfigError):
            GenerateOptions(**bad)
    assert GenerateOptions(stop=["a"]).stop == ("a",)  # type: ignore[arg-type]


# -- sampling only valid UTF-8 --------------------------------------------------------------------
# a tiny byte-level vocabulary: ids name what the tokens are
TINY = [b"a", b"\xe3", b"\x81", b"\x82", b"\xff", b"\xe3\x81", b"\x81\x82", b"\x82a", b"\xc0\x80", b"\xed\xa0", b""]
A, E3, X81, X82, FF, E3_81, X81_82, X82_A, OVERLONG, SURROGATE, EOS = range(len(TINY))


def _allowed(table, state, **kw) -> set[int]:
    return set(torch.nonzero(valid_utf8_mask(table, state, **kw)).flatten().tolist())


def _kept(logits: torch.Tensor) -> set[int]:
    return set(torch.nonzero(torch.isfinite(logits)).flatten().tolist())


def test_valid_utf8_mask_only_lets_tokens_continue_or_start_a_character():
    t = utf8_token_table(TINY, end_ids=[EOS])
    nothing = t.state_after([])
    # nothing pending: no lone continuation byte, no invalid lead byte (FF, overlong C0, surrogate ED A0)
    assert _allowed(t, nothing) == {A, E3, E3_81, EOS}
    after_e3 = t.state_after([E3])  # E3 needs two continuation bytes
    assert _allowed(t, after_e3) == {X81, X82, X81_82}  # not "a", not a new lead, not EOS
    after_e3_81 = t.state_after([E3, X81])  # one more
    assert _allowed(t, after_e3_81) == {X81, X82, X82_A}  # X81_82 would leave a lone 82
    assert t.state_after([E3, X81, X82]) == nothing == t.state_after([E3_81, X82_A])
    # the same through the logits: the rest become -inf, kept logits keep their values
    logits = torch.arange(len(TINY) + 2, dtype=torch.float32)  # two padded embedding rows
    out = mask_invalid_utf8(logits, t, after_e3)
    assert _kept(out) == {X81, X82, X81_82} and out[X81] == logits[X81]
    assert torch.isfinite(logits).all()  # input untouched
    assert _kept(mask_invalid_utf8(logits, t, nothing)) == {A, E3, E3_81, EOS}  # padded rows masked


def test_valid_utf8_mask_ends_the_reply_on_a_whole_character():
    t = utf8_token_table(TINY, end_ids=[EOS])
    logits = torch.zeros(len(TINY))
    nothing, after_e3 = t.state_after([]), t.state_after([E3])
    # the last token may not open a character; the one before may leave at most one byte pending
    assert _kept(mask_invalid_utf8(logits, t, nothing, remaining=1)) == {A, EOS}
    assert _kept(mask_invalid_utf8(logits, t, nothing, remaining=2)) == {A, E3_81, EOS}
    assert _kept(mask_invalid_utf8(logits, t, nothing, remaining=3)) == {A, E3, E3_81, EOS}
    assert _kept(mask_invalid_utf8(logits, t, after_e3, remaining=1)) == {X81_82}
    # nothing can finish in time: the plain rule still holds (the reply is cut, never invalid)
    t2 = utf8_token_table([b"a", b"\xe3", b"\x81"])
    assert _kept(mask_invalid_utf8(torch.zeros(3), t2, t2.state_after([1]), remaining=1)) == {2}
    # only already -inf logits left under the rule: leave the row alone rather than sample from nothing
    blocked = torch.tensor([0.0, 0.0, float("-inf")])
    assert _kept(mask_invalid_utf8(blocked, t2, t2.state_after([1]))) == {0, 1}


def _valid_prefix(data: bytes) -> bool:
    """Python's own decoder as the reference: valid, or only cut short at the end."""
    try:
        data.decode("utf-8")
    except UnicodeDecodeError as e:
        return e.reason == "unexpected end of data" and e.end == len(data)
    return True


def test_utf8_table_agrees_with_pythons_decoder():
    # every byte alone, and pairs and triples of the bytes at the edges of UTF-8's ranges
    edges = [0x00, 0x41, 0x7F, 0x80, 0x8F, 0x90, 0x9F, 0xA0, 0xBF, 0xC0, 0xC1, 0xC2, 0xDF, 0xE0, 0xE1, 0xEC, 0xED]
    edges += [0xEE, 0xEF, 0xF0, 0xF1, 0xF3, 0xF4, 0xF5, 0xFF]
    tokens = [bytes([i]) for i in range(256)] + [bytes([i, j]) for i in edges for j in edges]
    tokens += [bytes([i, j, k]) for i in edges for j in edges for k in edges]
    t = utf8_token_table(tokens)
    # one pending sequence of every kind, including the four leads with a narrowed second byte
    for pending in (b"", b"\xc3", b"\xe3", b"\xe0", b"\xed", b"\xef\xbf", b"\xf0", b"\xf1", b"\xf4", b"\xf0\x9f\x98"):
        state = t.state_after(tokens.index(bytes([b])) for b in pending)
        ok = valid_utf8_mask(t, state).tolist()
        wrong = [tok for tok, got in zip(tokens, ok, strict=True) if got != _valid_prefix(pending + tok)]
        assert wrong == [], (pending, wrong[:5])


def test_utf8_table_is_built_once_per_byte_level_tokenizer_and_not_for_others():
    tok = ByteTokenizer()
    assert utf8_table_for(tok) is utf8_table_for(tok)
    assert utf8_table_for(tok).vocab_size == 257
    data = JA.encode("utf-8")
    other = ChunkTokenizer([data[:4], data[4:]])
    other.is_byte_level = False  # type: ignore[attr-defined]
    assert utf8_table_for(other) is None
    assert utf8_table_for(ChunkTokenizer([data[:4], data[4:]], with_token_bytes=False)) is None


class RandomLogitsModel:
    """Logits drawn at random each step (a seeded, untrained model at its worst)."""

    def __init__(self, vocab_size: int, seed: int, eos_id: int | None = None) -> None:
        self.cfg = _Cfg(1024, vocab_size)
        self.g = torch.Generator().manual_seed(seed)
        self.eos_id = eos_id

    def forward_logits(self, idx, kv_caches=None, pos_offset=0):
        logits = torch.randn(idx.shape[0], self.cfg.vocab_size, generator=self.g) * 3.0
        if self.eos_id is not None:
            logits[:, self.eos_id] = float("-inf")  # long replies: more chances to go wrong
        return logits, ["cache"]


def test_random_logits_with_the_embedded_tokenizer_never_give_invalid_utf8():
    from ramgpt.tokenizer import load_tokenizer

    tok = load_tokenizer("embedded")
    results = {}
    for valid in (True, False):
        opts = GenerateOptions(temperature=1.0, top_k=None, top_p=None, max_new_tokens=30, valid_utf8=valid)
        replies, invalid = [], 0
        for seed in range(6):
            model = RandomLogitsModel(tok.vocab_size + 64, seed, tok.eos_id)  # padded embedding rows
            utf8 = utf8_table_for(tok) if valid else None
            ids = list(generate_tokens(model, [tok.eos_id], opts, tok.eos_id, vocab_limit=tok.vocab_size, utf8=utf8))
            assert len(ids) == 30
            try:  # strict: the whole reply is valid UTF-8 and ends on a whole character
                tok.token_bytes(ids).decode("utf-8")
            except UnicodeDecodeError:
                invalid += 1
            # the same through stream_text, which builds the table itself from the option
            replies.append(generate_text(RandomLogitsModel(tok.vocab_size + 64, seed, tok.eos_id), tok, "", opts))
        results[valid] = (invalid, sum("\ufffd" in r for r in replies))
    assert results[True] == (0, 0)
    # the same sampling without the mask: stray byte tokens show as U+FFFD
    assert results[False][0] >= 3 and results[False][1] >= 3, results


# -- token generation -----------------------------------------------------------------------------
def _reference_greedy(model: GPT, prompt: list[int], n: int, penalty: float = 1.0) -> list[int]:
    """No cache: recompute the whole (window of the) context every step, same window policy."""
    bs = model.cfg.block_size
    tokens, start, out = list(prompt), 0, []
    for _ in range(n):
        if len(tokens) - start > bs:
            start = len(tokens) - bs // 2
        logits, _ = model.forward_logits(torch.tensor([tokens[start:]]))
        nxt = int(apply_repetition_penalty(logits[0], tokens, penalty).argmax())
        out.append(nxt)
        tokens.append(nxt)
    return out


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_kv_cache_matches_full_recompute_greedy(seed):
    model = tiny_gpt(block_size=32, seed=seed)
    g = torch.Generator().manual_seed(100 + seed)
    prompt = torch.randint(0, 64, (7,), generator=g).tolist()
    # a strong repetition penalty keeps a random model from repeating one token forever, so the
    # comparison covers many different tokens (the reference applies the same penalty)
    opts = GenerateOptions(temperature=0.0, repetition_penalty=3.0, top_k=None, top_p=None, max_new_tokens=20)
    got = list(generate_tokens(model, prompt, opts, eos_id=None))
    assert len(set(got)) >= 10
    assert got == _reference_greedy(model, prompt, 20, penalty=3.0)


def test_kv_cache_logits_match_full_recompute():
    model = tiny_gpt(block_size=32, seed=5)
    ids = torch.randint(0, 64, (1, 12), generator=torch.Generator().manual_seed(9))
    _, caches = model.forward_logits(ids[:, :8])
    for t in range(8, 12):
        step, caches = model.forward_logits(ids[:, t : t + 1], caches, t)
        full, _ = model.forward_logits(ids[:, : t + 1])
        torch.testing.assert_close(step, full, rtol=1e-4, atol=1e-5)


def test_window_slides_when_context_is_full():
    model = tiny_gpt(block_size=16, vocab_size=256, seed=3)
    prompt = torch.randint(0, 256, (10,), generator=torch.Generator().manual_seed(4)).tolist()
    opts = GenerateOptions(temperature=0.0, repetition_penalty=3.0, top_k=None, top_p=None, max_new_tokens=40)
    got = list(generate_tokens(model, prompt, opts, eos_id=None))
    assert len(got) == 40 and len(set(got)) >= 20
    assert got == _reference_greedy(model, prompt, 40, penalty=3.0)

    scripted = ScriptedModel([5], block_size=8)
    list(generate_tokens(scripted, [1] * 8, opts, eos_id=None))  # prompt fills the context
    assert scripted.calls[0] == (8, 0, False)
    assert scripted.calls[1] == (4, 0, False)  # re-prefill of the newest block_size // 2
    assert all(c[0] == 1 or c == (4, 0, False) for c in scripted.calls[1:])
    assert max(c[1] + c[0] for c in scripted.calls) <= 8


def test_eos_and_max_new_tokens_stop_generation():
    model = ScriptedModel([65, 66, 256, 67])
    assert list(generate_tokens(model, [1, 2], GREEDY, eos_id=256)) == [65, 66]
    model = ScriptedModel([65] * 100)
    out = list(generate_tokens(model, [1], GREEDY, eos_id=256))
    assert out == [65] * GREEDY.max_new_tokens
    assert len(model.calls) == GREEDY.max_new_tokens  # no wasted forward after the last token
    assert model.calls[0] == (1, 0, False) and model.calls[1] == (1, 1, True) and model.calls[2] == (1, 2, True)


def test_prompt_too_long_says_the_counts():
    model = ScriptedModel([65], block_size=8)
    with pytest.raises(PromptTooLongError, match="9 tokens.*8 tokens"):
        list(generate_tokens(model, list(range(9)), GREEDY, eos_id=None))
    assert len(list(generate_tokens(model, list(range(8)), GREEDY, eos_id=None))) == GREEDY.max_new_tokens
    with pytest.raises(ConfigError):
        list(generate_tokens(model, [], GREEDY, eos_id=None))


def test_padded_vocab_rows_are_never_sampled():
    model = ScriptedModel([300], vocab_size=320)  # the model "prefers" a padding row
    out = list(generate_tokens(model, [1], GREEDY, eos_id=256, vocab_limit=257))
    assert out and all(t < 257 for t in out)


def test_sampled_generation_is_reproducible_from_seed():
    model = tiny_gpt(seed=7)
    opts = GenerateOptions(temperature=1.0, top_k=20, top_p=0.9, repetition_penalty=1.2, max_new_tokens=15, seed=42)
    a = list(generate_tokens(model, [1, 2, 3], opts, eos_id=None))
    b = list(generate_tokens(model, [1, 2, 3], opts, eos_id=None))
    assert a == b and len(a) == 15


# -- UTF-8 streaming ------------------------------------------------------------------------------
def _stream(tok, ids: list[int], stop: Sequence[str] = ()) -> list[str]:
    s = Utf8Streamer(tok, stop)
    pieces = [s.push(i) for i in ids]
    return [p for p in [*pieces, s.flush()] if p]


@pytest.mark.parametrize("with_token_bytes", [True, False])
def test_japanese_split_at_every_byte_boundary_never_shows_replacement(with_token_bytes):
    data = JA.encode("utf-8")
    for i in range(1, len(data)):
        for j in range(i + 1, len(data), 3 if not with_token_bytes else 1):
            tok = ChunkTokenizer([data[:i], data[i:j], data[j:]], with_token_bytes)
            pieces = _stream(tok, [0, 1, 2])
            assert "".join(pieces) == JA
            assert not any("\ufffd" in p for p in pieces), (i, j, pieces)


def test_non_byte_level_tokenizer_decodes_in_context():
    # token_bytes of such a tokenizer is a per-token decode: the streamer must not trust it
    data = JA.encode("utf-8")
    tok = ChunkTokenizer([data[:4], data[4:8], data[8:]])
    tok.is_byte_level = False  # type: ignore[attr-defined]
    tok.token_bytes = lambda ids: tok.decode(ids).encode("utf-8")
    pieces = _stream(tok, [0, 1, 2])
    assert "".join(pieces) == JA and not any("\ufffd" in p for p in pieces)


@pytest.mark.parametrize("byte_level", [True, False])
def test_flush_returns_everything_held_back(byte_level):
    # issue #17: on the path without token_bytes, flush once dropped what push had held back;
    # both paths must give, pieces + flush, exactly the decoded text of every token pushed
    data = "日本語".encode()
    for cut in range(1, len(data)):  # the reply ends mid character: held back, then flushed as U+FFFD
        tok = ChunkTokenizer([data[:cut], data[cut:-1]])
        tok.is_byte_level = byte_level  # type: ignore[attr-defined]
        want = data[:-1].decode("utf-8", errors="replace")
        assert "".join(_stream(tok, [0, 1])) == want and want.endswith("\ufffd")
    # text held back because it may start a stop string, and was not one
    tok = ChunkTokenizer([data[:4], data[4:]])
    tok.is_byte_level = byte_level  # type: ignore[attr-defined]
    s = Utf8Streamer(tok, stop=["語です"])
    assert s.push(0) + s.push(1) == "日本"
    assert s.flush() == "語" and not s.stopped


def test_one_byte_per_token_streams_whole_characters():
    tok = ByteTokenizer()
    s = Utf8Streamer(tok)
    pieces = [s.push(b) for b in "日本".encode()]
    assert pieces == ["", "", "日", "", "", "本"]
    assert s.flush() == ""


def test_invalid_tail_at_the_very_end_flushes_with_replacement():
    tok = ByteTokenizer()
    pieces = _stream(tok, list("あ".encode()) + list("い".encode())[:2])
    assert pieces == ["あ", "\ufffd"]


# -- stop strings ---------------------------------------------------------------------------------
def test_stop_filter_holds_back_possible_starts():
    f = StopStringFilter(["\nUser:"])
    assert f.push("Hello") == "Hello"
    assert f.push("\nUs") == ""
    assert f.push("er: hi") == ""
    assert f.stopped and f.push("more") == "" and f.flush() == ""

    f = StopStringFilter(["\nUser:"])
    assert f.push("a\nUs") == "a"
    assert f.push("ed") == "\nUsed"
    assert f.push("\n") == ""
    assert f.flush() == "\n" and not f.stopped


def test_stop_filter_earliest_of_several_and_overlaps():
    f = StopStringFilter(["abab", "b!"])
    assert f.push("xaba") == "x"
    assert f.push("b!") == ""  # "abab" starts before "b!" does
    assert f.stopped
    f = StopStringFilter(["END", "。"])
    assert f.push("文です。次") == "文です"


def test_stop_string_split_across_tokens_stops_generation_and_is_not_printed():
    tok = ByteTokenizer()
    reply = "答えは42です。次の質問"
    model = ScriptedModel(list(reply.encode()) + [256])
    opts = GenerateOptions(temperature=0.0, repetition_penalty=1.0, max_new_tokens=200, stop=("。",))
    pieces = list(stream_text(model, tok, "質問:", opts))
    assert "".join(pieces) == "答えは42です"
    assert len(model.calls) == len("答えは42です。".encode())  # generation stopped right there
    assert not any("\ufffd" in p for p in pieces)


def test_prompt_is_used_exactly_as_typed_and_empty_prompt_starts_from_eos():
    tok = ByteTokenizer()
    model = ScriptedModel(list(b"ok") + [256])
    opts = GenerateOptions(temperature=0.0, max_new_tokens=10)
    assert generate_text(model, tok, "  質問\n ", opts) == "ok"
    assert tok.encoded == ["  質問\n "]
    assert model.calls[0] == (len("  質問\n ".encode()), 0, False)
    model = ScriptedModel(list(b"ok") + [256])
    assert generate_text(model, tok, "", opts) == "ok"
    assert model.calls[0] == (1, 0, False)


# -- interactive loop -----------------------------------------------------------------------------
def _echo_reply(prompt: str):
    yield "re:"
    yield prompt.upper()


def test_interactive_loop_reads_piped_prompts_until_eof():
    stdin = io.StringIO("hello\n\nこんにちは\nmulti\\\nline\nlast without newline")
    stdout, stderr = io.StringIO(), io.StringIO()
    n = interactive_loop(_echo_reply, stdin, stdout, stderr, is_tty=False)
    assert n == 4
    assert stdout.getvalue() == "re:HELLO\nre:こんにちは\nre:MULTI\nLINE\nre:LAST WITHOUT NEWLINE\n"
    assert stderr.getvalue() == ""  # no prompt decoration on a pipe


def test_interactive_loop_on_a_tty_prompts_on_stderr():
    stdout, stderr = io.StringIO(), io.StringIO()
    interactive_loop(_echo_reply, io.StringIO("a\nb\\\nc\n"), stdout, stderr, is_tty=True)
    assert stdout.getvalue() == "re:A\nre:B\nC\n"
    assert stderr.getvalue() == "> > . > \n"


def test_ctrl_c_during_a_reply_continues_with_the_next_prompt():
    def reply(prompt: str):
        yield "partial"
        if prompt == "boom":
            raise KeyboardInterrupt
        yield "-done"

    stdout = io.StringIO()
    n = interactive_loop(reply, io.StringIO("boom\nfine\n"), stdout, io.StringIO(), is_tty=False)
    assert n == 2
    assert stdout.getvalue() == "partial\npartial-done\n"


def test_ctrl_c_inside_the_model_during_generation_continues():
    tok = ByteTokenizer()
    opts = GenerateOptions(temperature=0.0, max_new_tokens=10)
    models = iter([ScriptedModel(list(b"abcdef"), raise_at=3), ScriptedModel(list(b"xy") + [256])])

    def reply(prompt: str):
        return stream_text(next(models), tok, prompt, opts)

    stdout = io.StringIO()
    assert interactive_loop(reply, io.StringIO("one\ntwo\n"), stdout, io.StringIO(), is_tty=False) == 2
    assert stdout.getvalue() == "abc\nxy\n"


def test_ctrl_c_at_the_prompt_ends_the_session_cleanly():
    class InterruptingStdin(io.StringIO):
        def readline(self, *a):  # type: ignore[override]
            line = super().readline(*a)
            if line == "":
                raise KeyboardInterrupt
            return line

    stdout, stderr = io.StringIO(), io.StringIO()
    assert interactive_loop(_echo_reply, InterruptingStdin("x\n"), stdout, stderr, is_tty=True) == 1
    assert stdout.getvalue() == "re:X\n" and stderr.getvalue().endswith("\n")


def test_an_error_for_one_prompt_does_not_end_the_session():
    tok = ByteTokenizer()
    model = ScriptedModel(list(b"ok") + [256], block_size=8)
    opts = GenerateOptions(temperature=0.0, max_new_tokens=4)

    def reply(prompt: str):
        model.emitted = 0
        return stream_text(model, tok, prompt, opts)

    stdout, stderr = io.StringIO(), io.StringIO()
    interactive_loop(reply, io.StringIO("this prompt is too long\nhi\n"), stdout, stderr, is_tty=False)
    assert stdout.getvalue() == "\nok\n"
    assert "23 tokens" in stderr.getvalue() and "8 tokens" in stderr.getvalue()


# -- device choice --------------------------------------------------------------------------------
GIB = 2**30
CPU_ONLY = Machine(gpus=())
ONE_GPU = Machine(gpus=(Gpu(0, "card", 8 * GIB, True),))
TWO_GPUS = Machine(gpus=(Gpu(0, "card", 8 * GIB, True), Gpu(1, "card", 8 * GIB, True)))


def test_choose_device_without_cuda():
    assert choose_device("auto", GIB, CPU_ONLY) == choose_device("auto", 99 * GIB, CPU_ONLY)
    where = choose_device("auto", GIB, CPU_ONLY)
    assert (where.device, where.streamed) == ("cpu", False) and "no usable CUDA" in where.reason
    assert choose_device("cpu", GIB, ONE_GPU).device == "cpu"
    # an explicit CUDA device is placement's one-line error naming the option, never a CPU run
    for requested in ("cuda", "cuda:0"):
        with pytest.raises(ConfigError) as ei:
            choose_device(requested, GIB, CPU_ONLY)
        assert "--device" in str(ei.value) and "\n" not in str(ei.value)
    with pytest.raises(ConfigError, match="--device"):
        choose_device("tpu", GIB, ONE_GPU)


def test_choose_device_auto_on_a_gpu_keeps_the_model_resident_only_when_it_fits():
    def where(need_gib, **kw):
        w = choose_device("auto", int(need_gib * GIB), ONE_GPU, **kw)
        return w.device, w.streamed

    assert where(1, free_bytes=2 * GIB) == ("cuda", False)
    assert where(3, free_bytes=2 * GIB) == ("cuda", True)  # streams from CPU RAM
    assert "3.00 GiB" in choose_device("auto", 3 * GIB, ONE_GPU, free_bytes=2 * GIB).reason
    assert where(3, vram_budget_gib=4, free_bytes=0) == ("cuda", False)  # a budget overrides free memory
    assert where(3, vram_budget_gib=2, free_bytes=80 * GIB) == ("cuda", True)
    assert where(9, vram_budget_gib=64) == ("cuda", True)  # the budget is capped at the 8 GiB card
    assert where(7) == ("cuda", False)  # free memory unknown: the card's total


def test_choose_device_explicit_cuda_is_taken_as_asked():
    w = choose_device("cuda:1", 99 * GIB, TWO_GPUS)
    assert (w.device, w.streamed) == ("cuda:1", False)
    with pytest.raises(ConfigError, match="cuda:1"):
        choose_device("cuda:1", GIB, ONE_GPU)


def test_inference_memory_estimate_covers_the_weights():
    cfg = ModelConfig(n_layer=24, n_head=16, n_embd=2048, block_size=1024, vocab_size=50304)
    weights = count_parameters_by_component(cfg)["total"] * 2
    est = inference_memory_bytes(cfg, 2)
    assert weights < est < weights * 1.5
    assert inference_memory_bytes(cfg, 4) > est


def test_errors_are_ramgpt_errors():
    assert issubclass(PromptTooLongError, RamgptError)


# -- end to end through the CLI -------------------------------------------------------------------


class SavableByteTokenizer(ByteTokenizer):
    def save(self, directory) -> None:
        (Path(directory) / "tokenizer.json").write_text("{}", encoding="utf-8")


def _tiny_run(tmp_path: Path, tokenizer=None, vocab_size: int = 320) -> Path:
    from ramgpt.checkpoint import save_checkpoint
    from ramgpt.config import DataConfig, Profile, RuntimeConfig

    profile = Profile(
        model=ModelConfig(n_layer=1, n_head=2, n_embd=32, block_size=64, vocab_size=vocab_size),
        data=DataConfig(seq_len=64, tokenizer="embedded"),
        runtime=RuntimeConfig(device="cpu", precision="fp32"),
    )
    torch.manual_seed(0)
    model = GPT(profile.model)
    run = tmp_path / "run"
    save_checkpoint(run, 3, model.state_dict(), None, {"config": profile.to_public_dict()}, tokenizer)
    return run


@pytest.fixture
def fake_tokenizer_module(monkeypatch):
    """Stand-in ``ramgpt.tokenizer`` recording which spec the lookup chose."""
    specs: list[str] = []
    mod = types.ModuleType("ramgpt.tokenizer")

    def load_tokenizer(spec: str):
        specs.append(spec)
        return ByteTokenizer()

    mod.load_tokenizer = load_tokenizer  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "ramgpt.tokenizer", mod)
    return specs


def _cli(args: list[str], input: str | None = None):
    from typer.testing import CliRunner

    from ramgpt.cli import app

    return CliRunner().invoke(app, ["generate", *args], input=input)


@pytest.mark.slow  # end to end: a checkpoint on disk, whole CLI runs
def test_cli_one_shot_prints_seed_and_reproduces(tmp_path, fake_tokenizer_module):
    run = _tiny_run(tmp_path)
    args = ["-c", str(run), "-p", "こんにちは", "-n", "12", "--device", "cpu"]
    first = _cli(args)
    assert first.exit_code == 0, first.output
    seed_lines = [ln for ln in first.stderr.splitlines() if ln.startswith("seed: ")]
    assert len(seed_lines) == 1
    assert any(ln.startswith("device: cpu") for ln in first.stderr.splitlines())
    again = _cli([*args, "--seed", seed_lines[0].split()[1]])
    assert again.exit_code == 0 and again.stdout == first.stdout and first.stdout.endswith("\n")
    assert fake_tokenizer_module == ["embedded", "embedded"]  # no tokenizer/ dir: the profile's


@pytest.mark.slow  # end to end: a checkpoint on disk, whole CLI runs
def test_cli_tokenizer_lookup_order(tmp_path, fake_tokenizer_module):
    run = _tiny_run(tmp_path, tokenizer=SavableByteTokenizer())
    assert _cli(["-c", str(run), "-p", "a", "-n", "2", "--device", "cpu"]).exit_code == 0
    assert _cli(["-c", str(run), "-p", "a", "-n", "2", "--device", "cpu", "--tokenizer", "mine"]).exit_code == 0
    assert fake_tokenizer_module == [str(run / "step_0000003" / "tokenizer"), "mine"]


@pytest.mark.slow  # end to end: a checkpoint on disk, whole CLI runs
def test_cli_interactive_with_piped_stdin(tmp_path, fake_tokenizer_module):
    run = _tiny_run(tmp_path)
    base = ["-c", str(run), "-n", "4", "--temperature", "0", "--device", "cpu"]
    result = _cli([*base, "-i"], input="一つ目\n\n二つ目\nthree")
    assert result.exit_code == 0, result.output
    # greedy, so each reply equals the one-shot reply to the same prompt (empty line skipped)
    singles = [_cli([*base, "-p", p]).stdout for p in ("一つ目", "二つ目", "three")]
    assert all(s.endswith("\n") and len(s) > 1 for s in singles)
    assert result.stdout == "".join(singles)
    assert "> " not in result.stdout


def test_cli_errors_are_one_line(tmp_path, fake_tokenizer_module):
    run = _tiny_run(tmp_path)
    result = _cli(["-c", str(run), "-p", "x" * 65, "--device", "cpu"])
    assert result.exit_code == 2 and "65 tokens" in result.stderr and "64 tokens" in result.stderr
    assert result.stdout == ""
    result = _cli(["-c", str(tmp_path / "missing"), "-p", "x"])
    assert result.exit_code == 4 and len(result.stderr.strip().splitlines()) == 1
    small = _tiny_run(tmp_path / "small", vocab_size=128)  # the byte tokenizer has 257 tokens
    result = _cli(["-c", str(small), "-p", "x", "--device", "cpu"])
    assert result.exit_code == 2 and "257" in result.stderr


def test_cli_help_names_the_utf8_option():
    from typer.testing import CliRunner

    from ramgpt.cli import app

    result = CliRunner().invoke(app, ["generate", "--help"], env={"COLUMNS": "200", "NO_COLOR": "1"})
    assert result.exit_code == 0
    assert "--no-valid-utf8" in result.stdout and "U+FFFD" in result.stdout


def test_cli_explicit_cuda_without_cuda_is_one_line(tmp_path, fake_tokenizer_module, monkeypatch):
    import ramgpt.probe

    monkeypatch.setattr(ramgpt.probe, "probe_machine", lambda: Machine(gpus=()))
    run = _tiny_run(tmp_path)
    for device in ("cuda", "cuda:0"):
        result = _cli(["-c", str(run), "-p", "x", "--device", device])
        assert result.exit_code == 2, result.output
        assert result.stdout == "" and len(result.stderr.strip().splitlines()) == 1
        assert "--device" in result.stderr and "no usable CUDA GPU" in result.stderr
    result = _cli(["-c", str(run), "-p", "x", "-n", "2"])  # auto falls back to the CPU and says why
    assert result.exit_code == 0 and "device: cpu (float32; no usable CUDA GPU)" in result.stderr


@pytest.mark.slow  # end to end: a checkpoint on disk, whole CLI runs
def test_cli_valid_utf8_is_on_by_default_and_can_be_turned_off(tmp_path):
    from ramgpt.tokenizer import load_tokenizer

    tok = load_tokenizer("embedded")
    run = _tiny_run(tmp_path, tokenizer=tok, vocab_size=tok.vocab_size + 64)  # an untrained model
    base = ["-c", str(run), "-n", "40", "--device", "cpu", "-t", "1", "--top-k", "100000", "--top-p", "1"]
    base += ["--repetition-penalty", "1"]
    replies = {
        flag: [_cli([*base, "-p", "日本", "--seed", str(seed), *flag]) for seed in range(4)]
        for flag in ((), ("--valid-utf8",), ("--no-valid-utf8",))
    }
    assert all(r.exit_code == 0 for rs in replies.values() for r in rs)
    for flag in ((), ("--valid-utf8",)):
        assert not any("\ufffd" in r.stdout for r in replies[flag])
    assert sum("\ufffd" in r.stdout for r in replies[("--no-valid-utf8",)]) >= 2


def test_real_embedded_tokenizer_streams_japanese_whole():
    from ramgpt.tokenizer import load_tokenizer

    tok = load_tokenizer("embedded")
    text = JA + " and English, 改行\nも。"
    pieces = _stream(tok, tok.encode(text))
    assert "".join(pieces) == text and not any("\ufffd" in p for p in pieces)
    # the worst case: the model emits the text one byte token at a time
    byte_id = {}
    for i in range(tok.vocab_size):
        b = tok.token_bytes([i])
        if len(b) == 1:
            byte_id.setdefault(b[0], i)
    pieces = _stream(tok, [byte_id[b] for b in text.encode("utf-8")])
    assert "".join(pieces) == text and not any("\ufffd" in p for p in pieces)


@pytest.mark.slow  # end to end: a checkpoint on disk, whole CLI runs
def test_cli_with_the_real_embedded_tokenizer(tmp_path):
    from ramgpt.tokenizer import load_tokenizer

    tok = load_tokenizer("embedded")
    run = _tiny_run(tmp_path, tokenizer=tok, vocab_size=tok.vocab_size + 64)  # padded embedding
    base = ["-c", str(run), "-n", "20", "--seed", "7", "--device", "cpu"]
    one = _cli([*base, "-p", "日本語の"])
    assert one.exit_code == 0, one.output
    assert "seed: 7" in one.stderr.splitlines()
    assert one.stdout.endswith("\n") and len(one.stdout) > 1
    inter = _cli([*base, "-i", "--temperature", "0"], input="日本語の\nこんにちは\n")
    assert inter.exit_code == 0, inter.output
    assert inter.stdout.count("\n") >= 2


class _OomModel:
    """Stands in for the streamed model: ramtorch's loader thread fails with a CUDA OOM and the
    forward re-raises it as a RuntimeError caused by it."""

    def __init__(self, cfg, streamed: bool):
        self.cfg = cfg
        if streamed:
            self.om = object()

    def forward_logits(self, idx, kv_caches=None, pos_offset=0):
        try:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 74.00 MiB.")
        except torch.OutOfMemoryError as e:
            raise RuntimeError("offload worker thread failed") from e


@pytest.mark.parametrize("streamed", [True, False])
def test_oom_inside_the_streaming_worker_is_one_line_advice(streamed):
    from ramgpt.errors import OutOfMemoryError
    from ramgpt.generate import _forward

    cfg = ModelConfig(n_layer=1, n_head=1, n_embd=8, block_size=16, vocab_size=32)
    with pytest.raises(OutOfMemoryError) as ei:
        _forward(_OomModel(cfg, streamed), [1, 2, 3], None, 0, "cpu")
    msg = str(ei.value)
    assert "\n" not in msg and "3 tokens of context" in msg
    assert ("--vram-budget-gib" in msg) is streamed


def test_other_errors_are_not_reported_as_oom():
    from ramgpt.generate import _forward

    class Broken:
        cfg = ModelConfig(n_layer=1, n_head=1, n_embd=8, block_size=16, vocab_size=32)

        def forward_logits(self, idx, kv_caches=None, pos_offset=0):
            raise RuntimeError("offload worker thread failed")

    with pytest.raises(RuntimeError, match="offload worker thread failed"):
        _forward(Broken(), [1], None, 0, "cpu")

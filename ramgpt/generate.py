"""Text generation: pure sampling functions, a token generator with a KV cache, streaming
detokenisation that never splits a UTF-8 character (Japanese text is 3 bytes a character, and
byte-level BPE often cuts one across two tokens), stop strings, and ``run_generate`` -- the one
place that prints, because streaming text to stdout is the product of ``ramgpt generate``.

Layers, bottom up (each usable from a notebook on its own):

- ``apply_repetition_penalty``, ``top_k_filter``, ``top_p_filter``, ``sample_next``: pure tensor
  functions on one row of logits ``(V,)``.
- ``utf8_token_table`` / ``utf8_table_for`` and ``mask_invalid_utf8``: for byte-level tokenizers,
  a per-token table of UTF-8 validity (built once per tokenizer) and the per-step mask that keeps
  the reply valid UTF-8 (``GenerateOptions.valid_utf8``, on by default).
- ``generate_tokens(model, prompt_ids, options, eos_id, device)``: yields new token ids. It
  prefills the prompt once, then feeds one token per step with the per-block KV cache.
- ``Utf8Streamer``: token ids in, printable text pieces out (incomplete UTF-8 held back, stop
  strings cut off and never shown).
- ``stream_text`` / ``generate_text``: prompt string in, text pieces / the whole reply out.
- ``interactive_loop``: the ``-i`` read-reply loop over any text streams.
- ``run_generate``: checkpoint, tokenizer and device lookup, seed, then one of the above.

When the context fills up (``block_size`` positions), generation does not stop: the window
slides, keeping the newest ``block_size // 2`` tokens, which are prefilled again as a fresh
context (learned positions cannot go past ``block_size``). Keeping half rather than
``block_size - 1`` means one re-prefill every ``block_size // 2`` new tokens instead of one per
token, which matters when each forward pass streams the weights through a small GPU.
"""

from __future__ import annotations

import codecs
import contextlib
import functools
import math
import secrets
import sys
import weakref
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol, TextIO

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from ramgpt.errors import ConfigError, OutOfMemoryError, RamgptError, is_out_of_memory
from ramgpt.fmt import gib
from ramgpt.probe import Machine

# ----------------------------------------------------------------------------------------------
# options and errors


class PromptTooLongError(ConfigError):
    """The prompt has more tokens than the model has positions."""


@dataclass(frozen=True)
class GenerateOptions:
    """How to sample. Validated at construction so a bad value fails before the model loads."""

    max_new_tokens: int = 128
    temperature: float = 0.8  # 0 = greedy (argmax)
    top_k: int | None = 50  # None = no top-k cut
    top_p: float | None = 0.95  # None or 1.0 = no nucleus cut
    repetition_penalty: float = 1.1  # 1.0 = off; CTRL-style over prompt + generated tokens
    stop: tuple[str, ...] = ()  # generation ends when the reply contains one of these
    seed: int | None = None  # None = drawn at random by run_generate (and printed)
    valid_utf8: bool = True  # byte-level tokenizers: sample only tokens that keep the reply valid UTF-8

    def __post_init__(self) -> None:
        if self.max_new_tokens < 1:
            raise ConfigError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")
        if not (self.temperature >= 0.0 and math.isfinite(self.temperature)):
            raise ConfigError(f"temperature must be a finite number >= 0, got {self.temperature}")
        if self.top_k is not None and self.top_k < 1:
            raise ConfigError(f"top_k must be >= 1, got {self.top_k}")
        if self.top_p is not None and not 0.0 <= self.top_p <= 1.0:
            raise ConfigError(f"top_p must be between 0 and 1, got {self.top_p}")
        if not (self.repetition_penalty > 0.0 and math.isfinite(self.repetition_penalty)):
            raise ConfigError(f"repetition_penalty must be > 0 (1.0 = off), got {self.repetition_penalty}")
        if not isinstance(self.stop, tuple):
            object.__setattr__(self, "stop", tuple(self.stop))
        if any(s == "" for s in self.stop):
            raise ConfigError("a stop string must not be empty")


class TokenizerLike(Protocol):
    """What generation needs from ``ramgpt.tokenizer.TextTokenizer`` (``token_bytes`` optional)."""

    eos_id: int | None
    vocab_size: int

    def encode(self, text: str) -> list[int]: ...

    def decode(self, ids: Sequence[int]) -> str: ...


class LogitsModel(Protocol):
    """What generation needs from a model: ``GPT`` or the engine's streamed stand-in."""

    cfg: Any  # needs .block_size

    def forward_logits(self, idx: torch.Tensor, kv_caches: list | None = None, pos_offset: int = 0) -> tuple: ...


# ----------------------------------------------------------------------------------------------
# pure sampling functions (logits are one row, shape (V,), any float dtype)


def apply_repetition_penalty(logits: torch.Tensor, generated_ids: Iterable[int], penalty: float) -> torch.Tensor:
    """CTRL-style penalty: for every token already seen, divide a positive logit by ``penalty``
    and multiply a negative one, so the token always becomes less likely (a plain division would
    make negative logits *more* likely). Returns a new tensor; ``penalty == 1`` is a no-op."""
    if penalty <= 0:
        raise ConfigError(f"repetition_penalty must be > 0, got {penalty}")
    if penalty == 1.0:
        return logits
    V = logits.shape[-1]
    ids = sorted({int(i) for i in generated_ids if 0 <= int(i) < V})
    if not ids:
        return logits
    idx = torch.tensor(ids, dtype=torch.long, device=logits.device)
    out = logits.clone()
    seen = out[..., idx]
    out[..., idx] = torch.where(seen > 0, seen / penalty, seen * penalty)
    return out


def top_k_filter(logits: torch.Tensor, k: int | None) -> torch.Tensor:
    """Keep exactly the ``k`` largest logits (ties broken by index order of ``torch.topk``), set
    the rest to -inf. A threshold on the k-th value would keep more than k on ties."""
    if k is None or k >= logits.shape[-1]:
        return logits
    if k < 1:
        raise ConfigError(f"top_k must be >= 1, got {k}")
    values, idx = torch.topk(logits, k, dim=-1)
    out = torch.full_like(logits, float("-inf"))
    return out.scatter(-1, idx, values)


def top_p_filter(logits: torch.Tensor, p: float | None) -> torch.Tensor:
    """Nucleus filter: keep the smallest set of most likely tokens whose probability mass reaches
    ``p``; always keep the single most likely one (so ``p == 0`` means greedy)."""
    if p is None or p >= 1.0:
        return logits
    sorted_logits, order = torch.sort(logits, descending=True, dim=-1)
    probs = F.softmax(sorted_logits.float(), dim=-1)
    # mass of the tokens strictly before each one: a token is needed while that is still < p
    mass_before = torch.cumsum(probs, dim=-1) - probs
    drop_sorted = mass_before >= p
    drop_sorted[..., 0] = False
    drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
    return logits.masked_fill(drop, float("-inf"))


def sample_next(
    logits: torch.Tensor,
    temperature: float,
    top_k: int | None = None,
    top_p: float | None = None,
    generator: torch.Generator | None = None,
) -> int:
    """Pick the next token from one row of logits ``(V,)``. ``temperature == 0`` is greedy
    (argmax, top-k/top-p irrelevant). Sampling runs in float32 on the CPU with a CPU generator, so
    a seed gives the same choices for the same logits on any device."""
    if temperature < 0:
        raise ConfigError(f"temperature must be >= 0, got {temperature}")
    row = logits.detach().reshape(-1).float().cpu()  # (V,)
    if row.numel() != logits.shape[-1]:
        raise ValueError(f"sample_next takes one row of logits, got shape {tuple(logits.shape)}")
    if temperature == 0:
        return int(torch.argmax(row))
    row = top_p_filter(top_k_filter(row / temperature, top_k), top_p)
    probs = F.softmax(row, dim=-1)
    return int(torch.multinomial(probs, 1, generator=generator))


# ----------------------------------------------------------------------------------------------
# sampling that only completes valid UTF-8 (byte-level tokenizers)
#
# A byte-level BPE can emit a token holding a lone lead byte (b"\xe3") or a lone continuation
# byte (b"\x81"); sampled in the wrong place, the reply shows U+FFFD (2 of 11 samples in issue
# #10). A validator over the generated bytes knows what the pending, incomplete character still
# needs, and a precomputed table says, for every token and every validator state, whether the
# token's bytes can follow, so each step masks the logits with one row lookup.

# Validator states (RFC 3629): what the pending character still needs. Four lead bytes narrow
# the range of the byte after them: E0 (no overlong forms), ED (no surrogates), F0 (no overlong
# forms), F4 (nothing past U+10FFFF).
_ACCEPT, _NEED1, _NEED2, _E0, _ED, _F0, _NEED3, _F4, _REJECT = range(9)
_UTF8_STATES = 8  # every state but _REJECT
# continuation bytes each state still needs; 4 marks _REJECT (more than any state can need)
_STILL_NEEDED = (0, 1, 2, 2, 2, 3, 3, 3, 4)
_INVALID = _STILL_NEEDED[_REJECT]


@functools.lru_cache(maxsize=1)
def _utf8_transitions() -> torch.Tensor:
    """(9, 256) int64: the validator's next state for (state, byte)."""
    t = torch.full((9, 256), _REJECT, dtype=torch.long)
    t[_ACCEPT, 0x00:0x80] = _ACCEPT
    t[_ACCEPT, 0xC2:0xE0] = _NEED1  # C0 and C1 only start overlong forms: invalid
    t[_ACCEPT, 0xE1:0xF0] = _NEED2
    t[_ACCEPT, 0xE0] = _E0
    t[_ACCEPT, 0xED] = _ED
    t[_ACCEPT, 0xF1:0xF4] = _NEED3
    t[_ACCEPT, 0xF0] = _F0
    t[_ACCEPT, 0xF4] = _F4  # F5..FF never occur in UTF-8
    t[_NEED1, 0x80:0xC0] = _ACCEPT
    t[_NEED2, 0x80:0xC0] = _NEED1
    t[_E0, 0xA0:0xC0] = _NEED1
    t[_ED, 0x80:0xA0] = _NEED1
    t[_NEED3, 0x80:0xC0] = _NEED2
    t[_F0, 0x90:0xC0] = _NEED2
    t[_F4, 0x80:0x90] = _NEED2
    return t


@dataclass(frozen=True)
class Utf8TokenTable:
    """What every token of a byte-level vocabulary does to the UTF-8 validity of a byte stream.

    ``next_state[s, t]``: the validator's state after token ``t``'s bytes, starting in state ``s``
    (``_REJECT`` when they cannot follow), shape (8, V) int8. ``still_needed[s, t]``: continuation
    bytes the stream still needs after that token, 0 = ends on a whole character, 4 = invalid,
    shape (8, V) int8. Build it with :func:`utf8_token_table` or :func:`utf8_table_for`."""

    next_state: torch.Tensor  # (8, V) int8
    still_needed: torch.Tensor  # (8, V) int8

    @property
    def vocab_size(self) -> int:
        return int(self.next_state.shape[1])

    def advance(self, state: int, token_id: int) -> int:
        """The validator's state after ``token_id``. Ids past the table (padded embedding rows) leave
        it unchanged; an invalid token (only possible when nothing valid was left to sample) starts
        afresh, as the streamer's decoder does after writing U+FFFD."""
        if not 0 <= token_id < self.vocab_size:
            return state
        nxt = int(self.next_state[state, token_id])
        return _ACCEPT if nxt == _REJECT else nxt

    def state_after(self, token_ids: Iterable[int], state: int = _ACCEPT) -> int:
        """The state after ``token_ids``, from ``state`` (default: nothing pending)."""
        for t in token_ids:
            state = self.advance(state, int(t))
        return state


def utf8_token_table(token_bytes: Sequence[bytes], end_ids: Iterable[int] = ()) -> Utf8TokenTable:
    """The table for a vocabulary given as one byte string per id (vectorised over the vocabulary:
    one gather per byte position, not one Python step per byte).

    ``end_ids`` (EOS) end the reply: they are allowed only when no character is pending, whatever
    their bytes (the embedded EOS is the text ``<|endoftext|>``, a test fake's may be empty)."""
    V = len(token_bytes)
    # longest first, so the tokens still running at byte position j are the first n_j of them and
    # each step touches only those (work ~ 8 x total bytes, not 8 x V x the longest token)
    all_lengths = torch.tensor([len(b) for b in token_bytes], dtype=torch.long)  # (V,)
    order = torch.argsort(all_lengths, descending=True, stable=True)  # (V,)
    lengths = all_lengths[order]  # (V,) descending
    L = int(lengths[0]) if V else 0
    by_pos = torch.zeros((max(L, 1), V), dtype=torch.uint8)  # (L, V): byte j of each token, in that order
    flat = b"".join(token_bytes[i] for i in order.tolist())
    if flat:
        tok_of_byte = torch.repeat_interleave(torch.arange(V), lengths)
        starts = torch.cumsum(lengths, 0) - lengths
        pos_of_byte = torch.arange(len(flat)) - torch.repeat_interleave(starts, lengths)
        by_pos[pos_of_byte, tok_of_byte] = torch.frombuffer(bytearray(flat), dtype=torch.uint8)
    per_length = torch.bincount(lengths, minlength=L + 1)  # (L + 1,) tokens of each length
    running = per_length.flip(0).cumsum(0).flip(0)[1:].tolist()  # (L,) n_j = tokens longer than j
    trans = _utf8_transitions().reshape(-1)  # (9 * 256,): next state at state * 256 + byte
    sorted_state = torch.arange(_UTF8_STATES).repeat(V, 1)  # (V, 8): a run from every start state
    for j, n in enumerate(running):
        sorted_state[:n] = trans[sorted_state[:n] * 256 + by_pos[j, :n].long().unsqueeze(1)]
    state = torch.empty((_UTF8_STATES, V), dtype=torch.long)  # (8, V) in id order
    state[:, order] = sorted_state.T
    for i in end_ids:
        if 0 <= i < V:
            state[:, i] = _REJECT
            state[_ACCEPT, i] = _ACCEPT
    still_needed = torch.tensor(_STILL_NEEDED, dtype=torch.int8)[state]
    return Utf8TokenTable(next_state=state.to(torch.int8), still_needed=still_needed)


def valid_utf8_mask(table: Utf8TokenTable, state: int, max_still_needed: int = 3) -> torch.Tensor:
    """(V,) bool: the tokens whose bytes keep the stream a valid UTF-8 prefix from ``state`` and
    leave at most ``max_still_needed`` continuation bytes pending (0: the token must end on a
    whole character)."""
    return table.still_needed[state] <= max_still_needed


def mask_invalid_utf8(
    logits: torch.Tensor, table: Utf8TokenTable, state: int, remaining: int | None = None
) -> torch.Tensor:
    """Set to -inf the logits ``(V,)`` of every token that would make the generated bytes invalid
    UTF-8 from ``state``. Returns a new tensor.

    ``remaining`` (tokens left, this one included) also keeps the reply from being cut mid
    character by ``max_new_tokens``: a token may leave at most ``remaining - 1`` bytes pending,
    which single-byte tokens (all 256 are in every byte-level vocabulary) can always finish.
    Where that leaves nothing to sample, the plain rule applies; where even that leaves nothing
    (a vocabulary without single bytes), the logits are returned unchanged. Rows past the table
    (padded embedding) are masked."""
    V = logits.shape[-1]
    need = table.still_needed[state]  # (V_table,)
    if need.numel() < V:
        need = torch.cat([need, need.new_full((V - need.numel(),), _INVALID)])
    need = need[:V].to(logits.device)
    alive = logits > float("-inf")
    limits = [3] if remaining is None else [min(3, max(0, remaining - 1)), 3]
    for limit in limits:
        keep = alive & (need <= limit)
        if bool(keep.any()):
            return logits.masked_fill(~keep, float("-inf"))
    return logits


def _byte_level_token_bytes(tokenizer: object) -> Callable[[list[int]], bytes] | None:
    """``token_bytes`` of a byte-level tokenizer, None for others: ``token_bytes`` of a
    non-byte-level tokenizer is ``decode(ids).encode()``, which one token at a time loses what
    decoding in context gives (byte fallback, leading spaces)."""
    if not getattr(tokenizer, "is_byte_level", True):
        return None
    return getattr(tokenizer, "token_bytes", None)


# tokenizer -> its table; weak keys so a dropped tokenizer takes its table (V x 16 bytes) along
_UTF8_TABLES: weakref.WeakKeyDictionary[Any, Utf8TokenTable] = weakref.WeakKeyDictionary()


def utf8_table_for(tokenizer: TokenizerLike) -> Utf8TokenTable | None:
    """The :class:`Utf8TokenTable` of a byte-level tokenizer (built once per tokenizer object and
    cached: ~0.1 s for GPT-2's 50k tokens), None for a tokenizer that is not byte-level."""
    token_bytes = _byte_level_token_bytes(tokenizer)
    if token_bytes is None:
        return None
    try:
        cached = _UTF8_TABLES.get(tokenizer)
    except TypeError:  # not weak-referenceable: build it every time
        cached = None
    if cached is not None:
        return cached
    V = int(tokenizer.vocab_size)
    eos = tokenizer.eos_id
    table = utf8_token_table([token_bytes([i]) for i in range(V)], end_ids=() if eos is None else (eos,))
    with contextlib.suppress(TypeError):
        _UTF8_TABLES[tokenizer] = table
    return table


# ----------------------------------------------------------------------------------------------
# token generation with a KV cache


# cuDNN attention builds an execution plan for every new shape, and during decoding the KV length
# grows by one each step: measured on an H200 (1.3B, bf16), that made a first generation ~100 ms
# per token instead of ~14 ms. The other kernels need no per-shape setup.
_SDPA_BACKENDS = [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]


def _forward(model: LogitsModel, ids: list[int], caches: list | None, pos: int, device: str | torch.device):
    """One forward step -> ((V,) float32 CPU logits, caches). Grad mode is set per call, never
    across a ``yield`` (a context manager held open in a generator would leak into the caller)."""
    idx = torch.tensor([ids], dtype=torch.long, device=device)  # (1, T)
    try:
        backends = sdpa_kernel(_SDPA_BACKENDS) if idx.is_cuda else contextlib.nullcontext()
        with torch.no_grad(), backends:
            logits, new_caches = model.forward_logits(idx, caches, pos)
    except Exception as e:
        if not is_out_of_memory(e):
            raise
        # a streamed model (weights through a GPU window) gets more room from a larger budget
        advice = "raise --vram-budget-gib, or use " if hasattr(model, "om") else "use "
        raise OutOfMemoryError(
            f"GPU memory ran out during generation with {pos + len(ids)} tokens of context; "
            f"{advice}--device cpu, a shorter prompt or fewer --max-new-tokens"
        ) from e
    return logits[0].float().cpu(), new_caches


def generate_tokens(
    model: LogitsModel,
    prompt_ids: Sequence[int],
    options: GenerateOptions,
    eos_id: int | None,
    device: str | torch.device = "cpu",
    *,
    generator: torch.Generator | None = None,
    vocab_limit: int | None = None,
    utf8: Utf8TokenTable | None = None,
) -> Iterator[int]:
    """Yield new token ids one at a time (the EOS id itself is never yielded).

    Stops at EOS or after ``options.max_new_tokens``. The prompt is prefilled once; each step then
    feeds only the new token with the KV cache. When all ``block_size`` positions are used, the
    window slides to the newest ``block_size // 2`` tokens (see the module docstring).

    ``generator``: pass one to continue a session's random stream (run_generate does, so one
    printed seed reproduces a whole interactive session); otherwise one is seeded from
    ``options.seed`` (or at random). ``vocab_limit``: ids at or above it are never sampled --
    the embedding is padded past the tokenizer's vocabulary, and those rows mean nothing.
    ``utf8``: the tokenizer's :class:`Utf8TokenTable`; with it, every step samples only tokens
    that keep the new tokens' bytes valid UTF-8 and the reply ends on a whole character
    (:func:`mask_invalid_utf8`; the prompt is not part of that stream).
    """
    block_size = int(model.cfg.block_size)
    tokens = [int(t) for t in prompt_ids]
    if not tokens:
        raise ConfigError("the prompt encodes to 0 tokens; generation needs at least one")
    if len(tokens) > block_size:
        raise PromptTooLongError(
            f"the prompt is {len(tokens)} tokens but the model's context (block_size) is {block_size} tokens"
        )
    if generator is None:
        seed = options.seed if options.seed is not None else secrets.randbelow(2**63)
        generator = torch.Generator().manual_seed(seed)
    keep = max(1, block_size // 2)
    seen = set(tokens)
    utf8_state = _ACCEPT  # of the generated bytes only: the streamer decodes the reply from its start

    logits, caches = _forward(model, tokens, None, 0, device)
    pos = len(tokens)  # positions held in the cache
    for step in range(options.max_new_tokens):
        if vocab_limit is not None and vocab_limit < logits.shape[-1]:
            limit = max(vocab_limit, (eos_id + 1) if eos_id is not None else 0)
            logits[limit:] = float("-inf")
        if utf8 is not None:
            logits = mask_invalid_utf8(logits, utf8, utf8_state, remaining=options.max_new_tokens - step)
        logits = apply_repetition_penalty(logits, seen, options.repetition_penalty)
        nxt = sample_next(logits, options.temperature, options.top_k, options.top_p, generator)
        if eos_id is not None and nxt == eos_id:
            return
        if utf8 is not None:
            utf8_state = utf8.advance(utf8_state, nxt)
        yield nxt  # before the next forward pass, so the caller can print it right away
        if step == options.max_new_tokens - 1:
            return
        tokens.append(nxt)
        seen.add(nxt)
        if pos < block_size:
            logits, caches = _forward(model, [nxt], caches, pos, device)
            pos += 1
        else:  # context full: slide the window and prefill it as a fresh context
            window = tokens[-keep:]
            logits, caches = _forward(model, window, None, 0, device)
            pos = len(window)


# ----------------------------------------------------------------------------------------------
# streaming detokenisation


class StopStringFilter:
    """Text pieces in, text pieces out, cut just before the first stop string.

    Text that could still be the start of a stop string is held back until the next piece
    settles it, so a stop string is never printed even when it arrives split across tokens."""

    def __init__(self, stops: Sequence[str] = ()):
        self.stops = tuple(s for s in stops if s)
        self.stopped = False
        self._held = ""

    def push(self, text: str) -> str:
        """Add generated text; return the part that is now safe to show."""
        if self.stopped:
            return ""
        buf = self._held + text
        if not self.stops:
            self._held = ""
            return buf
        hits = [i for i in (buf.find(s) for s in self.stops) if i >= 0]
        if hits:
            self.stopped = True
            self._held = ""
            return buf[: min(hits)]
        hold = self._open_prefix_len(buf)
        self._held = buf[len(buf) - hold :]
        return buf[: len(buf) - hold]

    def flush(self) -> str:
        """End of generation: what was held back was not a stop string after all."""
        out, self._held = ("" if self.stopped else self._held), ""
        return out

    def _open_prefix_len(self, buf: str) -> int:
        """Length of the longest tail of ``buf`` that is a proper prefix of some stop string."""
        best = 0
        for s in self.stops:
            for n in range(min(len(s) - 1, len(buf)), best, -1):
                if buf.endswith(s[:n]):
                    best = n
                    break
        return best


class Utf8Streamer:
    """Token ids in, printable text pieces out.

    With a byte-level tokenizer (``token_bytes(ids) -> bytes``, ``is_byte_level`` not False) the raw bytes go
    through an incremental UTF-8 decoder: an incomplete character at the end is held back until
    its remaining bytes arrive, so a character split across tokens never shows as U+FFFD. Only
    bytes that are invalid on their own become U+FFFD (and an incomplete tail at ``flush``).
    Without ``token_bytes`` the streamer decodes all ids so far and holds back while the decoded
    text ends in U+FFFD. Stop strings are applied to the decoded text (``StopStringFilter``)."""

    def __init__(self, tokenizer: TokenizerLike, stop: Sequence[str] = ()):
        self._token_bytes = _byte_level_token_bytes(tokenizer)
        self._decode = tokenizer.decode
        self._utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self._ids: list[int] = []  # only used without token_bytes
        self._emitted_chars = 0
        self._stop = StopStringFilter(stop)

    @property
    def stopped(self) -> bool:
        """True once the text contains a stop string: the caller should stop generating."""
        return self._stop.stopped

    def push(self, token_id: int) -> str:
        """Add one token; return the text that is now complete and safe to print ('' if none)."""
        if self._stop.stopped:
            return ""
        if self._token_bytes is not None:
            text = self._utf8.decode(self._token_bytes([int(token_id)]))
        else:
            self._ids.append(int(token_id))
            full = self._decode(self._ids)
            if full.endswith("\ufffd"):
                return ""  # maybe a character cut in two: wait for the next token
            text, self._emitted_chars = full[self._emitted_chars :], len(full)
        return self._stop.push(text)

    def flush(self) -> str:
        """End of generation: return everything still held back (an incomplete UTF-8 tail here
        is really invalid and decodes with U+FFFD)."""
        if self._stop.stopped:
            return ""
        if self._token_bytes is not None:
            text = self._utf8.decode(b"", final=True)
        else:
            full = self._decode(self._ids)
            text, self._emitted_chars = full[self._emitted_chars :], len(full)
        return self._stop.push(text) + self._stop.flush()


# ----------------------------------------------------------------------------------------------
# prompt -> text


def stream_text(
    model: LogitsModel,
    tokenizer: TokenizerLike,
    prompt: str,
    options: GenerateOptions,
    device: str | torch.device = "cpu",
    *,
    generator: torch.Generator | None = None,
) -> Iterator[str]:
    """Yield the reply to ``prompt`` as printable text pieces.

    The prompt is encoded exactly as given (no stripping, no BOS or newline added). An empty
    prompt starts from the EOS token -- the document separator the model saw in training -- which
    gives an unconditional sample. With ``options.valid_utf8`` and a byte-level tokenizer, the
    reply is sampled as valid UTF-8 only (no U+FFFD from a stray byte token)."""
    ids = tokenizer.encode(prompt)
    if not ids:
        if prompt != "" or tokenizer.eos_id is None:
            raise ConfigError("the prompt encodes to 0 tokens; generation needs at least one")
        ids = [tokenizer.eos_id]
    vocab_limit = getattr(tokenizer, "vocab_size", None)
    utf8 = utf8_table_for(tokenizer) if options.valid_utf8 else None
    streamer = Utf8Streamer(tokenizer, options.stop)
    tokens = generate_tokens(
        model, ids, options, tokenizer.eos_id, device, generator=generator, vocab_limit=vocab_limit, utf8=utf8
    )
    try:
        for token_id in tokens:
            piece = streamer.push(token_id)
            if piece:
                yield piece
            if streamer.stopped:
                return
        tail = streamer.flush()
        if tail:
            yield tail
    finally:
        tokens.close()


def generate_text(
    model: LogitsModel,
    tokenizer: TokenizerLike,
    prompt: str,
    options: GenerateOptions,
    device: str | torch.device = "cpu",
    *,
    generator: torch.Generator | None = None,
) -> str:
    """The whole reply to ``prompt`` as one string (for notebooks and tests)."""
    return "".join(stream_text(model, tokenizer, prompt, options, device, generator=generator))


# ----------------------------------------------------------------------------------------------
# interactive loop

CONTINUATION = "\\"  # a line ending in a backslash continues the prompt on the next line


def _read_prompt(stdin: TextIO, stderr: TextIO, show_prompt: bool) -> str | None:
    """Read one prompt: a line without its line ending; a trailing backslash joins the next line
    with a newline (multi-line prompts). None at EOF with nothing read."""
    parts: list[str] = []
    while True:
        if show_prompt:
            stderr.write("> " if not parts else ". ")
            stderr.flush()
        line = stdin.readline()
        if line == "":  # EOF
            return "\n".join(parts) if parts else None
        if line.endswith("\r\n"):
            line = line[:-2]
        elif line.endswith("\n"):
            line = line[:-1]
        if line.endswith(CONTINUATION):
            parts.append(line[: -len(CONTINUATION)])
            continue
        parts.append(line)
        return "\n".join(parts)


def interactive_loop(
    reply: Callable[[str], Iterable[str]],
    stdin: TextIO,
    stdout: TextIO,
    stderr: TextIO,
    *,
    is_tty: bool | None = None,
) -> int:
    """Read prompts until EOF and stream each reply to ``stdout`` followed by a newline.

    Works the same on a pipe (one prompt per line; nothing but replies on stdout) and on a
    terminal (a ``> `` prompt on stderr). Ctrl-C during a reply ends that reply only; Ctrl-C at
    the prompt ends the session. Empty lines are skipped. A ``RamgptError`` for one prompt (say,
    too long) is reported on stderr and the loop goes on. Returns the number of replies."""
    tty = stdin.isatty() if is_tty is None else is_tty
    replies = 0
    while True:
        try:
            prompt = _read_prompt(stdin, stderr, show_prompt=tty)
        except KeyboardInterrupt:
            prompt = None
        if prompt is None:
            if tty:
                stderr.write("\n")
                stderr.flush()
            return replies
        if prompt == "":
            continue
        try:
            for piece in reply(prompt):
                stdout.write(piece)
                stdout.flush()
        except KeyboardInterrupt:
            pass  # this reply ends here; the session goes on
        except RamgptError as e:
            stderr.write(f"error: {e}\n")
            stderr.flush()
        stdout.write("\n")
        stdout.flush()
        replies += 1


# ----------------------------------------------------------------------------------------------
# device choice and model loading


def inference_memory_bytes(cfg: Any, dtype_bytes: int) -> int:
    """Rough device memory to generate with a model resident: weights, a full KV cache,
    prefill activations of one full context, float32 logits, plus 20% and 128 MiB of slack
    (a 1.3B model in bf16 peaked at 2.95 GiB allocated for 1000 + 60 tokens on an H200; this
    says 3.32 GiB)."""
    from ramgpt.model import count_parameters_by_component

    C, L, T, V = cfg.n_embd, cfg.n_layer, cfg.block_size, cfg.vocab_size
    weights = count_parameters_by_component(cfg)["total"] * dtype_bytes
    kv_cache = 2 * L * T * C * dtype_bytes
    activations = T * 8 * C * dtype_bytes  # residual, qkv and the 4x MLP hidden of one block
    logits = 2 * V * 4
    return int((weights + kv_cache + activations + logits) * 1.2) + 128 * 2**20


@dataclass(frozen=True)
class InferencePlacement:
    """Where generation runs: ``choose_device``'s answer."""

    device: str  # "cpu", "cuda" or "cuda:N"
    streamed: bool  # weights stay in CPU RAM and stream through the GPU (they do not fit it)
    reason: str  # why, for the one device line on stderr


def choose_device(
    requested: str,
    need_bytes: int,
    machine: Machine,
    *,
    vram_budget_gib: float | None = None,
    free_bytes: int | None = None,
) -> InferencePlacement:
    """Decide where to generate. The device itself is ``placement.resolve_device``'s (so an
    explicit CUDA device without CUDA is its one-line error naming ``--device``); on top of it,
    ``auto`` on a GPU keeps the model resident when ``need_bytes`` fits the VRAM budget (capped at
    the card, ``placement.vram_budget_bytes``) or, without a budget, ``free_bytes`` (the card's
    total when unknown), and streams the weights from CPU RAM when it does not. An explicit device
    is taken as asked, resident."""
    from ramgpt.placement import resolve_device, vram_budget_bytes

    device = resolve_device(requested, machine, option="--device")
    need = f"~{gib(need_bytes)}"
    if device == "cpu":
        return InferencePlacement("cpu", False, "requested" if requested == "cpu" else "no usable CUDA GPU")
    if requested != "auto":
        return InferencePlacement(device, False, f"requested, the model needs {need}")
    budget = vram_budget_bytes(vram_budget_gib, device, machine)
    if budget is not None:
        room, what = budget, "the VRAM budget"
    else:
        gpu = machine.gpu(device)
        room = free_bytes if free_bytes is not None else (gpu.total_b if gpu is not None else 0)
        what = "free GPU memory"
    if need_bytes <= room:
        return InferencePlacement(device, False, f"the model needs {need} of {gib(room)} {what}")
    return InferencePlacement(
        device, True, f"the model needs {need} but {what} is {gib(room)}: weights stream from CPU RAM"
    )


@dataclass
class LoadedModel:
    """What ``_load_model`` hands to ``run_generate``."""

    model: Any  # anything with .cfg.block_size and forward_logits(idx, kv_caches, pos_offset)
    profile: Any  # ramgpt.config.Profile
    tokenizer_dir: Path | None
    device: str
    notice: str  # one line for stderr: where it runs and why


def _load_model(path: Path, device: str, vram_budget_gib: float | None) -> LoadedModel:
    """Load a checkpoint for generation and place it on a device.

    The weights load on the CPU, ``choose_device`` decides from their size, then the model moves
    there whole (CUDA in the profile's precision, ``placement.resolve_precision``; the CPU always
    in float32), or stays in CPU RAM and streams through the GPU (``engine.StreamedInferenceModel``)."""
    from ramgpt.checkpoint import load_model_for_inference
    from ramgpt.placement import resolve_device, resolve_precision
    from ramgpt.probe import probe_machine

    machine = probe_machine()
    resolve_device(device, machine, option="--device")  # a bad --device fails before the load
    model, profile, tokenizer_dir = load_model_for_inference(path, "cpu")
    half = profile.runtime.precision != "fp32"
    need = inference_memory_bytes(profile.model, 2 if half else 4)
    free = None
    if machine.cuda and device == "auto" and vram_budget_gib is None:
        free = torch.cuda.mem_get_info()[0]
    where = choose_device(device, need, machine, vram_budget_gib=vram_budget_gib, free_bytes=free)
    dev = where.device
    dtype = torch.float32  # the CPU always runs float32 (resolve_precision would keep a bf16 profile's bf16)
    if dev != "cpu":
        precision = resolve_precision(profile.runtime.precision, dev, machine)
        dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision, torch.float32)
    dtype_name = str(dtype).removeprefix("torch.")
    notice = f"device: {dev} ({dtype_name}; {where.reason}); checkpoint: {path}"
    if where.streamed:
        from ramgpt.engine import StreamedInferenceModel, apply_vram_budget
        from ramgpt.placement import vram_budget_bytes

        apply_vram_budget(dev, vram_budget_bytes(vram_budget_gib, dev, machine))
        streamed = StreamedInferenceModel(model, device=dev, dtype=dtype).eval()
        return LoadedModel(streamed, profile, tokenizer_dir, dev, notice)
    try:
        model = model.to(device=dev, dtype=dtype).eval()
    except torch.cuda.OutOfMemoryError as e:
        raise OutOfMemoryError(f"the model does not fit on {dev} (needs {gib(need)}); use --device cpu") from e
    return LoadedModel(model, profile, tokenizer_dir, dev, notice)


def _load_tokenizer(spec: str | None, loaded: LoadedModel) -> TokenizerLike:
    """Lookup order: ``--tokenizer``, then the checkpoint's ``tokenizer/`` directory, then the
    profile's ``data.tokenizer`` (the training tokenizer is the only one that fits the model)."""
    from ramgpt.tokenizer import load_tokenizer

    if spec is None:
        spec = str(loaded.tokenizer_dir) if loaded.tokenizer_dir is not None else loaded.profile.data.tokenizer
    tok = load_tokenizer(spec)
    rows = int(loaded.model.cfg.vocab_size)
    if tok.vocab_size > rows:
        raise ConfigError(
            f"tokenizer {spec!r} has {tok.vocab_size} tokens but the model has only {rows} embedding rows; "
            "use the tokenizer the model was trained with (--tokenizer)"
        )
    return tok


# ----------------------------------------------------------------------------------------------
# the command


def run_generate(
    checkpoint_path: Path | str,
    *,
    prompt: str | None = None,
    interactive: bool = False,
    options: GenerateOptions | None = None,
    tokenizer: str | None = None,
    device: str = "auto",
    vram_budget_gib: float | None = None,
    stdin: TextIO | None = None,
    stdout: TextIO | None = None,
    stderr: TextIO | None = None,
) -> None:
    """``ramgpt generate``: stream a reply to ``prompt`` and/or run the interactive loop.

    Prints one device line and ``seed: N`` on stderr first (always: a run is reproducible from
    the seed), then generated text only on stdout, flushed per piece. With both a prompt and
    ``interactive``, the prompt is answered first. One seeded generator serves the whole session,
    so the printed seed plus the same prompts reproduce every reply."""
    from ramgpt.checkpoint import resolve_checkpoint

    options = options or GenerateOptions()
    if prompt is None and not interactive:
        raise ConfigError("give a prompt or use interactive mode")
    stdin = stdin or sys.stdin
    stdout = stdout or sys.stdout
    stderr = stderr or sys.stderr

    path = resolve_checkpoint(Path(checkpoint_path))
    loaded = _load_model(path, device, vram_budget_gib)
    tok = _load_tokenizer(tokenizer, loaded)
    seed = options.seed if options.seed is not None else secrets.randbelow(2**31)
    generator = torch.Generator().manual_seed(seed)
    stderr.write(f"{loaded.notice}\n")
    stderr.write(f"seed: {seed}\n")
    stderr.flush()

    def reply(text: str) -> Iterator[str]:
        return stream_text(loaded.model, tok, text, options, loaded.device, generator=generator)

    if prompt is not None:
        wrote = False
        try:
            for piece in reply(prompt):
                stdout.write(piece)
                stdout.flush()
                wrote = True
        except BaseException:  # Ctrl-C or an error mid-reply: end the line so the message starts clean
            if wrote:
                stdout.write("\n")
                stdout.flush()
            raise
        stdout.write("\n")
        stdout.flush()
    if interactive:
        interactive_loop(reply, stdin, stdout, stderr)


__all__ = [
    "GenerateOptions",
    "InferencePlacement",
    "LoadedModel",
    "PromptTooLongError",
    "StopStringFilter",
    "Utf8Streamer",
    "apply_repetition_penalty",
    "choose_device",
    "generate_text",
    "generate_tokens",
    "inference_memory_bytes",
    "interactive_loop",
    "mask_invalid_utf8",
    "run_generate",
    "sample_next",
    "stream_text",
    "top_k_filter",
    "top_p_filter",
    "Utf8TokenTable",
    "utf8_table_for",
    "utf8_token_table",
    "valid_utf8_mask",
]

"""How much text a tokenizer fits in a token, measured on a profile's held-out documents
(``ramgpt tokenizer stats``): characters per token, tokens per document, and how often it falls back
to pieces of a character or to an unknown token.

Characters per token is the number that matters for training: at a fixed ``seq_len`` and tokens per
step, a tokenizer with twice the characters per token shows the model twice the text. A
"byte-fallback" token is one that is not a whole number of characters (a byte-level BPE spelling a
character it never learned byte by byte, or a sentencepiece ``<0xNN>`` token); "unknown" counts the
model's unknown token, which byte-level tokenizers never produce.
"""

from __future__ import annotations

import itertools
import re
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass

from ramgpt.config import Profile
from ramgpt.errors import DataError
from ramgpt.tokenizer import TextTokenizer, load_tokenizer

_BYTE_TOKEN = re.compile(r"^<0x[0-9A-Fa-f]{2}>$")  # sentencepiece byte fallback
_BATCH = 64


@dataclass(frozen=True)
class TokenizerStats:
    """Counts over a set of documents, and the rates derived from them."""

    tokenizer: str
    vocab_size: int
    documents: int
    characters: int
    bytes: int
    tokens: int
    byte_fallback_tokens: int
    unknown_tokens: int

    @property
    def chars_per_token(self) -> float:
        return self.characters / self.tokens if self.tokens else 0.0

    @property
    def bytes_per_token(self) -> float:
        return self.bytes / self.tokens if self.tokens else 0.0

    @property
    def tokens_per_document(self) -> float:
        return self.tokens / self.documents if self.documents else 0.0

    @property
    def byte_fallback_rate(self) -> float:
        return self.byte_fallback_tokens / self.tokens if self.tokens else 0.0

    @property
    def unknown_rate(self) -> float:
        return self.unknown_tokens / self.tokens if self.tokens else 0.0

    def to_dict(self) -> dict[str, float | int | str]:
        return {
            **asdict(self),
            "chars_per_token": self.chars_per_token,
            "bytes_per_token": self.bytes_per_token,
            "tokens_per_document": self.tokens_per_document,
            "byte_fallback_rate": self.byte_fallback_rate,
            "unknown_rate": self.unknown_rate,
        }


def _fallback_ids(tokenizer: TextTokenizer) -> frozenset[int]:
    """Ids of tokens that are not a whole number of characters."""
    out = set()
    for i in range(tokenizer.vocab_size):
        if tokenizer.is_byte_level:
            try:
                tokenizer.token_bytes([i]).decode("utf-8")
            except UnicodeDecodeError:
                out.add(i)
        else:
            token = tokenizer.id_to_token(i)
            if token is not None and _BYTE_TOKEN.match(token):
                out.add(i)
    return frozenset(out)


def measure(tokenizer: TextTokenizer, texts: Iterable[str]) -> TokenizerStats:
    """Tokenize ``texts`` (each a document; no EOS counted) and count. Deterministic."""
    fallback = _fallback_ids(tokenizer)
    unk = tokenizer.unk_id
    docs = chars = nbytes = tokens = n_fallback = n_unknown = 0
    it = iter(texts)
    while batch := list(itertools.islice(it, _BATCH)):
        for text, ids in zip(batch, tokenizer.encode_batch(batch), strict=True):
            docs += 1
            chars += len(text)
            nbytes += len(text.encode("utf-8"))
            tokens += len(ids)
            n_fallback += sum(1 for i in ids if i in fallback)
            if unk is not None:
                n_unknown += ids.count(unk)
    return TokenizerStats(tokenizer.name, tokenizer.vocab_size, docs, chars, nbytes, tokens, n_fallback, n_unknown)


def profile_stats(
    profile: Profile, tokenizers: Sequence[str] | None = None, max_docs: int | None = None
) -> list[TokenizerStats]:
    """:func:`measure` each tokenizer (default: the profile's ``data.tokenizer``) on the profile's
    held-out eval documents (:func:`ramgpt.data.documents` with ``split="eval"``), at most
    ``max_docs`` of them. The documents are read once."""
    from ramgpt.data import documents

    docs = list(itertools.islice(documents(profile.data, "eval"), max_docs))
    if not docs:
        raise DataError("the profile's data has no held-out documents to measure on")
    specs = list(tokenizers) if tokenizers else [profile.data.tokenizer]
    return [measure(load_tokenizer(spec), docs) for spec in specs]

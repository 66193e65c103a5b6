"""Tokenizers: one small wrapper over Hugging Face ``tokenizers``, and the lookup chain that finds one.

``load_tokenizer(spec)`` resolves, in order:

1. ``"embedded"``: the byte-level BPE shipped in ``ramgpt/assets/tokenizer`` (trained on the embedded
   corpus by ``tools/build_tokenizer.py``; no download, any text encodes).
2. A local directory holding ``tokenizer.json`` (for example a checkpoint's ``tokenizer/``) or a path to a
   ``tokenizer.json`` file.
3. Anything else that looks like a Hub id (``gpt2``, ``org/name``) goes through
   ``transformers.AutoTokenizer``: the local cache first, then the Hub, but only after a quick
   reachability probe, because the hub client otherwise retries for most of a minute when offline.

Every tokenizer ends up as a :class:`TextTokenizer` over a ``tokenizers.Tokenizer``, so encoding never
goes through ``transformers`` (slow to import) once loaded.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import re
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from ramgpt.errors import TokenizerError
from ramgpt.fmt import first_line
from ramgpt.probe import hub_offline, hub_reachable

EMBEDDED_TOKENIZER_DIR = Path(__file__).resolve().parent / "assets" / "tokenizer"
EOS_TOKEN = "<|endoftext|>"
EMBEDDED_VOCAB_SIZE = 8192

# Split applied before the text becomes bytes. It is GPT-2's pattern (contractions, words, single
# digits here instead of digit runs, punctuation runs, whitespace) with one change for Japanese:
# kanji, hiragana and katakana runs are separate pieces, so merges learn words and okurigana
# instead of whole clauses (Japanese has no spaces, and GPT-2's `\p{L}+` would take a sentence).
SPLIT_PATTERN = (
    r"'(?:[sdmt]|ll|ve|re)"
    r"| ?[\p{Han}々〆]+"
    r"| ?\p{Hiragana}+"
    r"| ?[\p{Katakana}ー]+"
    r"| ?[\p{L}\p{M}&&[^\p{Han}\p{Hiragana}\p{Katakana}々〆ー]]+"
    r"| ?\p{N}"
    r"| ?[^\s\p{L}\p{N}]+"
    r"|\s+(?!\S)|\s+"
)

# Hub ids are `name` or `owner/name`; anything else that does not exist is a mistyped path.
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.\-]*(/[A-Za-z0-9][\w.\-]*)?$")
_EOS_CANDIDATES = (EOS_TOKEN, "</s>", "<eos>", "<|end_of_text|>", "<|eot_id|>")
_FINGERPRINT_PROBE = "Hello world, it's 2024. 今日は東京タワーへ行った。カタカナとひらがな、😀 <|endoftext|> end."


@functools.lru_cache(maxsize=1)
def _byte_decoder() -> dict[str, int]:
    """GPT-2's printable-character alphabet for bytes, inverted (character -> byte)."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), 256))
    chars = printable[:]
    n = 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            chars.append(256 + n)
            n += 1
    return {chr(c): b for b, c in zip(printable, chars, strict=True)}


def _uses_byte_level(config: dict[str, Any]) -> bool:
    """True when the decoder maps tokens back through GPT-2's byte alphabet."""
    dec = config.get("decoder") or {}
    parts = dec.get("decoders", [dec]) if dec.get("type") == "Sequence" else [dec]
    return any(p.get("type") == "ByteLevel" for p in parts if isinstance(p, dict))


class TextTokenizer:
    """A loaded tokenizer with the few operations training and generation need.

    ``encode`` never adds BOS/EOS (packing adds EOS between documents itself) and treats special-token
    text such as ``<|endoftext|>`` found inside a document as plain text, so web data cannot inject
    document boundaries. ``decode`` is the exact inverse of ``encode`` for byte-level tokenizers.
    """

    def __init__(
        self,
        backend: Any,
        eos_id: int,
        name: str,
        *,
        tokenizer_json: str | None = None,
        hf_tokenizer: Any = None,
    ) -> None:
        from tokenizers import Tokenizer

        self._json = tokenizer_json if tokenizer_json is not None else backend.to_str()
        # A private copy, because the special-token switch below is a property of the object and the
        # caller (or transformers) may hold the original.
        self._backend: Tokenizer = Tokenizer.from_str(self._json)
        self._backend.encode_special_tokens = True
        self._hf = hf_tokenizer
        self.name = name
        self.eos_id = int(eos_id)
        token = self._backend.id_to_token(self.eos_id)
        if token is None:
            raise TokenizerError(f"tokenizer {name!r}: EOS id {eos_id} is not in its vocabulary")
        self.eos_token: str = token
        vocab = self._backend.get_vocab(with_added_tokens=True)
        # Embedding rows must cover the largest id, which can exceed the count when ids have gaps.
        self.vocab_size: int = max(vocab.values()) + 1
        self.is_byte_level: bool = _uses_byte_level(json.loads(self._json))
        self._special_ids = {t.content: i for i, t in self._backend.get_added_tokens_decoder().items()}
        self._id_bytes: list[bytes] | None = None
        self._fingerprint: str | None = None

    def __repr__(self) -> str:
        return f"TextTokenizer(name={self.name!r}, vocab_size={self.vocab_size}, eos_id={self.eos_id})"

    def encode(self, text: str) -> list[int]:
        """Token ids of ``text``; no special tokens are added."""
        return self._backend.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        """``encode`` for many texts at once (the Rust side may use several threads)."""
        return [e.ids for e in self._backend.encode_batch(list(texts), add_special_tokens=False)]

    @property
    def unk_id(self) -> int | None:
        """The unknown token's id, or None when the model has none (byte-level BPEs never need one)."""
        unk = json.loads(self._json).get("model", {}).get("unk_token")
        return None if unk is None else self._backend.token_to_id(unk)

    def id_to_token(self, i: int) -> str | None:
        """The vocabulary entry of id ``i`` (GPT-2's byte alphabet for byte-level tokenizers)."""
        return self._backend.id_to_token(int(i))

    def to_json(self) -> str:
        """The ``tokenizer.json`` text this tokenizer was built from."""
        return self._json

    def decode(self, ids: Iterable[int]) -> str:
        """Text of ``ids``; special tokens are kept as their text."""
        return self._backend.decode(list(ids), skip_special_tokens=False)

    def token_bytes(self, ids: Iterable[int]) -> bytes:
        """Raw bytes of ``ids``, so a streamer can hold back an incomplete UTF-8 sequence.

        For byte-level tokenizers a token can end in the middle of a character; concatenating these
        bytes and decoding with ``errors="strict"`` tells exactly where a character is still open.
        Other tokenizers fall back to ``decode(ids).encode()``.
        """
        ids = list(ids)
        if not self.is_byte_level:
            return self.decode(ids).encode("utf-8")
        table = self._id_bytes
        if table is None:
            table = self._id_bytes = self._build_byte_table()
        return b"".join(table[i] for i in ids)

    def _build_byte_table(self) -> list[bytes]:
        decoder = _byte_decoder()
        table = [b""] * self.vocab_size
        for token, i in self._backend.get_vocab(with_added_tokens=True).items():
            if token in self._special_ids and self._special_ids[token] == i:
                table[i] = token.encode("utf-8")
            elif all(ch in decoder for ch in token):
                table[i] = bytes(decoder[ch] for ch in token)
            else:  # an added non-special token stored as plain text
                table[i] = token.encode("utf-8")
        return table

    @property
    def fingerprint(self) -> str:
        """Hash of what the tokenizer does (vocabulary, EOS, the ids of a probe text), not of its
        file: a tokenizer re-saved by ``transformers`` keeps its fingerprint (cache key, resume check)."""
        if self._fingerprint is None:
            h = hashlib.sha256()
            vocab = sorted(self._backend.get_vocab(with_added_tokens=True).items(), key=lambda kv: kv[1])
            h.update(json.dumps(vocab, ensure_ascii=False).encode("utf-8"))
            h.update(json.dumps([self.eos_id, self.encode(_FINGERPRINT_PROBE)]).encode("utf-8"))
            self._fingerprint = h.hexdigest()[:16]
        return self._fingerprint

    def save(self, directory: str | os.PathLike[str]) -> Path:
        """Write ``tokenizer.json`` plus ``tokenizer_config.json`` / ``special_tokens_map.json``.

        The result loads with :func:`load_tokenizer` and with ``transformers.AutoTokenizer``. A Hub
        tokenizer is saved through ``save_pretrained`` so nothing of its configuration is lost.
        """
        out = Path(directory)
        out.mkdir(parents=True, exist_ok=True)
        if self._hf is not None:
            self._hf.save_pretrained(str(out))
            if (out / "tokenizer.json").is_file():
                return out
        (out / "tokenizer.json").write_text(self._json, encoding="utf-8")
        special = {"bos_token": self.eos_token, "eos_token": self.eos_token, "unk_token": self.eos_token}
        config = {
            "tokenizer_class": "PreTrainedTokenizerFast",
            **special,
            "add_prefix_space": False,
            "clean_up_tokenization_spaces": False,
            "model_max_length": 1_000_000_000,
        }
        (out / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
        (out / "special_tokens_map.json").write_text(json.dumps(special, indent=2) + "\n", encoding="utf-8")
        return out


# ---------------------------------------------------------------------------------------------
# Lookup


def load_tokenizer(spec: str) -> TextTokenizer:
    """Resolve ``spec`` ("embedded", a local directory or tokenizer.json, or a Hub id).

    Raises :class:`TokenizerError` with one line when nothing can be loaded; an uncached Hub id while
    offline fails within a few seconds and names the offline choice (``embedded``).
    """
    spec = (spec or "").strip()
    if spec in ("", "embedded"):
        return _load_embedded()
    path = Path(spec).expanduser()
    if path.exists():
        return _load_local(path, name=spec)
    if _looks_like_path(spec):
        raise TokenizerError(
            f"tokenizer path {spec} does not exist (expected 'embedded', a directory holding tokenizer.json, "
            "a tokenizer.json file, or a Hub name such as gpt2)"
        )
    return _load_from_hub(spec)


def _looks_like_path(spec: str) -> bool:
    return spec.startswith((".", "/", "~")) or "\\" in spec or spec.endswith(".json") or not _HUB_ID.match(spec)


@functools.lru_cache(maxsize=1)
def _load_embedded() -> TextTokenizer:
    """The shipped tokenizer; cached because it is immutable and loaded by every micro run."""
    if not (EMBEDDED_TOKENIZER_DIR / "tokenizer.json").is_file():
        raise TokenizerError(
            f"the embedded tokenizer is missing from {EMBEDDED_TOKENIZER_DIR} (broken install; "
            "rebuild it with python tools/build_tokenizer.py)"
        )
    return _load_local(EMBEDDED_TOKENIZER_DIR, name="embedded")


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def _token_text(value: Any) -> str | None:
    """Special tokens are stored either as a string or as an AddedToken dict."""
    if isinstance(value, str):
        return value
    if isinstance(value, dict) and isinstance(value.get("content"), str):
        return value["content"]
    return None


def _find_eos_id(backend: Any, directory: Path) -> int | None:
    for fname in ("tokenizer_config.json", "special_tokens_map.json"):
        token = _token_text(_read_json(directory / fname).get("eos_token"))
        if token is not None and backend.token_to_id(token) is not None:
            return int(backend.token_to_id(token))
    for token in _EOS_CANDIDATES:
        if backend.token_to_id(token) is not None:
            return int(backend.token_to_id(token))
    return None


def _load_local(path: Path, *, name: str) -> TextTokenizer:
    from tokenizers import Tokenizer

    file = path / "tokenizer.json" if path.is_dir() else path
    if not file.is_file():
        if path.is_dir():
            return _load_local_transformers(path, name=name)
        raise TokenizerError(f"tokenizer path {path} is not a directory or a tokenizer.json file")
    try:
        text = file.read_text(encoding="utf-8")
        backend = Tokenizer.from_str(text)
    except Exception as e:  # tokenizers raises plain Exception subclasses on bad JSON
        raise TokenizerError(f"cannot read tokenizer {file}: {first_line(e)}") from e
    eos_id = _find_eos_id(backend, file.parent)
    if eos_id is None:
        raise TokenizerError(
            f"tokenizer {file} has no end-of-text token (set eos_token in tokenizer_config.json next to it)"
        )
    return TextTokenizer(backend, eos_id, name, tokenizer_json=text)


def _load_local_transformers(path: Path, *, name: str) -> TextTokenizer:
    """A directory without tokenizer.json (vocab.json + merges.txt, sentencepiece): let transformers
    convert it to a fast tokenizer."""
    try:
        from transformers import AutoTokenizer

        hf = AutoTokenizer.from_pretrained(str(path), local_files_only=True)
    except Exception as e:
        raise TokenizerError(
            f"tokenizer directory {path} holds no tokenizer.json and transformers cannot load it: {first_line(e)}"
        ) from e
    return _wrap_transformers(hf, name)


def _wrap_transformers(hf: Any, name: str) -> TextTokenizer:
    backend = getattr(hf, "backend_tokenizer", None)
    if backend is None:
        raise TokenizerError(f"tokenizer {name!r} has no fast (Rust) version; ramgpt needs one (a tokenizer.json)")
    eos_id = getattr(hf, "eos_token_id", None)
    if eos_id is None:
        for token in _EOS_CANDIDATES:
            if backend.token_to_id(token) is not None:
                eos_id = backend.token_to_id(token)
                break
    if eos_id is None:
        raise TokenizerError(f"tokenizer {name!r} has no end-of-text (EOS) token to separate documents")
    return TextTokenizer(backend, int(eos_id), name, hf_tokenizer=hf)


def _offline_message(spec: str, reason: str) -> str:
    # Command-neutral: this is raised for train (profile field) and generate (option) alike, so it
    # names the profile field and the exact spelling for each command (tests/test_tokenizer.py checks
    # every option named here against the CLI).
    return (
        f"tokenizer {spec!r} is not in the local Hugging Face cache and {reason}; use the shipped tokenizer "
        "(no download) or a local tokenizer directory: data.tokenizer=embedded in the profile "
        "(ramgpt train --set data.tokenizer=embedded; ramgpt generate --tokenizer embedded)"
    )


def _load_from_hub(spec: str) -> TextTokenizer:
    try:
        from transformers import AutoTokenizer
    except ImportError as e:  # pragma: no cover - transformers is a dependency
        raise TokenizerError(f"tokenizer {spec!r} needs transformers, which is not installed: {e}") from e
    try:
        hf = AutoTokenizer.from_pretrained(spec, local_files_only=True)
    except Exception:
        hf = None
    if hf is None:
        if hub_offline():
            raise TokenizerError(_offline_message(spec, "HF_HUB_OFFLINE is set"))
        if not hub_reachable():
            raise TokenizerError(_offline_message(spec, "the Hub cannot be reached"))
        try:
            hf = AutoTokenizer.from_pretrained(spec)
        except Exception as e:
            raise TokenizerError(f"cannot load tokenizer {spec!r} from the Hugging Face Hub: {first_line(e)}") from e
    return _wrap_transformers(hf, spec)


# ---------------------------------------------------------------------------------------------
# Training (ramgpt.tokenizer_train builds the embedded tokenizer and the user's own with this)


def train_byte_level_bpe(
    texts: Iterable[str],
    *,
    vocab_size: int = EMBEDDED_VOCAB_SIZE,
    min_frequency: int = 2,
    name: str = "custom",
    split_pattern: str = SPLIT_PATTERN,
) -> TextTokenizer:
    """Train a byte-level BPE with ``<|endoftext|>`` (id 0) as EOS.

    All 256 bytes are in the initial alphabet, so any text encodes without unknown tokens even if the
    training texts never contained a character. ``split_pattern`` cuts text into the pieces merges
    stay inside (default: the embedded tokenizer's; ``ramgpt.tokenizer_train`` has the one for
    Japanese data). Training is deterministic for the same texts in the same order.
    """
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers

    if vocab_size < 257 + 1:
        raise TokenizerError(f"vocab_size {vocab_size} is too small for a byte-level BPE (needs > 257)")
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(split_pattern), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=min_frequency,
        special_tokens=[EOS_TOKEN],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    return TextTokenizer(tok, tok.token_to_id(EOS_TOKEN), name)

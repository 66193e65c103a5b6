"""A tokenizer of the user's own, trained on a profile's data (``ramgpt tokenizer train``), and the
trainer's hook that trains one into the run directory before the first step (:func:`ensure_tokenizer`).

What is trained: a byte-level BPE (:func:`ramgpt.tokenizer.train_byte_level_bpe`): all 256 bytes are in
its alphabet, so no text ever becomes an unknown token, and ``decode(encode(x)) == x`` for any text.
``<|endoftext|>`` is id 0 and the EOS. The sample is the first N training documents of the profile's
own stream (:func:`ramgpt.data.documents`: the held-out eval documents are never seen, so
``ramgpt tokenizer stats`` measures on text the tokenizer did not learn from). The same documents,
seed and settings give a byte-identical ``tokenizer.json``.

Padding: the model's embedding has ``model.vocab_size`` rows (50304 = 64 x 786 in the 1b recipe, for
fast matrix shapes). When the BPE learns fewer tokens (a small sample cannot fill 50k merges), the
vocabulary is padded with ``<|pad_ID|>`` entries that no merge produces, so neither ramgpt nor
``transformers`` ever emits them, while ``len(tokenizer)`` matches the model for export.

The embedded tokenizer is built here too (:func:`build_embedded`), from the shipped corpus with the
script-splitting pattern it was made with; ``tools/build_tokenizer.py`` is a thin wrapper.
"""

from __future__ import annotations

import itertools
import json
import os
import shutil
import tempfile
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ramgpt.config import DataConfig, Profile
from ramgpt.errors import ConfigError, DataError, TokenizerError
from ramgpt.tokenizer import (
    EMBEDDED_TOKENIZER_DIR,
    EMBEDDED_VOCAB_SIZE,
    SPLIT_PATTERN,
    TextTokenizer,
    load_tokenizer,
    train_byte_level_bpe,
)

DEFAULT_SAMPLES: int = DataConfig.model_fields["tokenizer_samples"].default  # the profile field's default
MIN_FREQUENCY = 2
RUN_TOKENIZER_DIR = "tokenizer"  # RUN_DIR/tokenizer/ when the profile asks for a trained tokenizer
META_FILE = "ramgpt_tokenizer.json"  # how the tokenizer was trained (provenance; not read by loaders)
PAD_TOKEN = "<|pad_{}|>"

# Pre-tokenization for Japanese (the pieces merges stay inside). The embedded tokenizer's pattern
# (GPT-2's, with single digits and kanji, hiragana and katakana runs apart) with one change: a kanji
# run keeps the hiragana that follows it, so 表示する, 行った, 学習では can become tokens (Japanese
# writes no spaces, and its words are kanji stems with kana endings). Katakana words, hiragana runs,
# other letters, punctuation and single digits stay separate pieces. Measured on 50k-vocabulary BPEs
# trained on 5.7M characters of Japanese manual pages (docs/tokenizer.md): characters per token on
# held-out pages 2.88 vs 2.47 for the script split; on other Japanese prose 2.57 vs 2.34 and 1.45 vs
# 1.33. Letting a letter run cross every script (GPT-2's \p{L}+, as cl100k does) was better on the
# held-out pages (3.12) but worse on general prose (1.39), trained 2.8x slower and used 2.5x the
# memory (its pieces are whole clauses, mostly unique: ~110 MB per million characters).
JAPANESE_SPLIT_PATTERN = (
    r"'(?:[sdmt]|ll|ve|re)"
    r"| ?[\p{Han}々〆]+\p{Hiragana}*"
    r"| ?\p{Hiragana}+"
    r"| ?[\p{Katakana}ー]+"
    r"| ?[\p{L}\p{M}&&[^\p{Han}\p{Hiragana}\p{Katakana}々〆ー]]+"
    r"| ?\p{N}"
    r"| ?[^\s\p{L}\p{N}]+"
    r"|\s+(?!\S)|\s+"
)

# on_progress(phase, done, total): "reading" (documents read so far, of at most `total`), then
# "learning" once all are read and the merges are being learned (no count), then "saving".
ProgressFn = Callable[[str, int, "int | None"], None]


@dataclass(frozen=True)
class TrainedTokenizer:
    """What :func:`train_tokenizer` wrote."""

    path: Path
    tokenizer: TextTokenizer
    documents: int  # documents read (fewer than asked when the data ran out)
    characters: int
    learned: int  # tokens the BPE learned (bytes, EOS and merges), before padding
    vocab_size: int  # after padding
    seconds: float

    def summary(self) -> str:
        pad = f", padded to {self.vocab_size:,}" if self.vocab_size > self.learned else ""
        return (
            f"tokenizer written to {self.path}: {self.learned:,} tokens learned from {self.documents:,} documents "
            f"({self.characters:,} characters){pad}, in {self.seconds:.1f}s"
        )


def pad_vocabulary(tokenizer: TextTokenizer, size: int) -> TextTokenizer:
    """``tokenizer`` with its vocabulary filled up to ``size`` ids by ``<|pad_ID|>`` tokens.

    The pads are entries of the BPE vocabulary that no merge produces, so encoding never yields them
    (not through ``transformers`` either: they are not added tokens, so their text is not matched).
    """
    from tokenizers import Tokenizer

    if size < tokenizer.vocab_size:
        raise ConfigError(f"cannot pad a vocabulary of {tokenizer.vocab_size} tokens down to {size}")
    if size == tokenizer.vocab_size:
        return tokenizer
    data = json.loads(tokenizer.to_json())
    vocab: dict[str, int] = data["model"]["vocab"]
    taken = set(vocab) | {t["content"] for t in data.get("added_tokens", [])}
    for i in range(tokenizer.vocab_size, size):
        name = PAD_TOKEN.format(i)
        while name in taken:  # a learned token of that text (only if the data held it)
            name = "_" + name
        vocab[name] = i
    backend = Tokenizer.from_str(json.dumps(data, ensure_ascii=False))
    return TextTokenizer(backend, tokenizer.eos_id, tokenizer.name)


def _counted(docs: Iterable[str], total: int, on_progress: ProgressFn | None, tally: list[int]) -> Iterator[str]:
    """Pass ``docs`` through, counting documents and characters into ``tally`` and reporting progress."""
    n = chars = 0
    for doc in docs:
        n += 1
        chars += len(doc)
        tally[:] = [n, chars]
        if on_progress is not None and (n % 200 == 0 or n == total):
            on_progress("reading", n, total)
        yield doc
    if on_progress is not None:
        on_progress("reading", n, total)
        on_progress("learning", n, None)


def train_tokenizer(
    data_cfg: DataConfig,
    out_dir: str | os.PathLike[str],
    *,
    vocab_size: int,
    samples: int = DEFAULT_SAMPLES,
    seed: int | None = None,
    pad_to: int | None = None,
    min_frequency: int = MIN_FREQUENCY,
    overwrite: bool = False,
    on_progress: ProgressFn | None = None,
) -> TrainedTokenizer:
    """Train a byte-level BPE on the first ``samples`` training documents of ``data_cfg`` and write
    it to ``out_dir`` (loads with :func:`ramgpt.tokenizer.load_tokenizer` and ``AutoTokenizer``).

    ``seed`` orders the documents as the training stream does (default ``data.seed``); ``pad_to``
    pads the vocabulary to that many ids (:func:`pad_vocabulary`). The directory appears whole or not
    at all: the files are written next to it and renamed into place.
    """
    t0 = time.perf_counter()
    from ramgpt.data import documents

    if samples < 1:
        raise ConfigError(f"the number of sample documents must be at least 1, not {samples}")
    if vocab_size <= 257:
        raise ConfigError(f"vocab_size {vocab_size} is too small for a byte-level BPE (256 bytes + EOS + merges)")
    if pad_to is not None and pad_to < vocab_size:
        raise ConfigError(
            f"the tokenizer's vocab_size {vocab_size:,} exceeds the model's {pad_to:,} embedding rows; "
            f"lower it or raise model.vocab_size"
        )
    out = Path(out_dir).expanduser()
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        if not overwrite:
            raise ConfigError(
                f"{out} exists and is not empty; choose another directory "
                "(or replace it: ramgpt tokenizer train --overwrite)"
            )
    tally = [0, 0]
    docs = _counted(itertools.islice(documents(data_cfg, "train", seed=seed), samples), samples, on_progress, tally)
    tok = train_byte_level_bpe(
        docs,
        vocab_size=vocab_size,
        min_frequency=min_frequency,
        name=str(out),
        split_pattern=JAPANESE_SPLIT_PATTERN,
    )
    n_docs, n_chars = tally
    if n_docs == 0:
        raise DataError("no training documents to learn a tokenizer from (all held out for evaluation?)")
    learned = tok.vocab_size
    if pad_to is not None:
        tok = pad_vocabulary(tok, pad_to)
    if on_progress is not None:
        on_progress("saving", n_docs, None)
    meta = {
        "kind": "byte-level BPE",
        "trained_on": _describe_source(data_cfg),
        "documents": n_docs,
        "characters": n_chars,
        "samples": samples,
        "seed": data_cfg.seed if seed is None else int(seed),
        "vocab_size": vocab_size,
        "learned": learned,
        "padded_to": pad_to,
        "min_frequency": min_frequency,
        "split_pattern": JAPANESE_SPLIT_PATTERN,
    }
    _write_atomically(tok, out, meta, overwrite=overwrite)
    saved = load_tokenizer(str(out))
    return TrainedTokenizer(out, saved, n_docs, n_chars, learned, saved.vocab_size, time.perf_counter() - t0)


def _describe_source(cfg: DataConfig) -> str:
    if cfg.source == "hub":  # a local copy is named by its folder only: the path may be private
        name = cfg.dataset_name or ""
        name = Path(name).expanduser().name if Path(name).expanduser().is_dir() else name
        return f"hub {name}" + (f" ({cfg.dataset_config})" if cfg.dataset_config else "")
    if cfg.source == "embedded":
        return "embedded corpus"
    return f"{cfg.source} {Path(cfg.path or '').name}"  # the file name only: the path may be private


def _write_atomically(tok: TextTokenizer, out: Path, meta: dict[str, Any], *, overwrite: bool) -> None:
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
        try:
            tok.save(tmp)
            (tmp / META_FILE).write_text(json.dumps(meta, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
            if out.is_dir():
                shutil.rmtree(out)  # empty, or overwrite was asked for (checked before training)
            elif out.exists():
                out.unlink()
            os.replace(tmp, out)
        finally:
            if tmp.exists():
                shutil.rmtree(tmp, ignore_errors=True)
    except OSError as e:
        raise TokenizerError(f"cannot write the tokenizer to {out}: {e.strerror or e}") from e


def train_profile_tokenizer(
    profile: Profile,
    out_dir: str | os.PathLike[str],
    *,
    vocab_size: int | None = None,
    samples: int | None = None,
    seed: int | None = None,
    pad: bool = True,
    overwrite: bool = False,
    on_progress: ProgressFn | None = None,
) -> TrainedTokenizer:
    """:func:`train_tokenizer` on ``profile``'s data (what ``ramgpt tokenizer train`` runs):
    ``vocab_size`` defaults to ``model.vocab_size``, ``samples`` to :data:`DEFAULT_SAMPLES`, and
    ``pad`` pads the vocabulary to ``model.vocab_size``."""
    return train_tokenizer(
        profile.data,
        out_dir,
        vocab_size=vocab_size or profile.model.vocab_size,
        samples=samples or DEFAULT_SAMPLES,
        seed=seed,
        pad_to=profile.model.vocab_size if pad else None,
        overwrite=overwrite,
        on_progress=on_progress,
    )


def ensure_tokenizer(
    profile: Profile, run_dir: str | os.PathLike[str] | None = None, *, on_progress: ProgressFn | None = None
) -> TextTokenizer:
    """The tokenizer a run uses; what the trainer calls before the first step.

    With ``data.train_tokenizer: true`` the tokenizer is trained on the first
    ``data.tokenizer_samples`` training documents into ``RUN_DIR/tokenizer/`` (vocabulary
    ``data.tokenizer_vocab_size`` or ``model.vocab_size``, padded to ``model.vocab_size``), and a
    later call (a resumed run) loads the one saved there instead of training again. Otherwise it is
    ``load_tokenizer(data.tokenizer)``.
    """
    data = profile.data
    if not data.train_tokenizer:
        return load_tokenizer(data.tokenizer)
    target = Path(run_dir if run_dir is not None else profile.run_dir) / RUN_TOKENIZER_DIR
    if (target / "tokenizer.json").is_file():
        return load_tokenizer(str(target))
    result = train_tokenizer(
        data,
        target,
        vocab_size=data.tokenizer_vocab_size or profile.model.vocab_size,
        samples=data.tokenizer_samples,
        pad_to=profile.model.vocab_size,
        overwrite=True,  # an empty or partial leftover of an interrupted first start
        on_progress=on_progress,
    )
    return result.tokenizer


# ---------------------------------------------------------------------------------------------
# The embedded tokenizer (tools/build_tokenizer.py)


def _corpus_lines(files: list[Path]) -> Iterator[str]:
    for f in files:
        for line in f.read_text(encoding="utf-8").splitlines():
            if line.strip():
                yield line


def build_embedded(corpus_dir: Path, tokenizer_dir: Path, *, generate: bool = True) -> TextTokenizer:
    """Write the generated corpus file (with ``generate``) and train the embedded tokenizer on every
    ``.txt`` file of ``corpus_dir``, in file-name order, with the pattern it has always used."""
    from ramgpt.embedded_corpus import GENERATED, generate_lines

    if generate:
        (corpus_dir / GENERATED).write_text("\n".join(generate_lines()) + "\n", encoding="utf-8")
    files = sorted(p for p in corpus_dir.glob("*.txt") if p.is_file())
    tok = train_byte_level_bpe(
        _corpus_lines(files),
        vocab_size=EMBEDDED_VOCAB_SIZE,
        min_frequency=MIN_FREQUENCY,
        name="embedded",
        split_pattern=SPLIT_PATTERN,
    )
    tok.save(tokenizer_dir)
    return tok


def check_embedded(corpus_dir: Path | None = None, tokenizer_dir: Path = EMBEDDED_TOKENIZER_DIR) -> list[str]:
    """Rebuild into a temporary directory; the shipped files that a rebuild would change."""
    from ramgpt.data import EMBEDDED_CORPUS_DIR
    from ramgpt.embedded_corpus import GENERATED

    corpus_dir = corpus_dir or EMBEDDED_CORPUS_DIR
    with tempfile.TemporaryDirectory() as tmp:
        tmp_corpus, tmp_tok = Path(tmp) / "corpus", Path(tmp) / "tokenizer"
        tmp_corpus.mkdir()
        for f in sorted(corpus_dir.glob("*.txt")):
            if f.name != GENERATED:
                (tmp_corpus / f.name).write_bytes(f.read_bytes())
        build_embedded(tmp_corpus, tmp_tok, generate=True)
        pairs = [(corpus_dir / GENERATED, tmp_corpus / GENERATED)]
        pairs += [(tokenizer_dir / p.name, p) for p in sorted(tmp_tok.iterdir())]
        return [
            str(shipped)
            for shipped, new in pairs
            if not shipped.is_file() or shipped.read_bytes() != new.read_bytes()
        ]

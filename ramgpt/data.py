"""Training data: documents -> one token stream -> packed ``(x, y)`` blocks, resumable exactly.

Sources (``DataConfig.source``): ``embedded`` (the corpus shipped in ``ramgpt/assets/corpus``), ``text``
(a .txt file or a directory of them; one non-blank line = one document; plain Python, no ``datasets``),
and ``json`` / ``parquet`` / ``hub``, which all go through one ``datasets.load_dataset(...,
streaming=True)`` call (:func:`load_streaming_dataset`), so tests on local files exercise the Hub path.

How the stream is built (all deterministic given the seed):

* Eval hold-out: without ``eval_split``, the first ``max_eval_samples`` documents of the train split (in
  source order) are the eval set and are skipped by training. ``max_train_samples`` then caps the
  training documents per epoch.
* Shuffle: training documents are read in blocks of ``shuffle_buffer`` and each block is shuffled with
  a seed derived from ``(seed, epoch, block)``; ``shuffle_buffer: 1`` keeps source order. A block
  shuffle (rather than a sliding buffer) is what makes resuming cheap: the state only needs where the
  current block starts in the source, never the buffer's contents.
* Packing: each document becomes ``encode(text) + [eos]`` and the documents are concatenated. Sequence
  ``i`` takes tokens ``[i*L, i*L + L]`` (``L + 1`` tokens, ``L = seq_len``): ``x`` is the first ``L``,
  ``y`` the last ``L``. Consecutive sequences share one token (the last target of one is the first
  input of the next), so every token is a target exactly once and nothing is dropped.
* Epochs: at the end of the data the stream continues with the next epoch (reshuffled) and an event
  is queued for :meth:`TokenBatches.pop_events`; the token stream runs on across the boundary.

Resume: :meth:`TokenBatches.state_dict` is the position of the next sequence's first token: epoch,
block, where that block starts in the source (a line index, a file byte offset, or ``datasets``'
own iterator state), the document's index inside the shuffled block and the token offset inside it.
Restoring re-reads one block of documents (at most ``shuffle_buffer``) and tokenizes only from the
saved document on. If a source cannot seek (a ``datasets`` state that fails to load), it replays
the source from the start without tokenizing, which costs one read of the documents before the block.
"""

from __future__ import annotations

import codecs
import functools
import itertools
import json
import random
import warnings
from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch

from ramgpt.config import DataConfig
from ramgpt.errors import DataError
from ramgpt.fmt import first_line
from ramgpt.probe import hub_offline, hub_reachable
from ramgpt.tokenizer import TextTokenizer

EMBEDDED_CORPUS_DIR = Path(__file__).resolve().parent / "assets" / "corpus"
STATE_VERSION = 1
_ENCODE_CHUNK = 32  # documents tokenized per encode_batch call
_JSON_SUFFIXES = (".json", ".jsonl", ".ndjson")
_COMPRESSION_SUFFIXES = ("", ".gz", ".bz2", ".xz", ".zst")
# A text file is refused when its first _SNIFF_BYTES hold a NUL byte or more than
# _MAX_UNDECODABLE of them are not UTF-8: /bin/ls has NULs in its first bytes, UTF-16 text has a NUL
# in every other byte, while a UTF-8 file with a few stray Latin-1 bytes stays far below 10 % and is
# read (those bytes become U+FFFD) with one warning that counts them.
_SNIFF_BYTES = 1 << 20
_MAX_UNDECODABLE = 0.10
_SCAN_CHUNK = 1 << 20

Split = Literal["train", "eval"]


class UndecodableTextWarning(UserWarning):
    """A text data file holds bytes that are not UTF-8; they are read as U+FFFD (warned once per file)."""


# ---------------------------------------------------------------------------------------------
# Document readers. Each yields the non-blank documents of one split in source order, and
# ``position()`` says (as JSON) where the next read would start, so a reader can be reopened there.


class _ListReader:
    """Documents already in memory (the embedded corpus); the position is the list index."""

    def __init__(self, docs: list[str], start: Any = None) -> None:
        self._docs = docs
        self._i = int(start or 0)

    def __iter__(self) -> Iterator[str]:
        return self

    def __next__(self) -> str:
        if self._i >= len(self._docs):
            raise StopIteration
        self._i += 1
        return self._docs[self._i - 1]

    def position(self) -> Any:
        return self._i


class _TextReader:
    """Lines of .txt files read with plain Python; the position is ``[file index, byte offset]``."""

    def __init__(self, files: list[Path], start: Any = None) -> None:
        self._files = files
        self._fi, self._off = (int(start[0]), int(start[1])) if start else (0, 0)
        self._fh: Any = None

    def __iter__(self) -> Iterator[str]:
        return self

    def __next__(self) -> str:
        while self._fi < len(self._files):
            if self._fh is None:
                try:
                    self._fh = open(self._files[self._fi], "rb")  # noqa: SIM115 - closed at file end
                except OSError as e:
                    raise DataError(f"cannot read {self._files[self._fi]}: {e.strerror or e}") from e
                self._fh.seek(self._off)
            at_start = self._off == 0
            raw = self._fh.readline()
            if not raw:
                self._fh.close()
                self._fh = None
                self._fi, self._off = self._fi + 1, 0
                continue
            self._off = self._fh.tell()
            if at_start and raw.startswith(b"\xef\xbb\xbf"):
                raw = raw[3:]  # a UTF-8 byte-order mark is not text
            text = raw.decode("utf-8", errors="replace").rstrip("\r\n")
            if text.strip():
                return text
        raise StopIteration

    def position(self) -> Any:
        return [self._fi, self._off]

    def __del__(self) -> None:
        if self._fh is not None:
            self._fh.close()


class _DatasetReader:
    """Examples of a ``datasets`` streaming split; the position is the dataset's own ``state_dict``."""

    def __init__(self, cfg: DataConfig, split: str, start: Any = None) -> None:
        self._cfg = cfg
        self._what = _describe(cfg, split)
        self._ds = load_streaming_dataset(cfg, split)
        if start is not None:
            self._ds.load_state_dict(start)
        names = getattr(self._ds, "column_names", None)
        if names and cfg.text_column not in names:
            raise _missing_column(cfg, self._what, list(names))
        self._it: Iterator[dict[str, Any]] | None = None

    def __iter__(self) -> Iterator[str]:
        return self

    def __next__(self) -> str:
        if self._it is None:
            self._it = iter(self._ds)
        col = self._cfg.text_column
        while True:
            try:
                example = next(self._it)
            except StopIteration:
                raise
            except DataError:
                raise
            except Exception as e:  # network, parse and schema errors surface here when streaming
                raise DataError(f"reading {self._what} failed: {first_line(e)}") from e
            if col not in example:
                raise _missing_column(self._cfg, self._what, list(example))
            text = example[col]
            if isinstance(text, str) and text.strip():
                return text

    def position(self) -> Any:
        try:
            return self._ds.state_dict()
        except Exception:  # a datasets version or iterable without state: resume replays instead
            return None


def _missing_column(cfg: DataConfig, what: str, names: list[str]) -> DataError:
    have = ", ".join(str(n) for n in names) or "none"
    return DataError(f"column {cfg.text_column!r} not found in {what} (columns: {have}); set data.text_column")


def _describe(cfg: DataConfig, split: str) -> str:
    if cfg.source == "hub":
        conf = f", config {cfg.dataset_config!r}" if cfg.dataset_config else ""
        local = Path(cfg.dataset_name or "").expanduser()
        kind = "local copy of a hub dataset" if cfg.dataset_name and local.is_dir() else "hub dataset"
        return f"{kind} {cfg.dataset_name!r}{conf}, split {split!r}"
    if cfg.source == "embedded":
        return "the embedded corpus"
    return f"{cfg.source} data at {cfg.path}"


# ---------------------------------------------------------------------------------------------
# Sources


@functools.lru_cache(maxsize=1)
def _embedded_documents() -> tuple[str, ...]:
    files = sorted(EMBEDDED_CORPUS_DIR.glob("*.txt"))
    if not files:
        raise DataError(f"the embedded corpus is missing from {EMBEDDED_CORPUS_DIR} (broken install)")
    per_file = [[ln for ln in f.read_text(encoding="utf-8").splitlines() if ln.strip()] for f in files]
    # Round-robin over the files, so the held-out eval documents (the first ones) mix every topic
    # and both languages instead of being the first file.
    mixed = itertools.chain.from_iterable(itertools.zip_longest(*per_file))
    return tuple(d for d in mixed if d is not None)


def embedded_documents() -> list[str]:
    """The embedded corpus, one document per entry, in the order the ``embedded`` source reads it."""
    return list(_embedded_documents())


# Token ids of the embedded corpus per tokenizer (a micro run reads it every epoch). Small on purpose.
_EMBEDDED_TOKENS: dict[str, dict[str, np.ndarray]] = {}


def _embedded_token_table(tokenizer: TextTokenizer) -> dict[str, np.ndarray]:
    key = tokenizer.fingerprint
    table = _EMBEDDED_TOKENS.get(key)
    if table is None:
        docs = list(_embedded_documents())
        table = {}
        for doc, ids in zip(docs, tokenizer.encode_batch(docs), strict=True):
            arr = np.asarray([*ids, tokenizer.eos_id], dtype=np.int64)
            arr.flags.writeable = False
            table[doc] = arr
        if len(_EMBEDDED_TOKENS) >= 4:
            _EMBEDDED_TOKENS.pop(next(iter(_EMBEDDED_TOKENS)))
        _EMBEDDED_TOKENS[key] = table
    return table


def _local_files(cfg: DataConfig) -> list[Path]:
    """Files of a local source: the file itself, or the matching files under a directory, sorted."""
    if not cfg.path:
        raise DataError(f"data.path is required when data.source is {cfg.source!r}")
    root = Path(cfg.path).expanduser()
    if not root.exists():
        raise DataError(f"data.path {cfg.path} does not exist")
    if root.is_file():
        return [root]
    if cfg.source == "text":
        suffixes: tuple[str, ...] = (".txt",)
    elif cfg.source == "json":
        suffixes = tuple(s + c for s in _JSON_SUFFIXES for c in _COMPRESSION_SUFFIXES)
    else:
        suffixes = (".parquet",)
    files = sorted(p for p in root.rglob("*") if p.is_file() and p.name.lower().endswith(suffixes))
    if not files:
        raise DataError(f"no {'/'.join(suffixes[:3])} files under data.path {cfg.path}")
    return files


def _count_undecodable(buf: bytes, *, final: bool) -> tuple[int, int]:
    """``(bytes of buf that are not UTF-8, bytes consumed)``. Without ``final`` an incomplete character
    at the end is not counted and not consumed (it belongs to the next chunk)."""
    view = memoryview(buf)
    bad = pos = 0
    while pos < len(buf):
        try:
            _, used = codecs.utf_8_decode(view[pos:], "strict", final)
            return bad, pos + used
        except UnicodeDecodeError as e:  # e.start/e.end are relative to view[pos:]
            bad += e.end - e.start
            pos += e.end
    return bad, pos


# Undecodable byte counts of text files already checked in this process, by (path, size, mtime), so
# a file is read for the check and warned about once, not once per stream (train, eval) or epoch.
_TEXT_CHECKS: dict[tuple[str, int, int], int] = {}


def check_text_file(path: Path) -> int:
    """Check a ``text`` data file before training reads it; returns its count of non-UTF-8 bytes.

    Raises :class:`DataError` (one line, naming the file) when the file does not look like text: a
    NUL byte or more than 10 % undecodable bytes in its first MiB. Otherwise any undecodable bytes
    are read as U+FFFD and one :class:`UndecodableTextWarning` per file and process says how many.
    Reads the whole file once before training (100 MB/s measured on a busy 2-core machine).
    """
    try:
        st = path.stat()
        key = (str(path.resolve()), st.st_size, st.st_mtime_ns)
        if key in _TEXT_CHECKS:
            return _TEXT_CHECKS[key]
        with open(path, "rb") as fh:
            head = fh.read(_SNIFF_BYTES)
            if b"\x00" in head:
                raise DataError(
                    f"data file {path} is not UTF-8 text (it holds NUL bytes: a binary or UTF-16 file); "
                    "convert it to UTF-8 or remove it from data.path"
                )
            more = fh.read(_SCAN_CHUNK)
            bad, used = _count_undecodable(head, final=not more)
            if bad > _MAX_UNDECODABLE * len(head):
                raise DataError(
                    f"data file {path} is not UTF-8 text ({bad:,} of its first {len(head):,} bytes cannot be "
                    "decoded); convert it to UTF-8 or remove it from data.path"
                )
            carry = head[used:]
            while more:
                chunk, more = carry + more, fh.read(_SCAN_CHUNK)
                n, used = _count_undecodable(chunk, final=not more)
                bad, carry = bad + n, chunk[used:]
    except OSError as e:
        raise DataError(f"cannot read {path}: {e.strerror or e}") from e
    if bad:
        warnings.warn(
            f"{path}: {bad:,} bytes are not UTF-8; they are read as U+FFFD replacement characters",
            UndecodableTextWarning,
            stacklevel=2,
        )
    _TEXT_CHECKS[key] = bad
    return bad


def load_streaming_dataset(cfg: DataConfig, split: str) -> Any:
    """The one ``datasets.load_dataset(..., streaming=True)`` call behind json, parquet and hub.

    Local files become ``data_files={split: files}`` of the packaged json/parquet builders; a Hub
    dataset is ``(dataset_name, dataset_config)``, where ``dataset_name`` may also be a local copy of
    the Hub repository (:func:`local_hub_dataset`; no network needed). Failures become one-line :class:`DataError`\\ s; an
    unreachable Hub is detected with a quick probe instead of the hub client's long retries.
    """
    local_hub = local_hub_dataset(cfg) if cfg.source == "hub" else None
    kwargs: dict[str, Any] = {}
    if local_hub is not None:
        # A local copy of the Hub repository: datasets reads its README's `configs:` itself.
        what = _describe(cfg, split)
        args: tuple[Any, ...] = (str(local_hub), cfg.dataset_config)
    elif cfg.source == "hub":
        what = _describe(cfg, split)
        hint = (
            "download it once (hf download REPO --repo-type dataset --local-dir DIR) and set data.dataset_name "
            "to DIR, or use data.source: text (a .txt file or directory) or json/parquet with a local data.path"
        )
        if hub_offline(("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE")):
            raise DataError(f"cannot stream {what}: offline mode is set (HF_HUB_OFFLINE); {hint}")
        if not hub_reachable():
            raise DataError(f"cannot stream {what}: the Hugging Face Hub cannot be reached; {hint}")
        args = (cfg.dataset_name, cfg.dataset_config)
    elif cfg.source in ("json", "parquet"):
        if split != cfg.train_split:
            raise DataError(
                f"data.eval_split {split!r} is set, but local {cfg.source} data at {cfg.path} has one split; "
                "leave eval_split empty to hold out the first max_eval_samples documents"
            )
        files = _local_files(cfg)
        args = (cfg.source,)
        kwargs["data_files"] = {split: [str(f) for f in files]}
        what = _describe(cfg, split)
    else:
        raise DataError(f"source {cfg.source!r} is not read through datasets")
    try:
        import datasets
    except ImportError as e:  # pragma: no cover - datasets is a dependency
        raise DataError(f"data.source {cfg.source!r} needs the datasets package: {e}") from e
    # For local files, datasets still sends a download-count request for the packaged builder
    # ("json"/"parquet"); offline that request waits on DNS for seconds on every load. It counts
    # nothing of the user's, so it is switched off for the duration of a local load.
    remote = cfg.source == "hub" and local_hub is None
    counts = getattr(datasets.config, "HF_UPDATE_DOWNLOAD_COUNTS", None)
    if not remote and counts is not None:
        datasets.config.HF_UPDATE_DOWNLOAD_COUNTS = False
    try:
        return datasets.load_dataset(*args, split=split, streaming=True, **kwargs)
    except Exception as e:
        raise DataError(f"cannot load {what}: {first_line(e)}") from e
    finally:
        if not remote and counts is not None:
            datasets.config.HF_UPDATE_DOWNLOAD_COUNTS = counts


def local_hub_dataset(cfg: DataConfig) -> Path | None:
    """The local directory ``data.dataset_name`` names for ``source: hub``, or None for a Hub id.

    A directory laid out like the Hub repository (what ``hf download REPO --repo-type dataset
    --local-dir DIR`` writes: data files plus a README whose ``configs:`` name each configuration
    and its ``data_files``) is read by ``datasets`` without a network, so it needs no Hub probe.
    A name that is clearly a path (absolute, ``./``, ``~``, or more than one ``/``) but is not a
    directory is an error here rather than a failed Hub lookup.
    """
    name = (cfg.dataset_name or "").strip()
    if not name:
        return None
    path = Path(name).expanduser()
    if path.is_dir():
        return path
    if path.exists():
        raise DataError(
            f"data.dataset_name {name} is a file; use data.source: parquet or json with data.path for local files"
        )
    if name.startswith(("/", ".", "~")) or "\\" in name or name.count("/") > 1:
        raise DataError(
            f"data.dataset_name {name} is not an existing directory (a local copy of a Hub dataset) "
            "nor a Hub id such as owner/name"
        )
    return None


class _Source:
    """Opens readers of one split of the configured source."""

    def __init__(self, cfg: DataConfig, split: str) -> None:
        self.cfg = cfg
        self.split = split
        self.what = _describe(cfg, split)
        if cfg.source == "embedded":
            self._docs = list(_embedded_documents())
        elif cfg.source == "text":
            if split != cfg.train_split:
                raise DataError(
                    f"data.eval_split {split!r} is set, but text data has no splits; leave eval_split empty "
                    "to hold out the first max_eval_samples documents"
                )
            self._files = _local_files(cfg)
            for f in self._files:
                check_text_file(f)
        elif cfg.source in ("json", "parquet"):
            _local_files(cfg)  # fail early, naming the path, before datasets is imported
        elif cfg.source == "hub":
            if not cfg.dataset_name:
                raise DataError("data.dataset_name is required when data.source is 'hub'")
            local_hub_dataset(cfg)  # a mistyped local path fails here, naming it

    def open(self, position: Any = None) -> _ListReader | _TextReader | _DatasetReader:
        if self.cfg.source == "embedded":
            return _ListReader(self._docs, position)
        if self.cfg.source == "text":
            return _TextReader(self._files, position)
        return _DatasetReader(self.cfg, self.split, position)


# ---------------------------------------------------------------------------------------------
# Document order: which documents a split holds and in what order each epoch reads them


class _DocumentOrder:
    """The documents of one split in epoch order: held-out eval documents skipped (train), at most
    ``limit`` per epoch, read in blocks of ``block_size`` that are shuffled with a seed derived from
    ``(seed, epoch, block)``."""

    def __init__(self, cfg: DataConfig, split: Split, seed: int) -> None:
        held_out_of_train = cfg.eval_split is None
        self.seed = seed
        if split == "train":
            self.source = _Source(cfg, cfg.train_split)
            self.skip = cfg.max_eval_samples if held_out_of_train else 0
            self.limit = cfg.max_train_samples
            self.block_size = cfg.shuffle_buffer
        else:
            self.source = _Source(cfg, cfg.train_split if held_out_of_train else cfg.eval_split)
            self.skip = 0
            self.limit = cfg.max_eval_samples
            self.block_size = 1  # eval keeps source order

    def blocks(self, epoch: int, first_block: int = 0, block_position: Any = None) -> Iterator[tuple[int, Any, list[str]]]:
        """``(block index, where the block starts in the source, its shuffled documents)`` of one
        epoch, starting at ``first_block``."""
        size, limit = self.block_size, self.limit
        reader = None
        if first_block > 0 and block_position is not None:
            try:
                reader = self.source.open(block_position)
            except DataError:
                raise
            except Exception:
                reader = None  # cannot seek: replay below
        if reader is None:
            reader = self.source.open(None)
            skip = self.skip + first_block * size
            if skip:
                skipped = sum(1 for _ in itertools.islice(reader, skip))
                if skipped < self.skip:
                    raise self.held_out_error(skipped)
        done, block = first_block * size, first_block
        while limit is None or done < limit:
            position = reader.position()
            want = size if limit is None else min(size, limit - done)
            docs = list(itertools.islice(reader, want))
            if not docs:
                return
            if size > 1:
                random.Random(f"ramgpt-data:{self.seed}:{epoch}:{block}").shuffle(docs)
            yield block, position, docs
            done += len(docs)
            block += 1
            if len(docs) < want:
                return

    def held_out_error(self, found: int) -> DataError:
        return DataError(
            f"{self.source.what} has only {found} documents, all held out for evaluation "
            f"(data.max_eval_samples={self.skip}); lower max_eval_samples or set data.eval_split"
        )


def documents(data_cfg: DataConfig, split: Split = "train", *, seed: int | None = None) -> Iterator[str]:
    """The documents of ``split`` in the order :class:`TokenBatches` reads them in its first epoch.

    ``train`` leaves out the held-out eval documents and is block-shuffled with ``seed`` (default
    ``data.seed``); ``eval`` is the eval documents in source order. Reads lazily: take what you need
    with ``itertools.islice`` (what ``ramgpt tokenizer train`` and ``tokenizer stats`` do).
    """
    if split not in ("train", "eval"):
        raise ValueError(f"split must be 'train' or 'eval', not {split!r}")
    order = _DocumentOrder(data_cfg, split, data_cfg.seed if seed is None else int(seed))
    for _, _, docs in order.blocks(0):
        yield from docs


# ---------------------------------------------------------------------------------------------
# The packed token stream


@dataclass(frozen=True)
class _Where:
    """A document in the stream: epoch, shuffle block, where that block starts in the source, and
    the document's index inside the shuffled block."""

    epoch: int
    block: int
    block_position: Any
    doc: int


class TokenBatches:
    """Packed ``(x, y)`` batches from one split, resumable exactly.

    ``split="train"`` is the shuffled training stream (without the held-out eval documents);
    ``split="eval"`` is the eval documents in source order. ``seed`` defaults to ``data_cfg.seed``.
    ``next_batch`` never stops: the end of the data starts the next epoch and queues an event.
    """

    def __init__(
        self,
        data_cfg: DataConfig,
        tokenizer: TextTokenizer,
        split: Split = "train",
        micro_batch_size: int = 1,
        seed: int | None = None,
    ) -> None:
        if split not in ("train", "eval"):
            raise ValueError(f"split must be 'train' or 'eval', not {split!r}")
        if micro_batch_size < 1:
            raise ValueError("micro_batch_size must be >= 1")
        self.cfg = data_cfg
        self.tokenizer = tokenizer
        self.split: Split = split
        self.micro_batch_size = micro_batch_size
        self.seed = data_cfg.seed if seed is None else int(seed)
        self.seq_len = data_cfg.seq_len
        self._order = _DocumentOrder(data_cfg, split, self.seed)
        self._token_table = _embedded_token_table(tokenizer) if data_cfg.source == "embedded" else None
        self._events: list[str] = []
        self._reset(_Where(0, 0, None, 0), 0, epochs_finished=0)

    # -- public API ---------------------------------------------------------------------------

    @property
    def epoch(self) -> int:
        """Epochs finished so far (0 while the first pass is being read)."""
        return self._epochs_finished

    def pop_events(self) -> list[str]:
        """Events since the last call (epoch boundaries), oldest first."""
        events, self._events = self._events, []
        return events

    def next_batch(self, n_seqs: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """``(x, y)``, each a LongTensor ``(n_seqs, seq_len)``; ``y[:, t] == x[:, t + 1]`` within a row."""
        n = self.micro_batch_size if n_seqs is None else int(n_seqs)
        if n < 1:
            raise ValueError("n_seqs must be >= 1")
        rows = np.stack([self._next_sequence() for _ in range(n)])  # (n, L + 1)
        block = torch.from_numpy(rows)
        return block[:, :-1].contiguous(), block[:, 1:].contiguous()

    def state_dict(self) -> dict[str, Any]:
        """JSON-serialisable position of the next sequence (plus a check of what determines order)."""
        if self._segments:
            where, _, offset = self._segments[0]
        else:
            where, offset = self._start, self._start_offset
        return {
            "version": STATE_VERSION,
            "split": self.split,
            "epoch": where.epoch,
            "block": where.block,
            "block_position": where.block_position,
            "doc": where.doc,
            "offset": int(offset),
            "epochs_finished": self._epochs_finished,
            "order": self._order_check(),
        }

    def load_state_dict(self, state: dict[str, Any], *, strict: bool = True) -> None:
        """Continue exactly where ``state`` was taken.

        With ``strict`` (default), a state saved under a different source, seed, shuffle buffer,
        sample limits or tokenizer raises :class:`DataError` naming the fields, because the saved
        position would point into a different stream. With ``strict=False`` the stream restarts at
        the beginning of the saved epoch instead and an event says so. ``seq_len`` may change freely:
        positions count tokens, not sequences.
        """
        if not isinstance(state, dict) or state.get("version") != STATE_VERSION:
            raise DataError(
                f"unsupported data state (version {state.get('version') if isinstance(state, dict) else None})"
            )
        if state.get("split", self.split) != self.split:
            raise DataError(f"data state is for the {state.get('split')!r} stream, not {self.split!r}")
        saved, now = state.get("order", {}), self._order_check()
        changed = sorted(k for k in set(saved) | set(now) if saved.get(k) != now.get(k))
        epoch = int(state["epoch"])
        finished = int(state.get("epochs_finished", epoch))
        if changed:
            detail = ", ".join(f"{k}: {saved.get(k)!r} -> {now.get(k)!r}" for k in changed)
            if strict:
                raise DataError(f"cannot resume the data position: the data settings changed ({detail})")
            self._reset(_Where(epoch, 0, None, 0), 0, epochs_finished=finished)
            self._events.append(f"data settings changed ({detail}); restarting epoch {epoch + 1} from its beginning")
            return
        where = _Where(epoch, int(state["block"]), state.get("block_position"), int(state["doc"]))
        self._reset(where, int(state["offset"]), epochs_finished=finished)

    # -- internals ----------------------------------------------------------------------------

    def _order_check(self) -> dict[str, Any]:
        c = self.cfg
        return {
            "source": c.source,
            "path": c.path,
            "dataset": [c.dataset_name, c.dataset_config],
            "splits": [c.train_split, c.eval_split],
            "text_column": c.text_column,
            "seed": self.seed,
            "shuffle_buffer": self._order.block_size,
            "max_train_samples": c.max_train_samples,
            "max_eval_samples": c.max_eval_samples,
            "tokenizer": self.tokenizer.fingerprint,
        }

    def _reset(self, start: _Where, offset: int, *, epochs_finished: int) -> None:
        self._start, self._start_offset = start, offset
        self._epochs_finished = epochs_finished
        # Pending tokens: (document, its tokens, index of the first token not yet passed).
        self._segments: deque[tuple[_Where, np.ndarray, int]] = deque()
        self._pending = 0
        self._docs: Iterator[tuple[_Where, np.ndarray, int]] | None = None

    def _next_sequence(self) -> np.ndarray:
        need = self.seq_len + 1
        if self._docs is None:
            self._docs = self._stream(self._start, self._start_offset)
        while self._pending < need:
            where, toks, off = next(self._docs)
            self._segments.append((where, toks, off))
            self._pending += len(toks) - off
        parts, got = [], 0
        for _, toks, off in self._segments:
            take = min(len(toks) - off, need - got)
            parts.append(toks[off : off + take])
            got += take
            if got == need:
                break
        # Advance by seq_len: the last token of this sequence starts the next one.
        drop = self.seq_len
        self._pending -= drop
        while drop:
            where, toks, off = self._segments[0]
            left = len(toks) - off
            if left <= drop:
                self._segments.popleft()
                drop -= left
            else:
                self._segments[0] = (where, toks, off + drop)
                drop = 0
        return np.concatenate(parts)

    def _encode(self, texts: list[str]) -> list[np.ndarray]:
        eos = self.tokenizer.eos_id
        if self._token_table is not None:
            table = self._token_table
            out = [table.get(t) for t in texts]
            if all(a is not None for a in out):
                return out  # type: ignore[return-value]
        return [np.asarray([*ids, eos], dtype=np.int64) for ids in self.tokenizer.encode_batch(texts)]

    def _stream(self, start: _Where, start_offset: int) -> Iterator[tuple[_Where, np.ndarray, int]]:
        """Tokenized documents from ``start`` on, across epochs, forever, as (where, tokens, first
        unread token). Only the resumed document starts past token 0, so offsets stay relative to
        whole documents and a state taken later is valid on its own."""
        epoch, first_block, first_position = start.epoch, start.block, start.block_position
        # (doc, offset) to skip to inside the very first block; None once that block is done.
        resume: tuple[int, int] | None = (start.doc, start_offset)
        partial_epoch = (start.block, start.doc, start_offset) != (0, 0, 0)
        while True:
            n_docs = n_tokens = 0
            for block, position, docs in self._order.blocks(epoch, first_block, first_position):
                first_doc, first_offset = resume or (0, 0)
                resume = None
                n_docs = block * self._order.block_size + len(docs)
                for c in range(first_doc, len(docs), _ENCODE_CHUNK):
                    for j, toks in enumerate(self._encode(docs[c : c + _ENCODE_CHUNK]), start=c):
                        off = first_offset if j == first_doc else 0
                        n_tokens += len(toks) - off
                        yield _Where(epoch, block, position, j), toks, off
            if n_docs == 0:
                raise self._empty_error()
            if not partial_epoch and n_tokens < self.seq_len + 1:
                raise DataError(
                    f"{self._order.source.what} yields only {n_tokens} tokens from {n_docs} documents, fewer than one "
                    f"sequence of data.seq_len + 1 = {self.seq_len + 1}; add text or lower data.seq_len"
                )
            if epoch + 1 > self._epochs_finished:
                self._epochs_finished = epoch + 1
                self._events.append(
                    f"epoch {epoch + 1} finished after {n_docs} documents; starting epoch {epoch + 2}"
                    + ("" if self.split == "train" else " (eval)")
                )
            epoch, first_block, first_position, partial_epoch = epoch + 1, 0, None, False

    def _empty_error(self) -> DataError:
        what = self._order.source.what
        if self.split == "train" and self._order.skip:
            return DataError(
                f"{what} has no training documents left after holding out the first "
                f"{self._order.skip} for evaluation; lower data.max_eval_samples or set data.eval_split"
            )
        return DataError(f"{what} holds no non-empty documents")


def eval_batches(
    data_cfg: DataConfig, tokenizer: TextTokenizer, n_batches: int, batch_size: int
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """The eval set as ``n_batches`` packed batches; the same list on every call.

    Reads the eval documents each call (a Hub source streams them again), so call it once and keep
    the list. If the eval documents hold fewer tokens than requested, they repeat in order.
    """
    stream = TokenBatches(data_cfg, tokenizer, split="eval", micro_batch_size=batch_size)
    return [stream.next_batch() for _ in range(n_batches)]


def state_to_json(state: dict[str, Any]) -> str:
    """The data state as compact JSON (what checkpoints store)."""
    return json.dumps(state, separators=(",", ":"), sort_keys=True)

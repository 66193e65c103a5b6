"""Data sources, packing, epochs and exact resume."""

from __future__ import annotations

import itertools
import json
import time
from collections import Counter
from pathlib import Path
from typing import Any

import pytest
import torch

from ramgpt.config import DataConfig
from ramgpt.data import TokenBatches, documents, embedded_documents, eval_batches
from ramgpt.errors import DataError
from ramgpt.tokenizer import TextTokenizer, load_tokenizer

# Thirty short, distinct documents: "文書{i}" makes each one identifiable after decoding.
DOCS = [f"文書{i}番。{'春夏秋冬'[i % 4]}の話をします。Document number {i} has {i % 7 + 1} words." for i in range(30)]


@pytest.fixture(scope="module")
def tok() -> TextTokenizer:
    return load_tokenizer("embedded")


def cfg(**kw: Any) -> DataConfig:
    base: dict[str, Any] = {"seq_len": 16, "max_eval_samples": 2, "shuffle_buffer": 4, "seed": 7}
    base.update(kw)
    return DataConfig(**base)


def write_text(path: Path, docs: list[str]) -> Path:
    path.write_text("\n".join(docs) + "\n", encoding="utf-8")
    return path


def write_jsonl(path: Path, docs: list[str], column: str = "text") -> Path:
    path.write_text(
        "".join(json.dumps({column: d, "id": i}, ensure_ascii=False) + "\n" for i, d in enumerate(docs)),
        encoding="utf-8",
    )
    return path


def write_parquet(path: Path, docs: list[str]) -> Path:
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"text": docs, "id": list(range(len(docs)))}), path, row_group_size=7)
    return path


def batches(tb: TokenBatches, n: int, size: int = 3) -> list[tuple[torch.Tensor, torch.Tensor]]:
    return [tb.next_batch(size) for _ in range(n)]


def token_stream(tb: TokenBatches, n_seqs: int) -> list[int]:
    """The underlying token stream: sequences overlap by one token, so it is the first input token
    followed by every row of targets."""
    x, y = tb.next_batch(n_seqs)
    return [int(x[0, 0])] + y.flatten().tolist()


def expected_stream(tok: TextTokenizer, docs: list[str]) -> list[int]:
    out: list[int] = []
    for d in docs:
        out += tok.encode(d) + [tok.eos_id]
    return out


# --- shapes and packing ------------------------------------------------------------------------


def test_batch_shapes_dtypes_and_shift(tok: TextTokenizer) -> None:
    tb = TokenBatches(cfg(source="embedded", seq_len=32), tok, "train", micro_batch_size=4)
    x, y = tb.next_batch()
    assert x.shape == y.shape == (4, 32)
    assert x.dtype == y.dtype == torch.long
    assert torch.equal(x[:, 1:], y[:, :-1])
    # Consecutive sequences share one token: each row's last target is the next row's first input.
    assert torch.equal(y[:-1, -1], x[1:, 0])
    x2, _ = tb.next_batch(2)
    assert x2.shape == (2, 32)
    assert int(x2[0, 0]) == int(y[-1, -1])
    assert int(x.max()) < tok.vocab_size


def test_text_stream_is_documents_with_eos_between(tok: TextTokenizer, tmp_path: Path) -> None:
    path = write_text(tmp_path / "docs.txt", DOCS[:6])
    tb = TokenBatches(cfg(source="text", path=str(path), shuffle_buffer=1, max_eval_samples=1), tok)
    want = expected_stream(tok, DOCS[1:6])  # the first document is held out for eval
    got = token_stream(tb, 8)
    assert got[: len(want)] == want
    assert got[len(want) :] == want[: len(got) - len(want)]  # the next epoch starts over, in order
    assert want.count(tok.eos_id) == 5


def test_directory_of_text_files_is_read_recursively_sorted_skipping_blank_lines(
    tok: TextTokenizer, tmp_path: Path
) -> None:
    (tmp_path / "sub").mkdir()
    write_text(tmp_path / "b.txt", ["B1", "", "   ", "B2"])
    write_text(tmp_path / "a.txt", ["A1"])
    write_text(tmp_path / "sub" / "c.txt", ["C1"])
    (tmp_path / "ignored.md").write_text("not text data\n", encoding="utf-8")
    tb = TokenBatches(cfg(source="text", path=str(tmp_path), shuffle_buffer=1, max_eval_samples=1, seq_len=8), tok)
    want = expected_stream(tok, ["B1", "B2", "C1"])  # A1 held out
    assert token_stream(tb, 3)[: len(want)] == want


# --- order ---------------------------------------------------------------------------------------


def test_same_seed_same_batches_other_seed_other_order(tok: TextTokenizer) -> None:
    a = batches(TokenBatches(cfg(source="embedded", shuffle_buffer=64), tok), 5)
    b = batches(TokenBatches(cfg(source="embedded", shuffle_buffer=64), tok), 5)
    c = batches(TokenBatches(cfg(source="embedded", shuffle_buffer=64), tok, seed=8), 5)
    assert all(torch.equal(x1, x2) and torch.equal(y1, y2) for (x1, y1), (x2, y2) in zip(a, b, strict=True))
    assert not all(torch.equal(x1, x3) for (x1, _), (x3, _) in zip(a, c, strict=True))


def test_shuffle_buffer_shuffles_within_blocks_and_reshuffles_each_epoch(tok: TextTokenizer, tmp_path: Path) -> None:
    path = write_text(tmp_path / "docs.txt", DOCS)
    base = {"source": "text", "path": str(path), "seq_len": 8, "max_eval_samples": 2}
    plain = TokenBatches(cfg(**base, shuffle_buffer=1), tok)
    shuf = TokenBatches(cfg(**base, shuffle_buffer=10), tok)
    order_plain = [_doc_ids(plain, 28)]
    reader = DocReader(shuf)
    order_shuf = [reader.take(28), reader.take(28)]
    assert order_plain[0] == list(range(2, 30))
    for order in order_shuf:
        assert sorted(order) == list(range(2, 30))  # every training document once per epoch
        assert order != list(range(2, 30))
        # Blocks of 10 documents: each block is a permutation of its source slice.
        assert [sorted(order[i : i + 10]) for i in (0, 10)] == [list(range(2, 12)), list(range(12, 22))]
    assert order_shuf[0] != order_shuf[1]  # epoch 2 is shuffled differently


class DocReader:
    """Reads a stream one sequence at a time and returns the numbers of whole documents (文書{i}番)."""

    def __init__(self, tb: TokenBatches) -> None:
        self.tb = tb
        self.tokens = self._tokens()
        self.current: list[int] = []

    def _tokens(self):  # type: ignore[no-untyped-def]
        x, y = self.tb.next_batch(1)
        yield int(x[0, 0])
        while True:
            yield from y[0].tolist()
            _, y = self.tb.next_batch(1)

    def take(self, n_docs: int) -> list[int]:
        tok, found = self.tb.tokenizer, []
        while len(found) < n_docs:
            t = next(self.tokens)
            if t != tok.eos_id:
                self.current.append(t)
                continue
            text = tok.decode(self.current)
            self.current = []
            found.append(int(text.split("番")[0].removeprefix("文書")))
        return found


def _doc_ids(tb: TokenBatches, n_docs: int) -> list[int]:
    return DocReader(tb).take(n_docs)


# --- epochs and limits -------------------------------------------------------------------------


def test_end_of_data_queues_an_epoch_event_and_continues(tok: TextTokenizer, tmp_path: Path) -> None:
    path = write_text(tmp_path / "docs.txt", DOCS[:10])
    tb = TokenBatches(cfg(source="text", path=str(path), max_eval_samples=2), tok)
    assert tb.epoch == 0
    seen: list[str] = []
    for _ in range(200):
        tb.next_batch(2)
        seen += tb.pop_events()
        if len(seen) >= 2:
            break
    assert seen[:2] == [
        "epoch 1 finished after 8 documents; starting epoch 2",
        "epoch 2 finished after 8 documents; starting epoch 3",
    ]
    assert tb.epoch == 2
    assert tb.pop_events() == []


def test_max_train_samples_limits_documents_per_epoch(tok: TextTokenizer, tmp_path: Path) -> None:
    path = write_text(tmp_path / "docs.txt", DOCS)
    tb = TokenBatches(
        cfg(source="text", path=str(path), max_eval_samples=2, max_train_samples=3, shuffle_buffer=1), tok
    )
    assert _doc_ids(tb, 7) == [2, 3, 4, 2, 3, 4, 2]
    assert any(e.startswith("epoch 1 finished after 3 documents") for e in tb.pop_events())


def test_eval_is_the_held_out_head_in_source_order(tok: TextTokenizer, tmp_path: Path) -> None:
    path = write_text(tmp_path / "docs.txt", DOCS)
    c = cfg(source="text", path=str(path), max_eval_samples=3, seq_len=8)
    ev = TokenBatches(c, tok, "eval")
    assert _doc_ids(ev, 6) == [0, 1, 2, 0, 1, 2]
    train_ids = _doc_ids(TokenBatches(c, tok), 27)
    assert sorted(train_ids) == list(range(3, 30))  # no eval document is trained on


def test_eval_batches_are_deterministic(tok: TextTokenizer) -> None:
    c = cfg(source="embedded", seq_len=32, max_eval_samples=8)
    a = eval_batches(c, tok, n_batches=3, batch_size=2)
    b = eval_batches(c, tok, n_batches=3, batch_size=2)
    assert len(a) == 3 and a[0][0].shape == (2, 32)
    assert all(torch.equal(x1, x2) and torch.equal(y1, y2) for (x1, y1), (x2, y2) in zip(a, b, strict=True))
    head = expected_stream(tok, embedded_documents()[:1])
    assert a[0][0][0].tolist() == head[:32]


# --- exact resume --------------------------------------------------------------------------------


def _source_cfg(kind: str, tmp_path: Path, **kw: Any) -> DataConfig:
    if kind == "embedded":
        return cfg(source="embedded", seq_len=64, shuffle_buffer=40, max_eval_samples=8, **kw)
    if kind == "text":
        return cfg(source="text", path=str(write_text(tmp_path / "d.txt", DOCS)), **kw)
    if kind == "json":
        return cfg(source="json", path=str(write_jsonl(tmp_path / "d.jsonl", DOCS)), **kw)
    return cfg(source="parquet", path=str(write_parquet(tmp_path / "d.parquet", DOCS)), **kw)


@pytest.mark.parametrize("kind", ["embedded", "text", "json", "parquet"])
def test_resume_gives_identical_batches(tok: TextTokenizer, tmp_path: Path, kind: str) -> None:
    c = _source_cfg(kind, tmp_path)
    full = TokenBatches(c, tok, micro_batch_size=3)
    reference: list[tuple[torch.Tensor, torch.Tensor]] = []
    boundary = None  # index of the batch during which the first epoch ended
    while boundary is None or len(reference) < boundary + 5:
        reference.append(full.next_batch())
        if full.pop_events() and boundary is None:
            boundary = len(reference) - 1
    assert boundary > 3
    # Save early, just before, at and just after the epoch boundary (mid-epoch positions of epoch 2).
    for n in (2, boundary - 1, boundary, boundary + 1, boundary + 2):
        first = TokenBatches(c, tok, micro_batch_size=3)
        batches(first, n)
        state = json.loads(json.dumps(first.state_dict()))  # must survive JSON
        resumed = TokenBatches(c, tok, micro_batch_size=3)
        resumed.load_state_dict(state)
        assert resumed.epoch == first.epoch
        got = batches(resumed, 3)
        for i, ((x, y), (rx, ry)) in enumerate(zip(got, reference[n : n + 3], strict=True)):
            assert torch.equal(x, rx) and torch.equal(y, ry), f"{kind}: batch {n + i} differs after resuming at {n}"


def test_resume_after_every_batch_and_chained(tok: TextTokenizer, tmp_path: Path) -> None:
    """Every save point over two epochs, with a shuffle block that does not divide the data and a
    train limit; then save/restore repeatedly from already-resumed streams."""
    c = cfg(source="text", path=str(write_text(tmp_path / "d.txt", DOCS)), shuffle_buffer=5, max_train_samples=23)
    reference = batches(TokenBatches(c, tok, micro_batch_size=2), 40, size=2)
    for n in range(0, 36):
        first = TokenBatches(c, tok, micro_batch_size=2)
        batches(first, n, size=2)
        resumed = TokenBatches(c, tok, micro_batch_size=2)
        resumed.load_state_dict(first.state_dict())
        assert torch.equal(resumed.next_batch()[0], reference[n][0]), f"resume after {n} batches"
    stream = TokenBatches(c, tok, micro_batch_size=2)
    for n in range(40):
        restored = TokenBatches(c, tok, micro_batch_size=2)
        restored.load_state_dict(json.loads(json.dumps(stream.state_dict())))
        stream = restored
        x, y = stream.next_batch()
        assert torch.equal(x, reference[n][0]) and torch.equal(y, reference[n][1]), f"chained resume at {n}"


def test_resume_does_not_repeat_epoch_events(tok: TextTokenizer, tmp_path: Path) -> None:
    c = _source_cfg("text", tmp_path)
    tb = TokenBatches(c, tok, micro_batch_size=3)
    while not tb.pop_events():
        tb.next_batch()
    resumed = TokenBatches(c, tok, micro_batch_size=3)
    resumed.load_state_dict(tb.state_dict())
    assert resumed.epoch == 1
    for _ in range(3):
        resumed.next_batch()
    assert not any(e.startswith("epoch 1 ") for e in resumed.pop_events())


def test_resume_without_a_seekable_source_replays(
    tok: TextTokenizer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """When datasets' iterator state is unavailable the stream replays the source; same batches."""
    from ramgpt import data

    c = _source_cfg("json", tmp_path)
    reference = batches(TokenBatches(c, tok, micro_batch_size=3), 12)
    monkeypatch.setattr(data._DatasetReader, "position", lambda self: None)
    first = TokenBatches(c, tok, micro_batch_size=3)
    batches(first, 8)
    state = first.state_dict()
    assert state["block_position"] is None and state["block"] > 0
    resumed = TokenBatches(c, tok, micro_batch_size=3)
    resumed.load_state_dict(state)
    got = batches(resumed, 4)
    assert all(torch.equal(a[0], b[0]) for a, b in zip(got, reference[8:], strict=True))


def test_state_is_small_json(tok: TextTokenizer, tmp_path: Path) -> None:
    tb = TokenBatches(_source_cfg("json", tmp_path), tok, micro_batch_size=3)
    batches(tb, 4)
    assert len(json.dumps(tb.state_dict())) < 2000


def test_resume_with_a_longer_seq_len_continues_at_the_same_token(tok: TextTokenizer) -> None:
    short = TokenBatches(cfg(source="embedded", seq_len=16), tok)
    batches(short, 3)
    state = short.state_dict()
    expected_next = short.next_batch(1)[0][0, :16]
    longer = TokenBatches(cfg(source="embedded", seq_len=48), tok)
    longer.load_state_dict(state)
    assert torch.equal(longer.next_batch(1)[0][0, :16], expected_next)


def test_changed_settings_refuse_or_restart_the_epoch(tok: TextTokenizer) -> None:
    tb = TokenBatches(cfg(source="embedded"), tok)
    batches(tb, 5)
    state = tb.state_dict()
    other = TokenBatches(cfg(source="embedded"), tok, seed=99)
    with pytest.raises(DataError, match="seed: 7 -> 99"):
        other.load_state_dict(state)
    other.load_state_dict(state, strict=False)
    assert any("restarting epoch 1" in e for e in other.pop_events())
    fresh = TokenBatches(cfg(source="embedded"), tok, seed=99)
    assert torch.equal(other.next_batch()[0], fresh.next_batch()[0])


# --- datasets-backed sources -------------------------------------------------------------------


def test_json_and_parquet_go_through_datasets_streaming(
    tok: TextTokenizer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import datasets

    calls: list[dict[str, Any]] = []
    real = datasets.load_dataset

    def spy(*args: Any, **kwargs: Any) -> Any:
        calls.append({"args": args, **kwargs})
        return real(*args, **kwargs)

    monkeypatch.setattr(datasets, "load_dataset", spy)
    text_cfg = cfg(source="text", path=str(write_text(tmp_path / "d.txt", DOCS)), shuffle_buffer=5)
    want = batches(TokenBatches(text_cfg, tok), 4)
    for kind in ("json", "parquet"):
        got = batches(TokenBatches(_source_cfg(kind, tmp_path, shuffle_buffer=5), tok), 4)
        assert all(torch.equal(a[0], b[0]) for a, b in zip(got, want, strict=True)), kind
    assert [c["args"] for c in calls] == [("json",), ("parquet",)]
    assert all(c["streaming"] is True and c["split"] == "train" for c in calls)


def test_json_directory_and_custom_column(tok: TextTokenizer, tmp_path: Path) -> None:
    d = tmp_path / "jsons"
    d.mkdir()
    write_jsonl(d / "part-1.jsonl", DOCS[:10], column="body")
    write_jsonl(d / "part-0.jsonl", DOCS[10:20], column="body")
    (d / "notes.txt").write_text("ignored\n", encoding="utf-8")
    tb = TokenBatches(cfg(source="json", path=str(d), text_column="body", shuffle_buffer=1, max_eval_samples=1), tok)
    assert _doc_ids(tb, 4) == [11, 12, 13, 14]  # part-0 first (sorted), its first document held out


# --- errors ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("source", ["text", "json", "parquet"])
def test_missing_path_names_the_path(tok: TextTokenizer, tmp_path: Path, source: str) -> None:
    missing = tmp_path / "nope" / "data"
    with pytest.raises(DataError) as e:
        TokenBatches(cfg(source=source, path=str(missing)), tok)
    assert str(missing) in str(e.value) and "does not exist" in str(e.value)


def test_missing_column_names_it_and_the_existing_ones(tok: TextTokenizer, tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "d.jsonl", DOCS, column="content")
    with pytest.raises(DataError) as e:
        TokenBatches(cfg(source="json", path=str(path)), tok).next_batch()
    msg = str(e.value)
    assert "'text'" in msg and "content" in msg and "id" in msg and "\n" not in msg


def test_empty_data_is_an_error(tok: TextTokenizer, tmp_path: Path) -> None:
    path = tmp_path / "empty.txt"
    path.write_text("\n  \n\n", encoding="utf-8")
    with pytest.raises(DataError, match="no non-empty documents|all held out|no training documents"):
        TokenBatches(cfg(source="text", path=str(path), max_eval_samples=1), tok).next_batch()
    (tmp_path / "dir").mkdir()
    with pytest.raises(DataError, match="no .txt files"):
        TokenBatches(cfg(source="text", path=str(tmp_path / "dir")), tok)


def test_everything_held_out_is_an_error(tok: TextTokenizer, tmp_path: Path) -> None:
    path = write_text(tmp_path / "d.txt", DOCS[:3])
    with pytest.raises(DataError, match="max_eval_samples"):
        TokenBatches(cfg(source="text", path=str(path), max_eval_samples=3), tok).next_batch()


def test_fewer_tokens_than_one_sequence_is_an_error(tok: TextTokenizer, tmp_path: Path) -> None:
    path = write_text(tmp_path / "d.txt", ["短い", "文書です", "とても短い"])
    with pytest.raises(DataError, match="fewer than one sequence"):
        TokenBatches(cfg(source="text", path=str(path), max_eval_samples=1, seq_len=64), tok).next_batch()


def test_eval_split_on_local_files_is_explained(tok: TextTokenizer, tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "d.jsonl", DOCS)
    with pytest.raises(DataError, match="one split"):
        eval_batches(cfg(source="json", path=str(path), eval_split="validation"), tok, 1, 1)


def test_hub_offline_is_one_line_and_fast(tok: TextTokenizer, monkeypatch: pytest.MonkeyPatch) -> None:
    c = cfg(source="hub", dataset_name="hotchpotch/fineweb-2-edu-japanese", dataset_config="sample_10BT")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    t0 = time.monotonic()
    with pytest.raises(DataError) as e:
        TokenBatches(c, tok).next_batch()
    msg = str(e.value)
    assert "\n" not in msg and "hotchpotch/fineweb-2-edu-japanese" in msg and "data.source: text" in msg
    monkeypatch.delenv("HF_HUB_OFFLINE")
    for var in ("HF_DATASETS_OFFLINE", "HTTPS_PROXY", "https_proxy", "HTTP_PROXY", "http_proxy"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")
    with pytest.raises(DataError, match="cannot be reached"):
        TokenBatches(c, tok).next_batch()
    assert time.monotonic() - t0 < 8


# --- speed ----------------------------------------------------------------------------------------


def test_embedded_corpus_is_tokenized_once_per_process(tok: TextTokenizer) -> None:
    from ramgpt import data

    TokenBatches(cfg(source="embedded"), tok).next_batch()
    assert tok.fingerprint in data._EMBEDDED_TOKENS
    t0 = time.monotonic()
    tb = TokenBatches(cfg(source="embedded", seq_len=128, max_eval_samples=24, shuffle_buffer=256), tok)
    n = 0
    while not tb.pop_events():  # one whole epoch
        tb.next_batch(8)
        n += 1
    assert time.monotonic() - t0 < 1.0
    assert n > 10
    assert Counter(len(d) > 0 for d in embedded_documents())[True] > 300


# --- text files that are not text (#10.7) ----------------------------------------------------------


def _text_cfg(path: Path) -> DataConfig:
    return cfg(source="text", path=str(path), shuffle_buffer=1, max_eval_samples=1, seq_len=8)


def test_a_binary_file_given_as_text_is_refused_in_one_line(tok: TextTokenizer, tmp_path: Path) -> None:
    import shutil

    ls = tmp_path / "ls.txt"
    shutil.copyfile("/bin/ls", ls)
    utf16 = tmp_path / "utf16.txt"
    utf16.write_bytes("\n".join(DOCS).encode("utf-16"))
    noise = tmp_path / "noise.txt"  # no NUL byte, but a fifth of the bytes are not UTF-8
    noise.write_bytes(("".join(DOCS) + "\n").encode() + bytes(range(0x80, 0x100)) * 20)
    for path, why in ((ls, "NUL"), (utf16, "NUL"), (noise, "cannot be decoded")):
        with pytest.raises(DataError) as e:
            TokenBatches(_text_cfg(path), tok)
        msg = str(e.value)
        assert "\n" not in msg and str(path) in msg and "not UTF-8 text" in msg and why in msg, msg


def test_a_few_undecodable_bytes_warn_once_with_their_count(tok: TextTokenizer, tmp_path: Path) -> None:
    from ramgpt.data import UndecodableTextWarning

    path = tmp_path / "latin1.txt"
    lines = [d.encode() for d in DOCS]
    lines[3] = "café crème".encode("latin-1")  # 2 bytes that are not UTF-8
    lines[5] += b"\xff"  # 1 more
    path.write_bytes(b"\n".join(lines) + b"\n")
    with pytest.warns(UndecodableTextWarning) as caught:
        train = TokenBatches(_text_cfg(path), tok)
        evals = TokenBatches(_text_cfg(path), tok, "eval")
        for _ in range(40):  # past several epochs of both streams: still one warning
            train.next_batch(2)
            evals.next_batch(2)
    ours = [w for w in caught if issubclass(w.category, UndecodableTextWarning)]
    assert len(ours) == 1
    assert str(path) in str(ours[0].message) and " 3 bytes are not UTF-8" in str(ours[0].message)
    docs = list(itertools.islice(documents(_text_cfg(path)), 5))
    assert "caf\ufffd cr\ufffdme" in docs  # read, with replacement characters


def test_characters_across_the_check_chunks_are_not_counted(tok: TextTokenizer, tmp_path: Path) -> None:
    """3-byte characters over 2.5 MiB: the 1 MiB chunk edges cut characters, which must not count."""
    import warnings

    from ramgpt.data import UndecodableTextWarning, check_text_file

    path = tmp_path / "big.txt"
    path.write_text(("あいうえお" * 100 + "\n") * 1800, encoding="utf-8")
    assert path.stat().st_size > 2.5 * 2**20
    with warnings.catch_warnings():
        warnings.simplefilter("error", UndecodableTextWarning)
        assert check_text_file(path) == 0
    tail = tmp_path / "tail.txt"
    tail.write_bytes(path.read_bytes() + b"\xe3\x81")  # a character cut off at the very end
    with pytest.warns(UndecodableTextWarning, match=" 2 bytes are not UTF-8"):
        assert check_text_file(tail) == 2


# --- documents() ----------------------------------------------------------------------------------


def test_documents_are_the_streams_first_epoch_order(tok: TextTokenizer, tmp_path: Path) -> None:
    c = cfg(source="text", path=str(write_text(tmp_path / "d.txt", DOCS)), shuffle_buffer=10, max_eval_samples=3)
    train_docs = list(documents(c))
    assert sorted(int(d.split("番")[0].removeprefix("文書")) for d in train_docs) == list(range(3, 30))
    assert [int(d.split("番")[0].removeprefix("文書")) for d in train_docs] == _doc_ids(TokenBatches(c, tok), 27)
    assert list(documents(c, "eval")) == DOCS[:3]
    assert list(documents(c, seed=c.seed + 1)) != train_docs

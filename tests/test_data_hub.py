"""The ``hub`` source end to end, without a network: a local copy of the Hub repository (#10.10).

The stand-in has what ``hf download hotchpotch/fineweb-2-edu-japanese --repo-type dataset --local-dir
DIR`` gives, in small: parquet files under ``data/`` (the default configuration) and ``sample_10BT/``,
the dataset's real columns, and a README whose YAML front matter names the configurations and their
``data_files``, which ``datasets`` reads by itself.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import pytest
import torch

from ramgpt.config import DataConfig
from ramgpt.data import TokenBatches, documents, embedded_documents
from ramgpt.errors import DataError
from ramgpt.tokenizer import TextTokenizer, load_tokenizer

REPO_ID = "hotchpotch/fineweb-2-edu-japanese"

# The front matter of the stand-in's README: the configurations as the repository's folders name them.
README = """---
license: odc-by
language:
- ja
configs:
- config_name: default
  data_files:
  - split: train
    path: data/train-*
- config_name: sample_10BT
  data_files:
  - split: train
    path: sample_10BT/train-*
---
# FineWeb-2 Edu Japanese (a small local stand-in for tests)
"""


def _japanese_documents() -> list[str]:
    """Japanese documents of the embedded corpus, two lines each, so documents are web-page sized."""
    ja = [d for d in embedded_documents() if sum("\u3040" <= c <= "\u9fff" for c in d) > len(d) // 3]
    return [ja[i] + ja[i + 1] for i in range(0, len(ja) - 1, 2)]


def _table(texts: list[str], start: int, dump: str) -> Any:
    """One parquet table with the dataset's columns (types as in the real files)."""
    import pyarrow as pa

    n = len(texts)
    return pa.table(
        {
            "text": texts,
            "id": [f"<urn:uuid:{start + i:08d}-ramgpt-standin>" for i in range(n)],
            "dump": [dump] * n,
            "url": [f"https://example.jp/page/{start + i}" for i in range(n)],
            "date": ["2024-03-01T12:00:00Z"] * n,
            "file_path": [f"s3://commoncrawl/crawl-data/{dump}/segments/{start + i}.warc.gz" for i in range(n)],
            "language": ["jpn"] * n,
            "language_score": [0.99] * n,
            "language_script": ["Jpan"] * n,
            "minhash_cluster_size": [1 + i % 3 for i in range(n)],
            "top_langs": [json.dumps({"jpn_Jpan_score": 0.99})] * n,
            "score": [2.5 + (i % 5) * 0.25 for i in range(n)],
            "token_count": [len(t) for t in texts],
        }
    )


def write_fineweb_standin(root: Path) -> dict[str, list[str]]:
    """Write the stand-in under ``root``; returns each configuration's texts in file order."""
    import pyarrow.parquet as pq

    docs = _japanese_documents()
    assert len(docs) >= 120, "the embedded corpus should hold enough Japanese documents"
    sample, full = docs[:90], docs[90:120]
    (root / "data").mkdir(parents=True)
    (root / "sample_10BT").mkdir()
    pq.write_table(_table(full, 0, "CC-MAIN-2024-10"), root / "data" / "train-00000-of-00001.parquet")
    for k in range(3):  # several files, several row groups: resume must cross both
        part = sample[k * 30 : (k + 1) * 30]
        pq.write_table(
            _table(part, 1000 + k * 30, "CC-MAIN-2023-50"),
            root / "sample_10BT" / f"train-{k:05d}-of-00003.parquet",
            row_group_size=8,
        )
    (root / "README.md").write_text(README, encoding="utf-8")
    return {"sample_10BT": sample, "default": full}


@pytest.fixture(scope="module")
def standin(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, list[str]]]:
    root = tmp_path_factory.mktemp("fineweb-2-edu-japanese")
    return root, write_fineweb_standin(root)


@pytest.fixture(scope="module")
def tok() -> TextTokenizer:
    return load_tokenizer("embedded")


@pytest.fixture
def no_hub(monkeypatch: pytest.MonkeyPatch) -> None:
    """Offline mode and an endpoint that refuses: the local copy must not need either."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")


def hub_cfg(root: Path | str, **kw: Any) -> DataConfig:
    base: dict[str, Any] = {
        "source": "hub",
        "dataset_name": str(root),
        "dataset_config": "sample_10BT",
        "text_column": "text",
        "seq_len": 64,
        "max_eval_samples": 6,
        "shuffle_buffer": 16,
        "seed": 3,
    }
    base.update(kw)
    return DataConfig(**base)


def test_the_standin_has_the_datasets_columns(standin: tuple[Path, dict[str, list[str]]]) -> None:
    import pyarrow.parquet as pq

    root, _ = standin
    names = pq.read_schema(next((root / "sample_10BT").glob("*.parquet"))).names
    assert names == [
        "text", "id", "dump", "url", "date", "file_path", "language", "language_score", "language_script",
        "minhash_cluster_size", "top_langs", "score", "token_count",
    ]  # fmt: skip


def test_a_local_copy_is_read_offline_with_its_configurations(
    standin: tuple[Path, dict[str, list[str]]], no_hub: None
) -> None:
    root, texts = standin
    t0 = time.monotonic()
    sample = hub_cfg(root, shuffle_buffer=1)
    assert list(documents(sample, "eval")) == texts["sample_10BT"][:6]
    assert list(documents(sample)) == texts["sample_10BT"][6:]  # the eval head is held out
    assert list(documents(hub_cfg(root, dataset_config=None, shuffle_buffer=1))) == texts["default"][6:]
    assert time.monotonic() - t0 < 30  # no Hub retries


def test_hub_source_batches_and_exact_resume(
    standin: tuple[Path, dict[str, list[str]]], tok: TextTokenizer, no_hub: None
) -> None:
    root, texts = standin
    c = hub_cfg(root)
    full = TokenBatches(c, tok, micro_batch_size=2)
    reference: list[tuple[torch.Tensor, torch.Tensor]] = []
    boundary = None
    while boundary is None or len(reference) < boundary + 3:
        reference.append(full.next_batch())
        if full.pop_events() and boundary is None:
            boundary = len(reference) - 1
    # The stream is the training documents, each followed by EOS.
    first = tok.decode(reference[0][0][0].tolist()).split(tok.eos_token)[0]
    assert any(first and first in t for t in texts["sample_10BT"][6:])
    for n in (3, boundary - 1, boundary + 1):
        before = TokenBatches(c, tok, micro_batch_size=2)
        for _ in range(n):
            before.next_batch()
        state = json.loads(json.dumps(before.state_dict()))
        assert n < 5 or state["block_position"] is not None  # datasets' own iterator state, not a replay
        del before  # a restart: nothing of the first stream survives but its state
        after = TokenBatches(c, tok, micro_batch_size=2)
        after.load_state_dict(state)
        for i in range(2):
            x, y = after.next_batch()
            assert torch.equal(x, reference[n + i][0]) and torch.equal(y, reference[n + i][1]), f"batch {n + i}"


def test_a_missing_local_copy_is_one_line_naming_it(tmp_path: Path, tok: TextTokenizer, no_hub: None) -> None:
    for name in (str(tmp_path / "not-downloaded"), "./fineweb/local/copy"):
        with pytest.raises(DataError) as e:
            TokenBatches(hub_cfg(name), tok)
        msg = str(e.value)
        assert "\n" not in msg and name in msg and "not an existing directory" in msg


def test_the_offline_hint_names_the_local_copy(tok: TextTokenizer, no_hub: None) -> None:
    with pytest.raises(DataError) as e:
        TokenBatches(hub_cfg(REPO_ID), tok).next_batch()
    msg = str(e.value)
    assert "offline mode" in msg and "--local-dir DIR" in msg and "data.dataset_name" in msg


@pytest.mark.slow
def test_micro_test_trains_on_the_hub_source_offline(
    standin: tuple[Path, dict[str, list[str]]], tmp_path: Path, no_hub: None
) -> None:
    from ramgpt.checkpoint import load_checkpoint
    from ramgpt.config import load_profile
    from ramgpt.train import train

    root, _ = standin
    run = tmp_path / "run"
    overrides = [
        "data.source=hub",
        f"data.dataset_name={root}",
        "data.dataset_config=sample_10BT",
        "data.max_eval_samples=6",
        "data.shuffle_buffer=16",
        "optim.max_steps=8",
        "optim.micro_batch_size=4",
        "checkpoint.save_interval_steps=4",
        "logging.eval_interval=4",
        "logging.eval_batches=1",
        "logging.tui=off",
        "scheduler.warmup_steps=2",
        f"checkpoint.out_dir={run}",
    ]
    result = train(load_profile("micro-test", overrides, use_env=False))
    assert result.steps == 8 and result.final_loss is not None and result.eval_loss is not None
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if line.strip()]
    losses = [r["loss"] for r in rows if "loss" in r]
    assert losses[-1] < losses[0]
    meta = load_checkpoint(run, with_optimizer=False).meta
    assert meta["data_state"]["order"]["dataset"] == [str(root), "sample_10BT"]
    resumed = train(load_profile("micro-test", [*overrides, "optim.max_steps=10"], use_env=False), resume="latest")
    assert resumed.steps == 10

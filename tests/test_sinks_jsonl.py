"""metrics.jsonl and events.jsonl: one row per logged step, strict JSON, cut on resume."""

from __future__ import annotations

import io
import json
import os
import stat
from collections.abc import Iterator
from pathlib import Path

import pytest

from ramgpt.config import LoggingConfig
from ramgpt.sinks import make_sinks
from ramgpt.sinks.jsonl import JsonlSink


def _steps(path: Path) -> list[int]:
    return [json.loads(x)["step"] for x in path.read_text().splitlines()]


def test_rows_events_and_truncate(tmp_path: Path) -> None:
    sink = JsonlSink(tmp_path)
    for i in range(1, 6):
        m = {"loss": 5.0 - i * 0.1, "lr": 1e-3, "tokens_per_s": 1000.0 + i, "device": "cpu"}
        if i == 3:
            m["eval_loss"] = 4.5
            m["grad_norm"] = float("nan")
        sink.log(m, i)
        sink.progress(i, tokens_seen=i * 100, elapsed_s=1.0, phase=None)  # no row of its own
        if i == 3:
            sink.event("checkpoint", "saved step 3")
    sink.close()
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3, 4, 5]
    assert all({"loss", "lr", "tokens_per_s", "time"} <= r.keys() for r in rows)
    assert rows[2]["eval_loss"] == 4.5 and rows[2]["grad_norm"] is None  # NaN -> null (strict JSON)
    assert "eval_loss" not in rows[1] and "tokens_seen" not in rows[0]
    events = [json.loads(line) for line in (tmp_path / "events.jsonl").read_text().splitlines()]
    assert events == [{"event": "checkpoint", "message": "saved step 3", "step": 3, "time": events[0]["time"]}]

    with open(tmp_path / "metrics.jsonl", "a") as f:
        f.write('{"step": 6, "loss": 4.')  # the half line a crash leaves
    assert JsonlSink.truncate_after(tmp_path / "metrics.jsonl", 3) == 3
    assert _steps(tmp_path / "metrics.jsonl") == [1, 2, 3]

    # A resumed run appends after the cut; a directory cuts both files.
    sink = JsonlSink(tmp_path)
    sink.log({"loss": 1.0}, 4)
    sink.event("info", "resumed")
    sink.close()
    assert JsonlSink.truncate_after(tmp_path, 2) == 4  # metrics 3, 4 and both events
    assert _steps(tmp_path / "metrics.jsonl") == [1, 2]
    assert (tmp_path / "events.jsonl").read_text() == ""
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]

    # What a resume does: cut at the checkpoint step, then append.
    sink = make_sinks(LoggingConfig(tui="off"), tmp_path, {}, resume_step=1, stream=io.StringIO())[0]
    sink.log({"loss": 0.5}, 2)
    sink.close()
    assert _steps(tmp_path / "metrics.jsonl") == [1, 2]


@pytest.fixture
def umask() -> Iterator[None]:
    old = os.umask(0o022)
    try:
        yield
    finally:
        os.umask(old)


@pytest.mark.parametrize("mask", [0o022, 0o002])
def test_resumed_files_keep_the_mode_of_a_new_file(tmp_path: Path, umask: None, mask: int) -> None:
    """Issue #10.11: a resumed run's metrics.jsonl ended up 0600 (the rewrite went through
    mkstemp). After the cut both files have the mode a freshly created file gets."""
    os.umask(mask)
    fresh = 0o666 & ~mask
    sink = JsonlSink(tmp_path)
    for i in (1, 2, 3):
        sink.log({"loss": 1.0}, i)
    sink.event("checkpoint", "saved step 3")
    sink.close()
    assert stat.S_IMODE((tmp_path / "metrics.jsonl").stat().st_mode) == fresh

    resumed = JsonlSink(tmp_path, resume_step=2)
    resumed.log({"loss": 0.5}, 3)
    resumed.close()
    assert _steps(tmp_path / "metrics.jsonl") == [1, 2, 3]
    for name in ("metrics.jsonl", "events.jsonl"):
        mode = stat.S_IMODE((tmp_path / name).stat().st_mode)
        assert mode == fresh, f"{name} is {mode:o} after resume, a new file gets {fresh:o}"


def test_closed_sink_writes_nothing(tmp_path: Path) -> None:
    sink = JsonlSink(tmp_path)
    sink.close()
    sink.log({"loss": 1.0}, 1)
    sink.event("info", "late")
    sink.close()  # idempotent
    assert (tmp_path / "metrics.jsonl").read_text() == "" and not (tmp_path / "events.jsonl").exists()

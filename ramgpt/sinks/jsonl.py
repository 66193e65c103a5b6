"""``metrics.jsonl`` and ``events.jsonl``: the run's numbers as files other tools read."""

from __future__ import annotations

import json
import math
import os
import time
import uuid
from collections.abc import Mapping
from pathlib import Path
from typing import Any, TextIO

from ramgpt.fmt import num


def _jsonable(v: Any) -> Any:
    """JSON-safe value: non-finite floats become null (strict JSON readers reject NaN)."""
    if v is None or isinstance(v, (bool, str, int)):
        return v
    if isinstance(v, float):
        return v if math.isfinite(v) else None
    if isinstance(v, Mapping):
        return {str(k): _jsonable(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_jsonable(x) for x in v]
    n = num(v)
    if n is not None:
        return _jsonable(n)
    return str(v)


class JsonlSink:
    """``RUN_DIR/metrics.jsonl``: one JSON object per logged step (every key given, plus
    ``step`` and ``time``), flushed per line so a crash loses at most the line being written.
    Events go to ``RUN_DIR/events.jsonl`` so the metrics file stays one row per step;
    ``progress`` writes nothing (those steps have no row). Files are appended to. On resume pass
    ``resume_step``: rows logged after it (by the run that was interrupted) are dropped first,
    so the file holds each step once. (Calling :meth:`truncate_after` on files an open sink
    appends to would lose its later rows: the rewrite replaces the file under it.)"""

    METRICS_FILE = "metrics.jsonl"
    EVENTS_FILE = "events.jsonl"

    def __init__(self, run_dir: str | os.PathLike[str], *, resume_step: int | None = None) -> None:
        self.run_dir = Path(run_dir)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.metrics_path = self.run_dir / self.METRICS_FILE
        self.events_path = self.run_dir / self.EVENTS_FILE
        if resume_step is not None:
            self.truncate_after(self.run_dir, resume_step)
        self._metrics: TextIO | None = open(self.metrics_path, "a", encoding="utf-8")  # noqa: SIM115 - closed in close()
        self._events: TextIO | None = None  # opened on the first event
        self._last_step: int | None = None

    def log(self, metrics: dict[str, Any], step: int) -> None:
        if self._metrics is None:
            return
        row = {"step": int(step)}
        row.update({k: _jsonable(v) for k, v in metrics.items() if k != "step"})
        row["time"] = round(time.time(), 3)
        self._metrics.write(json.dumps(row, separators=(",", ":")) + "\n")
        self._metrics.flush()
        self._last_step = int(step)

    def progress(self, step: int, **quick: Any) -> None:
        """Nothing to write: metrics.jsonl holds logged steps only."""

    def event(self, kind: str, message: str) -> None:
        if self._metrics is None:  # closed
            return
        if self._events is None:
            self._events = open(self.events_path, "a", encoding="utf-8")  # noqa: SIM115 - closed in close()
        row = {"event": kind, "message": message, "step": self._last_step, "time": round(time.time(), 3)}
        self._events.write(json.dumps(row, separators=(",", ":")) + "\n")
        self._events.flush()

    def close(self) -> None:
        for f in (self._metrics, self._events):
            if f is not None:
                try:
                    f.close()
                except OSError:
                    pass
        self._metrics = self._events = None

    @staticmethod
    def truncate_after(path: str | os.PathLike[str], step: int) -> int:
        """Keep only rows with ``step <= step`` (and drop unparseable lines, e.g. the half line
        a crash left). ``path`` is a jsonl file, or a run directory: then both metrics.jsonl
        and events.jsonl are cut (events without a step are kept). The file is rewritten under
        a temporary name and renamed, so a crash here never loses the rows that are kept.
        Returns how many rows were dropped."""
        p = Path(path)
        if p.is_dir():
            return sum(JsonlSink.truncate_after(p / n, step) for n in (JsonlSink.METRICS_FILE, JsonlSink.EVENTS_FILE))
        if not p.is_file():
            return 0
        kept: list[str] = []
        dropped = 0
        with open(p, encoding="utf-8", errors="replace") as f:
            for line in f:
                s = line.strip()
                if not s:
                    continue
                try:
                    row = json.loads(s)
                    row_step = row.get("step") if isinstance(row, dict) else None
                except ValueError:
                    dropped += 1
                    continue
                if row_step is not None and not (isinstance(row_step, (int, float)) and row_step <= step):
                    dropped += 1
                    continue
                kept.append(s + "\n")
        _replace_text(p, "".join(kept))
        return dropped


def _replace_text(path: Path, text: str) -> None:
    """Atomically replace ``path`` with ``text``. The new file gets the mode a freshly created
    one gets (0666 less the umask), as ``open(path, "w")`` would: ``tempfile.mkstemp`` makes
    0600 files, which turned a resumed run's metrics.jsonl unreadable for other users."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise

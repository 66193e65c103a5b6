"""Rich rendering of command results: sizes are written the way the rest of ramgpt writes them."""

from __future__ import annotations

import io
from pathlib import Path

from rich.console import Console

from ramgpt.checkpoint import PruneReport
from ramgpt.render import render_prune
from ramgpt.sinks.plain import PlainSink


def test_a_size_reads_the_same_in_a_command_and_on_the_training_display(tmp_path: Path) -> None:
    """Issue #11: render.py and the dashboard each had a fmt_bytes and printed one number two
    ways (``2.2 GiB`` on the panel, ``2.20 GiB`` from prune-ckpt). Now both go through ramgpt.fmt."""
    size = int(2.2 * 2**30)
    step = tmp_path / "step_0000040"
    report = PruneReport(
        removed=[step], kept=[], freed_bytes=size, dry_run=True, partial_removed=[], sizes={step: size}
    )
    buf = io.StringIO()
    render_prune(report, Console(file=buf, width=200, color_system=None))
    line = PlainSink.format_line({"rss_b": size}, 1)
    assert f"{step}  2.20 GiB" in buf.getvalue() and "would free 2.20 GiB" in buf.getvalue()
    assert line == "step 1 | rss 2.20 GiB"


def test_user_text_is_never_markup(tmp_path: Path) -> None:
    odd = tmp_path / "[bold]run" / "step_0000010"
    report = PruneReport(removed=[odd], kept=[], freed_bytes=10, dry_run=False, partial_removed=[], sizes={odd: 10})
    buf = io.StringIO()
    render_prune(report, Console(file=buf, width=200, color_system=None))
    assert f"removed {odd}  10 B" in buf.getvalue()

"""Rich rendering of a :class:`~ramgpt.checkpoint.PruneReport` (to be merged into render.py)."""

from __future__ import annotations

from rich.console import Console
from rich.text import Text

from ramgpt.checkpoint import PruneReport


def _human_bytes(n: int) -> str:
    if n >= 1e9:
        return f"{n / 1e9:.2f} GB"
    if n >= 1e6:
        return f"{n / 1e6:.1f} MB"
    if n >= 1e3:
        return f"{n / 1e3:.0f} KB"
    return f"{n} B"


def render_prune(report: PruneReport, console: Console) -> None:
    """One line per removed path with its size, then the total; a dry run says "would" so the
    user can check the plan before anything is deleted. Paths are printed as plain text (never
    parsed as rich markup: a directory may be called ``[bold]``)."""
    verb = "would remove" if report.dry_run else "removed"
    style = "yellow" if report.dry_run else "red"
    rows = [(p, "") for p in report.removed] + [(p, " (partial)") for p in report.partial_removed]
    if not rows:
        console.print(Text(f"nothing to prune; kept {len(report.kept)} checkpoint(s)"))
        return
    for path, note in rows:
        line = Text()
        line.append(f"{verb} ", style=style)
        line.append(str(path))
        line.append(note, style="dim")
        line.append(f"  {_human_bytes(report.sizes.get(path, 0))}", style="cyan")
        console.print(line)
    if report.kept:
        console.print(Text("kept " + ", ".join(p.name for p in report.kept), style="green"))
    for p in report.left_alone:
        console.print(Text(f"left alone {p} (in use or not a ramgpt checkpoint)", style="dim"))
    total = _human_bytes(report.freed_bytes)
    if report.dry_run:
        console.print(Text(f"would free {total} (dry run: nothing was deleted)", style="bold"))
    else:
        console.print(Text(f"freed {total}", style="bold"))

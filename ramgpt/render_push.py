"""Rich rendering of a ``PushPlan`` (to be merged into ``ramgpt/render.py``).

A plan holds no token, so nothing rendered here can leak one."""

from __future__ import annotations

from typing import TYPE_CHECKING

from rich.console import Console
from rich.table import Table

if TYPE_CHECKING:
    from ramgpt.hub import PushPlan

# A run with many checkpoints lists hundreds of files; show the first ones and a count.
MAX_FILE_ROWS = 40


def _fmt_bytes(n: int) -> str:
    size = float(n)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if size < 1024 or unit == "GiB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    return f"{size:.1f} GiB"  # pragma: no cover


def render_push(plan: PushPlan, console: Console) -> None:
    """Header (repo, branch, visibility, method), the files with sizes, deletions, skipped
    items, and the outcome: the URL after a push, or a clear 'nothing was sent'."""
    visibility = "private" if plan.private else "public"
    branch = plan.revision or "main"
    verb = "would push" if plan.dry_run else "pushed"
    console.print(
        f"[bold]{verb}[/] {plan.source} [cyan]{plan.folder}[/] -> [bold]{plan.repo_id}[/] "
        f"(branch {branch}, {visibility}, {plan.method})",
        highlight=False,
        soft_wrap=True,
    )
    console.print(f"commit message: {plan.message}", highlight=False, markup=False)

    table = Table(show_header=True, header_style="bold", box=None, pad_edge=False)
    table.add_column("file")
    table.add_column("size", justify="right")
    for path, size in plan.files[:MAX_FILE_ROWS]:
        note = " (generated)" if path in plan.generated else ""
        table.add_row(path + note, _fmt_bytes(size))
    if len(plan.files) > MAX_FILE_ROWS:
        rest = plan.files[MAX_FILE_ROWS:]
        table.add_row(f"... {len(rest)} more files", _fmt_bytes(sum(n for _, n in rest)))
    table.add_row(f"[bold]{len(plan.files)} files[/]", f"[bold]{_fmt_bytes(plan.total_bytes)}[/]")
    console.print(table)

    if plan.delete_patterns:
        console.print("delete on the Hub: " + ", ".join(plan.delete_patterns), highlight=False, markup=False)
    for item in plan.skipped:
        console.print(f"[dim]skipped {item}[/]", highlight=False)
    if plan.dry_run:
        console.print("[yellow]dry run: nothing was sent[/]")
    elif plan.url:
        console.print(f"[green]done:[/] {plan.url}", highlight=False)

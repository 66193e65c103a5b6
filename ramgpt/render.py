"""Rich rendering of command results. Library modules return data; only this module (and the
display sinks in ``ramgpt.sinks``) print. Numbers are written by ``ramgpt.fmt``. One function per
result type:

- :func:`render_doctor` -- ``ramgpt doctor``
- :func:`render_estimate` -- ``ramgpt estimate-memory``
- :func:`render_prune`, :func:`render_push` -- ``ramgpt prune-ckpt`` / ``ramgpt push`` (a push plan holds no token)

User-supplied text (paths, names, messages) is printed as plain ``Text`` so that a ``[bold]``
in a directory name is never parsed as markup.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from rich.console import Console
from rich.table import Table
from rich.text import Text

from ramgpt.fmt import fmt_bytes, fmt_params

if TYPE_CHECKING:  # pragma: no cover
    from ramgpt.checkpoint import PruneReport
    from ramgpt.doctor import CheckResult
    from ramgpt.hub import PushPlan
    from ramgpt.memory import MemoryEstimate, Term

# ---------------------------------------------------------------------------------------------
# doctor

_STATUS_STYLE = {"ok": "green", "warn": "yellow", "fail": "bold red"}


def render_doctor(results: list[CheckResult], console: Console) -> None:
    """A table of checks (status, what was found, what to do), then a one-line verdict."""
    table = Table(title="ramgpt doctor", title_justify="left", show_lines=False, expand=False)
    table.add_column("check", no_wrap=True)
    table.add_column("status", no_wrap=True)
    table.add_column("found")
    table.add_column("remedy", style="dim")
    for r in results:
        status = Text(
            r.status + (" (blocks)" if r.blocking and r.status == "fail" else ""), style=_STATUS_STYLE.get(r.status, "")
        )
        table.add_row(Text(r.name), status, Text(r.message), Text(r.remedy))
    console.print(table)
    fails = [r for r in results if r.status == "fail"]
    blocking = [r for r in fails if r.blocking]
    warns = [r for r in results if r.status == "warn"]
    if blocking:
        names = ", ".join(r.name for r in blocking)
        console.print(Text(f"training cannot start: {names}", style="bold red"))
    elif fails:
        console.print(Text(f"{len(fails)} failed, {len(warns)} warnings; training can start", style="yellow"))
    elif warns:
        console.print(Text(f"all good, {len(warns)} warning(s)", style="green"))
    else:
        console.print(Text("all good", style="green"))


# ---------------------------------------------------------------------------------------------
# estimate-memory


def _terms_table(title: str, terms: tuple[Term, ...] | list[Term], total: int | None, total_label: str) -> Table:
    t = Table(title=title, title_justify="left", expand=False)
    t.add_column("term")
    t.add_column("size", justify="right", no_wrap=True)
    t.add_column("note", style="dim")
    for term in terms:
        t.add_row(Text(term.name), fmt_bytes(term.bytes), Text(term.note))
    if total is not None:
        t.add_row(Text(total_label, style="bold"), Text(fmt_bytes(total), style="bold"), "")
    return t


def _verdict(ok: bool | None) -> Text:
    if ok is None:
        return Text("unknown", style="yellow")
    return Text("fits", style="green") if ok else Text("does not fit", style="bold red")


def render_estimate(est: MemoryEstimate, console: Console) -> None:
    """Parameters, GPU peak, CPU RAM, disk, PCIe, verdict, advice and assumptions."""
    head = Text()
    head.append(f"{est.profile}", style="bold")
    head.append(f": {est.engine} engine on {est.device} ({est.engine_reason}), {est.precision}")
    console.print(head)

    p = Table(title="parameters", title_justify="left", expand=False)
    p.add_column("component")
    p.add_column("count", justify="right")
    for k in ("embeddings", "blocks", "head", "total"):
        p.add_row(k, fmt_params(est.params[k]))
    console.print(p)

    if est.gpu is not None:
        g = est.gpu
        what = f"{g.seqs} sequences per pass" if g.engine == "streamed" else f"micro-batch {g.seqs}"
        console.print(
            _terms_table(
                f"GPU peak ({what}, {g.tokens} tokens; peak in: {g.peak_phase})",
                g.terms,
                g.need_bytes,
                "total (must fit the budget)",
            )
        )
        extra = Table(show_header=False, box=None, expand=False)
        extra.add_column()
        extra.add_column(justify="right")
        extra.add_row("activations with checkpointing (boundaries)", fmt_bytes(g.activations_checkpointed_bytes))
        extra.add_row("activations without checkpointing", fmt_bytes(g.activations_full_bytes))
        extra.add_row("live tensors at the peak", fmt_bytes(g.live_bytes))
        extra.add_row("peak reserved expected with memory to spare", fmt_bytes(g.expected_reserved_bytes))
        extra.add_row("CUDA context (on the card, outside the budget)", fmt_bytes(g.context_bytes))
        extra.add_row("on the card in all", fmt_bytes(g.need_bytes + g.context_bytes))
        console.print(extra)

    console.print(_terms_table("CPU RAM (peak RSS)", est.cpu_terms, est.cpu_bytes, "total"))

    d = est.disk
    dt = Table(title="disk per checkpoint", title_justify="left", show_header=False, expand=False)
    dt.add_column()
    dt.add_column(justify="right")
    dt.add_row("model.safetensors (fp32)", fmt_bytes(d.model_bytes))
    dt.add_row("optimizer.safetensors (2 x fp32)", fmt_bytes(d.optimizer_bytes))
    dt.add_row("tokenizer + JSON", fmt_bytes(d.small_bytes))
    dt.add_row(Text("one checkpoint", style="bold"), Text(fmt_bytes(d.per_checkpoint), style="bold"))
    dt.add_row(f"x keep_last_n={d.keep_last_n}", fmt_bytes(d.kept))
    dt.add_row("worst case (+ best-eval + one being written)", fmt_bytes(d.worst_case))
    console.print(dt)

    pc = est.pcie.to_dict()
    pt = Table(title="PCIe per optimizer step", title_justify="left", show_header=False, expand=False)
    pt.add_column()
    pt.add_column(justify="right")
    pt.add_row("weight passes per step", str(pc["passes_per_step"]))
    pt.add_row("host -> device", f"{fmt_bytes(pc['h2d_bytes'])}  ({pc['h2d_s']:.2f} s)")
    pt.add_row("device -> host", f"{fmt_bytes(pc['d2h_bytes'])}  ({pc['d2h_s']:.2f} s)")
    pt.add_row("link", Text(f"{pc['link_gbps']:g} GB/s, {pc['link_source']}"))
    console.print(pt)

    v = Table(title="verdict", title_justify="left", show_header=False, expand=False)
    v.add_column()
    v.add_column()
    if est.device == "cuda":
        v.add_row(
            "VRAM", Text.assemble(_verdict(est.fits_vram), f"  budget {fmt_bytes(est.vram_bytes)} ({est.vram_source})")
        )
    else:
        v.add_row("VRAM", Text("no GPU: training runs on the CPU"))
    v.add_row(
        "RAM",
        Text.assemble(
            _verdict(est.fits_ram),
            f"  need {fmt_bytes(est.cpu_bytes)}, have {fmt_bytes(est.ram_bytes)} ({est.ram_source})",
        ),
    )
    if est.largest_micro_batch is not None:
        v.add_row("largest micro-batch (resident)", str(est.largest_micro_batch))
    if est.max_seqs_per_pass is not None:
        v.add_row("largest seqs_per_pass (streamed)", str(est.max_seqs_per_pass))
    console.print(v)

    if est.time is not None:  # ramgpt.memory.timing.TimeEstimate: step, tokens/s, the whole run
        tt = Table(title="time (projected)", title_justify="left", show_header=False, expand=False)
        tt.add_column()
        for line in est.time.lines():
            tt.add_row(Text(line))
        console.print(tt)

    for a in est.advice:
        console.print(Text("-> " + a, style="yellow"))
    for n in est.notes:
        console.print(Text("note: " + n, style="yellow"))
    console.print(Text("assumptions:", style="bold"))
    for a in (*est.assumptions, *(est.time.assumptions if est.time else ())):
        console.print(Text("  " + a, style="dim"))


# ---------------------------------------------------------------------------------------------
# checkpoint commands: prune / push


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
        line.append(f"  {fmt_bytes(report.sizes.get(path, 0))}", style="cyan")
        console.print(line)
    if report.kept:
        console.print(Text("kept " + ", ".join(p.name for p in report.kept), style="green"))
    for p in report.left_alone:
        console.print(Text(f"left alone {p} (in use or not a ramgpt checkpoint)", style="dim"))
    total = fmt_bytes(report.freed_bytes)
    if report.dry_run:
        console.print(Text(f"would free {total} (dry run: nothing was deleted)", style="bold"))
    else:
        console.print(Text(f"freed {total}", style="bold"))


# A run with many checkpoints lists hundreds of files; show the first ones and a count.
MAX_FILE_ROWS = 40


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
        table.add_row(path + note, fmt_bytes(size))
    if len(plan.files) > MAX_FILE_ROWS:
        rest = plan.files[MAX_FILE_ROWS:]
        table.add_row(f"... {len(rest)} more files", fmt_bytes(sum(n for _, n in rest)))
    table.add_row(f"[bold]{len(plan.files)} files[/]", f"[bold]{fmt_bytes(plan.total_bytes)}[/]")
    console.print(table)

    if plan.delete_patterns:
        console.print("delete on the Hub: " + ", ".join(plan.delete_patterns), highlight=False, markup=False)
    for item in plan.skipped:
        console.print(f"[dim]skipped {item}[/]", highlight=False)
    if plan.dry_run:
        console.print("[yellow]dry run: nothing was sent[/]")
    elif plan.url:
        console.print(f"[green]done:[/] {plan.url}", highlight=False)


__all__ = ["render_doctor", "render_estimate", "render_prune", "render_push"]

"""The Typer app. Each command parses its options, calls one library function, and renders the
result. Known errors (``RamgptError``) become one line on stderr and a non-zero exit; set
``RAMGPT_DEBUG=1`` for the full traceback."""

from __future__ import annotations

import functools
import json
import os
import sys
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any

import typer
import typer.core
from rich.console import Console

from ramgpt.errors import ConfigError, RamgptError

app = typer.Typer(
    name="ramgpt",
    help="Pre-train a ~1B GPT-2 on one small GPU: weights live in CPU RAM and stream through the GPU.",
    rich_markup_mode="rich",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)

err_console = Console(stderr=True)


class _Command(typer.core.TyperCommand):
    """Help that reads like a manual: flags show no ``<bool>``, options name their value
    (``--max-steps N`` style), arguments are ``RUN_DIR`` in the usage line."""

    def get_params(self, ctx: Any) -> list[Any]:
        params = super().get_params(ctx)
        for p in params:
            if isinstance(p, typer.core.TyperArgument):
                name = p.display_name_raw.upper()
                p._usage_display_name = lambda name=name, p=p: name if p.required else f"[{name}]"  # type: ignore[method-assign]
            elif getattr(p, "is_flag", False) or getattr(p, "count", False):
                p.metavar = ""
            elif p.metavar is None:
                p.metavar = (p.name or "value").rstrip("_").upper()
        return params


def _version(value: bool) -> None:
    if value:
        from ramgpt import __version__

        typer.echo(f"ramgpt {__version__}")
        raise typer.Exit(0)


@app.callback()
def _setup(
    version: Annotated[
        bool, typer.Option("--version", callback=_version, is_eager=True, help="Print the version and exit.")
    ] = False,
) -> None:
    """Runs before every command, before any command imports torch."""
    from ramgpt.numerics import ensure_reproducible_env

    ensure_reproducible_env()

# Reusable option types ------------------------------------------------------------------------
ProfileOpt = Annotated[str, typer.Option("--profile", metavar="NAME", help="Profile name (see profiles/) or path to a YAML file.")]
SetOpt = Annotated[
    list[str] | None,
    typer.Option("--set", metavar="FIELD=VALUE", help="Override a field: section.field=value (repeatable), e.g. --set optim.lr=1e-4."),
]
MicroTestOpt = Annotated[
    bool, typer.Option("--micro-test", help="Shrink the profile to 2 layers, seq 128, a few steps (smoke test).")
]
JsonOpt = Annotated[bool, typer.Option("--json", help="Print JSON instead of a table.")]


def _show_warning(message, category, filename, lineno, file=None, line=None) -> None:  # noqa: ANN001
    err_console.print(f"[yellow]warning:[/] {message}", highlight=False, soft_wrap=True)


def _fail(message: str, code: int) -> None:
    err_console.print(f"[bold red]error:[/] {message}", highlight=False, soft_wrap=True)
    raise typer.Exit(code)


def handle_errors(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Map known exceptions to one line and an exit code (the one place that does this)."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        if os.environ.get("RAMGPT_DEBUG"):
            return fn(*args, **kwargs)
        try:
            with warnings.catch_warnings():
                # library warnings (e.g. a skipped partial checkpoint) become one line, not a
                # file path + source line
                warnings.showwarning = _show_warning
                return fn(*args, **kwargs)
        except RamgptError as e:
            _fail(str(e), e.exit_code)
        except KeyboardInterrupt:
            _fail("interrupted", 130)
        except BrokenPipeError:
            # stdout closed early (e.g. piped to head): not an error worth a traceback
            try:
                sys.stdout = open(os.devnull, "w")  # noqa: SIM115
            except OSError:
                pass
            raise typer.Exit(0) from None

    return wrapper


def _load(profile: str, sets: list[str] | None, micro_test: bool = False):
    from ramgpt.config import load_profile

    return load_profile(profile, sets or [], micro_test=micro_test)


# ----------------------------------------------------------------------------------------------
# train
@app.command(cls=_Command)
@handle_errors
def train(
    profile: ProfileOpt = "micro-test",
    set_: SetOpt = None,
    micro_test: MicroTestOpt = False,
    resume: Annotated[
        str | None, typer.Option("--resume", help="'latest' (newest complete checkpoint of the run) or a checkpoint path.")
    ] = None,
    out_dir: Annotated[Path | None, typer.Option("--out-dir", help="Run directory (overrides checkpoint.out_dir).")] = None,
    max_steps: Annotated[int | None, typer.Option("--max-steps", min=1, help="Override optim.max_steps.")] = None,
    tui: Annotated[
        bool | None, typer.Option("--tui/--no-tui", help="Force the live panel on or off (default: on for a terminal).")
    ] = None,
    force: Annotated[
        bool, typer.Option("--force", help="Start even when the disk cannot hold keep_last_n + 1 checkpoints.")
    ] = False,
    gpus: Annotated[
        int | None,
        typer.Option("--gpus", min=1, metavar="N", help="Train on N GPUs of this machine: starts the same command "
                     "under torchrun, one process per GPU (see docs/design.md, Several GPUs)."),
    ] = None,
) -> None:
    """Train a profile (resident or streamed engine), writing checkpoints and metrics.jsonl."""
    if gpus is not None and "RANK" not in os.environ:
        from ramgpt.dist import torchrun_command

        argv = torchrun_command(gpus, sys.argv)
        os.execv(argv[0], argv)  # torchrun's exit status becomes this command's
    from ramgpt.train import train as run_train

    sets = list(set_ or [])
    if out_dir is not None:
        sets.append(f"checkpoint.out_dir={out_dir}")
    if max_steps is not None:
        sets.append(f"optim.max_steps={max_steps}")
    if tui is not None:
        sets.append(f"logging.tui={'on' if tui else 'off'}")
    if force:
        sets.append("checkpoint.require_free_disk=false")
    prof = _load(profile, sets, micro_test)
    hooks = []
    if prof.checkpoint.hf_repo_id and prof.checkpoint.push_to_hub_interval:
        from ramgpt.hub.hook import HubPushHook

        hooks.append(HubPushHook(prof.checkpoint))
    result = run_train(prof, resume=resume, on_saved=hooks)
    if os.environ.get("RANK", "0") == "0":  # under torchrun the other ranks print nothing but errors
        err_console.print(result.summary(), highlight=False, soft_wrap=True)
    if result.interrupted:
        raise typer.Exit(130)  # the shell convention for Ctrl-C; the checkpoint is already saved


# ----------------------------------------------------------------------------------------------
# generate
@app.command(cls=_Command)
@handle_errors
def generate(
    checkpoint: Annotated[
        Path, typer.Option("--checkpoint", "-c", help="Run directory (newest complete checkpoint) or a checkpoint path.")
    ],
    prompt: Annotated[str | None, typer.Option("--prompt", "-p", help="Prompt, used exactly as typed.")] = None,
    interactive: Annotated[bool, typer.Option("--interactive", "-i", help="Read prompts until EOF (Ctrl-D).")] = False,
    max_new_tokens: Annotated[int, typer.Option("--max-new-tokens", "-n", min=1)] = 128,
    temperature: Annotated[float, typer.Option("--temperature", "-t", min=0.0, help="0 = greedy.")] = 0.8,
    top_k: Annotated[int | None, typer.Option("--top-k", min=1)] = 50,
    top_p: Annotated[float | None, typer.Option("--top-p", min=0.0, max=1.0)] = 0.95,
    repetition_penalty: Annotated[float, typer.Option("--repetition-penalty", min=0.0)] = 1.1,
    stop: Annotated[list[str] | None, typer.Option("--stop", help="Stop string (repeatable); EOS always stops.")] = None,
    seed: Annotated[int | None, typer.Option("--seed", help="Sampling seed (printed; random when omitted).")] = None,
    tokenizer: Annotated[str | None, typer.Option("--tokenizer", help="Tokenizer (default: the checkpoint's).")] = None,
    device: Annotated[str, typer.Option("--device", help="auto, cpu, cuda, cuda:N.")] = "auto",
    vram_budget_gib: Annotated[
        float | None, typer.Option("--vram-budget-gib", min=0.1, help="Stream weights when they do not fit this budget.")
    ] = None,
    valid_utf8: Annotated[
        bool,
        typer.Option(
            "--valid-utf8/--no-valid-utf8",
            help="Sample only tokens that keep the reply valid UTF-8 (no U+FFFD from a stray byte token). "
            "Byte-level tokenizers only; no effect on others.",
        ),
    ] = True,
) -> None:
    """Generate text from a checkpoint, one-shot (-p) or interactive (-i)."""
    from ramgpt.generate import GenerateOptions, run_generate

    if prompt is None and not interactive:
        raise RamgptError("give a prompt with -p/--prompt or use -i for interactive mode")
    opts = GenerateOptions(
        max_new_tokens=max_new_tokens,
        temperature=temperature,
        top_k=top_k,
        top_p=top_p,
        repetition_penalty=repetition_penalty,
        stop=tuple(stop or ()),
        seed=seed,
        valid_utf8=valid_utf8,
    )
    run_generate(
        checkpoint,
        prompt=prompt,
        interactive=interactive,
        options=opts,
        tokenizer=tokenizer,
        device=device,
        vram_budget_gib=vram_budget_gib,
    )


# ----------------------------------------------------------------------------------------------
# doctor / estimate-memory
@app.command(cls=_Command)
@handle_errors
def doctor(
    profile: Annotated[str | None, typer.Option("--profile", help="Also check this profile's needs.")] = None,
    json_: JsonOpt = False,
) -> None:
    """Check this machine (CUDA, VRAM, RAM, pinned bandwidth, packages, tokens) and say what to fix."""
    from ramgpt.doctor import blocking_failures, run_doctor
    from ramgpt.render import render_doctor

    prof = _load(profile, []) if profile else None
    results = run_doctor(prof)
    if json_:
        typer.echo(json.dumps([r.to_dict() for r in results], indent=2, ensure_ascii=False))
    else:
        render_doctor(results, Console())
    if blocking_failures(results):
        raise typer.Exit(1)


@app.command("estimate-memory", cls=_Command)
@handle_errors
def estimate_memory(
    profile: ProfileOpt = "1b",
    set_: SetOpt = None,
    micro_test: MicroTestOpt = False,
    vram_gib: Annotated[float | None, typer.Option("--vram-gib", help="VRAM to plan for (default: detected or the budget).")] = None,
    ram_gib: Annotated[float | None, typer.Option("--ram-gib", help="CPU RAM to plan for (default: detected).")] = None,
    link_gbps: Annotated[float | None, typer.Option("--link-gbps", help="Host-device link rate in GB/s (default: measured, the card's, or assumed).")] = None,
    card: Annotated[
        str | None,
        typer.Option("--card", metavar="NAME", help="Plan for a card class you do not have (its VRAM, speed and link): "
                     "rtx3050-6gb, rtx3060-12gb, rtx4060-8gb, h100, h200."),
    ] = None,
    time_: Annotated[
        bool, typer.Option("--time/--no-time", help="Project step time and run length (measures a ~1 s matmul here unless --card).")
    ] = True,
    gpus: Annotated[int, typer.Option("--gpus", min=1, metavar="N", help="Plan for N GPUs of this machine "
                                      "(VRAM per GPU, RAM per node).")] = 1,
    json_: JsonOpt = False,
) -> None:
    """Predict VRAM, CPU RAM, disk, PCIe traffic and run time of a profile, and whether it fits.

    Exit codes: 0 it fits (or there is nothing to compare with), 8 it does not fit the VRAM,
    9 it does not fit the RAM, 10 neither; 2 a bad profile or option."""
    from ramgpt.memory import estimate
    from ramgpt.render import render_estimate

    for name, v in (("--vram-gib", vram_gib), ("--ram-gib", ram_gib), ("--link-gbps", link_gbps)):
        if v is not None and v <= 0:
            raise ConfigError(f"{name} must be positive, got {v}")
    prof = _load(profile, set_, micro_test)
    est = estimate(prof, vram_gib=vram_gib, ram_gib=ram_gib, link_gbps=link_gbps, card=card, gpus=gpus,
                   speed="auto" if time_ else None)
    if json_:
        typer.echo(json.dumps(est.to_dict(), indent=2, ensure_ascii=False))
    else:
        render_estimate(est, Console())
    # "does not fit" is an answer, not an error: its own codes, after the report (docs/memory-model.md)
    code = {(False, False): 0, (True, False): 8, (False, True): 9, (True, True): 10}[
        (est.fits_vram is False, est.fits_ram is False)
    ]
    if code:
        raise typer.Exit(code)


# ----------------------------------------------------------------------------------------------
# checkpoints: prune / push / export
@app.command("prune-ckpt", cls=_Command)
@handle_errors
def prune_ckpt(
    run_dir: Annotated[Path, typer.Argument(help="Run directory holding step_* checkpoints.")],
    keep_last: Annotated[int, typer.Option("--keep-last", min=1, help="Keep the newest N complete checkpoints.")],
    keep_every: Annotated[int | None, typer.Option("--keep-every", min=1, help="Also keep every K-th step.")] = None,
    keep_best: Annotated[bool, typer.Option("--keep-best", help="Also keep the best-eval checkpoint.")] = False,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="Show what would go; delete nothing.")] = False,
) -> None:
    """Delete old checkpoints and partial leftovers; never the newest complete one."""
    from ramgpt.checkpoint import prune_checkpoints
    from ramgpt.render import render_prune

    report = prune_checkpoints(run_dir, keep_last=keep_last, keep_every=keep_every, keep_best=keep_best, dry_run=dry_run)
    render_prune(report, Console())


@app.command(cls=_Command)
@handle_errors
def push(
    run_dir: Annotated[Path, typer.Argument(help="Run directory, checkpoint, or exported model directory.")],
    # Required, but checked by push itself: a missing --repo-id is then one error line, not a usage panel.
    repo_id: Annotated[str | None, typer.Option("--repo-id", help="Required: USER/NAME on the Hugging Face Hub.")] = None,
    private: Annotated[
        bool,
        typer.Option(
            "--private/--public",
            help="Create the repo private (the default, as checkpoint.hub_private) or public; "
            "an existing repo keeps its visibility.",
            show_default=False,
        ),
    ] = True,
    revision: Annotated[str | None, typer.Option("--revision", help="Branch to push to.")] = None,
    message: Annotated[str | None, typer.Option("--message", "-m", help="Commit message.")] = None,
    include: Annotated[list[str] | None, typer.Option("--include", help="Glob of files to upload (repeatable).")] = None,
    exclude: Annotated[list[str] | None, typer.Option("--exclude", help="Glob of files to skip (repeatable).")] = None,
    token: Annotated[
        str | None, typer.Option("--token", help="HF token (default: HF_TOKEN or the login cache). Never printed.")
    ] = None,
    with_optimizer: Annotated[bool, typer.Option("--with-optimizer", help="Also upload optimizer state.")] = False,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="Show what would be sent; send nothing.")] = False,
) -> None:
    """Upload checkpoints, tokenizer and config to the Hugging Face Hub."""
    from ramgpt.hub import push as do_push
    from ramgpt.render import render_push

    plan = do_push(
        run_dir,
        repo_id=repo_id,
        private=private,
        revision=revision,
        message=message,
        include=include,
        exclude=exclude,
        token=token,
        with_optimizer=with_optimizer,
        dry_run=dry_run,
    )
    render_push(plan, Console())


@app.command(cls=_Command)
@handle_errors
def export(
    checkpoint: Annotated[Path, typer.Argument(help="Checkpoint directory or run directory (newest complete).")],
    out_dir: Annotated[Path, typer.Argument(help="Where to write the transformers model directory (new or empty).")],
    overwrite: Annotated[
        bool,
        typer.Option(
            "--overwrite",
            help="Write into a non-empty OUT_DIR: replace only the files export writes (config.json, "
            "model.safetensors, generation_config.json, tokenizer files, README.md); other files stay.",
        ),
    ] = False,
) -> None:
    """Export a checkpoint as a Hugging Face transformers GPT2LMHeadModel directory."""
    from ramgpt.hub import export_hf

    path = export_hf(checkpoint, out_dir, overwrite=overwrite)
    Console().print(f"exported to {path}")


@app.command("profiles", cls=_Command)
@handle_errors
def list_profiles() -> None:
    """List the shipped profiles."""
    from ramgpt.config import available_profiles, load_profile

    console = Console()
    for name in available_profiles():
        p = load_profile(name, use_env=False)
        console.print(f"[bold]{name}[/]: {p.description}")


# ----------------------------------------------------------------------------------------------
# tokenizer train / stats
tokenizer_app = typer.Typer(
    help="Train a tokenizer on a profile's own data, and compare tokenizers on its held-out documents.",
    no_args_is_help=True,
)
app.add_typer(tokenizer_app, name="tokenizer")


@tokenizer_app.command("train", cls=_Command)
@handle_errors
def tokenizer_train(
    out: Annotated[Path, typer.Option("--out", help="Directory to write (loads with data.tokenizer and AutoTokenizer).")],
    profile: ProfileOpt = "micro-test",
    set_: SetOpt = None,
    vocab_size: Annotated[
        int | None, typer.Option("--vocab-size", min=258, help="Tokens to learn (default: the profile's model.vocab_size).")
    ] = None,
    samples: Annotated[
        int | None,
        typer.Option("--samples", min=1, help="Train on the first N training documents of the profile's data [default: 50000]."),
    ] = None,
    seed: Annotated[int | None, typer.Option("--seed", help="Order of the documents (default: data.seed).")] = None,
    pad: Annotated[
        bool, typer.Option("--pad/--no-pad", help="Pad the vocabulary to model.vocab_size with never-produced tokens.")
    ] = True,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Replace a non-empty --out directory.")] = False,
) -> None:
    """Train a byte-level BPE tokenizer on the first documents of a profile's data stream."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

    from ramgpt.tokenizer_train import train_profile_tokenizer

    prof = _load(profile, set_)
    columns = (SpinnerColumn(), TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
    with Progress(*columns, console=err_console, transient=True) as bar:
        task = bar.add_task("reading documents", total=None)

        def on_progress(phase: str, done: int, total: int | None) -> None:
            if phase == "reading":
                bar.update(task, completed=done, total=total)
            else:  # learning merges / saving: no count to show, the spinner runs on
                bar.update(task, description=f"{phase} ({done:,} documents)", total=None)

        result = train_profile_tokenizer(
            prof, out, vocab_size=vocab_size, samples=samples, seed=seed, pad=pad, overwrite=overwrite,
            on_progress=on_progress,
        )  # fmt: skip
    Console().print(result.summary(), highlight=False)


@tokenizer_app.command("stats", cls=_Command)
@handle_errors
def tokenizer_stats(
    profile: ProfileOpt = "micro-test",
    set_: SetOpt = None,
    tokenizer: Annotated[
        list[str] | None,
        typer.Option("--tokenizer", help="Tokenizer to measure (repeatable; default: the profile's data.tokenizer)."),
    ] = None,
    docs: Annotated[int | None, typer.Option("--docs", min=1, help="Measure on at most N held-out documents.")] = None,
    json_: JsonOpt = False,
) -> None:
    """Characters per token, tokens per document and fallback rates on the profile's held-out documents."""
    from rich.table import Table

    from ramgpt.fmt import fmt_pct
    from ramgpt.tokenizer_stats import profile_stats

    rows = profile_stats(_load(profile, set_), tokenizer, docs)
    if json_:
        typer.echo(json.dumps([r.to_dict() for r in rows], indent=2, ensure_ascii=False))
        return
    table = Table(title=f"{rows[0].documents:,} held-out documents, {rows[0].characters:,} characters")
    for col in ("tokenizer", "vocab", "chars/token", "tokens/doc", "byte-fallback", "unknown"):
        table.add_column(col, justify="left" if col == "tokenizer" else "right")
    for r in rows:
        table.add_row(
            r.tokenizer, f"{r.vocab_size:,}", f"{r.chars_per_token:.3f}", f"{r.tokens_per_document:,.1f}",
            fmt_pct(100 * r.byte_fallback_rate), fmt_pct(100 * r.unknown_rate),
        )  # fmt: skip
    Console().print(table)


def main() -> None:  # pragma: no cover
    app()

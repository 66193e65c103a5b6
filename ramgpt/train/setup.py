"""Everything a run needs before its first step, in the order a user sees it happen: placement,
tokenizer, run directory (locked), sinks, model, engine, data, and the state of a resumed run.

Each phase is announced to the sinks (``progress(0, phase=...)``) so the panel says what is
happening during the start-up of a large model instead of only "waiting for the first step".
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from ramgpt import checkpoint as ckpt
from ramgpt.config import Profile
from ramgpt.dist import Comm, DistContext
from ramgpt.dist import from_env as dist_from_env
from ramgpt.engine.base import DTYPES
from ramgpt.engine.compiled import BlockWarmUp, pass_sizes
from ramgpt.errors import CheckpointError, ConfigError, OutOfMemoryError, RamgptError, is_out_of_memory
from ramgpt.fmt import first_line
from ramgpt.memory.timing import flops_per_token
from ramgpt.placement import Placement, decide
from ramgpt.probe import Machine, probe_machine
from ramgpt.schedule import Schedule, resume_schedule
from ramgpt.train.checkpointer import Checkpointer, SaveContext, SavedHook
from ramgpt.train.evaluator import Evaluator
from ramgpt.train.metrics import MetricsLogger, peak_flops
from ramgpt.train.rundir import RunDir
from ramgpt.train.state import Snapshot, TrainResult, TrainState


@dataclass
class Run:
    """One training run, set up: what :func:`ramgpt.train.loop.run_steps` drives."""

    profile: Profile
    placement: Placement
    run_dir: RunDir
    out: Any  # MultiSink
    engine: Any
    data: Any
    evaluator: Evaluator
    checkpointer: Checkpointer
    metrics: MetricsLogger
    state: TrainState
    schedule: Schedule
    snapshot: Snapshot
    sysstats: Any
    notices: list[str] = field(default_factory=list)
    comm: Comm | None = None
    last_loss: float | None = None

    def shard(self, t: torch.Tensor) -> torch.Tensor:
        """This rank's sequences of the global batch (every rank reads the same stream)."""
        return t if self.comm is None else t[self.comm.ctx.rank :: self.comm.ctx.world]

    @property
    def max_steps(self) -> int:
        return self.profile.optim.max_steps

    @property
    def seqs_per_step(self) -> int:
        return self.profile.optim.seqs_per_step

    def result(self, interrupted: bool, elapsed_s: float) -> TrainResult:
        return TrainResult(
            run_dir=self.run_dir.path, steps=self.state.step, tokens_seen=self.state.tokens_seen,
            final_loss=self.last_loss, eval_loss=self.state.last_eval_loss,
            last_checkpoint=self.checkpointer.last_path, elapsed_s=elapsed_s, engine=self.engine.name,
            device=self.placement.device, interrupted=interrupted, notices=self.notices,
        )

    def close(self) -> None:
        closers = [self.checkpointer.close, self.sysstats.close, self.out.close, self.engine.close, self.run_dir.close]
        if self.comm is not None:
            closers.append(self.comm.close)
        for closer in closers:
            try:
                closer()
            except Exception:  # noqa: BLE001 - closing must reach every component
                pass


def oom_message(profile: Profile, engine: Any, step: int) -> str:
    """One line: what ran out, what to lower, and what ``estimate-memory`` predicts."""
    budget = profile.runtime.vram_budget_gib
    predicted = f"; see `ramgpt estimate-memory --profile {profile.name}`"
    try:
        from ramgpt.memory import estimate

        d = estimate(profile, vram_gib=budget, detect=False).to_dict()
        need = (d.get("gpu") or {}).get("need_bytes")
        if need:
            predicted = f"; `ramgpt estimate-memory --profile {profile.name}` predicts {need / 2**30:.2f} GiB"
            if d.get("max_seqs_per_pass"):
                predicted += f" and at most {d['max_seqs_per_pass']} sequences per pass"
    except Exception:  # noqa: BLE001 - advice only
        predicted = f"; run `ramgpt estimate-memory --profile {profile.name}`"
    if engine is not None and engine.name == "streamed":
        lower = f"runtime.seqs_per_pass (now {engine.seqs_per_pass}) or data.seq_len"
        if engine.grad_accum == "device":
            lower += ", or set runtime.grad_accum=host (gradients summed on the CPU: less VRAM)"
    else:
        lower = (f"optim.micro_batch_size (now {profile.optim.micro_batch_size}), data.seq_len, or use "
                 "runtime.engine=streamed")
    cap = f" under a {budget} GiB budget" if budget else ""
    return f"CUDA out of memory at step {step + 1}{cap}: lower {lower}{predicted}; saved checkpoints are intact"


def _place(profile: Profile, ctx: DistContext | None, machine: Machine) -> Placement:
    if ctx is not None and machine.cuda and profile.runtime.device in ("auto", "cuda"):
        # one process per GPU: this rank's GPU is its local rank's
        if ctx.local_rank >= len(machine.gpus):
            raise ConfigError(f"torchrun started {ctx.local_world} processes on this node but it has "
                              f"{len(machine.gpus)} GPU(s); use --nproc-per-node {len(machine.gpus)}")
        profile = profile.model_copy(update={"runtime": profile.runtime.model_copy(
            update={"device": f"cuda:{ctx.local_rank}"})})
        torch.cuda.set_device(ctx.local_rank)
    placement = decide(profile, machine)
    if placement.cuda and placement.vram_budget_b is None:
        free = torch.cuda.mem_get_info(torch.device(placement.device))[0]  # after the context exists
        placement = decide(profile, machine, free_vram_b=free)
    return placement


def _same_everywhere(comm: Comm, profile: Profile, placement: Placement, machine: Machine) -> None:
    """One-line errors, on every rank, for a job whose ranks disagree or cannot run the profile."""
    import hashlib
    import json

    mine = hashlib.sha256(json.dumps(profile.to_public_dict(), sort_keys=True).encode()).hexdigest()
    gpu = machine.gpu(placement.device)
    short = ""
    if gpu is not None and profile.runtime.vram_budget_gib and gpu.total_b < profile.runtime.vram_budget_gib * 2**30:
        short = (f"rank {comm.ctx.rank}'s GPU ({gpu.name}, {gpu.total_b / 2**30:.1f} GiB) is smaller than "
                 f"runtime.vram_budget_gib {profile.runtime.vram_budget_gib}")
    views = comm.gather_objects((mine, short))
    differ = [r for r, (h, _) in enumerate(views) if h != views[0][0]]
    if differ:
        raise ConfigError(f"rank {differ[0]} runs another profile than rank 0 (profile, --set or RAMGPT_* differ); "
                          "start every rank with the same command")
    problem = next((p for _, p in views if p), "")
    if problem:
        raise ConfigError(problem + "; lower the budget or leave that GPU out (CUDA_VISIBLE_DEVICES)")
    if profile.optim.seqs_per_step % comm.ctx.world:
        raise ConfigError(f"optim.seqs_per_step ({profile.optim.seqs_per_step} = micro_batch_size x grad_accum_steps) "
                          f"does not divide into the {comm.ctx.world} ranks; change optim.grad_accum_steps")


def _on_main(comm: Comm | None, fn: Any) -> Any:
    """Run ``fn`` on rank 0 only (the run directory, the tokenizer); its one-line error, if any,
    is raised on every rank, so no rank waits for a collective that will never come."""
    import ramgpt.errors as errors

    result, err = None, None
    if comm is None or comm.ctx.main:
        try:
            result = fn()
        except RamgptError as e:
            if comm is None:
                raise
            err = (type(e).__name__, str(e))
    if comm is not None:
        err = comm.broadcast_object(err)
    if err is not None:
        raise getattr(errors, err[0], RamgptError)(err[1])
    return result


def _default_sinks(profile: Profile, run_dir: Path, resume_step: int | None, wandb_id: str | None) -> list:
    from ramgpt.sinks import make_sinks  # the panel (rich) is imported only when make_sinks picks it

    return make_sinks(profile.logging, run_dir, profile.to_public_dict(), wandb_resume_id=wandb_id,
                      resume_step=resume_step, title=f"ramgpt · {profile.name}")


def _load_resume(run_dir: Path, resume: str, notices: list[str]) -> ckpt.LoadedCheckpoint:
    # a run dir loads its newest complete checkpoint; a corrupt newest one falls back to the
    # previous one (with a warning); partial leftovers are skipped with a warning
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", ckpt.PartialCheckpointWarning)
        loaded = ckpt.load_checkpoint(run_dir if resume == "latest" else Path(resume), with_optimizer=True,
                                      lazy=True)  # tensors read one at a time, into place
    notices.extend(str(w.message) for w in caught if issubclass(w.category, ckpt.PartialCheckpointWarning))
    return loaded


def setup_run(profile: Profile, *, resume: str | None, sinks: list | None, on_saved: Sequence[SavedHook],
              t_start: float) -> Run:
    from ramgpt.data import TokenBatches, eval_batches
    from ramgpt.engine import build_engine
    from ramgpt.model import build_gpt
    from ramgpt.sinks import MultiSink, NullSink
    from ramgpt.sinks.wandb import find_wandb_run_id
    from ramgpt.sysstats import SystemStats
    from ramgpt.tokenizer_train import ensure_tokenizer

    rt = profile.runtime
    ctx = dist_from_env()
    if rt.threads:
        torch.set_num_threads(rt.threads)
    elif ctx is not None:
        # torchrun sets OMP_NUM_THREADS=1; the ranks of a node share its cores for the CPU optimizer
        from ramgpt.probe import usable_cores

        torch.set_num_threads(max(1, usable_cores() // ctx.local_world))
    torch.manual_seed(rt.seed)
    machine = probe_machine()
    placement = _place(profile, ctx, machine)
    comm = Comm(ctx, placement.device) if ctx is not None else None
    main = comm is None or comm.ctx.main
    run_dir = RunDir(profile.run_dir, lock=main)
    try:
        if comm is not None:
            _same_everywhere(comm, profile, placement, machine)
        _on_main(comm, run_dir.open)  # created, writable, locked (rank 0)
        # rank 0 trains the tokenizer when the profile asks; the others then load the saved one
        tokenizer = _on_main(comm, lambda: ensure_tokenizer(profile, run_dir.path))
        if not main:
            tokenizer = ensure_tokenizer(profile, run_dir.path)
        if tokenizer.vocab_size > profile.model.vocab_size:
            raise ConfigError(
                f"model.vocab_size ({profile.model.vocab_size}) is smaller than the tokenizer's vocabulary "
                f"({tokenizer.vocab_size} tokens of {tokenizer.name!r}); raise model.vocab_size"
            )
        notices: list[str] = []
        _on_main(comm, lambda: _check_run_dir(profile, run_dir, resume))
        loaded = _load_resume(run_dir.path, resume, notices) if resume else None
        state = TrainState.from_meta(loaded.meta) if loaded else TrainState()
        schedule = Schedule.from_profile(profile)
        if loaded:
            schedule, note = resume_schedule(profile, loaded.meta)
            if note:
                notices.append(note)
        if not main:
            sinks = [NullSink()]  # the other ranks print nothing but errors
        elif sinks is None:
            sinks = _default_sinks(profile, run_dir.path, state.step if loaded else None, state.wandb_run_id)
        out = MultiSink(list(sinks))
    except BaseException:
        run_dir.close()
        if comm is not None:
            comm.close()
        raise
    state.wandb_run_id = find_wandb_run_id(sinks) or state.wandb_run_id
    for note in notices:
        out.event("warning" if note.startswith("skipping") else "info", note)

    def phase(text: str | None) -> None:
        out.progress(state.step, phase=text, device=placement.device, engine=placement.engine,
                     tokens_seen=state.tokens_seen)

    engine = None
    compiling = None
    try:
        # the data first: a missing or unreadable dataset is a one-line error before minutes of set-up
        phase("reading the data")
        data = TokenBatches(profile.data, tokenizer, "train", profile.optim.micro_batch_size, profile.data.seed)
        eval_set = eval_batches(profile.data, tokenizer, profile.logging.eval_batches, profile.optim.micro_batch_size)
        chars_per_token = _chars_per_token(profile, tokenizer)
        phase("building the model")
        # the same weights on every rank (one seed); the streamed engine allocates them in its
        # page-locked arena and initialises them there
        model = build_gpt(profile.model, rt.loss_chunk_tokens, materialize=placement.engine != "streamed")
        if placement.compile_blocks:  # compiles in a thread of its own while the engine places the weights
            world = ctx.world if ctx is not None else 1
            per_pass = placement.seqs_per_pass
            warm = BlockWarmUp(profile.model, placement.device, DTYPES[placement.precision], profile.data.seq_len,
                               pass_sizes(profile.optim.seqs_per_step, per_pass, world),
                               pass_sizes(profile.logging.eval_batches * profile.optim.micro_batch_size, per_pass,
                                          world))  # the evaluator cuts all its sequences into passes
            # dynamo restores the global RNG states it saw when a compilation began, from the
            # compiling thread: put back what they are now (nothing here draws from them meanwhile)
            rng = ckpt.capture_rng_state()
            warm.start()
            compiling = warm  # only a started thread is joined on an error
        phase("placing the weights" + (" in pinned CPU RAM" if placement.engine == "streamed" else ""))
        if rt.optimizer_on_disk and placement.engine != "streamed":
            raise ConfigError("runtime.optimizer_on_disk needs the streamed engine, but this machine runs the profile "
                              f"on the {placement.engine} engine; set runtime.engine=streamed")
        engine = build_engine(model, placement, profile.optim, rt, scratch_dir=run_dir.path, comm=comm,
                              on_phase=lambda text: phase(f"placing the weights: {text}"))
        if compiling is not None and compiling.is_alive():
            phase("compiling the blocks (torch.compile; later runs reuse its cache)")
        warning = engine.warm_up(profile.data.seq_len, compiling)
        if compiling is not None:
            ckpt.restore_rng_state(rng)
        if warning is not None:
            notices.append(warning)
            out.event("warning", warning)
        if comm is not None:
            torch.manual_seed(rt.seed + comm.ctx.rank)  # each rank its own dropout masks
        if loaded is not None:
            phase(f"restoring step {loaded.step}")
            _restore(engine, data, loaded, profile, comm)
            notices.append(f"resumed from {loaded.path} at step {state.step}")
            out.event("info", notices[-1])
    except BaseException as e:
        if compiling is not None:  # a compiling thread left running aborts the interpreter at exit
            compiling.join()
        if engine is not None:
            engine.close()
        out.close()
        run_dir.close()
        if comm is not None:
            comm.close()
        if isinstance(e, Exception) and not isinstance(e, RamgptError) and is_out_of_memory(e):
            raise OutOfMemoryError(oom_message(profile, None, state.step)) from e
        raise
    n_params = model.num_params()
    ranks = f" x {comm.ctx.world} ranks" if comm is not None else ""
    out.event("info", f"{profile.name}: {n_params:,} parameters, {engine.name} engine on {placement.device}{ranks} "
                      f"({placement.precision}), {engine.seqs_per_pass} sequences per pass, "
                      f"{profile.tokens_per_step:,} tokens per step")
    phase("first step" if state.step < profile.optim.max_steps else None)

    sysstats = SystemStats(placement.device, vram_budget_b=placement.vram_budget_b)
    gpu = machine.gpu(placement.device)
    metrics = MetricsLogger(
        out, engine, sysstats, max_steps=profile.optim.max_steps, log_interval=profile.logging.log_interval,
        flops_per_token=flops_per_token(profile.model, profile.data.seq_len),  # model FLOPs: no recompute
        peak_flops=peak_flops(placement.device, gpu.name if gpu else None), t_start=t_start,
        epoch_of=lambda: data.epoch + 1, comm=comm, chars_per_token=chars_per_token,
    )
    checkpointer = Checkpointer(
        run_dir.path, profile.checkpoint, engine, tokenizer,
        SaveContext(profile.to_public_dict(), engine.name, placement.precision, schedule.to_dict()),
        event=out.event, status=lambda text: out.progress(state.step, saving=text), on_saved=on_saved if main else (),
        last_saved_step=state.step if loaded else -1, comm=comm,
    )
    evaluator = Evaluator(engine, eval_set, profile.logging.eval_interval, profile.optim.max_steps, comm=comm)
    return Run(profile, placement, run_dir, out, engine, data, evaluator, checkpointer, metrics, state, schedule,
               Snapshot(data.state_dict(), ckpt.capture_rng_state()), sysstats, notices, comm=comm)


def _chars_per_token(profile: Profile, tokenizer: Any, docs: int = 64) -> float | None:
    """Characters per token of the tokenizer on the held-out documents: the panel shows how much
    text a second of training reads (a tokenizer built for Japanese packs ~2x gpt2's; #16)."""
    import itertools

    from ramgpt.data import documents
    from ramgpt.tokenizer_stats import measure

    try:
        stats = measure(tokenizer, itertools.islice(documents(profile.data, "eval"), docs))
    except RamgptError:
        return None
    return stats.chars_per_token if stats.tokens else None


def _check_run_dir(profile: Profile, run_dir: RunDir, resume: str | None) -> None:
    """Rank 0, before any work: no silent overwrite of a run, room for its checkpoints, the config dump."""
    if not resume:
        done = [i.step for i in ckpt.list_checkpoints(run_dir.path) if i.complete]
        if done:
            raise ConfigError(f"{run_dir.path} already holds checkpoints up to step {max(done)}; "
                              "continue with --resume latest, or train into a new --out-dir")
    if profile.checkpoint.require_free_disk:
        from ramgpt.memory import disk_per_checkpoint

        existing = sum(i.bytes for i in ckpt.list_checkpoints(run_dir.path))
        run_dir.check_free_space(disk_per_checkpoint(profile).per_checkpoint, profile.checkpoint.keep_last_n, existing)
    run_dir.write_config(profile.to_public_dict())


def _restore(engine: Any, data: Any, loaded: ckpt.LoadedCheckpoint, profile: Profile, comm: Comm | None) -> None:
    """Put a checkpoint's tensors, optimizer, loss scale, data position and RNGs back (each rank
    its own RNG when the checkpoint was written by as many ranks; the data position is shared)."""
    meta = loaded.meta
    try:
        engine.load_state(loaded.model_state, loaded.optimizer_state, meta.get("loss_scaler"))
    except (KeyError, ValueError, RuntimeError) as e:
        raise CheckpointError(
            f"checkpoint {loaded.path} does not fit profile {profile.name!r} (was it trained with another "
            f"model shape?): {first_line(e)}"
        ) from e
    data.load_state_dict(meta["data_state"])
    per_rank = meta.get("rng_ranks") or []
    world = comm.ctx.world if comm is not None else 1
    rank = comm.ctx.rank if comm is not None else 0
    ckpt.restore_rng_state(per_rank[rank] if len(per_rank) == world else meta["rng"])

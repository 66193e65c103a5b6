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
from ramgpt.errors import CheckpointError, ConfigError, OutOfMemoryError, RamgptError, is_out_of_memory
from ramgpt.fmt import first_line
from ramgpt.memory.timing import flops_per_token
from ramgpt.placement import Placement, decide
from ramgpt.probe import probe_machine
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
    last_loss: float | None = None

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
        for closer in (self.checkpointer.close, self.sysstats.close, self.out.close, self.engine.close,
                       self.run_dir.close):
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


def _place(profile: Profile) -> Placement:
    machine = probe_machine()
    free = None
    placement = decide(profile, machine)
    if placement.cuda and placement.vram_budget_b is None:
        free = torch.cuda.mem_get_info(torch.device(placement.device))[0]  # after the context exists
        placement = decide(profile, machine, free_vram_b=free)
    return placement


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
    from ramgpt.sinks import MultiSink
    from ramgpt.sinks.wandb import find_wandb_run_id
    from ramgpt.sysstats import SystemStats
    from ramgpt.tokenizer_train import ensure_tokenizer

    rt = profile.runtime
    if rt.threads:
        torch.set_num_threads(rt.threads)
    torch.manual_seed(rt.seed)
    placement = _place(profile)
    run_dir = RunDir(profile.run_dir).open()  # created, writable, locked
    try:
        tokenizer = ensure_tokenizer(profile, run_dir.path)  # trains one first when the profile asks
        if tokenizer.vocab_size > profile.model.vocab_size:
            raise ConfigError(
                f"model.vocab_size ({profile.model.vocab_size}) is smaller than the tokenizer's vocabulary "
                f"({tokenizer.vocab_size} tokens of {tokenizer.name!r}); raise model.vocab_size"
            )
        notices: list[str] = []
        loaded = None
        if resume:
            loaded = _load_resume(run_dir.path, resume, notices)
        else:
            done = [i.step for i in ckpt.list_checkpoints(run_dir.path) if i.complete]
            if done:
                raise ConfigError(f"{run_dir.path} already holds checkpoints up to step {max(done)}; "
                                  "continue with --resume latest, or train into a new --out-dir")
        if profile.checkpoint.require_free_disk:
            from ramgpt.memory import disk_per_checkpoint

            existing = sum(i.bytes for i in ckpt.list_checkpoints(run_dir.path))
            run_dir.check_free_space(disk_per_checkpoint(profile).per_checkpoint, profile.checkpoint.keep_last_n,
                                     existing)
        run_dir.write_config(profile.to_public_dict())
        state = TrainState.from_meta(loaded.meta) if loaded else TrainState()
        schedule = Schedule.from_profile(profile)
        if loaded:
            schedule, note = resume_schedule(profile, loaded.meta)
            if note:
                notices.append(note)
        if sinks is None:
            sinks = _default_sinks(profile, run_dir.path, state.step if loaded else None, state.wandb_run_id)
        out = MultiSink(list(sinks))
    except BaseException:
        run_dir.close()
        raise
    state.wandb_run_id = find_wandb_run_id(sinks) or state.wandb_run_id
    for note in notices:
        out.event("warning" if note.startswith("skipping") else "info", note)

    def phase(text: str | None) -> None:
        out.progress(state.step, phase=text, device=placement.device, engine=placement.engine,
                     tokens_seen=state.tokens_seen)

    engine = None
    try:
        # the data first: a missing or unreadable dataset is a one-line error before minutes of set-up
        phase("reading the data")
        data = TokenBatches(profile.data, tokenizer, "train", profile.optim.micro_batch_size, profile.data.seed)
        eval_set = eval_batches(profile.data, tokenizer, profile.logging.eval_batches, profile.optim.micro_batch_size)
        phase("building the model")
        model = build_gpt(profile.model, rt.loss_chunk_tokens)
        phase("placing the weights" + (" in pinned CPU RAM" if placement.engine == "streamed" else ""))
        if rt.optimizer_on_disk and placement.engine != "streamed":
            raise ConfigError("runtime.optimizer_on_disk needs the streamed engine, but this machine runs the profile "
                              f"on the {placement.engine} engine; set runtime.engine=streamed")
        engine = build_engine(model, placement, profile.optim, rt, scratch_dir=run_dir.path)
        if loaded is not None:
            phase(f"restoring step {loaded.step}")
            _restore(engine, data, loaded, profile)
            notices.append(f"resumed from {loaded.path} at step {state.step}")
            out.event("info", notices[-1])
    except BaseException as e:
        if engine is not None:
            engine.close()
        out.close()
        run_dir.close()
        if isinstance(e, Exception) and not isinstance(e, RamgptError) and is_out_of_memory(e):
            raise OutOfMemoryError(oom_message(profile, None, state.step)) from e
        raise
    n_params = model.num_params()
    out.event("info", f"{profile.name}: {n_params:,} parameters, {engine.name} engine on {placement.device} "
                      f"({placement.precision}), {engine.seqs_per_pass} sequences per pass, "
                      f"{profile.tokens_per_step:,} tokens per step")
    phase("first step" if state.step < profile.optim.max_steps else None)

    sysstats = SystemStats(placement.device, vram_budget_b=placement.vram_budget_b)
    gpu = probe_machine().gpu(placement.device)
    metrics = MetricsLogger(
        out, engine, sysstats, max_steps=profile.optim.max_steps, log_interval=profile.logging.log_interval,
        flops_per_token=flops_per_token(profile.model, profile.data.seq_len),  # model FLOPs: no recompute
        peak_flops=peak_flops(placement.device, gpu.name if gpu else None), t_start=t_start,
        epoch_of=lambda: data.epoch + 1,
    )
    checkpointer = Checkpointer(
        run_dir.path, profile.checkpoint, engine, tokenizer,
        SaveContext(profile.to_public_dict(), engine.name, placement.precision, schedule.to_dict()),
        event=out.event, status=lambda text: out.progress(state.step, saving=text), on_saved=on_saved,
        last_saved_step=state.step if loaded else -1,
    )
    evaluator = Evaluator(engine, eval_set, profile.logging.eval_interval, profile.optim.max_steps)
    return Run(profile, placement, run_dir, out, engine, data, evaluator, checkpointer, metrics, state, schedule,
               Snapshot(data.state_dict(), ckpt.capture_rng_state()), sysstats, notices)


def _restore(engine: Any, data: Any, loaded: ckpt.LoadedCheckpoint, profile: Profile) -> None:
    """Put a checkpoint's tensors, optimizer, loss scale, data position and RNGs back."""
    meta = loaded.meta
    try:
        engine.load_state(loaded.model_state, loaded.optimizer_state, meta.get("loss_scaler"))
    except (KeyError, ValueError, RuntimeError) as e:
        raise CheckpointError(
            f"checkpoint {loaded.path} does not fit profile {profile.name!r} (was it trained with another "
            f"model shape?): {first_line(e)}"
        ) from e
    data.load_state_dict(meta["data_state"])
    ckpt.restore_rng_state(meta["rng"])

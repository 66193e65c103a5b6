"""The training loop. ``train(profile)`` is the whole job; the loop reads as a table of contents
and each concern (data, engine, schedule, checkpoints, metrics) lives in its own module.

A notebook user can call ``ramgpt.train.train(load_profile("micro-test"))``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import signal
import threading
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import yaml

from ramgpt.config import Profile
from ramgpt.errors import (
    CheckpointError,
    ConfigError,
    NonFiniteLossError,
    OutOfMemoryError,
    RamgptError,
    is_out_of_memory,
)
from ramgpt.numerics import ensure_reproducible_env
from ramgpt.placement import resolve_device, resolve_precision
from ramgpt.probe import probe_machine
from ramgpt.schedule import lr_at

MAX_NONFINITE_STEPS = 3

# Dense bf16 tensor-core peaks (FLOP/s) for MFU; unknown cards get no MFU (set
# RAMGPT_PEAK_TFLOPS to supply one).
_PEAK_FLOPS = {"H100": 989e12, "H200": 989e12, "H800": 989e12, "A100": 312e12, "L4": 121e12, "A10": 125e12}


@dataclass
class TrainState:
    """Everything about progress that a checkpoint must carry (besides tensors)."""

    step: int = 0
    tokens_seen: int = 0
    best_eval_loss: float | None = None
    last_eval_loss: float | None = None
    wandb_run_id: str | None = None
    nonfinite_streak: int = 0


@dataclass
class TrainResult:
    run_dir: Path
    steps: int
    tokens_seen: int
    final_loss: float | None
    eval_loss: float | None
    last_checkpoint: Path | None
    elapsed_s: float
    engine: str
    device: str
    interrupted: bool = False
    notices: list[str] = field(default_factory=list)

    def summary(self) -> str:
        loss = f"{self.final_loss:.4f}" if self.final_loss is not None else "n/a"
        ev = f", eval loss {self.eval_loss:.4f}" if self.eval_loss is not None else ""
        ck = f"; last checkpoint {self.last_checkpoint}" if self.last_checkpoint else ""
        head = "interrupted" if self.interrupted else "done"
        return (
            f"{head}: {self.steps} steps, {self.tokens_seen:,} tokens, loss {loss}{ev} "
            f"in {self.elapsed_s:.1f}s ({self.engine} engine on {self.device}){ck}"
        )


def flops_per_token(profile: Profile, n_params: int) -> float:
    """6N + 12·L·C·T training FLOPs per token (PaLM appendix B; recompute not counted)."""
    m = profile.model
    return 6.0 * n_params + 12.0 * m.n_layer * m.n_embd * profile.data.seq_len


def peak_flops(device: str) -> float | None:
    env = os.environ.get("RAMGPT_PEAK_TFLOPS")
    if env:
        return float(env) * 1e12
    if not device.startswith("cuda"):
        return None
    name = torch.cuda.get_device_name(torch.device(device))
    for key, val in _PEAK_FLOPS.items():
        if key in name:
            return val
    return None


def _split(x: torch.Tensor, y: torch.Tensor, n: int):
    for i in range(0, x.shape[0], n):
        yield x[i : i + n], y[i : i + n]


def _oom_message(profile: Profile, engine, state: TrainState) -> str:
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
        if getattr(engine, "grad_accum", "host") == "device":
            lower += ", or set runtime.grad_accum=host (gradients summed on the CPU: less VRAM)"
    else:
        lower = f"optim.micro_batch_size (now {profile.optim.micro_batch_size}), data.seq_len, or use runtime.engine=streamed"
    cap = f" under a {budget} GiB budget" if budget else ""
    return f"CUDA out of memory at step {state.step + 1}{cap}: lower {lower}{predicted}; saved checkpoints are intact"


def _write_config_dump(run_dir: Path, profile: Profile) -> None:
    path = run_dir / "config.yaml"
    tmp = path.with_suffix(".yaml.tmp")
    tmp.write_text(yaml.safe_dump(profile.to_public_dict(), sort_keys=False, allow_unicode=True), encoding="utf-8")
    os.replace(tmp, path)


def train(profile: Profile, resume: str | None = None, sinks: list | None = None, hub_api=None) -> TrainResult:
    """Train ``profile``; returns a summary. Raises RamgptError subclasses for user problems.

    ``sinks`` replaces the default metric sinks; ``hub_api`` (an ``HfApi``-like object) is used
    for background pushes instead of a real client (notebooks, tests)."""
    from ramgpt import checkpoint as ckpt
    from ramgpt.data import TokenBatches, eval_batches
    from ramgpt.engine import build_engine
    from ramgpt.model import GPT
    from ramgpt.tokenizer import load_tokenizer

    ensure_reproducible_env()
    notices: list[str] = []
    t_start = time.perf_counter()
    rt = profile.runtime
    # Expandable segments cut the streamed engine's fragmentation (measured on an H200: peak
    # reserved 4.48 GiB instead of 5.03 at the same speed); must be set before CUDA allocates.
    os.environ.setdefault("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True")
    machine = probe_machine()
    device = resolve_device(rt.device, machine)
    precision = resolve_precision(rt.precision, device, machine)
    if rt.threads:
        torch.set_num_threads(rt.threads)
    torch.manual_seed(rt.seed)

    tokenizer = load_tokenizer(profile.data.tokenizer)
    if tokenizer.vocab_size > profile.model.vocab_size:
        raise ConfigError(
            f"model.vocab_size ({profile.model.vocab_size}) is smaller than the tokenizer's vocabulary "
            f"({tokenizer.vocab_size} tokens of {tokenizer.name!r}); raise model.vocab_size"
        )

    run_dir = profile.run_dir
    loaded = None
    if not resume:
        existing = [i for i in ckpt.list_checkpoints(run_dir) if i.complete] if run_dir.is_dir() else []
        if existing:
            raise ConfigError(
                f"{run_dir} already holds checkpoints up to step {max(i.step for i in existing)}; "
                "continue with --resume latest, or train into a new --out-dir"
            )
    if resume:
        # a run dir loads its newest complete checkpoint; a corrupt newest one falls back to the
        # previous one (with a warning), partial leftovers are skipped with a warning
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always", ckpt.PartialCheckpointWarning)
            loaded = ckpt.load_checkpoint(run_dir if resume == "latest" else Path(resume), with_optimizer=True)
        notices.extend(f"warning: {w.message}" for w in caught if issubclass(w.category, ckpt.PartialCheckpointWarning))
    run_dir.mkdir(parents=True, exist_ok=True)
    _write_config_dump(run_dir, profile)

    model = GPT(profile.model, loss_chunk_tokens=rt.loss_chunk_tokens)
    n_params = model.num_params()
    try:
        engine = build_engine(profile, model, device, precision)
    except RamgptError:
        raise
    except Exception as e:
        if is_out_of_memory(e):
            raise OutOfMemoryError(_oom_message(profile, None, TrainState())) from e
        raise
    data = TokenBatches(profile.data, tokenizer, "train", profile.optim.micro_batch_size, profile.data.seed)
    eval_set = eval_batches(profile.data, tokenizer, profile.logging.eval_batches, profile.optim.micro_batch_size)

    state = TrainState()
    if loaded is not None:
        try:
            engine.load_model_state(loaded.model_state)
            if loaded.optimizer_state is not None:
                engine.optimizer.load_state_dict(loaded.optimizer_state)
        except (KeyError, ValueError, RuntimeError) as e:
            engine.close()
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise CheckpointError(
                f"checkpoint {loaded.path} does not fit profile {profile.name!r} (was it trained with another "
                f"model shape?): {first}"
            ) from e
        meta = loaded.meta
        engine.scaler.load_state_dict(meta.get("loss_scaler", {}))
        data.load_state_dict(meta["data_state"])
        ckpt.restore_rng_state(meta["rng"])
        saved = meta.get("train_state", {})
        state = TrainState(**{k: v for k, v in saved.items() if k in {f.name for f in dataclasses.fields(TrainState)}})
        state.step = int(loaded.step)
        notices.append(f"resumed from {loaded.path} at step {state.step}")

    from ramgpt.dashboard import MultiSink, find_wandb_run_id, make_sinks

    if sinks is None:
        sinks = make_sinks(
            profile.logging,
            run_dir,
            profile.to_public_dict(),
            wandb_resume_id=state.wandb_run_id,
            resume_step=state.step if loaded is not None else None,
            title=f"ramgpt · {profile.name}",
        )
    out = MultiSink(list(sinks))
    state.wandb_run_id = find_wandb_run_id(sinks) or state.wandb_run_id
    for n in notices:
        out.event("info", n)
    out.event(
        "info",
        f"{profile.name}: {n_params:,} parameters, {engine.name} engine on {device} ({precision}), "
        f"{engine.seqs_per_pass} sequences per pass, {profile.tokens_per_step:,} tokens per step",
    )

    from ramgpt.sysstats import SystemStats

    sysstats = SystemStats(device, vram_budget_b=engine.vram_budget_b)  # pinned_b comes from engine.counters()
    pushes: list = []  # background push handles (waited for before returning)
    remote_deletes: list[str] = []  # rotated-away checkpoints still to delete on the Hub
    fpt = flops_per_token(profile, n_params)
    peak = peak_flops(device)
    max_steps = profile.optim.max_steps
    last_ckpt: Path | None = None
    last_saved_step = state.step if loaded is not None else -1
    # what a checkpoint written between steps must carry (captured after each completed step)
    snapshot = {"data_state": data.state_dict(), "rng": ckpt.capture_rng_state()}
    window = {"t": time.perf_counter(), "tokens": 0, "steps": 0, "loss_sum": 0.0, "opt_s": 0.0}
    prev_counters = engine.counters()
    last_loss: float | None = None
    interrupted = False

    def save(reason: str) -> None:
        nonlocal last_ckpt, last_saved_step
        if state.step == last_saved_step:
            return
        t0 = time.perf_counter()
        meta = {
            "step": state.step,
            "tokens_seen": state.tokens_seen,
            "data_state": snapshot["data_state"],
            "rng": snapshot["rng"],
            "config": profile.to_public_dict(),
            "eval_loss": state.last_eval_loss,
            "train_state": dataclasses.asdict(state),
            "loss_scaler": engine.scaler.state_dict(),
            "engine": engine.name,
            "precision": precision,
            "reason": reason,
        }
        try:
            path = ckpt.save_checkpoint(run_dir, state.step, engine.state_dict(), engine.optimizer.state_dict(), meta, tokenizer)
        except CheckpointError as e:
            out.event("warning", f"{e} (training continues)")
            return
        last_ckpt, last_saved_step = path, state.step
        out.event("checkpoint", f"saved {path} in {time.perf_counter() - t0:.1f}s")
        try:
            report = ckpt.prune_checkpoints(run_dir, keep_last=profile.checkpoint.keep_last_n, keep_best=True)
            if report.removed:
                out.event("info", f"rotated away {len(report.removed)} old checkpoint(s)")
                if profile.checkpoint.delete_remote_rotated:
                    from ramgpt.hub import remote_delete_patterns

                    remote_deletes.extend(p for p in remote_delete_patterns(report.removed) if p not in remote_deletes)
        except RamgptError as e:
            out.event("warning", f"checkpoint rotation failed: {e}")
        # deletions ride on a push; those of a push that succeeded are done
        for h in pushes:
            if h.done() and h.ok and h.plan is not None:
                sent = set(h.plan.delete_patterns or ())
                remote_deletes[:] = [p for p in remote_deletes if p not in sent]
        handle = _maybe_push(profile, path, state, out, list(remote_deletes), hub_api)
        if handle is not None:
            pushes.append(handle)

    def evaluate() -> float:
        xs = torch.cat([b[0] for b in eval_set])
        ys = torch.cat([b[1] for b in eval_set])
        total = sum(engine.eval_loss_sum(x, y) for x, y in _split(xs, ys, engine.seqs_per_pass))
        return total / ys.numel()

    try:
        while state.step < max_steps:
            step = state.step + 1
            lr = lr_at(step, profile.optim.lr, profile.scheduler, max_steps)
            x, y = data.next_batch(profile.optim.seqs_per_step)
            n_tokens = y.numel()
            loss_sum = torch.zeros((), dtype=torch.float32)
            for xs, ys in _split(x, y, engine.seqs_per_pass):
                loss_sum += engine.forward_backward(xs, ys).to("cpu")
            report = engine.optimizer_step(lr, n_tokens)
            loss = float(loss_sum) / n_tokens

            state.step = step
            state.tokens_seen += n_tokens
            snapshot = {"data_state": data.state_dict(), "rng": ckpt.capture_rng_state()}
            for ev in data.pop_events():
                out.event("epoch", f"{ev} (at step {step})")
            if not math.isfinite(loss) or (report.skipped and precision != "fp16"):
                state.nonfinite_streak += 1
                out.event("warning", f"non-finite loss/gradients at step {step}: update skipped")
                if state.nonfinite_streak >= MAX_NONFINITE_STEPS:
                    where = f"; last checkpoint: {last_ckpt}" if last_ckpt else ""
                    raise NonFiniteLossError(
                        f"loss was NaN/inf for {state.nonfinite_streak} steps in a row (last at step {step}); "
                        f"lower optim.lr (now {profile.optim.lr}) or optim.grad_clip, or use precision bf16{where}"
                    )
            else:
                state.nonfinite_streak = 0
                last_loss = loss
            if report.skipped and precision == "fp16":
                out.event("warning", f"fp16 overflow at step {step}: skipped, loss scale now {report.loss_scale:g}")

            window["tokens"] += n_tokens
            window["steps"] += 1
            window["loss_sum"] += loss
            window["opt_s"] += report.optimizer_time_s

            evaluated = False
            if step % profile.logging.eval_interval == 0 or step == max_steps:
                state.last_eval_loss = evaluate()
                evaluated = True
                if state.best_eval_loss is None or state.last_eval_loss < state.best_eval_loss:
                    state.best_eval_loss = state.last_eval_loss
                eval_msg = f"step {step}: eval loss {state.last_eval_loss:.4f}"

            if step % profile.logging.log_interval == 0 or step == max_steps or evaluated:
                now = time.perf_counter()
                dt = max(now - window["t"], 1e-9)
                counters = engine.counters()
                metrics: dict[str, Any] = {
                    "step": step,
                    "max_steps": max_steps,
                    "epoch": data.epoch + 1,  # the epoch being read (1-based), as the epoch events say
                    "tokens_seen": state.tokens_seen,
                    "elapsed_s": now - t_start,
                    "eta_s": (max_steps - step) * dt / window["steps"],
                    "loss": loss,
                    "loss_avg": window["loss_sum"] / window["steps"],
                    "lr": lr,
                    "grad_norm": report.grad_norm,
                    "tokens_per_s": window["tokens"] / dt,
                    "step_time_s": dt / window["steps"],
                    "optimizer_time_s": window["opt_s"] / window["steps"],
                    "optimizer_share": window["opt_s"] / dt,
                    "device": device,
                    "engine": engine.name,
                    "seqs_per_pass": engine.seqs_per_pass,
                }
                if evaluated:
                    metrics["eval_loss"] = state.last_eval_loss
                if peak:
                    metrics["mfu"] = fpt * window["tokens"] / dt / peak
                metrics.update(_transfer_metrics(prev_counters, counters, window["steps"], dt))
                metrics.update({k: v for k, v in counters.items() if not k.endswith("_total")})
                metrics.update(sysstats.sample())
                out.log(metrics, step)
                prev_counters = counters
                window = {"t": now, "tokens": 0, "steps": 0, "loss_sum": 0.0, "opt_s": 0.0}
            else:
                now = time.perf_counter()
                out.progress(
                    step,
                    tokens_seen=state.tokens_seen,
                    elapsed_s=now - t_start,
                    eta_s=(max_steps - step) * (now - window["t"]) / max(window["steps"], 1),
                )
            if evaluated:
                out.event("eval", eval_msg)  # after the step's row, so sinks tag it with this step

            if step % profile.checkpoint.save_interval_steps == 0:
                save("interval")
        if profile.checkpoint.save_final:
            save("final")
    except KeyboardInterrupt:
        interrupted = True
        out.event("warning", f"interrupted at step {state.step}")
        if profile.checkpoint.save_on_interrupt and state.step > 0:
            # a second Ctrl-C must not abort the save it is waiting for
            with _sigint_ignored():
                out.event("info", "saving a checkpoint before stopping (Ctrl-C is ignored until it is written)")
                save("interrupt")
    except RamgptError:
        raise
    except Exception as e:
        if is_out_of_memory(e):
            raise OutOfMemoryError(_oom_message(profile, engine, state)) from e
        raise
    finally:
        for h in pushes:
            if not h.done():
                out.event("push", "waiting for a background push to finish")
                h.wait()
        sysstats.close()
        out.close()
        engine.close()

    result = TrainResult(
        run_dir=run_dir,
        steps=state.step,
        tokens_seen=state.tokens_seen,
        final_loss=last_loss,
        eval_loss=state.last_eval_loss,
        last_checkpoint=last_ckpt,
        elapsed_s=time.perf_counter() - t_start,
        engine=engine.name,
        device=device,
        interrupted=interrupted,
        notices=notices,
    )
    (run_dir / "last_run.json").write_text(
        json.dumps({k: str(v) if isinstance(v, Path) else v for k, v in dataclasses.asdict(result).items()}, indent=2),
        encoding="utf-8",
    )
    return result


@contextlib.contextmanager
def _sigint_ignored():
    """Ignore SIGINT for the duration (main thread only; elsewhere a no-op)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)


def _transfer_metrics(prev: dict[str, float], cur: dict[str, float], steps: int, dt: float) -> dict[str, float]:
    """Per-step transfer numbers from the engine's running totals (streamed engine only)."""
    if "h2d_bytes_total" not in cur:
        return {}
    out: dict[str, float] = {}
    for d in ("h2d", "d2h"):
        b = cur[f"{d}_bytes_total"] - prev.get(f"{d}_bytes_total", 0)
        s = cur[f"{d}_seconds_total"] - prev.get(f"{d}_seconds_total", 0.0)
        out[f"{d}_bytes"] = b / max(steps, 1)
        # the rate counts only the copies that were timed (the engine may move some untimed)
        timed = f"{d}_timed_bytes_total"
        tb = cur[timed] - prev.get(timed, 0) if timed in cur else b
        if s > 0:
            out[f"{d}_gbps"] = tb / s / 1e9
    stall = cur["stall_s_total"] - prev.get("stall_s_total", 0.0)
    out["stall_s"] = stall / max(steps, 1)
    out["stall_pct"] = 100.0 * stall / dt
    for part in ("load", "grad"):  # which side the compute thread waited for (metrics.jsonl only)
        key = f"stall_{part}_s_total"
        if key in cur:
            out[f"stall_{part}_pct"] = 100.0 * (cur[key] - prev.get(key, 0.0)) / dt
    if "link_gbps" in cur:
        out["link_gbps"] = cur["link_gbps"]
    return out


def _maybe_push(profile: Profile, path: Path, state: TrainState, out, delete_patterns: list[str], api=None):
    c = profile.checkpoint
    if not (c.hf_repo_id and c.push_to_hub_interval and state.step % c.push_to_hub_interval == 0):
        return None
    try:
        from ramgpt.hub import push_checkpoint_background

        handle = push_checkpoint_background(
            path,
            repo_id=c.hf_repo_id,
            private=c.hub_private,
            with_optimizer=c.push_optimizer_state,
            delete_patterns=delete_patterns or None,
            api=api,
            on_done=lambda msg: out.event("push", msg),
            on_error=lambda msg: out.event("warning", f"push failed: {msg} (training continues)"),
        )
        out.event("push", f"pushing {path.name} to {c.hf_repo_id} in the background")
        return handle
    except Exception as e:  # noqa: BLE001 - a push never stops training
        out.event("warning", f"push failed: {e} (training continues)")
        return None

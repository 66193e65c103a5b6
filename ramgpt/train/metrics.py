"""The metrics row: what each logged step reports (``metrics.jsonl`` keys, the panel, W&B).

:class:`MetricsLogger` accumulates a window of steps and decides by itself when a row is due
(``logging.log_interval``, the last step, an evaluation); between rows it sends the sinks a cheap
``progress`` so the panel's step counter and ETA move every step.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from typing import Any


def peak_flops(device: str, gpu_name: str | None) -> float | None:
    """Dense bf16 peak (FLOP/s) of the card for MFU, from the card classes of ramgpt.memory.timing;
    unknown cards get no MFU (RAMGPT_PEAK_TFLOPS supplies one)."""
    from ramgpt.memory.timing import card_for_gpu

    env = os.environ.get("RAMGPT_PEAK_TFLOPS")
    if env:
        return float(env) * 1e12
    if not device.startswith("cuda") or not gpu_name:
        return None
    card = card_for_gpu(gpu_name)
    return card.bf16_tflops * 1e12 if card else None


def transfer_metrics(prev: dict[str, float], cur: dict[str, float], steps: int, dt: float) -> dict[str, float]:
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
    # metrics.jsonl only: which side the GPU waited for, and how long the compute thread itself
    # waited (on a GPU it may wait while the GPU still has queued work: that costs nothing)
    for key, name in (("stall_load_s_total", "stall_load_pct"), ("stall_grad_s_total", "stall_grad_pct"),
                      ("stall_load_fwd_s_total", "stall_load_fwd_pct"), ("stall_load_bwd_s_total", "stall_load_bwd_pct"),
                      ("thread_wait_s_total", "thread_wait_pct")):
        if key in cur:
            out[name] = 100.0 * (cur[key] - prev.get(key, 0.0)) / dt
    if "link_gbps" in cur:
        out["link_gbps"] = cur["link_gbps"]
    return out


@dataclass
class _Window:
    t: float
    tokens: int = 0
    steps: int = 0
    loss_sum: float = 0.0
    opt_s: float = 0.0


class MetricsLogger:
    def __init__(self, sink: Any, engine: Any, sysstats: Any, *, max_steps: int, log_interval: int,
                 flops_per_token: float, peak_flops: float | None, t_start: float, epoch_of: Any,
                 comm: Any = None, chars_per_token: float | None = None) -> None:
        self.chars_per_token = chars_per_token  # of the held-out documents: chars/s beside tokens/s
        self.comm = comm  # several ranks: rank 0's row also shows every rank's VRAM and the node's RAM
        self.sink = sink
        self.engine = engine
        self.sysstats = sysstats
        self.max_steps = max_steps
        self.log_interval = log_interval
        self.fpt = flops_per_token
        self.peak = peak_flops
        self.t_start = t_start
        self.epoch_of = epoch_of  # () -> the epoch being read, 1-based
        self.window = _Window(time.perf_counter())
        self.prev_counters = engine.counters()

    def record(self, n_tokens: int, loss: float, optimizer_time_s: float) -> None:
        w = self.window
        w.tokens += n_tokens
        w.steps += 1
        w.loss_sum += loss
        w.opt_s += optimizer_time_s

    def _add_ranks(self, row: dict[str, Any], counters: dict[str, float], dt: float) -> None:
        """Every rank's VRAM peak and its own RAM (shared memory counted once per node)."""
        from ramgpt.probe import private_rss

        comm_s = counters.get("comm_s_total", 0.0) - self.prev_counters.get("comm_s_total", 0.0)
        mine = {"vram": counters.get("vram_peak_reserved_b", 0), "ram": private_rss(), "comm_s": comm_s,
                "node": self.comm.ctx.node, "shared": self.engine.shared_b}
        ranks = self.comm.gather_objects(mine)
        row["ranks"] = len(ranks)
        row["vram_peak_reserved_b_ranks"] = [r["vram"] for r in ranks]
        node = [r for r in ranks if r["node"] == self.comm.ctx.node]
        row["node_ram_b"] = sum(r["ram"] for r in node) + node[0]["shared"]
        row["comm_s"] = max(r["comm_s"] for r in ranks) / max(self.window.steps, 1)
        row["comm_pct"] = 100.0 * max(r["comm_s"] for r in ranks) / dt

    def maybe_log(self, step: int, tokens_seen: int, loss: float, lr: float, grad_norm: float,
                  eval_loss: float | None) -> None:
        """Send a full row when one is due, else a progress tick."""
        now = time.perf_counter()
        w = self.window
        dt = max(now - w.t, 1e-9)
        eta = (self.max_steps - step) * dt / max(w.steps, 1)
        if not (step % self.log_interval == 0 or step == self.max_steps or eval_loss is not None):
            self.sink.progress(step, tokens_seen=tokens_seen, elapsed_s=now - self.t_start, eta_s=eta)
            return
        counters = self.engine.counters()
        row: dict[str, Any] = {
            "step": step,
            "max_steps": self.max_steps,
            "epoch": self.epoch_of(),
            "tokens_seen": tokens_seen,
            "elapsed_s": now - self.t_start,
            "eta_s": eta,
            "loss": loss,
            "loss_avg": w.loss_sum / w.steps,
            "lr": lr,
            "grad_norm": grad_norm,
            "tokens_per_s": w.tokens / dt,
            "step_time_s": dt / w.steps,
            "optimizer_time_s": w.opt_s / w.steps,
            "optimizer_share": w.opt_s / dt,
            "device": self.engine.device,
            "engine": self.engine.name,
            "seqs_per_pass": self.engine.seqs_per_pass,
        }
        if eval_loss is not None:
            row["eval_loss"] = eval_loss
        if self.chars_per_token:
            row["chars_per_token"] = self.chars_per_token
            row["chars_per_s"] = row["tokens_per_s"] * self.chars_per_token
        if self.peak:
            row["mfu"] = self.fpt * w.tokens / dt / self.peak
        row.update(transfer_metrics(self.prev_counters, counters, w.steps, dt))
        if "optimizer_work_s_total" in counters:  # an optimizer that overlaps the passes: work vs exposed
            work = counters["optimizer_work_s_total"] - self.prev_counters.get("optimizer_work_s_total", 0.0)
            exposed = counters["optimizer_exposed_s_total"] - self.prev_counters.get("optimizer_exposed_s_total", 0.0)
            row["optimizer_time_s"] = work / w.steps
            row["optimizer_exposed_s"] = exposed / w.steps
            row["optimizer_share"] = exposed / dt
        if "vram_alloc_retries_total" in counters:
            retries = counters["vram_alloc_retries_total"] - self.prev_counters.get("vram_alloc_retries_total", 0)
            row["vram_alloc_retries"] = retries / w.steps
        row.update({k: v for k, v in counters.items() if not k.endswith("_total")})
        row.update(self.sysstats.sample())
        if self.comm is not None:
            self._add_ranks(row, counters, dt)
        self.sink.log(row, step)
        self.prev_counters = counters
        self.window = _Window(now)

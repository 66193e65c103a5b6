"""What both engines share: the optimizer step (unscale, clip, fused AdamW), loss scaling for
fp16, the VRAM budget, and the API the training loop calls (see :mod:`ramgpt.engine`)."""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn as nn

from ramgpt.checkpoint.tensorfile import materialize
from ramgpt.model import GPT, tied_aliases

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def apply_vram_budget(device: str, budget_b: int | None) -> None:
    """Cap this process's CUDA caching allocator at ``budget_b`` bytes (honoured on any card:
    ``torch.cuda.set_per_process_memory_fraction``). No budget or no CUDA device: nothing to do."""
    if budget_b is None or not device.startswith("cuda") or not torch.cuda.is_available():
        return
    dev = torch.device(device)
    idx = dev.index if dev.index is not None else torch.cuda.current_device()
    total = torch.cuda.get_device_properties(idx).total_memory
    torch.cuda.set_per_process_memory_fraction(min(1.0, budget_b / total), idx)


@dataclass
class StepReport:
    grad_norm: float
    skipped: bool  # non-finite gradients: no update was applied
    optimizer_time_s: float
    loss_scale: float
    loss_sum: float = 0.0  # sum of the step's token losses (train_step fills it in)


class LossScaler:
    """Dynamic loss scaling for fp16 (a grad scaler); a fixed 1.0 otherwise."""

    def __init__(self, enabled: bool, init: float = 2.0**16, growth_interval: int = 1000):
        self.enabled = enabled
        self.scale = init if enabled else 1.0
        self.growth_interval = growth_interval
        self._good = 0

    def update(self, finite: bool) -> None:
        if not self.enabled:
            return
        if not finite:
            self.scale = max(self.scale / 2.0, 1.0)
            self._good = 0
        else:
            self._good += 1
            if self._good % self.growth_interval == 0:
                self.scale *= 2.0

    def state_dict(self) -> dict[str, float]:
        return {"scale": self.scale, "good": self._good}

    def load_state_dict(self, d: dict[str, Any]) -> None:
        self.scale = float(d.get("scale", self.scale))
        self._good = int(d.get("good", 0))


def unscale_clip_(params: list[nn.Parameter], factor: float, clip: float) -> float:
    """grads *= factor, then clip the global norm; returns the pre-clip norm (inf/nan if bad)."""
    grads = [p.grad for p in params if p.grad is not None]
    if not grads:
        return 0.0
    torch._foreach_mul_(grads, factor)
    norm = torch.nn.utils.clip_grad_norm_(params, clip if clip > 0 else float("inf"), foreach=True)
    return float(norm)


def make_optimizer(model: GPT, lr: float, wd: float, betas: tuple[float, float], eps: float) -> torch.optim.AdamW:
    # fused=True: one kernel over all params, on CUDA and (since torch 2.4) on the CPU
    return torch.optim.AdamW(model.param_groups(wd), lr=lr, betas=betas, eps=eps, fused=True)


def release_freed_heap() -> None:
    """glibc keeps large freed blocks in the heap; malloc_trim returns them (Linux only)."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


class Engine:
    """Common optimizer-side logic; subclasses provide the passes."""

    name = "base"

    def __init__(self, model: GPT, *, device: str, precision: str, optim_cfg, vram_budget_b: int | None):
        self.model = model
        self.device = device
        self.precision = precision
        self.compute_dtype = DTYPES[precision]
        self.cfg = optim_cfg
        self.vram_budget_b = vram_budget_b
        self.comm: Any = None  # ramgpt.dist.Comm when one of several ranks (set by the subclasses)
        self.scaler = LossScaler(enabled=precision == "fp16")
        self.params = [p for g in model.param_groups(0.0) for p in g["params"]]
        self.optimizer: torch.optim.AdamW  # set by subclasses once masters are placed

    # -- autocast -------------------------------------------------------------------------------
    def _autocast(self):
        if self.precision == "fp32":
            return nullcontext()
        return torch.autocast(torch.device(self.device).type, dtype=self.compute_dtype)

    def warm_up(self, seq_len: int, started: Any = None) -> str | None:
        """Work to do once before the first step (compiling; ``started``: a
        :class:`~ramgpt.engine.compiled.BlockWarmUp` begun earlier); a warning to show, or None."""
        return started.result() if started is not None else None

    # -- what the training loop calls -----------------------------------------------------------
    def train_step(self, x: torch.Tensor, y: torch.Tensor, lr: float, n_tokens: int | None = None) -> StepReport:
        """One optimizer step over the sequences ``x`` (N, T) -> ``y``: passes of
        ``seqs_per_pass`` sequences, then the update at ``lr``. The loss is summed on the device
        and read once per step (no host sync between passes). ``n_tokens``: the tokens the
        gradients are averaged over (several GPUs: the whole global batch; default ``y.numel()``)."""
        loss_sum = None
        starts = list(range(0, x.shape[0], self.seqs_per_pass))
        for i in starts:
            part = self.forward_backward(x[i : i + self.seqs_per_pass], y[i : i + self.seqs_per_pass],
                                         last_pass=i == starts[-1])
            loss_sum = part if loss_sum is None else loss_sum + part
        report = self.optimizer_step(lr, n_tokens or y.numel())
        report.loss_sum = float(loss_sum) if loss_sum is not None else 0.0
        if self.comm is not None:  # several ranks: the global batch's loss
            report.loss_sum = self.comm.sum_floats(report.loss_sum)[0]
        return report

    def forward_backward(self, x: torch.Tensor, y: torch.Tensor, last_pass: bool = False) -> torch.Tensor:
        """One pass over some sequences; gradients accumulate. Returns the loss sum (a 0-d
        float32 tensor, on the compute device). ``last_pass`` marks the step's final pass."""
        raise NotImplementedError

    @torch.no_grad()
    def eval_loss_sum(self, x: torch.Tensor, y: torch.Tensor) -> float:
        raise NotImplementedError

    def _before_optimizer(self) -> None:
        """Wait for gradients still in flight (streamed engine)."""

    def _after_optimizer(self) -> None:
        """Propagate updated masters to wherever compute reads them (streamed engine)."""

    def _zero_grads(self) -> None:
        self.optimizer.zero_grad(set_to_none=True)

    def optimizer_step(self, lr: float, n_tokens: int) -> StepReport:
        """Mean-over-tokens gradients, clip, AdamW at ``lr``, zero grads. Skips the update
        (and lowers the fp16 loss scale) when the gradients are not finite."""
        self._before_optimizer()
        t0 = time.perf_counter()
        norm = unscale_clip_(self.params, 1.0 / (self.scaler.scale * max(n_tokens, 1)), self.cfg.grad_clip)
        finite = math.isfinite(norm)
        if finite:
            for g in self.optimizer.param_groups:
                g["lr"] = lr
            self.optimizer.step()
        self.scaler.update(finite)
        self._zero_grads()
        self._after_optimizer()
        return StepReport(norm, not finite, time.perf_counter() - t0, self.scaler.scale)

    def counters(self) -> dict[str, float]:
        out: dict[str, float] = {}
        if self.device.startswith("cuda") and torch.cuda.is_available():
            out["vram_allocated_b"] = torch.cuda.memory_allocated(self.device)
            out["vram_reserved_b"] = torch.cuda.memory_reserved(self.device)
            out["vram_peak_reserved_b"] = torch.cuda.max_memory_reserved(self.device)
            # the caching allocator hit the VRAM cap (or the card's end), freed its cache and retried:
            # each retry synchronises the device (metrics.jsonl: vram_alloc_retries per step)
            stats = torch.cuda.memory_stats(self.device)
            out["vram_alloc_retries_total"] = stats.get("num_alloc_retries", 0)
            if self.vram_budget_b:
                out["vram_budget_b"] = self.vram_budget_b
        return out

    shared_b = 0  # bytes of training state shared by a node's ranks (the streamed engine's /dev/shm files)

    def wait_optimizer(self) -> None:
        """Every update started so far is done (engines whose updates run in the background wait here)."""

    def set_update_gate(self, gate: Callable[[list[torch.Tensor]], None]) -> bool:
        """Let ``gate(tensors)`` hold back the optimizer's update of ``tensors`` (a background
        checkpoint still writing them). False: this engine updates synchronously, so a checkpoint
        must be written before training goes on."""
        return False

    # -- state for checkpoints -------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """Model masters: fp32 CPU tensors (views, not copies, where they already live on the CPU),
        tied weights once via the model's own dict."""
        return {k: v.detach().to("cpu") for k, v in self.model.state_dict().items()}

    def optimizer_state(self) -> dict[str, Any]:
        """The AdamW ``state_dict()`` (references to the live moments, not copies)."""
        return self.optimizer.state_dict()

    def scaler_state(self) -> dict[str, Any]:
        return self.scaler.state_dict()

    def load_state(self, model_state: dict[str, Any], optimizer_state: dict[str, Any] | None,
                   scaler_state: dict[str, Any] | None) -> None:
        """Restore a checkpoint in place: each saved tensor (or lazy handle) is copied into the
        tensor training already holds, one at a time, so a resume needs no more RAM than training.
        Tied aliases may be absent. Raises KeyError/ValueError when the tensors do not fit."""
        aliases = tied_aliases(self.model.cfg)
        targets = {k: v for k, v in self.model.state_dict(keep_vars=True).items() if k not in aliases}
        missing = sorted(set(targets) - set(model_state))
        unexpected = sorted(set(model_state) - set(targets) - set(aliases))
        if missing or unexpected:
            raise KeyError(f"checkpoint does not match the model: missing {missing[:3]}, unexpected {unexpected[:3]}")
        with torch.no_grad():
            for name, target in targets.items():
                src = materialize(model_state[name])
                if src.shape != target.shape:
                    raise ValueError(f"{name} has shape {tuple(src.shape)} in the checkpoint, {tuple(target.shape)} here")
                self._set_master(target, src)
                del src
        if optimizer_state is not None:
            self._load_optimizer_in_place(optimizer_state)
        if scaler_state:
            self.scaler.load_state_dict(scaler_state)
        self._after_optimizer()

    def _set_master(self, target: torch.Tensor, value: torch.Tensor) -> None:
        """Write a checkpoint's value into a master (engines that keep masters in another form override)."""
        target.copy_(value)

    def _state_for(self, p: nn.Parameter) -> dict[str, torch.Tensor]:
        """The AdamW state of ``p``, created as torch's fused AdamW would (zeros) when absent."""
        from ramgpt.engine.chunked_adamw import new_adamw_state

        st = self.optimizer.state[p]
        if not st:
            st.update(new_adamw_state(p))
        return st

    @torch.no_grad()
    def _load_optimizer_in_place(self, sd: dict[str, Any]) -> None:
        """``optimizer.load_state_dict`` without a second copy: saved groups must match ours
        (same order and sizes); their hyper-parameters are taken, their tensors copied into place."""
        groups, saved = self.optimizer.param_groups, sd["param_groups"]
        if len(groups) != len(saved) or any(len(g["params"]) != len(s["params"]) for g, s in zip(groups, saved)):
            raise ValueError("the optimizer state has other parameter groups than this model")
        index: dict[int, nn.Parameter] = {}
        for g, s in zip(groups, saved):
            index.update(zip((int(i) for i in s["params"]), g["params"]))
            g.update({k: v for k, v in s.items() if k != "params"})
        for i, st in sd["state"].items():
            p = index[int(i)]
            target = self._state_for(p)
            for k, v in st.items():
                src = materialize(v)
                if k not in target or src.shape != target[k].shape:
                    raise ValueError(f"optimizer state {k} of parameter {i} does not fit this model")
                target[k].copy_(src)
                del src
            self._state_loaded(p)

    def tensor_saved(self, t: torch.Tensor) -> None:
        """A checkpoint has written ``t`` (the low-RAM mode hands its pages back)."""

    def _state_loaded(self, p: nn.Parameter) -> None:
        """Called after ``p``'s optimizer state was restored (the low-RAM mode releases its pages)."""

    @property
    def seqs_per_pass(self) -> int:
        raise NotImplementedError

    def close(self) -> None:
        pass



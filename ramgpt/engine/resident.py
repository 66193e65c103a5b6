"""Everything on one device: CPU fp32, or a GPU with bf16/fp16 autocast and per-block activation
checkpointing."""

from __future__ import annotations

import time
from typing import Any

import torch

from ramgpt.engine.base import Engine, make_optimizer
from ramgpt.model import GPT


class ResidentEngine(Engine):
    name = "resident"

    def __init__(self, model: GPT, *, device: str, precision: str, optim_cfg, micro_batch_size: int,
                 gradient_checkpointing: bool, vram_budget_b: int | None = None, comm: Any = None):
        """``comm``: one of several ranks (:mod:`ramgpt.dist`): every rank holds the whole model and
        the gradients are all-reduced before each update (plain data parallelism)."""
        super().__init__(model, device=device, precision=precision, optim_cfg=optim_cfg, vram_budget_b=vram_budget_b)
        self.comm = comm
        self._comm_s = 0.0
        self.model.to(device)
        self.model.gradient_checkpointing = gradient_checkpointing
        self._mb = micro_batch_size
        self.optimizer = make_optimizer(model, optim_cfg.lr, optim_cfg.weight_decay,
                                         (optim_cfg.beta1, optim_cfg.beta2), optim_cfg.eps)

    @property
    def seqs_per_pass(self) -> int:
        return self._mb

    def forward_backward(self, x: torch.Tensor, y: torch.Tensor, last_pass: bool = False) -> torch.Tensor:
        self.model.train()
        x = x.to(self.device, non_blocking=True)
        y = y.to(self.device, non_blocking=True)
        with self._autocast():
            loss_sum = self.model(x, y)
        (loss_sum * self.scaler.scale).backward()
        return loss_sum.detach()

    def _before_optimizer(self) -> None:
        """Several ranks: sum the gradients over them, in buckets of ~256 MB."""
        if self.comm is None:
            return
        t0 = time.perf_counter()
        grads = [p.grad for p in self.params if p.grad is not None]
        bucket: list[torch.Tensor] = []
        size = 0
        for g in [*grads, None]:
            if g is not None:
                bucket.append(g)
                size += g.numel()
            if bucket and (g is None or size >= 64 * 2**20):
                flat = torch._utils._flatten_dense_tensors(bucket)
                self.comm.all_reduce_sum(flat)
                for t, r in zip(bucket, torch._utils._unflatten_dense_tensors(flat, bucket)):
                    t.copy_(r)
                bucket, size = [], 0
        self._comm_s += time.perf_counter() - t0

    def counters(self) -> dict[str, float]:
        out = super().counters()
        if self.comm is not None:
            out["comm_s_total"] = self._comm_s
        return out

    @torch.no_grad()
    def eval_loss_sum(self, x: torch.Tensor, y: torch.Tensor) -> float:
        self.model.eval()
        with self._autocast():
            out = self.model(x.to(self.device), y.to(self.device))
        self.model.train()
        return float(out)



"""Everything on one device: CPU fp32, or a GPU with bf16/fp16 autocast and per-block activation
checkpointing."""

from __future__ import annotations

import torch

from ramgpt.engine.base import Engine, make_optimizer
from ramgpt.model import GPT


class ResidentEngine(Engine):
    name = "resident"

    def __init__(self, model: GPT, *, device: str, precision: str, optim_cfg, micro_batch_size: int,
                 gradient_checkpointing: bool, vram_budget_b: int | None = None):
        super().__init__(model, device=device, precision=precision, optim_cfg=optim_cfg, vram_budget_b=vram_budget_b)
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

    @torch.no_grad()
    def eval_loss_sum(self, x: torch.Tensor, y: torch.Tensor) -> float:
        self.model.eval()
        with self._autocast():
            out = self.model(x.to(self.device), y.to(self.device))
        self.model.train()
        return float(out)



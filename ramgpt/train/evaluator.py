"""Held-out loss: every ``logging.eval_interval`` steps and at the last step."""

from __future__ import annotations

from typing import Any

import torch


class Evaluator:
    def __init__(self, engine: Any, eval_set: list[tuple[torch.Tensor, torch.Tensor]], interval: int,
                 max_steps: int, comm: Any = None) -> None:
        self.engine = engine
        self.comm = comm  # several ranks: each evaluates its share, the sums are added
        # one tensor of all eval sequences, cut into the engine's passes
        self.x = torch.cat([b[0] for b in eval_set])
        self.y = torch.cat([b[1] for b in eval_set])
        self.interval = interval
        self.max_steps = max_steps

    def due(self, step: int) -> bool:
        return step % self.interval == 0 or step == self.max_steps

    def evaluate(self) -> float:
        x, y = self.x, self.y
        if self.comm is not None:
            x, y = x[self.comm.ctx.rank :: self.comm.ctx.world], y[self.comm.ctx.rank :: self.comm.ctx.world]
        n = self.engine.seqs_per_pass
        total = sum(self.engine.eval_loss_sum(x[i : i + n], y[i : i + n]) for i in range(0, len(x), n))
        if self.comm is not None:
            total = self.comm.sum_floats(total)[0]
        return total / self.y.numel()

    def maybe_eval(self, step: int) -> float | None:
        return self.evaluate() if self.due(step) else None

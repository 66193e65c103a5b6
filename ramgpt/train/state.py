"""What training carries from step to step (and into every checkpoint), and what it returns."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


@dataclass
class TrainState:
    """Progress that a checkpoint must carry besides tensors (saved as meta["train_state"])."""

    step: int = 0
    tokens_seen: int = 0
    best_eval_loss: float | None = None
    last_eval_loss: float | None = None
    wandb_run_id: str | None = None
    nonfinite_streak: int = 0

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_meta(cls, meta: dict[str, Any]) -> TrainState:
        """From a checkpoint's meta.json (unknown keys of other versions are ignored)."""
        saved = meta.get("train_state") or {}
        names = {f.name for f in dataclasses.fields(cls)}
        state = cls(**{k: v for k, v in saved.items() if k in names})
        state.step = int(meta["step"])
        return state


@dataclass
class Snapshot:
    """Where the data stream and the RNGs stood after the last completed step: what a checkpoint
    written between steps (or after Ctrl-C in the middle of one) must record."""

    data_state: dict[str, Any]
    rng: dict[str, Any]


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

    def to_dict(self) -> dict[str, Any]:
        return {k: str(v) if isinstance(v, Path) else v for k, v in dataclasses.asdict(self).items()}

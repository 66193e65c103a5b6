"""The Hub push during training, as a checkpointer ``on_saved`` hook (the CLI passes it in, so the
training loop never imports ``ramgpt.hub``).

Every ``checkpoint.push_to_hub_interval`` steps a saved checkpoint is pushed in the background;
with ``checkpoint.delete_remote_rotated`` the checkpoints rotated away locally are deleted on the
Hub by the next push (a deletion rides on a push; those of a push that succeeded are done).
A push never stops training: failures are warnings.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any


class HubPushHook:
    def __init__(self, cfg: Any, api: Any = None) -> None:
        self.cfg = cfg  # CheckpointConfig
        self.api = api  # an HfApi-like client (tests, notebooks); None: a real one
        self.event: Callable[[str, str], None] = lambda kind, msg: None
        self.pushes: list[Any] = []
        self.remote_deletes: list[str] = []

    def __call__(self, path: Path, step: int, removed: list[Path], event: Callable[[str, str], None]) -> None:
        from ramgpt.hub.upload import push_checkpoint_background, remote_delete_patterns

        self.event = event
        c = self.cfg
        if removed and c.delete_remote_rotated:
            self.remote_deletes.extend(p for p in remote_delete_patterns(removed) if p not in self.remote_deletes)
        for h in self.pushes:
            if h.done() and h.ok and h.plan is not None:
                sent = set(h.plan.delete_patterns or ())
                self.remote_deletes[:] = [p for p in self.remote_deletes if p not in sent]
        if not (c.hf_repo_id and c.push_to_hub_interval and step % c.push_to_hub_interval == 0):
            return
        try:
            handle = push_checkpoint_background(
                path, repo_id=c.hf_repo_id, private=c.hub_private, with_optimizer=c.push_optimizer_state,
                delete_patterns=list(self.remote_deletes) or None, api=self.api,
                on_done=lambda msg: self.event("push", msg),
                on_error=lambda msg: self.event("warning", f"push failed: {msg} (training continues)"),
            )
        except Exception as e:  # noqa: BLE001 - a push never stops training
            self.event("warning", f"push failed: {e} (training continues)")
            return
        self.event("push", f"pushing {path.name} to {c.hf_repo_id} in the background")
        self.pushes.append(handle)

    def close(self) -> None:
        for h in self.pushes:
            if not h.done():
                self.event("push", "waiting for a background push to finish")
                h.wait()

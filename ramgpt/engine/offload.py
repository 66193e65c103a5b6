"""The only module that imports ramtorch: the OffloadModel subclass the streamed engine drives, and
the plain OffloadModel that streamed inference uses."""

from __future__ import annotations

import time
from collections.abc import Callable
from contextlib import AbstractContextManager
from typing import Any


def offload_model_class():
    import ramtorch

    class _GradTapOffloadModel(ramtorch.OffloadModel):
        """OffloadModel with four hooks for ramgpt's engine.

        ``_accumulate``, ``_materialize`` and ``_acquire`` are ramtorch 1.11 internals (pinned in
        pyproject); the subclass only observes or redirects them:

        - ``grad_sink(chunk_idx, named_grads)`` replaces ramtorch's gradient accumulators;
        - ``load_gate(chunk_idx)`` runs on the loader thread before a chunk is copied to the GPU
          (the optimizer may still be updating it);
        - ``load_observer(state)`` is a context manager around the copy (transfer timing);
        - ``acquire_observer(seconds, during_update)`` gets every compute-thread wait for a chunk,
          and whether a gated update was still running when the wait began.
        """

        grad_sink: Callable[[int, dict], None] | None = None
        load_gate: Callable[[int], None] | None = None
        load_observer: Callable[[Any], AbstractContextManager] | None = None
        acquire_observer: Callable[[float, bool], None] | None = None
        update_running: Callable[[], bool] = staticmethod(lambda: False)

        def _accumulate(self, state, named_grads):  # noqa: D401
            if named_grads:
                self.grad_sink(state.idx, named_grads)

        def _materialize(self, state):
            if self.load_gate is not None:
                self.load_gate(state.idx)
            obs = self.load_observer
            if obs is None:
                return super()._materialize(state)
            with obs(state):
                return super()._materialize(state)

        def _acquire(self, layer):
            if self.acquire_observer is None:
                return super()._acquire(layer)
            during = self.update_running()
            t0 = time.perf_counter()
            try:
                return super()._acquire(layer)
            finally:
                self.acquire_observer(time.perf_counter() - t0, during)

    return _GradTapOffloadModel


def offload_model(chunks, **kwargs):
    """A plain ramtorch ``OffloadModel`` (streamed inference)."""
    import ramtorch

    return ramtorch.OffloadModel(chunks, **kwargs)

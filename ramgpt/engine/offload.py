"""The only module that imports ramtorch: the OffloadModel subclass the streamed engine drives, and
the plain OffloadModel that streamed inference uses."""

from __future__ import annotations


def offload_model_class():
    import ramtorch

    class _GradTapOffloadModel(ramtorch.OffloadModel):
        """OffloadModel whose per-chunk gradient hook hands grads to ramgpt (see module doc).

        ``_accumulate`` and ``_materialize`` are ramtorch 1.11 internals (pinned in
        pyproject); the subclass only observes/redirects them."""

        grad_sink = None  # callable(chunk_idx, named_grads)
        load_observer = None  # callable(state) -> context manager around a chunk load

        def _accumulate(self, state, named_grads):  # noqa: D401
            if named_grads:
                self.grad_sink(state.idx, named_grads)

        def _materialize(self, state):
            obs = self.load_observer
            if obs is None:
                return super()._materialize(state)
            with obs(state):
                return super()._materialize(state)

    return _GradTapOffloadModel



def offload_model(chunks, **kwargs):
    """A plain ramtorch ``OffloadModel`` (streamed inference)."""
    import ramtorch

    return ramtorch.OffloadModel(chunks, **kwargs)

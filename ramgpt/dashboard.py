"""Deprecated: the sinks live in ``ramgpt.sinks``. Kept only until ``train`` imports from there."""

from ramgpt.sinks import MultiSink, make_sinks  # noqa: F401
from ramgpt.sinks.jsonl import JsonlSink  # noqa: F401
from ramgpt.sinks.wandb import find_wandb_run_id  # noqa: F401

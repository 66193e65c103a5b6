"""ramgpt: pre-train a ~1B GPT-2 on one small GPU by streaming weights from CPU RAM."""

__version__ = "0.1.0"

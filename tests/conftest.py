"""Test-wide setup: the reproducible-numerics environment the CLI sets, before torch loads."""

from ramgpt.numerics import ensure_reproducible_env

ensure_reproducible_env()

"""Test-wide setup: the reproducible-numerics environment the CLI sets, before torch loads."""

from ramgpt.numerics import ensure_reproducible_env

ensure_reproducible_env()

import sys  # noqa: E402

import pytest  # noqa: E402


@pytest.fixture
def without_cpu_kernel(monkeypatch: pytest.MonkeyPatch) -> None:
    """As on a machine without a C compiler: ``runtime.split_masters: auto`` means the chunks the
    GPU updates, and a CPU update of split masters runs torch's pieces (ramgpt.toolchain)."""
    monkeypatch.setenv("RAMGPT_NATIVE", "0")


@pytest.fixture
def with_cpu_kernel(without_cpu_kernel: None, monkeypatch: pytest.MonkeyPatch) -> None:
    """As on a machine with a C compiler on PATH (an executable stands in for it: nothing is built);
    set after ``without_cpu_kernel``, which a module may ask for as its default."""
    monkeypatch.setenv("RAMGPT_NATIVE", "1")
    monkeypatch.setenv("CC", sys.executable)

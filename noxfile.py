"""nox sessions: tests and lint on the CPU; gpu runs the benchmark on a CUDA machine."""

from __future__ import annotations

import nox

nox.options.sessions = ["tests", "lint"]


@nox.session
def tests(session: nox.Session) -> None:
    session.install("torch==2.13.0")
    session.install("-e", ".[dev]")
    session.run("pytest", "-q", "-p", "no:cacheprovider", *session.posargs)


@nox.session
def lint(session: nox.Session) -> None:
    session.install("ruff>=0.8,<0.18")
    session.run("ruff", "check", ".")


@nox.session(venv_backend="none")
def gpu(session: nox.Session) -> None:
    """Benchmark sections on a CUDA machine with ramgpt already importable (see docs/benchmarks.md)."""
    for section in ("link", "streamed", "resident", "agree", "p1b"):
        session.run("python", "bench/bench_engine.py", section, "--out", "bench-out")

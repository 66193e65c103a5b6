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
    """The GPU benchmark rounds of docs/benchmarks.md, on a CUDA machine where ramgpt (and pyte,
    for the panel capture) already import: ``nox -s gpu -- engine loss p1b gen``."""
    for round_name in session.posargs or ["engine", "loss", "p1b", "gen"]:
        session.run("bash", "bench/gpu_round.sh", round_name, "bench-out", external=True)

"""ramgpt.fmt: how numbers and errors are written for people."""

from __future__ import annotations

import math

import pytest

from ramgpt.fmt import (
    GiB,
    MiB,
    first_line,
    fmt_bytes,
    fmt_count,
    fmt_duration,
    fmt_float,
    fmt_gbps,
    fmt_params,
    fmt_pct,
    fmt_sci,
    gib,
    gib_list,
    num,
    sparkline,
)


@pytest.mark.parametrize(
    ("b", "text"),
    [
        (None, "-"),
        (0, "0 B"),
        (1000, "1000 B"),
        (1024, "1.00 KiB"),
        (420.4 * MiB, "420.40 MiB"),
        (1023.9 * MiB, "1.00 GiB"),  # within 0.5% of the next unit: no "1023.90 MiB"
        (3 * GiB, "3.00 GiB"),
        (-2 * GiB, "-2.00 GiB"),
        (math.inf, "inf"),
    ],
)
def test_fmt_bytes(b: float | None, text: str) -> None:
    assert fmt_bytes(b) == text


def test_gib_and_gib_list() -> None:
    assert gib(5.1 * GiB) == "5.10 GiB"
    assert gib_list([3 * GiB, None, 6 * GiB]) == "3.0/?/6.0 GiB"
    assert gib_list([1.25 * GiB], digits=2) == "1.25 GiB"


def test_counts_durations_and_rates() -> None:
    assert [fmt_count(x) for x in (999, 12_345, 2.5e6, 1.5e9)] == ["999", "12.3k", "2.50M", "1.50B"]
    assert fmt_params(1_010_000_000) == "1.010 B" and fmt_params(124_440_000) == "124.44 M"
    assert fmt_params(945_664) == "945,664"
    assert fmt_duration(99) == "0:01:39" and fmt_duration(90_061) == "1d 1:01:01"
    assert fmt_duration(-1) == "?" and fmt_duration(math.nan) == "?"
    assert fmt_float(0.9) == "0.900" and fmt_float(0.9, 2) == "0.90" and fmt_float(math.nan) == "nan"
    assert fmt_pct(3.14) == "3.1%" and fmt_gbps(11.25) == "11.2 GB/s"
    assert fmt_sci(6e-4, 1) == "6.0e-04" and fmt_sci(2.9e-3) == "2.90e-03" and fmt_sci(math.inf) == "inf"


def test_num_accepts_numbers_and_scalars_only() -> None:
    import torch  # a hard dependency; imported here so the other tests stay quick

    assert num(3) == 3.0 and num(torch.tensor(2.5)) == 2.5
    assert num(True) is None and num(None) is None and num("1.0") is None


def test_first_line() -> None:
    assert first_line(ValueError("bad thing\n  at line 2")) == "bad thing"
    assert first_line(KeyError()) == "KeyError"


def test_sparkline_handles_flat_and_nan() -> None:
    assert sparkline([1.0, 1.0]) == "▅▅"
    assert sparkline([3.0, float("nan"), 1.0]) == "█!▁"
    assert len(sparkline(range(100), width=20)) == 20

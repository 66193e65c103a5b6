"""The metrics row's pure pieces."""

from __future__ import annotations

import pytest


def test_transfer_rate_counts_only_timed_copies() -> None:
    """The engine moves some bytes untimed (grad_accum=device's running sums, which overlap the
    timed weight loads): they count in bytes per step but not in the achieved GB/s."""
    from ramgpt.train.metrics import transfer_metrics as _transfer_metrics

    prev = {"h2d_bytes_total": 0, "h2d_timed_bytes_total": 0, "h2d_seconds_total": 0.0, "d2h_bytes_total": 0,
            "d2h_seconds_total": 0.0, "stall_s_total": 0.0}
    cur = {"h2d_bytes_total": 30e9, "h2d_timed_bytes_total": 20e9, "h2d_seconds_total": 0.5, "d2h_bytes_total": 8e9,
           "d2h_seconds_total": 0.2, "stall_s_total": 1.0}
    m = _transfer_metrics(prev, cur, steps=2, dt=10.0)
    assert m["h2d_bytes"] == 15e9 and m["h2d_gbps"] == pytest.approx(40.0)  # 20 GB timed in 0.5 s
    assert m["d2h_bytes"] == 4e9 and m["d2h_gbps"] == pytest.approx(40.0)  # no timed key: all bytes
    assert m["stall_pct"] == pytest.approx(10.0)


def test_peak_flops_come_from_the_card_classes(monkeypatch: pytest.MonkeyPatch) -> None:
    from ramgpt.train.metrics import peak_flops

    monkeypatch.delenv("RAMGPT_PEAK_TFLOPS", raising=False)
    assert peak_flops("cuda:0", "NVIDIA H200") == 989e12
    assert peak_flops("cuda", "NVIDIA GeForce RTX 3050 6GB Laptop GPU") == 13.5e12
    assert peak_flops("cuda", "Some Unknown Card") is None and peak_flops("cpu", None) is None
    monkeypatch.setenv("RAMGPT_PEAK_TFLOPS", "100")
    assert peak_flops("cuda", "Some Unknown Card") == 100e12

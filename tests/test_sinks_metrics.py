"""Which runs the displays treat as GPU runs and as streamed runs."""

from __future__ import annotations

from ramgpt.sinks.metrics import has_transfer, is_gpu_run


def test_gpu_run_from_device_or_vram_keys() -> None:
    assert is_gpu_run({"device": "cuda"}) and is_gpu_run({"device": "cuda:1"})
    assert is_gpu_run({"vram_total_b": 8 << 30})  # an old row without a device
    assert not is_gpu_run({"device": "cpu", "rss_b": 1}) and not is_gpu_run({})


def test_transfer_needs_a_number() -> None:
    assert has_transfer({"h2d_gbps": 11.2}) and has_transfer({"stall_pct": 0})
    assert not has_transfer({"h2d_gbps": None, "link_gbps": 12.5}) and not has_transfer({"engine": "streamed"})

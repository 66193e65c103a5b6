"""ramgpt.memory.report: the assembled estimate (placement, verdicts, advice) and the
estimate-memory command (JSON, table, exit codes)."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import pytest
from typer.testing import CliRunner

from ramgpt import memory as M
from ramgpt import placement, probe
from ramgpt.cli import app
from ramgpt.config import load_profile

GiB = 2**30
MiB = 2**20

# ---------------------------------------------------------------------------------------------
# parameters


def test_1b_parameter_count():
    est = M.estimate(load_profile("1b", use_env=False), detect=False)
    assert est.params["total"] == pytest.approx(1.0988e9, rel=0.01)
    assert est.params["total"] == 1_098_777_600


# ---------------------------------------------------------------------------------------------
# the shipped profiles


def test_rtx3050_profile_fits_its_budget():
    p = load_profile("rtx3050-6gb", use_env=False)
    est = M.estimate(p, detect=False)
    assert est.engine == "streamed" and est.device == "cuda"
    assert est.vram_bytes == int(5.1 * GiB)
    assert est.max_seqs_per_pass is not None and est.max_seqs_per_pass >= 1
    # the profile pins the measured 16 (docs/benchmarks.md); the model must agree that it fits
    assert est.seqs_per_pass == p.runtime.seqs_per_pass == 16 <= est.max_seqs_per_pass
    assert est.fits_vram is True
    assert est.gpu is not None and est.gpu.need_bytes <= 5.1 * GiB
    assert est.cpu_bytes < 24 * GiB  # fp32 masters + AdamW + grads + pinned bf16 copies
    assert est.fits_ram is None  # nothing detected, nothing given


def test_1b_on_a_6gb_card_goes_streamed():
    est = M.estimate(load_profile("1b", use_env=False), vram_gib=6.0, ram_gib=32, detect=False)
    assert est.engine == "streamed" and est.engine_reason.startswith("auto")
    assert est.fits_vram and est.fits_ram and est.fits
    assert est.vram_bytes == 6 * GiB - M.DEFAULT_ASSUMPTIONS.cuda_context_bytes


def test_shipped_profiles_all_estimate():
    for name in ("1b", "rtx3050-6gb", "0p1b", "micro-test"):
        est = M.estimate(load_profile(name, use_env=False), vram_gib=8.0, ram_gib=32.0, detect=False)
        d = est.to_dict()
        json.dumps(d)
        assert d["params"]["total"] > 0 and d["cpu"]["total_bytes"] > 0
        assert d["assumptions"]


def test_no_gpu_means_cpu():
    est = M.estimate(load_profile("1b", use_env=False), detect=False)
    assert est.device == "cpu" and est.engine == "resident" and est.gpu is None
    assert any("no GPU" in n for n in est.notes)


def test_advice_when_it_does_not_fit():
    p = load_profile("1b", ["runtime.engine=resident"], use_env=False)
    est = M.estimate(p, vram_gib=16, ram_gib=64, detect=False)
    assert est.fits_vram is False
    assert any("runtime.engine=streamed" in a for a in est.advice)
    est = M.estimate(load_profile("1b", use_env=False), vram_gib=6, ram_gib=16, detect=False)
    assert est.fits_ram is False
    assert any(a.startswith("need ") and "have 16.0 GiB" in a and "model.n_layer" in a for a in est.advice)
    p = load_profile("1b", ["runtime.seqs_per_pass=64"], use_env=False)
    est = M.estimate(p, vram_gib=6, ram_gib=64, detect=False)
    assert est.fits_vram is False and any("runtime.seqs_per_pass" in a for a in est.advice)


# ---------------------------------------------------------------------------------------------
# the CLI


def test_cli_json():
    r = CliRunner().invoke(app, ["estimate-memory", "--profile", "rtx3050-6gb", "--json", "--ram-gib", "32", "--no-time"])
    assert r.exit_code == 0, r.output
    d = json.loads(r.stdout)
    assert d["engine"] == "streamed" and d["fits"] is True
    assert d["gpu"]["need_bytes"] <= 5.1 * GiB
    names = [t["name"] for t in d["gpu"]["terms"]]
    assert any("window" in n for n in names) and any("headroom" in n for n in names)
    assert d["pcie"]["h2d_bytes"] > 0 and d["pcie"]["link_gbps"] == 12.0
    assert d["disk"]["per_checkpoint_bytes"] > 12 * 10**9


def test_cli_table_runs():
    r = CliRunner().invoke(
        app, ["estimate-memory", "--profile", "1b", "--vram-gib", "6", "--ram-gib", "16", "--link-gbps", "25", "--no-time"]
    )
    assert r.exit_code == 9, r.output  # fits the VRAM, not the RAM
    assert "does not fit" in r.output and "model.n_layer" in r.output
    assert "25 GB/s" in r.output


@pytest.mark.parametrize(
    "args,needle",
    [
        (["--profile", "nope"], "unknown profile"),
        (["--profile", "1b", "--vram-gib", "-1"], "--vram-gib must be positive"),
        (["--profile", "1b", "--set", "optim.lr=-1"], "optim.lr"),
    ],
)
def test_cli_bad_input(args, needle):
    r = CliRunner().invoke(app, ["estimate-memory", *args])
    assert r.exit_code != 0
    assert needle in r.output
    assert "Traceback" not in r.output
    assert r.exception is None or isinstance(r.exception, SystemExit)


@pytest.mark.slow
def test_estimate_is_fast_and_light():
    code = textwrap.dedent(
        """
        import sys, time, io
        t = time.perf_counter()
        from ramgpt.config import load_profile
        from ramgpt.memory import estimate
        from ramgpt.render import render_estimate
        from rich.console import Console
        for name in ("1b", "rtx3050-6gb", "0p1b", "micro-test"):
            render_estimate(estimate(load_profile(name), vram_gib=6), Console(file=io.StringIO()))
        heavy = [m for m in ("torch", "datasets", "transformers") if m in sys.modules]
        print(heavy, time.perf_counter() - t)
        """
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    heavy, secs = out.stdout.split("]")
    assert heavy == "["
    assert float(secs) < 3.0


def test_advice_offers_host_accumulation_when_device_accumulation_does_not_fit():
    """On CUDA, auto sums gradients on the GPU (more VRAM); where that is what breaks the budget,
    the advice names runtime.grad_accum=host as the way to keep the configured pass size."""
    p = load_profile("rtx3050-6gb", use_env=False)
    host = load_profile("rtx3050-6gb", ["runtime.grad_accum=host"], use_env=False)
    dev_need = M.streamed_gpu(p, 16).need_bytes
    host_need = M.streamed_gpu(host, 16).need_bytes
    assert host_need < dev_need
    budget = f"runtime.vram_budget_gib={(host_need + dev_need) / 2 / GiB:.3f}"  # host fits 16 per pass, device not
    est = M.estimate(load_profile("rtx3050-6gb", [budget], use_env=False), ram_gib=64, detect=False)
    assert est.fits_vram is False
    assert any("runtime.grad_accum=host" in a and "keep 16" in a for a in est.advice), est.advice
    # with host accumulation already chosen there is nothing to offer
    est_host = M.estimate(load_profile("rtx3050-6gb", [budget, "runtime.grad_accum=host"], use_env=False), ram_gib=64,
                          detect=False)
    assert est_host.fits_vram is True and not any("grad_accum" in a for a in est_host.advice)


# ---------------------------------------------------------------------------------------------
# the machine and the placement: the estimate decides as train does (ramgpt.placement)


def _no_gpu(monkeypatch):
    monkeypatch.setattr(probe, "nvml_gpus", lambda: ())


def _gpu(monkeypatch, name="NVIDIA GeForce RTX 2080", total=8 * GiB, free=7 * GiB, bf16=False, cap=(7, 5)):
    monkeypatch.setattr(probe, "nvml_gpus", lambda: (probe.Gpu(0, name, total, bf16, cap, free),))


def test_a_card_without_bf16_is_estimated_in_fp16(monkeypatch):
    # placement picks fp16 with loss scaling on pre-Ampere cards; the estimate used to say bf16
    _gpu(monkeypatch)
    est = M.estimate(load_profile("0p1b", use_env=False), ram_gib=32)
    assert est.device == "cuda" and est.precision == "fp16"
    assert est.card_bytes == 7 * GiB and est.vram_source == "detected free on NVIDIA GeForce RTX 2080"
    assert est.vram_bytes == 7 * GiB - M.DEFAULT_ASSUMPTIONS.cuda_context_bytes


def test_estimate_agrees_with_placement(monkeypatch):
    """The engine and sequences per pass are placement.decide's on the same machine, for every
    shipped profile and a few cards."""
    for vram in (4, 6, 24, 80):
        m = probe.Machine(gpus=(probe.Gpu(0, "x", int(vram * GiB), True, (8, 0), int(vram * GiB)),))
        free = int(vram * GiB) - M.DEFAULT_ASSUMPTIONS.cuda_context_bytes
        for name in ("1b", "rtx3050-6gb", "0p1b", "micro-test"):
            p = load_profile(name, use_env=False)
            pl = placement.decide(p, m, free_vram_b=free)
            est = M.estimate(p, vram_gib=vram, ram_gib=64, detect=False)
            assert (est.device, est.engine, est.precision) == ("cpu" if pl.device == "cpu" else "cuda", pl.engine, pl.precision)
            if est.device == "cuda" and est.engine == "streamed":
                assert est.seqs_per_pass == pl.seqs_per_pass, (name, vram)


def test_explicit_cuda_without_a_gpu_is_one_line(monkeypatch):
    _no_gpu(monkeypatch)
    r = CliRunner().invoke(app, ["estimate-memory", "--profile", "0p1b", "--set", "runtime.device=cuda", "--no-time"])
    assert r.exit_code == 2, r.output
    assert "no usable CUDA GPU" in r.output and "--vram-gib or --card" in r.output and "Traceback" not in r.output
    # with a described card it plans
    r = CliRunner().invoke(app, ["estimate-memory", "--profile", "0p1b", "--set", "runtime.device=cuda", "--no-time",
                                 "--vram-gib", "8", "--ram-gib", "64", "--json"])
    assert r.exit_code == 0 and json.loads(r.stdout)["device"] == "cuda"


def test_budget_without_a_card_plans_for_the_budget(monkeypatch):
    _no_gpu(monkeypatch)
    est = M.estimate(load_profile("rtx3050-6gb", use_env=False), ram_gib=32)
    assert est.device == "cuda" and est.vram_bytes == int(5.1 * GiB) and est.card_bytes is None
    assert any("no GPU found: planned for a card that holds runtime.vram_budget_gib" in n for n in est.notes)
    # the profile on the CPU, as train would run it there
    cpu = M.estimate(load_profile("rtx3050-6gb", ["runtime.device=cpu"], use_env=False), ram_gib=32)
    assert cpu.device == "cpu" and cpu.gpu is None and cpu.engine == "streamed"
    assert any("estimated as the resident engine" in n for n in cpu.notes)


def test_budget_above_the_card_is_capped_as_train_caps_it():
    est = M.estimate(load_profile("rtx3050-6gb", use_env=False), vram_gib=4, ram_gib=32, detect=False)
    assert est.vram_bytes == 4 * GiB  # placement.vram_budget_bytes: min(budget, card)
    assert any("more than the card's" in n for n in est.notes)


# ---------------------------------------------------------------------------------------------
# estimate-memory's exit codes: "does not fit" is not success


@pytest.mark.parametrize(
    "args,code",
    [
        (["--profile", "rtx3050-6gb", "--ram-gib", "32"], 0),
        (["--profile", "1b", "--set", "runtime.engine=resident", "--vram-gib", "16", "--ram-gib", "64"], 8),
        (["--profile", "1b", "--vram-gib", "6", "--ram-gib", "16"], 9),
        (["--profile", "1b", "--set", "runtime.engine=resident", "--vram-gib", "16", "--ram-gib", "8"], 10),
        (["--profile", "micro-test"], 0),  # RAM detected here; no GPU: nothing short
    ],
)
def test_exit_codes(args, code):
    r = CliRunner().invoke(app, ["estimate-memory", *args, "--no-time", "--json"])
    assert r.exit_code == code, r.output
    d = json.loads(r.stdout)  # the report is printed before the exit
    assert d["fits"] is (code == 0)
    assert d["fits_vram"] is not (code in (8, 10)) and d["fits_ram"] is not (code in (9, 10))


def test_help_documents_the_exit_codes():
    r = CliRunner().invoke(app, ["estimate-memory", "--help"])
    assert r.exit_code == 0
    text = " ".join(r.output.split())
    assert "Exit codes: 0 it fits" in text and "8 it does not fit the VRAM" in text and "10 neither" in text
    assert "--card" in text and "rtx3050-6gb" in text


# ---------------------------------------------------------------------------------------------
# the time projection in the report


def test_card_class_gives_time_and_vram(monkeypatch):
    _no_gpu(monkeypatch)
    r = CliRunner().invoke(app, ["estimate-memory", "--profile", "1b", "--card", "rtx3060-12gb", "--ram-gib", "64", "--json"])
    assert r.exit_code == 0, r.output
    d = json.loads(r.stdout)
    assert d["vram_source"] == "--card rtx3060-12gb (12 GiB)"
    assert d["vram_bytes"] == 12 * GiB - M.DEFAULT_ASSUMPTIONS.cuda_context_bytes
    assert d["pcie"]["link_gbps"] == 24.0 and "rtx3060-12gb" in d["pcie"]["link_source"]
    t = d["time"]
    assert t["rates"]["matmul_tflops"] == M.CARDS["rtx3060-12gb"].bf16_tflops
    assert t["rates"]["efficiency"] == M.DEFAULT_SPEED.card_efficiency
    assert t["step_s"] == pytest.approx(max(t["compute_s"], t["transfer_s"], t["host_accum_s"]) + t["optimizer_s"])
    assert t["run_days"] == pytest.approx(t["step_s"] * 50_000 / 86400)
    assert t["tokens_per_s"] == pytest.approx(196_608 / t["step_s"])


def test_unknown_card_is_one_line():
    r = CliRunner().invoke(app, ["estimate-memory", "--profile", "1b", "--card", "gtx480"])
    assert r.exit_code == 2 and "not a known card class" in r.output and "rtx3050-6gb" in r.output


def _fake_speed(device="cuda:0", tflops=100.0, h2d=20.0, d2h=25.0, adamw=None):
    mm = probe.MatmulRate(device, "Fake GPU" if device != "cpu" else "CPU", "bf16", (8192, 1536, 6144), tflops, 0.3)
    pinned = probe.PinnedRate(256 * MiB, 0.1, 256 * MiB, h2d, d2h) if device != "cpu" else None
    return probe.Speed(mm, pinned, probe.AdamwRate(2**23, 2, adamw, 0.1) if adamw else None)


def test_measured_rates_feed_the_time_and_the_link(monkeypatch):
    _gpu(monkeypatch, name="Fake GPU", total=24 * GiB, free=23 * GiB, bf16=True, cap=(8, 6))
    asked = []
    monkeypatch.setattr(probe, "measure_speed", lambda device, shape: asked.append((device, shape)) or _fake_speed())
    p = load_profile("rtx3050-6gb", use_env=False)
    est = M.estimate(p, ram_gib=64, speed="auto")
    # the GEMM was timed on the placement's device, at one pass's MLP shape
    assert asked == [("cuda", (8192, 1536, 6144))]
    assert est.pcie.link_gbps == 20.0 and "H2D 20.0, D2H 25.0" in est.pcie.link_source
    t = est.time
    assert t is not None and t.rates.matmul_tflops == 100.0 and t.rates.efficiency == M.DEFAULT_SPEED.measured_efficiency_gpu
    assert t.transfer_s == pytest.approx(max(est.pcie.h2d_bytes, est.pcie.d2h_bytes) / 20e9)
    assert est.to_dict()["time"]["step_s"] == t.step_s
    # --link-gbps still wins over the measured link
    assert M.estimate(p, ram_gib=64, speed="auto", link_gbps=7).pcie.link_gbps == 7


def test_no_gpu_to_measure_says_so(monkeypatch):
    _no_gpu(monkeypatch)
    monkeypatch.setattr(probe, "measure_speed", lambda device, shape: None)
    est = M.estimate(load_profile("rtx3050-6gb", use_env=False), ram_gib=64, speed="auto")
    assert est.time is None and any("--card" in n for n in est.notes)


def test_cpu_measurement_projects_a_cpu_run(monkeypatch):
    _no_gpu(monkeypatch)
    asked = []
    monkeypatch.setattr(probe, "measure_speed",
                        lambda device, shape: asked.append(shape) or _fake_speed("cpu", tflops=0.05, adamw=1e8))
    p = load_profile("micro-test", use_env=False)
    est = M.estimate(p, speed="auto")
    assert asked == [(1024, 128, 512)]  # one micro-batch (8 x 128 tokens) through the MLP, C = 128
    assert est.device == "cpu" and est.time is not None
    assert est.time.transfer_s == 0 and est.time.optimizer_s == pytest.approx(est.params["total"] / 1e8)
    assert est.time.compute_s == pytest.approx(
        est.time.flops_per_token * est.time.tokens_per_step / (0.05e12 * M.DEFAULT_SPEED.measured_efficiency_cpu)
    )


def test_no_time_unless_asked():
    est = M.estimate(load_profile("1b", use_env=False), vram_gib=6, detect=False)
    assert est.time is None and est.to_dict()["time"] is None


def test_short_ram_recommends_the_low_ram_mode_and_it_shows_its_disk_traffic() -> None:
    from ramgpt.config import load_profile
    from ramgpt.memory import estimate

    est = estimate(load_profile("rtx3050-6gb", use_env=False), vram_gib=6, ram_gib=15, detect=False)
    assert est.fits_ram is False
    assert any("runtime.optimizer_on_disk=true" in a for a in est.advice)
    low = estimate(load_profile("desktop-16gb", use_env=False), vram_gib=6, ram_gib=15, detect=False)
    assert low.fits_ram is True
    assert any("low-RAM mode" in n and "GB of disk traffic per step" in n for n in low.notes)

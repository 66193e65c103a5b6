"""ramgpt.memory.timing: FLOPs per token by hand, the step-time projection term by term, and the
projection against the measured H100 runs it was calibrated on (docs/benchmarks.md)."""

from __future__ import annotations

import pytest

from ramgpt import memory as M
from ramgpt import probe
from ramgpt.config import load_profile
from ramgpt.memory import timing as TM

# auto's split masters follow whether the CPU's kernel can be built (ramgpt.toolchain): these tests
# take the machine without a compiler unless they say otherwise
pytestmark = pytest.mark.usefixtures("without_cpu_kernel")

N_1B = 1_098_777_600
L, C, T = 36, 1536, 1024


def _rates(device="cuda", tflops=100.0, eff=0.5, threads=16):
    return TM.Rates(device, tflops, eff, threads, "test")


def test_flops_per_token_by_hand():
    cfg = load_profile("1b", use_env=False).model
    n_mm = N_1B - 1024 * C  # every parameter but the position table
    base = 6 * n_mm + 12 * L * C * T
    assert TM.flops_per_token(cfg, T) == base
    blocks = L * (12 * C * C + 13 * C)
    assert TM.flops_per_token(cfg, T, "blocks") == base + 2 * blocks + 4 * L * C * T
    assert TM.flops_per_token(cfg, T, "all") == base + 2 * n_mm + 4 * L * C * T
    assert TM.flops_per_token(cfg, T) == pytest.approx(7.26e9, rel=1e-3)


def test_recompute_kind():
    assert TM.recompute_kind("streamed", "cuda", True) == "all"
    assert TM.recompute_kind("resident", "cuda:1", True) == "blocks"
    assert TM.recompute_kind("resident", "cuda", False) == "none"
    assert TM.recompute_kind("streamed", "cpu", True) == "none"  # the CPU keeps every activation


def test_streamed_step_term_by_term():
    p = load_profile("rtx3050-6gb", ["runtime.grad_accum=host"], use_env=False)
    pcie = M.pcie_per_step(p, 16, "streamed")
    a = TM.DEFAULT_SPEED
    t = TM.project_time(p, engine="streamed", device="cuda", pcie=pcie, rates=_rates(threads=8))
    tokens = 192 * 1024
    assert t.tokens_per_step == tokens
    assert t.compute_s == pytest.approx(TM.flops_per_token(p.model, T, "all") * tokens / (100e12 * 0.5))
    assert t.transfer_s == pytest.approx(max(pcie.h2d_bytes, pcie.d2h_bytes) / 12e9)
    chunk_params = sum(c.params for c in M.chunk_sizes(p.model))
    assert t.host_accum_s == pytest.approx(12 * chunk_params / (a.host_accum_params_per_thread_s * 8))
    # fused AdamW at the assumed per-thread rate, chunk by chunk (the GPU takes no share with
    # grad_accum=host), less the next step's first forward (a quarter of a pass) that hides it
    update = N_1B / (a.adamw_params_per_thread_s * 8) * (1 + a.optimizer_rest_ratio)
    assert t.optimizer_s == pytest.approx(max(0.0, update - t.compute_s / 12 / 4))
    assert t.step_s == pytest.approx(max(t.compute_s, t.transfer_s, t.host_accum_s) + t.optimizer_s)
    assert t.bound == "compute"
    assert t.run_s == pytest.approx(t.step_s * p.optim.max_steps) and t.run_days == pytest.approx(t.run_s / 86400)
    # grad_accum=device (auto on CUDA): no CPU sums
    dev = load_profile("rtx3050-6gb", use_env=False)
    assert TM.project_time(dev, engine="streamed", device="cuda", pcie=M.pcie_per_step(dev, 16, "streamed"),
                           rates=_rates()).host_accum_s == 0


def test_slow_link_makes_it_transfer_bound():
    p = load_profile("rtx3050-6gb", use_env=False)
    from dataclasses import replace

    pcie = replace(M.pcie_per_step(p, 16, "streamed"), link_gbps=0.5)
    t = TM.project_time(p, engine="streamed", device="cuda", pcie=pcie, rates=_rates(tflops=1000.0))
    assert t.bound == "transfer" and t.step_s == pytest.approx(t.transfer_s + t.optimizer_s)
    assert "transfer-bound" in t.lines()[0]
    # the plan names the setting that halves the weights' traffic, and what it costs
    assert any("runtime.host_bf16_copies=true" in x and "2.0 GiB more RAM" in x for x in t.assumptions), t.assumptions
    copies = load_profile("rtx3050-6gb", ["runtime.host_bf16_copies=true"], use_env=False)
    pc = replace(M.pcie_per_step(copies, 16, "streamed"), link_gbps=0.5)
    t2 = TM.project_time(copies, engine="streamed", device="cuda", pcie=pc, rates=_rates(tflops=1000.0))
    assert t2.step_s < t.step_s and not any("host_bf16_copies" in x for x in t2.assumptions)


def test_split_masters_the_cpu_updates_cost_it_their_join_and_split():
    """runtime.split_masters=true: the CPU joins and splits its share of the update (more optimizer
    time than whole masters); auto splits only what the GPU updates (no CPU cost) and loads fewer bytes."""
    from dataclasses import replace

    def project(*sets):  # an H200-like link, so the CPU's share, not the GPU's copies, bounds the update
        p = load_profile("rtx3050-6gb", list(sets), use_env=False)
        pcie = replace(M.pcie_per_step(p, 16, "streamed"), link_gbps=54.9)
        return TM.project_time(p, engine="streamed", device="cuda", pcie=pcie, rates=_rates(tflops=400.0, threads=16))

    share = "runtime.optimizer_gpu_share=0.4"  # the CPU's share then bounds the update on this link
    whole, auto = project("runtime.split_masters=false", share), project(share)
    every = project("runtime.split_masters=true", share)
    a = TM.DEFAULT_SPEED
    assert auto.optimizer_s == pytest.approx(whole.optimizer_s)
    cpu = (1 - 0.4) * N_1B / (a.adamw_params_per_thread_s * 16)
    assert whole.optimizer_s > 0
    assert every.optimizer_s - whole.optimizer_s == pytest.approx(cpu * a.split_masters_ratio, rel=0.02)
    assert every.transfer_s < auto.transfer_s < whole.transfer_s


@pytest.mark.usefixtures("with_cpu_kernel")
def test_split_masters_with_the_cpu_kernel_cost_its_small_ratio():
    """With a C compiler the CPU's share of split masters goes through the one-pass kernel: auto
    and true both split every chunk and cost split_native_ratio of the CPU's AdamW, not the pieces' 1.7."""
    from dataclasses import replace

    def project(*sets):
        p = load_profile("rtx3050-6gb", list(sets), use_env=False)
        pcie = replace(M.pcie_per_step(p, 16, "streamed"), link_gbps=54.9)
        return TM.project_time(p, engine="streamed", device="cuda", pcie=pcie, rates=_rates(tflops=400.0, threads=16))

    share = "runtime.optimizer_gpu_share=0.4"
    whole, auto = project("runtime.split_masters=false", share), project(share)
    every = project("runtime.split_masters=true", share)
    a = TM.DEFAULT_SPEED
    cpu = (1 - 0.4) * N_1B / (a.adamw_params_per_thread_s * 16)
    assert auto.optimizer_s == pytest.approx(every.optimizer_s)
    assert every.optimizer_s - whole.optimizer_s == pytest.approx(cpu * a.split_native_ratio, rel=0.02)
    assert auto.transfer_s == pytest.approx(every.transfer_s) and every.transfer_s < whole.transfer_s


def test_resident_gpu_and_cpu():
    p = load_profile("0p1b", use_env=False)
    gpu = TM.project_time(p, engine="resident", device="cuda", pcie=M.pcie_per_step(p, 8, "resident"), rates=_rates())
    assert gpu.optimizer_s == 0 and gpu.host_accum_s == 0  # fused AdamW on the GPU: not counted
    assert gpu.flops_per_token == TM.flops_per_token(p.model, p.data.seq_len, "blocks")
    cpu = TM.project_time(p, engine="resident", device="cpu", pcie=None, rates=_rates("cpu", 0.1, 0.5, threads=2))
    assert cpu.transfer_s == 0 and cpu.flops_per_token == TM.flops_per_token(p.model, p.data.seq_len, "none")
    n = M.estimate(p, detect=False).params["total"]
    assert cpu.optimizer_s == pytest.approx(n / (TM.DEFAULT_SPEED.adamw_params_per_thread_s * 2))


def test_a_measured_adamw_rate_replaces_the_assumed_one():
    p = load_profile("rtx3050-6gb", use_env=False)
    pcie = M.pcie_per_step(p, 16, "streamed")
    measured = TM.Rates("cuda", 100.0, 0.5, 6, "test", adamw_params_per_s=5e8)
    t = TM.project_time(p, engine="streamed", device="cuda", pcie=pcie, rates=measured)
    # the GPU's share (runtime.optimizer_gpu_share) streams 16 bytes per parameter over the link
    share = p.runtime.optimizer_gpu_share
    update = max((1 - share) * N_1B / 5e8 * (1 + TM.DEFAULT_SPEED.optimizer_rest_ratio),
                 share * N_1B * 16 / (pcie.link_gbps * 1e9))
    assert t.optimizer_s == pytest.approx(update - t.compute_s / pcie.passes_per_step / 4)
    assert any("measured here at 500 M params/s" in x for x in t.assumptions)


def test_threads_beyond_the_measured_16_count_as_16():
    p = load_profile("rtx3050-6gb", use_env=False)
    pcie = M.pcie_per_step(p, 16, "streamed")
    t16 = TM.project_time(p, engine="streamed", device="cuda", pcie=pcie, rates=_rates(threads=16))
    t64 = TM.project_time(p, engine="streamed", device="cuda", pcie=pcie, rates=_rates(threads=64))
    assert t64.optimizer_s == t16.optimizer_s


def test_card_classes():
    assert {"rtx3050-6gb", "rtx3060-12gb", "rtx4060-8gb", "h100", "h200"} <= set(TM.CARDS)
    for c in TM.CARDS.values():
        assert c.bf16_tflops > 0 and c.link_gbps > 0 and c.vram_gib > 0 and c.source and c.link
        r = TM.Rates.from_card(c, 8)
        assert r.matmul_tflops == c.bf16_tflops and r.efficiency == TM.DEFAULT_SPEED.card_efficiency
        assert f"{c.bf16_tflops:g} TFLOP/s" in r.source and r.link_gbps == c.link_gbps
    assert TM.CARDS["h100"].host_threads == 16  # a data-centre card is planned with its host


# the measured H100 runs of docs/benchmarks.md (round 2, 1b, 196,608 tokens per step, 16 cores);
# the streamed engine of that round (its optimizer ran after the passes, not beside them) is gone,
# and today's ran on H200s only: those runs are below
H100_RUNS = [
    # (profile, overrides, engine, seqs per pass, measured tokens/s)
    ("1b", ["runtime.engine=resident", "optim.micro_batch_size=8", "optim.grad_accum_steps=24"], "resident", 8, 40_635),
]


@pytest.mark.parametrize("name,sets,engine,spp,measured", H100_RUNS)
def test_h100_card_class_matches_the_measured_runs(name, sets, engine, spp, measured):
    p = load_profile(name, sets, use_env=False)
    card = TM.CARDS["h100"]
    pcie = M.pcie_per_step(p, spp, engine)
    from dataclasses import replace

    pcie = replace(pcie, link_gbps=card.link_gbps)
    t = TM.project_time(p, engine=engine, device="cuda", pcie=pcie, rates=TM.Rates.from_card(card, 16))
    assert t.tokens_per_s == pytest.approx(measured, rel=0.10)


def test_lines_read_as_a_plan():
    p = load_profile("rtx3050-6gb", use_env=False)
    t = TM.project_time(p, engine="streamed", device="cuda", pcie=M.pcie_per_step(p, 16, "streamed"),
                        rates=TM.Rates.from_card(TM.CARDS["rtx3050-6gb"], 8))
    first, second, third = t.lines()
    # a pass's forward on this card (seconds) hides the whole CPU update: none of it is exposed
    assert "tokens/s" in first and "compute-bound" in first and "CPU optimizer" not in first
    assert t.optimizer_s == 0 and any("less the first forward it overlaps" in x for x in t.assumptions)
    assert second.startswith("50,000 steps (optim.max_steps): ") and second.endswith(" days")
    assert "card class rtx3050-6gb" in third
    d = t.to_dict()
    assert d["run_days"] == t.run_days and d["rates"]["sustained_tflops"] == pytest.approx(13.5 * 0.4)


# The rates ramgpt.probe measured on the H200 machine (2026-11-29: bf16 GEMM 8192x1536x6144 at
# 642-660 TFLOP/s, pinned copies 54.9 GB/s each way, fused AdamW over 1.1 B fp32 parameters 0.278 s
# on 16 threads) against the runs measured there (docs/benchmarks.md: streamed round 4, the default
# and with host bf16 copies, in one call; resident round 1), as `estimate-memory` would project them.
H200_SPEED = probe.Speed(
    probe.MatmulRate("cuda:0", "NVIDIA H200", "bf16", (8192, 1536, 6144), 651.0, 0.3),
    probe.PinnedRate(2**28, 0.14, 2**28, 54.9, 54.9),
    probe.AdamwRate(N_1B // 4, 16, N_1B / 0.278, 0.3),
)
H200_RUNS = [
    ("rtx3050-6gb", ["runtime.split_masters=false"], "streamed", 16, 37_304),  # round 4: whole masters
    ("rtx3050-6gb", ["runtime.host_bf16_copies=true"], "streamed", 16, 41_112),
    ("1b", ["runtime.engine=resident", "optim.micro_batch_size=8", "optim.grad_accum_steps=24"], "resident", 8, 43_150),
]


@pytest.mark.parametrize("name,sets,engine,spp,measured", H200_RUNS)
def test_measured_h200_rates_match_the_measured_runs(name, sets, engine, spp, measured):
    from dataclasses import replace

    p = load_profile(name, sets, use_env=False)
    rates = TM.Rates.from_speed(H200_SPEED, 16)
    assert rates.link_gbps == 54.9 and rates.adamw_params_per_s == pytest.approx(N_1B / 0.278)
    pcie = replace(M.pcie_per_step(p, spp, engine), link_gbps=rates.link_gbps)
    t = TM.project_time(p, engine=engine, device="cuda", pcie=pcie, rates=rates)
    assert t.tokens_per_s == pytest.approx(measured, rel=0.10)  # the issue asks for 25%

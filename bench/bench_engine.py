"""GPU benchmark of ramgpt's engines against their baselines, one section per process.

    python bench/bench_engine.py SECTION --out DIR

Sections (run them on one warm machine, so the ratios compare like with like):
  link       pinned H2D/D2H GB/s (1 GiB copies)
  resident   resident PyTorch, 1b, no VRAM cap, micro-batch 8, bf16, per-block checkpointing
  ramtorch   plain ramtorch OffloadModel, 1b, 6 GiB cap, window 3, keep="checkpoint", mb 2
  streamed   ramgpt streamed engine through ramgpt.train.train(), rtx3050-6gb (5.1 GiB budget);
             env SPP (seqs per pass, default 16), ACC (host|device gradient accumulation; default
             the profile's auto), STEPS, SETS (more overrides: "key=value key=value"),
             LOAD_SLOTS=0 (A/B: a fresh device allocation per chunk load, as before round 5),
             SWITCH (A/B: sys.setswitchinterval, seconds), SPLIT_PIECE, GPU_UPDATE_ORDERED=0,
             GPU_UPDATE_LOOKAHEAD=0|1|2, GPU_UPDATE_PIECE (A/B knobs of the optimizer's update; the result holds the
             last two updates' per-chunk timelines)
  p1b        ramgpt streamed engine, 0p1b under the same 5.1 GiB budget; env STEPS, ACC
  p1b_resident  resident PyTorch, 0p1b, no cap (the p1b section's baseline); env MB, STEPS
  agree      small model: resident vs streamed bf16 loss curves on the GPU (same init, same data);
             env ACC picks the streamed run's gradient accumulation
  accagree   small model: streamed grad_accum=host vs grad_accum=device loss curves

Each section writes DIR/<section>.json and prints one summary line. tokens/s is counted over
whole optimizer steps (optimizer included) with the tokens per step stated in the output.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import threading
import time
from pathlib import Path

import psutil
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from ramgpt.config import load_profile  # noqa: E402


class RssPeak:
    """Samples this process's RSS every 50 ms (ru_maxrss is process-lifetime, not per section)."""

    def __init__(self):
        self.peak = 0
        self._stop = False
        self._t = threading.Thread(target=self._run, daemon=True)
        self._t.start()

    def _run(self):
        p = psutil.Process()
        while not self._stop:
            self.peak = max(self.peak, p.memory_info().rss)
            time.sleep(0.05)

    def stop(self) -> int:
        self._stop = True
        self._t.join()
        return self.peak


class Capture:
    def __init__(self):
        self.rows: list[dict] = []
        self.events: list[tuple[str, str]] = []
        self.t0 = time.perf_counter()
        self.phases: list[tuple[str, float]] = []  # (phase, seconds since train() began)

    def log(self, m, step):
        self.rows.append(dict(m))
        print(json.dumps({k: (round(v, 4) if isinstance(v, float) else v) for k, v in m.items()
                          if k in ("step", "loss", "tokens_per_s", "step_time_s", "optimizer_time_s", "mfu",
                                   "vram_peak_reserved_b", "h2d_gbps", "d2h_gbps", "stall_pct", "eval_loss",
                                   "optimizer_exposed_s", "optimizer_share", "pinned_b", "rss_b",
                                   "stall_load_pct", "stall_grad_pct", "stall_load_fwd_pct", "stall_load_bwd_pct",
                                   "thread_wait_pct", "vram_alloc_retries")}),
              flush=True)

    def progress(self, step, **quick):
        if quick.get("phase"):
            self.phases.append((quick["phase"], time.perf_counter() - self.t0))
            print(f"[phase] {quick['phase']} at {self.phases[-1][1]:.1f}s", flush=True)

    def event(self, kind, msg):
        self.events.append((kind, msg))
        print(f"[{kind}] {msg}", flush=True)

    def close(self):
        pass


def _peak_flops() -> float:
    name = torch.cuda.get_device_name()
    return 989e12 if ("H100" in name or "H200" in name) else float("nan")


def section_link(out: Path) -> dict:
    n = 1 << 30
    host = torch.empty(n, dtype=torch.uint8, pin_memory=True)
    dev = torch.empty(n, dtype=torch.uint8, device="cuda")
    res = {}
    for name, fn in (("h2d", lambda: dev.copy_(host, non_blocking=True)), ("d2h", lambda: host.copy_(dev, non_blocking=True))):
        fn()
        torch.cuda.synchronize()
        t = time.perf_counter()
        for _ in range(5):
            fn()
        torch.cuda.synchronize()
        res[f"{name}_gbps"] = 5 * n / (time.perf_counter() - t) / 1e9
    return res


def _train_section(profile_name: str, sets: list[str], steps: int, label: str) -> dict:
    from ramgpt.train import train

    sets = [
        *sets,
        "data.source=embedded",
        "data.tokenizer=embedded",
        f"optim.max_steps={steps}",
        "logging.log_interval=1",
        "logging.eval_interval=100000",
        "logging.eval_batches=1",
        "checkpoint.save_final=false",
        f"checkpoint.save_interval_steps={os.environ.get('SAVE', '100000')}",  # SAVE=4: a save at step 4
        "checkpoint.save_interval_minutes=null",
        "checkpoint.require_free_disk=false",
        f"checkpoint.out_dir=/tmp/bench-{label}",
    ]
    prof = load_profile(profile_name, sets)
    torch.cuda.reset_peak_memory_stats()
    rss = RssPeak()
    cap = Capture()
    t0 = time.perf_counter()
    cap.t0 = t0
    train(prof, sinks=[cap])
    wall = time.perf_counter() - t0
    peak_rss = rss.stop()
    timed = [r for r in cap.rows[1:-1]] or cap.rows[-1:]  # drop the warm-up step and the step with eval
    tps = statistics.median(r["tokens_per_s"] for r in timed)
    return {
        "profile": profile_name,
        "sets": sets,
        "tokens_per_step": prof.tokens_per_step,
        "tokens_per_s": tps,
        "step_time_s": statistics.median(r["step_time_s"] for r in timed),
        "optimizer_time_s": statistics.median(r["optimizer_time_s"] for r in timed),
        "mfu": statistics.median(r.get("mfu", float("nan")) for r in timed),
        "peak_reserved_gib": torch.cuda.max_memory_reserved() / 2**30,
        "peak_rss_gib": peak_rss / 2**30,
        "h2d_gbps": statistics.median(r.get("h2d_gbps", float("nan")) for r in timed),
        "d2h_gbps": statistics.median(r.get("d2h_gbps", float("nan")) for r in timed),
        "stall_pct": statistics.median(r.get("stall_pct", float("nan")) for r in timed),
        "stall_load_pct": statistics.median(r.get("stall_load_pct", float("nan")) for r in timed),
        "stall_grad_pct": statistics.median(r.get("stall_grad_pct", float("nan")) for r in timed),
        "stall_load_fwd_pct": statistics.median(r.get("stall_load_fwd_pct", float("nan")) for r in timed),
        "stall_load_bwd_pct": statistics.median(r.get("stall_load_bwd_pct", float("nan")) for r in timed),
        "thread_wait_pct": statistics.median(r.get("thread_wait_pct", float("nan")) for r in timed),
        "vram_alloc_retries": statistics.median(r.get("vram_alloc_retries", float("nan")) for r in timed),
        "per_step": [{k: r.get(k) for k in ("step", "step_time_s", "tokens_per_s", "optimizer_time_s",
                                            "optimizer_exposed_s", "stall_pct", "stall_load_pct", "stall_grad_pct",
                                            "stall_load_fwd_pct", "stall_load_bwd_pct",
                                            "thread_wait_pct", "vram_alloc_retries")} for r in cap.rows],
        "optimizer_exposed_pct": 100 * statistics.median(r.get("optimizer_share", float("nan")) for r in timed),
        "pinned_gib": cap.rows[-1].get("pinned_b", 0) / 2**30,
        "first_pass_starts_s": next((t for ph, t in cap.phases if ph == "first step"), float("nan")),
        "first_step_done_s": cap.rows[0]["elapsed_s"] if cap.rows else float("nan"),
        "phases": cap.phases,
        "seqs_per_pass": cap.rows[-1].get("seqs_per_pass"),
        "losses": [r["loss"] for r in cap.rows],
        "step_times_s": [r["step_time_s"] for r in cap.rows],
        "events": [m for k, m in cap.events if k in ("checkpoint", "warning")],
        "wall_s": wall,
    }


def section_resident(out: Path) -> dict:
    return _train_section(
        "1b",
        ["runtime.engine=resident", "runtime.precision=bf16", "optim.micro_batch_size=8", "optim.grad_accum_steps=24"],
        4,
        "resident",
    )


def _acc_sets() -> list[str]:
    """env ACC -> runtime.grad_accum (host | device); unset keeps the profile's (auto)."""
    acc = os.environ.get("ACC")
    return [f"runtime.grad_accum={acc}"] if acc else []


def section_streamed(out: Path) -> dict:
    spp = os.environ.get("SPP", "16")
    steps = int(os.environ.get("STEPS", "4"))
    acc = os.environ.get("ACC")
    prof = os.environ.get("PROFILE", "rtx3050-6gb")
    extra = os.environ.get("SETS", "").split()  # more --set overrides, e.g. SETS="runtime.optimizer_gpu_share=0"
    return _train_section(prof, [f"runtime.seqs_per_pass={spp}", *_acc_sets(), *extra], steps,
                          f"streamed-{prof}-{acc or 'auto'}-{os.getpid()}")  # a fresh run directory each time


def section_p1b(out: Path) -> dict:
    return _train_section("0p1b", ["runtime.engine=streamed", "runtime.vram_budget_gib=5.1", "runtime.seqs_per_pass=64",
                                   *_acc_sets()],
                          int(os.environ.get("STEPS", "4")), "p1b")


def section_ramtorch(out: Path) -> dict:
    """Plain ramtorch 1.11 OffloadModel: fp32 chunks streamed, its own grad accumulators,
    flush_grads + fused CPU AdamW. 6 GiB cap. 16 micro-batches of 2 per step (32,768 tokens)."""
    import ramtorch

    from ramgpt.model import GPT

    prof = load_profile("1b")
    total = torch.cuda.get_device_properties(0).total_memory
    torch.cuda.set_per_process_memory_fraction(6 * 2**30 / total)
    torch.manual_seed(0)
    model = GPT(prof.model)
    om = ramtorch.OffloadModel(model.chunks(), device="cuda", window=3, keep_activations="checkpoint")
    opt = torch.optim.AdamW([p for p in om.parameters()], lr=1e-4, fused=True)
    mb, T = int(os.environ.get("MB", "2")), prof.data.seq_len
    n_mb = 32 // mb
    rss = RssPeak()
    times = []
    for step in range(3):
        torch.cuda.synchronize()
        t = time.perf_counter()
        for _ in range(n_mb):
            x = torch.randint(0, 50257, (mb, T))
            with torch.autocast("cuda", dtype=torch.bfloat16):
                om.step((x, x), loss_fn=lambda o, _t: o / (mb * T))
        om.flush_grads(scale=1.0 / n_mb)
        opt.step()
        opt.zero_grad(set_to_none=False)
        om.invalidate_residency()
        torch.cuda.synchronize()
        times.append(time.perf_counter() - t)
        print(f"ramtorch step {step}: {times[-1]:.2f}s", flush=True)
    om.close()
    tokens = mb * n_mb * T
    st = statistics.median(times[1:])
    return {"tokens_per_step": tokens, "tokens_per_s": tokens / st, "step_time_s": st,
            "peak_reserved_gib": torch.cuda.max_memory_reserved() / 2**30, "peak_rss_gib": rss.stop() / 2**30}


_AGREE_COMMON = ["model.n_layer=6", "model.n_head=8", "model.n_embd=512", "data.seq_len=256", "model.block_size=256",
              "optim.micro_batch_size=8", "optim.grad_accum_steps=2", "optim.lr=1e-3", "scheduler.warmup_steps=5",
              "runtime.precision=bf16"]


def section_agree(out: Path) -> dict:
    """Resident vs streamed bf16 on a small model: same init (seed), same data, 30 steps
    (2 weight passes per optimizer step, so pass-to-pass accumulation is exercised)."""
    acc = os.environ.get("ACC", "host")
    a = _train_section("0p1b", [*_AGREE_COMMON, "runtime.engine=resident"], 30, "agree-res")
    b = _train_section("0p1b", [*_AGREE_COMMON, "runtime.engine=streamed", "runtime.seqs_per_pass=8",
                                f"runtime.grad_accum={acc}"], 30, "agree-stm")
    diffs = [abs(x - y) for x, y in zip(a["losses"], b["losses"])]
    return {"resident": a["losses"], "streamed": b["losses"], "grad_accum": acc, "max_abs_diff": max(diffs),
            "final": (a["losses"][-1], b["losses"][-1])}


def section_accagree(out: Path) -> dict:
    """Streamed with grad_accum=host vs grad_accum=device on the small model: both add the same
    bf16 pass gradients into fp32 (CPU vs GPU), so the losses should agree to fp32 rounding."""
    common = [*_AGREE_COMMON, "runtime.engine=streamed", "runtime.seqs_per_pass=8"]
    a = _train_section("0p1b", [*common, "runtime.grad_accum=host"], 30, "acc-host")
    b = _train_section("0p1b", [*common, "runtime.grad_accum=device"], 30, "acc-device")
    diffs = [abs(x - y) for x, y in zip(a["losses"], b["losses"])]
    return {"host": a["losses"], "device": b["losses"], "max_abs_diff": max(diffs)}


def section_p1b_resident(out: Path) -> dict:
    """Resident baseline for the 0p1b profile (no cap), to give the p1b section its ratio."""
    mb = int(os.environ.get("MB", "8"))  # 0p1b's micro-batch; a larger one uses the uncapped GPU better
    if not 1 <= mb <= 128 or 128 % mb:
        raise SystemExit(f"MB must divide the profile's 128 sequences per step, got {mb}")
    return _train_section("0p1b", ["runtime.engine=resident", "runtime.precision=bf16", f"optim.micro_batch_size={mb}",
                                   f"optim.grad_accum_steps={128 // mb}"], int(os.environ.get("STEPS", "4")), "p1b-res")


def section_summary(out: Path) -> dict:
    """Table of the sections already written to DIR, with ratios to the resident baseline."""
    rows = {p.stem: json.loads(p.read_text()) for p in sorted(out.glob("*.json")) if p.stem != "summary"}
    base = rows.get("resident", {}).get("tokens_per_s")
    print(f"{'section':<10} {'tok/s':>10} {'x resident':>10} {'MFU':>6} {'peak reserved':>14} {'peak RSS':>9}")
    for name, r in rows.items():
        if "tokens_per_s" not in r:
            continue
        ratio = r["tokens_per_s"] / base if base else float("nan")
        print(f"{name:<10} {r['tokens_per_s']:>10.0f} {ratio:>10.2f} {r.get('mfu', float('nan')):>6.1%} "
              f"{r.get('peak_reserved_gib', float('nan')):>12.2f} G {r.get('peak_rss_gib', float('nan')):>7.2f} G")
    return {"sections": sorted(rows)}


SECTIONS = {"summary": section_summary, "link": section_link, "resident": section_resident, "ramtorch": section_ramtorch,
            "streamed": section_streamed, "p1b": section_p1b, "p1b_resident": section_p1b_resident,
            "agree": section_agree, "accagree": section_accagree}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("section", choices=sorted(SECTIONS))
    ap.add_argument("--out", type=Path, default=Path("bench-out"))
    ap.add_argument("--tag", default="", help="suffix of the result file: DIR/<section><tag>.json")
    args = ap.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    if os.environ.get("SWITCH"):  # A/B: the interpreter's GIL switch interval in seconds (default 0.005)
        sys.setswitchinterval(float(os.environ["SWITCH"]))
    if os.environ.get("LOAD_SLOTS") == "0":  # A/B: a fresh device allocation per chunk load (before round 5)
        from ramgpt.engine import streamed

        make = streamed.offload_model_class

        def without_slots():
            cls = make()
            cls.use_load_slots = False
            return cls

        streamed.offload_model_class = without_slots
    if os.environ.get("SPLIT_PIECE"):  # A/B: elements the CPU joins, updates and splits at a time (split masters)
        from ramgpt.engine import planes

        planes.PIECE = int(os.environ["SPLIT_PIECE"])
    if os.environ.get("GPU_UPDATE_PIECE"):  # A/B: elements per piece of the GPU's share of the update
        from ramgpt.engine.chunked_adamw import ChunkedAdamW

        ChunkedAdamW.PIECE = int(os.environ["GPU_UPDATE_PIECE"])
    if os.environ.get("GPU_UPDATE_ORDERED") == "0":  # A/B: the GPU's share of AdamW not behind the compute stream
        from ramgpt.engine.chunked_adamw import ChunkedAdamW

        ChunkedAdamW.ORDERED = False
    if os.environ.get("GPU_UPDATE_LOOKAHEAD"):  # A/B: chunks the GPU queues ahead of the one it waits for
        from ramgpt.engine.chunked_adamw import ChunkedAdamW

        ChunkedAdamW.LOOKAHEAD = int(os.environ["GPU_UPDATE_LOOKAHEAD"])
    from ramgpt.engine.chunked_adamw import ChunkedAdamW

    ChunkedAdamW.TIMELINES = timelines = []  # each update's per-chunk times (side, chunk, began, done)
    from ramgpt.engine.compiled import BlockWarmUp

    BlockWarmUp.TIMINGS = warm = []  # the compile warm-up's marks
    from ramgpt.engine.streamed import StreamedEngine

    StreamedEngine.TIMINGS = setup = []  # the end of the streamed engine's set-up, step by step
    t_run = time.perf_counter()
    res = SECTIONS[args.section](args.out)
    if warm:  # seconds since this section began (train() starts a moment later)
        res["warm_up_marks"] = [(what, round(t - t_run, 2)) for what, t in warm]
    if setup:
        res["setup_marks"] = [(what, round(t - t_run, 2)) for what, t in setup]
    if timelines:  # the last two updates (the steps are warm by then)
        res["update_timelines"] = [{k: v for k, v in t.items() if k != "t0"} for t in timelines[-2:]]
    res["device"] = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
    res["torch"] = torch.__version__
    res["date"] = time.strftime("%Y-%m-%d")
    if args.section != "summary":
        (args.out / f"{args.section}{args.tag}.json").write_text(json.dumps(res, indent=2))
    short = {k: (round(v, 3) if isinstance(v, float) else v) for k, v in res.items() if not isinstance(v, list)}
    print(f"RESULT {args.section}{args.tag}: {json.dumps(short)}", flush=True)


if __name__ == "__main__":
    main()

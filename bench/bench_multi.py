"""Several GPUs (#13/#14): tokens/s of 1 and N GPUs in the same call, node host RAM, NCCL time, and
the first steps' losses of both, through the product's own command lines.

    python bench/bench_multi.py --gpus N [--profile rtx3050-6gb] [--steps 8] [--out DIR] [-- --set ...]

Runs ``ramgpt train`` as one process, then ``torchrun --nproc-per-node N -m ramgpt train`` (with
N = 1 as well when N > 1 is asked, so the distributed path's own cost shows), each for STEPS steps
on the embedded corpus, reading each run's metrics.jsonl. Every GPU is capped at the profile's VRAM
budget. Node host RAM: the peak over the run of the sum of every rank's private RSS plus the shared
training state (the ``node_ram_b`` metric); one process: its peak RSS (sampled every 50 ms).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def _peak_rss(proc: subprocess.Popen, box: dict) -> None:
    import psutil

    try:
        top = psutil.Process(proc.pid)
        while proc.poll() is None:
            procs = [top, *top.children(recursive=True)]
            total = 0
            for p in procs:
                try:
                    total += p.memory_info().rss
                except psutil.Error:
                    pass
            box["peak"] = max(box.get("peak", 0), total)
            time.sleep(0.05)
    except psutil.Error:
        pass


def run(label: str, head: list[str], args: list[str], out: Path) -> dict:
    run_dir = out / f"run-{label}"
    cmd = [*head, "train", *args, "--out-dir", str(run_dir)]
    env = {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    t0 = time.perf_counter()
    with open(out / f"log-{label}.txt", "w") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=out)
        box: dict = {}
        th = threading.Thread(target=_peak_rss, args=(proc, box), daemon=True)
        th.start()
        rc = proc.wait()
        th.join(timeout=1)
    rows = [json.loads(ln) for ln in (run_dir / "metrics.jsonl").read_text().splitlines() if ln.strip()] \
        if (run_dir / "metrics.jsonl").exists() else []
    timed = rows[1:-1] or rows[-1:]  # drop the first step (set-up) and the last (eval and save)
    med = lambda k: statistics.median(r[k] for r in timed if k in r) if any(k in r for r in timed) else None  # noqa: E731
    res = {
        "label": label, "rc": rc, "command": " ".join(cmd), "wall_s": time.perf_counter() - t0,
        "tokens_per_s": med("tokens_per_s"), "step_time_s": med("step_time_s"),
        "optimizer_exposed_s": med("optimizer_exposed_s"), "stall_pct": med("stall_pct"),
        "comm_s": med("comm_s"), "comm_pct": med("comm_pct"),
        "node_ram_gib": max((r.get("node_ram_b", 0) for r in rows), default=0) / 2**30 or None,
        "peak_rss_sum_gib": box.get("peak", 0) / 2**30,
        "vram_peak_gib_ranks": [v / 2**30 for v in (rows[-1].get("vram_peak_reserved_b_ranks") or [])] if rows
        else [],
        "vram_peak_gib": (rows[-1].get("vram_peak_reserved_b") or 0) / 2**30 if rows else None,
        "losses": [r["loss"] for r in rows],
    }
    print(f"RESULT {label}: " + json.dumps({k: (round(v, 4) if isinstance(v, float) else v) for k, v in res.items()
                                           if k not in ("losses", "command")}), flush=True)
    return res


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--gpus", type=int, default=2)
    ap.add_argument("--profile", default="rtx3050-6gb")
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--out", type=Path, default=Path("bench-out/multi"))
    ap.add_argument("--skip-single", action="store_true", help="no plain one-process run (measured elsewhere)")
    ap.add_argument("extra", nargs="*", help="more train options after --, e.g. --set runtime.seqs_per_pass=16")
    a = ap.parse_args()
    a.out.mkdir(parents=True, exist_ok=True)
    args = ["--profile", a.profile, "--max-steps", str(a.steps), "--no-tui", "--set", "data.source=embedded",
            "--set", "data.tokenizer=embedded", "--set", "logging.log_interval=1", "--set", "logging.eval_interval=100000",
            "--set", "logging.eval_batches=1", "--set", "checkpoint.save_final=false",
            "--set", "checkpoint.save_interval_steps=100000", "--set", "checkpoint.save_interval_minutes=null",
            "--force", *a.extra]
    py = [sys.executable, "-m"]
    results = [] if a.skip_single else [run("1proc", [*py, "ramgpt"], args, a.out)]
    for n in sorted({1, a.gpus}):
        head = [*py, "torch.distributed.run", "--standalone", f"--nproc-per-node={n}", "-m", "ramgpt"]
        results.append(run(f"torchrun{n}", head, args, a.out))
    base = results[0]["tokens_per_s"] if not a.skip_single else None
    for r in results:
        if base and r["tokens_per_s"]:
            r["x_one_process"] = r["tokens_per_s"] / base
    if len(results) > 1 and results[0]["losses"] and results[-1]["losses"]:
        n = min(len(results[0]["losses"]), len(results[-1]["losses"]))
        results[-1]["max_loss_diff_vs_1"] = max(abs(x - y) for x, y in zip(results[0]["losses"][:n],
                                                                             results[-1]["losses"][:n]))
    (a.out / "multi.json").write_text(json.dumps(results, indent=2))
    print(f"{'run':<12} {'tok/s':>9} {'x 1 proc':>8} {'node RAM':>9} {'comm %':>7} {'rc':>3}")
    for r in results:
        ram = r["node_ram_gib"] or r["peak_rss_sum_gib"]
        print(f"{r['label']:<12} {r['tokens_per_s'] or 0:>9.0f} {r.get('x_one_process', 0):>8.2f} {ram:>7.2f} G "
              f"{r['comm_pct'] or 0:>6.1f}% {r['rc']:>3}")


if __name__ == "__main__":
    main()

"""Where the streamed 1b step spends its time: one section per process, results as JSON.

    python bench/perf.py SECTION --out DIR

  ceiling   the plain resident GPT-2 of bench/plain_gpt2.py, 1b shape, per-block checkpointing,
            bf16 autocast, fwd+bwd only (env MB micro-batch, default 8; COMPILE=1 compiles each
            block; CKPT=0 no checkpointing)
  model     ramgpt's own GPT on the same terms (env MB, LOSS_CHUNK, COMPILE)
  optim     the CPU optimizer step of the 1b, piece by piece (clip, unscale, fused AdamW, refresh
            of the bf16 copies), at THREADS (default: all cores) threads
  pin       pinning 2.2 GB of bf16 copies: one pinned allocation per tensor vs one arena
  trace     one optimizer step of the streamed 1b (rtx3050-6gb, 16 seqs per pass, env PASSES
            passes, default 4) under torch.profiler; writes DIR/trace-step.json.gz, the compute
            stream's busy share and its idle gaps by range and by cause

Each section prints ``RESULT <section>: {json}`` and writes DIR/<section><tag>.json.
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

L, NH, C, V, T = 36, 24, 1536, 50304, 1024


def _sets() -> list[str]:
    """env SETS: extra --set overrides for the profile (e.g. a smaller model for a CPU dry run)."""
    return os.environ.get("SETS", "").split()


def _kernel_table(prof, n: int = 18) -> list[dict]:
    rows = []
    for e in sorted(prof.key_averages(), key=lambda e: -getattr(e, "device_time_total", 0))[:n]:
        rows.append({"name": e.key[:90], "cuda_ms": round(getattr(e, "device_time_total", 0) / 1e3, 2),
                     "count": e.count})
    return rows


def _time_fwd_bwd(model, mb: int, steps: int = 6, profile: bool = False) -> dict:
    def one():
        x = torch.randint(0, V, (mb, T), device="cuda")
        y = torch.randint(0, V, (mb, T), device="cuda")
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = model(x, y)
        loss.backward()

    for _ in range(2):
        one()
    torch.cuda.synchronize()
    times = []
    for _ in range(steps):
        t = time.perf_counter()
        one()
        torch.cuda.synchronize()
        times.append(time.perf_counter() - t)
    st = statistics.median(times)
    out = {"mb": mb, "s_per_microbatch": st, "tokens_per_s": mb * T / st,
           "peak_alloc_gib": torch.cuda.max_memory_allocated() / 2**30}
    if profile:
        from torch.profiler import ProfilerActivity
        from torch.profiler import profile as tprof

        with tprof(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            one()
            torch.cuda.synchronize()
        out["kernels"] = _kernel_table(prof)
    return out


def section_ceiling(out: Path) -> dict:
    from plain_gpt2 import PlainGPT2

    mb = int(os.environ.get("MB", "8"))
    torch.manual_seed(0)
    m = PlainGPT2(L, NH, C, V, T, ckpt=os.environ.get("CKPT", "1") == "1").cuda()
    if os.environ.get("COMPILE") == "1":
        for i, b in enumerate(m.h):
            m.h[i] = torch.compile(b)
    return _time_fwd_bwd(m, mb, profile=os.environ.get("PROFILE") == "1")


def section_model(out: Path) -> dict:
    from ramgpt.config import load_profile
    from ramgpt.model import GPT

    mb = int(os.environ.get("MB", "8"))
    prof = load_profile("1b")
    torch.manual_seed(0)
    m = GPT(prof.model, loss_chunk_tokens=int(os.environ.get("LOSS_CHUNK", "2048"))).cuda()
    m.gradient_checkpointing = True
    return _time_fwd_bwd(m, mb, profile=os.environ.get("PROFILE") == "1")


def section_optim(out: Path) -> dict:
    """The streamed engine's optimizer step, piece by piece, on 1b-shaped fp32 tensors."""
    from ramgpt.config import load_profile
    from ramgpt.model import GPT

    threads = int(os.environ.get("THREADS", str(os.cpu_count())))
    torch.set_num_threads(threads)
    prof = load_profile("1b", _sets())
    t0 = time.perf_counter()
    torch.manual_seed(0)
    model = GPT(prof.model)
    build_s = time.perf_counter() - t0
    with torch.device("meta"):
        GPT(prof.model)
    t0 = time.perf_counter()
    with torch.device("meta"):
        meta_model = GPT(prof.model)
    meta_s = time.perf_counter() - t0
    params = [p for g in model.param_groups(0.0) for p in g["params"]]
    for p in params:
        p.grad = torch.randn_like(p) * 1e-3
    opt = torch.optim.AdamW(model.param_groups(0.1), lr=1e-4, fused=True)
    grads = [p.grad for p in params]
    res: dict = {"threads": threads, "build_fp32_model_s": build_s, "build_meta_model_s": meta_s,
                 "n_params": sum(p.numel() for p in params)}
    del meta_model

    def timed(name, fn, reps=3):
        fn()
        ts = []
        for _ in range(reps):
            t = time.perf_counter()
            fn()
            ts.append(time.perf_counter() - t)
        res[name] = statistics.median(ts)

    timed("norm_foreach_s", lambda: torch.linalg.vector_norm(torch.stack(torch._foreach_norm(grads))))
    timed("foreach_mul_s", lambda: torch._foreach_mul_(grads, 1.0))
    timed("clip_grad_norm_s", lambda: torch.nn.utils.clip_grad_norm_(params, 1e9, foreach=True))
    timed("adamw_fused_s", opt.step)
    gs = torch.tensor(1.0)
    opt2 = torch.optim.AdamW(model.param_groups(0.1), lr=1e-4, fused=True)

    def step_with_scale():
        opt2.step()  # grad_scale is only accepted through the GradScaler path; time plain

    timed("adamw_fused_s_again", step_with_scale)
    del gs
    copies = [torch.empty(p.shape, dtype=torch.bfloat16).pin_memory() if torch.cuda.is_available()
              else torch.empty(p.shape, dtype=torch.bfloat16) for p in params]
    timed("refresh_bf16_s", lambda: [c.copy_(p) for c, p in zip(copies, params)])
    timed("refresh_bf16_foreach_s", lambda: torch._foreach_copy_(copies, [p.detach() for p in params]))
    if threads > 4:  # the same step on half the cores (what is left if copy/worker threads take the rest)
        torch.set_num_threads(threads // 2)
        timed("adamw_fused_half_threads_s", opt.step)
        torch.set_num_threads(threads)
    # per-chunk AdamW (what overlapping per chunk would run): one optimizer per block-sized group
    blocks = [list(b.parameters()) for b in model.h]
    opts = [torch.optim.AdamW(ps, lr=1e-4, fused=True) for ps in blocks]
    for o in opts:
        o.step()
    t = time.perf_counter()
    for o in opts:
        o.step()
    res["adamw_per_block_s"] = (time.perf_counter() - t) / len(opts)
    return res


def section_pin(out: Path) -> dict:
    import psutil

    from ramgpt.config import load_profile
    from ramgpt.model import GPT

    prof = load_profile("1b", _sets())
    with torch.device("meta"):
        shapes = [p.shape for p in GPT(prof.model).parameters()]
    proc = psutil.Process()
    nbytes = sum(int(torch.Size(s).numel()) * 2 for s in shapes)
    r0 = proc.memory_info().rss
    t = time.perf_counter()
    per = [torch.empty(s, dtype=torch.bfloat16, pin_memory=True) for s in shapes]
    per_s = time.perf_counter() - t
    r1 = proc.memory_info().rss
    del per
    torch.cuda.synchronize()
    t = time.perf_counter()
    arena = torch.empty(nbytes, dtype=torch.uint8)
    rc = torch.cuda.cudart().cudaHostRegister(arena.data_ptr(), nbytes, 0)
    reg_s = time.perf_counter() - t
    r2 = proc.memory_info().rss
    dev = torch.empty(nbytes // 8, dtype=torch.uint8, device="cuda")
    dev.copy_(arena[: nbytes // 8], non_blocking=True)
    torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(4):
        dev.copy_(arena[: nbytes // 8], non_blocking=True)
    torch.cuda.synchronize()
    gbps = 4 * (nbytes // 8) / (time.perf_counter() - t) / 1e9
    return {"tensor_bytes": nbytes, "per_tensor_pin_s": per_s, "per_tensor_rss_delta": r1 - r0,
            "register_rc": int(rc), "arena_register_s": reg_s, "arena_rss_delta_after_free": r2 - r1,
            "arena_h2d_gbps": gbps}


def section_trace(out: Path) -> dict:
    """Four optimizer steps of PASSES passes each (16 seqs per pass) of the streamed 1b; the last is
    traced (its first pass overlaps the previous step's optimizer). Writes DIR/trace-step.json.gz."""
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as tprof

    from ramgpt.config import load_profile
    from ramgpt.engine import build_engine
    from ramgpt.model import build_gpt
    from ramgpt.placement import decide
    from ramgpt.probe import probe_machine

    prof = load_profile("rtx3050-6gb", ["runtime.seqs_per_pass=16"])
    torch.manual_seed(0)
    t0 = time.perf_counter()
    model = build_gpt(prof.model, prof.runtime.loss_chunk_tokens)
    build_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    eng = build_engine(model, decide(prof, probe_machine()), prof.optim, prof.runtime)
    engine_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    warning = eng.warm_up(T)  # runtime.compile_blocks: compile before the timed steps, as train() does
    warm_up_s = time.perf_counter() - t0
    spp = eng.seqs_per_pass
    pinned_ok = all(t.is_pinned() for st in eng.om._state for t in st.tensors.values())
    in_arena = all(eng.arena.contains(t) for st in eng.om._state for t in st.tensors.values())

    passes = int(os.environ.get("PASSES", "4"))

    def batch():
        return torch.randint(0, V, (passes * spp, T)), torch.randint(0, V, (passes * spp, T))

    steps = []
    for _ in range(3):
        t = time.perf_counter()
        rep = eng.train_step(*batch(), 1e-4)
        steps.append(time.perf_counter() - t)
    c0 = eng.counters()
    with tprof(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as p:
        t = time.perf_counter()
        eng.train_step(*batch(), 1e-4)
        torch.cuda.synchronize()
        traced_s = time.perf_counter() - t
    c1 = eng.counters()
    path = out / "trace-step.json"
    p.export_chrome_trace(str(path))
    tr = json.loads(path.read_text())
    path.unlink()
    ev = [e for e in tr.get("traceEvents", []) if e.get("ph") == "X"]
    kern = sorted((e for e in ev if e.get("cat") in ("kernel", "gpu_memcpy", "gpu_memset")), key=lambda e: e["ts"])
    streams: dict = {}
    for e in kern:
        streams.setdefault(e.get("args", {}).get("stream"), []).append(e)
    comp_id = max(streams, key=lambda k: sum(e["dur"] for e in streams[k] if e.get("cat") == "kernel"))
    comp = streams[comp_id]
    span_ms = (comp[-1]["ts"] + comp[-1]["dur"] - comp[0]["ts"]) / 1e3
    busy_ms = sum(e["dur"] for e in comp) / 1e3
    gaps = sorted(((b["ts"] - a["ts"] - a["dur"]) / 1e3 for a, b in zip(comp, comp[1:])), reverse=True)
    # where the compute stream idled: each gap over 0.2 ms goes to the F<i>/B<i> range (its GPU-side
    # span) of the kernel after it; and how busy the copy engines were
    ann = sorted(((e["ts"], e["ts"] + e["dur"], e["name"]) for e in ev if e.get("cat") == "gpu_user_annotation"
                  and e["name"][:1] in "FB" and e["name"][1:2].isdigit()), key=lambda a: a[0])
    by_range: dict = {}
    for a, b in zip(comp, comp[1:]):
        g = (b["ts"] - a["ts"] - a["dur"]) / 1e3
        if g <= 0.2:
            continue
        label = next((nm.split()[0] for lo, hi, nm in ann if lo <= b["ts"] <= hi), "other")
        key = label[0] if label != "other" else "other"
        by_range.setdefault(key, [0.0, 0])
        by_range[key][0] += g
        by_range[key][1] += 1
        by_range.setdefault("at " + label, [0.0, 0])
        by_range["at " + label][0] += g
        by_range["at " + label][1] += 1
    top = dict(sorted(by_range.items(), key=lambda kv: -kv[1][0])[:16])
    # why the compute stream idled: the kernel after a gap was launched after the gap began (the
    # launching thread was late: what was it doing?) or before it (the GPU waited on an event)
    launch = {e["args"]["correlation"]: e for e in ev if e.get("cat") == "cuda_runtime"
              and "correlation" in e.get("args", {})}
    cpu_ranges: dict = {}
    for e in ev:
        if e.get("cat") == "user_annotation":
            cpu_ranges.setdefault(e.get("tid"), []).append((e["ts"], e["ts"] + e["dur"], e["name"]))
    why: dict = {}
    for a, b in zip(comp, comp[1:]):
        end = a["ts"] + a["dur"]
        g = b["ts"] - end
        if g <= 20:
            continue
        la = launch.get(b.get("args", {}).get("correlation"))
        late = max(0.0, min(g, la["ts"] - end)) if la else 0.0
        if late > 0:
            inside = [r for r in cpu_ranges.get(la.get("tid"), []) if r[0] <= end <= r[1]]
            name = min(inside, key=lambda r: r[1] - r[0])[2] if inside else f"no range (thread {la.get('tid')})"
            kind = "late: " + ("waiting for a chunk" if name.startswith("wait") else
                               name.split()[0][:1] + " chunk code" if name[:1] in "FB" and name[1:2].isdigit()
                               else name[:40])
            why[kind] = why.get(kind, 0.0) + late / 1e3
        if g - late > 0:
            why["waited on an event"] = why.get("waited on an event", 0.0) + (g - late) / 1e3
    why = dict(sorted(why.items(), key=lambda kv: -kv[1])[:12])
    copies = {}
    for e in kern:
        if e.get("cat") == "gpu_memcpy":
            kind = "h2d" if "HtoD" in e["name"] else "d2h" if "DtoH" in e["name"] else "d2d"
            copies[kind] = copies.get(kind, 0.0) + e["dur"] / 1e3
    alloc = torch.cuda.memory_stats()
    with gzip.open(out / "trace-step.json.gz", "wt") as f:
        json.dump(tr, f)
    counters = {k: c1[k] - c0.get(k, 0) for k in c1 if k.endswith("_total")}
    eng.close()
    return {"build_model_s": build_s, "build_engine_s": engine_s, "pinned_ok": pinned_ok, "in_arena": in_arena,
            "pinned_gib": c1["pinned_b"] / 2**30, "step_s": steps, "grad_norm": rep.grad_norm, "traced_step_s": traced_s,
            "compute_span_ms": span_ms, "compute_busy_ms": busy_ms, "gaps_over_1ms": sum(g for g in gaps if g > 1),
            "largest_gaps_ms": gaps[:8], "gaps_over_0p2ms_by_range_ms_n": top, "gap_ms_by_cause": why, "copy_busy_ms": copies,
            "alloc_retries": alloc.get("num_alloc_retries", 0), "counters": counters, "spp": spp,
            "compiled_blocks": eng.compile_blocks, "warm_up_s": warm_up_s, "warm_up_warning": warning}


SECTIONS = {"ceiling": section_ceiling, "model": section_model, "optim": section_optim, "pin": section_pin,
            "trace": section_trace}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("section", choices=sorted(SECTIONS))
    ap.add_argument("--out", type=Path, default=Path("bench-out"))
    ap.add_argument("--tag", default="")
    args = ap.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    res = SECTIONS[args.section](args.out)
    res.update(device=torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
               torch=torch.__version__, date=time.strftime("%Y-%m-%d"))
    (args.out / f"{args.section}{args.tag}.json").write_text(json.dumps(res, indent=2))
    short = {k: (round(v, 4) if isinstance(v, float) else v) for k, v in res.items() if k != "kernels"}
    print(f"RESULT {args.section}{args.tag}: {json.dumps(short)}", flush=True)
    for k in res.get("kernels", []):
        print(f"   {k['cuda_ms']:9.2f} ms  x{k['count']:<5} {k['name']}")


if __name__ == "__main__":
    main()

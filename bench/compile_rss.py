"""Where a cold ``torch.compile`` of the blocks leaves its memory: one process runs the 1b's block
warm-up (:class:`ramgpt.engine.compiled.BlockWarmUp`, pass sizes 16 and 1, as `ramgpt train
--profile rtx3050-6gb` compiles them) and reports its RSS before, after and at peak, the warm-up's
time, the compiled graph's fwd+bwd time, and a census of what the compiler left alive.

    python bench/compile_rss.py --out DIR --tag TAG [--set inductor.key=value ...]

Run each variant in a process of its own with its own TORCHINDUCTOR_CACHE_DIR / TRITON_CACHE_DIR
(empty for a cold run, a previous run's for a warm one); bench/gpu_round11.sh does. --set sets
``torch._inductor.config`` entries (dotted for the triton sub-config, e.g. triton.autotune_pointwise=0)
before compiling. On a machine without CUDA it runs on the CPU (a smoke test of the script).
"""

from __future__ import annotations

import argparse
import collections
import gc
import json
import os
import resource
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def rss_gib() -> float:
    import psutil

    return psutil.Process().memory_info().rss / 2**30


def peak_gib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux


def census(top: int = 12) -> dict:
    """Objects alive by type (the compiler's leftovers), and the triton autotuners' launchers."""
    gc.collect()
    counts: collections.Counter = collections.Counter()
    launchers = configs = tuners = 0
    for o in gc.get_objects():
        name = f"{getattr(type(o), '__module__', '?')}.{type(o).__name__}"
        counts[name] += 1
        if type(o).__name__ == "CachingAutotuner":
            tuners += 1
            launchers += len(getattr(o, "launchers", []) or [])
            configs += len(getattr(o, "configs", []) or [])
    return {"objects": sum(counts.values()), "top": counts.most_common(top),
            "autotuners": tuners, "launchers": launchers, "configs": configs}


def set_inductor(items: list[str]) -> None:
    import torch._inductor.config as ic

    for item in items:
        key, value = item.split("=", 1)
        obj = ic
        *path, leaf = key.split(".")
        for p in path:
            obj = getattr(obj, p)
        old = getattr(obj, leaf)
        setattr(obj, leaf, type(old)(int(value)) if isinstance(old, bool) else type(old)(value))


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--tag", required=True)
    ap.add_argument("--set", action="append", default=[])
    ap.add_argument("--profile", default="rtx3050-6gb")
    ap.add_argument("--reps", type=int, default=10)
    a = ap.parse_args()

    t0 = time.perf_counter()
    import torch

    from ramgpt.config import load_profile
    from ramgpt.engine.base import release_freed_heap
    from ramgpt.engine.compiled import BlockWarmUp

    cuda = torch.cuda.is_available()
    dev = "cuda" if cuda else "cpu"
    prof = load_profile(a.profile)
    cfg = prof.model
    if not cuda:  # smoke test: a small block
        cfg = cfg.model_copy(update={"n_embd": 64, "n_head": 2})
    if cuda:
        torch.cuda.init()
        torch.empty(1, device="cuda")
    set_inductor(a.set)
    res: dict = {"tag": a.tag, "sets": a.set, "torch": torch.__version__, "device": dev,
                 "env": {k: v for k, v in os.environ.items() if k.startswith(("TORCHINDUCTOR", "TRITON", "RAMGPT"))},
                 "imported_s": round(time.perf_counter() - t0, 2), "rss_before": rss_gib(), "peak_before": peak_gib()}
    seq = prof.data.seq_len if cuda else 32
    dtype = torch.bfloat16 if cuda else torch.float32
    warm = BlockWarmUp(cfg, dev, dtype, seq, [16 if cuda else 2], [1])
    BlockWarmUp.TIMINGS = marks = []
    t1 = time.perf_counter()
    warm.start()
    res["warning"] = warm.result()
    res["warm_up_s"] = round(time.perf_counter() - t1, 2)
    res["marks"] = [(w, round(t - t1, 2)) for w, t in marks]
    if cuda:
        torch.cuda.empty_cache()
    res["rss_after"] = rss_gib()
    gc.collect()
    release_freed_heap()
    res["rss_after_trim"] = rss_gib()
    res["peak_after"] = peak_gib()
    res["census"] = census()

    # the compiled graph's speed: the recompute with its backward, as a training pass runs it
    from ramgpt.engine.compiled import CompiledBlocks
    from ramgpt.model import Block

    body = CompiledBlocks()
    with torch.no_grad():
        with torch.device("meta"):
            block = Block(cfg)
        block.to_empty(device=dev)
        weights = []
        for mod in block.modules():
            for leaf, p in list(mod._parameters.items()):
                t = p.detach().to(dtype).normal_(0.0, 0.02).requires_grad_(True)
                mod._parameters[leaf] = t
                weights.append(t)
    x = torch.randn(16 if cuda else 2, seq, cfg.n_embd, device=dev, dtype=dtype, requires_grad=True)
    ctx = torch.autocast(dev, dtype=dtype) if cuda else torch.autocast("cpu", enabled=False)

    def once():
        with ctx:
            out = body(block, x)
        torch.autograd.grad([out], [x, *weights], grad_outputs=[torch.ones_like(out)])

    once()
    if cuda:
        torch.cuda.synchronize()
    t2 = time.perf_counter()
    for _ in range(a.reps):
        once()
    if cuda:
        torch.cuda.synchronize()
    res["fwd_bwd_ms"] = round((time.perf_counter() - t2) / a.reps * 1e3, 3)
    res["rss_end"] = rss_gib()
    res["peak_end"] = peak_gib()
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"compile_rss_{a.tag}.json").write_text(json.dumps(res, indent=1, default=str))
    print("RESULT", a.tag, json.dumps({k: (round(v, 3) if isinstance(v, float) else v) for k, v in res.items()
                                       if k not in ("census", "marks", "env")}))
    print("CENSUS", a.tag, res["census"]["autotuners"], res["census"]["launchers"], res["census"]["configs"],
          res["census"]["objects"], res["census"]["top"][:6])
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""The CPU's AdamW: whole fp32 masters (torch's fused kernel) against split masters, through the
engine's own code (ChunkedAdamW._step_split) with the C kernel (engine/native.py) and with
torch's pieces (its fallback). Prints one RESULT line of JSON; G params/s and the ratio to whole
masters timed in the same process.

    python bench/adamw_kernel.py [--params 440e6] [--threads 16 8] [--reps 3] [--out DIR]
"""

from __future__ import annotations

import argparse
import datetime
import json
import time
from pathlib import Path

import torch
import torch.nn as nn

from ramgpt.engine import native
from ramgpt.engine.chunked_adamw import ChunkedAdamW, new_adamw_state
from ramgpt.engine.planes import MasterPlanes, split


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--params", type=float, default=440e6, help="parameters updated (the 1b's CPU share at 0.6)")
    ap.add_argument("--tensor", type=int, default=2048 * 8192, help="elements per tensor (an MLP matrix of the 1b)")
    ap.add_argument("--threads", type=int, nargs="+", default=[torch.get_num_threads()])
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--out", type=Path, default=None)
    a = ap.parse_args()
    t0 = time.perf_counter()
    kernel = native.load()
    load_s = time.perf_counter() - t0
    count = max(1, round(a.params / a.tensor))
    gen = torch.Generator().manual_seed(0)
    params = [nn.Parameter(torch.randn(a.tensor, generator=gen) * 0.02) for _ in range(count)]
    for p in params:
        p.grad = torch.randn(a.tensor, generator=gen) * 1e-3
    opt = torch.optim.AdamW(params, lr=1e-3, weight_decay=0.1, betas=(0.9, 0.95), fused=True)
    adam = ChunkedAdamW(opt, [params])
    states = []
    for p in params:
        opt.state[p].update(new_adamw_state(p))
        opt.state[p]["step"].fill_(10)
        states.append(opt.state[p])
    planes = MasterPlanes()
    for p in params:
        hi, lo = torch.empty(a.tensor, dtype=torch.int16), torch.empty(a.tensor, dtype=torch.int16)
        split(p.data, hi, lo, torch.empty(a.tensor, dtype=torch.int32))
        planes._of[id(p)] = (hi, lo)
    adam.planes = planes
    g = opt.param_groups[0]
    gs, fi = torch.tensor(0.8), torch.zeros(())
    n = count * a.tensor

    def whole() -> None:
        torch._fused_adamw_(params, [p.grad for p in params], [s["exp_avg"] for s in states],
                            [s["exp_avg_sq"] for s in states], [], [s["step"] for s in states], amsgrad=False,
                            lr=1e-3, beta1=0.9, beta2=0.95, weight_decay=0.1, eps=1e-8, maximize=False,
                            grad_scale=gs, found_inf=fi)

    def split_path(use_native: bool):
        def f() -> None:
            adam.native = use_native
            adam._step_split(g, params, states, 1e-3, gs, fi)
        return f

    rows = {}
    for th in a.threads:
        torch.set_num_threads(th)
        variants = {"whole": whole, "torch_pieces": split_path(False)}
        if kernel is not None:
            variants["native"] = split_path(True)
        for name, f in variants.items():
            f()  # warm: pages touched, kernel loaded
            ts = []
            for _ in range(a.reps):
                t = time.perf_counter()
                f()
                ts.append(time.perf_counter() - t)
            rows[f"{name}_t{th}"] = {"s": round(min(ts), 4), "gparams_per_s": round(n / min(ts) / 1e9, 3)}
        for name in variants:
            if name != "whole":
                rows[f"{name}_t{th}"]["vs_whole"] = round(rows[f"whole_t{th}"]["s"] / rows[f"{name}_t{th}"]["s"], 3)
    res = {"params": n, "tensors": count, "kernel": None if kernel is None else str(kernel.path.name),
           "form": None if kernel is None else kernel.form, "why_not": native.why_not(), "load_s": round(load_s, 3),
           "cpu_capability": torch.backends.cpu.get_cpu_capability(), "torch": torch.__version__,
           "date": datetime.date.today().isoformat(), "rows": rows}
    print("RESULT adamw_kernel:", json.dumps(res))
    if a.out is not None:
        a.out.mkdir(parents=True, exist_ok=True)
        (a.out / "adamw_kernel.json").write_text(json.dumps(res, indent=1))


if __name__ == "__main__":
    main()

"""Start-up cost on any machine (no GPU needed): building the 1b and its streamed engine's fp32
masters, the model built whole then copied into the engine's arena (``whole``) against built on
the meta device and initialised in the arena (``arena``), alternating, in fresh processes.

    python bench/build_time.py [ROUNDS]
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

_CHILD = """
import json, sys, time, torch
sys.path.insert(0, {root!r})
from ramgpt.config import load_profile
from ramgpt.engine.streamed import StreamedEngine
from ramgpt.model import build_gpt
prof = load_profile("1b")
torch.manual_seed(0)
t0 = time.perf_counter()
model = build_gpt(prof.model, materialize={whole})
t1 = time.perf_counter()
eng = StreamedEngine(model, device="cpu", precision="bf16", optim_cfg=prof.optim, seqs_per_pass=1, window=3)
t2 = time.perf_counter()
print(json.dumps({{"build_s": t1 - t0, "engine_s": t2 - t1, "total_s": t2 - t0,
                  "std_of_a_weight": float(eng.params[5].std())}}))
eng.close()
"""


def main() -> None:
    rounds = int(sys.argv[1]) if len(sys.argv) > 1 else 2
    root = str(Path(__file__).resolve().parent.parent)
    rows = []
    for _ in range(rounds):
        for label, whole in (("whole", True), ("arena", False)):
            out = subprocess.run([sys.executable, "-c", _CHILD.format(root=root, whole=whole)], check=True,
                                 capture_output=True, text=True).stdout
            rows.append({"how": label, **json.loads(out.strip().splitlines()[-1])})
            print(json.dumps(rows[-1]), flush=True)


if __name__ == "__main__":
    main()

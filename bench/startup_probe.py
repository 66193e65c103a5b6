"""Where the set-up's time goes before the engine places the weights, in a fresh process (a
benchmark probe, not part of training):  python3 bench/startup_probe.py OUT.json

Times, in the order ``ramgpt train`` meets them: importing torch, CUDA's first use (what
``probe_machine`` and the VRAM budget do), importing ramgpt's training modules, building the 1b on
the meta device, ``compiled_block_body()`` (torch.compile's imports), and capturing the RNG
states. Run it twice: the second run has the files in the page cache. ``python3 -X importtime``
on the same script shows which modules the time goes to.
"""

from __future__ import annotations

import json
import sys
import time

marks: list[tuple[str, float]] = []
t0 = time.perf_counter()


def mark(what: str) -> None:
    marks.append((what, round(time.perf_counter() - t0, 3)))


import torch  # noqa: E402

mark("import torch")
if torch.cuda.is_available():
    torch.cuda.init()
    torch.cuda.mem_get_info()
mark("cuda first use")
from ramgpt.config import load_profile  # noqa: E402
from ramgpt.model import build_gpt  # noqa: E402
from ramgpt.train import setup  # noqa: E402,F401

mark("import ramgpt.train")
profile = load_profile("rtx3050-6gb")
model = build_gpt(profile.model, profile.runtime.loss_chunk_tokens, materialize=False)
mark("build the 1b on meta")
from ramgpt.engine.compiled import compiled_block_body  # noqa: E402

compiled_block_body()
mark("compiled_block_body (torch.compile's imports)")
import torch._inductor.compile_fx  # noqa: E402,F401

mark("import torch._inductor.compile_fx")
from ramgpt import checkpoint as ckpt  # noqa: E402

ckpt.capture_rng_state()
mark("capture_rng_state")
json.dump({"marks": marks, "torch": torch.__version__}, open(sys.argv[1], "w"), indent=1)
print(json.dumps(marks))

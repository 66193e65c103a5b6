"""ramgpt.doctor_child: the doctor's child program reports torch, CUDA, the matmul rate and every
package's import as JSON, and never crashes on a package that fails to import."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from ramgpt import doctor_child as C


def test_parse_args():
    assert C.parse_args(["-1", "json,wandb"]) == (-1, ["json", "wandb"], None)
    assert C.parse_args(["268435456", "torch", "--matmul", "8192,1536,6144"]) == (268435456, ["torch"], (8192, 1536, 6144))
    assert C.parse_args(["0", ""]) == (0, [], None)


def test_packages_ok_and_broken(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    # a package that raises something other than ImportError while importing
    (tmp_path / "ramgpt_exits_on_import.py").write_text("raise SystemExit('refusing to load\\nsecond line')\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    out = C.run(-1, ["json", "ramgpt_no_such_package", "ramgpt_exits_on_import"])
    assert out["torch"] is None and "torch" not in out["packages"]  # pin < 0: torch left alone
    assert out["packages"]["json"]["ok"] is True
    assert out["packages"]["ramgpt_no_such_package"] == {
        "ok": False,
        "error": "ModuleNotFoundError: No module named 'ramgpt_no_such_package'",
    }
    assert out["packages"]["ramgpt_exits_on_import"] == {"ok": False, "error": "SystemExit: refusing to load"}


@pytest.mark.parametrize("writes", [False, True])
def test_bytecode_cached_says_whether_a_module_loaded_from_bytecode(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                                   writes: bool):
    import importlib

    name = f"ramgpt_bytecode_probe_{int(writes)}"
    (tmp_path / f"{name}.py").write_text("X = 1\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setattr(sys, "pycache_prefix", str(tmp_path / "pycache"))  # where this import looks and writes
    monkeypatch.setattr(sys, "dont_write_bytecode", not writes)
    importlib.invalidate_caches()
    mod = importlib.import_module(name)
    try:
        got = C.bytecode_cached(mod)
    finally:
        sys.modules.pop(name, None)
    assert got == {"cached": writes, "writes": writes, "prefix": str(tmp_path / "pycache")}
    assert (tmp_path / "__pycache__").exists() is False  # the prefix, not beside the file
    sourceless = type("M", (), {"__file__": str(tmp_path / "only.pyc")})
    assert C.bytecode_cached(sourceless)["cached"] is True


def test_torch_section_and_a_cpu_matmul():
    import torch

    out = C.run(0, ["torch"], matmul=(4096, 32, 64))
    t = out["torch"]
    assert out["packages"]["torch"] == {"ok": True, "version": torch.__version__}
    assert t["version"] == torch.__version__ and t["cuda"] == torch.cuda.is_available()
    mm = t["matmul"]
    assert mm["tflops"] > 0 and mm["dtype"] in ("fp32", "bf16", "fp16")
    if not t["cuda"]:
        assert tuple(mm["shape"]) == (1024, 32, 64)  # capped on the CPU (ramgpt.memory.report.CPU_MATMUL_CAP)
        assert "pin_ok" not in t  # nothing to pin for
    assert t["adamw"]["params_per_s"] > 0 and t["adamw"]["threads"] == torch.get_num_threads()
    assert t["bytecode"] == C.bytecode_cached(torch)


@pytest.mark.slow
def test_runs_as_a_module_and_prints_one_json_line():
    import ramgpt

    root = str(Path(ramgpt.__file__).resolve().parent.parent)
    env = {**os.environ, "PYTHONPATH": root}
    p = subprocess.run([sys.executable, "-m", "ramgpt.doctor_child", "-1", "json,ramgpt_no_such_package"],
                       capture_output=True, text=True, timeout=60, env=env)
    assert p.returncode == 0, p.stderr
    line = p.stdout.strip().splitlines()[-1]
    assert line.startswith(C.MARKER)
    d = json.loads(line[len(C.MARKER):])
    assert d["packages"]["json"]["ok"] and not d["packages"]["ramgpt_no_such_package"]["ok"]

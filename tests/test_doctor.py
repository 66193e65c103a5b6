"""ramgpt doctor: runs here (no GPU, no network), never crashes on a broken probe, never prints
secrets, and exits non-zero only when a blocking check fails."""

from __future__ import annotations

import json
import subprocess
import sys
import time

import pytest
from rich.console import Console
from typer.testing import CliRunner

from ramgpt import doctor as D
from ramgpt import probe
from ramgpt.cli import app
from ramgpt.config import load_profile
from ramgpt.render import render_doctor

SECRET_HF = "hf_secretvalue123"
SECRET_WB = "wandbsecretvalue4567890"


@pytest.fixture
def secrets(monkeypatch):
    monkeypatch.setenv("HF_TOKEN", SECRET_HF)
    monkeypatch.setenv("WANDB_API_KEY", SECRET_WB)


class _FakeChild:
    """Canned torch/CUDA/import results, so the fast tests start no process."""

    def __init__(self, pin_bytes: int, matmul=None, cuda: bool = False, broken: tuple[str, ...] = (), tflops=None,
                 bytecode=None, cpu_kernel=None):
        self.matmul = matmul
        torch = {"version": "2.99.0", "cuda_build": "12.6" if cuda else None, "cuda": cuda,
                 "bytecode": bytecode or {"cached": True, "writes": True, "prefix": None},
                 "cpu_kernel": cpu_kernel or {"ok": True, "form": 0, "path": "/c/adamw_planes-x.so"}}
        if cuda:
            torch.update(
                name="NVIDIA GeForce RTX 3050",
                capability=[8, 6],
                total=6 * 2**30,
                free=5.5 * 2**30,
                bf16=True,
                pin_ok=True,
                pin_s=0.4,
                h2d_gbps=11.5,
                d2h_gbps=12.1,
            )
        if matmul is not None and tflops is not None:  # what ramgpt.probe.MatmulRate.to_dict() gives
            dev = "cuda:0" if cuda else "cpu"
            torch["matmul"] = {"device": dev, "device_name": "NVIDIA GeForce RTX 3050" if cuda else "CPU",
                               "dtype": "bf16" if cuda else "fp32", "shape": list(matmul), "tflops": tflops, "seconds": 0.3}
        pk = {n: {"ok": True, "version": "1.0"} for n in D.PACKAGES}
        for n in broken:
            pk[n] = {"ok": False, "error": f"ModuleNotFoundError: No module named '{n}'"}
        if "torch" in broken:
            torch = None
        self._r = {"packages": pk, "torch": torch}

    def result(self):
        return self._r

    def kill(self):
        pass


def _fake(monkeypatch, **kw):
    made = []
    # the estimate's machine (NVML) agrees with the fake child
    gpus = (probe.Gpu(0, "NVIDIA GeForce RTX 3050", 6 * 2**30, True, (8, 6), int(5.5 * 2**30)),) if kw.get("cuda") else ()
    monkeypatch.setattr(probe, "nvml_gpus", lambda: gpus)
    monkeypatch.setattr(D, "_Child", lambda pin, matmul=None: made.append(_FakeChild(pin, matmul, **kw)) or made[-1])
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # no network thread either
    return made


def _check(results, name):
    return next(r for r in results if r.name == name)


# ---------------------------------------------------------------------------------------------
# the real thing, on this machine


@pytest.fixture(scope="module")
def real_results():  # two child processes import torch and the packages: slow tests only
    t = time.perf_counter()
    results = D.run_doctor(None)
    return results, time.perf_counter() - t


@pytest.mark.slow
def test_runs_here(real_results):
    results, secs = real_results
    # ~3 s on an idle machine: imports run in two child processes in parallel, each bounded, as
    # is the Hub check (a loaded 2-core machine took 25 s to import torch alone)
    assert secs < D.CHILD_TIMEOUT_S + D.HUB_TIMEOUT_S + 5
    names = [r.name for r in results]
    for expected in (
        "python",
        "torch",
        "GPU",
        "pinned memory",
        "CPU cores",
        "RAM",
        "disk (checkpoints)",
        "disk (HF cache)",
        "ulimit -l (memlock)",
        "/dev/shm",
        "ramtorch",
        "transformers",
        "datasets",
        "huggingface_hub",
        "wandb",
        "HF token",
        "W&B key",
        "Hub reachable",
    ):
        assert expected in names, expected
    for r in results:
        d = r.to_dict()
        assert set(d) >= {"name", "status", "message", "remedy", "blocking"}
        assert d["status"] in ("ok", "warn", "fail")
        assert isinstance(d["message"], str) and d["message"]
        if d["status"] != "ok":
            assert d["remedy"], d
    assert not D.blocking_failures(results)
    assert _check(results, "torch").status == "ok"


@pytest.mark.slow
def test_no_cuda_says_cpu(real_results):
    results, _ = real_results
    import torch

    if torch.cuda.is_available():  # pragma: no cover - the GPU machine
        pytest.skip("this machine has CUDA")
    assert "CPU" in _check(results, "GPU").message
    assert _check(results, "pinned memory").message == "no CUDA: skipped"


@pytest.mark.slow
def test_the_hub_check_never_blocks(real_results):
    """On this machine the Hub may or may not answer; either way it is not a blocking failure
    (an unreachable Hub is a warning with its reason: test_hub_check_uses_the_shared_probe)."""
    results, _ = real_results
    hub = _check(results, "Hub reachable")
    assert hub.status in ("ok", "warn") and not hub.blocking


# ---------------------------------------------------------------------------------------------
# the CLI


@pytest.mark.slow
def test_cli_json_and_exit_code(secrets):
    r = CliRunner().invoke(app, ["doctor", "--json"])
    assert r.exit_code == 0, r.output
    rows = json.loads(r.stdout)
    assert all({"name", "status", "message", "remedy"} <= set(row) for row in rows)
    assert SECRET_HF not in r.output and SECRET_WB not in r.output
    assert _row(rows, "HF token")["message"] == "present"
    assert _row(rows, "W&B key")["message"].startswith("present")


def _row(rows, name):
    return next(x for x in rows if x["name"] == name)


@pytest.mark.slow
def test_cli_table_with_profile(secrets):
    r = CliRunner().invoke(app, ["doctor", "--profile", "micro-test"])
    assert r.exit_code == 0, r.output
    assert "profile RAM" in r.output
    assert SECRET_HF not in r.output and SECRET_WB not in r.output
    hf_row = r.output.split("HF token", 1)[1].split("\n", 1)[0]
    assert "present" in hf_row and str(len(SECRET_HF)) not in hf_row  # not even its length


def test_cli_bad_profile():
    r = CliRunner().invoke(app, ["doctor", "--profile", "nope"])
    assert r.exit_code != 0
    assert "unknown profile" in r.output and "Traceback" not in r.output


# ---------------------------------------------------------------------------------------------
# robustness, with a fake torch probe


def test_raising_probe_becomes_a_failed_check(monkeypatch):
    _fake(monkeypatch)

    def boom(ctx):
        raise OSError("disk on fire\nsecond line")

    monkeypatch.setattr(D, "_probe_disk", boom)
    results = D.run_doctor(None)
    bad = _check(results, "disk (checkpoints)")
    assert bad.status == "fail" and "OSError: disk on fire" in bad.message and "second line" not in bad.message
    assert not bad.blocking
    assert _check(results, "python").status == "ok"  # the others still ran


def test_every_probe_raising_still_returns(monkeypatch):
    _fake(monkeypatch)
    for _, fn in D._probes():
        monkeypatch.setattr(D, fn.__name__, lambda ctx: 1 / 0)
    results = D.run_doctor(load_profile("micro-test", use_env=False))
    assert len(results) == len(D._probes())
    assert all(r.status == "fail" for r in results)
    assert D.blocking_failures(results)  # python and torch could not be checked


def test_torch_missing_blocks(monkeypatch):
    _fake(monkeypatch, broken=("torch",))
    results = D.run_doctor(None)
    torch_row = _check(results, "torch")
    assert torch_row.status == "fail" and torch_row.blocking
    assert D.blocking_failures(results)
    r = CliRunner().invoke(app, ["doctor", "--json"])
    assert r.exit_code == 1
    assert json.loads(r.stdout)  # still prints the table data


def test_broken_optional_package_is_a_warning(monkeypatch):
    _fake(monkeypatch, broken=("wandb", "datasets"))
    results = D.run_doctor(None)
    assert _check(results, "wandb").status == "warn"
    assert _check(results, "datasets").status == "warn"
    assert not D.blocking_failures(results)
    # a profile that streams from the Hub needs datasets
    results = D.run_doctor(load_profile("0p1b", use_env=False))
    ds = _check(results, "datasets")
    assert ds.status == "fail" and ds.blocking


def test_compiled_blocks_row_says_whether_triton_imports_on_a_gpu(monkeypatch):
    _fake(monkeypatch, cuda=True)
    row = _check(D.run_doctor(None), "compiled blocks")
    assert row.status == "ok" and "triton 1.0" in row.message and "compiles" in row.message
    off = load_profile("rtx3050-6gb", ["runtime.compile_blocks=false"], use_env=False)
    assert "compile_blocks: false" in _check(D.run_doctor(off), "compiled blocks").message
    _fake(monkeypatch, cuda=True, broken=("triton",))
    results = D.run_doctor(None)
    row = _check(results, "compiled blocks")
    assert row.status == "warn" and "uncompiled" in row.message and "pip install triton" in row.remedy
    assert not D.blocking_failures(results)
    assert "triton" not in [r.name for r in results]  # not a package row of its own
    _fake(monkeypatch, broken=("triton",))  # no GPU: the blocks would not compile anyway
    assert "compiled blocks" not in [r.name for r in D.run_doctor(None)]


def test_bytecode_row_warns_where_torch_compiles_its_sources_at_every_start(monkeypatch):
    _fake(monkeypatch)
    row = _check(D.run_doctor(None), "bytecode")
    assert row.status == "ok" and "cached bytecode" in row.message
    _fake(monkeypatch, bytecode={"cached": True, "writes": True, "prefix": "/tmp/pyc"})
    assert "under /tmp/pyc" in _check(D.run_doctor(None), "bytecode").message
    _fake(monkeypatch, bytecode={"cached": False, "writes": False, "prefix": None})
    results = D.run_doctor(None)
    row = _check(results, "bytecode")
    assert row.status == "warn" and "PYTHONDONTWRITEBYTECODE" in row.message and "PYTHONPYCACHEPREFIX" in row.remedy
    assert not D.blocking_failures(results)
    _fake(monkeypatch, bytecode={"cached": False, "writes": True, "prefix": None})
    assert "read-only" in _check(D.run_doctor(None), "bytecode").message
    _fake(monkeypatch, broken=("torch",))  # no torch: its own row says so, no bytecode row
    assert "bytecode" not in [r.name for r in D.run_doctor(None)]


def test_cpu_kernel_row_says_whether_split_masters_update_in_one_pass(monkeypatch):
    _fake(monkeypatch)
    row = _check(D.run_doctor(None), "CPU AdamW kernel")
    assert row.status == "ok" and "checked against torch" in row.message
    _fake(monkeypatch, cpu_kernel={"ok": False, "why": "no C compiler (cc) on PATH"})
    results = D.run_doctor(None)
    row = _check(results, "CPU AdamW kernel")
    assert row.status == "warn" and "no C compiler (cc) on PATH" in row.message and "apt install gcc" in row.remedy
    _fake(monkeypatch, broken=("torch",))
    assert "CPU AdamW kernel" not in [r.name for r in D.run_doctor(None)]


def test_child_reports_the_cpu_kernel(monkeypatch, tmp_path):
    """The child's own answer: built here where a compiler is, the loader's reason where none is."""
    from ramgpt import doctor_child
    from ramgpt.engine import native

    monkeypatch.setattr(native, "_loaded", {})
    monkeypatch.setattr(native, "_why", {})
    monkeypatch.setenv("CC", str(tmp_path / "no-such-cc"))
    assert doctor_child.cpu_kernel() == {"ok": False, "why": f"no C compiler ({tmp_path / 'no-such-cc'}) on PATH"}


def test_child_crash_is_reported(monkeypatch):
    class Crashing(_FakeChild):
        def result(self):
            raise RuntimeError("the torch/CUDA/import probe crashed: Segmentation fault")

    monkeypatch.setattr(D, "_Child", lambda pin, matmul=None: Crashing(pin))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    results = D.run_doctor(None)
    assert "Segmentation fault" in _check(results, "torch").message
    assert _check(results, "RAM").status in ("ok", "warn")


def test_cuda_machine(monkeypatch, secrets):
    _fake(monkeypatch, cuda=True)
    results = D.run_doctor(load_profile("rtx3050-6gb", use_env=False))
    gpu = _check(results, "GPU")
    assert gpu.status == "ok" and "RTX 3050" in gpu.message and "sm_86" in gpu.message
    pin = _check(results, "pinned memory")
    assert "H2D 11.5 GB/s" in pin.message
    assert _check(results, "profile VRAM").status == "ok"
    text = json.dumps([r.to_dict() for r in results])
    assert SECRET_HF not in text and SECRET_WB not in text


def test_offline_mode_is_a_warning(monkeypatch):
    _fake(monkeypatch)
    results = D.run_doctor(None)
    hub = _check(results, "Hub reachable")
    assert hub.status == "warn" and "offline" in hub.message


def test_profile_needing_more_ram_than_total_blocks(monkeypatch):
    _fake(monkeypatch)
    monkeypatch.setattr(D, "_ram", lambda: (8 * 2**30, 6 * 2**30))
    results = D.run_doctor(load_profile("rtx3050-6gb", use_env=False))
    ram = _check(results, "profile RAM")
    assert ram.status == "fail" and ram.blocking
    assert D.blocking_failures(results)


def test_render_doctor_plain_text(monkeypatch):
    _fake(monkeypatch)
    results = D.run_doctor(None)
    console = Console(record=True, width=160)
    render_doctor(results + [D.CheckResult("[bold]odd", "fail", "[red]x", "do [b]this", blocking=True)], console)
    out = console.export_text()
    assert "[bold]odd" in out and "[red]x" in out  # markup in messages is printed, not parsed
    assert "training cannot start" in out


# ---------------------------------------------------------------------------------------------
# doctor --profile: the projected step and run time (issue #15)


def test_profile_time_from_the_measured_rate(monkeypatch):
    made = _fake(monkeypatch, cuda=True, tflops=10.0)
    results = D.run_doctor(load_profile("rtx3050-6gb", use_env=False))
    # the child was asked to time one pass's MLP product: 16 sequences x 1024 tokens, capped at 8192
    assert made[0].matmul == (8192, 1536, 6144)
    row = _check(results, "profile time")
    assert "tokens/s" in row.message and "days" in row.message and "50,000 steps" in row.message
    # 10 TFLOP/s x 0.6 for 50,000 steps of 196,608 tokens is months: worth a warning
    assert row.status == "warn" and "optim.max_steps" in row.remedy and not row.blocking


def test_profile_time_on_the_cpu(monkeypatch):
    made = _fake(monkeypatch, tflops=0.05)
    results = D.run_doctor(load_profile("micro-test", use_env=False))
    p = load_profile("micro-test", use_env=False)
    # one micro-batch's MLP product (8 x 128 tokens, C = 128), within the CPU's cap
    assert made[0].matmul == (p.optim.micro_batch_size * p.data.seq_len, p.model.n_embd, 4 * p.model.n_embd) == (1024, 128, 512)
    row = _check(results, "profile time")
    assert row.status == "ok" and "compute-bound" in row.message and "CPU optimizer" in row.message


def test_profile_time_without_a_rate_points_to_card_classes(monkeypatch):
    _fake(monkeypatch)  # no matmul figure in the child's answer
    results = D.run_doctor(load_profile("micro-test", use_env=False))
    row = _check(results, "profile time")
    assert row.status == "warn" and "--card" in row.remedy and "rtx3050-6gb" in row.remedy


def test_profile_planned_for_a_gpu_on_a_cpu_machine(monkeypatch):
    _fake(monkeypatch, tflops=0.05)  # the CPU was measured; rtx3050-6gb plans for a 5.1 GiB card
    row = _check(D.run_doctor(load_profile("rtx3050-6gb", use_env=False)), "profile time")
    assert row.status == "warn" and "runs on cuda" in row.message and "--card" in row.remedy


def test_hub_check_uses_the_shared_probe(monkeypatch):
    _fake(monkeypatch)
    monkeypatch.delenv("HF_HUB_OFFLINE")
    monkeypatch.delenv("TRANSFORMERS_OFFLINE", raising=False)
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")  # the discard port: refused at once
    hub = _check(D.run_doctor(None), "Hub reachable")
    assert hub.status == "warn" and "127.0.0.1:9 unreachable" in hub.message and "Connection refused" in hub.message


def test_a_timed_out_child_is_reported_the_same_by_every_check(monkeypatch):
    """The first check that waits for the child kills it at the deadline; the later checks report
    that timeout too, not the killed process's exit code."""
    monkeypatch.setattr(D, "CHILD_TIMEOUT_S", 0.5)
    child = D._Child.__new__(D._Child)
    child.procs = [
        subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"], stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, text=True)
        for _ in range(2)
    ]
    child._result, child._error = None, None
    monkeypatch.setattr(D, "_Child", lambda pin, matmul=None: child)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    results = D.run_doctor(None)
    for name in ("torch", "GPU", "pinned memory", "packages"):
        assert "did not finish in" in _check(results, name).message, name
    assert all(p.poll() is not None for p in child.procs)  # nothing left running

"""The child process of ``ramgpt doctor``: torch, CUDA, pinned memory, a matmul rate and package
imports, measured where a crashing driver or a broken package cannot take the command down.

Run as ``python -m ramgpt.doctor_child PIN_BYTES NAMES [--matmul M,K,N]``:

- ``PIN_BYTES`` >= 0: import torch, report its build and CUDA, page-lock that many bytes and time
  copies (:func:`ramgpt.probe.measure_pinned`); < 0: leave torch alone (the second child, which
  only imports the other packages in parallel);
- ``NAMES``: comma-separated packages to import (their versions, or the first line of the error);
- ``--matmul M,K,N``: also time a matmul of that shape on the GPU (bf16), or the CPU (fp32, the
  shape capped) without one (:func:`ramgpt.probe.measure_matmul`), and the CPU's fused AdamW
  (:func:`ramgpt.probe.measure_adamw`), for ``doctor --profile``'s time projection.

It prints one line, ``DOCTOR_JSON {...}`` (:data:`MARKER`), last; anything else on stdout is noise
from the imported packages. Every failure is caught and reported in the JSON.
"""

from __future__ import annotations

import importlib
import importlib.util
import json
import os
import sys
from typing import Any

MARKER = "DOCTOR_JSON "


def _err(e: BaseException, limit: int = 300) -> str:
    from ramgpt.fmt import error_line

    return error_line(e)[:limit]


def _version_of(name: str, mod: Any) -> str:
    v = getattr(mod, "__version__", None)
    if v is None:
        try:
            from importlib.metadata import version

            v = version(name)
        except Exception:  # noqa: BLE001
            v = "unknown"
    return str(v)


def bytecode_cached(module: Any) -> dict[str, Any]:
    """Whether ``module``'s source loads from cached bytecode (where this interpreter looks for it:
    ``__pycache__`` beside the file, or under ``PYTHONPYCACHEPREFIX``; an install of bytecode only is
    cached), and whether Python writes it."""
    path = getattr(module, "__file__", None) or ""
    cached = path.endswith(".pyc") or (path.endswith(".py") and os.path.exists(importlib.util.cache_from_source(path)))
    return {"cached": cached, "writes": not sys.dont_write_bytecode, "prefix": sys.pycache_prefix}


def cpu_kernel() -> dict[str, Any]:
    """Whether the CPU's one-pass AdamW over split masters builds and gives torch's bits here
    (:mod:`ramgpt.engine.native`; built into its cache on the first call, a fraction of a second)."""
    try:
        from ramgpt.engine import native

        k = native.load()
    except BaseException as e:  # noqa: BLE001 - reported, never fatal
        return {"ok": False, "why": _err(e)}
    if k is None:
        return {"ok": False, "why": native.why_not() or "unknown"}
    return {"ok": True, "form": k.form, "path": str(k.path)}


def probe_torch(pin_bytes: int, matmul: tuple[int, int, int] | None) -> tuple[dict[str, Any] | None, dict[str, Any]]:
    """(the ``torch`` section, torch's package row). The section is None when torch does not import."""
    try:
        import torch
    except BaseException as e:  # noqa: BLE001 - an ImportError, or a crash inside the import
        return None, {"ok": False, "error": _err(e)}
    from ramgpt import probe

    t: dict[str, Any] = {"version": torch.__version__, "cuda_build": torch.version.cuda, "cuda": False,
                         "bytecode": bytecode_cached(torch), "cpu_kernel": cpu_kernel()}
    try:
        t["cuda"] = bool(torch.cuda.is_available())
        if t["cuda"]:
            p = torch.cuda.get_device_properties(0)
            free, total = torch.cuda.mem_get_info(0)
            t.update(
                name=p.name,
                capability=[p.major, p.minor],
                total=int(total),
                free=int(free),
                bf16=bool(torch.cuda.is_bf16_supported()),
                context=int(total - free - torch.cuda.memory_reserved(0)),
            )
            try:
                r = probe.measure_pinned(pin_bytes, "cuda:0")
                t.update(pin_ok=True, pin_s=r.pin_s, h2d_gbps=r.h2d_gbps, d2h_gbps=r.d2h_gbps)
            except Exception as e:  # noqa: BLE001
                t.update(pin_ok=False, pin_error=_err(e))
    except Exception as e:  # noqa: BLE001
        t["cuda_error"] = _err(e)
    if matmul is not None:
        try:
            if not t["cuda"]:  # a GPU-sized product would take seconds on the CPU
                from ramgpt.memory.report import cpu_matmul_shape

                matmul = cpu_matmul_shape(matmul)
            t["matmul"] = probe.measure_matmul("cuda:0" if t["cuda"] else "cpu", matmul).to_dict()
        except Exception as e:  # noqa: BLE001
            t["matmul_error"] = _err(e)
        try:
            t["adamw"] = probe.measure_adamw().to_dict()
        except Exception as e:  # noqa: BLE001 - the projection falls back to the assumed rate
            t["adamw_error"] = _err(e)
    return t, {"ok": True, "version": torch.__version__}


def probe_packages(names: list[str]) -> dict[str, dict[str, Any]]:
    out: dict[str, dict[str, Any]] = {}
    for name in names:
        try:
            mod = importlib.import_module(name)
            out[name] = {"ok": True, "version": _version_of(name, mod)}
        except BaseException as e:  # noqa: BLE001 - a package may raise anything while importing
            out[name] = {"ok": False, "error": _err(e)}
    return out


def run(pin_bytes: int, names: list[str], matmul: tuple[int, int, int] | None = None) -> dict[str, Any]:
    """What the child reports (also callable in-process, for tests)."""
    out: dict[str, Any] = {"packages": {}, "torch": None}
    if pin_bytes >= 0:
        out["torch"], out["packages"]["torch"] = probe_torch(pin_bytes, matmul)
    out["packages"].update(probe_packages([n for n in names if n != "torch"]))
    return out


def parse_args(argv: list[str]) -> tuple[int, list[str], tuple[int, int, int] | None]:
    pin_bytes = int(argv[0])
    names = [n for n in (argv[1] if len(argv) > 1 else "").split(",") if n]
    matmul = None
    if "--matmul" in argv:
        m, k, n = (int(x) for x in argv[argv.index("--matmul") + 1].split(","))
        matmul = (m, k, n)
    return pin_bytes, names, matmul


def main(argv: list[str] | None = None) -> int:
    result = run(*parse_args(sys.argv[1:] if argv is None else argv))
    print(MARKER + json.dumps(result), flush=True)
    return 0


if __name__ == "__main__":  # pragma: no cover - run as a child process
    raise SystemExit(main())

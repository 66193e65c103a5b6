"""How numbers and errors are written for people: the one home of every formatter, so the panel,
the plain lines, ``estimate-memory``, ``doctor`` and the one-line errors print a quantity the same way.
Pure functions; no I/O."""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any

GiB = 2**30
MiB = 2**20


def num(v: Any) -> float | None:
    """A float for numbers, 0-d tensors and numpy scalars; None for absent or non-numeric values
    (bools are not numbers)."""
    if v is None or isinstance(v, bool):
        return None
    if isinstance(v, (int, float)):
        return float(v)
    item = getattr(v, "item", None)
    if callable(item):
        try:
            return float(item())
        except Exception:  # noqa: BLE001 - not a number
            return None
    return None


def first_line(e: object) -> str:
    """The first non-empty line of an error's text (or its type name when it has none)."""
    text = str(e).strip()
    if text:
        return text.splitlines()[0].strip()
    return type(e).__name__ if isinstance(e, BaseException) else ""


def error_line(e: BaseException) -> str:
    """``"OSError: disk on fire"``: the error's type and the first line of its text (a probe's
    one-line account of what failed, where the type says as much as the text)."""
    text = first_line(e)
    name = type(e).__name__
    return name if not text or text == name else f"{name}: {text}"


def fmt_bytes(b: float | None) -> str:
    """Binary units, as VRAM budgets, nvidia-smi and the memory estimate use them: ``5.10 GiB``."""
    if b is None:
        return "-"
    b = float(b)
    if not math.isfinite(b):
        return str(b)
    for unit, div in (("GiB", GiB), ("MiB", MiB), ("KiB", 1 << 10)):
        if abs(b) >= div * 0.995:
            return f"{b / div:.2f} {unit}"
    return f"{b:.0f} B"


def gib(b: float, digits: int = 2) -> str:
    """Always in GiB: ``gib(5.1 * 2**30) == '5.10 GiB'`` (for budgets and totals side by side)."""
    return f"{b / GiB:.{digits}f} GiB"


def fmt_count(n: float) -> str:
    """12345 -> 12.3k; 1.5e9 -> 1.50B."""
    if not math.isfinite(n):
        return str(n)
    a = abs(n)
    if a >= 1e9:
        return f"{n / 1e9:.2f}B"
    if a >= 1e6:
        return f"{n / 1e6:.2f}M"
    if a >= 1e3:
        return f"{n / 1e3:.1f}k"
    return f"{n:.0f}"


def fmt_duration(s: float) -> str:
    """Seconds -> H:MM:SS (with days when long); '?' when unknown."""
    if not math.isfinite(s) or s < 0:
        return "?"
    s = int(round(s))
    d, s = divmod(s, 86400)
    h, s = divmod(s, 3600)
    m, s = divmod(s, 60)
    core = f"{h}:{m:02d}:{s:02d}"
    return f"{d}d {core}" if d else core


def fmt_float(v: float, digits: int = 3) -> str:
    return f"{v:.{digits}f}" if math.isfinite(v) else str(v)


def fmt_pct(v: float) -> str:
    return f"{v:.1f}%" if math.isfinite(v) else str(v)


def fmt_gbps(v: float) -> str:
    return f"{v:.1f} GB/s" if math.isfinite(v) else str(v)


_SPARK = "▁▂▃▄▅▆▇█"


def sparkline(values: Iterable[float], width: int = 24) -> str:
    """The recent trend of a series in block characters (non-finite values show as '!')."""
    vals = list(values)[-width:]
    finite = [v for v in vals if math.isfinite(v)]
    if not finite:
        return "!" * len(vals)
    lo, hi = min(finite), max(finite)
    span = hi - lo
    out = []
    for v in vals:
        if not math.isfinite(v):
            out.append("!")
        elif span <= 0:
            out.append(_SPARK[len(_SPARK) // 2])
        else:
            out.append(_SPARK[min(len(_SPARK) - 1, int((v - lo) / span * (len(_SPARK) - 1) + 0.5))])
    return "".join(out)


def fmt_sci(v: float, digits: int = 2) -> str:
    """Scientific notation for small rates such as the learning rate: ``fmt_sci(6e-4, 1) == '6.0e-04'``."""
    return f"{v:.{digits}e}" if math.isfinite(v) else str(v)


def gib_list(values: Iterable[float | None], digits: int = 1) -> str:
    """Several sizes in one GiB unit, ``?`` for an unknown one: ``'3.0/?/6.0 GiB'`` (used/reserved/budget
    side by side on one short log line, where a unit per number would not fit)."""
    return "/".join(f"{v / GiB:.{digits}f}" if v is not None else "?" for v in values) + " GiB"


def fmt_params(n: int) -> str:
    """A parameter count with the precision a model size needs: ``1.010 B``, ``124.44 M``, ``945,664``."""
    if n >= 1e9:
        return f"{n / 1e9:.3f} B"
    if n >= 1e6:
        return f"{n / 1e6:.2f} M"
    return f"{n:,}"

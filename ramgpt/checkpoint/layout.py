"""Where a checkpoint's pieces live and how to tell a complete one: the one home of the on-disk
layout (``ramgpt.hub`` and the trainer import it). A ``step_\\d{7}`` directory is *complete* iff its
meta.json parses and every file it lists exists with the listed size."""

from __future__ import annotations

import json
import math
import os
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from ramgpt.errors import CheckpointError

FORMAT_VERSION = 1

MODEL_FILE = "model.safetensors"
OPTIM_TENSORS_FILE = "optimizer.safetensors"
OPTIM_JSON_FILE = "optimizer.json"
META_FILE = "meta.json"
TOKENIZER_DIR = "tokenizer"
# What a directory of ours can contain; a step_* directory holding anything else is not
# treated as ours by prune (it may be a user's own files).
OUR_NAMES = frozenset({MODEL_FILE, OPTIM_TENSORS_FILE, OPTIM_JSON_FILE, META_FILE, TOKENIZER_DIR})

STEP_DIR_RE = re.compile(r"^step_(\d{7})$")
# .tmp-step_0000010-<writer pid>-<random hex>[-old|-del]: an unfinished save, the previous
# version of a re-saved step, or a checkpoint being deleted by prune.
TMP_DIR_RE = re.compile(r"^\.tmp-step_(\d{7})-(\d+)-([0-9a-f]+)(?:-(old|del))?$")
MAX_STEP = 9_999_999
# A temp dir whose writer is still alive is left alone unless nothing in it changed for this
# long (the pid may have been reused, e.g. after a reboot). Writing a multi-GB file updates
# its mtime continuously, so 10 minutes is far beyond any live save's quiet time.
STALE_TMP_AFTER_S = 600.0


def step_dir_name(step: int) -> str:
    return f"step_{step:07d}"



def read_meta(ckpt: Path) -> tuple[dict[str, Any] | None, str | None]:
    p = ckpt / META_FILE
    try:
        raw = p.read_bytes()
    except FileNotFoundError:
        return None, "no meta.json (the save did not finish)"
    except OSError as e:
        return None, f"cannot read meta.json: {os.strerror(e.errno) if e.errno else e}"
    try:
        meta = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError):
        return None, "meta.json is not valid JSON (truncated or corrupt)"
    if not isinstance(meta, dict):
        return None, "meta.json is not a JSON object"
    return meta, None


def check_complete(ckpt: Path, expected_step: int | None) -> tuple[dict[str, Any] | None, str | None]:
    """(meta, None) when complete by the cheap test (meta parses, listed sizes match); else
    (meta or None, one-line reason)."""
    meta, reason = read_meta(ckpt)
    if meta is None:
        return None, reason
    files = meta.get("files")
    if not isinstance(files, dict) or MODEL_FILE not in files:
        return meta, "meta.json does not list model.safetensors"
    step = meta.get("step")
    if not isinstance(step, int) or isinstance(step, bool):
        return meta, "meta.json has no integer step"
    if expected_step is not None and step != expected_step:
        return meta, f"meta.json says step {step} but the directory is {step_dir_name(expected_step)}"
    for name, rec in files.items():
        rel = Path(name)
        if rel.is_absolute() or ".." in rel.parts or not isinstance(rec, dict) or not isinstance(rec.get("bytes"), int):
            return meta, f"meta.json has a bad entry for {name!r}"
        try:
            size = (ckpt / rel).stat().st_size
        except FileNotFoundError:
            return meta, f"{name} is missing"
        except OSError as e:
            return meta, f"cannot read {name}: {os.strerror(e.errno) if e.errno else e}"
        if size != rec["bytes"]:
            if size < rec["bytes"]:
                return meta, f"{name} is truncated ({size} of {rec['bytes']} bytes)"
            return meta, f"{name} has the wrong size ({size} bytes, expected {rec['bytes']})"
    return meta, None



def eval_loss(meta: dict[str, Any] | None) -> float | None:
    v = (meta or {}).get("eval_loss")
    if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v):
        return float(v)
    return None


def iter_entries(run_dir: Path) -> Iterator[tuple[Path, int, re.Match[str] | None]]:
    try:
        names = os.listdir(run_dir)
    except FileNotFoundError:
        return
    except NotADirectoryError as e:
        raise CheckpointError(f"{run_dir} is not a directory") from e
    for n in names:
        m = STEP_DIR_RE.match(n)
        if m:
            p = run_dir / n
            if p.is_dir():
                yield p, int(m.group(1)), None
            continue
        t = TMP_DIR_RE.match(n)
        if t:
            p = run_dir / n
            if p.is_dir() and not p.is_symlink():
                yield p, int(t.group(1)), t



def is_checkpoint_dir(p: Path) -> bool:
    return bool(STEP_DIR_RE.match(p.name)) or (p / META_FILE).is_file() or (p / MODEL_FILE).is_file()


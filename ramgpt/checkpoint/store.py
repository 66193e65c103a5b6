"""Save, find, load and prune checkpoints (the layout is in :mod:`ramgpt.checkpoint.layout`)."""

from __future__ import annotations

import errno
import json
import math
import os
import secrets
import time
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch

from ramgpt.checkpoint.fsutil import (
    exchange,
    fsync_dir,
    fsync_file,
    newest_mtime,
    remove_tree_quietly,
    rmtree,
    sha256_file,
    tree_bytes,
    writer_alive,
)
from ramgpt.checkpoint.layout import (
    FORMAT_VERSION,
    MAX_STEP,
    META_FILE,
    MODEL_FILE,
    OPTIM_JSON_FILE,
    OPTIM_TENSORS_FILE,
    OUR_NAMES,
    STALE_TMP_AFTER_S,
    STEP_DIR_RE,
    TMP_DIR_RE,
    TOKENIZER_DIR,
    check_complete,
    eval_loss,
    is_checkpoint_dir,
    iter_entries,
    read_meta,
    step_dir_name,
)
from ramgpt.checkpoint.tensorfile import (
    decode_state,
    flatten_optimizer_state,
    is_source,
    lazy_safetensors,
    read_safetensors,
    tensor_nbytes,
    write_json,
    write_safetensors,
)
from ramgpt.errors import CheckpointError, ConfigError
from ramgpt.fmt import first_line

_SPACE_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EFBIG}

class PartialCheckpointWarning(UserWarning):
    """A partial or corrupt checkpoint was skipped while looking for the newest complete one."""


class _BadCheckpoint(CheckpointError):
    """A CheckpointError that also carries the bare reason, for "skipping ... (reason)"."""

    def __init__(self, message: str, reason: str):
        super().__init__(message)
        self.reason = reason


@dataclass(frozen=True)
class CheckpointInfo:
    """One entry of a run directory: a ``step_*`` directory or a ``.tmp-step_*`` leftover."""

    path: Path
    step: int
    complete: bool
    reason: str | None  # why it is not complete (None when complete)
    bytes: int
    eval_loss: float | None = None
    temporary: bool = False  # a .tmp-step_* directory (never complete)
    in_progress: bool = False  # a temp dir whose writer is alive and still writing: never touch


@dataclass
class LoadedCheckpoint:
    """What :func:`load_checkpoint` returns; ``model_state`` has tied aliases re-tied."""

    path: Path
    step: int
    meta: dict[str, Any]
    model_state: dict[str, torch.Tensor]
    optimizer_state: dict[str, Any] | None

    @property
    def tokenizer_dir(self) -> Path | None:
        d = self.path / TOKENIZER_DIR
        return d if d.is_dir() else None


@dataclass
class PruneReport:
    """What :func:`prune_checkpoints` removed (or would remove, with ``dry_run``)."""

    removed: list[Path]  # complete checkpoints removed by the keep rules
    kept: list[Path]  # complete checkpoints kept
    freed_bytes: int
    dry_run: bool
    partial_removed: list[Path]  # partial step_* dirs and stale .tmp-step_* leftovers
    sizes: dict[Path, int] = field(default_factory=dict)  # bytes of every removed path
    left_alone: list[Path] = field(default_factory=list)  # partial-looking dirs that may not be ours, or in use
    reasons: dict[Path, str] = field(default_factory=dict)  # why each of partial_removed was not complete



def _tied_aliases(model_state: dict[str, torch.Tensor]) -> tuple[list[tuple[str, torch.Tensor]], dict[str, str]]:
    """Keep the first key of every group of identical views (same storage, offset, shape,
    stride, dtype); later keys become aliases. Partly overlapping views are saved as copies."""
    seen: dict[tuple[Any, ...], str] = {}
    unique: list[tuple[str, torch.Tensor]] = []
    tied: dict[str, str] = {}
    for name, t in model_state.items():
        if not isinstance(name, str) or not (isinstance(t, torch.Tensor) or is_source(t)):
            raise CheckpointError(f"cannot save model state: entry {name!r} is not a named tensor")
        ident = None
        if is_source(t):  # one source object per value: the same object twice is a tied weight
            ident = ("source", id(t))
        elif t.numel() > 0:
            ident = (
                t.device,
                t.untyped_storage().data_ptr(),
                t.storage_offset(),
                tuple(t.shape),
                t.stride(),
                t.dtype,
            )
        if ident is not None and ident in seen:
            tied[name] = seen[ident]
            continue
        if ident is not None:
            seen[ident] = name
        unique.append((name, t))
    return unique, tied


def _save_error(name: str, run_dir: Path, need_bytes: int, e: BaseException) -> CheckpointError:
    err = getattr(e, "errno", None)
    text = str(e)
    if err is None and "os error 28" in text:  # a Rust library (tokenizers) wrapping ENOSPC
        err = errno.ENOSPC
    if err in _SPACE_ERRNOS:
        why = os.strerror(err).lower()
        need_mb = max(1, math.ceil(need_bytes / 1e6))
        return CheckpointError(
            f"could not save checkpoint {name}: {why} (need ~{need_mb} MB in {run_dir}); older checkpoints are intact"
        )
    why = os.strerror(err).lower() if isinstance(err, int) else first_line(text) or type(e).__name__
    where = getattr(e, "filename", None)
    where_s = f" ({Path(where).name})" if where else ""
    return CheckpointError(f"could not save checkpoint {name}: {why}{where_s}; older checkpoints are intact")


def save_checkpoint(
    run_dir: str | os.PathLike[str],
    step: int,
    model_state: dict[str, torch.Tensor],
    optimizer_state: dict[str, Any] | None,
    meta: dict[str, Any],
    tokenizer: Any | None = None,
    after_tensor: Callable[[torch.Tensor], None] | None = None,
) -> Path:
    """Write ``RUN_DIR/step_XXXXXXX/`` atomically and return its path.

    ``after_tensor(t)`` is called once each tensor is on disk (hashed and written): a background
    save lets the optimizer update that tensor from then on (``ramgpt.train.checkpointer``).

    ``meta`` is stored as given (it must be JSON-serialisable); ``step``, ``format_version``,
    ``created``, ``tied`` and ``files`` are added. Re-saving an existing step replaces it only
    once the new one is complete. Any failure (full disk included) removes the temporary
    directory and raises a one-line :class:`CheckpointError`; existing checkpoints and the
    caller's tensors are never modified.
    """
    run_dir = Path(run_dir)
    if not isinstance(step, int) or isinstance(step, bool) or not 0 <= step <= MAX_STEP:
        raise CheckpointError(f"checkpoint step must be an integer in 0..{MAX_STEP}, got {step!r}")
    name = step_dir_name(step)
    try:
        json.dumps(meta)
    except (TypeError, ValueError) as e:
        raise CheckpointError(
            f"could not save checkpoint {name}: meta is not JSON-serialisable ({first_line(e)})"
        ) from e

    unique, tied = _tied_aliases(model_state)
    opt_tensors: dict[str, torch.Tensor] = {}
    opt_json: Any = None
    if optimizer_state is not None:
        opt_tensors, opt_json = flatten_optimizer_state(optimizer_state)
    need = sum(tensor_nbytes(t) for _, t in unique) + sum(tensor_nbytes(t) for t in opt_tensors.values())
    need += 1_000_000  # headers, JSON, tokenizer: small next to the tensors

    tmp: Path | None = None
    try:
        created_run_dir = not run_dir.exists()
        run_dir.mkdir(parents=True, exist_ok=True)
        if created_run_dir:
            fsync_dir(run_dir.parent)
        tmp = run_dir / f".tmp-{name}-{os.getpid()}-{secrets.token_hex(4)}"
        tmp.mkdir()
        files: dict[str, dict[str, Any]] = {}

        rec = write_safetensors(tmp / MODEL_FILE, unique, after_tensor)
        files[MODEL_FILE] = {"bytes": rec.bytes, "sha256": rec.sha256}
        if optimizer_state is not None:
            rec = write_safetensors(tmp / OPTIM_TENSORS_FILE, list(opt_tensors.items()), after_tensor)
            files[OPTIM_TENSORS_FILE] = {"bytes": rec.bytes, "sha256": rec.sha256}
            rec = write_json(tmp / OPTIM_JSON_FILE, {"format_version": FORMAT_VERSION, "state_dict": opt_json})
            files[OPTIM_JSON_FILE] = {"bytes": rec.bytes, "sha256": rec.sha256}
        if tokenizer is not None:
            tok_dir = tmp / TOKENIZER_DIR
            tok_dir.mkdir()
            tokenizer.save(tok_dir)
            for p in sorted(tok_dir.rglob("*")):
                if p.is_file():
                    fsync_file(p)
                    files[p.relative_to(tmp).as_posix()] = {"bytes": p.stat().st_size, "sha256": sha256_file(p)}
                elif p.is_dir():
                    fsync_dir(p)
            fsync_dir(tok_dir)

        full_meta = dict(meta)
        full_meta.update(
            step=step,
            format_version=FORMAT_VERSION,
            created=datetime.now(timezone.utc).isoformat(timespec="seconds"),
            tied=tied,
            files=files,
        )
        write_json(tmp / META_FILE, full_meta)  # last: its presence marks the files as done
        fsync_dir(tmp)

        final = run_dir / name
        _commit(tmp, final)
        tmp = None
        fsync_dir(run_dir)
        return final
    except CheckpointError:
        if tmp is not None:
            remove_tree_quietly(tmp)
        raise
    except Exception as e:
        if tmp is not None:
            remove_tree_quietly(tmp)
        raise _save_error(name, run_dir, need, e) from e
    except BaseException:  # Ctrl-C mid-save: leave no half directory behind, then stop
        if tmp is not None:
            remove_tree_quietly(tmp)
        raise


def _commit(tmp: Path, final: Path) -> None:
    """Rename the finished temp dir to its final name. A re-save of the same step swaps the
    two atomically where the kernel can (the old copy ends up under the temp name and is then
    removed); elsewhere the old one is renamed away first, so at every instant a complete copy
    exists under either the final or a ``.tmp-`` name."""
    if not final.exists():
        os.rename(tmp, final)  # fails (ENOTEMPTY/EEXIST) rather than merging if one appeared
        return
    if exchange(tmp, final):
        fsync_dir(final.parent)
        remove_tree_quietly(tmp)
        return
    old = tmp.with_name(tmp.name + "-old")
    os.rename(final, old)
    try:
        os.rename(tmp, final)
    except OSError:
        os.rename(old, final)
        raise
    fsync_dir(final.parent)
    remove_tree_quietly(old)



def _verify_hashes(ckpt: Path, meta: dict[str, Any], names: list[str] | None = None) -> str | None:
    """One-line reason for the first file whose sha256 differs from meta.json, else None."""
    for name, rec in meta["files"].items():
        if names is not None and name not in names:
            continue
        expected = rec.get("sha256")
        if not isinstance(expected, str):
            return f"meta.json has no sha256 for {name}"
        try:
            got = sha256_file(ckpt / name)
        except OSError as e:
            return f"cannot read {name}: {os.strerror(e.errno) if e.errno else e}"
        if got != expected:
            return f"{name} is corrupt (sha256 {got[:12]}… does not match {expected[:12]}… in meta.json)"
    return None



def list_checkpoints(run_dir: str | os.PathLike[str]) -> list[CheckpointInfo]:
    """Every ``step_*`` directory and ``.tmp-step_*`` leftover in ``run_dir``, oldest step
    first, with whether it is complete and why not. Cheap: sizes only, no hashing. A run dir
    that does not exist yet has no checkpoints."""
    run_dir = Path(run_dir)
    _recover_interrupted_resaves(run_dir)
    infos: list[CheckpointInfo] = []
    now = time.time()
    for path, step, tmp_match in iter_entries(run_dir):
        size = tree_bytes(path)
        if tmp_match is not None:
            pid = int(tmp_match.group(2))
            try:
                created_by = os.lstat(path).st_mtime  # set when the writer added its files
            except OSError:
                created_by = now
            alive = writer_alive(pid, created_by)
            quiet_s = now - newest_mtime(path)
            in_progress = alive and quiet_s < STALE_TMP_AFTER_S
            kind = {"old": "previous copy of a re-saved step", "del": "checkpoint being deleted"}.get(
                tmp_match.group(4) or "", "unfinished save"
            )
            if in_progress:
                reason = f"{kind}, being written by pid {pid}"
            elif alive:
                reason = f"{kind}, untouched for {quiet_s / 60:.0f} min"
            else:
                reason = f"{kind}, writer pid {pid} is gone"
            infos.append(CheckpointInfo(path, step, False, reason, size, None, temporary=True, in_progress=in_progress))
            continue
        meta, reason = check_complete(path, step)
        infos.append(CheckpointInfo(path, step, reason is None, reason, size, eval_loss(meta)))
    infos.sort(key=lambda i: (i.step, i.temporary, i.path.name))
    return infos


def _recover_interrupted_resaves(run_dir: Path) -> None:
    """Undo the one crash window of a re-save without ``RENAME_EXCHANGE``: the old copy was renamed
    to ``.tmp-step_X-...-old`` and the process died before the new one took ``step_X``. When no
    ``step_X`` exists, the writer is gone and the old copy is complete, rename it back (atomic), so
    the step stays loadable. A save in progress is never touched."""
    steps = {step for _, step, m in iter_entries(run_dir) if m is None}
    for path, step, m in iter_entries(run_dir):
        if m is None or m.group(4) != "old" or step in steps:
            continue
        try:
            if writer_alive(int(m.group(2)), os.lstat(path).st_mtime):
                continue
        except OSError:
            continue
        if check_complete(path, None)[1] is not None:
            continue
        try:
            os.rename(path, run_dir / step_dir_name(step))
        except OSError:
            continue  # another process recovered it first, or the directory is read-only
        fsync_dir(run_dir)
        steps.add(step)
        warnings.warn(f"recovered {step_dir_name(step)} from the previous copy of an interrupted re-save",
                      PartialCheckpointWarning, stacklevel=3)


def _warn_skipped(info_path: Path, reason: str | None) -> None:
    warnings.warn(f"skipping partial checkpoint {info_path.name} ({reason})", PartialCheckpointWarning, stacklevel=3)


def _skip_silently(info: CheckpointInfo) -> bool:
    """Saves in progress, and leftovers that never were a newer checkpoint (the old copy of a
    re-saved step, a checkpoint prune was deleting), are not worth a warning."""
    return info.in_progress or info.path.name.endswith(("-old", "-del"))


def _complete_newest_first(run_dir: str | os.PathLike[str]) -> Iterator[CheckpointInfo]:
    """The complete checkpoints of ``run_dir``, newest first: the one rule for which checkpoint a
    resume or a load picks. Partial or corrupt ones are skipped with a warning, saves in progress
    silently."""
    for info in reversed(list_checkpoints(run_dir)):
        if _skip_silently(info):
            continue
        if not info.complete:
            _warn_skipped(info.path, info.reason)
            continue
        yield info


def latest_checkpoint(run_dir: str | os.PathLike[str], *, verify: bool = False) -> Path | None:
    """Newest complete checkpoint of ``run_dir`` (None if there is none). Newer partial or
    corrupt ones are skipped with a :class:`PartialCheckpointWarning`; saves still in progress
    are skipped silently. ``verify=True`` also checks sha256 (reads every file)."""
    for info in _complete_newest_first(run_dir):
        if verify:
            meta, _ = read_meta(info.path)
            bad = _verify_hashes(info.path, meta) if meta is not None else "meta.json vanished"
            if bad:
                _warn_skipped(info.path, bad)
                continue
        return info.path
    return None


def resolve_checkpoint(path_or_run_dir: str | os.PathLike[str], *, verify: bool = False) -> Path:
    """A run directory -> its newest complete checkpoint; a checkpoint directory (or a file in
    one) -> itself, validated. Raises a one-line :class:`CheckpointError` otherwise."""
    p = Path(path_or_run_dir)
    if not p.exists():
        raise CheckpointError(f"no such checkpoint or run directory: {p}")
    if p.is_file():
        p = p.parent
    if is_checkpoint_dir(p):
        m = STEP_DIR_RE.match(p.name)
        meta, reason = check_complete(p, int(m.group(1)) if m else None)
        if reason is None and verify:
            reason = _verify_hashes(p, meta)  # type: ignore[arg-type]
        if reason is not None:
            raise CheckpointError(f"checkpoint {p} is incomplete or corrupt: {reason}")
        return p
    found = latest_checkpoint(p, verify=verify)
    if found is None:
        raise CheckpointError(f"no complete checkpoint in {p}")
    return found


# ---------------------------------------------------------------------------------------------
# Loading


def _load_verified(
    ckpt: Path, *, map_location: str | torch.device, with_optimizer: bool, verify: bool, lazy: bool = False
) -> LoadedCheckpoint:
    m = STEP_DIR_RE.match(ckpt.name)
    meta, reason = check_complete(ckpt, int(m.group(1)) if m else None)
    if reason is not None:
        raise _BadCheckpoint(f"checkpoint {ckpt} is incomplete or corrupt: {reason}", reason)
    assert meta is not None
    has_opt = OPTIM_TENSORS_FILE in meta["files"] and OPTIM_JSON_FILE in meta["files"]
    if verify:
        names = [n for n in meta["files"] if with_optimizer or n not in (OPTIM_TENSORS_FILE, OPTIM_JSON_FILE)]
        bad = _verify_hashes(ckpt, meta, names)
        if bad:
            raise _BadCheckpoint(f"checkpoint {ckpt} is corrupt: {bad}", bad)

    if lazy:
        model_state: dict[str, Any] = lazy_safetensors(ckpt / MODEL_FILE, MODEL_FILE)
    else:
        model_state = read_safetensors(ckpt / MODEL_FILE, map_location, MODEL_FILE)
    tied = meta.get("tied") or {}
    for alias, target in tied.items():
        if target not in model_state:
            raise CheckpointError(f"checkpoint {ckpt} is corrupt: tied weight {alias} points at missing {target}")
        model_state[alias] = model_state[target]  # the same tensor object: re-tied, not copied

    optimizer_state = None
    if with_optimizer and has_opt:
        if lazy:
            tensors: dict[str, Any] = lazy_safetensors(ckpt / OPTIM_TENSORS_FILE, OPTIM_TENSORS_FILE)
        else:
            tensors = read_safetensors(ckpt / OPTIM_TENSORS_FILE, map_location, OPTIM_TENSORS_FILE)
        try:
            doc = json.loads((ckpt / OPTIM_JSON_FILE).read_text(encoding="utf-8"))
            optimizer_state = decode_state(doc["state_dict"], tensors)
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise CheckpointError(f"checkpoint {ckpt}: cannot read {OPTIM_JSON_FILE}: {first_line(e)}") from e
    return LoadedCheckpoint(ckpt, int(meta["step"]), meta, model_state, optimizer_state)


def load_checkpoint(
    path: str | os.PathLike[str],
    *,
    map_location: str | torch.device = "cpu",
    with_optimizer: bool = True,
    verify: bool = True,
    lazy: bool = False,
) -> LoadedCheckpoint:
    """Load a checkpoint (or a run directory's newest complete one). Never unpickles.

    ``lazy``: tensors come as :class:`~ramgpt.checkpoint.tensorfile.LazyTensor` handles, read one
    at a time by whoever copies them into place (a resume), instead of all at once.

    ``verify`` checks the sha256 of every file that is read. Given a run directory, a newest
    checkpoint that fails verification is skipped with a warning and the next older complete one
    is used, so one bad file does not cost the whole run; given a checkpoint directory, any
    problem is a one-line :class:`CheckpointError` naming the file."""
    p = Path(path)
    if p.is_dir() and not is_checkpoint_dir(p):
        for info in _complete_newest_first(p):
            try:
                return _load_verified(
                    info.path, map_location=map_location, with_optimizer=with_optimizer, verify=verify, lazy=lazy
                )
            except _BadCheckpoint as e:
                _warn_skipped(info.path, e.reason)
        raise CheckpointError(f"no complete checkpoint in {p}")
    ckpt = resolve_checkpoint(p)
    return _load_verified(ckpt, map_location=map_location, with_optimizer=with_optimizer, verify=verify, lazy=lazy)



# ---------------------------------------------------------------------------------------------
# Pruning


def _looks_like_ours(path: Path) -> bool:
    try:
        names = os.listdir(path)
    except OSError:
        return False
    return all(n in OUR_NAMES for n in names)


def prune_checkpoints(
    run_dir: str | os.PathLike[str],
    keep_last: int,
    keep_every: int | None = None,
    keep_best: bool = False,
    dry_run: bool = False,
) -> PruneReport:
    """Delete old checkpoints and leftovers of interrupted saves.

    Kept: the newest complete checkpoint (always), the newest ``keep_last`` complete ones, steps
    that are multiples of ``keep_every``, and with ``keep_best`` the one with the lowest finite
    ``meta["eval_loss"]``. Removed besides: partial ``step_*`` directories that hold only our
    file names, and ``.tmp-step_*`` directories whose writer is gone (or silent for 10 min).
    Anything else in ``run_dir`` is left alone. Safe next to a training process that is saving:
    it only ever writes under temp names and renames, and those are left alone while alive.
    Removal renames a checkpoint to a temp name first, so an interrupted prune never leaves a
    ``step_*`` directory that looks like a damaged checkpoint.
    """
    run_dir = Path(run_dir)
    if isinstance(keep_last, bool) or not isinstance(keep_last, int) or keep_last < 0:
        raise ConfigError(f"keep_last must be a non-negative integer, got {keep_last!r}")
    if keep_every is not None and (not isinstance(keep_every, int) or keep_every < 1):
        raise ConfigError(f"keep_every must be a positive integer, got {keep_every!r}")
    if not run_dir.is_dir():
        raise CheckpointError(f"no run directory {run_dir}")

    infos = list_checkpoints(run_dir)
    complete = [i for i in infos if i.complete]
    keep: set[Path] = set()
    if complete:
        keep.add(complete[-1].path)
        keep.update(i.path for i in complete[-keep_last:] if keep_last > 0)
        if keep_every:
            keep.update(i.path for i in complete if i.step % keep_every == 0)
        if keep_best:
            scored = [i for i in complete if i.eval_loss is not None]
            if scored:
                keep.add(min(scored, key=lambda i: (i.eval_loss, -i.step)).path)

    report = PruneReport(removed=[], kept=[], freed_bytes=0, dry_run=dry_run, partial_removed=[])
    for info in infos:
        if info.complete:
            if info.path in keep:
                report.kept.append(info.path)
            else:
                report.removed.append(info.path)
                report.sizes[info.path] = info.bytes
        elif info.temporary:
            if info.in_progress:
                report.left_alone.append(info.path)
            else:
                report.partial_removed.append(info.path)
                report.sizes[info.path] = info.bytes
                report.reasons[info.path] = info.reason or "incomplete"
        elif not info.path.is_symlink() and _looks_like_ours(info.path):
            report.partial_removed.append(info.path)
            report.sizes[info.path] = info.bytes
            report.reasons[info.path] = info.reason or "incomplete"
        else:
            report.left_alone.append(info.path)

    for p in [*report.removed, *report.partial_removed]:
        if not dry_run and not _delete_checkpoint_dir(p):  # vanished meanwhile: not ours to count
            report.sizes.pop(p, None)
            (report.removed if p in report.removed else report.partial_removed).remove(p)
    report.freed_bytes = sum(report.sizes.values())
    return report


def _delete_checkpoint_dir(path: Path) -> bool:
    """Rename to a temp name of ours, fsync, then delete: a kill mid-delete leaves a leftover
    that the next prune removes, never a half ``step_*`` directory. False if it vanished."""
    target = path
    if not TMP_DIR_RE.match(path.name):
        m = STEP_DIR_RE.match(path.name)
        step = int(m.group(1)) if m else 0
        target = path.with_name(f".tmp-{step_dir_name(step)}-{os.getpid()}-{secrets.token_hex(4)}-del")
        try:
            os.rename(path, target)
        except FileNotFoundError:
            return False  # another prune got there first
        except OSError as e:
            raise CheckpointError(f"could not remove {path}: {os.strerror(e.errno) if e.errno else e}") from e
        fsync_dir(path.parent)
        try:  # a renamed dir keeps its old mtime; make it ours so other prunes see a live deleter
            os.utime(target)
        except OSError:
            pass
    try:
        rmtree(target)
    except FileNotFoundError:
        return False
    except OSError as e:
        raise CheckpointError(f"could not remove {path}: {os.strerror(e.errno) if e.errno else e}") from e
    return True


"""Checkpoints: save, find, load and prune them without ever losing a night of training.

A checkpoint is a directory ``RUN_DIR/step_0000010/``::

    model.safetensors       model tensors; a tied weight is stored once (meta["tied"] names the alias)
    optimizer.safetensors   every tensor of the optimizer's state_dict(), keys like state.3.exp_avg
    optimizer.json          the rest of that state_dict (param_groups, numbers, 0-d step counts)
    meta.json               step, the caller's meta, format_version, created, tied,
                            files: {relative name: {bytes, sha256}}
    tokenizer/              tokenizer.save(dir), when a tokenizer is passed

Why it is crash-safe: everything is written into ``RUN_DIR/.tmp-step_0000010-<pid>-<hex>/``,
each file and the directory are fsynced, and only then is the directory renamed to its final
name (one atomic rename), followed by an fsync of RUN_DIR. A ``step_\\d{7}`` directory is
*complete* iff its meta.json parses and every file it lists exists with the listed size; a
kill at any moment therefore leaves either the previous complete checkpoints plus a ``.tmp-``
leftover, or one more complete checkpoint. Loading also checks sha256, so a flipped bit is a
one-line :class:`CheckpointError`, not a silently wrong model.

Nothing here unpickles: tensors go through safetensors (written by a small streaming writer so
that a full disk surfaces as a real ``OSError`` and a 1B model is never copied in memory; read
back with the safetensors library), everything else is JSON. Nothing here prints; skipped
partial checkpoints are reported with :class:`PartialCheckpointWarning`.

The package: :mod:`.layout` (names on disk, the completeness rule), :mod:`.fsutil` (fsync, atomic
exchange), :mod:`.tensorfile` (safetensors + optimizer-state codec), :mod:`.rng`, :mod:`.store`
(save/list/load/prune) and :mod:`.inference` (a model for generate/export).
"""

from ramgpt.checkpoint.inference import load_model_for_inference
from ramgpt.checkpoint.layout import (
    FORMAT_VERSION,
    META_FILE,
    MODEL_FILE,
    OPTIM_JSON_FILE,
    OPTIM_TENSORS_FILE,
    STEP_DIR_RE,
    TMP_DIR_RE,
    TOKENIZER_DIR,
    step_dir_name,
)
from ramgpt.checkpoint.rng import capture_rng_state, restore_rng_state
from ramgpt.checkpoint.store import (
    CheckpointInfo,
    LoadedCheckpoint,
    PartialCheckpointWarning,
    PruneReport,
    latest_checkpoint,
    list_checkpoints,
    load_checkpoint,
    prune_checkpoints,
    resolve_checkpoint,
    save_checkpoint,
)

__all__ = [
    "FORMAT_VERSION",
    "META_FILE",
    "MODEL_FILE",
    "OPTIM_JSON_FILE",
    "OPTIM_TENSORS_FILE",
    "STEP_DIR_RE",
    "TMP_DIR_RE",
    "TOKENIZER_DIR",
    "CheckpointInfo",
    "LoadedCheckpoint",
    "PartialCheckpointWarning",
    "PruneReport",
    "capture_rng_state",
    "latest_checkpoint",
    "list_checkpoints",
    "load_checkpoint",
    "load_model_for_inference",
    "prune_checkpoints",
    "resolve_checkpoint",
    "restore_rng_state",
    "save_checkpoint",
    "step_dir_name",
]

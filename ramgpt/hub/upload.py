"""Push a run directory, one checkpoint or an exported model to the Hugging Face Hub: what to
send (``plan_push``, no network), sending it (``execute_push``), and pushes running in the
background during training (``push_checkpoint_background``).

- **The token is never data.** It is resolved at call time (``--token``, ``HF_TOKEN``, the
  login cache), handed to ``HfApi`` and nothing else: not to ``PushPlan``, not to a log line,
  not to a file, not to an error message (messages are scrubbed as well).
- **A push fails fast and in one line.** The Hub client waits forever on a black-holed host,
  so ``push`` first probes the endpoint with a short timeout; every Hub exception becomes a
  one-line ``HubError``.
- **Only complete checkpoints leave the machine**, by the rule of ``ramgpt.checkpoint.layout``.

``upload_folder`` vs ``upload_large_folder``: huggingface_hub 2.x removed
``upload_large_folder`` because ``upload_folder`` itself now streams, batches big folders into
several commits (``... (part N)`` messages) and resumes when re-run. With huggingface_hub < 2,
big pushes (> ``LARGE_PUSH_BYTES`` or > ``LARGE_PUSH_FILES``) use ``upload_large_folder``,
which is resumable but takes no commit message and no delete patterns (deletions then go in a
separate ``delete_files`` commit) and keeps its resume state in ``FOLDER/.cache/huggingface/``.
"""

from __future__ import annotations

import os
import re
import threading
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

from ramgpt.checkpoint.layout import (
    META_FILE,
    MODEL_FILE,
    OPTIM_JSON_FILE,
    OPTIM_TENSORS_FILE,
    STEP_DIR_RE,
    TMP_DIR_RE,
    check_complete,
    read_meta,
    step_dir_name,
)
from ramgpt.errors import CheckpointError, HubError
from ramgpt.hub.export import model_card

# ---------------------------------------------------------------------------------------------
# Push: what to send

# Above either limit, huggingface_hub < 2 needs upload_large_folder (2.x batches by itself).
LARGE_PUSH_BYTES = 5 * 1024**3
LARGE_PUSH_FILES = 500
# How long the reachability probe waits: the Hub client itself never times out.
PROBE_TIMEOUT_S = 10.0

OPTIMIZER_FILES = (OPTIM_TENSORS_FILE, OPTIM_JSON_FILE)
# Never uploaded: temporary/partial writes, VCS and cache folders, W&B's local run files.
ALWAYS_IGNORED = (".tmp-*", "*.tmp", "*.partial", "*.lock", ".git/*", ".cache/*", "__pycache__/*", "wandb/*")

NO_TOKEN_MESSAGE = "no Hugging Face token: set HF_TOKEN, pass --token, or run `hf auth login`"

PushSource = Literal["run", "checkpoint", "export"]


@dataclass
class PushPlan:
    """What a push sends (or sent). Holds no token, so printing it is always safe."""

    repo_id: str
    revision: str | None
    private: bool
    message: str
    files: list[tuple[str, int]]  # (path in the repo, bytes)
    total_bytes: int
    delete_patterns: list[str]
    method: Literal["upload_folder", "upload_large_folder"]
    dry_run: bool
    url: str | None = None
    source: PushSource = "run"
    folder: str = ""  # local folder the paths are relative to
    allow_patterns: list[str] = field(default_factory=list)
    ignore_patterns: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)  # partial checkpoints / optimizer state left out
    generated: list[str] = field(default_factory=list)  # files push writes before uploading (README.md)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _anywhere(pattern: str) -> list[str]:
    """fnmatch's ``*`` crosses ``/``: match a name at the top and in any subfolder."""
    return [pattern, f"*/{pattern}"]


def _literal(path: str) -> str:
    """An fnmatch pattern matching exactly ``path``."""
    return "".join(f"[{c}]" if c in "[*?" else c for c in path)


def is_complete_checkpoint(d: str | os.PathLike[str]) -> bool:
    """Whether ``d`` is a complete checkpoint by ``ramgpt.checkpoint.layout.check_complete``: a
    ``step_\\d{7}`` directory whose meta.json parses and lists files that all exist with their
    recorded sizes."""
    d = Path(d)
    m = STEP_DIR_RE.match(d.name)
    return m is not None and d.is_dir() and check_complete(d, int(m.group(1)))[1] is None


def _classify(folder: Path) -> PushSource:
    if not folder.is_dir():
        raise HubError(f"{folder} is not a directory (expected a run directory, a checkpoint or an exported model)")
    if (
        (folder / "config.json").is_file()
        and (folder / MODEL_FILE).is_file()
        and not (folder / META_FILE).exists()
    ):
        return "export"
    if (folder / META_FILE).exists() or STEP_DIR_RE.match(folder.name):
        from ramgpt.checkpoint import resolve_checkpoint

        resolve_checkpoint(folder)  # one-line CheckpointError for a partial or corrupt one
        return "checkpoint"
    if (
        any(STEP_DIR_RE.match(p.name) or TMP_DIR_RE.match(p.name) for p in folder.iterdir())
        or (folder / "metrics.jsonl").is_file()
    ):
        return "run"
    raise HubError(
        f"{folder} is not a run directory, a checkpoint or an exported model (no step_* dirs, meta.json or config.json)"
    )


def _walk(folder: Path) -> dict[str, int]:
    """Relative path -> bytes of every file under ``folder``. Files that vanish meanwhile (a
    prune running next to us renames old checkpoints away) are simply not there."""
    out: dict[str, int] = {}
    for p in folder.rglob("*"):
        try:
            if p.is_file():
                out[p.relative_to(folder).as_posix()] = p.stat().st_size
        except OSError:
            continue
    return dict(sorted(out.items()))


def _newest_meta(run_dir: Path) -> dict[str, Any]:
    from ramgpt.checkpoint import list_checkpoints

    complete = [i for i in list_checkpoints(run_dir) if i.complete]
    return (read_meta(complete[-1].path)[0] or {}) if complete else {}


def resolve_token(token: str | None = None) -> str | None:
    """``--token``, else ``HF_TOKEN``, else the login cache (``hf auth login``). Never logged."""
    if token:
        return token
    env = os.environ.get("HF_TOKEN")
    if env:
        return env
    from huggingface_hub import get_token

    return get_token()


def has_token(token: str | None = None) -> bool:
    """Whether a push could authenticate (for doctor / a pre-flight check before training)."""
    return bool(resolve_token(token))


def _validate_repo_id(repo_id: str | None) -> str:
    if not repo_id or not repo_id.strip():
        raise HubError("no Hub repo id: pass --repo-id USER/NAME (or set checkpoint.hf_repo_id)")
    repo_id = repo_id.strip()
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    try:
        validate_repo_id(repo_id)
    except HFValidationError:
        raise HubError(
            f"invalid Hub repo id {repo_id!r}: expected USER/NAME (letters, digits, '-', '_', '.')"
        ) from None
    return repo_id


def plan_push(
    path: str | os.PathLike[str],
    *,
    repo_id: str | None,
    private: bool = True,
    revision: str | None = None,
    message: str | None = None,
    include: Iterable[str] | None = None,
    exclude: Iterable[str] | None = None,
    with_optimizer: bool = False,
    delete_patterns: Iterable[str] | None = None,
    dry_run: bool = True,
) -> PushPlan:
    """Decide what a push sends: reads the folder, writes nothing, makes no network call.

    ``include``/``exclude`` globs are relative to ``path``. Whatever they say, partial
    checkpoints are never sent, and optimizer state only with ``with_optimizer``. A checkpoint
    is uploaded as ``step_XXXXXXX/...`` so the repo mirrors the run directory (and the
    rotation delete patterns of ``remote_delete_patterns`` apply to it)."""
    from huggingface_hub.utils import filter_repo_objects

    repo_id = _validate_repo_id(repo_id)
    src = Path(path).expanduser()
    source = _classify(src)
    folder, prefix = (src.parent, f"{src.name}/") if source == "checkpoint" else (src, "")

    ignore = [p for pat in ALWAYS_IGNORED for p in _anywhere(pat)]
    skipped: list[str] = []
    if source == "run":
        from ramgpt.checkpoint import list_checkpoints

        for info in list_checkpoints(src):
            if not info.complete:
                skipped.append(f"{info.path.name}/ (partial checkpoint: {info.reason})")
                ignore.append(f"{_literal(info.path.name)}/*")

    rel = _walk(src)
    candidates = list(filter_repo_objects(list(rel), ignore_patterns=ignore))
    if not with_optimizer:
        ignore += [p for f in OPTIMIZER_FILES for p in _anywhere(f)]
        opt = [p for p in candidates if p.rsplit("/", 1)[-1] in OPTIMIZER_FILES]
        candidates = [p for p in candidates if p.rsplit("/", 1)[-1] not in OPTIMIZER_FILES]
        if opt:
            n_bytes = sum(rel[p] for p in opt)
            dirs = len({p.rsplit("/", 1)[0] if "/" in p else "" for p in opt})
            where = "1 checkpoint" if dirs == 1 else f"{dirs} checkpoints"
            skipped.append(
                f"optimizer state of {where} ({len(opt)} files, {n_bytes / 1e6:.1f} MB; --with-optimizer sends it)"
            )
    include_l, exclude_l = list(include or []), list(exclude or [])
    selected = list(
        filter_repo_objects(candidates, allow_patterns=include_l or None, ignore_patterns=exclude_l or None)
    )

    files = [(prefix + p, rel[p]) for p in selected]
    generated: list[str] = []
    readme_wanted = list(
        filter_repo_objects(["README.md"], allow_patterns=include_l or None, ignore_patterns=exclude_l or None)
    )
    if source == "run" and "README.md" not in rel and readme_wanted:
        card = model_card(_newest_meta(src), kind="run", repo_id=repo_id).encode("utf-8")
        files.append(("README.md", len(card)))
        generated.append("README.md")
    files.sort()
    if not files:
        raise HubError(f"nothing to push from {src}: every file was excluded")

    total = sum(n for _, n in files)
    method: Literal["upload_folder", "upload_large_folder"] = "upload_folder"
    if (total > LARGE_PUSH_BYTES or len(files) > LARGE_PUSH_FILES) and _hub_has_large_folder():
        method = "upload_large_folder"
    if message is None:
        if source == "run":
            step = _newest_meta(src).get("step")
            message = f"ramgpt: run {src.name}" + (f" up to step {step}" if step is not None else "")
        else:
            message = f"ramgpt: {'checkpoint' if source == 'checkpoint' else 'transformers export'} {src.name}"
    # user excludes are relative to `path`; for a checkpoint the upload folder is its parent
    sent_ignore = ignore + [prefix + p for p in exclude_l]
    return PushPlan(
        repo_id=repo_id,
        revision=revision or None,
        private=private,
        message=message,
        files=files,
        total_bytes=total,
        delete_patterns=list(delete_patterns or []),
        method=method,
        dry_run=dry_run,
        source=source,
        folder=str(folder),
        allow_patterns=[_literal(p) for p, _ in files],
        ignore_patterns=sent_ignore,
        skipped=skipped,
        generated=generated,
    )


def _hub_has_large_folder() -> bool:
    from huggingface_hub import HfApi

    return hasattr(HfApi, "upload_large_folder")


def remote_delete_patterns(rotated_steps: Iterable[int | str | os.PathLike[str]]) -> list[str]:
    """Delete patterns for checkpoints rotated away locally (``step_0000010/*``), to pass as
    ``delete_patterns`` when the profile asks for ``checkpoint.delete_remote_rotated``."""
    out: list[str] = []
    for s in rotated_steps:
        if isinstance(s, int):
            name = step_dir_name(s)
        else:
            name = Path(s).name
            if not STEP_DIR_RE.match(name):
                raise CheckpointError(f"{s!r} is not a checkpoint name (step_0000010)")
        pat = f"{name}/*"
        if pat not in out:
            out.append(pat)
    return out


# ---------------------------------------------------------------------------------------------
# Push: sending


def _endpoint() -> str:
    """Read at call time: huggingface_hub reads HF_ENDPOINT once, at import."""
    from huggingface_hub import constants

    return (os.environ.get("HF_ENDPOINT") or constants.ENDPOINT).rstrip("/")


def _scrub(text: str, token: str | None) -> str:
    if token:
        text = text.replace(token, "***")
    text = re.sub(r"hf_[A-Za-z0-9]{8,}", "hf_***", text)
    first = next((ln.strip() for ln in text.splitlines() if ln.strip()), "")
    return first[:300]


def _probe(endpoint: str, timeout_s: float) -> None:
    """Fail in seconds when the Hub cannot be reached: the client has no timeout of its own and
    retries network errors with back-off. No credentials are sent; any HTTP answer will do."""
    from huggingface_hub.utils import get_session

    try:
        get_session().head(f"{endpoint}/api/models", timeout=timeout_s, follow_redirects=False)
    except Exception as e:
        reason = _scrub(str(e), None) or type(e).__name__
        raise HubError(
            f"cannot reach the Hugging Face Hub at {endpoint} ({reason}); check the network or HF_ENDPOINT"
        ) from None


def _as_hub_error(e: Exception, action: str, repo_id: str, token: str | None) -> HubError:
    resp = getattr(e, "response", None)
    status = getattr(resp, "status_code", None)
    if status == 401:
        return HubError(
            f"{action} {repo_id}: the Hub rejected the token (401); check HF_TOKEN, --token or `hf auth login`"
        )
    if status == 403:
        return HubError(
            f"{action} {repo_id}: the token may not write to this repo (403); use a write token or your namespace"
        )
    detail = _scrub(str(e), token) or type(e).__name__
    code = f" (HTTP {status})" if status else ""
    return HubError(f"{action} {repo_id} failed{code}: {detail}")


def _write_generated(plan: PushPlan) -> None:
    if "README.md" in plan.generated:
        folder = Path(plan.folder)
        target = folder / "README.md"
        if not target.exists():
            meta = _newest_meta(folder)
            target.write_text(model_card(meta, kind="run", repo_id=plan.repo_id), encoding="utf-8")


def execute_push(
    plan: PushPlan, *, token: str | None = None, api: Any = None, probe_timeout_s: float | None = None
) -> PushPlan:
    """Send a plan: create the repo (and branch), then one upload. Returns the plan with ``url``.

    ``api`` lets tests and notebooks inject an ``HfApi``-like object; when it is given the
    reachability probe is skipped (the object decides what the network is)."""
    if plan.dry_run:
        return plan
    token = resolve_token(token)
    if not token:
        raise HubError(NO_TOKEN_MESSAGE)
    if api is None:
        from huggingface_hub import HfApi

        endpoint = _endpoint()
        _probe(endpoint, PROBE_TIMEOUT_S if probe_timeout_s is None else probe_timeout_s)
        api = HfApi(endpoint=endpoint, token=token, library_name="ramgpt")

    step = "creating"
    try:
        repo_url = api.create_repo(plan.repo_id, private=plan.private, exist_ok=True, repo_type="model", token=token)
        if plan.revision and plan.revision != "main":
            step = "creating branch for"
            api.create_branch(plan.repo_id, branch=plan.revision, exist_ok=True, repo_type="model", token=token)
        _write_generated(plan)
        step = "uploading to"
        if plan.method == "upload_large_folder":
            api.upload_large_folder(
                repo_id=plan.repo_id,
                folder_path=plan.folder,
                repo_type="model",
                revision=plan.revision,
                private=plan.private,
                allow_patterns=plan.allow_patterns,
                ignore_patterns=plan.ignore_patterns,
            )
            if plan.delete_patterns:
                step = "deleting rotated files in"
                api.delete_files(
                    plan.repo_id,
                    delete_patterns=plan.delete_patterns,
                    repo_type="model",
                    revision=plan.revision,
                    commit_message=f"{plan.message} (delete rotated checkpoints)",
                    token=token,
                )
        else:
            api.upload_folder(
                folder_path=plan.folder,
                repo_id=plan.repo_id,
                repo_type="model",
                revision=plan.revision,
                commit_message=plan.message,
                allow_patterns=plan.allow_patterns,
                ignore_patterns=plan.ignore_patterns,
                delete_patterns=plan.delete_patterns or None,
                token=token,
            )
    except HubError:
        raise
    except Exception as e:
        raise _as_hub_error(e, step, plan.repo_id, token) from None
    url = str(repo_url) if isinstance(repo_url, str) and repo_url else f"{_endpoint()}/{plan.repo_id}"
    if plan.revision:
        url = f"{url.rstrip('/')}/tree/{plan.revision}"
    plan.url = url
    return plan


def push(
    run_dir: str | os.PathLike[str],
    *,
    repo_id: str | None = None,
    private: bool = True,
    revision: str | None = None,
    message: str | None = None,
    include: Iterable[str] | None = None,
    exclude: Iterable[str] | None = None,
    token: str | None = None,
    with_optimizer: bool = False,
    dry_run: bool = False,
    delete_patterns: Iterable[str] | None = None,
    api: Any = None,
) -> PushPlan:
    """Upload a run directory, one checkpoint or an exported model directory to the Hub.

    ``dry_run`` returns the same plan without a token or any network call. Errors are one-line
    ``HubError``/``CheckpointError``; the token appears in none of them."""
    plan = plan_push(
        run_dir,
        repo_id=repo_id,
        private=private,
        revision=revision,
        message=message,
        include=include,
        exclude=exclude,
        with_optimizer=with_optimizer,
        delete_patterns=delete_patterns,
        dry_run=dry_run,
    )
    if dry_run:
        return plan
    return execute_push(plan, token=token, api=api)


# ---------------------------------------------------------------------------------------------
# Background pushes during training


# Background pushes of one process run one at a time: two commits racing on one branch can
# fail, and the Hub history should read in step order.
_BACKGROUND_PUSH_LOCK = threading.Lock()


def _done_message(handle: BackgroundPush) -> str:
    plan = handle.plan
    if plan is None:
        return f"pushed {handle.checkpoint.name}"
    size = plan.total_bytes / 1e6
    return f"pushed {handle.checkpoint.name} to {plan.repo_id} ({len(plan.files)} files, {size:.1f} MB)"


class BackgroundPush:
    """Handle on a push running in a thread. Training polls ``done()`` and reads ``error``
    (a one-line message, or None) instead of catching anything: a push never raises into the
    loop. The thread is a daemon, so call ``wait()`` before the process exits."""

    def __init__(self, checkpoint: Path) -> None:
        self.checkpoint = checkpoint
        self.plan: PushPlan | None = None
        self.error: str | None = None
        self._finished = threading.Event()
        self._thread: threading.Thread | None = None

    def done(self) -> bool:
        return self._finished.is_set()

    def wait(self, timeout: float | None = None) -> bool:
        """Block until the push ends (or ``timeout`` seconds); True when it has ended."""
        return self._finished.wait(timeout)

    @property
    def ok(self) -> bool:
        return self.done() and self.error is None

    def __repr__(self) -> str:
        state = "running" if not self.done() else ("failed: " + self.error if self.error else "done")
        return f"BackgroundPush({self.checkpoint.name}, {state})"


def push_checkpoint_background(
    checkpoint: str | os.PathLike[str],
    *,
    repo_id: str | None,
    private: bool = True,
    revision: str | None = None,
    token: str | None = None,
    with_optimizer: bool = False,
    delete_patterns: Iterable[str] | None = None,
    message: str | None = None,
    api: Any = None,
    on_done: Callable[[str], None] | None = None,
    on_error: Callable[[str], None] | None = None,
) -> BackgroundPush:
    """Push one checkpoint (weights, meta.json, tokenizer/; optimizer state only if asked) to
    ``REPO/step_XXXXXXX/`` in a daemon thread and return at once. Pushes started while one is
    running wait for it (one at a time per process).

    Every failure (no token, no network, a partial checkpoint, a Hub refusal) ends up in
    ``handle.error`` as one line; nothing is raised here or in the thread. Hub progress bars
    are turned off for the process, since they would break the training panel.

    ``on_done(message)`` / ``on_error(message)`` are called from the push thread when it ends
    (e.g. to emit a ``push`` or ``warning`` event); an exception inside them is swallowed."""
    ckpt = Path(checkpoint)
    handle = BackgroundPush(ckpt)
    patterns = list(delete_patterns or [])

    def run() -> None:
        try:
            from huggingface_hub.utils import disable_progress_bars

            disable_progress_bars()
            step = ckpt.name.removeprefix("step_").lstrip("0") or "0"
            with _BACKGROUND_PUSH_LOCK:
                plan = plan_push(
                    ckpt,
                    repo_id=repo_id,
                    private=private,
                    revision=revision,
                    message=message or f"ramgpt: checkpoint at step {step}",
                    with_optimizer=with_optimizer,
                    delete_patterns=patterns,
                    dry_run=False,
                )
                handle.plan = plan
                execute_push(plan, token=token, api=api)
        except Exception as e:  # the loop must survive anything the Hub or the disk does
            msg = str(e) if isinstance(e, (HubError, CheckpointError)) else f"{type(e).__name__}: {e}"
            handle.error = _scrub(msg, token) or type(e).__name__
        try:  # before done() turns true, so a caller that wait()s also sees the callback's event
            callback, text = (on_error, handle.error) if handle.error else (on_done, _done_message(handle))
            if callback is not None:
                callback(text or "")
        except Exception:  # noqa: BLE001 - a failing sink must not kill the thread noisily
            pass
        finally:
            handle._finished.set()

    handle._thread = threading.Thread(target=run, name=f"ramgpt-push-{ckpt.name}", daemon=True)
    handle._thread.start()
    return handle


__all__ = [
    "ALWAYS_IGNORED",
    "LARGE_PUSH_BYTES",
    "LARGE_PUSH_FILES",
    "NO_TOKEN_MESSAGE",
    "OPTIMIZER_FILES",
    "PROBE_TIMEOUT_S",
    "BackgroundPush",
    "PushPlan",
    "PushSource",
    "execute_push",
    "has_token",
    "is_complete_checkpoint",
    "plan_push",
    "push",
    "push_checkpoint_background",
    "remote_delete_patterns",
    "resolve_token",
]

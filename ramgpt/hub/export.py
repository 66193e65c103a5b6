"""A checkpoint as a transformers ``GPT2LMHeadModel`` directory (``export_hf``), and the README.md
model card that export and push write.

Export writes into a staging folder inside the target and moves its files into place at the
end: the user's other files in the target are never touched (transformers' ``save_pretrained``
deletes stale weight shards in the folder it writes to), a failure leaves no half export, and
every exported file gets the mode a new file gets here (safetensors writes through a 0600
temporary file). Works offline.
"""

from __future__ import annotations

import errno
import json
import os
import re
import shutil
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from ramgpt.checkpoint.layout import META_FILE, TOKENIZER_DIR
from ramgpt.errors import CheckpointError
from ramgpt.hub.convert import model_to_hf_config, to_hf_state_dict

if TYPE_CHECKING:
    import torch

    from ramgpt.config import Profile

# The staging folder inside the target; starts with ".tmp-" so push never uploads a leftover.
_STAGING_PREFIX = ".tmp-export-"
_STAGING_RE = re.compile(r"^\.tmp-export-\d+$")


# ---------------------------------------------------------------------------------------------
# Export


def export_hf(
    checkpoint: str | os.PathLike[str],
    out_dir: str | os.PathLike[str],
    *,
    repo_id: str | None = None,
    license: str = "apache-2.0",
    overwrite: bool = False,
) -> Path:
    """Write a transformers ``GPT2LMHeadModel`` directory from a checkpoint (or a run dir's
    newest complete one): config.json, model.safetensors, generation_config.json, the tokenizer
    files and a README.md model card.

    A non-empty ``out_dir`` is refused unless ``overwrite``; then only the files export writes
    are replaced. Weights go through ``GPT2LMHeadModel.save_pretrained`` so the file is exactly
    what transformers writes itself (tied ``lm_head.weight`` stored once, as ``transformer.wte``).
    The model is built on the meta device and the mapped tensors are assigned, so no second
    random-initialised copy of a 1B model is allocated. Weights keep their saved dtype. An OS
    error on ``out_dir`` is a one-line :class:`CheckpointError` naming it.
    """
    from ramgpt.checkpoint import resolve_checkpoint

    ckpt_dir = resolve_checkpoint(Path(checkpoint))  # cheap: sizes, no weights read yet
    out = Path(out_dir)
    _check_target(out, ckpt_dir, overwrite)  # before reading a 1B model, not after
    step, meta, state = _load_weights(ckpt_dir)
    profile = _meta_config(meta, ckpt_dir)

    staging = out / f"{_STAGING_PREFIX}{os.getpid()}"
    try:
        out.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(staging, ignore_errors=True)
        model_dir = staging / "model"
        model_dir.mkdir(parents=True)
        _write_export(model_dir, ckpt_dir, profile, state, staging / TOKENIZER_DIR)
        card_meta = {**meta, "step": step}
        (model_dir / "README.md").write_text(
            model_card(card_meta, kind="transformers", repo_id=repo_id, license=license), encoding="utf-8"
        )
        mode = 0o666 & ~_umask()
        files = sorted(p for p in model_dir.iterdir() if p.is_file())
        for f in files:
            os.chmod(f, mode)
        for f in files:
            os.replace(f, out / f.name)
    except OSError as e:
        raise _os_error(out, e) from None
    except Exception as e:
        if (code := _safetensors_errno(e)) is None:
            raise
        raise _os_error(out, OSError(code, os.strerror(code))) from None
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return out


def _check_target(out: Path, ckpt_dir: Path, overwrite: bool) -> None:
    try:
        if out.exists() and not out.is_dir():
            raise CheckpointError(f"export target {out} exists and is not a directory; choose another path")
        if out.resolve() == ckpt_dir.resolve() or ckpt_dir.resolve() in out.resolve().parents:
            raise CheckpointError(f"export target {out} is inside the checkpoint {ckpt_dir}; choose another directory")
        if overwrite or not out.is_dir():
            return
        with os.scandir(out) as it:
            others = sorted(e.name for e in it if not _STAGING_RE.match(e.name))
    except OSError as e:
        raise _os_error(out, e) from None
    if others:
        raise CheckpointError(
            f"export target {out} is not empty ({len(others)} entries, e.g. {others[0]}); choose an empty "
            "directory, or pass --overwrite to replace only the files export writes"
        )


def _write_export(model_dir: Path, ckpt_dir: Path, profile: Profile, state: dict[str, torch.Tensor], tok_tmp: Path) -> None:
    """config.json, model.safetensors, generation_config.json and the tokenizer into ``model_dir``."""
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    mc = profile.model
    tok_src = ckpt_dir / TOKENIZER_DIR
    if not tok_src.is_dir():
        tok_src = _saved_profile_tokenizer(profile.data.tokenizer, tok_tmp)
    eos = _eos_id(tok_src) if tok_src.is_dir() else None
    if eos is not None and not 0 <= eos < mc.vocab_size:
        eos = None  # a tokenizer bigger than the model cannot be the model's; leave ids unset
    hf_cfg = GPT2Config(**model_to_hf_config(mc, eos_token_id=eos))
    hf_state = to_hf_state_dict(state)
    if mc.tie_embeddings:
        hf_state.pop("lm_head.weight", None)  # re-tied below, as transformers does
    with torch.device("meta"):
        model = GPT2LMHeadModel(hf_cfg)
    result = model.load_state_dict(hf_state, strict=False, assign=True)
    missing = [k for k in result.missing_keys if not (mc.tie_embeddings and k == "lm_head.weight")]
    if missing or result.unexpected_keys:
        bad = (missing or result.unexpected_keys)[0]
        raise CheckpointError(f"checkpoint {ckpt_dir} does not match its config ({bad} missing or unexpected)")
    if mc.tie_embeddings:
        model.tie_weights()
    model.eval()

    model.save_pretrained(model_dir, safe_serialization=True)
    if tok_src.is_dir():
        for f in sorted(tok_src.iterdir()):
            if f.is_file():
                shutil.copy2(f, model_dir / f.name)
        _set_model_max_length(model_dir / "tokenizer_config.json", mc.block_size)


def _load_weights(ckpt_dir: Path) -> tuple[int, dict[str, Any], dict[str, torch.Tensor]]:
    """(step, meta, model state) through ramgpt.checkpoint (never unpickles)."""
    from ramgpt.checkpoint import load_checkpoint

    loaded = load_checkpoint(ckpt_dir, map_location="cpu", with_optimizer=False)
    return int(loaded.step), dict(loaded.meta), dict(loaded.model_state)


def _meta_config(meta: Mapping[str, Any], where: Path) -> Profile:
    from ramgpt.config import profile_from_dict

    cfg = meta.get("config")
    if not isinstance(cfg, dict):
        raise CheckpointError(f"{where}/{META_FILE} has no config dump; cannot tell the model shape")
    return profile_from_dict(cfg)


def _saved_profile_tokenizer(spec: str, where: Path) -> Path:
    """Checkpoints written without a tokenizer/ dir: save the profile's tokenizer instead, but
    only an offline one (the embedded tokenizer or a local path), so export never waits on the
    network. Returns ``where`` (which may stay absent: the export then has no tokenizer)."""
    if spec != "embedded" and not Path(spec).expanduser().exists():
        return where
    try:
        from ramgpt.tokenizer import load_tokenizer

        tok = load_tokenizer(spec)
        where.mkdir(parents=True, exist_ok=True)
        tok.save(where)
    except Exception:  # noqa: BLE001 - no tokenizer is a smaller problem than no export
        shutil.rmtree(where, ignore_errors=True)
    return where


def _eos_id(tokenizer_dir: Path) -> int | None:
    """The EOS id from a saved tokenizer directory, without needing ramgpt.tokenizer."""
    tj = tokenizer_dir / "tokenizer.json"
    if not tj.is_file():
        return None
    eos = "<|endoftext|>"
    for name in ("special_tokens_map.json", "tokenizer_config.json"):
        try:
            d = json.loads((tokenizer_dir / name).read_text(encoding="utf-8"))
        except (OSError, ValueError):
            continue
        tok = d.get("eos_token")
        if isinstance(tok, dict):
            tok = tok.get("content")
        if isinstance(tok, str) and tok:
            eos = tok
            break
    try:
        from tokenizers import Tokenizer

        return Tokenizer.from_file(str(tj)).token_to_id(eos)
    except Exception:  # a tokenizer.json tokenizers cannot read: leave the ids unset
        return None


def _set_model_max_length(path: Path, block_size: int) -> None:
    """Tell transformers the context length, so pipelines truncate instead of indexing past wpe."""
    try:
        d = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return
    if not isinstance(d, dict):
        return
    current = d.get("model_max_length")
    if not isinstance(current, int) or current > block_size:
        d["model_max_length"] = block_size
        path.write_text(json.dumps(d, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


def _umask() -> int:
    """The process umask, read without changing it where Linux allows (os.umask can only be
    read by setting it, which races with other threads creating files)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


# What to do about an OS error on the target, by errno.
_ADVICE = {
    errno.EROFS: "the file system is read-only; choose a directory on a writable disk",
    errno.EACCES: "permission denied; choose a directory you can write to, or fix its permissions",
    errno.EPERM: "operation not permitted (immutable or protected); choose another directory",
    errno.ENOSPC: "no space left on the device; free some space or choose another disk",
    errno.EDQUOT: "disk quota exceeded; free some space or choose another disk",
    errno.ENOTDIR: "a part of the path is a file, not a directory; choose another path",
    errno.EEXIST: "a part of the path is a file, not a directory; choose another path",
    errno.EISDIR: "a directory there has the name of a file export writes; move it or choose another directory",
}


def _safetensors_errno(e: BaseException) -> int | None:
    """safetensors reports an OS error as ``SafetensorError("... I/O error: ... (os error 28) ...")``."""
    if type(e).__name__ != "SafetensorError":
        return None
    m = re.search(r"\(os error (\d+)\)", str(e))
    return int(m.group(1)) if m else None


def _os_error(out: Path, e: OSError) -> CheckpointError:
    """An OS error while exporting to ``out`` -> one line naming the path and what to do. A file
    outside ``out`` that cannot be read (the checkpoint's tokenizer) is named as such."""
    filename = Path(e.filename) if isinstance(e.filename, (str, os.PathLike)) else None
    if filename is not None and not _is_within(filename, out):
        reason = e.strerror or type(e).__name__
        return CheckpointError(f"cannot read {filename}: {reason[:1].lower()}{reason[1:]}")
    advice = _ADVICE.get(e.errno) if e.errno is not None else None
    if advice is None:
        reason = e.strerror or (str(e).strip().splitlines() or [type(e).__name__])[0]
        advice = f"{reason[:1].lower()}{reason[1:]}; choose another directory"
    return CheckpointError(f"cannot write the export to {out}: {advice}")


def _is_within(path: Path, folder: Path) -> bool:
    path, folder = Path(os.path.abspath(path)), Path(os.path.abspath(folder))
    return path == folder or folder in path.parents


# ---------------------------------------------------------------------------------------------
# Model cards


def _first_number(meta: Mapping[str, Any], *keys: str) -> float | None:
    for k in keys:
        v = meta.get(k)
        if isinstance(v, (int, float)) and not isinstance(v, bool):
            return v
    return None


def _yaml_block(data: Any) -> str:
    import yaml

    return yaml.safe_dump(data, sort_keys=False, allow_unicode=True).rstrip()


# Config fields that hold a local path (always, or when the value is one rather than a Hub id).
_LOCAL_PATH_FIELDS = (("data", "path"), ("checkpoint", "out_dir"))
_MAYBE_PATH_FIELDS = (("data", "tokenizer"), ("data", "dataset_name"))


def _is_local_path(value: str) -> bool:
    """A Hub id is ``name`` or ``owner/name``; anything path-shaped, or present on this disk (the
    tokenizer loader's first rule), is a local path."""
    return (
        value.startswith((".", "/", "~"))
        or "\\" in value
        or value.count("/") > 1
        or Path(value).expanduser().exists()
    )


def _public_config(cfg: Mapping[str, Any]) -> dict[str, Any]:
    """The effective config as a public card shows it: local paths keep only their last part,
    so a card never tells where the user keeps their data (``/home/alice/corpus/ja.txt`` ->
    ``ja.txt``)."""
    out = {k: dict(v) if isinstance(v, Mapping) else v for k, v in cfg.items()}
    fields = [(f, True) for f in _LOCAL_PATH_FIELDS] + [(f, False) for f in _MAYBE_PATH_FIELDS]
    for (section_name, key), always_local in fields:
        section = out.get(section_name)
        if not isinstance(section, dict):
            continue
        value = section.get(key)
        if isinstance(value, str) and value and (always_local or _is_local_path(value)):
            section[key] = Path(value.rstrip("/\\")).name or value
    return out


def model_card(
    meta: Mapping[str, Any],
    *,
    kind: Literal["transformers", "run"] = "transformers",
    repo_id: str | None = None,
    license: str = "apache-2.0",
) -> str:
    """README.md for the Hub: YAML front matter, what was trained, the effective config, usage.

    ``kind="transformers"`` describes an exported GPT2LMHeadModel directory; ``kind="run"`` a
    pushed run directory (ramgpt checkpoints, loadable with ``ramgpt generate``). Local paths in
    the config appear as their file name only."""
    cfg = _public_config(meta["config"]) if isinstance(meta.get("config"), dict) else {}
    name = cfg.get("name", "custom")
    model = cfg.get("model", {})
    step = meta.get("step")
    tokens = _first_number(meta, "tokens_seen")
    eval_loss = _first_number(meta, "eval_loss", "best_eval_loss")
    repo = repo_id or "USER/NAME"
    front: dict[str, Any] = {"license": license, "language": ["ja", "en"]}
    if kind == "transformers":
        front.update({"library_name": "transformers", "pipeline_tag": "text-generation", "tags": ["gpt2", "ramgpt"]})
    else:
        front["tags"] = ["ramgpt"]
    lines = ["---", _yaml_block(front), "---", ""]
    title = "GPT-2" if not model else f"GPT-2 ({model.get('n_layer')} layers, {model.get('n_embd')} wide)"
    lines += [f"# {title} pre-trained with ramgpt", ""]
    lines.append(f"- training profile: `{name}`")
    if step is not None:
        lines.append(f"- optimizer steps: {step}")
    if tokens is not None:
        lines.append(f"- tokens seen: {int(tokens):,}")
    lines.append(f"- eval loss: {eval_loss:.4f}" if eval_loss is not None else "- eval loss: not measured")
    if cfg.get("data"):
        data = cfg["data"]
        src = data.get("dataset_name") or data.get("path") or data.get("source")
        lines.append(f"- data: `{src}`, tokenizer `{data.get('tokenizer')}`")
    lines += ["", "## Effective config", "", "```yaml", _yaml_block(cfg) if cfg else "# not recorded", "```", ""]
    lines += ["## Usage", ""]
    if kind == "transformers":
        lines += [
            "```python",
            "from transformers import AutoModelForCausalLM, AutoTokenizer",
            "",
            f'tok = AutoTokenizer.from_pretrained("{repo}")',
            f'model = AutoModelForCausalLM.from_pretrained("{repo}")',
            'ids = tok("今日は", return_tensors="pt").input_ids',
            "out = model.generate(ids, max_new_tokens=64, do_sample=True, top_k=50, top_p=0.95)",
            "print(tok.decode(out[0]))",
            "```",
        ]
    else:
        lines += [
            "These are ramgpt checkpoints (`step_*/`), not a transformers model; use `ramgpt export` for that.",
            "",
            "```bash",
            f"hf download {repo} --local-dir run",
            "ramgpt generate -c run -p '今日は'",
            "```",
        ]
    lines.append("")
    return "\n".join(lines)


__all__ = ["export_hf", "model_card"]

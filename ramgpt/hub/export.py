"""A checkpoint as a transformers ``GPT2LMHeadModel`` directory (``export_hf``), and the README.md
model card that export and push write. Works offline."""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from ramgpt.checkpoint.layout import META_FILE, TOKENIZER_DIR
from ramgpt.errors import CheckpointError
from ramgpt.hub.convert import model_to_hf_config, to_hf_state_dict

if TYPE_CHECKING:
    import torch

# ---------------------------------------------------------------------------------------------
# Checkpoint reading and model cards


def _read_checkpoint(path: Path) -> tuple[Path, int, dict[str, Any], dict[str, torch.Tensor]]:
    """(checkpoint dir, step, meta, model state) through ramgpt.checkpoint (never unpickles)."""
    from ramgpt.checkpoint import load_checkpoint, resolve_checkpoint

    ckpt = resolve_checkpoint(path)
    loaded = load_checkpoint(ckpt, map_location="cpu", with_optimizer=False)
    return Path(loaded.path), int(loaded.step), dict(loaded.meta), dict(loaded.model_state)


def _meta_config(meta: Mapping[str, Any], where: Path):
    from ramgpt.config import profile_from_dict

    cfg = meta.get("config")
    if not isinstance(cfg, dict):
        raise CheckpointError(f"{where}/{META_FILE} has no config dump; cannot tell the model shape")
    return profile_from_dict(cfg)


def _first_number(meta: Mapping[str, Any], *keys: str) -> float | None:
    for k in keys:
        v = meta.get(k)
        if isinstance(v, (int, float)) and not isinstance(v, bool):
            return v
    return None


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


def _yaml_block(data: Any) -> str:
    import yaml

    return yaml.safe_dump(data, sort_keys=False, allow_unicode=True).rstrip()


def model_card(
    meta: Mapping[str, Any],
    *,
    kind: Literal["transformers", "run"] = "transformers",
    repo_id: str | None = None,
    license: str = "apache-2.0",
) -> str:
    """README.md for the Hub: YAML front matter, what was trained, the effective config, usage.

    ``kind="transformers"`` describes an exported GPT2LMHeadModel directory; ``kind="run"`` a
    pushed run directory (ramgpt checkpoints, loadable with ``ramgpt generate``)."""
    cfg = meta.get("config") if isinstance(meta.get("config"), dict) else {}
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


# ---------------------------------------------------------------------------------------------
# Export


def export_hf(
    checkpoint: str | os.PathLike[str],
    out_dir: str | os.PathLike[str],
    *,
    repo_id: str | None = None,
    license: str = "apache-2.0",
) -> Path:
    """Write a transformers ``GPT2LMHeadModel`` directory from a checkpoint (or a run dir's
    newest complete one): config.json, model.safetensors, generation_config.json, the tokenizer
    files and a README.md model card. Works offline.

    Weights go through ``GPT2LMHeadModel.save_pretrained`` so the file is exactly what
    transformers writes itself (tied ``lm_head.weight`` stored once, as ``transformer.wte``).
    The model is built on the meta device and the mapped tensors are assigned, so no second
    random-initialised copy of a 1B model is allocated. Weights keep their saved dtype.
    """
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    ckpt_dir, step, meta, state = _read_checkpoint(Path(checkpoint))
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise CheckpointError(f"export target {out} exists and is not a directory")
    if out.resolve() == ckpt_dir.resolve() or ckpt_dir.resolve() in out.resolve().parents:
        raise CheckpointError(f"export target {out} is inside the checkpoint {ckpt_dir}; choose another directory")
    profile = _meta_config(meta, ckpt_dir)
    mc = profile.model

    tok_src = ckpt_dir / TOKENIZER_DIR
    if not tok_src.is_dir():
        tok_src = _saved_profile_tokenizer(profile.data.tokenizer, out / ".ramgpt-tokenizer")
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

    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out, safe_serialization=True)
    if tok_src.is_dir():
        for f in sorted(tok_src.iterdir()):
            if f.is_file():
                shutil.copy2(f, out / f.name)
        _set_model_max_length(out / "tokenizer_config.json", mc.block_size)
    shutil.rmtree(out / ".ramgpt-tokenizer", ignore_errors=True)
    card_meta = {**meta, "step": step}
    (out / "README.md").write_text(
        model_card(card_meta, kind="transformers", repo_id=repo_id, license=license), encoding="utf-8"
    )
    return out


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


__all__ = ["export_hf", "model_card"]

"""Hugging Face interop: the name mapping table, ``export_hf`` (a transformers GPT-2 directory)
and ``push`` (upload a run, a checkpoint or an export to the Hub).

Three rules shape this module:

- **One mapping table** (``HF_NAME_MAP``) drives both directions, so export and import cannot
  drift apart. The only GPT-2 quirk is that HF's ``Conv1D`` stores Linear weights as (in, out)
  where torch stores (out, in); those rows carry ``transpose=True``.
- **The token is never data.** It is resolved at call time (``--token``, ``HF_TOKEN``, the
  login cache), handed to ``HfApi`` and nothing else: not to ``PushPlan``, not to a log line,
  not to a file, not to an error message (messages are scrubbed as well).
- **A push fails fast and in one line.** The Hub client waits forever on a black-holed host,
  so ``push`` first probes the endpoint with a short timeout; every Hub exception becomes a
  one-line ``HubError``.

``upload_folder`` vs ``upload_large_folder``: huggingface_hub 2.x removed
``upload_large_folder`` because ``upload_folder`` itself now streams, batches big folders into
several commits (``... (part N)`` messages) and resumes when re-run. With huggingface_hub < 2,
big pushes (> ``LARGE_PUSH_BYTES`` or > ``LARGE_PUSH_FILES``) use ``upload_large_folder``,
which is resumable but takes no commit message and no delete patterns (deletions then go in a
separate ``delete_files`` commit) and keeps its resume state in ``FOLDER/.cache/huggingface/``.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import threading
from collections.abc import Callable, Iterable, Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from ramgpt.errors import CheckpointError, HubError

if TYPE_CHECKING:
    import torch

# ---------------------------------------------------------------------------------------------
# The mapping table: (ramgpt name, transformers GPT2LMHeadModel name, transpose).
# ``{i}`` is the block index. Linear weights of the blocks are transposed (Conv1D is (in, out)).
HF_NAME_MAP: tuple[tuple[str, str, bool], ...] = (
    ("embed.wte.weight", "transformer.wte.weight", False),
    ("embed.wpe.weight", "transformer.wpe.weight", False),
    ("h.{i}.ln_1.weight", "transformer.h.{i}.ln_1.weight", False),
    ("h.{i}.ln_1.bias", "transformer.h.{i}.ln_1.bias", False),
    ("h.{i}.attn.c_attn.weight", "transformer.h.{i}.attn.c_attn.weight", True),
    ("h.{i}.attn.c_attn.bias", "transformer.h.{i}.attn.c_attn.bias", False),
    ("h.{i}.attn.c_proj.weight", "transformer.h.{i}.attn.c_proj.weight", True),
    ("h.{i}.attn.c_proj.bias", "transformer.h.{i}.attn.c_proj.bias", False),
    ("h.{i}.ln_2.weight", "transformer.h.{i}.ln_2.weight", False),
    ("h.{i}.ln_2.bias", "transformer.h.{i}.ln_2.bias", False),
    ("h.{i}.mlp.c_fc.weight", "transformer.h.{i}.mlp.c_fc.weight", True),
    ("h.{i}.mlp.c_fc.bias", "transformer.h.{i}.mlp.c_fc.bias", False),
    ("h.{i}.mlp.c_proj.weight", "transformer.h.{i}.mlp.c_proj.weight", True),
    ("h.{i}.mlp.c_proj.bias", "transformer.h.{i}.mlp.c_proj.bias", False),
    ("head.ln_f.weight", "transformer.ln_f.weight", False),
    ("head.ln_f.bias", "transformer.ln_f.bias", False),
    ("head.lm_head.weight", "lm_head.weight", False),  # tied to wte unless tie_embeddings=false
)

# Old GPT-2 checkpoints (the original "gpt2" weights) also hold causal-mask buffers; not weights.
_HF_BUFFER_SUFFIXES = (".attn.bias", ".attn.masked_bias")


def _pattern_regex(pattern: str) -> re.Pattern[str]:
    return re.compile("^" + re.escape(pattern).replace(re.escape("{i}"), r"(?P<i>\d+)") + "$")


_TO_HF = [(_pattern_regex(r), h, t) for r, h, t in HF_NAME_MAP]
_FROM_HF = [(_pattern_regex(h), r, t) for r, h, t in HF_NAME_MAP]


def _rename(key: str, table: list[tuple[re.Pattern[str], str, bool]]) -> tuple[str, bool] | None:
    for rx, target, transpose in table:
        m = rx.match(key)
        if m:
            return target.format(i=m.group("i")) if "{i}" in target else target, transpose
    return None


def _same_memory(a: torch.Tensor, b: torch.Tensor) -> bool:
    return (
        a.shape == b.shape
        and a.dtype == b.dtype
        and a.device == b.device
        and a.untyped_storage().data_ptr() == b.untyped_storage().data_ptr()
        and a.storage_offset() == b.storage_offset()
        and a.stride() == b.stride()
    )


def _n_layer_of(keys: Iterable[str], prefix: str) -> int:
    rx = re.compile("^" + re.escape(prefix) + r"(\d+)\.")
    idx = [int(m.group(1)) for k in keys if (m := rx.match(k))]
    return max(idx) + 1 if idx else 0


def to_hf_state_dict(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """ramgpt state dict -> a complete ``GPT2LMHeadModel`` state dict (float dtype kept).

    Accepts the state as saved (tied head stored once as ``embed.wte.weight``) or as
    ``GPT.state_dict()`` returns it. A missing ``head.lm_head.weight`` means tied: the result's
    ``lm_head.weight`` is then the same tensor as ``transformer.wte.weight``, as in HF. Profiles
    with ``bias: false`` have no biases; GPT-2 always has them, so zero biases are filled in,
    which is exact (a Linear/LayerNorm with a zero bias computes the same thing).
    """
    import torch

    out: dict[str, torch.Tensor] = {}
    for key, tensor in state.items():
        hit = _rename(key, _TO_HF)
        if hit is None:
            raise CheckpointError(f"cannot map {key!r} to a GPT-2 weight name (not a ramgpt GPT state dict?)")
        name, transpose = hit
        out[name] = tensor.t().contiguous() if transpose else tensor
    if "transformer.wte.weight" not in out:
        raise CheckpointError("state dict has no embed.wte.weight (not a ramgpt GPT state dict?)")
    wte = out["transformer.wte.weight"]
    out.setdefault("lm_head.weight", wte)
    n_embd = wte.shape[1]
    zeros = lambda n: torch.zeros(n, dtype=wte.dtype, device=wte.device)  # noqa: E731
    for i in range(_n_layer_of(out, "transformer.h.")):
        p = f"transformer.h.{i}."
        for ln in ("ln_1", "ln_2"):
            out.setdefault(f"{p}{ln}.bias", zeros(n_embd))
        # Conv1D weight is (in, out): the bias has `out` entries.
        for lin in ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj"):
            out.setdefault(f"{p}{lin}.bias", zeros(out[f"{p}{lin}.weight"].shape[1]))
    out.setdefault("transformer.ln_f.bias", zeros(n_embd))
    return out


def from_hf_state_dict(
    hf_state: Mapping[str, torch.Tensor], *, bias: bool = True, vocab_size: int | None = None
) -> dict[str, torch.Tensor]:
    """``GPT2LMHeadModel`` (or bare ``GPT2Model``) weights -> a ramgpt ``GPT.state_dict()``.

    This is how a run starts from OpenAI's GPT-2 instead of random weights. Causal-mask buffers
    of old checkpoints are skipped; a missing ``lm_head.weight`` means tied (the result's head
    is the same tensor as ``embed.wte.weight``). ``bias=False`` drops the biases for a bias-free
    profile, refusing non-zero ones (that would silently change the model). ``vocab_size``
    pads the embedding rows with zeros (GPT-2's 50257 -> ramgpt's 64-aligned 50304); padded ids
    are never produced by the tokenizer.
    """
    import torch

    out: dict[str, torch.Tensor] = {}
    for key, tensor in hf_state.items():
        if key.endswith(_HF_BUFFER_SUFFIXES):
            continue
        full = key if key.startswith(("transformer.", "lm_head.")) else f"transformer.{key}"
        hit = _rename(full, _FROM_HF)
        if hit is None:
            raise CheckpointError(f"cannot map {key!r} to a ramgpt weight name (not a GPT-2 state dict?)")
        name, transpose = hit
        if name.endswith(".bias") and not bias:
            if torch.count_nonzero(tensor).item():
                raise CheckpointError(f"{key} is not zero: this GPT-2 needs a profile with model.bias=true")
            continue
        out[name] = tensor.t().contiguous() if transpose else tensor
    if "embed.wte.weight" not in out:
        raise CheckpointError("state dict has no wte.weight (not a GPT-2 state dict?)")
    # tied: no separate head, or a head that is a view of the same memory (state_dict() detaches
    # each key into its own tensor object, so identity is not the test)
    tied = "head.lm_head.weight" not in out or _same_memory(out["head.lm_head.weight"], out["embed.wte.weight"])
    if tied:
        out.pop("head.lm_head.weight", None)
    if vocab_size is not None:
        for name in ("embed.wte.weight", "head.lm_head.weight"):
            if name not in out:
                continue
            w = out[name]
            if vocab_size < w.shape[0]:
                raise CheckpointError(f"vocab_size {vocab_size} is smaller than the checkpoint's {w.shape[0]} rows")
            if vocab_size > w.shape[0]:
                out[name] = torch.cat([w, w.new_zeros(vocab_size - w.shape[0], w.shape[1])])
    if tied:
        out["head.lm_head.weight"] = out["embed.wte.weight"]
    return out


def hf_config_to_model_fields(hf_config: Mapping[str, Any]) -> dict[str, Any]:
    """A GPT-2 ``config.json`` -> the ``model`` section of a ramgpt profile (for imports)."""
    return {
        "n_layer": int(hf_config["n_layer"]),
        "n_head": int(hf_config["n_head"]),
        "n_embd": int(hf_config["n_embd"]),
        "block_size": int(hf_config["n_positions"]),
        "vocab_size": int(hf_config["vocab_size"]),
        "dropout": float(hf_config.get("resid_pdrop", 0.0)),
        "bias": True,
        "tie_embeddings": bool(hf_config.get("tie_word_embeddings", True)),
    }


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
        raise CheckpointError(f"{where}/meta.json has no config dump; cannot tell the model shape")
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

    tok_src = ckpt_dir / "tokenizer"
    if not tok_src.is_dir():
        tok_src = _saved_profile_tokenizer(profile.data.tokenizer, out / ".ramgpt-tokenizer")
    eos = _eos_id(tok_src) if tok_src.is_dir() else None
    if eos is not None and not 0 <= eos < mc.vocab_size:
        eos = None  # a tokenizer bigger than the model cannot be the model's; leave ids unset
    hf_cfg = GPT2Config(
        vocab_size=mc.vocab_size,
        n_positions=mc.block_size,
        n_embd=mc.n_embd,
        n_layer=mc.n_layer,
        n_head=mc.n_head,
        activation_function="gelu_new",  # ramgpt uses GELU(approximate="tanh"), which is gelu_new
        layer_norm_epsilon=1e-5,
        resid_pdrop=mc.dropout,
        embd_pdrop=mc.dropout,
        attn_pdrop=mc.dropout,
        tie_word_embeddings=mc.tie_embeddings,
        bos_token_id=eos,
        eos_token_id=eos,
        architectures=["GPT2LMHeadModel"],
    )
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


# ---------------------------------------------------------------------------------------------
# Push: what to send

STEP_DIR_RE = re.compile(r"^step_\d{7}$")  # the same rule as ramgpt.checkpoint
# Above either limit, huggingface_hub < 2 needs upload_large_folder (2.x batches by itself).
LARGE_PUSH_BYTES = 5 * 1024**3
LARGE_PUSH_FILES = 500
# How long the reachability probe waits: the Hub client itself never times out.
PROBE_TIMEOUT_S = 10.0

OPTIMIZER_FILES = ("optimizer.safetensors", "optimizer.json")
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


def _read_meta(d: Path) -> dict[str, Any]:
    try:
        meta = json.loads((d / "meta.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return meta if isinstance(meta, dict) else {}


def is_complete_checkpoint(d: str | os.PathLike[str]) -> bool:
    """The checkpoint contract (ramgpt.checkpoint): a ``step_\\d{7}`` directory whose meta.json
    parses and lists files that all exist with their recorded sizes."""
    from ramgpt.checkpoint import list_checkpoints

    d = Path(d)
    return any(i.complete and i.path.name == d.name for i in list_checkpoints(d.parent))


def _classify(folder: Path) -> PushSource:
    if not folder.is_dir():
        raise HubError(f"{folder} is not a directory (expected a run directory, a checkpoint or an exported model)")
    if (
        (folder / "config.json").is_file()
        and (folder / "model.safetensors").is_file()
        and not (folder / "meta.json").exists()
    ):
        return "export"
    if (folder / "meta.json").exists() or STEP_DIR_RE.match(folder.name):
        from ramgpt.checkpoint import resolve_checkpoint

        resolve_checkpoint(folder)  # one-line CheckpointError for a partial or corrupt one
        return "checkpoint"
    if (
        any(STEP_DIR_RE.match(p.name) or p.name.startswith(".tmp-step_") for p in folder.iterdir())
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
    return _read_meta(complete[-1].path) if complete else {}


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
    private: bool = False,
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
            name = f"step_{s:07d}"
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
    private: bool = False,
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
    "HF_NAME_MAP",
    "BackgroundPush",
    "PushPlan",
    "execute_push",
    "export_hf",
    "from_hf_state_dict",
    "has_token",
    "hf_config_to_model_fields",
    "is_complete_checkpoint",
    "model_card",
    "plan_push",
    "push",
    "push_checkpoint_background",
    "remote_delete_patterns",
    "resolve_token",
    "to_hf_state_dict",
]

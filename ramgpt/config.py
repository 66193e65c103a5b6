"""Profiles: frozen pydantic models, loaded from YAML, merged with environment variables and
``--set`` overrides, validated once before any work starts.

Precedence (lowest first): the profile file (and the files it ``extends``), ``RAMGPT_*``
environment variables (``RAMGPT_OPTIM__LR=1e-3``; ``__`` separates section and field), then
``--set section.field=value`` options. Every field carries a description; ``docs/profiles.md``
is generated from them (``python -m ramgpt.config > docs/profiles.md``).
"""

from __future__ import annotations

import copy
import math
import os
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from ramgpt.errors import ConfigError

PROFILES_DIR = Path(__file__).resolve().parent.parent / "profiles"
# Profiles also ship inside the package so a non-editable install finds them.
PACKAGED_PROFILES_DIR = Path(__file__).resolve().parent / "profiles"


class _Section(BaseModel):
    # coerce_numbers_to_str: `--set data.path=2024` reaches a str field as YAML's int 2024
    model_config = ConfigDict(extra="forbid", frozen=True, validate_default=True, coerce_numbers_to_str=True)


class ModelConfig(_Section):
    """GPT-2 shape."""

    n_layer: int = Field(12, ge=1, description="Number of transformer blocks.")
    n_head: int = Field(12, ge=1, description="Attention heads per block.")
    n_embd: int = Field(768, ge=8, description="Hidden size; must be divisible by n_head.")
    block_size: int = Field(1024, ge=8, description="Maximum positions (learned position table size).")
    vocab_size: int = Field(
        50304, ge=16, description="Embedding rows; must be >= the tokenizer's vocabulary (padded to 64 for speed)."
    )
    dropout: float = Field(0.0, ge=0.0, lt=1.0, description="Dropout probability (0 for pre-training).")
    bias: bool = Field(True, description="Use biases in Linear and LayerNorm layers, as GPT-2 does.")
    tie_embeddings: bool = Field(True, description="Share the input embedding and the output head, as GPT-2 does.")

    @model_validator(mode="after")
    def _heads_divide(self) -> ModelConfig:
        if self.n_embd % self.n_head != 0:
            raise ValueError(f"n_embd ({self.n_embd}) must be divisible by n_head ({self.n_head})")
        return self

    @property
    def head_dim(self) -> int:
        return self.n_embd // self.n_head


class DataConfig(_Section):
    """Where text comes from and how it becomes fixed-length training blocks."""

    source: Literal["embedded", "text", "json", "parquet", "hub"] = Field(
        "embedded",
        description="embedded: the small corpus shipped in the package; text: a .txt file or a directory of "
        ".txt files (one line = one sample); json/parquet: local files read through `datasets` streaming; "
        "hub: a Hugging Face Hub dataset through `datasets` streaming.",
    )
    path: str | None = Field(None, description="Local file or directory for source text/json/parquet.")
    dataset_name: str | None = Field(
        None,
        description="Hub dataset id for source=hub, or a local copy of the Hub repository "
        "(`hf download ID --repo-type dataset --local-dir DIR`), read without a network.",
    )
    dataset_config: str | None = Field(None, description="Hub dataset configuration (subset), e.g. sample_10BT.")
    train_split: str = Field("train", description="Split used for training.")
    eval_split: str | None = Field(
        None, description="Split used for evaluation; when empty, the first eval samples are held out of the train stream."
    )
    text_column: str = Field("text", description="Column holding the text (json/parquet/hub).")
    tokenizer: str = Field(
        "embedded",
        description="'embedded' (shipped byte-level BPE), a local tokenizer directory or tokenizer.json, or a Hub name such as gpt2.",
    )
    seq_len: int = Field(1024, ge=8, description="Tokens per training sequence (packed across documents with EOS).")
    max_train_samples: int | None = Field(None, ge=1, description="Stop reading training documents after this many (one epoch).")
    max_eval_samples: int = Field(64, ge=1, description="Documents used for evaluation.")
    shuffle_buffer: int = Field(1000, ge=1, description="Seeded shuffle buffer size for streamed documents (1 = no shuffle).")
    seed: int = Field(1234, description="Seed for the data order.")
    train_tokenizer: bool = Field(
        False,
        description="Train a byte-level BPE on the first tokenizer_samples training documents into "
        "RUN_DIR/tokenizer/ before the first step (data.tokenizer is then not used; a resume reuses the saved one).",
    )
    tokenizer_samples: int = Field(50_000, ge=1, description="Training documents read to learn the tokenizer.")
    tokenizer_vocab_size: int | None = Field(
        None, ge=258, description="Vocabulary the tokenizer learns (default: model.vocab_size; padded up to it)."
    )


class OptimConfig(_Section):
    """AdamW and batch shape."""

    lr: float = Field(6e-4, gt=0.0, description="Peak learning rate.")
    weight_decay: float = Field(0.1, ge=0.0, description="Decoupled weight decay (not applied to biases, norms, positions).")
    beta1: float = Field(0.9, gt=0.0, lt=1.0, description="AdamW beta1.")
    beta2: float = Field(0.95, gt=0.0, lt=1.0, description="AdamW beta2.")
    eps: float = Field(1e-8, gt=0.0, description="AdamW epsilon.")
    grad_clip: float = Field(1.0, ge=0.0, description="Clip the global gradient norm to this (0 disables).")
    micro_batch_size: int = Field(1, ge=1, description="Sequences per micro-batch.")
    grad_accum_steps: int = Field(1, ge=1, description="Micro-batches per optimizer step.")
    max_steps: int = Field(1000, ge=1, description="Optimizer steps to train.")

    @property
    def seqs_per_step(self) -> int:
        return self.micro_batch_size * self.grad_accum_steps


class SchedulerConfig(_Section):
    """Learning-rate schedule: linear warmup from step 1, then cosine (or constant) decay."""

    kind: Literal["cosine", "constant"] = Field("cosine", description="Decay after warmup.")
    warmup_steps: int = Field(100, ge=0, description="Linear warmup steps; step 1 already gets lr/warmup_steps.")
    min_lr_ratio: float = Field(0.1, ge=0.0, le=1.0, description="Final lr as a fraction of the peak (cosine).")
    decay_steps: int | None = Field(None, ge=1, description="Steps over which cosine decays (default: optim.max_steps).")


class CheckpointConfig(_Section):
    """Saving, rotation and optional Hub pushes."""

    out_dir: str | None = Field(None, description="Run directory (default: runs/<profile name>).")
    save_interval_steps: int | None = Field(
        1000, ge=1, description="Save a checkpoint every this many optimizer steps (null: only by the clock)."
    )
    save_interval_minutes: float | None = Field(
        None,
        gt=0.0,
        description="Also save when this many minutes of wall time have passed since the last save (null: off); "
        "either or both intervals can be set.",
    )
    keep_last_n: int = Field(3, ge=1, description="Keep only the newest N checkpoints (the best-eval one is kept too).")
    background: bool = Field(
        True,
        description="Write checkpoints while the next step trains (streamed engine: from the live tensors, no "
        "second copy in RAM; the next update of a tensor waits until it is written). false: training waits.",
    )
    require_free_disk: bool = Field(
        True,
        description="Refuse to start when the disk cannot hold keep_last_n + 1 checkpoints (ramgpt train --force "
        "turns it off).",
    )
    save_on_interrupt: bool = Field(True, description="Write a checkpoint when training is interrupted with Ctrl-C.")
    save_final: bool = Field(True, description="Write a checkpoint when training ends.")
    hf_repo_id: str | None = Field(None, description="Push checkpoints to this Hub repo (USER/NAME) during training.")
    push_to_hub_interval: int | None = Field(None, ge=1, description="Push every this many steps (needs hf_repo_id).")
    hub_private: bool = Field(True, description="Create the Hub repo as private.")
    push_optimizer_state: bool = Field(False, description="Also upload optimizer state when pushing.")
    delete_remote_rotated: bool = Field(False, description="Delete checkpoints on the Hub that were rotated away locally.")


class LoggingConfig(_Section):
    """Where metrics go and how often."""

    log_interval: int = Field(10, ge=1, description="Log metrics every this many optimizer steps.")
    eval_interval: int = Field(500, ge=1, description="Evaluate every this many optimizer steps (and at the end).")
    eval_batches: int = Field(8, ge=1, description="Micro-batches per evaluation.")
    tui: Literal["auto", "on", "off"] = Field("auto", description="Rich live panel: auto (only on a terminal), on, off.")
    use_wandb: bool = Field(False, description="Log to Weights & Biases (WANDB_MODE=offline works without network).")

    @field_validator("tui", mode="before")
    @classmethod
    def _tui_word(cls, v: Any) -> Any:
        # YAML 1.1 reads a bare `tui: off` as False
        return ("on" if v else "off") if isinstance(v, bool) else v
    wandb_project: str = Field("ramgpt", description="W&B project.")
    wandb_run_name: str | None = Field(None, description="W&B run name (default: the run directory's name).")


class RuntimeConfig(_Section):
    """Device, precision, engine and memory budget."""

    device: str = Field("auto", description="auto (CUDA when available, else CPU), cpu, cuda or cuda:N.")
    precision: Literal["auto", "bf16", "fp16", "fp32"] = Field(
        "auto", description="auto: bf16 on CUDA cards that support it, fp16 on older cards, fp32 on CPU."
    )
    engine: Literal["auto", "resident", "streamed"] = Field(
        "auto",
        description="resident: all weights on the device; streamed: weights in CPU RAM streamed through a GPU "
        "window with ramtorch; auto: streamed when the resident estimate does not fit the VRAM budget.",
    )
    vram_budget_gib: float | None = Field(
        None, gt=0.0, description="Cap this process's GPU memory (GiB) on any card; also what the engine plans for."
    )
    gradient_checkpointing: bool = Field(True, description="Recompute each block's activations in backward (resident engine).")
    stream_window: int = Field(3, ge=1, description="Streamed engine: blocks held on the GPU at once (>= 2 overlaps copy and compute).")
    stream_pin: int = Field(0, ge=0, description="Streamed engine: chunks kept on the GPU permanently.")
    seqs_per_pass: int | None = Field(
        None, ge=1, description="Streamed engine: sequences that share one pass of the weights (default: the largest the budget allows)."
    )
    loss_chunk_tokens: int = Field(2048, ge=16, description="Tokens per chunk of the fused output-layer + cross-entropy.")
    grad_accum: Literal["auto", "host", "device"] = Field(
        "auto",
        description="Streamed engine: where each pass's gradients are summed into the fp32 accumulators. device: "
        "the accumulators stream through the GPU on a side stream (1.78x faster on an H100, docs/benchmarks.md; "
        "estimate-memory counts ~0.23 GiB more VRAM); host: a CPU worker adds them (least VRAM); auto: device on CUDA, "
        "host otherwise.",
    )
    optimizer_on_disk: bool = Field(
        False,
        description="Low-RAM mode (streamed engine): keep AdamW's two moments (8 bytes per parameter, 8.2 GiB for the "
        "1b) in a memory-mapped file, paged in chunk by chunk for each update, instead of RAM. Lossless; costs disk "
        "traffic of 16 bytes per parameter per step (docs/design.md).",
    )
    optimizer_gpu_share: float = Field(
        0.4,
        ge=0.0,
        le=1.0,
        description="Streamed engine on CUDA: share of the parameters whose AdamW update the GPU does (their fp32 "
        "masters, gradients and moments stream through it beside the CPU's update of the rest, with the same fused "
        "AdamW), so less of the update shows between steps; 0: all on the CPU. Not with the low-RAM mode, "
        "grad_accum=host or several GPUs.",
    )
    host_bf16_copies: bool = Field(
        False,
        description="Streamed engine: keep page-locked bf16 copies of the weights (2 bytes per parameter of RAM, "
        "2.2 GB for the 1b) for the GPU to load, refreshed after each update, instead of loading the fp32 masters "
        "and casting them on the GPU. Halves the weights' link traffic: faster only where the link, not the GPU, "
        "limits a pass (an H200 with a 5 GiB budget: docs/benchmarks.md); one process only.",
    )
    split_masters: bool | Literal["auto"] = Field(
        "auto",
        description="Streamed engine with bf16: keep fp32 master weights as two 16-bit halves in the same 4 bytes, "
        "their bf16 rounding (to nearest, ties away from zero), which the GPU loads as it is, and the remaining bits: "
        "half the link traffic of those weights, no cast, no more RAM, the same fp32 update. auto: all of them where "
        "the CPU's one-pass kernel for its share builds (a C compiler, $CC or cc; checked against torch's AdamW bit "
        "for bit; `ramgpt doctor` says), else the weights whose update the GPU does (runtime.optimizer_gpu_share; "
        "the GPU joins and splits them); true: all of them (without the kernel the CPU joins and splits around "
        "torch's update, 3x slower on the H200 machine, docs/benchmarks.md); false: none. One process, not with "
        "host_bf16_copies.",
    )
    compile_blocks: bool | Literal["auto"] = Field(
        "auto",
        description="Streamed engine: compile the transformer blocks with torch.compile (fused kernels, fewer "
        "launches from Python: +4-5% tokens/s for the 1b on an H200, docs/benchmarks.md). Compiling adds about 10 s "
        "to the start on that machine's 16 cores the first time, about 5 s once torch's cache has it (more on fewer "
        "cores); where compiling fails the blocks run uncompiled with a warning. auto: on CUDA with triton and no "
        "dropout.",
    )
    optimizer_dir: str | None = Field(
        None, description="Where the low-RAM mode's moments file goes (default: the run directory); use a fast local disk."
    )
    seed: int = Field(1337, description="Seed for weights init and everything random in training.")
    threads: int | None = Field(None, ge=1, description="CPU threads for torch (default: torch's choice).")


class Profile(_Section):
    """A whole training profile."""

    name: str = Field("custom", description="Profile name (also the default run directory name).")
    description: str = Field("", description="One line about what this profile is for.")
    model: ModelConfig = Field(default_factory=ModelConfig)
    data: DataConfig = Field(default_factory=DataConfig)
    optim: OptimConfig = Field(default_factory=OptimConfig)
    scheduler: SchedulerConfig = Field(default_factory=SchedulerConfig)
    checkpoint: CheckpointConfig = Field(default_factory=CheckpointConfig)
    logging: LoggingConfig = Field(default_factory=LoggingConfig)
    runtime: RuntimeConfig = Field(default_factory=RuntimeConfig)

    @model_validator(mode="after")
    def _cross_checks(self) -> Profile:
        if self.data.seq_len > self.model.block_size:
            raise ValueError(
                f"data.seq_len ({self.data.seq_len}) is larger than model.block_size ({self.model.block_size})"
            )
        if self.data.source in ("text", "json", "parquet") and not self.data.path:
            raise ValueError(f"data.path is required when data.source is {self.data.source!r}")
        if self.data.source == "hub" and not self.data.dataset_name:
            raise ValueError("data.dataset_name is required when data.source is 'hub'")
        if self.data.tokenizer_vocab_size and self.data.tokenizer_vocab_size > self.model.vocab_size:
            raise ValueError(
                f"data.tokenizer_vocab_size ({self.data.tokenizer_vocab_size}) is larger than model.vocab_size "
                f"({self.model.vocab_size})"
            )
        if self.runtime.optimizer_on_disk and self.runtime.engine == "resident":
            raise ValueError("runtime.optimizer_on_disk needs the streamed engine (runtime.engine=streamed or auto)")
        if self.checkpoint.save_interval_steps is None and self.checkpoint.save_interval_minutes is None:
            raise ValueError(
                "checkpoint.save_interval_steps and checkpoint.save_interval_minutes are both null: set at least one"
            )
        if self.checkpoint.push_to_hub_interval and not self.checkpoint.hf_repo_id:
            raise ValueError("checkpoint.push_to_hub_interval needs checkpoint.hf_repo_id")
        return self

    @property
    def run_dir(self) -> Path:
        return Path(self.checkpoint.out_dir or f"runs/{self.name}")

    @property
    def tokens_per_step(self) -> int:
        return self.optim.seqs_per_step * self.data.seq_len

    def to_public_dict(self) -> dict[str, Any]:
        """The effective config as plain data. Profiles never hold secrets (tokens come from the
        environment or the login cache), so this is safe to dump and to send to W&B."""
        return self.model_dump(mode="json")


# ---------------------------------------------------------------------------------------------
# Loading


def available_profiles() -> dict[str, Path]:
    """Shipped profiles by name (the repo's profiles/ wins over the packaged copy)."""
    found: dict[str, Path] = {}
    for d in (PACKAGED_PROFILES_DIR, PROFILES_DIR):
        if d.is_dir():
            for p in sorted(d.glob("*.yaml")):
                found[p.stem] = p
    return found


def _resolve_profile_path(name_or_path: str, relative_to: Path | None = None) -> Path:
    p = Path(name_or_path).expanduser()
    candidates = []
    if relative_to is not None and not p.is_absolute():
        candidates.append(relative_to / p)
        candidates.append(relative_to / f"{name_or_path}.yaml")
    candidates.append(p)
    for c in candidates:
        if c.is_file():
            return c.resolve()
    shipped = available_profiles()
    if name_or_path in shipped:
        return shipped[name_or_path]
    names = ", ".join(sorted(shipped)) or "none"
    raise ConfigError(f"unknown profile {name_or_path!r} (not a file; shipped profiles: {names})")


def _deep_merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    out = copy.deepcopy(base)
    for k, v in over.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = _deep_merge(out[k], v)
        else:
            out[k] = copy.deepcopy(v)
    return out


class _UniqueKeyLoader(yaml.SafeLoader):
    """``yaml.SafeLoader`` that refuses a key given twice in one mapping (plain YAML keeps the last
    one silently: a profile's setting typed twice would hide which one runs)."""

    def construct_mapping(self, node, deep=False):
        keys: set = set()
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":  # "<<: *anchor": merged by SafeLoader, may be overridden
                continue
            key = self.construct_object(key_node, deep=deep)
            try:
                seen = key in keys
            except TypeError:  # an unhashable key: SafeLoader's own error says so
                break
            if seen:
                raise yaml.constructor.ConstructorError(
                    None, None, f"key {key!r} is given twice in one section", key_node.start_mark)
            keys.add(key)
        return super().construct_mapping(node, deep=deep)


def _read_yaml(path: Path, seen: tuple[Path, ...] = ()) -> dict[str, Any]:
    if path in seen:
        chain = " -> ".join(str(s.name) for s in (*seen, path))
        raise ConfigError(f"profile extends itself in a loop: {chain}")
    try:
        raw = yaml.load(path.read_text(encoding="utf-8"), Loader=_UniqueKeyLoader)  # noqa: S506 - a SafeLoader
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" line {mark.line + 1}" if mark is not None else ""
        raise ConfigError(f"profile {path}{where} is not valid YAML: {getattr(e, 'problem', e)}") from e
    except OSError as e:
        raise ConfigError(f"cannot read profile {path}: {e.strerror or e}") from e
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ConfigError(f"profile {path} must be a mapping of sections, got {type(raw).__name__}")
    parent = raw.pop("extends", None)
    if parent:
        base = _read_yaml(_resolve_profile_path(str(parent), path.parent), (*seen, path))
        base.pop("name", None)
        base.pop("description", None)
        raw = _deep_merge(base, raw)
    raw.setdefault("name", path.stem)
    return raw


class _EnvOverrides(BaseSettings):
    """Reads RAMGPT_<SECTION>__<FIELD> variables (pydantic-settings) into nested dicts."""

    model_config = SettingsConfigDict(env_prefix="RAMGPT_", env_nested_delimiter="__", extra="ignore")

    model: dict[str, Any] = {}
    data: dict[str, Any] = {}
    optim: dict[str, Any] = {}
    scheduler: dict[str, Any] = {}
    checkpoint: dict[str, Any] = {}
    logging: dict[str, Any] = {}
    runtime: dict[str, Any] = {}


def env_overrides() -> dict[str, Any]:
    try:
        env = _EnvOverrides()
    except ValidationError as e:
        raise ConfigError(f"bad RAMGPT_* environment variable: {e.errors()[0]['msg']}") from e
    return {k: v for k, v in env.model_dump().items() if v}


def parse_set(item: str) -> dict[str, Any]:
    """``section.field=value`` -> nested dict; the value is parsed as YAML (numbers, bools, null)."""
    if "=" not in item:
        raise ConfigError(f"--set {item!r}: expected section.field=value")
    key, _, value = item.partition("=")
    parts = [p for p in key.strip().split(".") if p]
    if len(parts) < 1:
        raise ConfigError(f"--set {item!r}: empty key")
    try:
        parsed = yaml.safe_load(value) if value.strip() else None
    except yaml.YAMLError:
        parsed = value
    if isinstance(parsed, str) or (isinstance(parsed, bool) and value.strip().lower() not in ("true", "false")):
        # keep strings exactly as typed; YAML 1.1 reads on/off/yes/no as booleans, but a field
        # like logging.tui wants the word (pydantic still turns "off" into False for bool fields)
        parsed = value
    out: dict[str, Any] = {parts[-1]: parsed}
    for p in reversed(parts[:-1]):
        out = {p: out}
    return out


# Shrinks any profile to something that trains in seconds on a CPU (the seed's --micro-test).
MICRO_TEST_OVERRIDES: dict[str, Any] = {
    "model": {"n_layer": 2, "n_head": 4, "n_embd": 128, "block_size": 128},
    "data": {"seq_len": 128, "max_eval_samples": 16},
    "optim": {"micro_batch_size": 4, "grad_accum_steps": 2, "max_steps": 20},
    "scheduler": {"warmup_steps": 2},
    "checkpoint": {"save_interval_steps": 10},
    "logging": {"log_interval": 1, "eval_interval": 10, "eval_batches": 2},
}


def format_validation_error(e: ValidationError) -> str:
    """One line per problem, naming the field: ``optim.lr: Input should be greater than 0``."""
    lines = []
    for err in e.errors():
        loc = ".".join(str(x) for x in err["loc"])
        msg = err["msg"].removeprefix("Value error, ")
        if err["type"] == "extra_forbidden":
            msg = "unknown key"
        lines.append(f"{loc}: {msg}" if loc else msg)
    return "; ".join(lines)


def build_profile(data: dict[str, Any]) -> Profile:
    try:
        return Profile.model_validate(data)
    except ValidationError as e:
        raise ConfigError(f"invalid profile: {format_validation_error(e)}") from e


def load_profile(
    name_or_path: str,
    sets: list[str] | tuple[str, ...] = (),
    *,
    micro_test: bool = False,
    use_env: bool = True,
) -> Profile:
    """Load a shipped profile by name or a user's YAML by path, apply env and ``--set``
    overrides (and ``--micro-test``), and validate. Raises ConfigError with one line."""
    data = _read_yaml(_resolve_profile_path(name_or_path))
    if micro_test:
        data = _deep_merge(data, MICRO_TEST_OVERRIDES)
        # vocab of the hub tokenizers is big; micro-test keeps the profile's tokenizer but
        # a 2-layer model, so only shapes shrink.
    if use_env:
        data = _deep_merge(data, env_overrides())
    for s in sets:
        data = _deep_merge(data, parse_set(s))
    return build_profile(data)


def profile_from_dict(data: dict[str, Any]) -> Profile:
    """Rebuild a profile from a saved config dump (checkpoint metadata)."""
    return build_profile(data)


def profile_reference_markdown() -> str:
    """The profile reference, generated from the field descriptions."""
    out = ["# Profile reference", "", "Generated from `ramgpt/config.py` (`python -m ramgpt.config`).", ""]
    out.append("Override any field with `--set section.field=value` or `RAMGPT_SECTION__FIELD=value`.")
    out.append("")
    out.append("## Top level")
    out.append("")
    out.append("| key | description |")
    out.append("|---|---|")
    out.append("| `extends` | Name or path of a profile this one builds on; its sections are merged, this file's values win. |")
    for fname in ("name", "description"):
        out.append(f"| `{fname}` | {Profile.model_fields[fname].description} |")
    out.append("")
    for sec_name, field in Profile.model_fields.items():
        ann = field.annotation
        if not (isinstance(ann, type) and issubclass(ann, BaseModel)):
            continue
        out.append(f"## `{sec_name}`")
        out.append("")
        if ann.__doc__:
            out.append(ann.__doc__.strip())
            out.append("")
        out.append("| field | default | description |")
        out.append("|---|---|---|")
        for fname, f in ann.model_fields.items():
            default = f.default
            if isinstance(default, float) and (math.isinf(default) or math.isnan(default)):
                default = str(default)
            out.append(f"| `{fname}` | `{default}` | {f.description or ''} |")
        out.append("")
    out.append("## Shipped profiles")
    out.append("")
    for name, path in available_profiles().items():
        try:
            desc = load_profile(name, use_env=False).description
        except ConfigError as e:
            desc = f"(invalid: {e})"
        out.append(f"- `{name}` ({path.name}): {desc}")
    out.append("")
    return "\n".join(out)


if __name__ == "__main__":  # pragma: no cover
    print(profile_reference_markdown())
    os._exit(0)

"""ramgpt.config: every shipped profile loads, the 1b recipe is what it says, ``extends``, ``--set``
and ``RAMGPT_*`` overrides merge in the documented order, and every mistake is one ConfigError
line that names the field."""

from __future__ import annotations

from pathlib import Path

import pytest
from pydantic import BaseModel

import ramgpt.config as config_module
from ramgpt.config import (
    MICRO_TEST_OVERRIDES,
    Profile,
    available_profiles,
    load_profile,
    parse_set,
    profile_reference_markdown,
)
from ramgpt.errors import ConfigError, RamgptError
from ramgpt.model import count_parameters_by_component

SHIPPED = sorted(available_profiles())
SECTIONS = [
    name
    for name, f in Profile.model_fields.items()
    if isinstance(f.annotation, type) and issubclass(f.annotation, BaseModel)
]


@pytest.fixture(autouse=True)
def _no_ramgpt_env(monkeypatch):
    """A developer's RAMGPT_* variables must not leak into these tests."""
    import os

    for k in list(os.environ):
        if k.startswith("RAMGPT_"):
            monkeypatch.delenv(k)


def _one_line_error(excinfo: pytest.ExceptionInfo[ConfigError], *needles: str) -> str:
    msg = str(excinfo.value)
    assert msg and "\n" not in msg, msg
    for n in needles:
        assert n in msg, f"{n!r} not in {msg!r}"
    return msg


# ---------------------------------------------------------------------------------------------
# shipped profiles


def test_the_four_documented_profiles_ship():
    assert {"1b", "0p1b", "micro-test", "rtx3050-6gb"} <= set(SHIPPED)


@pytest.mark.parametrize("name", SHIPPED)
def test_every_shipped_profile_loads_and_validates(name):
    p = load_profile(name, use_env=False)
    assert isinstance(p, Profile)
    assert p.name == name
    assert p.description.strip(), "every shipped profile says what it is for"
    assert p.data.seq_len <= p.model.block_size
    assert p.model.n_embd % p.model.n_head == 0
    assert p.model.vocab_size % 64 == 0  # padded for speed, as the field says
    # the dump round-trips through validation (it is what checkpoints store)
    assert Profile.model_validate(p.to_public_dict()) == p


@pytest.mark.parametrize("name", SHIPPED)
def test_micro_test_shrinks_every_profile(name):
    p = load_profile(name, micro_test=True, use_env=False)
    assert p.model.n_layer == 2
    assert p.data.seq_len == 128
    assert p.model.block_size == 128
    assert p.optim.max_steps == MICRO_TEST_OVERRIDES["optim"]["max_steps"]
    assert p.name == name


def test_1b_recipe():
    p = load_profile("1b", use_env=False)
    m = p.model
    assert (m.n_layer, m.n_head, m.n_embd) == (36, 24, 1536)
    assert m.block_size == 1024 and p.data.seq_len == 1024
    assert m.tie_embeddings and m.bias
    total = count_parameters_by_component(m)["total"]
    assert total == pytest.approx(1.1e9, rel=0.01)
    assert p.optim.micro_batch_size == 1
    assert p.optim.grad_accum_steps == 192
    assert p.tokens_per_step == 196_608
    assert p.optim.lr == pytest.approx(2e-4)
    assert p.scheduler.kind == "cosine"
    assert p.scheduler.min_lr_ratio == pytest.approx(0.1)
    assert p.optim.weight_decay == pytest.approx(0.1)
    assert (p.optim.beta1, p.optim.beta2) == (pytest.approx(0.9), pytest.approx(0.95))
    assert p.optim.grad_clip == pytest.approx(1.0)
    assert p.data.tokenizer == "gpt2"


def test_rtx3050_extends_1b_with_a_budget_and_the_streamed_engine():
    base = load_profile("1b", use_env=False)
    p = load_profile("rtx3050-6gb", use_env=False)
    assert p.name == "rtx3050-6gb"
    assert p.description != base.description
    assert p.runtime.engine == "streamed"
    assert p.runtime.vram_budget_gib is not None and 0 < p.runtime.vram_budget_gib < 6
    # everything else is the 1b recipe, but saves go by the clock (a step is minutes on such a card)
    for section in ("model", "data", "optim", "scheduler", "logging"):
        assert getattr(p, section) == getattr(base, section), section
    assert p.checkpoint.save_interval_minutes == 30 and p.checkpoint.save_interval_steps is None
    assert p.checkpoint.model_copy(update={"save_interval_minutes": None, "save_interval_steps": 250}) == base.checkpoint
    assert base.runtime.engine == "auto" and base.runtime.vram_budget_gib is None


def test_the_16gb_desktop_profile_keeps_the_optimizer_on_disk():
    p = load_profile("desktop-16gb", use_env=False)
    assert p.runtime.optimizer_on_disk and p.runtime.engine == "streamed"
    assert p.model == load_profile("1b", use_env=False).model


def test_micro_test_profile_needs_no_network_or_gpu():
    p = load_profile("micro-test", use_env=False)
    assert p.data.source == "embedded" and p.data.tokenizer == "embedded"
    assert p.runtime.device == "cpu" and p.model.n_layer == 2


# ---------------------------------------------------------------------------------------------
# extends


def test_user_yaml_extends_a_shipped_profile(tmp_path):
    f = tmp_path / "mine.yaml"
    f.write_text("extends: micro-test\noptim:\n  lr: 1.0e-3\nmodel:\n  n_layer: 3\n", encoding="utf-8")
    p = load_profile(str(f), use_env=False)
    base = load_profile("micro-test", use_env=False)
    assert p.name == "mine"  # not the parent's name
    assert p.description == ""  # the parent's description is not inherited either
    assert p.optim.lr == pytest.approx(1e-3)  # child overrides parent
    assert p.model.n_layer == 3
    # sections merge field by field: the rest of optim and model come from the parent
    assert p.optim.grad_accum_steps == base.optim.grad_accum_steps
    assert p.optim.max_steps == base.optim.max_steps
    assert p.model.n_embd == base.model.n_embd and p.model.vocab_size == base.model.vocab_size
    assert p.data == base.data and p.runtime == base.runtime


def test_extends_chain_of_user_files_relative_to_the_child(tmp_path):
    (tmp_path / "sub").mkdir()
    (tmp_path / "base.yaml").write_text("extends: micro-test\ndata:\n  seq_len: 64\n", encoding="utf-8")
    (tmp_path / "sub" / "child.yaml").write_text(
        "extends: ../base.yaml\nname: kid\nlogging:\n  tui: 'off'\n", encoding="utf-8"
    )
    p = load_profile(str(tmp_path / "sub" / "child.yaml"), use_env=False)
    assert p.name == "kid"
    assert p.data.seq_len == 64
    assert p.data.source == "embedded"
    assert p.logging.tui == "off"


@pytest.mark.parametrize("word", ["off", "on"])
def test_bare_tui_word_in_a_yaml_file(tmp_path, word):
    f = tmp_path / "quiet.yaml"
    f.write_text(f"extends: micro-test\nlogging:\n  tui: {word}\n", encoding="utf-8")
    assert load_profile(str(f), use_env=False).logging.tui == word


def test_extends_by_name_without_yaml_suffix_in_the_same_directory(tmp_path):
    (tmp_path / "parent.yaml").write_text("extends: micro-test\noptim:\n  max_steps: 7\n", encoding="utf-8")
    (tmp_path / "child.yaml").write_text("extends: parent\noptim:\n  lr: 5.0e-4\n", encoding="utf-8")
    p = load_profile(str(tmp_path / "child.yaml"), use_env=False)
    assert p.optim.max_steps == 7 and p.optim.lr == pytest.approx(5e-4)


def test_profile_that_extends_itself_is_one_line_error(tmp_path):
    f = tmp_path / "loop.yaml"
    f.write_text("extends: loop.yaml\n", encoding="utf-8")
    with pytest.raises(ConfigError) as ei:
        load_profile(str(f), use_env=False)
    _one_line_error(ei, "extends itself", "loop.yaml")


def test_two_profiles_extending_each_other_is_one_line_error(tmp_path):
    (tmp_path / "a.yaml").write_text("extends: b\n", encoding="utf-8")
    (tmp_path / "b.yaml").write_text("extends: a\n", encoding="utf-8")
    with pytest.raises(ConfigError) as ei:
        load_profile(str(tmp_path / "a.yaml"), use_env=False)
    _one_line_error(ei, "a.yaml", "b.yaml")


def test_extending_an_unknown_parent_names_it(tmp_path):
    f = tmp_path / "orphan.yaml"
    f.write_text("extends: no-such-parent\n", encoding="utf-8")
    with pytest.raises(ConfigError) as ei:
        load_profile(str(f), use_env=False)
    _one_line_error(ei, "no-such-parent")


# ---------------------------------------------------------------------------------------------
# --set


@pytest.mark.parametrize(
    "item,expected",
    [
        ("optim.lr=3", {"optim": {"lr": 3}}),
        ("optim.lr=0.5", {"optim": {"lr": 0.5}}),
        ("optim.max_steps=200", {"optim": {"max_steps": 200}}),
        ("runtime.gradient_checkpointing=false", {"runtime": {"gradient_checkpointing": False}}),
        ("logging.use_wandb=true", {"logging": {"use_wandb": True}}),
        ("checkpoint.out_dir=null", {"checkpoint": {"out_dir": None}}),
        ("runtime.threads=", {"runtime": {"threads": None}}),
        ("data.dataset_name=user/data", {"data": {"dataset_name": "user/data"}}),
        ("checkpoint.out_dir=a=b", {"checkpoint": {"out_dir": "a=b"}}),
        ("logging.tui=off", {"logging": {"tui": "off"}}),
        ("logging.tui=on", {"logging": {"tui": "on"}}),
        ("name=hello", {"name": "hello"}),
    ],
)
def test_parse_set_values(item, expected):
    got = parse_set(item)
    assert got == expected
    leaf = got
    want = expected
    while isinstance(want, dict):
        (k,) = want
        leaf, want = leaf[k], want[k]
    assert type(leaf) is type(want)  # "off" is a str, not False; 3 an int, not "3"


def test_set_tui_off_stays_the_word():
    p = load_profile("micro-test", ["logging.tui=off"], use_env=False)
    assert p.logging.tui == "off"
    assert load_profile("micro-test", ["logging.tui=on"], use_env=False).logging.tui == "on"


def test_set_numbers_bools_and_null_reach_the_profile():
    p = load_profile(
        "micro-test",
        [
            "optim.lr=1e-3",  # YAML 1.1 reads this as a string; the profile still gets the float
            "optim.max_steps=7",
            "runtime.gradient_checkpointing=false",
            "checkpoint.out_dir=null",
            "model.dropout=0.1",
        ],
        use_env=False,
    )
    assert isinstance(p.optim.lr, float) and p.optim.lr == pytest.approx(1e-3)
    assert p.optim.max_steps == 7
    assert p.runtime.gradient_checkpointing is False
    assert p.checkpoint.out_dir is None
    assert p.model.dropout == pytest.approx(0.1)


def test_set_later_wins_and_sections_merge():
    p = load_profile("micro-test", ["optim.lr=1", "optim.lr=2", "optim.max_steps=3"], use_env=False)
    base = load_profile("micro-test", use_env=False)
    assert p.optim.lr == 2.0 and p.optim.max_steps == 3
    assert p.optim.grad_accum_steps == base.optim.grad_accum_steps


def test_set_keeps_numeric_looking_strings_for_string_fields():
    p = load_profile("micro-test", ["data.source=text", "data.path=2024", "checkpoint.out_dir=123"], use_env=False)
    assert p.data.path == "2024"
    assert p.checkpoint.out_dir == "123"


def test_env_keeps_numeric_looking_strings_for_string_fields(monkeypatch):
    monkeypatch.setenv("RAMGPT_DATA__PATH", "2024")
    p = load_profile("micro-test", ["data.source=text"])
    assert p.data.path == "2024"


@pytest.mark.parametrize("item", ["optim.lr", "=3", ""])
def test_parse_set_rejects_malformed_items(item):
    with pytest.raises(ConfigError) as ei:
        parse_set(item)
    _one_line_error(ei, "--set")


# ---------------------------------------------------------------------------------------------
# environment


def test_env_override(monkeypatch):
    monkeypatch.setenv("RAMGPT_OPTIM__LR", "1e-3")
    monkeypatch.setenv("RAMGPT_LOGGING__TUI", "off")
    p = load_profile("micro-test")
    assert p.optim.lr == pytest.approx(1e-3)
    assert p.logging.tui == "off"
    # other RAMGPT_* variables (the CLI's debug switch) are not profile fields and are ignored
    monkeypatch.setenv("RAMGPT_DEBUG", "1")
    assert load_profile("micro-test").optim.lr == pytest.approx(1e-3)
    # use_env=False ignores the environment
    assert load_profile("micro-test", use_env=False).optim.lr == pytest.approx(3e-3)


def test_precedence_yaml_then_env_then_set(monkeypatch):
    yaml_lr = load_profile("micro-test", use_env=False).optim.lr
    assert yaml_lr == pytest.approx(3e-3)
    monkeypatch.setenv("RAMGPT_OPTIM__LR", "1e-3")
    assert load_profile("micro-test").optim.lr == pytest.approx(1e-3)  # env beats yaml
    assert load_profile("micro-test", ["optim.lr=5e-4"]).optim.lr == pytest.approx(5e-4)  # --set beats env
    # env overrides one field; the rest of the section still comes from the yaml
    monkeypatch.setenv("RAMGPT_OPTIM__MAX_STEPS", "9")
    p = load_profile("micro-test", ["optim.lr=5e-4"])
    assert p.optim.max_steps == 9 and p.optim.grad_accum_steps == 2


def test_env_unknown_key_and_bad_value_are_config_errors(monkeypatch):
    monkeypatch.setenv("RAMGPT_OPTIM__LRR", "1")
    with pytest.raises(ConfigError) as ei:
        load_profile("micro-test")
    _one_line_error(ei, "optim.lrr")
    monkeypatch.delenv("RAMGPT_OPTIM__LRR")
    monkeypatch.setenv("RAMGPT_OPTIM__LR", "abc")
    with pytest.raises(ConfigError) as ei:
        load_profile("micro-test")
    _one_line_error(ei, "optim.lr")


# ---------------------------------------------------------------------------------------------
# errors: one line, naming the field


@pytest.mark.parametrize(
    "sets,needles",
    [
        (["optim.lrr=1"], ["optim.lrr", "unknown key"]),
        (["nosuchsection.x=1"], ["nosuchsection", "unknown key"]),
        (["optim.lr=abc"], ["optim.lr"]),
        (["model.n_layer=two"], ["model.n_layer"]),
        (["data.seq_len=256"], ["data.seq_len", "model.block_size"]),
        (["model.n_head=7"], ["n_embd", "n_head"]),
        (["optim.lr=0"], ["optim.lr"]),
        (["optim.lr=-1"], ["optim.lr"]),
        (["logging.tui=maybe"], ["logging.tui"]),
        (["data.source=text"], ["data.path"]),
        (["data.source=hub"], ["data.dataset_name"]),
        (["checkpoint.push_to_hub_interval=10"], ["checkpoint.hf_repo_id"]),
        (["optim.beta2=1.0"], ["optim.beta2"]),
    ],
)
def test_bad_values_are_one_line_config_errors_naming_the_field(sets, needles):
    with pytest.raises(ConfigError) as ei:
        load_profile("micro-test", sets, use_env=False)
    _one_line_error(ei, *needles)
    assert isinstance(ei.value, RamgptError) and ei.value.exit_code != 0


def test_bad_value_in_a_user_yaml_names_the_field(tmp_path):
    f = tmp_path / "bad.yaml"
    f.write_text("extends: micro-test\noptim:\n  lr: -0.1\n  lrr: 1\n", encoding="utf-8")
    with pytest.raises(ConfigError) as ei:
        load_profile(str(f), use_env=False)
    _one_line_error(ei, "optim.lr", "optim.lrr")


def test_unknown_profile_name_lists_the_shipped_ones():
    with pytest.raises(ConfigError) as ei:
        load_profile("nope", use_env=False)
    msg = _one_line_error(ei, "'nope'")
    for name in SHIPPED:
        assert name in msg


def test_missing_profile_file_is_a_config_error(tmp_path):
    with pytest.raises(ConfigError) as ei:
        load_profile(str(tmp_path / "missing.yaml"), use_env=False)
    _one_line_error(ei, "missing.yaml")


def test_broken_yaml_is_one_line_error_with_the_line(tmp_path):
    f = tmp_path / "broken.yaml"
    f.write_text("model:\n  n_layer: 2\noptim: {lr: [\n", encoding="utf-8")
    with pytest.raises(ConfigError) as ei:
        load_profile(str(f), use_env=False)
    _one_line_error(ei, "broken.yaml", "not valid YAML", "line")


def test_a_key_given_twice_is_one_line_error_with_its_line(tmp_path):
    f = tmp_path / "twice.yaml"
    f.write_text("runtime:\n  seqs_per_pass: 2\n  window: 3\n  seqs_per_pass: 4\n", encoding="utf-8")
    with pytest.raises(ConfigError) as ei:
        load_profile(str(f), use_env=False)
    _one_line_error(ei, "twice.yaml", "line 4", "'seqs_per_pass' is given twice")


def test_yaml_merge_keys_still_merge_and_an_unhashable_key_is_a_config_error(tmp_path):
    f = tmp_path / "merge.yaml"
    f.write_text("base: &b {seqs_per_pass: 2, stream_window: 3}\nruntime:\n  <<: *b\n  seqs_per_pass: 4\n",
                 encoding="utf-8")
    raw = config_module._read_yaml(f)
    assert raw["runtime"] == {"seqs_per_pass": 4, "stream_window": 3}  # the explicit key overrides the merged one
    f.write_text("runtime:\n  ? [1, 2]\n  : 3\n", encoding="utf-8")
    with pytest.raises(ConfigError) as ei:
        load_profile(str(f), use_env=False)
    _one_line_error(ei, "merge.yaml", "not valid YAML")


def test_yaml_that_is_not_a_mapping_is_a_config_error(tmp_path):
    f = tmp_path / "list.yaml"
    f.write_text("- 1\n- 2\n", encoding="utf-8")
    with pytest.raises(ConfigError) as ei:
        load_profile(str(f), use_env=False)
    _one_line_error(ei, "mapping")


def test_empty_yaml_is_the_defaults(tmp_path):
    f = tmp_path / "empty.yaml"
    f.write_text("", encoding="utf-8")
    p = load_profile(str(f), use_env=False)
    assert p.name == "empty" and p.model == Profile().model


def test_profiles_are_frozen():
    p = load_profile("micro-test", use_env=False)
    with pytest.raises(Exception):  # noqa: B017 - pydantic's ValidationError for frozen models
        p.optim.lr = 1.0  # type: ignore[misc]


# ---------------------------------------------------------------------------------------------
# reference docs


def test_reference_mentions_every_section_and_field():
    ref = profile_reference_markdown()
    assert set(SECTIONS) == {"model", "data", "optim", "scheduler", "checkpoint", "logging", "runtime"}
    for sec in SECTIONS:
        assert f"## `{sec}`" in ref, sec
        for fname, f in Profile.model_fields[sec].annotation.model_fields.items():
            assert f"`{fname}`" in ref, f"{sec}.{fname}"
            assert f.description and f.description in ref, f"{sec}.{fname} has no description in the reference"
    for name in SHIPPED:
        assert f"`{name}`" in ref


def test_reference_mentions_top_level_keys():
    ref = profile_reference_markdown()
    for key in ("name", "description", "extends"):
        assert f"`{key}`" in ref, key


def test_every_field_has_a_description():
    missing = []
    for sec_name, f in Profile.model_fields.items():
        if not f.description and sec_name not in SECTIONS:
            missing.append(sec_name)
        if sec_name in SECTIONS:
            for fname, ff in f.annotation.model_fields.items():
                if not ff.description:
                    missing.append(f"{sec_name}.{fname}")
    assert missing == []


def test_no_field_uses_pydantic_reserved_model_prefix():
    for sec in SECTIONS:
        for fname in Profile.model_fields[sec].annotation.model_fields:
            assert not fname.startswith("model_"), f"{sec}.{fname}"


def test_profiles_dir_exists_next_to_the_package():
    paths = available_profiles()
    assert all(isinstance(p, Path) and p.suffix == ".yaml" and p.is_file() for p in paths.values())

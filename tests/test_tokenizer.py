"""The tokenizer lookup chain and the embedded byte-level BPE."""

from __future__ import annotations

import ast
import json
import random
import re
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from ramgpt.errors import TokenizerError
from ramgpt.probe import hub_reachable
from ramgpt.tokenizer import (
    EMBEDDED_TOKENIZER_DIR,
    EOS_TOKEN,
    TextTokenizer,
    load_tokenizer,
    train_byte_level_bpe,
)

REPO = Path(__file__).resolve().parent.parent

SAMPLES = [
    "朝の駅で、猫が一匹ベンチの下に座っていた。",
    "今日は東京タワーへ行った。カタカナ、ひらがな、漢字が混ざった文。",
    "絵文字も大丈夫👍🏽🍣🇯🇵 と 👨‍👩‍👧‍👦",
    "Mixed 日本語 and English, with numbers 3.14159 and ＡＢＣ全角.",
    "  leading spaces, tabs\tand\nnewlines\r\n  ",
    "𠮷野家の𩸽（ほっけ）は、基本多言語面の外の字。",
    "combining: e\u0301 and 　全角スペース",
    "literal <|endoftext|> inside a document",
    "",
]


@pytest.fixture(scope="module")
def tok() -> TextTokenizer:
    return load_tokenizer("embedded")


def _hub_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for var in (
        "HF_HUB_OFFLINE",
        "TRANSFORMERS_OFFLINE",
        "HTTPS_PROXY",
        "https_proxy",
        "HTTP_PROXY",
        "http_proxy",
        "ALL_PROXY",
        "all_proxy",
    ):
        monkeypatch.delenv(var, raising=False)


@pytest.mark.parametrize("text", SAMPLES)
def test_round_trip_is_exact(tok: TextTokenizer, text: str) -> None:
    ids = tok.encode(text)
    assert tok.decode(ids) == text
    assert tok.token_bytes(ids) == text.encode("utf-8")


def test_random_unicode_has_no_unknowns(tok: TextTokenizer) -> None:
    r = random.Random(0)
    ranges = [
        (0x20, 0x7E),
        (0x3040, 0x30FF),
        (0x4E00, 0x9FFF),
        (0x1F300, 0x1FAFF),
        (0x20000, 0x2A6DF),
        (0xAC00, 0xD7A3),
    ]
    for _ in range(50):
        text = "".join(chr(r.randint(*r.choice(ranges))) for _ in range(r.randint(1, 40)))
        ids = tok.encode(text)
        assert tok.decode(ids) == text
        assert all(0 <= i < tok.vocab_size for i in ids)


def test_encode_adds_no_special_tokens(tok: TextTokenizer) -> None:
    assert tok.encode("") == []
    ids = tok.encode("こんにちは")
    assert tok.eos_id not in ids
    # Special-token text inside a document is text, never the EOS id (no injected boundaries).
    assert tok.eos_id not in tok.encode(f"a{EOS_TOKEN}b")


def test_eos_and_vocab(tok: TextTokenizer) -> None:
    assert tok.eos_token == EOS_TOKEN
    assert tok.decode([tok.eos_id]) == EOS_TOKEN
    assert tok.vocab_size <= 8192  # the micro-test profile has model.vocab_size 8192
    assert tok.vocab_size > 1000  # a real BPE, not bytes only
    assert tok.is_byte_level
    assert tok.name == "embedded"
    assert load_tokenizer("embedded") is tok  # cached


def test_japanese_is_compressed(tok: TextTokenizer) -> None:
    text = "今日はいい天気なので、公園へ散歩に行きました。"
    assert len(tok.encode(text)) < len(text)  # fewer tokens than characters


def test_token_bytes_expose_partial_characters(tok: TextTokenizer) -> None:
    ids = tok.encode("🍣")  # not in the training corpus: several byte tokens
    assert len(ids) > 1
    head = tok.token_bytes(ids[:1])
    with pytest.raises(UnicodeDecodeError):
        head.decode("utf-8")
    assert tok.token_bytes(ids).decode("utf-8") == "🍣"
    assert tok.token_bytes([tok.eos_id]) == EOS_TOKEN.encode()


def test_save_and_load_local_directory_and_file(tok: TextTokenizer, tmp_path: Path) -> None:
    out = tok.save(tmp_path / "tok")
    assert {p.name for p in out.iterdir()} >= {"tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"}
    text = "保存したトークナイザーを読み直す。Save and reload."
    for spec in (str(out), str(out / "tokenizer.json")):
        again = load_tokenizer(spec)
        assert again.encode(text) == tok.encode(text)
        assert again.eos_id == tok.eos_id
        assert again.fingerprint == tok.fingerprint
        assert again.name == spec


def test_local_tokenizer_without_eos_is_an_error(tok: TextTokenizer, tmp_path: Path) -> None:
    data = json.loads((EMBEDDED_TOKENIZER_DIR / "tokenizer.json").read_text(encoding="utf-8"))
    data["added_tokens"] = []
    data["model"]["vocab"].pop(EOS_TOKEN)
    (tmp_path / "tokenizer.json").write_text(json.dumps(data), encoding="utf-8")
    with pytest.raises(TokenizerError, match="end-of-text"):
        load_tokenizer(str(tmp_path))


def test_transformers_autotokenizer_loads_the_shipped_directory(tok: TextTokenizer) -> None:
    from transformers import AutoTokenizer

    hf = AutoTokenizer.from_pretrained(str(EMBEDDED_TOKENIZER_DIR))
    assert hf.eos_token == EOS_TOKEN
    assert hf.eos_token_id == tok.eos_id
    for text in SAMPLES[:5]:
        ids = hf.encode(text, add_special_tokens=False)
        assert ids == tok.encode(text)
        assert hf.decode(ids) == text


def test_missing_local_path_is_one_clear_line() -> None:
    for spec in ("./no/such/tokenizer", "/definitely/missing/tokenizer.json", "a/b/c"):
        with pytest.raises(TokenizerError) as e:
            load_tokenizer(spec)
        msg = str(e.value)
        assert "\n" not in msg
        assert spec in msg and "does not exist" in msg


def test_hub_name_offline_env_fails_fast(monkeypatch: pytest.MonkeyPatch) -> None:
    _hub_env(monkeypatch)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    t0 = time.monotonic()
    with pytest.raises(TokenizerError) as e:
        load_tokenizer("ramgpt-test/not-a-cached-tokenizer")
    assert time.monotonic() - t0 < 5
    msg = str(e.value)
    assert "\n" not in msg
    assert "'ramgpt-test/not-a-cached-tokenizer' is not in the local Hugging Face cache" in msg
    # Each command's own spelling (#10.6): train has no --tokenizer option, generate has one.
    assert "ramgpt train --set data.tokenizer=embedded" in msg
    assert "ramgpt generate --tokenizer embedded" in msg


def test_hub_name_without_network_fails_fast(monkeypatch: pytest.MonkeyPatch) -> None:
    # No offline variable: the loader must notice by itself that the Hub cannot be reached.
    _hub_env(monkeypatch)
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")  # discard port: refused at once
    t0 = time.monotonic()
    with pytest.raises(TokenizerError) as e:
        load_tokenizer("gpt2-ramgpt-test-not-cached")
    assert time.monotonic() - t0 < 8
    msg = str(e.value)
    assert "\n" not in msg
    assert "cannot be reached" in msg and "embedded" in msg


def test_hub_probe_times_out_on_a_silent_server(monkeypatch: pytest.MonkeyPatch) -> None:
    # A listening socket that never accepts: connections complete, no HTTP answer ever comes.
    _hub_env(monkeypatch)
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen(8)
        monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{server.getsockname()[1]}")
        t0 = time.monotonic()
        assert hub_reachable(timeout=1.0) is False
        assert time.monotonic() - t0 < 3


def test_hub_probe_counts_any_http_answer(monkeypatch: pytest.MonkeyPatch) -> None:
    import http.server
    import threading

    class NotFound(http.server.BaseHTTPRequestHandler):
        def do_HEAD(self) -> None:
            self.send_response(404)
            self.end_headers()

        def log_message(self, *args: object) -> None:
            pass

    _hub_env(monkeypatch)
    with http.server.HTTPServer(("127.0.0.1", 0), NotFound) as server:
        threading.Thread(target=server.handle_request, daemon=True).start()
        monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{server.server_address[1]}")
        assert hub_reachable(timeout=2.0) is True


def test_cached_hub_tokenizer_goes_through_transformers(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """The Hub branch: a cached hit (local_files_only) is wrapped, named after the spec, and saved
    with save_pretrained so the checkpoint copy loads again."""
    import transformers

    real = transformers.AutoTokenizer.from_pretrained
    calls: list[tuple[str, dict]] = []

    def fake(name: str, **kwargs: object) -> object:
        calls.append((name, dict(kwargs)))
        return real(str(EMBEDDED_TOKENIZER_DIR))

    monkeypatch.setattr(transformers.AutoTokenizer, "from_pretrained", fake)
    got = load_tokenizer("someorg/cached-tokenizer")
    assert calls == [("someorg/cached-tokenizer", {"local_files_only": True})]
    assert got.name == "someorg/cached-tokenizer"
    assert got.eos_id == 0
    assert got.encode("キャッシュ済み") == load_tokenizer("embedded").encode("キャッシュ済み")
    saved = got.save(tmp_path / "ckpt_tok")
    assert load_tokenizer(str(saved)).fingerprint == got.fingerprint


def test_train_byte_level_bpe_handles_unseen_text() -> None:
    tok = train_byte_level_bpe(["ねこがねこをよぶ。", "いぬといぬ。"] * 5, vocab_size=300, name="tiny")
    assert tok.vocab_size <= 300
    assert tok.eos_id == 0
    unseen = "未知の文字列🦊 and English"
    assert tok.decode(tok.encode(unseen)) == unseen


@pytest.mark.slow
def test_build_script_reproduces_the_shipped_files() -> None:
    proc = subprocess.run(
        [sys.executable, str(REPO / "tools" / "build_tokenizer.py"), "--check"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "match a rebuild" in proc.stdout


# --- advice names only options that exist (#10.6) ----------------------------------------------------

# Library modules whose messages (and docstrings) give advice about data and tokenizers.
ADVICE_MODULES = ("data", "tokenizer", "tokenizer_train", "tokenizer_stats")
_PROGRAM = re.compile(r"(?<![\w/.-])(ramgpt|hf)((?:\s+[a-z][a-z0-9-]*)*)")
_OPTION = re.compile(r"(?<![\w-])--[a-z][a-z0-9-]*")
_SET_FIELD = re.compile(r"--set\s+([a-z_]+)\.([a-z_]+)=")
_SEGMENT_END = re.compile(r"[;()]|\n\s*\n|(?<![\w/.-])(?:ramgpt|hf)\s")


def _strings(path: Path) -> list[str]:
    """Every string literal of a module; an f-string's placeholders become ``{}``."""
    out = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Constant) and isinstance(node.value, str):
            out.append(node.value)
        elif isinstance(node, ast.JoinedStr):
            out.append("".join(v.value if isinstance(v, ast.Constant) else "{}" for v in node.values))
    return out


def _clis() -> dict[str, Any]:
    import typer.main
    from huggingface_hub.cli.hf import app as hf_app

    from ramgpt.cli import app

    # huggingface_hub's `hf` app is a click group already; ramgpt's is a Typer app
    hf = hf_app if _is_group(hf_app) else typer.main.get_command(hf_app)
    return {"ramgpt": typer.main.get_command(app), "hf": hf}


def _is_group(cmd: Any) -> bool:
    # duck-typed: Typer ships its own copy of click, whose classes are not click's
    return callable(getattr(cmd, "get_command", None))


def _resolve(root: Any, words: list[str]) -> tuple[Any, str]:
    cmd, path = root, [root.name or ""]
    for w in words:
        if not _is_group(cmd):
            break
        sub = cmd.get_command(cmd.context_class(cmd), w)
        if sub is None:
            break
        if callable(getattr(sub, "materialize", None)):
            sub = sub.materialize()  # the hf CLI loads its commands lazily
        cmd, path = sub, [*path, w]
    return cmd, " ".join(path)


def advice_problems(text: str, clis: dict[str, Any]) -> list[str]:
    """What is wrong with the options a piece of advice names: an option outside ``ramgpt CMD ...``
    or ``hf CMD ...``, an option that command lacks, a ``--set`` of a field profiles lack."""
    from ramgpt.config import Profile

    problems, covered = [], set()
    for m in _PROGRAM.finditer(text):
        cmd, name = _resolve(clis[m.group(1)], m.group(2).split())
        end = _SEGMENT_END.search(text, m.end())
        segment_end = end.start() if end else len(text)
        if _is_group(cmd) and _OPTION.search(text, m.end(), segment_end):
            problems.append(f"{name!r} is not a command: {text!r}")
            continue
        opts = {o for p in getattr(cmd, "params", []) for o in (*p.opts, *p.secondary_opts)} | {"--help"}
        for o in _OPTION.finditer(text, m.end(), segment_end):
            covered.add(o.start())
            if o.group() not in opts:
                problems.append(f"{name} has no {o.group()}: {text!r}")
        for f in _SET_FIELD.finditer(text, m.end(), segment_end):
            section = Profile.model_fields.get(f.group(1))
            fields = getattr(section.annotation, "model_fields", {}) if section else {}
            if f.group(2) not in fields:
                problems.append(f"no profile field {f.group(1)}.{f.group(2)}: {text!r}")
    problems += [f"{o.group()} without the command that takes it: {text!r}" for o in _OPTION.finditer(text) if o.start() not in covered]
    return problems


def test_the_advice_checker_catches_what_10_6_found() -> None:
    clis = _clis()
    assert advice_problems("use ramgpt train --set data.tokenizer=embedded; ramgpt generate --tokenizer x", clis) == []
    assert advice_problems("hf download REPO --repo-type dataset --local-dir DIR", clis) == []
    assert advice_problems("use ramgpt tokenizer stats --tokenizer a", clis) == []
    # the message #10.6 reported: an option with no command, then that option attributed to train
    assert advice_problems("use --tokenizer embedded (shipped)", clis)
    assert advice_problems("use ramgpt train --tokenizer embedded", clis)
    assert advice_problems("ramgpt train --set data.tokeniser=embedded", clis)


@pytest.mark.parametrize("module", ADVICE_MODULES)
def test_advice_names_options_the_named_command_accepts(module: str) -> None:
    path = REPO / "ramgpt" / f"{module}.py"
    if not path.is_file():
        pytest.skip(f"{path} does not exist")
    clis = _clis()
    problems = [p for text in _strings(path) for p in advice_problems(text, clis)]
    assert problems == []


def test_commands_in_the_tokenizer_docs_exist() -> None:
    """Every ``ramgpt ...`` line of docs/tokenizer.md's code blocks names options its command has."""
    doc = (REPO / "docs" / "tokenizer.md").read_text(encoding="utf-8")
    blocks = re.findall(r"```sh\n(.*?)```", doc, flags=re.S)
    lines = [ln.strip() for b in blocks for ln in b.splitlines() if ln.strip().startswith("ramgpt ")]
    assert len(lines) >= 6
    clis = _clis()
    assert [p for ln in lines for p in advice_problems(ln, clis)] == []

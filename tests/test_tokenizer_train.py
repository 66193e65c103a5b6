"""Training a tokenizer of the user's own on a profile's data (#16): determinism, exact round trips,
AutoTokenizer, padding, compression on unseen Japanese, the run-directory hook, the CLI, and a
micro-test model trained, exported and run through transformers with it."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
from typer.testing import CliRunner

from ramgpt.cli import app
from ramgpt.config import Profile, load_profile
from ramgpt.errors import ConfigError
from ramgpt.tokenizer import EOS_TOKEN, TextTokenizer, load_tokenizer
from ramgpt.tokenizer_stats import measure
from ramgpt.tokenizer_train import (
    META_FILE,
    RUN_TOKENIZER_DIR,
    ensure_tokenizer,
    pad_vocabulary,
    train_profile_tokenizer,
    train_tokenizer,
)

# Japanese that is in no corpus ramgpt ships or trains on here (written for this test): essays, news,
# science, history, everyday life.
UNSEEN_JA = [
    "図書館の閲覧室は、平日の午前中ならほとんど人がいない。窓際の席に座ると、古い木の机に日が差して、ページをめくる音だけが響く。",
    "先月から始めたぬか漬けは、毎朝かき混ぜるのが日課になった。きゅうりは一晩、大根は二日ほど漬けるとちょうどよい塩加減になる。",
    "地方の鉄道路線では、利用者の減少が続いている。自治体と鉄道会社は、観光列車の運行や駅舎の再利用など、さまざまな対策を検討している。",
    "量子コンピューターは、重ね合わせと呼ばれる性質を利用して計算を行う。ただし、現在の装置は誤りが多く、実用的な規模に達するにはまだ時間がかかると考えられている。",
    "祖母の家の裏山には、子どもの頃によく登った大きな栗の木があった。秋になると、いがを靴で踏んで実を取り出し、その場でゆでてもらうのが楽しみだった。",
    "新しい表計算ソフトでは、関数を入力すると候補が自動的に表示される。慣れないうちは戸惑うが、使い込むほど作業の手間が減っていくのがわかる。",
    "江戸時代の宿場町は、街道を行き来する旅人や荷物を運ぶ人々でにぎわった。本陣や旅籠が並び、町の人々は宿泊や食事の世話で生計を立てていた。",
    "健康診断の結果、血圧が少し高めだと言われた。医師からは、塩分を控えめにして、毎日三十分ほど歩くように勧められた。",
    "この論文では、少ない計算資源で言語モデルを学習する方法を提案する。重みを主記憶に置き、必要な層だけを順にグラフィックス処理装置へ転送することで、使用する記憶容量を大幅に減らす。",
    "雨上がりの夕方、商店街の八百屋の前で、店主が水に濡れた段ボールを片付けていた。並んだトマトやなすは、街灯の光を受けてつやつやと光っていた。",
    "火山の噴火に備えて、ふもとの町では避難訓練が毎年行われている。住民は指定された集合場所に集まり、バスで隣の市の体育館へ移動する手順を確認した。",
    "弟は最近、将棋の詰め将棋に夢中になっている。夕食のあとに問題集を広げ、解けるまで何度も駒を並べ直しては、うなり声を上げている。",
]

ROUND_TRIP = [
    "",
    " ",
    "\n\n\t  \r\n",
    "今日は東京タワーへ行った。カタカナ、ひらがな、漢字が混ざった文。",
    "𠮷野家の𩸽（ほっけ）と〆切、々、ゝゞヽヾ、〽",
    "ｈａｌｆ‐ｗｉｄｔｈ ﾊﾝｶｸｶﾀｶﾅ と全角１２３",
    "絵文字👍🏽🍣🇯🇵 と家族👨‍👩‍👧‍👦、異体字 葛󠄀",
    "Mixed 日本語 and English: it's 3.14159, don't; 2024年12月31日 23:59",
    "combining e\u0301 a\u0308, RTL עברית العربية, Hangul 한국어, Thai ภาษาไทย",
    "literal <|endoftext|> and <|pad_5000|> inside a document",
    "\x00\x01 control \x7f and \ufeff BOM, \u2028 line separator",
    "    indented code:\n\tif x == 1:\n\t\treturn [x, y]  # comment",
]


def _profile(*sets: str) -> Profile:
    return load_profile("micro-test", list(sets), use_env=False)


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """micro-test's data (the embedded corpus): 3,000 tokens learned, padded to model.vocab_size."""
    out = tmp_path_factory.mktemp("tok") / "ja"
    train_profile_tokenizer(_profile(), out, vocab_size=3000, samples=10_000)
    return out


@pytest.fixture(scope="module")
def tok(trained: Path) -> TextTokenizer:
    return load_tokenizer(str(trained))


def _random_unicode(r: random.Random) -> str:
    ranges = [(0x20, 0x7E), (0x3000, 0x30FF), (0x4E00, 0x9FFF), (0x1F300, 0x1FAFF), (0x20000, 0x2A6DF),
              (0xAC00, 0xD7A3), (0x0, 0x1F), (0x80, 0x7FF), (0xE000, 0xF8FF), (0x10000, 0x10FFFF)]  # fmt: skip
    chars = []
    for _ in range(r.randint(1, 60)):
        c = r.randint(*r.choice(ranges))
        chars.append(chr(c) if not 0xD800 <= c <= 0xDFFF else "x")  # lone surrogates are not text
    return "".join(chars)


def test_training_is_deterministic_byte_for_byte(tmp_path: Path) -> None:
    cfg = _profile().data
    a = train_tokenizer(cfg, tmp_path / "a", vocab_size=2048, samples=150, seed=5)
    b = train_tokenizer(cfg, tmp_path / "b", vocab_size=2048, samples=150, seed=5)
    assert a.documents == b.documents == 150
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", META_FILE):
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes(), name
    fewer = train_tokenizer(cfg, tmp_path / "c", vocab_size=2048, samples=40, seed=5)
    assert fewer.documents == 40
    assert (tmp_path / "c" / "tokenizer.json").read_bytes() != (tmp_path / "a" / "tokenizer.json").read_bytes()


@pytest.mark.parametrize("text", ROUND_TRIP)
def test_round_trip_is_exact(tok: TextTokenizer, text: str) -> None:
    ids = tok.encode(text)
    assert tok.decode(ids) == text
    assert tok.token_bytes(ids) == text.encode("utf-8")


def test_random_unicode_round_trips_without_unknowns(tok: TextTokenizer) -> None:
    r = random.Random(16)
    for _ in range(300):
        text = _random_unicode(r)
        ids = tok.encode(text)
        assert tok.decode(ids) == text, repr(text)
        assert all(0 <= i < tok.vocab_size for i in ids)
    assert tok.unk_id is None  # byte-level: there is no unknown token to fall back to


def test_autotokenizer_loads_it_with_eos_and_the_same_ids(trained: Path, tok: TextTokenizer) -> None:
    from transformers import AutoTokenizer

    hf = AutoTokenizer.from_pretrained(str(trained))
    assert hf.eos_token == EOS_TOKEN and hf.eos_token_id == tok.eos_id == 0
    assert len(hf) == tok.vocab_size == _profile().model.vocab_size  # padded to the model's rows
    for text in [*ROUND_TRIP[3:9], *UNSEEN_JA[:3]]:
        ids = hf.encode(text, add_special_tokens=False)
        assert ids == tok.encode(text)
        assert hf.decode(ids) == text


def test_padding_tokens_are_never_produced(trained: Path, tok: TextTokenizer) -> None:
    from transformers import AutoTokenizer

    from ramgpt.data import embedded_documents

    meta = json.loads((trained / META_FILE).read_text(encoding="utf-8"))
    learned = meta["learned"]
    assert learned < tok.vocab_size == meta["padded_to"]
    pads = [tok.id_to_token(i) for i in range(learned, tok.vocab_size)]
    assert pads[0] == f"<|pad_{learned}|>"
    hf = AutoTokenizer.from_pretrained(str(trained))
    texts = [*embedded_documents(), *UNSEEN_JA, *ROUND_TRIP, " ".join(pads[:50]), "".join(pads[-50:])]
    assert max(max(ids, default=0) for ids in tok.encode_batch(texts)) < learned
    assert max(max(hf.encode(t, add_special_tokens=False), default=0) for t in texts) < learned
    with pytest.raises(ConfigError):
        pad_vocabulary(tok, tok.vocab_size - 1)


def test_digits_are_spelled_one_by_one(tok: TextTokenizer) -> None:
    assert len(tok.encode("20241231")) == 8


def test_unseen_japanese_gets_at_least_the_embedded_tokenizers_characters_per_token(tmp_path: Path) -> None:
    """Trained on the embedded corpus (less its held-out documents) with the embedded tokenizer's
    vocabulary budget; measured on Japanese neither saw."""
    from ramgpt.tokenizer import EMBEDDED_VOCAB_SIZE

    ours = train_tokenizer(_profile().data, tmp_path / "t", vocab_size=EMBEDDED_VOCAB_SIZE, samples=10_000)
    embedded = measure(load_tokenizer("embedded"), UNSEEN_JA).chars_per_token
    trained = measure(ours.tokenizer, UNSEEN_JA).chars_per_token
    assert trained >= embedded, (trained, embedded)
    assert trained > 1.2  # fewer tokens than characters, by a margin


def test_a_non_empty_out_dir_is_refused_unless_overwrite(trained: Path, tmp_path: Path) -> None:
    out = tmp_path / "o"
    out.mkdir()
    (out / "notes.txt").write_text("mine", encoding="utf-8")
    with pytest.raises(ConfigError, match="not empty"):
        train_tokenizer(_profile().data, out, vocab_size=600, samples=20)
    assert (out / "notes.txt").read_text(encoding="utf-8") == "mine"
    train_tokenizer(_profile().data, out, vocab_size=600, samples=20, overwrite=True)
    assert not (out / "notes.txt").exists() and (out / "tokenizer.json").is_file()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".o.tmp")]  # no leftovers


def test_a_data_error_while_reading_is_one_line_and_leaves_nothing(tmp_path: Path) -> None:
    import shutil

    from ramgpt.errors import DataError

    shutil.copyfile("/bin/ls", tmp_path / "ls.txt")
    cfg = _profile("data.source=text", f"data.path={tmp_path / 'ls.txt'}").data
    with pytest.raises(DataError, match="not UTF-8 text"):  # raised inside tokenizers' training loop
        train_tokenizer(cfg, tmp_path / "out", vocab_size=600, samples=10)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ls.txt"]


def test_vocab_larger_than_the_model_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="model.vocab_size"):
        train_tokenizer(_profile().data, tmp_path / "x", vocab_size=5000, samples=20, pad_to=4160)


def test_progress_reports_reading_then_learning(tmp_path: Path) -> None:
    seen: list[tuple[str, int, int | None]] = []
    train_tokenizer(_profile().data, tmp_path / "p", vocab_size=600, samples=250, on_progress=lambda *a: seen.append(a))
    phases = [p for p, _, _ in seen]
    assert phases[0] == "reading" and phases[-2:] == ["learning", "saving"]
    assert ("reading", 250, 250) in seen and ("reading", 200, 250) in seen


# --- the trainer's hook ----------------------------------------------------------------------------


def _asking_profile(run_dir: Path, **fields: object):
    """micro-test asking for a trained tokenizer (the DataConfig fields), run in ``run_dir``."""
    return _profile(*(f"data.{k}={v}" for k, v in fields.items()), f"checkpoint.out_dir={run_dir}")


def test_data_tokenizer_accepts_the_trained_directory(trained: Path, tok: TextTokenizer) -> None:
    from ramgpt.data import TokenBatches

    prof = _profile(f"data.tokenizer={trained}")
    got = ensure_tokenizer(prof)
    assert got.fingerprint == tok.fingerprint and got.vocab_size <= prof.model.vocab_size
    x, _ = TokenBatches(prof.data, got, micro_batch_size=2).next_batch()
    assert x.shape == (2, prof.data.seq_len) and int(x.max()) < got.vocab_size


def test_ensure_tokenizer_without_the_field_loads_data_tokenizer(tmp_path: Path) -> None:
    got = ensure_tokenizer(_profile(), tmp_path)
    assert got.fingerprint == load_tokenizer("embedded").fingerprint
    assert not (tmp_path / RUN_TOKENIZER_DIR).exists()


def test_ensure_tokenizer_trains_into_the_run_dir_once(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from ramgpt import tokenizer_train

    prof = _asking_profile(tmp_path, train_tokenizer=True, tokenizer_samples=120, tokenizer_vocab_size=1024)
    first = ensure_tokenizer(prof)  # type: ignore[arg-type]
    saved = tmp_path / RUN_TOKENIZER_DIR
    assert (saved / "tokenizer.json").is_file()
    assert first.vocab_size == prof.model.vocab_size
    assert json.loads((saved / META_FILE).read_text(encoding="utf-8"))["documents"] == 120

    def no_training(*a: object, **k: object) -> None:
        raise AssertionError("a resumed run must reuse the saved tokenizer")

    monkeypatch.setattr(tokenizer_train, "train_tokenizer", no_training)
    again = ensure_tokenizer(prof, tmp_path)  # type: ignore[arg-type]
    assert again.fingerprint == first.fingerprint


# --- CLI -----------------------------------------------------------------------------------------


def test_cli_tokenizer_train_writes_a_loadable_directory(tmp_path: Path) -> None:
    out = tmp_path / "cli-tok"
    args = ["tokenizer", "train", "--profile", "micro-test", "--samples", "60", "--vocab-size", "700", "--out", str(out)]
    res = CliRunner().invoke(app, args)
    assert res.exit_code == 0, res.output
    assert "60 documents" in res.output and "padded to 4,160" in res.output
    assert load_tokenizer(str(out)).vocab_size == 4160
    again = CliRunner().invoke(app, args)
    assert again.exit_code == 2
    assert "not empty" in again.output and "--overwrite" in again.output
    assert CliRunner().invoke(app, [*args, "--overwrite", "--no-pad"]).exit_code == 0
    assert load_tokenizer(str(out)).vocab_size == 700


def test_cli_tokenizer_train_on_a_text_file(tmp_path: Path) -> None:
    data = tmp_path / "ja.txt"
    data.write_text("\n".join(UNSEEN_JA * 3) + "\n", encoding="utf-8")
    out = tmp_path / "t"
    res = CliRunner().invoke(app, ["tokenizer", "train", "--set", "data.source=text", "--set", f"data.path={data}",
                                   "--set", "data.max_eval_samples=2", "--vocab-size", "400", "--out", str(out)])  # fmt: skip
    assert res.exit_code == 0, res.output
    assert "34 documents" in res.output  # 36 lines, 2 held out for evaluation


# --- end to end ---------------------------------------------------------------------------------


@pytest.mark.slow
def test_micro_test_trains_exports_and_generates_with_its_own_tokenizer(trained: Path, tmp_path: Path) -> None:
    import torch
    from transformers import AutoTokenizer, GPT2LMHeadModel

    from ramgpt.train import train

    run, exported = tmp_path / "run", tmp_path / "hf"
    prof = _profile(
        f"data.tokenizer={trained}", f"checkpoint.out_dir={run}", "optim.max_steps=10", "optim.micro_batch_size=4",
        "checkpoint.save_interval_steps=10", "logging.eval_interval=10", "logging.eval_batches=1", "logging.tui=off",
        "scheduler.warmup_steps=2",
    )  # fmt: skip
    result = train(prof)
    assert result.steps == 10 and result.final_loss is not None
    res = CliRunner().invoke(app, ["export", str(run), str(exported)])
    assert res.exit_code == 0, res.output
    hf_tok = AutoTokenizer.from_pretrained(str(exported))
    model = GPT2LMHeadModel.from_pretrained(str(exported)).eval()
    assert model.config.vocab_size == len(hf_tok) == 4160
    prompt = hf_tok("今日は", return_tensors="pt", add_special_tokens=False)
    with torch.no_grad():
        out = model.generate(**prompt, max_new_tokens=12, do_sample=False, pad_token_id=hf_tok.eos_token_id)
    assert out.shape[1] > prompt["input_ids"].shape[1]
    text = hf_tok.decode(out[0], skip_special_tokens=True)
    assert text.startswith("今日は")

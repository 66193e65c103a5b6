"""Checkpoint format: round trips, tied weights, optimizer continuation, RNG, corruption."""

from __future__ import annotations

import json
import pickle
import random
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from ramgpt import checkpoint as ck
from ramgpt.config import ModelConfig, Profile
from ramgpt.errors import CheckpointError
from ramgpt.model import GPT

CFG = ModelConfig(n_layer=2, n_head=2, n_embd=32, block_size=32, vocab_size=64)


class FakeTokenizer:
    """Stands in for TextTokenizer: only ``.save(directory)`` matters to checkpoints."""

    def save(self, directory: Path) -> None:
        Path(directory, "tokenizer.json").write_text('{"model": "fake"}')
        Path(directory, "tokenizer_config.json").write_text("{}")


def _profile() -> Profile:
    return Profile(name="tiny", model=CFG, data={"seq_len": 32})


def _train_steps(model: GPT, opt: torch.optim.Optimizer, n: int, seed: int = 0) -> None:
    g = torch.Generator().manual_seed(seed)
    for _ in range(n):
        x = torch.randint(0, CFG.vocab_size, (2, 16), generator=g)
        loss = model(x, x) / x.numel()
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)


def _model_and_opt(seed: int = 0) -> tuple[GPT, torch.optim.AdamW]:
    torch.manual_seed(seed)
    model = GPT(CFG)
    opt = torch.optim.AdamW(model.param_groups(0.1), lr=1e-2, betas=(0.9, 0.95))
    return model, opt


@pytest.fixture
def trained() -> tuple[GPT, torch.optim.AdamW]:
    model, opt = _model_and_opt()
    _train_steps(model, opt, 2)
    return model, opt


def _save(run: Path, step: int, model: GPT, opt: torch.optim.Optimizer | None, **meta) -> Path:
    meta = {"config": _profile().to_public_dict(), "tokens_seen": step * 32, **meta}
    return ck.save_checkpoint(
        run, step, model.state_dict(), None if opt is None else opt.state_dict(), meta, FakeTokenizer()
    )


def test_round_trip_model_optimizer_and_continuation(tmp_path: Path, trained) -> None:
    model, opt = trained
    path = _save(tmp_path / "run", 10, model, opt, eval_loss=3.5)
    assert path == tmp_path / "run" / "step_0000010"
    assert sorted(p.name for p in path.iterdir()) == [
        "meta.json",
        "model.safetensors",
        "optimizer.json",
        "optimizer.safetensors",
        "tokenizer",
    ]

    loaded = ck.load_checkpoint(path)
    assert loaded.step == 10 and loaded.meta["tokens_seen"] == 320 and loaded.meta["eval_loss"] == 3.5
    for k, v in model.state_dict().items():
        assert torch.equal(loaded.model_state[k], v), k
    # the tied weight was stored once and comes back as the very same tensor
    on_disk = load_file(path / "model.safetensors")
    assert "embed.wte.weight" in on_disk and "head.lm_head.weight" not in on_disk
    assert loaded.meta["tied"] == {"head.lm_head.weight": "embed.wte.weight"}
    assert loaded.model_state["head.lm_head.weight"] is loaded.model_state["embed.wte.weight"]

    model2, opt2 = _model_and_opt(seed=99)  # different init: everything must come from disk
    model2.load_state_dict(loaded.model_state)
    opt2.load_state_dict(loaded.optimizer_state)
    assert model2.head.lm_head.weight is model2.embed.wte.weight
    assert (
        model2.head.lm_head.weight.untyped_storage().data_ptr() == model2.embed.wte.weight.untyped_storage().data_ptr()
    )
    step_t = opt2.state_dict()["state"][0]["step"]
    assert (
        isinstance(step_t, torch.Tensor) and step_t.dim() == 0 and step_t.dtype == torch.float32 and step_t.item() == 2
    )
    assert opt2.state_dict()["param_groups"][0]["betas"] == (0.9, 0.95)

    # one more step on each gives identical parameters: the optimizer continues exactly
    _train_steps(model, opt, 1, seed=5)
    _train_steps(model2, opt2, 1, seed=5)
    for (k, a), (_, b) in zip(model.state_dict().items(), model2.state_dict().items(), strict=True):
        assert torch.equal(a, b), k


def test_meta_lists_files_with_sizes_and_hashes(tmp_path: Path, trained) -> None:
    model, opt = trained
    path = _save(tmp_path / "run", 3, model, opt)
    meta = json.loads((path / "meta.json").read_text())
    assert meta["step"] == 3 and meta["format_version"] == ck.FORMAT_VERSION and meta["created"]
    assert set(meta["files"]) == {
        "model.safetensors",
        "optimizer.safetensors",
        "optimizer.json",
        "tokenizer/tokenizer.json",
        "tokenizer/tokenizer_config.json",
    }
    import hashlib

    for name, rec in meta["files"].items():
        data = (path / name).read_bytes()
        assert rec["bytes"] == len(data) and rec["sha256"] == hashlib.sha256(data).hexdigest()
    assert ck.load_checkpoint(path).tokenizer_dir == path / "tokenizer"


def test_other_optimizer_shapes_round_trip(tmp_path: Path) -> None:
    """SGD momentum (no step), a tensor lr, bf16 state, int keys, no optimizer at all."""
    p = torch.nn.Parameter(torch.randn(4, 3))
    sgd = torch.optim.SGD([p], lr=torch.tensor(0.1), momentum=0.9)
    p.grad = torch.ones_like(p)
    sgd.step()
    sd = sgd.state_dict()
    sd["state"][0]["extra_bf16"] = torch.randn(5).to(torch.bfloat16)
    sd["state"][0]["count"] = torch.tensor(7, dtype=torch.int64)
    ck.save_checkpoint(tmp_path, 1, {"w": p.detach()}, sd, {})
    back = ck.load_checkpoint(tmp_path / "step_0000001").optimizer_state
    assert torch.equal(back["state"][0]["momentum_buffer"], sd["state"][0]["momentum_buffer"])
    assert back["state"][0]["extra_bf16"].dtype == torch.bfloat16
    assert torch.equal(back["state"][0]["extra_bf16"], sd["state"][0]["extra_bf16"])
    assert back["state"][0]["count"].dtype == torch.int64 and back["state"][0]["count"].item() == 7
    assert torch.equal(back["param_groups"][0]["lr"], torch.tensor(0.1))
    sgd2 = torch.optim.SGD([torch.nn.Parameter(p.detach().clone())], lr=0.5, momentum=0.9)
    sgd2.load_state_dict(back)

    ck.save_checkpoint(tmp_path, 2, {"w": p.detach()}, None, {})
    assert ck.load_checkpoint(tmp_path / "step_0000002").optimizer_state is None


def test_load_without_optimizer_skips_it(tmp_path: Path, trained) -> None:
    model, opt = trained
    path = _save(tmp_path, 1, model, opt)
    (path / "optimizer.safetensors").write_bytes(b"x" * (path / "optimizer.safetensors").stat().st_size)
    loaded = ck.load_checkpoint(path, with_optimizer=False)  # its corruption is not our business here
    assert loaded.optimizer_state is None and loaded.model_state
    with pytest.raises(CheckpointError, match="optimizer.safetensors"):
        ck.load_checkpoint(path)


def test_rng_state_round_trips_through_json() -> None:
    random.seed(1)
    np.random.seed(2)
    torch.manual_seed(3)
    state = json.loads(json.dumps(ck.capture_rng_state()))
    expected = (random.random(), np.random.rand(), torch.rand(3))
    random.seed(11)
    np.random.seed(12)
    torch.manual_seed(13)
    ck.restore_rng_state(state)
    got = (random.random(), np.random.rand(), torch.rand(3))
    assert got[0] == expected[0] and got[1] == expected[1] and torch.equal(got[2], expected[2])


def test_load_model_for_inference(tmp_path: Path, trained) -> None:
    model, opt = trained
    _save(tmp_path / "run", 4, model, opt)
    m2, profile, tok_dir = ck.load_model_for_inference(tmp_path / "run")
    assert profile == _profile()
    assert tok_dir == tmp_path / "run" / "step_0000004" / "tokenizer"
    assert not m2.training
    assert m2.head.lm_head.weight is m2.embed.wte.weight
    model.eval()
    idx = torch.randint(0, CFG.vocab_size, (1, 8))
    assert torch.equal(m2.forward_logits(idx)[0], model.forward_logits(idx)[0])


def test_load_model_for_inference_needs_config(tmp_path: Path, trained) -> None:
    model, _ = trained
    ck.save_checkpoint(tmp_path, 1, model.state_dict(), None, {})
    with pytest.raises(CheckpointError, match="no config"):
        ck.load_model_for_inference(tmp_path)


def test_resave_same_step_replaces_atomically(tmp_path: Path) -> None:
    ck.save_checkpoint(tmp_path, 5, {"w": torch.zeros(3)}, None, {"v": 1})
    ck.save_checkpoint(tmp_path, 5, {"w": torch.ones(3)}, None, {"v": 2})
    loaded = ck.load_checkpoint(tmp_path / "step_0000005")
    assert loaded.meta["v"] == 2 and torch.equal(loaded.model_state["w"], torch.ones(3))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step_0000005"]


def test_resave_without_atomic_exchange(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Where renameat2(RENAME_EXCHANGE) is missing, the old copy is renamed away first."""
    monkeypatch.setattr(ck.store, "exchange", lambda a, b: False)
    ck.save_checkpoint(tmp_path, 5, {"w": torch.zeros(3)}, None, {"v": 1})
    ck.save_checkpoint(tmp_path, 5, {"w": torch.ones(3)}, None, {"v": 2})
    assert ck.load_checkpoint(tmp_path / "step_0000005").meta["v"] == 2
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step_0000005"]


def test_never_unpickles(tmp_path: Path, trained, monkeypatch: pytest.MonkeyPatch) -> None:
    model, opt = trained
    _save(tmp_path, 1, model, opt)

    def boom(*a, **k):
        raise AssertionError("unpickling attempted")

    monkeypatch.setattr(pickle, "load", boom)
    monkeypatch.setattr(pickle, "loads", boom)
    monkeypatch.setattr(torch, "load", boom)
    ck.load_checkpoint(tmp_path)
    ck.load_model_for_inference(tmp_path)


def test_bad_meta_or_interrupt_leaves_nothing_behind(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match="JSON-serialisable"):
        ck.save_checkpoint(tmp_path, 1, {"w": torch.zeros(2)}, None, {"x": object()})

    class CtrlC:
        def save(self, directory: Path) -> None:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        ck.save_checkpoint(tmp_path, 2, {"w": torch.zeros(2)}, None, {}, CtrlC())

    class Broken:
        def save(self, directory: Path) -> None:
            raise RuntimeError("tokenizer exploded\nsecond line")

    with pytest.raises(CheckpointError) as ei:
        ck.save_checkpoint(tmp_path, 3, {"w": torch.zeros(2)}, None, {}, Broken())
    assert "\n" not in str(ei.value) and "tokenizer exploded" in str(ei.value)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(
    "damage, fragment",
    [
        ("truncate", "model.safetensors is truncated"),
        ("delete", "model.safetensors is missing"),
        ("meta_garbage", "meta.json is not valid JSON"),
        ("no_meta", "no meta.json"),
    ],
)
def test_partial_checkpoint_is_skipped_with_warning(tmp_path: Path, damage: str, fragment: str) -> None:
    for step in (1, 2):
        ck.save_checkpoint(tmp_path, step, {"w": torch.full((1000,), float(step))}, None, {})
    bad = tmp_path / "step_0000002"
    if damage == "truncate":
        with open(bad / "model.safetensors", "r+b") as f:
            f.truncate(100)
    elif damage == "delete":
        (bad / "model.safetensors").unlink()
    elif damage == "meta_garbage":
        (bad / "meta.json").write_text('{"step": 2, "files": {')
    else:
        (bad / "meta.json").unlink()

    with pytest.raises(CheckpointError) as ei:
        ck.load_checkpoint(bad)
    msg = str(ei.value)
    assert "\n" not in msg and fragment in msg and "step_0000002" in msg

    with pytest.warns(ck.PartialCheckpointWarning, match=rf"skipping partial checkpoint step_0000002 \(.*{fragment}"):
        assert ck.latest_checkpoint(tmp_path) == tmp_path / "step_0000001"
    with pytest.warns(ck.PartialCheckpointWarning):
        assert ck.load_checkpoint(tmp_path).step == 1
    infos = {i.path.name: i for i in ck.list_checkpoints(tmp_path)}
    assert infos["step_0000001"].complete and not infos["step_0000002"].complete
    assert fragment in infos["step_0000002"].reason


def test_flipped_bytes_fail_sha256(tmp_path: Path) -> None:
    for step in (1, 2):
        ck.save_checkpoint(tmp_path, step, {"w": torch.full((1000,), float(step))}, None, {})
    bad = tmp_path / "step_0000002" / "model.safetensors"
    raw = bytearray(bad.read_bytes())
    raw[-10] ^= 0xFF  # same size: only the hash can tell
    bad.write_bytes(bytes(raw))

    with pytest.raises(CheckpointError, match=r"model\.safetensors is corrupt \(sha256") as ei:
        ck.load_checkpoint(tmp_path / "step_0000002")
    assert "\n" not in str(ei.value)
    # the cheap scan cannot see it; the verifying one skips it
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert ck.latest_checkpoint(tmp_path) == tmp_path / "step_0000002"
    with pytest.warns(ck.PartialCheckpointWarning, match="step_0000002.*sha256"):
        assert ck.latest_checkpoint(tmp_path, verify=True) == tmp_path / "step_0000001"
    # resuming from the run dir falls back to the older good checkpoint, loudly
    with pytest.warns(ck.PartialCheckpointWarning, match="step_0000002"):
        assert ck.load_checkpoint(tmp_path).step == 1


def test_garbled_header_without_verify_is_one_line(tmp_path: Path) -> None:
    path = ck.save_checkpoint(tmp_path, 1, {"w": torch.zeros(100)}, None, {})
    f = path / "model.safetensors"
    raw = bytearray(f.read_bytes())
    raw[0:8] = (10**12).to_bytes(8, "little")  # absurd header length, same file size
    f.write_bytes(bytes(raw))
    with pytest.raises(CheckpointError) as ei:
        ck.load_checkpoint(path, verify=False)
    assert "\n" not in str(ei.value) and "model.safetensors" in str(ei.value)


def test_resolve_checkpoint(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match="no such checkpoint or run directory"):
        ck.resolve_checkpoint(tmp_path / "nope")
    (tmp_path / "run").mkdir()
    with pytest.raises(CheckpointError, match=r"^no complete checkpoint in .*run$"):
        ck.resolve_checkpoint(tmp_path / "run")
    p1 = ck.save_checkpoint(tmp_path / "run", 1, {"w": torch.zeros(2)}, None, {})
    p7 = ck.save_checkpoint(tmp_path / "run", 7, {"w": torch.zeros(2)}, None, {})
    assert ck.resolve_checkpoint(tmp_path / "run") == p7
    assert ck.resolve_checkpoint(p1) == p1
    assert ck.resolve_checkpoint(p1 / "model.safetensors") == p1
    (p7 / "meta.json").unlink()
    with pytest.raises(CheckpointError, match="step_0000007 is incomplete"):
        ck.resolve_checkpoint(p7)
    assert ck.latest_checkpoint(tmp_path / "missing") is None
    assert ck.list_checkpoints(tmp_path / "missing") == []


def test_bad_step_is_rejected(tmp_path: Path) -> None:
    for step in (-1, 10_000_000, 1.5):
        with pytest.raises(CheckpointError, match="step"):
            ck.save_checkpoint(tmp_path, step, {"w": torch.zeros(2)}, None, {})


def test_resave_fallback_killed_between_its_two_renames_leaves_the_step_loadable(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Without RENAME_EXCHANGE a re-save renames the old copy away, then the new one into place.
    A process killed between the two renames must not lose the step: the next look at the run
    directory finds the old copy and puts it back."""
    import os

    monkeypatch.setattr(ck.store, "exchange", lambda a, b: False)
    ck.save_checkpoint(tmp_path, 5, {"w": torch.zeros(3)}, None, {"v": 1})
    real_rename = os.rename
    calls = {"n": 0}

    def killed_after_first_rename(src, dst):
        calls["n"] += 1
        if calls["n"] == 2:  # the new copy's rename: the process dies here
            raise SystemExit("killed")
        return real_rename(src, dst)

    monkeypatch.setattr(os, "rename", killed_after_first_rename)
    with pytest.raises(SystemExit):
        ck.save_checkpoint(tmp_path, 5, {"w": torch.ones(3)}, None, {"v": 2})
    monkeypatch.setattr(os, "rename", real_rename)
    monkeypatch.setattr(ck.store, "writer_alive", lambda pid, t: False)  # the "killed" writer is this process
    assert calls["n"] == 2
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        loaded = ck.load_checkpoint(tmp_path)
    assert loaded.step == 5 and loaded.meta["v"] == 1 and torch.equal(loaded.model_state["w"], torch.zeros(3))
    assert any("recovered step_0000005" in str(w.message) for w in caught)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step_0000005"]


@pytest.mark.slow
def test_a_checkpoint_written_before_the_restructuring_resumes(tmp_path: Path) -> None:
    """tests/data/main-2026-11-28/step_0000004 was written by main at f9f9be5 (a tiny micro-test,
    6 steps, saved at 4): today's code resumes it and logs that run's losses for steps 5 and 6."""
    import shutil

    from ramgpt.config import load_profile
    from ramgpt.train import train

    data = Path(__file__).resolve().parent / "data" / "main-2026-11-28"
    expected = json.loads((data / "expected.json").read_text())
    run = tmp_path / "run"
    run.mkdir()
    shutil.copytree(data / "step_0000004", run / "step_0000004")
    prof = load_profile("micro-test", [*expected["sets"], "optim.max_steps=6", "logging.tui=off",
                                       f"checkpoint.out_dir={run}"], use_env=False)
    res = train(prof, resume="latest")
    assert res.steps == 6
    rows = [json.loads(ln) for ln in (run / "metrics.jsonl").read_text().splitlines() if ln.strip()]
    got = {r["step"]: r["loss"] for r in rows}
    assert sorted(got) == [5, 6]
    for step in (5, 6):
        assert got[step] == pytest.approx(expected["losses"][str(step)], rel=1e-5), step


def test_safetensors_writer_hashes_what_it_wrote_before_handing_tensors_back(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The writer hashes on a second thread while it writes: the digest must be the file's, over
    several chunks per tensor, and a tensor handed back through ``after_tensor`` (which a training
    step may then update in place) must already be hashed as written."""
    import hashlib

    from ramgpt.checkpoint import tensorfile

    monkeypatch.setattr(tensorfile, "_CHUNK", 4096)  # several chunks per tensor
    gen = torch.Generator().manual_seed(random.randrange(10_000))
    tensors = [(f"t{i}", torch.randn(n, generator=gen)) for i, n in enumerate((5000, 17, 3000, 12_345))]
    want = {k: t.clone() for k, t in tensors}

    def scribble(t: torch.Tensor) -> None:  # what the next optimizer update would do to it
        t.add_(1.0)

    rec = tensorfile.write_safetensors(tmp_path / "x.safetensors", tensors, after_tensor=scribble)
    raw = (tmp_path / "x.safetensors").read_bytes()
    assert rec.bytes == len(raw)
    assert rec.sha256 == hashlib.sha256(raw).hexdigest()
    got = load_file(str(tmp_path / "x.safetensors"))
    for k, t in want.items():
        assert torch.equal(got[k], t), k  # the values before the scribble

"""Streamed (ramtorch) training must match resident training: same losses and gradients to
float32 tolerance over several optimizer steps, on the CPU, with fresh random inputs."""

from __future__ import annotations

import copy

import pytest
import torch
import torch._dynamo
import torch._dynamo.testing

from ramgpt.checkpoint.tensorfile import materialize
from ramgpt.config import ModelConfig, OptimConfig
from ramgpt.engine import ResidentEngine, StreamedEngine
from ramgpt.engine.chunked_adamw import ChunkedAdamW
from ramgpt.engine.gradpath import DeviceGradPath
from ramgpt.model import GPT

CUDA = pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"))


def _pair(seed: int, cfg: ModelConfig, optim: OptimConfig, spp: int, grad_accum: str = "host", device: str = "cpu"):
    torch.manual_seed(seed)
    base = GPT(cfg)
    res = ResidentEngine(copy.deepcopy(base), device=device, precision="fp32", optim_cfg=optim,
                         micro_batch_size=spp, gradient_checkpointing=False)
    stm = StreamedEngine(copy.deepcopy(base), device=device, precision="fp32", optim_cfg=optim,
                         seqs_per_pass=spp, window=2, grad_accum=grad_accum, optimizer_gpu_share=0.5)
    return res, stm


def _grads(engine) -> dict[str, torch.Tensor]:
    return {n: p.grad.detach().cpu().clone() for n, p in engine.model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("device", ["cpu", CUDA])
@pytest.mark.parametrize("grad_accum", ["host", "device"])
@pytest.mark.parametrize("tie", [True, False])
def test_streamed_matches_resident_over_steps(tie: bool, grad_accum: str, device: str,
                                             monkeypatch: pytest.MonkeyPatch) -> None:
    """On a GPU (fp32, TF32 off) this also checks the CUDA streams of both gradient paths, with
    GPU scratch pieces that do not divide the tensors (the default 16M elements would never split
    these small ones)."""
    monkeypatch.setattr(DeviceGradPath, "PIECE", 1000)
    monkeypatch.setattr(ChunkedAdamW, "PIECE", 1000)  # the GPU's share of the update, in pieces too
    cfg = ModelConfig(n_layer=3, n_head=2, n_embd=32, block_size=16, vocab_size=64, tie_embeddings=tie)
    # eps 1e-6: the key part of c_attn's bias has an exactly-zero true gradient (softmax is
    # shift-invariant), and Adam with a tiny eps would amplify its rounding noise into updates
    optim = OptimConfig(lr=3e-3, eps=1e-6, grad_clip=1.0, micro_batch_size=2, grad_accum_steps=3)
    res, stm = _pair(int(torch.randint(0, 10_000, ()).item()), cfg, optim, spp=2, grad_accum=grad_accum, device=device)
    gen = torch.Generator().manual_seed(int(torch.randint(0, 10_000, ()).item()))
    # on a GPU with the device path the GPU updates part of the chunks; elsewhere the CPU all of them
    assert bool(stm.adamw.gpu_chunks) == (device == "cuda" and grad_accum == "device")
    try:
        start = {n: p.detach().clone() for n, p in stm.model.named_parameters()}
        for step in range(4):
            x = torch.randint(0, cfg.vocab_size, (6, 16), generator=gen)
            y = torch.randint(0, cfg.vocab_size, (6, 16), generator=gen)
            # the last pass is announced, as train_step does: the streamed engine then takes the
            # gradient norm from its gradient path (the GPU side stream on CUDA)
            l_res = sum(float(res.forward_backward(x[i : i + 2], y[i : i + 2], last_pass=i == 4)) for i in range(0, 6, 2))
            l_stm = sum(float(stm.forward_backward(x[i : i + 2], y[i : i + 2], last_pass=i == 4)) for i in range(0, 6, 2))
            assert l_stm == pytest.approx(l_res, rel=1e-5), f"step {step} loss"
            stm._before_optimizer()  # wait for the async grad worker before comparing
            g_res, g_stm = _grads(res), _grads(stm)
            assert g_res.keys() == g_stm.keys()
            for n in g_res:
                # bias grads are sums over all tokens with cancellation: compare on the tensor's scale
                scale = float(g_res[n].abs().max()) + 1.0
                torch.testing.assert_close(g_stm[n], g_res[n], rtol=1e-4, atol=1e-6 * scale, msg=n)
            r1 = res.optimizer_step(1e-3, n_tokens=6 * 16)
            r2 = stm.optimizer_step(1e-3, n_tokens=6 * 16)
            assert r1.grad_norm == pytest.approx(r2.grad_norm, rel=1e-4)
            stm.wait_optimizer()  # the update runs in the background until the next forward needs it
        for (n, p_res), (_, p_stm) in zip(res.model.named_parameters(), stm.model.named_parameters()):
            torch.testing.assert_close(p_stm, p_res.cpu(), rtol=1e-4, atol=1e-6, msg=n)
            # every parameter learned, the tied embedding included
            assert not torch.equal(p_stm, start[n]), f"{n} did not change"
        if tie:
            assert stm.model.head.lm_head.weight is stm.model.embed.wte.weight
        # what the GPU loads is the masters themselves: no second copy of the weights on the host
        for st, masters in zip(stm.om._state, stm._master_of):
            for k, t in st.tensors.items():
                assert t.data_ptr() == masters[k].data_ptr(), k
        # eval through the streamed forward equals the resident forward
        x = torch.randint(0, cfg.vocab_size, (3, 16), generator=gen)
        assert stm.eval_loss_sum(x, x) == pytest.approx(res.eval_loss_sum(x, x), rel=1e-5)
    finally:
        stm.close()


def _masters(engine) -> dict[str, torch.Tensor]:
    """The engine's fp32 master values as plain tensors (split masters joined), as a checkpoint has them."""
    return {k: materialize(v).detach().clone() for k, v in engine.state_dict().items()}


@pytest.mark.parametrize("device", ["cpu", CUDA])
@pytest.mark.parametrize("mode", ["cast", "copies", "split-all", "split-gpu", "split-embed", "split-auto"])
def test_streamed_bf16_computes_with_the_current_masters(device: str, mode: str,
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    """The fp32 masters are cast to bf16 as each chunk loads (here through pieces smaller than the
    tensors); with ``host_bf16_copies`` bf16 copies refreshed after each update load instead; with
    ``split_masters`` the masters' bf16 halves, of every chunk, of the chunks the GPU updates (the
    others cast), or as auto decides (the shipped path: every chunk where the CPU's kernel loads). Every step's loss and gradients must be those of the
    *current* masters cast to bf16 and run whole under autocast: stale or mis-cast weights would
    differ."""
    from ramgpt.engine import native, offload, planes

    if mode == "split-gpu" and device == "cpu":
        pytest.skip("the GPU's share of the update needs a GPU")

    monkeypatch.setattr(offload, "PIECE", 700)
    monkeypatch.setattr(planes, "PIECE", 1000)  # the CPU update's pieces cut the tensors and batch small ones
    monkeypatch.setattr(ChunkedAdamW, "PIECE", 1000)  # and the GPU's share
    cfg = ModelConfig(n_layer=2, n_head=2, n_embd=32, block_size=16, vocab_size=64, tie_embeddings=True)
    optim = OptimConfig(lr=1e-2, grad_clip=1.0, micro_batch_size=2, grad_accum_steps=2)
    torch.manual_seed(int(torch.randint(0, 10_000, ()).item()))
    stm = StreamedEngine(GPT(cfg), device=device, precision="bf16", optim_cfg=optim, seqs_per_pass=2, window=2,
                         host_bf16_copies=mode == "copies",
                         split_masters={"split-all": "all", "split-gpu": "gpu", "split-embed": [0],
                                        "split-auto": "auto"}.get(mode, "none"),
                         grad_accum="device" if device == "cuda" else "host", optimizer_gpu_share=0.5)
    gen = torch.Generator().manual_seed(int(torch.randint(0, 10_000, ()).item()))
    # each chunk loads as one run of back-to-back tensors (the head from the masters: its LayerNorm,
    # and the tied embedding; from the copies, where it has its own copy of the embedding: one)
    kernel = native.load() is not None
    if mode == "split-auto":
        assert stm.split_masters == ("all" if kernel else "gpu")
        mode = "split-all" if kernel else "split-gpu"
    assert (stm.planes is not None) == (mode.startswith("split") and (mode != "split-gpu" or device == "cuda"))
    assert bool(stm.adamw.gpu_chunks) == (device == "cuda")
    split = {"split-all": set(range(4)), "split-gpu": set(stm.adamw.gpu_chunks), "split-embed": {0}}.get(mode, set())
    # the head loads its LayerNorm and the tied embedding as one run each, into one slot, also
    # where one of them is split (a bf16 run) and the other is not (an fp32 run, cast)
    assert [None if p is None else len(p) for p in stm.om.load_plans] == ([1, 1, 1, 1] if mode == "copies" else [1, 1, 1, 2])
    if mode == "split-embed":
        assert [f.dtype for f in stm.om.load_srcs[-1]] == [torch.bfloat16, torch.float32]
    if mode.startswith("split") and stm.planes is not None:  # the GPU loads the bf16 halves in place: no copy kept
        assert split and stm.copies is None
        assert (stm.om.cast_dtype is None) == (mode == "split-all")  # the chunks not split are cast as they load
        for i, (st, masters) in enumerate(zip(stm.om._state, stm._master_of)):
            for k, t in st.tensors.items():
                owner = 0 if k.endswith("lm_head.weight") else i
                if owner in split:
                    assert t.dtype == torch.bfloat16 and t.data_ptr() == stm.planes.hi(masters[k]).data_ptr(), k
                else:
                    assert t.dtype == torch.float32 and t.data_ptr() == masters[k].data_ptr(), k
    try:
        losses = []
        for step in range(3):
            stm.wait_optimizer()
            ref = GPT(cfg)
            ref.load_state_dict(_masters(stm))
            ref = ref.to(device=device, dtype=torch.bfloat16)
            names = [n for n, _ in ref.named_parameters()]
            x = torch.randint(0, cfg.vocab_size, (4, 16), generator=gen)
            y = torch.randint(0, cfg.vocab_size, (4, 16), generator=gen)
            l_ref, g_ref = 0.0, {n: 0.0 for n in names}
            for i in (0, 2):
                with torch.autocast(torch.device(device).type, dtype=torch.bfloat16):
                    loss = ref(x[i : i + 2].to(device), y[i : i + 2].to(device))
                grads = torch.autograd.grad(loss, list(ref.parameters()))
                l_ref += float(loss.detach())
                for n, g in zip(names, grads):
                    g_ref[n] = g_ref[n] + g.float().cpu()
            l_stm = sum(float(stm.forward_backward(x[i : i + 2], y[i : i + 2], last_pass=i == 2)) for i in (0, 2))
            assert l_stm == pytest.approx(l_ref, rel=2e-3), f"step {step} loss"
            stm._before_optimizer()
            g_stm = _grads(stm)
            for n in names:
                scale = float(g_ref[n].abs().max()) + 1e-3
                torch.testing.assert_close(g_stm[n], g_ref[n], rtol=3e-2, atol=3e-2 * scale, msg=n)
            stm.optimizer_step(1e-2, n_tokens=4 * 16)
            losses.append(l_stm)
            # every chunk went into one of the bf16 load slots (none tensor by tensor)
            assert stm.om._slots is not None and all(s.dtype == torch.bfloat16 for s in stm.om._slots)
        assert len(set(losses)) == 3  # the weights moved between steps
    finally:
        stm.close()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_device_accumulation_falls_back_to_host_when_page_locking_fails(monkeypatch: pytest.MonkeyPatch) -> None:
    """cudaHostRegister can fail (a locked-memory limit, WSL2): the engine warns, sums on the
    host instead, and the failed call's error does not surface in a later kernel launch."""
    real = torch.cuda.cudart()

    class FailingRegister:
        def __getattr__(self, name):
            return getattr(real, name)

        def cudaHostRegister(self, ptr, size, flags):  # noqa: N802 - the CUDA name
            return real.cudaHostRegister(0, 0, 0)  # a genuine failure, left as the runtime's last error

    monkeypatch.setattr(torch.cuda, "cudart", lambda: FailingRegister())
    cfg = ModelConfig(n_layer=2, n_head=2, n_embd=32, block_size=16, vocab_size=64)
    optim = OptimConfig(lr=3e-3, eps=1e-6, grad_clip=1.0, micro_batch_size=2, grad_accum_steps=2)
    with pytest.warns(RuntimeWarning, match="page-lock"):
        res, stm = _pair(int(torch.randint(0, 10_000, ()).item()), cfg, optim, spp=2, grad_accum="device",
                         device="cuda")
    try:
        assert stm.grad_accum == "host"
        x = torch.randint(0, cfg.vocab_size, (4, 16))
        l_res = sum(float(res.forward_backward(x[i : i + 2], x[i : i + 2])) for i in (0, 2))
        l_stm = sum(float(stm.forward_backward(x[i : i + 2], x[i : i + 2])) for i in (0, 2))
        assert l_stm == pytest.approx(l_res, rel=1e-5)
        stm._before_optimizer()
        g_res, g_stm = _grads(res), _grads(stm)
        for n in g_res:
            scale = float(g_res[n].abs().max()) + 1.0
            torch.testing.assert_close(g_stm[n], g_res[n], rtol=1e-4, atol=1e-6 * scale, msg=n)
    finally:
        stm.close()


def test_streamed_inference_matches_the_model_with_kv_cache() -> None:
    """generate's streamed path (weights through ramtorch) gives the resident model's logits,
    prompt prefill and cached single-token steps alike, and the same greedy tokens."""
    from ramgpt.engine import StreamedInferenceModel
    from ramgpt.generate import GenerateOptions, generate_tokens

    cfg = ModelConfig(n_layer=3, n_head=2, n_embd=32, block_size=32, vocab_size=64)
    torch.manual_seed(int(torch.randint(0, 10_000, ()).item()))
    model = GPT(cfg).eval()
    streamed = StreamedInferenceModel(model, device="cpu", dtype=torch.float32)
    try:
        idx = torch.randint(0, 64, (2, 7))
        ref, ref_cache = model.forward_logits(idx)
        got, cache = streamed.forward_logits(idx)
        torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)
        nxt = torch.randint(0, 64, (2, 1))
        ref2, _ = model.forward_logits(nxt, ref_cache, pos_offset=7)
        got2, _ = streamed.forward_logits(nxt, cache, pos_offset=7)
        torch.testing.assert_close(got2, ref2, rtol=1e-5, atol=1e-5)
        opts = GenerateOptions(max_new_tokens=12, temperature=0.0, top_k=None, top_p=None, repetition_penalty=1.0)
        prompt = torch.randint(1, 64, (5,)).tolist()
        a = list(generate_tokens(model, prompt, opts, eos_id=64, device="cpu"))  # 64: never sampled
        b = list(generate_tokens(streamed, prompt, opts, eos_id=64, device="cpu"))
        assert a == b and len(a) == 12
    finally:
        streamed.close()


def test_fp16_scaler_skips_overflow_and_lowers_the_scale() -> None:
    """fp16's grad scaler: a non-finite gradient skips the update and halves the scale; finite
    steps keep it, and the scale grows after growth_interval good steps."""
    from ramgpt.engine.base import LossScaler

    cfg = ModelConfig(n_layer=1, n_head=2, n_embd=16, block_size=8, vocab_size=32)
    eng = ResidentEngine(GPT(cfg), device="cpu", precision="fp32", optim_cfg=OptimConfig(lr=1e-2),
                         micro_batch_size=2, gradient_checkpointing=False)
    eng.scaler = LossScaler(enabled=True, init=1024.0, growth_interval=2)
    before = {n: p.detach().clone() for n, p in eng.model.named_parameters()}
    x = torch.randint(0, 32, (2, 8))
    eng.forward_backward(x, x)
    eng.model.h[0].mlp.c_fc.weight.grad[0, 0] = float("inf")  # an fp16 overflow
    rep = eng.optimizer_step(1e-2, n_tokens=16)
    assert rep.skipped and rep.loss_scale == 512.0
    for n, p in eng.model.named_parameters():
        assert torch.equal(p, before[n]), f"{n} changed on a skipped step"
    for expected in (512.0, 1024.0):  # two good steps: the second doubles the scale
        eng.forward_backward(x, x)
        rep = eng.optimizer_step(1e-2, n_tokens=16)
        assert not rep.skipped and rep.loss_scale == expected
    assert any(not torch.equal(p, before[n]) for n, p in eng.model.named_parameters())


def test_low_ram_mode_is_lossless_and_keeps_no_moments_in_ram(tmp_path) -> None:
    """AdamW's moments in a memory-mapped file (runtime.optimizer_on_disk) give bit-identical
    steps, and after each update the moments' pages are handed back to the OS."""
    cfg = ModelConfig(n_layer=2, n_head=2, n_embd=32, block_size=16, vocab_size=64)
    optim = OptimConfig(lr=3e-3, eps=1e-6, grad_clip=1.0, micro_batch_size=2, grad_accum_steps=2)
    torch.manual_seed(int(torch.randint(0, 10_000, ()).item()))
    base = GPT(cfg)
    ram = StreamedEngine(copy.deepcopy(base), device="cpu", precision="fp32", optim_cfg=optim, seqs_per_pass=2)
    disk = StreamedEngine(copy.deepcopy(base), device="cpu", precision="fp32", optim_cfg=optim, seqs_per_pass=2,
                          moments_file=tmp_path / "m.bin")
    try:
        gen = torch.Generator().manual_seed(int(torch.randint(0, 10_000, ()).item()))
        for _ in range(4):
            x = torch.randint(0, 64, (4, 16), generator=gen)
            a, b = ram.train_step(x, x, 2e-3), disk.train_step(x, x, 2e-3)
            assert a.loss_sum == b.loss_sum and a.grad_norm == b.grad_norm
        ram.wait_optimizer()
        disk.wait_optimizer()
        for (n, p), q in zip(ram.model.named_parameters(), disk.model.parameters()):
            assert torch.equal(p, q), n
        for p, q in zip(ram.params, disk.params):
            for k in ("exp_avg", "exp_avg_sq"):
                assert torch.equal(ram.optimizer.state[p][k], disk.optimizer.state[q][k])
                assert disk.moments.contains(disk.optimizer.state[q][k]), "the moments live in the file"
        assert (tmp_path / "m.bin").stat().st_size >= sum(p.numel() * 8 for p in disk.params)
    finally:
        ram.close()
        disk.close()
    assert not (tmp_path / "m.bin").exists(), "the scratch file goes with the engine"


def test_gpu_share_of_the_update_follows_the_forward_order() -> None:
    from ramgpt.engine.streamed import gpu_update_chunks

    sizes = [80] + [28] * 36 + [1]
    for share in (0.25, 0.4, 0.6):
        on_gpu = gpu_update_chunks(sizes, share)
        assert on_gpu == sorted(on_gpu)
        got = sum(sizes[i] for i in on_gpu) / sum(sizes)
        assert abs(got - share) < 0.05, (share, got)
        # both sides move up the model together: each half of the chunks is shared about evenly
        first = sum(sizes[i] for i in on_gpu if i < 19) / sum(sizes[:19])
        assert abs(first - share) < 0.12, (share, first)
    assert gpu_update_chunks(sizes, 0.0) == [] and gpu_update_chunks(sizes, 1.0) == list(range(len(sizes)))


def test_stall_counters_tell_forward_loads_from_backward_loads(monkeypatch: pytest.MonkeyPatch) -> None:
    """Slow every chunk load: the compute thread then waits in both halves of each pass, and the
    counters split those waits by the phase the chunk was wanted for (F or B)."""
    import time

    from ramgpt.engine import offload
    from ramgpt.train.metrics import transfer_metrics

    real = offload.cast_copy

    def slow_copy(dst, src, scratch=None):
        time.sleep(0.01)
        real(dst, src, scratch)

    monkeypatch.setattr(offload, "cast_copy", slow_copy)
    cfg = ModelConfig(n_layer=3, n_head=2, n_embd=32, block_size=16, vocab_size=64)
    stm = StreamedEngine(GPT(cfg), device="cpu", precision="fp32", optim_cfg=OptimConfig(lr=1e-3),
                         seqs_per_pass=2, window=2)
    try:
        x = torch.randint(0, cfg.vocab_size, (4, 16))
        stm.train_step(x, x, 1e-3)
        c = stm.counters()
        assert c["stall_load_fwd_s_total"] > 0.01 and c["stall_load_bwd_s_total"] > 0.01, c
        assert c["stall_load_fwd_s_total"] + c["stall_load_bwd_s_total"] == pytest.approx(c["stall_load_s_total"])
        m = transfer_metrics({}, c, steps=1, dt=1.0)
        assert m["stall_load_fwd_pct"] + m["stall_load_bwd_pct"] == pytest.approx(m["stall_load_pct"])
    finally:
        stm.close()


def test_streamed_engine_initialises_a_meta_model_in_its_arena() -> None:
    """``build_gpt(materialize=False)`` leaves the weights to the streamed engine, which allocates
    them in its arena and initialises them there: the same weights as the model built whole (same
    seed), tied weights still one tensor, each master a view of the arena."""
    from ramgpt.model import build_gpt

    cfg = ModelConfig(n_layer=2, n_head=2, n_embd=32, block_size=16, vocab_size=64, tie_embeddings=True)
    seed = int(torch.randint(0, 10_000, ()).item())
    torch.manual_seed(seed)
    whole = build_gpt(cfg)
    torch.manual_seed(seed)
    meta = build_gpt(cfg, materialize=False)
    assert all(p.is_meta for p in meta.parameters())
    phases: list[str] = []
    stm = StreamedEngine(meta, device="cpu", precision="fp32", optim_cfg=OptimConfig(lr=1e-3), seqs_per_pass=2,
                         window=2, on_phase=phases.append)
    try:
        # the set-up says what it is doing as each long step begins (train's panel shows it)
        assert phases == ["initialising the fp32 master weights", "page-locking the gradient accumulators",
                          "setting up the weight stream"]
        got, want = stm.model.state_dict(), whole.state_dict()
        assert got.keys() == want.keys()
        for k in want:
            assert torch.equal(got[k], want[k]), k
        assert stm.model.head.lm_head.weight is stm.model.embed.wte.weight
        assert all(stm.arena.contains(p) for p in stm.params)
        assert {id(p) for g in stm.optimizer.param_groups for p in g["params"]} == {id(p) for p in stm.params}
        # it trains as the whole-built model does under the resident engine
        res = ResidentEngine(whole, device="cpu", precision="fp32", optim_cfg=OptimConfig(lr=1e-3),
                             micro_batch_size=2, gradient_checkpointing=False)
        x = torch.randint(0, cfg.vocab_size, (4, 16))
        a, b = stm.train_step(x, x, 1e-3), res.train_step(x, x, 1e-3)
        assert a.loss_sum == pytest.approx(b.loss_sum, rel=1e-5)
        stm.wait_optimizer()
        # the update's timeline (benchmarks read it) has each chunk once, done after it began
        assert sorted(j for _, j, _, _ in stm.adamw.timeline) == list(range(len(stm.masters)))
        assert all(0 <= began <= done for _, _, began, done in stm.adamw.timeline)
    finally:
        stm.close()


def test_gradient_runs_group_back_to_back_accumulators(monkeypatch: pytest.MonkeyPatch) -> None:
    """The GPU gradient path sums a chunk's tensors run by run: tensors whose fp32 accumulators lie
    back to back in the flat buffer, at most a piece long; a tensor without gradients this pass
    ends a run, and a tensor longer than a piece goes piece by piece on its own."""
    cfg = ModelConfig(n_layer=2, n_head=2, n_embd=32, block_size=16, vocab_size=64)
    stm = StreamedEngine(GPT(cfg), device="cpu", precision="fp32", optim_cfg=OptimConfig(lr=1e-3), seqs_per_pass=2,
                         window=2, grad_accum="device")
    try:
        path = stm.grads
        assert isinstance(path, DeviceGradPath)
        masters = stm._master_of[1]  # a block
        grads = {k: torch.zeros_like(p) for k, p in masters.items()}

        def spans(runs):
            return [names for _, _, names in runs]

        monkeypatch.setattr(DeviceGradPath, "PIECE", 10**9)
        path._run_cache.clear()
        assert spans(path._runs(1, grads)) == [list(masters)]  # the whole block in one run, in layout order
        start, end, _ = path._runs(1, grads)[0]
        assert end - start == sum(p.numel() for p in masters.values()) + sum(
            -p.numel() % 16 for p in list(masters.values())[:-1])  # only alignment padding between them
        # one tensor without a gradient: the run breaks around it
        names = list(masters)
        gap = names[len(names) // 2]
        parts = spans(path._runs(1, {k: g for k, g in grads.items() if k != gap}))
        assert parts == [names[: names.index(gap)], names[names.index(gap) + 1 :]]
        # pieces of 2,000 elements: the 32x128 weights (4,096) go alone, the rest in runs <= 2,000
        monkeypatch.setattr(DeviceGradPath, "PIECE", 2000)
        path._run_cache.clear()
        runs = path._runs(1, grads)
        in_runs = [k for r in spans(runs) for k in r]
        big = [k for k, p in masters.items() if p.numel() > 2000]
        assert big and not set(big) & set(in_runs)
        assert sorted(in_runs + big) == sorted(names)
        assert all(end - start <= 2000 for start, end, _ in runs)
    finally:
        stm.close()


@pytest.mark.parametrize("device", ["cpu", CUDA])
def test_chunk_loads_reuse_window_slots(device: str) -> None:
    """Every chunk load lands in one of ``window`` buffers allocated once (the largest chunk's
    size), so the window's memory is fixed; the losses stay those of the resident model."""
    cfg = ModelConfig(n_layer=3, n_head=2, n_embd=32, block_size=16, vocab_size=64)
    base = GPT(cfg)
    stm = StreamedEngine(copy.deepcopy(base), device=device, precision="fp32", optim_cfg=OptimConfig(lr=1e-3),
                         seqs_per_pass=2, window=2)
    res = ResidentEngine(base, device=device, precision="fp32", optim_cfg=OptimConfig(lr=1e-3), micro_batch_size=2,
                         gradient_checkpointing=False)
    try:
        om = stm.om
        for _ in range(2):
            x = torch.randint(0, cfg.vocab_size, (4, 16))
            a, b = stm.train_step(x, x, 1e-3), res.train_step(x, x, 1e-3)
            assert a.loss_sum == pytest.approx(b.loss_sum, rel=1e-4)
            assert len(om._slots) == 2
            spans = [(t.data_ptr(), t.data_ptr() + t.numel() * t.element_size()) for t in om._slots]
            for r in om._resident.values():
                for t in r.tensors.values():
                    assert any(lo <= t.data_ptr() < hi for lo, hi in spans)
            assert max(t.numel() for t in om._slots) >= max(sum(p.numel() for p in c.parameters())
                                                            for c in stm.masters)
    finally:
        stm.close()


def _compile_backend(device: str):
    """The backend the compiled-block tests count compilations with: inductor on a GPU; on the CPU
    aot_eager (the same tracing and autograd split, no C++ build in CI)."""
    torch._dynamo.reset()
    return torch._dynamo.testing.CompileCounterWithBackend("inductor" if device == "cuda" else "aot_eager")


def test_inductor_compiles_the_blocks_without_pointwise_autotuning(monkeypatch: pytest.MonkeyPatch) -> None:
    """The blocks' inductor compile turns pointwise autotuning off (a cold compile's autotuning kept
    0.37 GiB of RSS for the whole first run, round 11); this torch accepts the option (it rejects
    unknown ones at torch.compile), and one that rejects it still gets a compiled function."""
    from ramgpt.engine import compiled

    torch.compile(lambda x: x + 1, backend="inductor", options=compiled.INDUCTOR_OPTIONS)  # raises if unknown
    seen: list[dict] = []
    real = torch.compile

    def recording(fn, **kw):
        seen.append(kw)
        return real(fn, **kw)

    monkeypatch.setattr(torch, "compile", recording)
    compiled._compiled.cache_clear()
    try:
        assert callable(compiled._compiled("inductor"))
        assert seen[-1]["options"] == {"triton.autotune_pointwise": False} and seen[-1]["backend"] == "inductor"
        compiled._compiled("aot_eager")
        assert "options" not in seen[-1]

        def renamed(fn, **kw):  # a torch without the option
            if "options" in kw:
                raise RuntimeError("Unexpected optimization option triton.autotune_pointwise")
            return real(fn, **kw)

        monkeypatch.setattr(torch, "compile", renamed)
        compiled._compiled.cache_clear()
        assert callable(compiled._compiled("inductor"))
    finally:
        compiled._compiled.cache_clear()


@pytest.mark.parametrize("device", ["cpu", CUDA])
def test_compiled_blocks_match_eager_and_compile_only_before_training(device: str,
                                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    """``compile_blocks``: the warm-up compiles the two graphs a pass uses (no-grad forward,
    recompute with backward), training then compiles nothing more, and its losses and gradients are
    those of the same engine with eager blocks."""
    from ramgpt.engine import compiled

    counter = _compile_backend(device)
    monkeypatch.setattr(compiled, "BACKEND", counter)
    cfg = ModelConfig(n_layer=3, n_head=2, n_embd=32, block_size=16, vocab_size=64)
    precision = "bf16" if device == "cuda" else "fp32"
    torch.manual_seed(int(torch.randint(0, 10_000, ()).item()))
    base = GPT(cfg)
    optim = OptimConfig(lr=1e-2, grad_clip=1.0, micro_batch_size=2, grad_accum_steps=2)
    eager = StreamedEngine(copy.deepcopy(base), device=device, precision=precision, optim_cfg=optim, seqs_per_pass=2,
                           window=2)
    comp = StreamedEngine(base, device=device, precision=precision, optim_cfg=optim, seqs_per_pass=2, window=2,
                          compile_blocks=True)
    try:
        assert eager.warm_up(16) is None and comp.warm_up(16) is None
        assert counter.frame_count == 2
        exact = precision == "fp32"  # aot_eager runs the same kernels; inductor's fused bf16 ones round otherwise
        for step in range(3):
            x = torch.randint(0, cfg.vocab_size, (4, 16))
            y = torch.randint(0, cfg.vocab_size, (4, 16))
            losses = [sum(float(e.forward_backward(x[i : i + 2], y[i : i + 2], last_pass=i == 2)) for i in (0, 2))
                      for e in (eager, comp)]
            assert losses[1] == pytest.approx(losses[0], rel=1e-5 if exact else 2e-2), f"step {step} loss"
            eager._before_optimizer()
            comp._before_optimizer()
            if step == 0 or exact:  # bf16: Adam's sign-like first steps make the weights part after one update
                g_eager, g_comp = _grads(eager), _grads(comp)
                for n in g_eager:
                    scale = float(g_eager[n].abs().max()) + 1e-3
                    rtol, atol = (1e-4, 1e-6 * scale) if exact else (3e-2, 3e-2 * scale)
                    torch.testing.assert_close(g_comp[n], g_eager[n], rtol=rtol, atol=atol, msg=n)
            eager.optimizer_step(1e-2, n_tokens=4 * 16)
            comp.optimizer_step(1e-2, n_tokens=4 * 16)
        assert counter.frame_count == 2  # nothing compiled mid-training
    finally:
        eager.close()
        comp.close()
        torch._dynamo.reset()


def test_blocks_run_eager_when_compiling_fails(monkeypatch: pytest.MonkeyPatch) -> None:
    """A backend that cannot compile (no compiler, an unsupported platform): the warm-up returns a
    one-line warning naming the way out, and training goes on with eager blocks."""
    from ramgpt.engine import compiled

    def broken(gm, inputs):
        raise RuntimeError("no C compiler found\nsecond line")

    torch._dynamo.reset()
    monkeypatch.setattr(compiled, "BACKEND", broken)
    cfg = ModelConfig(n_layer=2, n_head=2, n_embd=32, block_size=16, vocab_size=64)
    torch.manual_seed(int(torch.randint(0, 10_000, ()).item()))
    base = GPT(cfg)
    res = ResidentEngine(copy.deepcopy(base), device="cpu", precision="fp32", optim_cfg=OptimConfig(lr=1e-3),
                         micro_batch_size=2, gradient_checkpointing=False)
    stm = StreamedEngine(base, device="cpu", precision="fp32", optim_cfg=OptimConfig(lr=1e-3), seqs_per_pass=2,
                         window=2, compile_blocks=True)
    try:
        warning = stm.warm_up(16)
        assert warning is not None and "no C compiler found" in warning and "second line" not in warning
        assert "runtime.compile_blocks: false" in warning
        assert not stm.compile_blocks
        x = torch.randint(0, cfg.vocab_size, (4, 16))
        assert stm.train_step(x, x, 1e-3).loss_sum == pytest.approx(res.train_step(x, x, 1e-3).loss_sum, rel=1e-5)
    finally:
        stm.close()
        torch._dynamo.reset()


@pytest.mark.parametrize("device", ["cpu", CUDA])
def test_chunks_kept_on_the_device_compute_with_each_steps_updated_weights(device: str) -> None:
    """``runtime.stream_pin``: a kept chunk is never loaded, so the loader's wait for its update
    does not apply; the compute thread must wait itself, or the next step's forward runs on the old
    (or half-refreshed) weights. Every step's loss must be the resident model's. (A vocabulary
    large enough that updating the embedding takes longer than starting the next forward.)"""
    cfg = ModelConfig(n_layer=3, n_head=2, n_embd=64, block_size=16, vocab_size=8192)
    optim = OptimConfig(lr=1e-2, grad_clip=1.0, micro_batch_size=2, grad_accum_steps=3)
    torch.manual_seed(int(torch.randint(0, 10_000, ()).item()))
    base = GPT(cfg)
    res = ResidentEngine(copy.deepcopy(base), device=device, precision="fp32", optim_cfg=optim, micro_batch_size=2,
                         gradient_checkpointing=False)
    stm = StreamedEngine(base, device=device, precision="fp32", optim_cfg=optim, seqs_per_pass=2, window=2, pin=2)
    try:
        assert sum(st.gpu_pinned for st in stm.om._state) == 2
        gen = torch.Generator().manual_seed(int(torch.randint(0, 10_000, ()).item()))
        batches = [torch.randint(0, cfg.vocab_size, (2, 6, 16), generator=gen) for _ in range(4)]
        # the streamed steps back to back: each forward starts while the last update still runs
        streamed = [stm.train_step(x, y, 1e-2).loss_sum for x, y in batches]
        resident = [res.train_step(x, y, 1e-2).loss_sum for x, y in batches]
        assert streamed == pytest.approx(resident, rel=1e-5)
    finally:
        stm.close()


@pytest.mark.parametrize(("device", "which"), [("cpu", "all"), ("cpu", "all-torch"),
                                               pytest.param("cuda", "all", marks=CUDA.marks),
                                               pytest.param("cuda", "gpu", marks=CUDA.marks),
                                               pytest.param("cuda", "gpu-drained", marks=CUDA.marks),
                                               pytest.param("cuda", "gpu-ahead2", marks=CUDA.marks)])
def test_split_masters_update_the_same_fp32_weights(device: str, which: str, monkeypatch: pytest.MonkeyPatch,
                                                    tmp_path) -> None:
    """``split_masters`` keeps the fp32 masters as two 16-bit planes; AdamW joins them, updates and
    splits again. The same gradients must give bit-identical fp32 masters and moments to the
    engine that keeps whole fp32 masters, step after step (on a GPU, its share of the update too),
    and a checkpoint of it must hold those values (written piece by piece from the planes). The
    CPU's share goes through the C kernel where it builds here ("-torch": torch's pieces)."""
    from ramgpt.checkpoint import store
    from ramgpt.engine import native, planes

    monkeypatch.setattr(planes, "PIECE", 1000)
    monkeypatch.setattr(planes, "CONVERT_PIECE", 1500)
    monkeypatch.setattr(ChunkedAdamW, "PIECE", 1000)
    cfg = ModelConfig(n_layer=3, n_head=2, n_embd=32, block_size=16, vocab_size=64, tie_embeddings=True)
    optim = OptimConfig(lr=1e-2, grad_clip=0.5, micro_batch_size=2, grad_accum_steps=2)
    torch.manual_seed(int(torch.randint(0, 10_000, ()).item()))
    base = GPT(cfg)
    kw = dict(device=device, precision="bf16", optim_cfg=optim, seqs_per_pass=2, window=2, optimizer_gpu_share=0.5,
              grad_accum="device" if device == "cuda" else "host")
    # the GPU's chunks queued ahead of the one it waits for: "-drained" none, "-ahead2" two (whole: one)
    which, _, ahead = which.partition("-")
    whole = StreamedEngine(copy.deepcopy(base), **kw)
    split = StreamedEngine(copy.deepcopy(base), split_masters=which, **kw)
    assert whole.adamw.LOOKAHEAD == 1
    split.adamw.LOOKAHEAD = {"": 1, "drained": 0, "ahead2": 2, "torch": 1}[ahead]
    split.adamw.native = ahead != "torch"
    kernel = native.load()
    calls0 = kernel.calls if kernel is not None else 0
    gen = torch.Generator().manual_seed(int(torch.randint(0, 10_000, ()).item()))
    try:
        assert split.planes is not None and whole.planes is None
        assert _masters(split).keys() == _masters(whole).keys()
        for k, v in _masters(whole).items():
            assert torch.equal(_masters(split)[k].view(torch.int32), v.view(torch.int32)), k
        for _ in range(3):
            x = torch.randint(0, cfg.vocab_size, (4, 16), generator=gen)
            whole.forward_backward(x, x, last_pass=True)
            whole._before_optimizer()
            for p, q in zip(whole.params, split.params):  # the same gradients in both
                q.grad = p.grad.detach().clone() if q.grad is None else q.grad.copy_(p.grad)
            split.grads.touched = set(map(id, split.params))
            whole._norm_from_path = split._norm_from_path = False  # both take the norm of these gradients
            r1 = whole.optimizer_step(3e-3, n_tokens=64)
            r2 = split.optimizer_step(3e-3, n_tokens=64)
            assert r1.grad_norm == r2.grad_norm
            whole.wait_optimizer()
            split.wait_optimizer()
            a, b = _masters(whole), _masters(split)
            for k in a:
                assert torch.equal(a[k].view(torch.int32), b[k].view(torch.int32)), k
            for p, q in zip(whole.params, split.params):
                for k in ("exp_avg", "exp_avg_sq"):
                    assert torch.equal(whole.optimizer.state[p][k], split.optimizer.state[q][k]), k
        if kernel is not None and which == "all":  # the CPU's chunks went through the kernel, or did not
            assert (kernel.calls > calls0) == (ahead != "torch")
        path = store.save_checkpoint(tmp_path, 3, split.state_dict(), split.optimizer_state(), {})
        loaded = store.load_checkpoint(path)
        want = _masters(whole)
        assert set(loaded.model_state) == set(want)
        assert loaded.meta["tied"], "the tied embedding is written once"
        for k, v in loaded.model_state.items():
            assert torch.equal(v, want[k]), k
        # and back: a resume writes the values into the planes
        fresh = StreamedEngine(copy.deepcopy(base), split_masters=which, **kw)
        try:
            fresh.load_state(loaded.model_state, loaded.optimizer_state, None)
            for k, v in _masters(fresh).items():
                assert torch.equal(v, want[k]), k
        finally:
            fresh.close()
    finally:
        whole.close()
        split.close()


def test_planes_split_and_join_exactly() -> None:
    """Every fp32 value (zeros, subnormals, infinities, exact ties) comes back bit for bit (a NaN as
    a NaN), and the bf16 half is a round-to-nearest of it: the one tie rule that keeps the pair
    exact, away from zero."""
    from ramgpt.engine import planes

    gen = torch.Generator().manual_seed(int(torch.randint(0, 10_000, ()).item()))
    bits = torch.randint(-2**31, 2**31 - 1, (200_000,), generator=gen, dtype=torch.int64).to(torch.int32)
    x = bits.view(torch.float32)
    nan = x.isnan()
    ties = torch.tensor([1.00390625, 1.01171875, -1.00390625])  # exactly halfway between two bf16 values
    x = torch.cat([x, ties, torch.tensor([0.0, -0.0, float("inf"), -float("inf"), 1e-45, -1e-45])])
    n = x.numel()
    hi, lo = torch.empty(n, dtype=torch.int16), torch.empty(n, dtype=torch.int16)
    planes.split(x, hi, lo, torch.empty(n, dtype=torch.int32))
    back = torch.empty(n)
    planes.join(hi, lo, back)
    nan = torch.cat([nan, torch.zeros(n - nan.numel(), dtype=torch.bool)])
    assert nan.sum() > 100  # random bit patterns hold NaNs of every kind
    assert torch.equal(back.view(torch.int32)[~nan], x.view(torch.int32)[~nan])
    h = hi.view(torch.bfloat16).float()
    # a NaN stays a NaN in both halves (its rounding would otherwise carry into the sign or the
    # exponent: 0x7FFFFFFF, the GPU's NaN, read as -0.0), and the other values are as torch rounds
    assert h[nan].isnan().all() and back[nan].isnan().all()
    x, h, hi, back = x[~nan], h[~nan], hi[~nan], back[~nan]
    n = x.numel()
    rne = x.to(torch.bfloat16).float()
    finite = x.isfinite() & h.isfinite()
    assert torch.all((h - x).abs()[finite] <= (rne - x).abs()[finite])  # as near as torch's own rounding
    differ = h != rne
    assert int(differ.sum()) <= n * 2 / 65536 + 8  # only at ties
    assert torch.all(h[differ].abs() > rne[differ].abs())  # and there away from zero
    assert h[-9:-6].tolist() == [1.0078125, 1.015625, -1.0078125]
    assert planes.works("cpu")


@pytest.mark.parametrize("ahead", [0, 1, 2])
def test_gpu_update_marks_a_chunk_ready_only_once_its_copies_are_done(ahead: int,
                                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    """The GPU worker's order with ``LOOKAHEAD`` chunks queued ahead (the CUDA work replaced by
    events that complete when waited for, so this runs without a GPU): chunk i is queued, then at
    most ``ahead`` more, before its events are waited for; it is ready (and its ``after_chunk`` runs)
    only after they are done; the last ones are drained; a failure leaves no waiter hanging."""
    log: list[tuple[str, int]] = []

    class Event:
        def __init__(self, i: int):
            self.i, self.done = i, False

        def query(self) -> bool:
            return self.done

        def synchronize(self) -> None:
            if not self.done:
                log.append(("wait", self.i))
            self.done = True

    events: dict[int, list[Event]] = {}
    fail_at: list[int] = []

    def fake_step(i, lr, grad_scale):
        if i in fail_at:
            raise RuntimeError("the device failed")
        log.append(("queue", i))
        events[i] = [Event(i), Event(i)]
        return events[i]

    def after(i: int) -> None:
        if i in gpu:
            assert all(ev.done for ev in events[i]), f"chunk {i} finished before its copies"
            assert not opt.ready[i].is_set()
        log.append(("ready", i))

    params = [torch.nn.Parameter(torch.randn(3)) for _ in range(6)]
    opt = ChunkedAdamW(torch.optim.AdamW(params), [[p] for p in params], gpu_chunks=[0, 2, 3, 5], device="cpu")
    gpu = [0, 2, 3, 5]
    monkeypatch.setattr(torch.cuda, "set_device", lambda d: None)
    monkeypatch.setattr(opt, "step_chunk_gpu", fake_step)
    monkeypatch.setattr(opt, "step_chunk", lambda *a: None)  # the CPU's chunks: not what this test is about
    opt.LOOKAHEAD = ahead
    opt.start(1e-3, 1.0, after_chunk=after)
    opt.wait_all()
    mine = [e for e in log if e[1] in gpu]
    assert [i for k, i in mine if k == "queue"] == gpu and [i for k, i in mine if k == "ready"] == gpu
    for n, i in enumerate(gpu):
        queued_before = [j for k, j in mine[: mine.index(("ready", i))] if k == "queue"]
        # queued ahead: the chunks after i that were queued before i was ready
        assert len(queued_before) - (n + 1) == min(ahead, len(gpu) - n - 1), (i, mine)
    assert sorted(j for _, j, *_ in opt.timeline) == list(range(6))
    # a failure in the middle: every waiter is released and the error reaches the caller
    log.clear()
    fail_at.append(3)
    opt.start(1e-3, 1.0, after_chunk=after)
    for i in range(6):
        opt.ready[i].wait(timeout=10)
        assert opt.ready[i].is_set()
    with pytest.raises(RuntimeError, match="optimizer step failed"):
        opt.wait_all()

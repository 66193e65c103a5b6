"""ramgpt.model.GPT checked against transformers' GPT2LMHeadModel on the same weights: full logits,
the KV-cache path, the fused chunked loss and its gradients; plus tying, parameter counts,
gradient checkpointing and the AdamW parameter groups."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
import transformers  # noqa: E402 - a hard dependency

from ramgpt.config import ModelConfig
from ramgpt.hub import to_hf_state_dict
from ramgpt.model import GPT, IGNORE_INDEX, count_parameters_by_component

V, T = 96, 32


def small_cfg(**over) -> ModelConfig:
    fields = dict(n_layer=2, n_head=4, n_embd=64, block_size=T, vocab_size=V, dropout=0.0)
    fields.update(over)
    return ModelConfig(**fields)


def ramgpt_model(cfg: ModelConfig, seed: int = 0, loss_chunk_tokens: int = 2048) -> GPT:
    torch.manual_seed(seed)
    model = GPT(cfg, loss_chunk_tokens=loss_chunk_tokens).float()
    # GPT-2 init leaves biases and LayerNorms at 0/1; randomise them so a mapping that drops or
    # swaps them cannot pass
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 1:
                p.add_(torch.randn_like(p) * 0.1)
    return model.eval()


def hf_twin(model: GPT) -> torch.nn.Module:
    cfg = model.cfg
    hf_cfg = transformers.GPT2Config(
        vocab_size=cfg.vocab_size,
        n_positions=cfg.block_size,
        n_embd=cfg.n_embd,
        n_layer=cfg.n_layer,
        n_head=cfg.n_head,
        activation_function="gelu_new",
        layer_norm_epsilon=1e-5,
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
        tie_word_embeddings=cfg.tie_embeddings,
        bos_token_id=0,
        eos_token_id=0,
        attn_implementation="eager",  # HF's reference attention, not the same SDPA kernel as ours
    )
    hf = transformers.GPT2LMHeadModel(hf_cfg).float().eval()
    hf.load_state_dict(to_hf_state_dict(model.state_dict()), strict=True)  # every weight, by name
    if cfg.tie_embeddings:
        assert hf.lm_head.weight.data_ptr() == hf.transformer.wte.weight.data_ptr()
    return hf


def full_logits(model: GPT, idx: torch.Tensor) -> torch.Tensor:
    """embed -> blocks -> head.logits for every position: (B, T, V)."""
    x, _ = model.embed(idx)
    for block in model.h:
        x, _ = block(x)
    return model.head.logits(x)


def tokens(b: int, t: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, V, (b, t), generator=g)


@pytest.fixture(params=[True, False], ids=["tied", "untied"])
def pair(request):
    model = ramgpt_model(small_cfg(tie_embeddings=request.param))
    return model, hf_twin(model)


# ---------------------------------------------------------------------------------------------
# against transformers


def test_full_logits_match_hf(pair):
    model, hf = pair
    idx = tokens(3, T, seed=1)
    with torch.no_grad():
        ours = full_logits(model, idx)
        theirs = hf(idx).logits
    assert ours.shape == theirs.shape == (3, T, V)
    torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=1e-5)
    # a sanity check that the comparison can fail: another seed's model differs
    other = full_logits(ramgpt_model(model.cfg, seed=123), idx).detach()
    assert not torch.allclose(other, theirs, atol=1e-3)


def test_kv_cache_last_position_matches_hf(pair):
    model, hf = pair
    idx = tokens(2, 20, seed=2)
    with torch.no_grad():
        theirs = hf(idx).logits  # (B, T, V)
        last, caches = model.forward_logits(idx)
    assert last.shape == (2, V)
    torch.testing.assert_close(last, theirs[:, -1], atol=1e-5, rtol=1e-5)
    assert len(caches) == model.cfg.n_layer
    k, v = caches[0]
    assert k.shape == v.shape == (2, model.cfg.n_head, 20, model.cfg.head_dim)


def test_kv_cache_token_by_token_matches_hf(pair):
    model, hf = pair
    idx = tokens(2, 12, seed=3)
    with torch.no_grad():
        theirs = hf(idx).logits
        caches = None
        for t in range(idx.shape[1]):
            last, caches = model.forward_logits(idx[:, t : t + 1], caches, pos_offset=t)
            torch.testing.assert_close(last, theirs[:, t], atol=1e-5, rtol=1e-5)


def test_kv_cache_prompt_chunk_after_a_cache_matches_hf(pair):
    """A second multi-token chunk after a cache must see the whole past and be causal inside."""
    model, hf = pair
    idx = tokens(2, 16, seed=4)
    with torch.no_grad():
        theirs = hf(idx).logits
        _, caches = model.forward_logits(idx[:, :9])
        last, caches = model.forward_logits(idx[:, 9:], caches, pos_offset=9)
    torch.testing.assert_close(last, theirs[:, -1], atol=1e-5, rtol=1e-5)
    assert caches[-1][0].shape[2] == 16


@pytest.mark.parametrize("chunk", [2048, 16, 7], ids=["one-chunk", "chunks-of-16", "ragged-chunks"])
def test_fused_loss_is_the_sum_of_hf_cross_entropy(pair, chunk):
    model, hf = pair
    model.head.loss_chunk_tokens = chunk
    idx = tokens(2, 24, seed=5)
    targets = tokens(2, 24, seed=6)
    targets[0, :5] = IGNORE_INDEX  # e.g. padding: no loss, no gradient
    with torch.no_grad():
        loss = model(idx, targets)
        want = F.cross_entropy(hf(idx).logits.view(-1, V), targets.view(-1), reduction="sum")
    assert loss.dtype == torch.float32 and loss.dim() == 0
    assert loss.item() == pytest.approx(want.item(), rel=1e-5)
    # a sum, not a mean: far larger than one token's loss
    assert loss.item() > 10 * want.item() / (targets != IGNORE_INDEX).sum().item()


@pytest.mark.parametrize("tie", [True, False], ids=["tied", "untied"])
@pytest.mark.parametrize("chunk", [2048, 10])
def test_fused_loss_gradients_equal_plain_autograd(tie, chunk):
    fused = ramgpt_model(small_cfg(tie_embeddings=tie), seed=7, loss_chunk_tokens=chunk).train()
    plain = copy.deepcopy(fused)
    if tie:
        assert plain.head.lm_head.weight is plain.embed.wte.weight  # deepcopy keeps the tie
    idx = tokens(2, 24, seed=8)
    targets = tokens(2, 24, seed=9)
    targets[1, -3:] = IGNORE_INDEX

    loss_fused = fused(idx, targets)
    loss_fused.backward()
    loss_plain = F.cross_entropy(full_logits(plain, idx).view(-1, V), targets.view(-1), reduction="sum")
    loss_plain.backward()

    assert loss_fused.item() == pytest.approx(loss_plain.item(), rel=1e-5)
    plain_params = dict(plain.named_parameters())
    for name, p in fused.named_parameters():
        assert p.grad is not None, name
        torch.testing.assert_close(p.grad, plain_params[name].grad, atol=1e-5, rtol=1e-4, msg=name)
    assert fused.embed.wte.weight.grad.abs().sum() > 0


def test_fused_loss_backward_scales_with_the_incoming_gradient():
    model = ramgpt_model(small_cfg(), seed=10).train()
    twin = copy.deepcopy(model)
    idx, targets = tokens(2, 16, seed=11), tokens(2, 16, seed=12)
    (model(idx, targets) / 4).backward()  # e.g. gradient accumulation over 4 micro-batches
    twin(idx, targets).backward()
    for (name, p), q in zip(model.named_parameters(), twin.parameters()):
        torch.testing.assert_close(p.grad * 4, q.grad, atol=1e-6, rtol=1e-5, msg=name)


def test_no_grad_loss_keeps_no_graph():
    model = ramgpt_model(small_cfg(), seed=13)
    with torch.no_grad():
        loss = model(tokens(1, 8, 14), tokens(1, 8, 15))
    assert not loss.requires_grad


# ---------------------------------------------------------------------------------------------
# structure


def test_tied_embeddings_share_storage():
    model = GPT(small_cfg(tie_embeddings=True))
    assert model.head.lm_head.weight is model.embed.wte.weight
    assert model.head.lm_head.weight.data_ptr() == model.embed.wte.weight.data_ptr()
    with torch.no_grad():
        model.embed.wte.weight[3, 5] = 42.0
    assert model.head.lm_head.weight[3, 5].item() == 42.0


def test_untied_embeddings_do_not_share_storage():
    model = GPT(small_cfg(tie_embeddings=False))
    assert model.head.lm_head.weight is not model.embed.wte.weight
    assert model.head.lm_head.weight.data_ptr() != model.embed.wte.weight.data_ptr()
    with torch.no_grad():
        model.embed.wte.weight.zero_()
    assert model.head.lm_head.weight.abs().sum() > 0


@pytest.mark.parametrize("bias", [True, False], ids=["bias", "no-bias"])
@pytest.mark.parametrize("tie", [True, False], ids=["tied", "untied"])
def test_param_count_matches_the_arithmetic(bias, tie):
    cfg = small_cfg(bias=bias, tie_embeddings=tie)
    model = GPT(cfg)
    by_hand = count_parameters_by_component(cfg)
    distinct = {id(p): p.numel() for p in model.parameters()}
    assert model.num_params() == sum(distinct.values()) == by_hand["total"]
    assert by_hand["total"] == by_hand["embeddings"] + by_hand["blocks"] + by_hand["head"]
    assert model.num_params(exclude_positions=True) == by_hand["total"] - cfg.block_size * cfg.n_embd


def test_param_count_matches_hf():
    model = ramgpt_model(small_cfg())
    hf = hf_twin(model)
    assert model.num_params() == sum(p.numel() for p in hf.parameters())


def test_chunks_are_embed_blocks_head():
    model = GPT(small_cfg(n_layer=3))
    chunks = model.chunks()
    assert len(chunks) == 5
    assert chunks[0] is model.embed and chunks[-1] is model.head
    assert list(chunks[1:-1]) == list(model.h)


def test_gradient_checkpointing_gives_identical_loss_and_grads():
    off = ramgpt_model(small_cfg(), seed=16).train()
    on = copy.deepcopy(off)
    on.gradient_checkpointing = True
    idx, targets = tokens(2, 24, seed=17), tokens(2, 24, seed=18)
    loss_off = off(idx, targets)
    loss_on = on(idx, targets)
    loss_off.backward()
    loss_on.backward()
    assert torch.equal(loss_on, loss_off)
    for (name, p), q in zip(off.named_parameters(), on.parameters()):
        torch.testing.assert_close(q.grad, p.grad, atol=1e-7, rtol=1e-6, msg=name)


def test_param_groups_partition_the_parameters():
    for tie in (True, False):
        model = GPT(small_cfg(tie_embeddings=tie))
        groups = model.param_groups(weight_decay=0.1)
        ids = [id(p) for g in groups for p in g["params"]]
        assert len(ids) == len(set(ids)), "a parameter is in two groups (or twice in one)"
        assert set(ids) == {id(p) for p in model.parameters()}, "a parameter is in no group"
        # AdamW accepts the groups as they are
        torch.optim.AdamW(groups, lr=1e-3)


def test_param_groups_no_decay_for_biases_norms_and_positions():
    model = GPT(small_cfg(tie_embeddings=False))
    groups = model.param_groups(weight_decay=0.1)
    decay_of = {id(p): g["weight_decay"] for g in groups for p in g["params"]}
    for name, p in model.named_parameters():
        no_decay = name.endswith(".bias") or ".ln_" in name or "ln_f" in name or "wpe" in name
        want = 0.0 if no_decay else 0.1
        assert decay_of[id(p)] == want, name
    # the matrices that should decay do
    assert decay_of[id(model.embed.wte.weight)] == 0.1
    assert decay_of[id(model.head.lm_head.weight)] == 0.1
    assert decay_of[id(model.h[0].attn.c_attn.weight)] == 0.1
    assert decay_of[id(model.embed.wpe.weight)] == 0.0
    assert decay_of[id(model.h[0].ln_1.weight)] == 0.0


def test_init_scales_residual_projections():
    torch.manual_seed(0)
    cfg = small_cfg(n_layer=8, n_embd=256, n_head=4)
    model = GPT(cfg)
    std_proj = model.h[0].attn.c_proj.weight.std().item()
    std_fc = model.h[0].mlp.c_fc.weight.std().item()
    assert std_fc == pytest.approx(0.02, rel=0.05)
    assert std_proj == pytest.approx(0.02 / (2 * cfg.n_layer) ** 0.5, rel=0.05)


def test_building_on_the_meta_device_leaves_the_layers_default_init_in_place(monkeypatch) -> None:
    """build_gpt skips nn's default init while it builds on the meta device (init_weights sets every
    tensor), in its own thread only: a layer another thread builds meanwhile is initialised, and the
    layers have their own reset_parameters back afterwards, also after an error."""
    import threading

    import torch.nn as nn

    from ramgpt import model

    calls = []
    real = nn.Linear.reset_parameters

    def counted(self):
        calls.append(threading.current_thread().name)
        real(self)

    monkeypatch.setattr(nn.Linear, "reset_parameters", counted)
    before = {cls: cls.__dict__["reset_parameters"] for cls in (nn.Linear, nn.Embedding, nn.LayerNorm)}
    cfg = ModelConfig(n_layer=1, n_head=2, n_embd=16, block_size=8, vocab_size=32)
    other: list[nn.Linear] = []
    with model._without_default_init():
        model.GPT(cfg)  # on the CPU here: the skip is per thread, not per device
        assert calls == []
        t = threading.Thread(target=lambda: other.append(nn.Linear(4, 4)), name="other")
        t.start()
        t.join()
    assert calls == ["other"] and other[0].weight.abs().sum() > 0
    model.build_gpt(cfg, materialize=False)
    assert calls == ["other"]  # skipped again

    def broken(self, *a, **k):
        raise RuntimeError("broken head")

    monkeypatch.setattr(model.Head, "__init__", broken)
    with pytest.raises(RuntimeError, match="broken head"):
        model.build_gpt(cfg, materialize=False)
    assert {cls: cls.__dict__["reset_parameters"] for cls in before} == before
    nn.Linear(4, 4)
    assert calls == ["other", "MainThread"]  # torch's own init, once the build is over

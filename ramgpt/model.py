"""GPT-2, written to be read top to bottom: LayerNorm -> CausalSelfAttention -> MLP -> Block ->
GPT. Names follow GPT-2 (wte, wpe, h, ln_1, attn.c_attn, attn.c_proj, ln_2, mlp.c_fc,
mlp.c_proj, ln_f, lm_head) so Hugging Face weights map name for name (``ramgpt.hub``); the only
HF quirk is that its Conv1D stores Linear weights transposed.

The model is also an ordered list of chunks -- ``[embed, h[0], ..., h[n-1], head]`` -- each of
which takes ``(x, targets)`` and returns ``(x, targets)`` (the head returns the loss), so the
streaming engine can run it one block at a time. No I/O, no printing, no ramtorch here.
"""

from __future__ import annotations

import math
import os
import threading
from contextlib import contextmanager

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from ramgpt.config import ModelConfig
from ramgpt.loss import IGNORE_INDEX, fused_linear_cross_entropy

# GPT-2 ties the output layer to the token embedding: the alias -> the name it is stored under.
# The one home of this fact (the engines, checkpoint loading and the HF export read it here).
TIED_WEIGHTS = {"head.lm_head.weight": "embed.wte.weight"}


def tied_aliases(cfg: ModelConfig) -> dict[str, str]:
    """``TIED_WEIGHTS`` when the model ties its embeddings, else nothing."""
    return dict(TIED_WEIGHTS) if cfg.tie_embeddings else {}


class CausalSelfAttention(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.n_head = cfg.n_head
        self.n_embd = cfg.n_embd
        self.dropout = cfg.dropout
        self.c_attn = nn.Linear(cfg.n_embd, 3 * cfg.n_embd, bias=cfg.bias)
        self.c_proj = nn.Linear(cfg.n_embd, cfg.n_embd, bias=cfg.bias)
        self.resid_drop = nn.Dropout(cfg.dropout)

    def forward(
        self, x: torch.Tensor, kv_cache: tuple[torch.Tensor, torch.Tensor] | None = None
    ) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor]]:
        B, T, C = x.shape
        q, k, v = self.c_attn(x).split(self.n_embd, dim=2)
        hs = C // self.n_head
        q = q.view(B, T, self.n_head, hs).transpose(1, 2)  # (B, nh, T, hs)
        k = k.view(B, T, self.n_head, hs).transpose(1, 2)  # (B, nh, T, hs)
        v = v.view(B, T, self.n_head, hs).transpose(1, 2)  # (B, nh, T, hs)
        if kv_cache is not None:
            pk, pv = kv_cache
            k = torch.cat([pk, k], dim=2)  # (B, nh, T_past + T, hs)
            v = torch.cat([pv, v], dim=2)
        drop = self.dropout if self.training else 0.0
        if kv_cache is None or T > 1:
            if kv_cache is not None and kv_cache[0].shape[2] > 0:
                # prompt chunk after a cache: queries see all past keys and their own causal prefix
                t_past = kv_cache[0].shape[2]
                mask = torch.ones(T, t_past + T, dtype=torch.bool, device=x.device).tril(diagonal=t_past)
                y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=drop)
            else:
                y = F.scaled_dot_product_attention(q, k, v, is_causal=True, dropout_p=drop)
        else:
            y = F.scaled_dot_product_attention(q, k, v, dropout_p=drop)  # one new token sees everything
        y = y.transpose(1, 2).contiguous().view(B, T, C)  # (B, T, C)
        return self.resid_drop(self.c_proj(y)), (k, v)


class MLP(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.c_fc = nn.Linear(cfg.n_embd, 4 * cfg.n_embd, bias=cfg.bias)
        self.c_proj = nn.Linear(4 * cfg.n_embd, cfg.n_embd, bias=cfg.bias)
        self.drop = nn.Dropout(cfg.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.drop(self.c_proj(F.gelu(self.c_fc(x), approximate="tanh")))  # GPT-2's gelu_new


def block_body(block: Block, x: torch.Tensor) -> torch.Tensor:
    """A block's training forward, as a function of the block (what ``torch.compile`` compiles:
    one graph serves every block of a model, their weights being its inputs)."""
    a, _ = block.attn(block.ln_1(x))
    x = x + a
    return x + block.mlp(block.ln_2(x))


class Block(nn.Module):
    """Pre-LN transformer block: x + attn(ln_1(x)), then x + mlp(ln_2(x))."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.ln_1 = nn.LayerNorm(cfg.n_embd, eps=1e-5, bias=cfg.bias)
        self.attn = CausalSelfAttention(cfg)
        self.ln_2 = nn.LayerNorm(cfg.n_embd, eps=1e-5, bias=cfg.bias)
        self.mlp = MLP(cfg)
        # a compiled block_body (ramgpt.engine.compiled), set by the engine that runs this block
        self.compiled = None

    def forward(self, x: torch.Tensor, targets: torch.Tensor | None = None):
        return (self.compiled or block_body)(self, x), targets

    def forward_cached(self, x: torch.Tensor, kv_cache):
        a, new_cache = self.attn(self.ln_1(x), kv_cache)
        x = x + a
        x = x + self.mlp(self.ln_2(x))
        return x, new_cache


class Embed(nn.Module):
    """Chunk 0: token + learned position embeddings."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.wte = nn.Embedding(cfg.vocab_size, cfg.n_embd)
        self.wpe = nn.Embedding(cfg.block_size, cfg.n_embd)
        self.drop = nn.Dropout(cfg.dropout)

    def forward(self, idx: torch.Tensor, targets: torch.Tensor | None = None, pos_offset: int = 0):
        T = idx.shape[1]
        pos = torch.arange(pos_offset, pos_offset + T, device=idx.device)
        return self.drop(self.wte(idx) + self.wpe(pos)), targets  # (B, T, C)


class Head(nn.Module):
    """Last chunk: final LayerNorm, then the (tied) output layer fused with the loss."""

    def __init__(self, cfg: ModelConfig, loss_chunk_tokens: int = 2048):
        super().__init__()
        self.ln_f = nn.LayerNorm(cfg.n_embd, eps=1e-5, bias=cfg.bias)
        self.lm_head = nn.Linear(cfg.n_embd, cfg.vocab_size, bias=False)
        self.loss_chunk_tokens = loss_chunk_tokens
        # Set by the streamed engine for a training pass: its forward runs without grad and the
        # backward recomputes this chunk with grad, so the loss of the first run is never used.
        self.defer_loss = False

    def forward(self, x: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """Sum of token losses (float32 scalar)."""
        if self.defer_loss and not torch.is_grad_enabled():
            return torch.zeros((), dtype=torch.float32, device=x.device)
        return fused_linear_cross_entropy(self.ln_f(x), self.lm_head.weight, targets, self.loss_chunk_tokens)

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        return self.lm_head(self.ln_f(x))


class GPT(nn.Module):
    def __init__(self, cfg: ModelConfig, loss_chunk_tokens: int = 2048):
        super().__init__()
        self._init_seed = int(torch.randint(0, 2**62, (), device="cpu"))  # see init_weights
        self.cfg = cfg
        self.embed = Embed(cfg)
        self.h = nn.ModuleList([Block(cfg) for _ in range(cfg.n_layer)])
        self.head = Head(cfg, loss_chunk_tokens)
        self.tie_weights()
        self.gradient_checkpointing = False
        if not self.embed.wte.weight.is_meta:  # built on the meta device: build_gpt initialises later
            self.init_weights()

    @torch.no_grad()
    def init_weights(self, workers: int | None = None) -> None:
        """GPT-2's init: N(0, 0.02) for Linear and Embedding weights, the residual projections
        (``c_proj``) scaled by 1/sqrt(2 * n_layer), zero biases, LayerNorms at (1, 0).

        Each tensor draws from its own generator, seeded from one draw of torch's global RNG and the
        tensor's index (the draw is made first thing in ``__init__``, so ``GPT(cfg)`` and
        :func:`build_gpt` agree), so tensors fill in parallel threads (torch releases the GIL) and the result
        does not depend on the thread count: 1.1 B parameters took 17.7 s one after another on the
        H200 machine's CPU."""
        from concurrent.futures import ThreadPoolExecutor

        base = self._init_seed
        jobs = []
        seen: set[int] = set()
        for i, (name, mod) in enumerate(self.named_modules()):
            for pname, p in mod.named_parameters(recurse=False):
                if id(p) in seen:
                    continue
                seen.add(id(p))
                std = 0.02 / math.sqrt(2 * self.cfg.n_layer) if name.endswith("c_proj") else 0.02
                if isinstance(mod, nn.LayerNorm):
                    jobs.append((p, "one" if pname == "weight" else "zero", 0.0, 0))
                elif pname == "bias":
                    jobs.append((p, "zero", 0.0, 0))
                else:
                    jobs.append((p, "normal", std, (base * 1_000_003 + i * 31 + len(jobs)) % 2**63))

        @torch.no_grad()  # grad mode is per thread: the decorator above does not reach the workers
        def fill(job: tuple[nn.Parameter, str, float, int]) -> None:
            p, kind, std, seed = job
            if kind == "normal":
                p.normal_(0.0, std, generator=torch.Generator(device=p.device).manual_seed(seed))
            else:
                p.fill_(1.0 if kind == "one" else 0.0)

        big_first = sorted(jobs, key=lambda j: -j[0].numel())
        with ThreadPoolExecutor(max_workers=workers or min(16, os.cpu_count() or 1)) as pool:
            list(pool.map(fill, big_first))

    # -- structure ---------------------------------------------------------------------------
    def tie_weights(self) -> None:
        """Make the output layer the token embedding's Parameter (GPT-2), e.g. again after a
        ``load_state_dict(assign=True)`` replaced them separately."""
        if self.cfg.tie_embeddings:
            self.head.lm_head.weight = self.embed.wte.weight

    def chunks(self) -> list[nn.Module]:
        """Ordered chunks for block-by-block execution: [embed, h[0..n-1], head]."""
        return [self.embed, *self.h, self.head]

    def num_params(self, exclude_positions: bool = False) -> int:
        n = sum(p.numel() for p in self.parameters())  # tied weights counted once
        if exclude_positions:
            n -= self.embed.wpe.weight.numel()
        return n

    def param_groups(self, weight_decay: float) -> list[dict]:
        """AdamW groups: matrices decay; biases, LayerNorms and embeddings' positions don't."""
        decay, no_decay = [], []
        seen: set[int] = set()
        for name, p in self.named_parameters():
            if id(p) in seen:
                continue
            seen.add(id(p))
            (decay if p.dim() >= 2 and "wpe" not in name else no_decay).append(p)
        return [
            {"params": decay, "weight_decay": weight_decay},
            {"params": no_decay, "weight_decay": 0.0},
        ]

    # -- training forward --------------------------------------------------------------------
    def forward(self, idx: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """Sum of token losses for (B, T) inputs and targets."""
        x, _ = self.embed(idx)
        for block in self.h:
            if self.gradient_checkpointing and torch.is_grad_enabled():
                x, _ = checkpoint(block, x, use_reentrant=False)
            else:
                x, _ = block(x)
        return self.head(x, targets)

    # -- inference ---------------------------------------------------------------------------
    @torch.no_grad()
    def forward_logits(self, idx: torch.Tensor, kv_caches: list | None = None, pos_offset: int = 0):
        """Logits of the last position and updated per-block KV caches (for generation)."""
        x, _ = self.embed(idx, pos_offset=pos_offset)
        new_caches = []
        for i, block in enumerate(self.h):
            x, c = block.forward_cached(x, None if kv_caches is None else kv_caches[i])
            new_caches.append(c)
        return self.head.logits(x[:, -1:, :])[:, -1, :], new_caches


@contextmanager
def _without_default_init():
    """The layers' own ``reset_parameters``, skipped in this thread while a model is built on the
    meta device: :meth:`GPT.init_weights` sets every tensor anyway, and on the meta device the
    default init's ``normal_`` goes through torch._refs, whose first call imports torch._dynamo
    (1.5 s of start-up, for nothing where no block is compiled). The classes get a wrapper for the
    duration that skips only in the threads inside this context; other threads initialise as torch
    does (nested and concurrent uses share one wrapper, removed when the last one leaves)."""
    global _skip_depth
    with _skip_lock:
        if _skip_depth == 0:
            for cls in (nn.Linear, nn.Embedding, nn.LayerNorm):
                _skip_saved[cls] = cls.__dict__["reset_parameters"]
                cls.reset_parameters = _skipping(_skip_saved[cls])
        _skip_depth += 1
    before = getattr(_skip_here, "on", False)
    _skip_here.on = True
    try:
        yield
    finally:
        _skip_here.on = before
        with _skip_lock:
            _skip_depth -= 1
            if _skip_depth == 0:
                for cls, fn in _skip_saved.items():
                    cls.reset_parameters = fn
                _skip_saved.clear()


_skip_lock = threading.Lock()
_skip_here = threading.local()
_skip_saved: dict[type, object] = {}
_skip_depth = 0


def _skipping(original):
    def reset_parameters(self) -> None:
        if not getattr(_skip_here, "on", False):
            original(self)

    return reset_parameters


def build_gpt(cfg: ModelConfig, loss_chunk_tokens: int = 2048, device: str | torch.device = "cpu",
              workers: int | None = None, materialize: bool = True) -> GPT:
    """``GPT(cfg)`` without the wasted default init of every Linear (built on the meta device, then
    allocated and initialised once, in parallel). Same weights as ``GPT(cfg)`` for the same seed.
    ``materialize=False``: left on the meta device for an engine that allocates the weights where
    they will live and then calls :meth:`GPT.init_weights` (the streamed engine's page-locked arena)."""
    with torch.device("meta"), _without_default_init():
        model = GPT(cfg, loss_chunk_tokens)
    if not materialize:
        return model
    model.to_empty(device=device)
    model.tie_weights()
    model.init_weights(workers)
    return model


def count_parameters_by_component(cfg: ModelConfig) -> dict[str, int]:
    """Pure arithmetic, no tensors: parameters of embeddings, blocks and head."""
    C, V, P, L = cfg.n_embd, cfg.vocab_size, cfg.block_size, cfg.n_layer
    b = 1 if cfg.bias else 0
    ln = C * (1 + b)
    block = ln * 2 + (C * 3 * C + b * 3 * C) + (C * C + b * C) + (C * 4 * C + b * 4 * C) + (4 * C * C + b * C)
    head = ln + (0 if cfg.tie_embeddings else V * C)
    return {"embeddings": V * C + P * C, "blocks": L * block, "head": head, "total": V * C + P * C + L * block + head}


__all__ = ["GPT", "Block", "build_gpt", "Embed", "Head", "IGNORE_INDEX", "TIED_WEIGHTS", "count_parameters_by_component", "tied_aliases"]

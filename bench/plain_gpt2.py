"""A plain GPT-2, independent of ramgpt's model code: the ceiling harness of bench/perf.py.

Written the obvious way (Linear, LayerNorm, SDPA, tanh GELU, full-logit cross-entropy, tied
embeddings, per-block activation checkpointing), so that ``bench/perf.py ceiling`` measures what
the card does on this shape with nothing ramgpt-specific in the way.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint


class PlainBlock(nn.Module):
    def __init__(self, C: int, nh: int):
        super().__init__()
        self.nh = nh
        self.ln_1 = nn.LayerNorm(C)
        self.c_attn = nn.Linear(C, 3 * C)
        self.c_proj = nn.Linear(C, C)
        self.ln_2 = nn.LayerNorm(C)
        self.c_fc = nn.Linear(C, 4 * C)
        self.mlp_proj = nn.Linear(4 * C, C)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, T, C = x.shape
        q, k, v = self.c_attn(self.ln_1(x)).split(C, dim=2)
        q, k, v = (t.view(B, T, self.nh, C // self.nh).transpose(1, 2) for t in (q, k, v))  # (B, nh, T, hs)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True).transpose(1, 2).reshape(B, T, C)
        x = x + self.c_proj(y)
        return x + self.mlp_proj(F.gelu(self.c_fc(self.ln_2(x)), approximate="tanh"))


class PlainGPT2(nn.Module):
    def __init__(self, L: int, nh: int, C: int, V: int, T: int, ckpt: bool = True):
        super().__init__()
        self.wte = nn.Embedding(V, C)
        self.wpe = nn.Embedding(T, C)
        self.h = nn.ModuleList(PlainBlock(C, nh) for _ in range(L))
        self.ln_f = nn.LayerNorm(C)
        self.ckpt = ckpt

    def forward(self, idx: torch.Tensor, tgt: torch.Tensor) -> torch.Tensor:
        x = self.wte(idx) + self.wpe(torch.arange(idx.shape[1], device=idx.device))
        for b in self.h:
            x = checkpoint(b, x, use_reentrant=False) if self.ckpt else b(x)
        logits = F.linear(self.ln_f(x), self.wte.weight)  # (B, T, V), tied head
        return F.cross_entropy(logits.flatten(0, 1).float(), tgt.flatten(), reduction="sum")

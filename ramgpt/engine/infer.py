"""Streamed inference: generate with weights that do not fit the VRAM budget."""

from __future__ import annotations

import copy

import torch
import torch.nn as nn

from ramgpt.engine.base import release_freed_heap
from ramgpt.engine.offload import offload_model
from ramgpt.model import GPT


class _InferEmbed(nn.Module):
    def __init__(self, embed: nn.Module):
        super().__init__()
        self.embed = embed
        self.pos_offset = 0

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        x, _ = self.embed(idx, None, pos_offset=self.pos_offset)
        return x


class _InferBlock(nn.Module):
    """A block that keeps its KV cache as plain state: ramtorch swaps the streamed weights in with
    functional_call, and the cache (activations, not weights) stays on the GPU between calls."""

    def __init__(self, block: nn.Module):
        super().__init__()
        self.block = block
        self.cache: tuple[torch.Tensor, torch.Tensor] | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x, self.cache = self.block.forward_cached(x, self.cache)
        return x


class _InferHead(nn.Module):
    def __init__(self, head: nn.Module):
        super().__init__()
        self.head = head

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head.logits(x[:, -1:, :])[:, -1, :].float()  # (B, V) logits of the last position


class StreamedInferenceModel:
    """``GPT.forward_logits`` with the weights streamed from pinned CPU RAM through a GPU window
    (ramtorch ``OffloadModel.forward``), for checkpoints that do not fit the VRAM budget. Same
    interface as ``GPT`` for ``ramgpt.generate``: ``.cfg`` and
    ``forward_logits(idx, kv_caches, pos_offset) -> (logits, caches)``."""

    def __init__(self, model: GPT, *, device: str, dtype: torch.dtype, window: int = 3):
        self.cfg = model.cfg
        self.device = device
        self._embed = _InferEmbed(copy.deepcopy(model.embed).to(dtype))
        self._blocks = [_InferBlock(copy.deepcopy(b).to(dtype)) for b in model.h]
        self._head = _InferHead(copy.deepcopy(model.head).to(dtype))
        self.om = offload_model([self._embed, *self._blocks, self._head], device=device, window=window)
        release_freed_heap()

    def eval(self) -> StreamedInferenceModel:
        self.om.eval()
        return self

    @torch.no_grad()
    def forward_logits(self, idx: torch.Tensor, kv_caches: list | None = None, pos_offset: int = 0):
        for i, blk in enumerate(self._blocks):
            blk.cache = None if kv_caches is None else kv_caches[i]
        self._embed.pos_offset = pos_offset
        logits = self.om(idx)
        return logits, [blk.cache for blk in self._blocks]

    def close(self) -> None:
        self.om.close()



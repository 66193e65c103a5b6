"""Output layer + cross-entropy, fused and chunked, so full logits never exist at once.

For a 1,024-token sequence with the GPT-2 vocabulary, full fp32 logits are 206 MB per sequence;
a 16-sequence pass would need 3.3 GB for them alone. Here the logits of ``chunk`` tokens at a
time are formed, reduced to the loss, and turned into the gradients of the hidden states and the
output weight right away (the loss is the last op of the graph, so its gradients can be computed
in the forward). Backward then only scales the stored gradients by the incoming grad.
"""

from __future__ import annotations

import torch

IGNORE_INDEX = -100


def _compute_dtype(t: torch.Tensor) -> torch.dtype:
    dev = t.device.type
    if torch.is_autocast_enabled(dev):
        return torch.get_autocast_dtype(dev)
    return t.dtype


class _FusedLinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, h, weight, targets, chunk: int, with_grad: bool):  # type: ignore[override]
        # h: (N, C) hidden states; weight: (V, C); targets: (N,) int64
        cdt = _compute_dtype(h)
        with torch.autocast(h.device.type, enabled=False):
            hc_all = h.to(cdt)
            w = weight.to(cdt)
            n = h.shape[0]
            loss = torch.zeros((), dtype=torch.float32, device=h.device)
            gh = torch.empty_like(hc_all) if with_grad else None
            gw = torch.zeros(weight.shape, dtype=torch.float32, device=h.device) if with_grad else None
            for s in range(0, n, chunk):
                hc = hc_all[s : s + chunk]
                tc = targets[s : s + chunk]
                logits = (hc @ w.t()).float()  # (n_c, V) fp32
                lse = torch.logsumexp(logits, dim=-1)  # (n_c,)
                valid = tc != IGNORE_INDEX
                safe_t = torch.where(valid, tc, torch.zeros_like(tc))
                tgt = logits.gather(1, safe_t[:, None]).squeeze(1)
                loss += ((lse - tgt) * valid).sum()
                if with_grad:
                    # d loss / d logits = softmax - onehot, for valid rows only
                    p = logits.sub_(lse[:, None]).exp_()
                    rows = torch.arange(p.shape[0], device=p.device)
                    p[rows, safe_t] -= 1.0
                    p *= valid[:, None].to(p.dtype)
                    p = p.to(cdt)
                    gh[s : s + chunk] = p @ w
                    gw += (p.t() @ hc).float()
                del logits
        if with_grad:
            ctx.save_for_backward(gh, gw)
        ctx.h_dtype = h.dtype
        ctx.w_dtype = weight.dtype
        return loss

    @staticmethod
    def backward(ctx, grad_out):  # type: ignore[override]
        gh, gw = ctx.saved_tensors
        g = grad_out.float()
        return (gh.float() * g).to(ctx.h_dtype), (gw * g).to(ctx.w_dtype), None, None, None


def fused_linear_cross_entropy(
    h: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, chunk: int = 2048
) -> torch.Tensor:
    """Sum (not mean) of token cross-entropies of ``h @ weight.T`` against ``targets``.

    ``h``: (..., C); ``targets``: (...) with IGNORE_INDEX for tokens without a target. Returns a
    float32 scalar. Gradients flow to ``h`` and ``weight``.
    """
    h2 = h.reshape(-1, h.shape[-1])
    t2 = targets.reshape(-1)
    with_grad = torch.is_grad_enabled() and (h.requires_grad or weight.requires_grad)
    return _FusedLinearCrossEntropy.apply(h2, weight, t2, int(chunk), with_grad)

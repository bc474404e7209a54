"""Chunked linear cross-entropy: the LM head and its cross-entropy without keeping [tokens, vocab] for backward.

The plain objective computes logits = h W^T for every position and F.cross_entropy over them; autograd keeps the
logits (and their fp32 copy) for backward. With V3's 129,280-entry vocabulary that is 517 KB per token in fp32,
more than every other activation of a token together. Here the head and the loss run chunk by chunk over the
tokens, and only the hidden states h [N, D] and one log-sum-exp per token are kept:

    forward   per chunk of c tokens: z = h_c W^T (c x V, transient), lse = logsumexp(z),
              loss += sum over scored tokens of (lse - z[target])
    backward  per chunk: z again, p = softmax(z) = exp(z - lse), dz = g * (p - onehot(target)) on scored tokens,
              dh_c = dz W,   dW += dz^T h_c

The price is one more GEMM of the head's size in backward (z is recomputed). TRL's GRPO (trl.kernels.chunked_logprob)
and Liger's fused linear cross-entropy do the same on GPU, the latter computing the gradients already in forward;
this one is plain torch, runs anywhere, and its gradients are those of the plain path (tests/test_memory_options.py:
fp32, 1e-5). Products run in the head's dtype (the autocast dtype under autocast, like the plain lm_head), the
softmax and the loss in fp32.

`linear_cross_entropy_sum` takes the head module. A head that is not y = h W^T alone (a bias, an adapter, forward
hooks such as FSDP2's gathering or tensor parallelism's output gather) is called as it is, chunk by chunk, each
chunk's head and loss under a non-reentrant checkpoint: the same loss, the logits of one chunk at a time, the head's
own forward (hooks included) run again in backward.
`token_logprobs` gives log p(target) per token in chunks without gradients (GRPO's rollout check).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

IGNORE_INDEX = -100  # transformers' and torch's "not scored" label


def _compute_dtype(h: torch.Tensor, w: torch.Tensor) -> torch.dtype:
    if torch.is_autocast_enabled(h.device.type):
        return torch.get_autocast_dtype(h.device.type)
    return torch.result_type(h, w)


class _LinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, h_ND, w_VD, targets_N, chunk: int, compute_dtype: torch.dtype):
        w = w_VD.to(compute_dtype)
        total = torch.zeros((), dtype=torch.float32, device=h_ND.device)
        lse_N = torch.empty(h_ND.shape[0], dtype=torch.float32, device=h_ND.device)
        for start in range(0, h_ND.shape[0], chunk):
            z_cV = (h_ND[start:start + chunk].to(compute_dtype) @ w.t()).float()
            t_c = targets_N[start:start + chunk]
            lse_c = z_cV.logsumexp(-1)
            target_logit_c = z_cV.gather(1, t_c.clamp_min(0)[:, None]).squeeze(1)
            total += torch.where(t_c != IGNORE_INDEX, lse_c - target_logit_c, 0.0).sum()
            lse_N[start:start + chunk] = lse_c
        ctx.save_for_backward(h_ND, w_VD, targets_N, lse_N)
        ctx.chunk, ctx.compute_dtype = chunk, compute_dtype
        return total

    @staticmethod
    def backward(ctx, grad_total):
        h_ND, w_VD, targets_N, lse_N = ctx.saved_tensors
        chunk, cd = ctx.chunk, ctx.compute_dtype
        w = w_VD.to(cd)
        dh_ND = torch.empty_like(h_ND) if ctx.needs_input_grad[0] else None
        dw_VD = torch.zeros(w_VD.shape, dtype=torch.float32, device=w_VD.device) if ctx.needs_input_grad[1] else None
        for start in range(0, h_ND.shape[0], chunk):
            h_c = h_ND[start:start + chunk].to(cd)
            t_c = targets_N[start:start + chunk]
            dz_cV = (h_c @ w.t()).float().sub_(lse_N[start:start + chunk, None]).exp_()  # softmax
            rows = torch.arange(dz_cV.shape[0], device=dz_cV.device)
            dz_cV[rows, t_c.clamp_min(0)] -= 1.0
            dz_cV.mul_((t_c != IGNORE_INDEX).to(dz_cV.dtype)[:, None] * grad_total)
            dz_cV = dz_cV.to(cd)
            if dh_ND is not None:
                dh_ND[start:start + chunk] = (dz_cV @ w).to(h_ND.dtype)
            if dw_VD is not None:
                dw_VD.add_(dz_cV.t() @ h_c)
        return dh_ND, None if dw_VD is None else dw_VD.to(w_VD.dtype), None, None, None


def plain_head_weight(head: nn.Module) -> torch.Tensor | None:
    """The [V, D] weight of a head that is y = h W^T alone (a plain bias-free nn.Linear, unwrapped, unhooked, with a
    local weight), else None."""
    weight = getattr(head, "weight", None)
    plain = (type(head) is nn.Linear and head.bias is None and not head._forward_hooks
             and not head._forward_pre_hooks and isinstance(weight, torch.Tensor)
             and not hasattr(weight, "device_mesh"))  # a DTensor (FSDP2, tensor parallel)
    return weight if plain else None


def _chunk_cross_entropy_sum(head: nn.Module, h_cD: torch.Tensor, t_c: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(head(h_cD).float(), t_c, ignore_index=IGNORE_INDEX, reduction="sum")


def linear_cross_entropy_sum(h_BTD: torch.Tensor, head: nn.Module, targets_BT: torch.Tensor,
                             chunk_tokens: int) -> torch.Tensor:
    """sum over scored positions of CE(head(h), target) in fp32, without keeping the logits for backward."""
    h_ND = h_BTD.reshape(-1, h_BTD.shape[-1])
    targets_N = targets_BT.reshape(-1).to(h_ND.device)
    weight = plain_head_weight(head)
    if weight is not None:
        return _LinearCrossEntropy.apply(h_ND, weight, targets_N, chunk_tokens, _compute_dtype(h_ND, weight))
    return sum(checkpoint(_chunk_cross_entropy_sum, head, h_ND[start:start + chunk_tokens],
                          targets_N[start:start + chunk_tokens], use_reentrant=False)
               for start in range(0, h_ND.shape[0], chunk_tokens))


@torch.no_grad()
def token_logprobs(h_BTD: torch.Tensor, head: nn.Module, targets_BT: torch.Tensor, temperature: float = 1.0,
                   chunk_tokens: int = 1024) -> torch.Tensor:
    """log_softmax(head(h) / temperature)[target] per position [B, T], a chunk of positions at a time (any head
    module: it is called on each chunk)."""
    h_ND = h_BTD.reshape(-1, h_BTD.shape[-1])
    targets_N = targets_BT.reshape(-1)
    out_N = torch.empty(targets_N.shape, dtype=torch.float32, device=h_ND.device)
    for start in range(0, h_ND.shape[0], chunk_tokens):
        z_cV = head(h_ND[start:start + chunk_tokens]).float() / temperature
        t_c = targets_N[start:start + chunk_tokens].clamp_min(0)
        out_N[start:start + chunk_tokens] = z_cV.gather(1, t_c[:, None]).squeeze(1) - z_cV.logsumexp(-1)
    return out_N.view(targets_BT.shape)

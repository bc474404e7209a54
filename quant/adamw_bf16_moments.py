"""The optimizer side of DeepSeek-V3's FP8 recipe: fp32 master weights and gradients, AdamW moments in bf16.

    from quant.adamw_bf16_moments import AdamWBF16Moments
    optimizer = AdamWBF16Moments(model.parameters(), lr=3e-4)   # Trainer: optimizers=(optimizer, None)

Works with any model, FP8-converted or not.
"""

from __future__ import annotations

import torch


class AdamWBF16Moments(torch.optim.Optimizer):
    """AdamW (decoupled weight decay, bias-corrected moments) whose two moments are stored in bf16, as DeepSeek-V3
    trains: master weights and gradients stay fp32, the moments take half the memory. Each update is computed in
    fp32 and only the stored moments are rounded. torch's AdamW cannot do this (it keeps moments in the parameter's
    dtype and refuses mixed dtypes). Loading a state dict casts the moments back to bf16."""

    def __init__(self, params, lr: float = 1e-3, betas=(0.9, 0.999), eps: float = 1e-8, weight_decay: float = 1e-2):
        super().__init__(params, dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay))

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            (beta1, beta2), lr, eps, wd = group["betas"], group["lr"], group["eps"], group["weight_decay"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self.state[p]
                if not state:
                    state["step"] = 0
                    state["exp_avg"] = torch.zeros_like(p, dtype=torch.bfloat16)
                    state["exp_avg_sq"] = torch.zeros_like(p, dtype=torch.bfloat16)
                state["step"] += 1
                g = p.grad.float()
                m = state["exp_avg"].float().lerp_(g, 1 - beta1)
                v = state["exp_avg_sq"].float().mul_(beta2).addcmul_(g, g, value=1 - beta2)
                state["exp_avg"].copy_(m)
                state["exp_avg_sq"].copy_(v)
                t = state["step"]
                denom = (v / (1 - beta2**t)).sqrt_().add_(eps)
                p.mul_(1 - lr * wd)
                p.addcdiv_(m.to(p.dtype), denom.to(p.dtype), value=-lr / (1 - beta1**t))
        return loss

    def load_state_dict(self, state_dict):
        super().load_state_dict(state_dict)
        for state in self.state.values():  # torch casts floating state to the parameter's dtype on load
            for key in ("exp_avg", "exp_avg_sq"):
                if key in state:
                    state[key] = state[key].to(torch.bfloat16)

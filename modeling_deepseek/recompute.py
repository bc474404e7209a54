"""Recomputation in backward: how the memory options (configuration.py) keep less for backward.

A module that recomputes runs a piece of its forward so that autograd keeps only that piece's inputs, and runs the
piece again in backward to get what its gradient needs. Two forms:

- `recompute(fn, *args)`: torch's non-reentrant checkpoint. Whatever `fn` calls (modules with hooks, tensor-
  parallel layers, dropout with the same random mask) is run again as it ran, and the inputs are kept as they are.
  The norms, the MLA up-projections and the SwiGLU of the high-precision modules use it.
- `recompute_packed(fn, packers, *args)`: the same contract, but each tensor input may be kept in another form
  (`packers[i]` = (pack, unpack), e.g. an FP8 copy) and `fn` runs again on the unpacked tensors: the gradient is
  then that of `fn` at the unpacked point, not bit-equal to the forward's. FP8 training caches the SwiGLU inputs so
  (DeepSeek-V3 report 3.3.3: "cache the SwiGLU inputs in FP8 and recompute its output"). `fn` must be a function
  of its arguments only (weights passed in, no module state): its gradients are returned for the arguments.

Both apply only while autograd records (`recompute_active`): inference runs the plain forward.
"""

from __future__ import annotations

import torch
from torch.utils.checkpoint import checkpoint


def recompute_active(config, option: str) -> bool:
    """Whether the memory option `option` (a config field) applies to the forward running now."""
    return bool(getattr(config, option, False)) and torch.is_grad_enabled()


def recompute(fn, *args):
    """fn(*args), keeping only the inputs for backward and running fn again there."""
    return checkpoint(fn, *args, use_reentrant=False)


class _PackedRecompute(torch.autograd.Function):
    @staticmethod
    def forward(ctx, fn, packers, *args):
        ctx.fn, ctx.unpackers = fn, []
        kept, ctx.layout = [], []
        for arg, packer in zip(args, packers):
            if not isinstance(arg, torch.Tensor):
                ctx.layout.append(("const", arg))
                continue
            pack, unpack = packer if packer is not None else (lambda t: (t,), lambda t: t)
            parts = pack(arg.detach())
            ctx.layout.append(("tensor", len(parts), unpack, arg.dtype))
            kept.extend(parts)
        ctx.save_for_backward(*kept)
        device = next(a.device for a in args if isinstance(a, torch.Tensor)).type
        ctx.autocast = (device, torch.is_autocast_enabled(device), torch.get_autocast_dtype(device))
        with torch.no_grad():
            return fn(*args)

    @staticmethod
    def backward(ctx, dout):
        saved, inputs, i = ctx.saved_tensors, [], 0
        for slot, needs in zip(ctx.layout, ctx.needs_input_grad[2:]):
            if slot[0] == "const":
                inputs.append(slot[1])
                continue
            _, n, unpack, dtype = slot
            x = unpack(*saved[i:i + n]).to(dtype).detach()
            i += n
            inputs.append(x.requires_grad_(needs))
        wanted = [x for x in inputs if isinstance(x, torch.Tensor) and x.requires_grad]
        device, enabled, dtype = ctx.autocast
        with torch.enable_grad(), torch.autocast(device, dtype=dtype, enabled=enabled):
            out = ctx.fn(*inputs)
        grads = iter(torch.autograd.grad(out, wanted, dout, allow_unused=True))
        return (None, None, *(next(grads) if isinstance(x, torch.Tensor) and x.requires_grad else None
                              for x in inputs))


def recompute_packed(fn, packers, *args):
    """fn(*args), keeping each tensor argument in the form packers[i] = (pack, unpack) gives it (None: as it is), and
    running fn again on the unpacked arguments in backward (see the module docstring)."""
    return _PackedRecompute.apply(fn, tuple(packers), *args)

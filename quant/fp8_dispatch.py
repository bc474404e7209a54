"""FP8 dispatch under expert parallelism, as DeepSeek-V3 did it (report section 3.3.2, "Communication").

    from quant.fp8_dispatch import FP8_DISPATCH            # registers the implementation with transformers
    model = DeepseekForCausalLM.from_pretrained(path, distributed_config=DistributedConfig(
        tp_size=2, tp_plan={}, ep_size=2, ep_implementation=FP8_DISPATCH))
    convert_to_fp8_training(model)

Under expert parallelism every (token, expert) pair travels to the expert's rank and its result travels back: two
all_to_alls per MoE layer forward, two in backward. With FP8 training the first thing the experts do with a token is
quantize it for the up-projection's Fprop (1 x 128 tiles: one scale per token per 128 channels). Quantizing *before*
the exchange moves the same information in half the bytes, and the expert GEMM takes the e4m3 rows and their scales
as they arrive, without quantizing again: its Fprop is bit-for-bit the one high-precision dispatch gives.

    dispatch          forward   x quantized once per token (not per copy), e4m3 + fp32 scales: D + 4 D/128 bytes
                      backward  the input gradient back to the token's rank, in the model's precision
    combine           forward   the weighted expert outputs back, in the model's precision (V3: BF16)
                      backward  the gradient of the expert output (the down-projection's output): e4m3 + scales,
                                in the 1 x 128 tiles the down-projection's Dgrad quantizes it in

Against bf16 that is (1 + 4/128) / 2 = 0.52x the bytes for each FP8 exchange. What changes numerically: the
up-projection's Wgrad takes its 128-token tiles from the dequantized tokens (x was e4m3 once already), and so does the
down-projection's from the dequantized gradient; the down-projection's Dgrad quantizes that gradient again (exact:
re-quantizing a dequantized tile returns its e4m3 values, up to the fp32 rounding of a scale). The loss, and every
gradient outside the experts' weights, is that of FP8 training with high-precision dispatch.

How it plugs in: transformers' engine reaches the experts of an `ep_dispatch_experts` module through the
`EPImplementation` that `DistributedConfig.ep_implementation` names, and lets a model register its own
(`EPImplementationInterface.register`). This one is the engine's all_to_all scheme (TP slicing, tokens sorted by
expert, split sizes exchanged first) with the token exchanges above; on experts that are not FP8 training experts
(before `convert_to_fp8_training`, or `convert_experts=False`) it moves the tokens in the model's precision, as
the engine's does. `wire_bytes` counts what its all_to_alls send from this rank, per exchange.
"""

from __future__ import annotations

from collections import Counter

import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor, Replicate, Shard

from modeling_deepseek.compat import ep_implementation_base, register_ep_implementation
from modeling_deepseek.fp8_format import dequantize_blockwise, quantize_blockwise
from modeling_deepseek.fp8_gemm import TILE

from .fp8_training_modules import Float8TrainingExperts

FP8_DISPATCH = "fp8_all_to_all"


def _exchange(x: torch.Tensor, out_sizes: list[int], in_sizes: list[int], group, counter: Counter, what: str):
    """all_to_all_single of the rows of x (in_sizes to each rank), returning the rows received (out_sizes)."""
    out = x.new_empty((sum(out_sizes), *x.shape[1:]))
    x = x.contiguous()
    dist.all_to_all_single(out, x, out_sizes, in_sizes, group=group)
    counter[what] += x.numel() * x.element_size()
    return out


def _exchange_fp8(x: torch.Tensor, out_sizes, in_sizes, group, counter: Counter, what: str, p2: bool):
    """x quantized in 1 x 128 tiles, exchanged as e4m3 (sent as bytes: gloo and NCCL move uint8) + fp32 scales."""
    q, s = quantize_blockwise(x, TILE, p2)
    q = _exchange(q.view(torch.uint8), out_sizes, in_sizes, group, counter, what).view(q.dtype)
    return q, _exchange(s, out_sizes, in_sizes, group, counter, what)


class _Dispatch(torch.autograd.Function):
    """rows_S of x_TD to the experts' ranks. FP8: also returns the e4m3 rows and scales that arrived (x_recv is their
    dequantized copy, the differentiable one); backward brings the rows' gradients home and sums them per token."""

    @staticmethod
    def forward(ctx, x_TD, rows_S, send_sizes, recv_sizes, group, counter, fp8: bool, p2: bool):
        ctx.rows_S, ctx.sizes, ctx.group, ctx.counter = rows_S, (send_sizes, recv_sizes), group, counter
        ctx.T = x_TD.shape[0]
        if not fp8:
            return _exchange(x_TD[rows_S], recv_sizes, send_sizes, group, counter, "dispatch"), None, None
        # Quantized per token, once, then gathered per (token, expert) copy: 1 x 128 tiles never mix two tokens.
        q_TD, s_TD = quantize_blockwise(x_TD, TILE, p2)
        q = _exchange(q_TD[rows_S].view(torch.uint8), recv_sizes, send_sizes, group, counter, "dispatch")
        q = q.view(q_TD.dtype)
        s = _exchange(s_TD[rows_S], recv_sizes, send_sizes, group, counter, "dispatch")
        ctx.mark_non_differentiable(q, s)
        return dequantize_blockwise(q, s, TILE, x_TD.dtype), q, s

    @staticmethod
    def backward(ctx, dx_recv, _dq, _ds):
        send_sizes, recv_sizes = ctx.sizes
        dx_S = _exchange(dx_recv, send_sizes, recv_sizes, ctx.group, ctx.counter, "dispatch_grad")
        dx_TD = dx_S.new_zeros((ctx.T, dx_S.shape[-1])).index_add_(0, ctx.rows_S, dx_S)
        return dx_TD, None, None, None, None, None, None, None


class _Combine(torch.autograd.Function):
    """The expert outputs back to the tokens' ranks in their own precision; backward sends their gradient to the
    experts' ranks, in FP8 when `fp8` (the 1 x 128 tiles of the down-projection's Dgrad), dequantized on arrival."""

    @staticmethod
    def forward(ctx, y_R, send_sizes, recv_sizes, group, counter, fp8: bool, p2: bool):
        ctx.sizes, ctx.group, ctx.counter, ctx.fp8, ctx.p2 = (send_sizes, recv_sizes), group, counter, fp8, p2
        return _exchange(y_R, send_sizes, recv_sizes, group, counter, "combine")

    @staticmethod
    def backward(ctx, dy_S):
        send_sizes, recv_sizes = ctx.sizes
        if ctx.fp8:
            q, s = _exchange_fp8(dy_S, recv_sizes, send_sizes, ctx.group, ctx.counter, "combine_grad", ctx.p2)
            dy_R = dequantize_blockwise(q, s, TILE, dy_S.dtype)
        else:
            dy_R = _exchange(dy_S, recv_sizes, send_sizes, ctx.group, ctx.counter, "combine_grad")
        return dy_R, None, None, None, None, None, None


class FP8AllToAllEP(ep_implementation_base()):
    """The engine's all_to_all expert parallelism with FP8 token exchanges (module docstring)."""

    def __init__(self, experts, ep_mesh, tp_mesh):
        super().__init__(experts, ep_mesh, tp_mesh)
        self.experts = experts
        self.wire_bytes: Counter = Counter()
        experts.fp8_dispatch = self  # found by `wire_bytes(model)`

    def __call__(self, hidden_states, top_k_index, top_k_weights):
        num_tokens, hidden_dim = hidden_states.shape
        if self.tp_mesh.size() > 1:
            # The ranks of a TP group hold the same batch: each dispatches its own rows (Replicate -> Shard(0) is a
            # local chunk; its backward all-gathers the row gradients), so no token reaches an expert twice.
            hidden_states, top_k_index, top_k_weights = (
                DTensor.from_local(t, self.tp_mesh, [Replicate()], run_check=False)
                .redistribute(self.tp_mesh, [Shard(0)]).to_local()
                for t in (hidden_states, top_k_index, top_k_weights))
        group, ep_size, L = self.ep_mesh.get_group(), self.ep_mesh.size(), self.num_local_experts
        fp8 = isinstance(self.experts, Float8TrainingExperts)
        p2 = fp8 and self.experts.fp8_config.round_scales_to_power_of_2
        K = top_k_index.shape[-1]
        # Sorted by expert, the pairs are grouped by owner rank (each owns L consecutive experts); the per-expert
        # counts tell every receiver which of its experts each row is for. The split sizes are read on the host.
        ids_S = top_k_index.reshape(-1)
        order_S = ids_S.argsort(stable=True)
        send_counts = torch.zeros(ep_size * L, dtype=torch.long, device=ids_S.device)
        send_counts = send_counts.scatter_add_(0, ids_S, torch.ones_like(ids_S)).view(ep_size, L)
        recv_counts = torch.empty_like(send_counts)
        dist.all_to_all_single(recv_counts, send_counts, group=group)
        self.wire_bytes["counts"] += send_counts.numel() * send_counts.element_size()
        send_sizes, recv_sizes = torch.stack([send_counts.sum(1), recv_counts.sum(1)]).tolist()
        x_R, q_R, s_R = _Dispatch.apply(hidden_states, order_S // K, send_sizes, recv_sizes, group,
                                        self.wire_bytes, fp8, p2)
        ids_R = torch.arange(L, device=ids_S.device).repeat(ep_size)
        ids_R = ids_R.repeat_interleave(recv_counts.reshape(-1), output_size=sum(recv_sizes)).unsqueeze(-1)
        ones_R = torch.ones_like(ids_R, dtype=x_R.dtype)  # routing weights are applied on the token's rank
        if x_R.shape[0] == 0:  # nothing arrived: a zero row keeps this rank's experts in the backward graph
            y_R = self.experts_forward(x_R.sum(0, keepdim=True), ids_R.new_zeros((1, 1)), ones_R.new_ones((1, 1)))[:0]
        elif fp8:
            y_R = self.experts_forward(x_R, ids_R, ones_R, x_fp8=(q_R, s_R))
        else:
            y_R = self.experts_forward(x_R, ids_R, ones_R)
        y_S = _Combine.apply(y_R, send_sizes, recv_sizes, group, self.wire_bytes, fp8, p2)
        y_SD = torch.empty_like(y_S).index_copy_(0, order_S, y_S)  # back to (token, top-k slot) order
        out_TD = (y_SD.view(*top_k_weights.shape, hidden_dim) * top_k_weights.unsqueeze(-1)).sum(dim=1)
        if self.tp_mesh.size() == 1:
            return out_TD
        return DTensor.from_local(out_TD.contiguous(), self.tp_mesh, [Shard(0)], run_check=False,
                                  shape=(num_tokens, hidden_dim), stride=(hidden_dim, 1)).full_tensor()


register_ep_implementation(FP8_DISPATCH, FP8AllToAllEP)


def wire_bytes(model) -> Counter:
    """Bytes this rank's FP8 dispatch all_to_alls sent, summed over the model's MoE layers, per exchange."""
    total = Counter()
    for module in model.modules():
        impl = getattr(module, "fp8_dispatch", None)
        if impl is not None:
            total.update(impl.wire_bytes)
    return total

"""FP8 Linears under tensor parallelism: the block-scaled GEMMs on each rank's shard, the engine's layout around them.

Loaded with DistributedConfig(tp_size=N), a planned Linear holds its weight as a DTensor and the engine's wrapper
(transformers/distributed/tensor_parallel.py) hands its forward DTensor inputs in training, expecting the DTensor that
F.linear would return; the wrapper then redistributes (all-reduce, all-gather) as the plan says. `sharded_linear`
keeps that contract and runs the FP8 GEMMs on local tensors:

    colwise   x Replicate,  W Shard(0) (rows: output features)   ->  y Shard(-1), local y = x W_r^T; x's gradient
              comes back Partial (each rank's Dgrad covers its rows of W), and DTensor sums it where the layout needs
    rowwise   x Shard(-1),  W Shard(1) (columns: input features) ->  y Partial, local y = x_r W_r^T, summed by the
              engine's redistribute; a bias (replicated) is added once, after the sum
    replicated weight                                            ->  y Replicate

The 128-grid on a shard. Every operand is tiled from its local first entry. Where each shard is a multiple of 128
wide, those are one process' tiles exactly: the local Fprop / Dgrad / Wgrad see the very e4m3 values and scales of the
unsharded GEMMs, and only the order of fp32 sums across ranks differs. That holds for every TP-split projection of
V3 at tp = 2..8 (q_b_proj 24576 rows, kv_b_proj 32768, o_proj 16384 columns, MLP 18432 / 2048: all multiples of
128 * 8). A narrower shard (a small test model) gets tiles of its own where one process has a tile spanning two ranks:
a different grid of the same recipe, each tile still at most 128 entries with its own scale, within FP8's rounding
noise of one process (tests/test_parallel_training.py measures it).
"""

from __future__ import annotations

import torch

try:  # torch built without distributed support: nothing is ever sharded
    from torch.distributed.tensor import DTensor, Partial, Replicate, Shard
except ImportError:  # pragma: no cover
    DTensor = None

from modeling_deepseek.parallel import is_sharded


def sharded_linear(x, weight, bias, local_linear):
    """y = x W^T + b for DTensor `weight` (1-D mesh) and `x` (DTensor or local, then taken as replicated), where
    local_linear(x_local, w_local, b_local_or_None) multiplies local tensors; returns the DTensor F.linear gives."""
    if not is_sharded(weight):
        raise NotImplementedError("FP8 linear: a DTensor input with a plain weight; shard the weight (the engine's "
                                  "plans do) or pass local tensors")
    mesh = weight.device_mesh
    if mesh.ndim != 1:
        raise NotImplementedError(f"FP8 linear: a weight on a {mesh.ndim}-D mesh {weight.placements}; FP8 training "
                                  "shards Linears over one tensor-parallel dimension")
    (placement,) = weight.placements
    if not is_sharded(x):
        x = DTensor.from_local(x, mesh, [Replicate()], run_check=False)
    last = x.ndim - 1
    if placement == Shard(0):  # colwise
        x_local = x.redistribute(mesh, [Replicate()]).to_local(grad_placements=[Partial()])
        y_placement, b_local = Shard(last), None if bias is None else bias.to_local()
    elif placement == Shard(1):  # rowwise
        x_local = x.redistribute(mesh, [Shard(last)]).to_local()
        y_placement, b_local = Partial(), None
    elif placement == Replicate():
        x_local = x.redistribute(mesh, [Replicate()]).to_local()
        y_placement, b_local = Replicate(), None if bias is None else bias.to_local()
    else:
        raise NotImplementedError(f"FP8 linear: weight placement {placement}; FP8 training takes colwise "
                                  "Shard(0), rowwise Shard(1) or Replicate")
    y_local = local_linear(x_local, weight.to_local(), b_local)
    shape = (*x.shape[:-1], weight.shape[0])
    y = DTensor.from_local(y_local, mesh, [y_placement], run_check=False, shape=shape,
                           stride=torch.empty(shape, device="meta").stride())
    if bias is not None and placement == Shard(1):
        y = y + bias
    return y

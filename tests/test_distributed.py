"""Data-parallel and FSDP training on 2 real CPU ranks (torchrun + gloo) through accelerate, against one process.

tests/_dist_worker.py trains the tiny model for 3 optimizer steps at a global batch of 4: as one process (batch 4),
and as 2 ranks with 2 samples each. The balancing bias update runs from the global optimizer-step pre-hook under
accelerate's AcceleratedOptimizer and all-reduces the token counts, so both ranks must hold bitwise identical biases,
equal to the single-process ones; losses (averaged over ranks) and final parameters must match the single process.

The worker uses SGD (momentum 0.9): its update is linear in the gradient, so a wrong cross-rank gradient scale would
show. AdamW normalises the gradient away and amplifies rounding noise on near-zero gradients: with it the final
parameters still agree to ~1e-5 (a handful of 275k entries above 1e-6), too close to the bound for a stable test.

FSDP notes (accelerate 1.15, torch 2.13, CPU):
- `Accelerator(fsdp_plugin=...)` on CPU silently falls back to DDP: AcceleratorState only switches to
  DistributedType.FSDP for accelerator devices (MULTI_GPU, MULTI_NPU, ...), never for MULTI_CPU. The worker's
  --force-fsdp sets the state to FSDP so that `prepare()` really shards with fully_shard (checked below: DTensor
  parameters, half of the elements per rank).
- FSDP1 through accelerate on CPU fails in FullyShardedDataParallel.__init__: "ValueError: Inconsistent compute
  device and `device_id` on rank 0: cpu vs cpu:0" (accelerate passes device_id=cpu:0). Not tested.
- FSDP2 (fully_shard) works on CPU with gloo. It needs every use of a module's parameters inside that module's
  forward: the MTP module applies `shared_head.norm` in its own forward (mtp.py) for that reason; called from
  outside, where FSDP2 has already resharded the module, it fails with "RuntimeError: aten.mul.Tensor got mixed
  torch.Tensor and DTensor".
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from benchmarks.harness import free_port
from test_parallel import finish  # wait for a torchrun launch, raising with the ranks' tracebacks

REPO = Path(__file__).resolve().parent.parent
WORKER = REPO / "tests" / "_dist_worker.py"
TORCHRUN = Path(sys.executable).with_name("torchrun")
STEPS, GLOBAL_BATCH, SEQ, TOP_K, N_ROUTERS = 3, 4, 16, 2, 3
TIMEOUT_S = 240

pytestmark = pytest.mark.skipif(
    not (TORCHRUN.exists() and torch.distributed.is_available() and torch.distributed.is_gloo_available()),
    reason="needs torchrun next to the interpreter and torch.distributed with gloo",
)




def _env() -> dict:
    env = dict(os.environ)
    env.update(ACCELERATE_USE_CPU="yes", OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false",
               PYTHONPATH=os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")]).rstrip(os.pathsep))
    for var in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(var, None)
    return env


def _run(cmd: list[str], out: Path) -> None:
    """Run in its own process group, so that a hang kills torchrun and both ranks."""
    proc = subprocess.Popen(cmd, cwd=REPO, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            start_new_session=True, text=True)
    finish(proc, out, TIMEOUT_S)


def run_worker(out: Path, mode: str, nproc: int, *extra: str) -> list[dict]:
    args = [str(WORKER), "--out", str(out), "--mode", mode, "--steps", str(STEPS), "--global-batch",
            str(GLOBAL_BATCH), "--seq-len", str(SEQ), *extra]
    if nproc == 1:
        cmd = [sys.executable, *args]
    else:
        cmd = [str(TORCHRUN), "--nproc_per_node", str(nproc), "--master_addr", "127.0.0.1",
               "--master_port", str(free_port()), *args]
    _run(cmd, out)
    return [json.loads((out / f"rank{r}.json").read_text()) for r in range(nproc)]


@pytest.fixture(scope="module")
def single(tmp_path_factory):
    out = tmp_path_factory.mktemp("single")
    [record] = run_worker(out, "single", 1)
    return record, torch.load(out / "params.pt")


def check_against_single(ranks: list[dict], params: dict, single) -> None:
    ref, ref_params = single
    assert [r["world"] for r in ranks] == [2, 2] and [r["rank"] for r in ranks] == [0, 1]
    assert all(r["backend"] == "gloo" and r["per_rank_batch"] == GLOBAL_BATCH // 2 for r in ranks)

    # The bias update ran once per optimizer step on every rank, under accelerate's optimizer wrapper ...
    assert all(r["optimizer_type"] == "AcceleratedOptimizer" for r in ranks)
    assert all(r["bias_updates"] == STEPS for r in ranks) and ref["bias_updates"] == STEPS
    # ... each rank counted its own tokens, the all-reduce summed them to the global batch's ...
    local = [[float(GLOBAL_BATCH // 2 * SEQ * TOP_K)] * N_ROUTERS] * STEPS
    assert all(r["local_token_counts"] == local for r in ranks)
    assert all(r["reduced_token_counts"] == [[float(GLOBAL_BATCH * SEQ * TOP_K)] * N_ROUTERS] * STEPS for r in ranks)
    assert ref["reduced_token_counts"] == []  # one process: nothing to reduce
    assert all(r["pending_zero_after_step"] == [True] * STEPS for r in ranks)

    # (a) ... so the biases are bitwise identical on both ranks, at every step, and equal to the single process'.
    assert ranks[0]["biases"] == ranks[1]["biases"]
    assert ranks[0]["biases"] == ref["biases"]
    assert all(r["bias_dtypes"] == ["torch.float32"] * N_ROUTERS for r in ranks)
    assert ref["biases"][0] != ref["biases"][-1]  # the bias did move

    # (b) per-step losses: the mean of the ranks' micro-batch losses is the global-batch loss (equal lengths).
    for step in range(STEPS):
        mean = (ranks[0]["losses"][step] + ranks[1]["losses"][step]) / 2
        assert abs(mean - ref["losses"][step]) <= 1e-5, (step, mean, ref["losses"][step])
    assert ranks[0]["losses"] != ranks[1]["losses"]  # the ranks really saw different data

    # (c) final parameters, element-wise.
    assert params.keys() == ref_params.keys()
    worst = max((params[k] - ref_params[k]).abs().max().item() for k in params)
    assert worst <= 1e-5, worst
    assert abs(ranks[0]["param_checksum"] - ref["param_checksum"]) <= 1e-3


def test_ddp_two_cpu_ranks_match_single_process(tmp_path, single):
    ranks = run_worker(tmp_path, "ddp", 2)
    assert all(r["wrapped_model_type"] == "DistributedDataParallel" for r in ranks)
    check_against_single(ranks, torch.load(tmp_path / "params.pt"), single)


def test_fsdp2_two_cpu_ranks_match_single_process(tmp_path, single):
    ranks = run_worker(tmp_path, "fsdp2", 2, "--force-fsdp")
    assert all(r["distributed_type"] == "DistributedType.FSDP" for r in ranks)
    assert all(r["wrapped_model_type"].startswith("FSDP") and r["dtensor_params"] > 0 for r in ranks)
    # Really sharded: each rank holds half of the elements, and different ones.
    full = single[0]["local_param_numel"]
    assert all(r["local_param_numel"] < full for r in ranks)
    assert ranks[0]["local_param_checksum"] != ranks[1]["local_param_checksum"]
    check_against_single(ranks, torch.load(tmp_path / "params.pt"), single)

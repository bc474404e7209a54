"""The balancing all-reduce on 2 real CPU ranks (gloo) when the ranks' forwards differ: one rank runs the MTP module
and the other does not, or one rank does no training forward at all before a step. Every rank must join the same
collective at every optimizer step (a rank that skipped it would hang the other) and end with identical biases, equal
to what one process computes from the summed counts."""

from __future__ import annotations

import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from conftest import random_ids, routers, tiny_model


def _biases(model):
    return torch.stack([r.e_score_correction_bias.detach().clone() for r in routers(model)])


def _worker(rank: int, world: int, init_file: str, out_dir: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        model = tiny_model(train=True)
        opt = torch.optim.SGD(model.parameters(), lr=0.0)  # lr 0: only the biases move
        ids = random_ids(2, 10, seed=rank)
        # step 1: rank 0 trains with labels (main + MTP routers count), rank 1 without (MTP router idle)
        out = model(ids, labels=ids) if rank == 0 else model(ids)
        (out.loss if rank == 0 else out.logits.float().mean()).backward()
        opt.step()
        # step 2: rank 1 does no training forward at all (say, it only evaluated); it still joins the update
        if rank == 0:
            model(ids, labels=ids).loss.backward()
        opt.step()
        torch.save(_biases(model), os.path.join(out_dir, f"bias{rank}.pt"))
    finally:
        dist.destroy_process_group()


@pytest.mark.timeout(120)
def test_ranks_with_different_forwards_keep_identical_biases(tmp_path):
    mp.start_processes(_worker, args=(2, str(tmp_path / "init"), str(tmp_path)), nprocs=2, join=True,
                       start_method="spawn")
    b0, b1 = torch.load(tmp_path / "bias0.pt"), torch.load(tmp_path / "bias1.pt")
    assert torch.equal(b0, b1)

    # the same two steps in one process, from the summed counts
    model = tiny_model(train=True)
    start = _biases(model)
    gamma = model.config.bias_update_speed
    expected = start.clone()
    for step in (1, 2):
        loads = []
        for rank in (0, 1):
            ids = random_ids(2, 10, seed=rank)
            if rank == 1 and step == 2:
                continue
            with torch.no_grad():
                model.train()
                out = model(ids, labels=ids) if rank == 0 else model(ids)
            loads.append(out.expert_load if rank == 0 else torch.cat([out.expert_load, torch.zeros(1, 8)]))
        total = torch.stack(loads).sum(0)
        expected += gamma * torch.sign(total.mean(-1, keepdim=True) - total)
        for r, b in zip(routers(model), expected):
            r.e_score_correction_bias.copy_(b)
    assert not torch.equal(b0, start)
    assert torch.allclose(b0, expected)

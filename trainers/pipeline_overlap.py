"""DualPipe's overlapped forward-backward on CPU ranks: one micro-batch's expert all_to_all under another's compute.

    runner = PipelineRunner(model, "dualpipev", 8, pipeline_mesh(2, expert_parallel=True), overlap_f_b=True)

DualPipe's idea (V3 report 3.2.1). In the steady state of DualPipeV a rank runs, in one OVERLAP_F_B action, the
forward of micro-batch i on one of its stages and the full backward of micro-batch j on the other. Under expert
parallelism each MoE layer of either one stops twice for an all_to_all (dispatch, combine: forward; their reverses:
backward). Run one after the other, the rank waits through every exchange; run side by side, one direction's
exchange can wait while the other direction computes. On GPUs DeepSeek gives the exchanges their own SMs; here the
two directions are two threads of the rank's process and the rank's compute is a baton that one of them holds:

    forward thread    [attn  gate]--a2a-->[experts]--a2a-->[attn  gate]--a2a-->...
    backward thread                [experts' grad]--a2a-->[attn grad]    ...
                      one thread computes at a time (the baton); a thread gives the baton up when it enters an
                      all_to_all and takes it back when the exchange is done, so the exchange waits under the other
                      thread's compute.

What that needs, and where it is:
- torch's own hook: ScheduleDualPipeV lets a function be registered for its OVERLAP_F_B actions
  (`register_custom_function`, public). `overlap_f_b_function` is that function: the forward sub-action on the
  calling thread, the full backward on a helper thread, both run as torch's schedule runs them (the mirrors are in
  trainers/compat.py, since torch's own is nested in the schedule's step).
- Separate process groups. Collectives of one group must be issued in the same order on every rank; two threads
  sharing one group would issue theirs in whatever order the threads reach them. DualPipeV's OVERLAP_F_B pairs the
  forward of one of the rank's stages with the backward of the *other* (checked on every action), so each stage's
  MoE layers exchange on a group of their own (`stage_ep_meshes`: one ep group per local stage, the same ranks). An
  exchange's backward runs on the group its forward used (torch's all_to_all autograd keeps it), so a stage's
  forward and backward exchanges share its group and are never concurrent: the action list orders them.
- The baton's hand-over points: identity autograd functions around the experts' all_to_all implementation
  (`exchange_starts` before the dispatch, `exchange_ends` after the combine: trainers/pipeline_experts.py) and
  around the experts' own forward between them (`MarkedExperts`).
  Their backward runs in the reverse order, so the same marks hand the baton over at the backward's exchanges.

What it measures: `Baton` keeps the wall time during which at least one thread of the rank is in an all_to_all
(`comm_s`) and the part of it during which no thread computes (`exposed_s`); outside OVERLAP_F_B (and without
`overlap_f_b`) every exchange is exposed. The marks are identities: with or without overlap, the numbers are those
of the schedule run in turn (tests/test_pipeline.py: loss parts and gradients against one process).

Approximations, stated: the index work around the exchanges (sorting the (token, expert) pairs, the weighted sum)
runs outside the marks, and autograd may run a node that does not depend on the exchange (the router's gradient)
while its thread waits on it: for those moments both threads compute.
"""

from __future__ import annotations

import threading
import time
from concurrent.futures import ThreadPoolExecutor

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import DeviceMesh

from .compat import overlapped_sub_actions, run_forward_action, run_full_backward_action


class Baton:
    """One rank's compute, held by at most one of its threads while `overlapping`; and the all_to_all clocks."""

    def __init__(self):
        self.overlapping = False
        self._lock = threading.Lock()  # the baton itself
        self._clock = threading.Lock()  # guards the counters below
        self._local = threading.local()  # per thread: holds the baton, inside an exchange
        self._in_comm = self._holders = 0
        self._since = time.perf_counter()
        self.comm_s = self.exposed_s = 0.0

    def reset_clocks(self) -> None:
        with self._clock:
            self._since, self.comm_s, self.exposed_s = time.perf_counter(), 0.0, 0.0

    def _tick(self, comm: int = 0, holders: int = 0) -> None:
        now = time.perf_counter()
        if self._in_comm:
            self.comm_s += now - self._since
            if not self._holders:
                self.exposed_s += now - self._since
        self._since = now
        self._in_comm += comm
        self._holders += holders

    def take(self) -> None:
        if getattr(self._local, "holds", False):
            return
        self._lock.acquire()
        self._local.holds = True
        with self._clock:
            self._tick(holders=1)

    def give(self) -> None:
        if not getattr(self._local, "holds", False):
            return
        with self._clock:
            self._tick(holders=-1)
        self._local.holds = False
        self._lock.release()

    def enter_comm(self) -> None:
        if getattr(self._local, "in_comm", False):
            return
        self._local.in_comm = True
        with self._clock:
            self._tick(comm=1)
        if self.overlapping:
            self.give()

    def leave_comm(self) -> None:
        if not getattr(self._local, "in_comm", False):
            return
        self._local.in_comm = False
        with self._clock:
            self._tick(comm=-1)
        if self.overlapping:
            self.take()

    def run(self, fn, *args):
        """fn(*args) holding the baton (between exchanges), which is given back however fn ends."""
        self.take()
        try:
            return fn(*args)
        finally:
            self.leave_comm()  # an exchange whose backward mark never ran (no gradient reached it)
            self.give()


class _Mark(torch.autograd.Function):
    """Identity whose forward calls `forward_hook` and whose backward calls `backward_hook` (a Baton's enter_comm /
    leave_comm): the hand-over points, in both directions, at one place in the graph."""

    @staticmethod
    def forward(ctx, x, forward_hook, backward_hook):
        ctx.backward_hook = backward_hook
        forward_hook()
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        ctx.backward_hook()
        return grad, None, None


def exchange_starts(x, baton: Baton):
    """x, marked: forward enters an exchange here (the dispatch follows), backward leaves one (the dispatch's
    reverse is done)."""
    return _Mark.apply(x, baton.enter_comm, baton.leave_comm)


def exchange_ends(x, baton: Baton):
    """x, marked: forward leaves an exchange here (the combine is done), backward enters one (its reverse follows)."""
    return _Mark.apply(x, baton.leave_comm, baton.enter_comm)


class MarkedExperts:
    """An EP implementation's `experts_forward` between hand-over marks: its input arrives by the dispatch, its output
    leaves by the combine. Keeps the wrapped forward as `experts_forward`, where modeling_deepseek.compat's
    rebind_engine_forward finds it after FP8 training swaps the experts' class."""

    def __init__(self, experts_forward, baton: Baton):
        self.experts_forward, self.baton = experts_forward, baton

    def __call__(self, x_RD, *args, **kwargs):
        return exchange_starts(self.experts_forward(exchange_ends(x_RD, self.baton), *args, **kwargs), self.baton)


def stage_ep_meshes(mesh: DeviceMesh, count: int) -> list[DeviceMesh]:
    """`count` ep meshes over the same ranks as mesh["ep"], each on a process group of its own (the first is
    mesh["ep"] itself). Every rank creates every group (torch's new_group is collective over the world)."""
    meshes = [mesh["ep"]]
    ep = mesh.mesh_dim_names.index("ep")
    ep_groups = mesh.mesh.movedim(ep, -1).reshape(-1, mesh.size(ep)).tolist()  # the ranks of each ep group
    for _ in range(count - 1):
        mine = None
        for ranks in ep_groups:
            group = dist.new_group(ranks)
            if dist.get_rank() in ranks:
                mine = group
        meshes.append(DeviceMesh.from_group(mine, mesh.device_type, mesh_dim_names=("ep",)))
    return meshes


class OverlapFB:
    """The function registered for OVERLAP_F_B: forward on the calling thread, full backward on a helper thread,
    handing the baton over at their all_to_alls."""

    def __init__(self, baton: Baton):
        self.baton, self.calls = baton, 0
        self._helper = ThreadPoolExecutor(max_workers=1, thread_name_prefix="pipeline-backward")

    def __call__(self, action, ctx) -> None:
        forward, backward = overlapped_sub_actions(action)
        if forward.stage_index == backward.stage_index:  # the groups are per stage: two directions of one would race
            raise ValueError(f"OVERLAP_F_B of one stage ({forward.stage_index}) in both directions: the overlap needs "
                             "the forward and the backward on different stages")
        self.calls += 1
        self.baton.overlapping = True
        try:
            pending = self._helper.submit(self.baton.run, run_full_backward_action, ctx, backward)
            try:
                self.baton.run(run_forward_action, ctx, forward)
            finally:
                pending.result()
        finally:
            self.baton.overlapping = False


__all__ = ["Baton", "MarkedExperts", "OverlapFB", "exchange_ends", "exchange_starts", "stage_ep_meshes"]

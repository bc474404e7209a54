"""Pipeline parallelism (modeling_deepseek/pipeline_stages.py, trainers/pipeline.py) against one process.

One torchrun launch per world size (2 and 4 CPU ranks, gloo) trains every schedule (tests/_pipeline_worker.py); here
the same tiny model trains in one process on the same global batches, and for each schedule: the loss parts of the
first step and every parameter's gradient agree to 1e-5, the AdamW loss curve follows (20 steps; 6 for the 4-rank
layouts other than DualPipeV), and the aux-loss-free biases end where one process puts them after as many steps
(identical on data-parallel replicas), and `clip_grad_norm_` measures the one-process gradient norm. The `+ep` layouts
(pp 2 x ep 2: pipeline x expert parallel) compare each rank's expert gradients with its slice of one process's and
gather the expert shards back into the whole model; `dualpipev+ep+overlap` runs DualPipeV's OVERLAP_F_B actions with
the forward and the backward side by side (trainers/pipeline_overlap.py) and must give the same numbers. FP8 layouts
(zbv, dualpipev: the weight-gradient split through the FP8 modules' custom autograd functions) compare with one
process over the same micro-batches. `dualpipev+dp+zero1` (pp 2 x dp 2, ZeRO-1: trainers/pipeline_zero.py) ends with
parameters bit-identical to `dualpipev+dp`, each replica holding half the AdamW moments; `dualpipev+ep+rep+zero1` is
expert parallelism inside data parallelism (4 replicas of a 1-rank pipeline, experts split 2 ways, each shard on 2
replicas, its gradient summed over them) with ZeRO-1 over each parameter's holders. Every layout clips to half the
norm once and checks that every gradient, expert shards included, halves. The 2-rank launch also checks the named
errors and a bit-exact resume of trainers.pipeline_training; the 4-rank launch the same resume under ZeRO-1 (pp 2 x
ep 2), each rank's checkpoint file holding its own optimizer shard.
"""

from __future__ import annotations

import json
import subprocess
import threading
import time
from pathlib import Path

import pytest
import torch
from transformers import DeepseekV3Config

import _pipeline_worker as worker
from benchmarks.harness import free_port
from modeling_deepseek import DeepseekConfig, DeepseekForCausalLM
from modeling_deepseek.pipeline_stages import stage_layer_counts
from test_parallel import TORCHRUN, _env, finish
from trainers.pipeline import SCHEDULES, check_microbatches, stage_indices
from trainers.pipeline_overlap import Baton, MarkedExperts

REPO = Path(__file__).resolve().parent.parent
WORKER = REPO / "tests" / "_pipeline_worker.py"
ATOL = 1e-5
LAUNCHES = {
    2: [*SCHEDULES, "zbv+fp8", "dualpipev+fp8", "errors", "resume"],
    # Every schedule trains the full 20 steps on 2 ranks; on 4, DualPipeV does and the others 6 (the suite's time).
    4: [*(f"{name}@6" for name in SCHEDULES if name != "dualpipev"), "dualpipev", "1f1b+dp@6", "dualpipev+dp@6",
        "dualpipev+ep@6", "dualpipev+ep+overlap@6", "1f1b+ep@6", "dualpipev+dp+zero1@6", "dualpipev+ep+rep+zero1@6",
        "resume+zero1"],
}

needs_torchrun = pytest.mark.skipif(
    not (TORCHRUN.exists() and torch.distributed.is_available() and torch.distributed.is_gloo_available()),
    reason="needs torchrun next to the interpreter and torch.distributed with gloo",
)


def test_pp_plan_is_transformers_deepseek_v3_plan():
    assert DeepseekConfig.base_model_pp_plan == DeepseekV3Config.base_model_pp_plan


def test_layer_rule_and_placement():
    assert stage_layer_counts(8, 4) == [2, 2, 2, 2]
    assert stage_layer_counts(61, 16) == [3] + [4] * 13 + [3, 3]  # V3's 61 layers: the 13 extra to the middle
    assert stage_layer_counts(5, 4) == [1, 2, 1, 1]
    with pytest.raises(ValueError, match="cannot split 3 decoder layers into 4 pipeline stages"):
        stage_layer_counts(3, 4)
    assert [stage_indices(r, 4, SCHEDULES["dualpipev"]) for r in range(4)] == [[0, 7], [1, 6], [2, 5], [3, 4]]
    assert [stage_indices(r, 2, SCHEDULES["interleaved1f1b"]) for r in range(2)] == [[0, 2], [1, 3]]
    with pytest.raises(ValueError, match="'dualpipev' with 4 stages needs at least 4 micro-batches, got 2"):
        check_microbatches("dualpipev", 2, 4)
    with pytest.raises(ValueError, match="a batch of 6 sequences does not split into 4 micro-batches"):
        check_microbatches("gpipe", 4, 2, batch_size=6)


def test_ledger_divides_each_parameters_optimizer_state_by_its_zero1_shards():
    """pipeline_rank_bytes: ZeRO-1 shards a replicated parameter's state over all dp ranks and an expert shard's over
    its dp / ep replicas, so the pipeline ranks' states times dp add up to the whole model's, with or without EP."""
    from conftest import tiny_config

    from modeling_deepseek.pipeline_stages import pipeline_rank_bytes

    config = tiny_config(num_hidden_layers=4)
    total = sum(p.numel() for p in DeepseekForCausalLM(config).parameters())
    experts = sum(p.numel() for n, p in DeepseekForCausalLM(config).named_parameters() if ".mlp.experts." in n)
    assert 0 < experts < total
    for ep, dp in ((1, 1), (1, 4), (2, 4), (4, 4)):
        rows = pipeline_rank_bytes(config, pp_size=2, ep_size=ep, dp_size=dp, optimizer_bytes=8)
        assert sum(r["optimizer_bytes"] for r in rows) * dp == pytest.approx(8 * total, abs=8 * dp), (ep, dp)
        assert sum(r["parameters"] for r in rows) == pytest.approx(total - experts + experts / ep, abs=2)
    # EP without ZeRO-1: each rank steps its own expert shard, whole.
    rows = pipeline_rank_bytes(config, pp_size=2, ep_size=2, dp_size=1, optimizer_bytes=8)
    assert sum(r["optimizer_bytes"] for r in rows) == pytest.approx(8 * (total - experts / 2), abs=8)


def test_baton_hands_the_compute_over_at_an_exchange():
    """trainers.pipeline_overlap.Baton: a thread entering an exchange gives the rank's compute to the other; back from
    it, it waits until the other gives it up. The exchange time under the other's compute is hidden, not exposed."""
    baton, order = Baton(), []
    in_exchange, computed = threading.Event(), threading.Event()

    def exchanging():  # holds the baton first, then waits in an "all_to_all" until the other has computed a while
        baton.enter_comm()
        in_exchange.set()
        computed.wait()
        baton.leave_comm()
        order.append("exchange done, computing again")

    def computing():
        in_exchange.wait()
        order.append("computing")
        time.sleep(0.2)
        computed.set()
        time.sleep(0.2)  # still computing: the exchanging thread must wait for the baton
        order.append("computed")

    baton.overlapping = True
    first = threading.Thread(target=baton.run, args=(exchanging,))
    first.start()
    in_exchange.wait(10)  # it held the baton first, and gave it up entering the exchange
    second = threading.Thread(target=baton.run, args=(computing,))
    second.start()
    first.join(10), second.join(10)
    assert order == ["computing", "computed", "exchange done, computing again"]
    assert baton.comm_s >= 0.2 and 0 <= baton.exposed_s < 0.1, (baton.comm_s, baton.exposed_s)
    baton.reset_clocks()
    baton.overlapping = False  # outside OVERLAP_F_B: nothing computes under an exchange, all of it is exposed
    baton.enter_comm()
    time.sleep(0.05)
    baton.leave_comm()
    assert baton.comm_s == baton.exposed_s >= 0.05


def test_marked_experts_keep_the_forward_that_fp8_conversion_rebinds():
    """The overlap's hand-over marks wrap the EP implementation's experts_forward; modeling_deepseek.compat's
    rebind_engine_forward (convert_to_fp8_training's class swap) still reaches the wrapped bound forward, and the
    marks are identities with gradients."""
    from modeling_deepseek.compat import rebind_engine_forward
    from trainers import pipeline_experts

    class Implementation:  # an EP implementation without the exchanges: the experts on every token
        def __init__(self, experts_forward):
            self.experts_forward = experts_forward

        def __call__(self, x_TD, expert_ids_TK, weights_TK):
            return self.experts_forward(x_TD)

    experts = torch.nn.Linear(4, 4)
    baton = Baton()
    impl = Implementation(MarkedExperts(experts.forward, baton))
    pipeline_experts._install(experts, impl, baton)
    x = torch.randn(3, 4, requires_grad=True)
    y = experts(x, None, None)
    torch.testing.assert_close(y, torch.nn.functional.linear(x, experts.weight, experts.bias))
    y.sum().backward()
    torch.testing.assert_close(x.grad, experts.weight.sum(0).expand(3, 4))
    assert baton.comm_s > 0  # the marks timed two exchanges each way

    class Swapped(torch.nn.Linear):
        def forward(self, x):
            return 2 * super().forward(x)

    experts.__class__ = Swapped
    assert rebind_engine_forward(experts)
    torch.testing.assert_close(experts(x, None, None), 2 * torch.nn.functional.linear(x, experts.weight, experts.bias))


def one_process(world: int, fp8: bool) -> dict:
    """The reference: the same model, batches and optimizer in one process (no pipeline). fp32 takes the whole batch
    in one forward. FP8 scales its weight-gradient operands per 128 tokens of the forward it is given, so its
    reference accumulates over the pipeline's own micro-batches (each weighted by its share, objective.py's
    num_items_in_batch): the FP8 numbers then differ only by where the pipeline cuts."""
    data = worker.batches()
    out = {}
    runs = [(False, worker.STEPS, 1)] + [(True, worker.FP8_STEPS, worker.micro_batches(world))] * fp8
    for fp8, steps, chunks in runs:
        model = worker.build(fp8, world)
        opt = torch.optim.AdamW(model.parameters(), lr=worker.LR)
        losses, biases, params = [], [], []
        for step in range(steps):
            sums = dict.fromkeys(("loss", "main_loss", "mtp_loss", "balance_loss"), 0.0)
            scored = data[step].shape[0] * (data[step].shape[1] - 1)
            for ids in data[step].chunk(chunks):
                o = model(ids, labels=ids, num_items_in_batch=scored if chunks > 1 else None)
                o.loss.backward()
                share = ids.shape[0] / data[step].shape[0]
                for name, value in (("loss", o.loss), ("main_loss", o.main_loss), ("mtp_loss", share * o.mtp_loss),
                                    ("balance_loss", share * o.balance_loss)):
                    sums[name] += value.item()
            if step == 0:
                parts, grads = sums, {n: p.grad.clone() for n, p in model.named_parameters()}
            opt.step()
            opt.zero_grad()
            losses.append(sums["loss"])
            biases.append({n: b.clone() for n, b in model.named_buffers() if n.endswith("e_score_correction_bias")})
            params.append({n: p.detach().clone() for n, p in model.named_parameters()})
        # biases and parameters after each step
        out[fp8] = dict(parts=parts, grads=grads, losses=losses, biases=biases, params=params)
    return out


@pytest.fixture(scope="module", params=sorted(LAUNCHES))
def launch(request, tmp_path_factory):
    world = request.param
    out = tmp_path_factory.mktemp(f"pipeline{world}")
    cmd = [str(TORCHRUN), "--nproc_per_node", str(world), "--master_addr", "127.0.0.1", "--master_port",
           str(free_port()), str(WORKER), str(out), *LAUNCHES[world]]
    proc = subprocess.Popen(cmd, cwd=REPO, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    reference = one_process(world, fp8=any("fp8" in layout for layout in LAUNCHES[world]))  # while the ranks run
    finish(proc, out)
    ranks = {layout: [torch.load(out / layout / f"rank{r}.pt") for r in range(world)]
             for layout in LAUNCHES[world] if layout not in ("errors", "resume", "resume+zero1")}
    errors = json.loads((out / "errors.json").read_text()) if (out / "errors.json").exists() else None
    return world, ranks, reference, errors, out


@needs_torchrun
def test_every_schedule_equals_one_process(launch):
    world, ranks, reference, _, out = launch
    for layout, records in ranks.items():
        ref = reference["fp8" in layout]
        for part, value in ref["parts"].items():
            assert all(abs(r["parts"][part] - value) < ATOL for r in records), (layout, part, value,
                                                                                 [r["parts"][part] for r in records])
        # Every parameter is held by some rank (a replica under dp): its gradient equals one process's.
        held = {}
        for r in records:
            held.update(r["grads"])
            assert set(r["grads"]) <= set(r["params"])
        assert set(held) == set(ref["grads"]), (layout, set(ref["grads"]) ^ set(held))
        for name, grad in ref["grads"].items():
            for r in records:
                if name in r["grads"]:
                    # Expert parallel: a rank holds its ep slice of the experts (ep = the dp replicas).
                    want = grad.chunk(r["ep"], dim=0)[r["ep_rank"]] if name in r["experts"] else grad
                    torch.testing.assert_close(r["grads"][name], want, atol=ATOL, rtol=0, msg=f"{layout} {name}")
        if "+ep" in layout:  # every rank's routed experts are split, and those are the only parameters that are
            assert all(r["experts"] and all(".mlp.experts." in n for n in r["experts"]) for r in records), layout
            full, start = torch.load(out / layout / "full_state.pt"), worker.build(False, world).state_dict()
            assert set(full) == set(start), set(full) ^ set(start)
            for name, value in start.items():
                assert torch.equal(full[name], value), f"{layout}: gathered {name} differs from the model's"
        if "+overlap" in layout:  # the overlap ran, and some of the exchanges waited under the other thread's compute
            for r in records:
                assert r["overlapped_actions"] > 0, layout
                hidden = sum(s["comm_s"] - s["exposed_s"] for s in r["all_to_all"])
                assert 0 < hidden <= sum(s["comm_s"] for s in r["all_to_all"]), (layout, r["all_to_all"])
        elif "+ep" in layout:  # in turn: every exchange is exposed
            assert all(s["comm_s"] > 0 and s["exposed_s"] == s["comm_s"] for r in records for s in r["all_to_all"])
        norm = torch.stack([g.pow(2).sum() for g in ref["grads"].values()]).sum().sqrt().item()
        for r in records:
            assert abs(r["grad_norm"] - norm) <= 1e-5 * norm, (layout, "clip_grad_norm_", r["grad_norm"], norm)
            scales = [s for n, s in r["clip_scale"].items() if r["grads"][n].norm() > 0]
            assert scales and all(abs(s - 0.5) < 1e-4 for s in scales), (layout, "clipped to half", r["clip_scale"])
            steps = len(r["losses"])
            assert steps == int(layout.partition("@")[2] or len(ref["losses"]))
            torch.testing.assert_close(torch.tensor(r["losses"]), torch.tensor(ref["losses"][:steps]), atol=1e-4,
                                       rtol=0, msg=f"{layout} loss curve")
            for name, bias in r["biases"].items():
                torch.testing.assert_close(bias, ref["biases"][steps - 1][name], atol=1e-6, rtol=0,
                                           msg=f"{layout} {name}")
        assert set().union(*(r["biases"] for r in records)) == set(ref["biases"][-1])
        if "+zero1" in layout:
            check_zero1(layout, records, ranks.get(layout.replace("+zero1", "")), ref)
    start = worker.build(False, world)
    moved = [n for n, b in reference[False]["biases"][0].items() if not torch.equal(b, start.get_buffer(n))]
    assert moved, "the balancing biases did not move at the first step: the test would not see a wrong update"


def check_zero1(layout: str, records: list[dict], unsharded: list[dict] | None, ref: dict) -> None:
    """ZeRO-1 (trainers/pipeline_zero.py): after the steps every rank's parameters equal one process's and, where the
    launch has the same layout without ZeRO-1, are bit-identical to it. The AdamW moments (2 elements a parameter)
    split over the holders of each parameter: a pipeline rank's replicas hold together exactly one copy of each of
    its replicated parameters' and of each expert shard's, each rank a part (about 1 / dp of the replicated ones, 1 /
    (dp / ep) of its expert shard's)."""
    steps = len(records[0]["losses"])
    # AdamW divides by the root of the second moment: where a gradient is near zero, rounding-level differences of the
    # gradient move a parameter by up to lr a step. Measured: 1.3e-4 after 6 steps at lr 1e-3, with or without ZeRO-1.
    tolerance = 0.1 * steps * worker.LR
    for i, r in enumerate(records):
        for name, value in r["final"].items():
            want = ref["params"][steps - 1][name]
            want = want.chunk(r["ep"], dim=0)[r["ep_rank"]] if name in r["experts"] else want
            torch.testing.assert_close(value, want, atol=tolerance, rtol=0,
                                       msg=f"{layout} {name} after {steps} steps")
            if unsharded is not None:
                assert torch.equal(value, unsharded[i]["final"][name]), f"{layout} {name}: differs from plain AdamW"
        if unsharded is not None:
            assert unsharded[i]["optimizer_numel"] == 2 * sum(v.numel() for v in r["final"].values())
    by_pp = {}
    for r in records:
        by_pp.setdefault(tuple(sorted(r["params"])), []).append(r)
    for replicas in by_pp.values():
        assert len(replicas) == records[0]["dp"], (layout, len(replicas))
        replicated = sum(v.numel() for n, v in replicas[0]["final"].items() if n not in replicas[0]["experts"])
        shards = {r["ep_rank"]: sum(r["final"][n].numel() for n in r["experts"]) for r in replicas}
        assert len(shards) == records[0]["ep"]
        assert sum(r["optimizer_numel"] for r in replicas) == 2 * (replicated + sum(shards.values())), layout
        for r in replicas:  # every holder of a parameter ends with the same bits (the owner's update, broadcast)
            for name, value in r["final"].items():
                holder = next(q for q in replicas if name not in r["experts"] or q["ep_rank"] == r["ep_rank"])
                assert torch.equal(value, holder["final"][name]), (layout, name)
            whole = 2 * sum(v.numel() for v in r["final"].values())
            assert 0.1 < r["optimizer_numel"] / whole < 0.7, (layout, r["optimizer_numel"], whole)


@needs_torchrun
@pytest.mark.parametrize("launch", [2], indirect=True)  # the 2-rank launch checks them
def test_pipeline_errors_are_named(launch):
    _, _, _, errors, _ = launch
    assert "needs at least 4 micro-batches, got 2" in errors["too_few_microbatches"]
    assert "does not split into 4 micro-batches" in errors["batch_not_divisible"]
    assert "cannot do through a compiled module" in errors["compiled_under_dualpipev"]
    assert "cannot split 3 decoder layers into 4 pipeline stages" in errors["more_stages_than_layers"]
    assert "tie_word_embeddings under '1f1b'" in errors["tied_under_loop"]
    assert "schedule '1f1b' has no OVERLAP_F_B actions to overlap" in errors["overlap_without_overlap_actions"]
    assert "it needs expert parallelism" in errors["overlap_without_experts"]
    assert "ep size 3 does not divide the 2 data-parallel replicas" in errors["ep_size_not_dividing"]
    assert "pass expert_parallel=True with it" in errors["ep_size_without_ep"]


def test_zero1_reads_the_local_optimizer_of_zero_redundancy_optimizer():
    """trainers.compat.zero_local_optimizer reads ZeroRedundancyOptimizer's `optim` (torch 2.13), the local optimizer
    whose state is this rank's shard (saved per rank by trainers/pipeline_zero.py): a torch that renames it fails here
    by name, beside the 4-rank runs that check the numbers and the resume."""
    # Read, not imported: torch.distributed.optim scripts its functional optimizers at import (deprecation warnings).
    source = (Path(torch.distributed.__file__).parent / "optim" / "zero_redundancy_optimizer.py").read_text()
    local_optimizer = source[source.index("def _init_local_optimizer("):source.index("def _init_zero_for_overlap(")]
    assert "self.optim: Optimizer = self._optim_constructor(" in local_optimizer
    assert "self.optim.step(" in source[source.index("def _local_step("):source.index("def step(")]


def test_overlap_reads_torch_schedule_internals():
    """trainers.compat's mirrors of torch's FORWARD / FULL_BACKWARD actions (for OVERLAP_F_B) read these privates of
    torch.distributed.pipelining (2.13): the nested function they mirror cannot be called, so a torch that renames
    one fails here by name, beside the 4-rank run that checks the numbers."""
    import inspect

    from torch.distributed.pipelining import schedules
    from torch.distributed.pipelining.stage import _PipelineStageBase

    runtime = schedules._PipelineScheduleRuntime
    assert issubclass(schedules.ScheduleDualPipeV, runtime)
    assert callable(schedules._wait_batch_p2p)
    for name in ("_maybe_compute_loss", "_maybe_get_loss", "register_custom_function"):
        assert callable(getattr(runtime, name)), name
    step = inspect.getsource(runtime._step_microbatches)  # the state the mirrors share with torch's own runner
    for name in ("self.fwd_recv_ops", "self.bwd_recv_ops", "self.backward_counter", "self._n_microbatches",
                 "stage.forward_one_chunk(", "stage.backward_one_chunk(", "set_local_fwd_input",
                 "set_local_bwd_input", "get_local_bwd_output", "_PipelineContext(", "sub_actions"):
        assert name in step, name
    assert {"schedule_ref", "arg_mbs", "kwarg_mbs", "target_mbs"} <= set(inspect.signature(
        schedules._PipelineContext).parameters)
    assert {"stage_index", "computation_type", "microbatch_index", "sub_actions"} <= set(schedules._Action._fields)
    for name in ("forward_one_chunk", "backward_one_chunk", "set_local_fwd_input", "set_local_bwd_input"):
        assert callable(getattr(_PipelineStageBase, name)), name
    assert "save_forward_output" in inspect.signature(_PipelineStageBase.forward_one_chunk).parameters


@needs_torchrun
def test_checkpoints_resume_bit_exact_and_load_in_one_process(launch):
    """2 ranks: pp 2; 4 ranks: pp 2 x ep 2 under ZeRO-1, each rank's checkpoint file holding its own optimizer shard
    (the replicated parameters' half, and its expert shard's state whole)."""
    world, _, _, _, out = launch
    folder = out / ("resume" if world == 2 else "resume+zero1")
    history = torch.load(folder / "history.pt")
    assert [h for h in history["resumed"]] == [h for h in history["straight"] if h["step"] > 2]
    assert (folder / "cut" / "checkpoint-2").is_dir() and (folder / "cut" / "checkpoint-4").is_dir()
    if world == 4:  # mesh (ep, pp): ranks p and p + 2 are pipeline rank p's replicas, each saving half its state
        saved = [torch.load(folder / "cut" / "checkpoint-2" / f"rank{r}.pt")["optimizer"] for r in range(world)]
        files = [parts["parts"][0] for parts in saved]  # the ZeroRedundancyOptimizer's; [1]: the experts' AdamW
        assert all(len(parts["parts"]) == 2 and parts["parts"][1]["state"] for parts in saved)
        for p in range(2):
            shards = [set(files[p + 2 * d]["state"]) for d in range(2)]
            indices = {i for group in files[p]["param_groups"] for i in group["params"]}
            assert shards[0] and shards[1] and not shards[0] & shards[1] and shards[0] | shards[1] == indices
    straight = DeepseekForCausalLM.from_pretrained(folder / "straight_final")
    resumed = DeepseekForCausalLM.from_pretrained(folder / "resumed_final")
    trained = 0
    start = worker.build(False, world).state_dict()
    for name, value in straight.state_dict().items():
        assert torch.equal(value, resumed.state_dict()[name]), name
        trained += not torch.equal(value, start[name])
    assert trained > 0
    ids = worker.batches(1)[0]
    assert torch.isfinite(straight(ids, labels=ids).loss)

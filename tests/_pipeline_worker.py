"""Worker for tests/test_pipeline.py: pipeline-parallel training (trainers/pipeline.py) on CPU ranks (gloo); one
torchrun launch runs every layout named.

    torchrun --nproc_per_node P tests/_pipeline_worker.py OUT LAYOUT [LAYOUT ...]

A layout is `{schedule}` (pp over the whole world), `{schedule}+dp` (pp = world / 2 with 2 data-parallel replicas),
`{schedule}+ep` (as +dp, the 2 replicas also splitting the routed experts: pipeline x expert parallel),
`{schedule}+ep+overlap` (as +ep, OVERLAP_F_B run overlapped: trainers/pipeline_overlap.py),
`{schedule}+dp+zero1` (as +dp, the AdamW state sharded over the 2 replicas: trainers/pipeline_zero.py),
`{schedule}+ep+rep+zero1` (pp = world / 4, 4 replicas, experts split over ep 2 inside them: each expert shard on 2
replicas, V3's EP64 inside DP128 scaled down; ZeRO-1 over the 4 replicas and the experts' over their 2) or
`{schedule}+fp8` (FP8 block-wise training, FP8_STEPS steps;
`...@N` trains N steps instead of STEPS: the custom autograd functions of the Linears and the
grouped experts under the schedule's I / W split). Every layout builds the same tiny model (conftest.tiny_model,
seed 0) and trains STEPS AdamW steps on the global batch, recording the first step's loss parts and this rank's
gradients by parameter name,
the loss of every step, this rank's parameters, balancing biases and optimizer state size at the end. Each rank writes
OUT/{layout}/rank{r}.pt; the test compares them with one process on the same batches.
"""

from __future__ import annotations

import os
import sys
import traceback
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE), str(HERE.parent)]  # conftest's helpers; the repository root

import torch  # noqa: E402

STEPS, FP8_STEPS, GLOBAL_BATCH, SEQ, LR = 20, 3, 8, 8, 1e-3
CONFIG = dict(seq_balance_alpha=0.05, bias_update_speed=0.01)


def layers(world: int) -> int:
    return 2 * world  # one decoder layer per stage under the two-stages-per-rank schedules


def micro_batches(world: int) -> int:
    return 2 * world  # the least DualPipeV takes: one per stage


def batches(steps: int = STEPS) -> torch.Tensor:
    from conftest import random_ids

    return random_ids(steps * GLOBAL_BATCH, SEQ, seed=5).view(steps, GLOBAL_BATCH, SEQ)


def build(fp8: bool, world: int):
    from conftest import tiny_model

    model = tiny_model(seed=0, train=True, num_hidden_layers=layers(world), **CONFIG)
    if fp8:
        from quant.fp8_training import convert_to_fp8_training

        convert_to_fp8_training(model)
    return model


def run_layout(layout: str, out: Path) -> None:
    import torch.distributed as dist

    from trainers.pipeline import PipelineRunner, pipeline_mesh
    from trainers.pipeline_zero import optimizer_state_numel, pipeline_optimizer

    layout_steps, _, n = layout.partition("@")  # `layout@N`: N steps instead of STEPS
    schedule, *extras = layout_steps.split("+")
    fp8, ep, overlap, zero1 = "fp8" in extras, "ep" in extras, "overlap" in extras, "zero1" in extras
    steps = int(n) if n else FP8_STEPS if fp8 else STEPS
    world, rank = dist.get_world_size(), dist.get_rank()
    # +zero1 comes with +dp or +ep; +rep: 4 replicas of a 1-rank pipeline, experts split 2 ways (each on 2 replicas)
    dp = 4 if "rep" in extras else 2 if ep or "dp" in extras else 1
    mesh = pipeline_mesh(world // dp, expert_parallel=ep, ep_size=2 if "rep" in extras else None)
    data = batches()
    share = GLOBAL_BATCH // dp
    model = build(fp8, world)
    runner = PipelineRunner(model, schedule, micro_batches(world) // dp, mesh, overlap_f_b=overlap)
    dp_rank = dist.get_rank(runner.dp_group)

    def local(batch):
        return batch[dp_rank * share:(dp_rank + 1) * share]

    if ep:  # the ep shards gather into the whole model (what save_final writes), in expert order
        from trainers.pipeline_training import PipelineTrainer, PipelineTrainingArguments

        args = PipelineTrainingArguments(output_dir=str(out / layout), max_steps=1, batch_size=share)
        full = PipelineTrainer(runner, args, data[0]).full_state_dict()
        if rank == 0:
            (out / layout).mkdir(parents=True, exist_ok=True)
            torch.save(full, out / layout / "full_state.pt")
    opt = pipeline_optimizer(runner, zero1, lr=LR)
    record = {"params": sorted(n for n, _ in model.named_parameters()), "losses": [], "dp_rank": dp_rank,
              "dp": dp, "ep": mesh.size(mesh.mesh_dim_names.index("ep")) if ep else 1, "ep_rank": runner.ep_rank,
              "experts": sorted(n for n, p in model.named_parameters()
                                          if any(p is q for q in runner.expert_params))}
    for step in range(steps):
        parts = runner.train_step(local(data[step]), labels_BT=local(data[step]))
        if step == 0:
            record["parts"] = {k: v.item() for k, v in parts.items()}
            record["grads"] = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
            record["grad_norm"] = runner.clip_grad_norm_(1e9).item()  # the whole model's norm; 1e9: no clipping
            runner.clip_grad_norm_(record["grad_norm"] / 2)  # clipped to half: every gradient scales alike
            record["clip_scale"] = {n: (p.grad.norm() / record["grads"][n].norm()).item()
                                    for n, p in model.named_parameters() if p.grad is not None}
            for n, p in model.named_parameters():  # the run goes on unclipped
                if p.grad is not None:
                    p.grad.copy_(record["grads"][n])
        opt.step()
        opt.zero_grad()
        record["losses"].append(parts["loss"].item())
        if ep:  # this rank's all_to_all time, and how much of it ran under the other direction's compute
            record.setdefault("all_to_all", []).append(runner.all_to_all_seconds())
    if overlap:
        record["overlapped_actions"] = runner.overlapped_actions
    record["biases"] = {n: b.clone() for n, b in model.named_buffers() if n.endswith("e_score_correction_bias")}
    record["final"] = {n: p.detach().clone() for n, p in model.named_parameters()}
    record["optimizer_numel"] = optimizer_state_numel(opt)
    (out / layout).mkdir(parents=True, exist_ok=True)
    torch.save(record, out / layout / f"rank{rank}.pt")


def check_errors(out: Path) -> None:
    """The named errors, each caught before any collective (so every rank raises alike)."""
    import json

    import torch.distributed as dist

    from conftest import tiny_model
    from trainers.pipeline import PipelineRunner, pipeline_mesh

    mesh, world = pipeline_mesh(dist.get_world_size()), dist.get_world_size()
    attempts = {
        "too_few_microbatches": lambda: PipelineRunner(build(False, world), "dualpipev", 2, mesh),
        "batch_not_divisible": lambda: PipelineRunner(build(False, world), "gpipe", 4, mesh).train_step(
            batches(1)[0, :6], labels_BT=batches(1)[0, :6]),
        "compiled_under_dualpipev": lambda: PipelineRunner(compiled_model(world), "dualpipev", 4, mesh),
        "more_stages_than_layers": lambda: PipelineRunner(tiny_model(num_hidden_layers=3), "zbv", 4, mesh),
        "tied_under_loop": lambda: PipelineRunner(tiny_model(tie_word_embeddings=True), "1f1b", 4, mesh),
        "overlap_without_overlap_actions": lambda: PipelineRunner(build(False, world), "1f1b", 4, mesh,
                                                                  overlap_f_b=True),
        "overlap_without_experts": lambda: PipelineRunner(build(False, world), "dualpipev", 4, mesh, overlap_f_b=True),
        "ep_size_not_dividing": lambda: pipeline_mesh(1, expert_parallel=True, ep_size=3),
        "ep_size_without_ep": lambda: pipeline_mesh(1, ep_size=1),
    }
    messages = {}
    for name, attempt in attempts.items():
        try:
            attempt()
        except ValueError as e:
            messages[name] = str(e)
        else:
            messages[name] = "no error"
    if dist.get_rank() == 0:
        (out / "errors.json").write_text(json.dumps(messages, indent=1))


def check_resume(out: Path, zero1: bool = False) -> None:
    """PipelineTrainer: 4 steps straight through vs 2 steps, a checkpoint, and a fresh process state resuming it; both
    save a final checkpoint that the test loads in one process. `zero1` (layout `resume+zero1`, 4 ranks): pp 2 x ep 2,
    the replicated parameters' AdamW state sharded over the replicas, the expert shards' stepped where they live
    (trainers.pipeline_zero.ShardedOptimizer), each rank saving its own."""
    import torch.distributed as dist

    from modeling_deepseek import DeepseekForCausalLM
    from trainers.pipeline import PipelineRunner, pipeline_mesh
    from trainers.pipeline_training import PipelineTrainer, PipelineTrainingArguments

    world = dist.get_world_size()
    dp = 2 if zero1 else 1
    mesh, folder = pipeline_mesh(world // dp, expert_parallel=zero1), out / ("resume+zero1" if zero1 else "resume")
    data = batches(2).reshape(-1, SEQ)

    def trainer(folder: Path, max_steps: int) -> PipelineTrainer:
        args = PipelineTrainingArguments(output_dir=str(folder), max_steps=max_steps, batch_size=4, warmup_steps=1,
                                         save_steps=2, eval_steps=2, logging_steps=100, zero1=zero1)
        return PipelineTrainer(PipelineRunner(build(False, world), "dualpipev", 2 * world // dp, mesh), args, data,
                               data[:4 * dp], log=lambda *a, **k: None)

    straight = trainer(folder / "straight", 4)
    straight.train()
    straight.save_final(folder / "straight_final", DeepseekForCausalLM)
    trainer(folder / "cut", 4).train(until_step=2)  # stops after the step-2 checkpoint
    resumed = trainer(folder / "cut", 4)
    resumed.train(resume=True)
    resumed.save_final(folder / "resumed_final", DeepseekForCausalLM)
    if dist.get_rank() == 0:
        torch.save({"straight": straight.history, "resumed": resumed.history}, folder / "history.pt")


def compiled_model(world: int):
    model = build(False, world)
    model.model.layers[1].compile()
    return model


def main() -> None:
    import torch.distributed as dist

    out, layouts = Path(sys.argv[1]), sys.argv[2:]
    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    try:
        for layout in layouts:
            checks = {"errors": check_errors, "resume": check_resume,
                      "resume+zero1": lambda o: check_resume(o, zero1=True)}
            checks.get(layout, lambda o: run_layout(layout, o))(out)
            dist.barrier()
    except Exception:
        (out / f"rank{dist.get_rank()}.error.txt").write_text(traceback.format_exc())
        raise
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    main()

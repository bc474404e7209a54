"""Worker for tests/test_parallel_training.py: Trainer (ours or transformers' plain one) on the tiny model loaded through
transformers' distributed engine, on 2 CPU ranks; one torchrun launch runs every layout named.

    torchrun --nproc_per_node 2 tests/_parallel_train_worker.py OUT CKPT LAYOUT [LAYOUT ...]
    python tests/_parallel_train_worker.py OUT CKPT single           (the one-process reference)

A layout is `{trainer}-{parallelism}` with trainer `deepseek` (DeepseekTrainer) or `plain` (transformers' Trainer) and
parallelism tp / ep / tp_ep / fsdp / fsdp_ep (DistributedConfig as in tests/_parallel_worker.py), optionally with
`+fp8` (FP8 block-wise training, quant/) or `+resume` (train STEPS with a checkpoint at STEPS / 2, then resume a fresh
Trainer from it and train to STEPS). Every layout trains STEPS optimizer steps at a global batch of GLOBAL_BATCH
sequences and writes, per rank, OUT/{layout}/rank{r}.json: the logged loss per step, the balancing biases after
training, the token counts each bias update saw before and after its all-reduce, and the logits of a fixed batch after
training; rank 0 saves the trained model to OUT/{layout}/final for a one-process load.
"""

from __future__ import annotations

import json
import os
import sys
import traceback
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE), str(HERE.parent)]  # conftest's helpers; the repository root

import torch  # noqa: E402

STEPS, GLOBAL_BATCH, SEQ, LR = 20, 4, 16, 1e-3


def distributed_config(parallelism: str):
    from transformers.distributed import DistributedConfig

    return {
        "tp": DistributedConfig(tp_size=2),
        "ep": DistributedConfig(tp_size=2, tp_plan={}, ep_size=2),
        "tp_ep": DistributedConfig(tp_size=2, ep_size=2),
        "fsdp": DistributedConfig(fsdp_size=2),
        "fsdp_ep": DistributedConfig(fsdp_size=2, ep_size=2),
    }[parallelism]


def dataset():
    from datasets import Dataset

    from conftest import random_ids

    ids = random_ids(STEPS * GLOBAL_BATCH, SEQ, seed=11).tolist()
    return Dataset.from_dict({"input_ids": ids, "labels": ids})


def make_trainer(kind: str, model, out_dir: Path, dp_size: int, fp8: bool, save_steps: int | None):
    from transformers import Trainer, TrainingArguments

    from trainers import DeepseekTrainer

    args = TrainingArguments(
        output_dir=str(out_dir), max_steps=STEPS, per_device_train_batch_size=GLOBAL_BATCH // dp_size,
        learning_rate=LR, lr_scheduler_type="constant", warmup_steps=0, weight_decay=0.0, logging_steps=1,
        save_strategy="steps" if save_steps else "no", save_steps=save_steps or 500, report_to=[], use_cpu=True,
        disable_tqdm=True, seed=0, data_seed=0, dataloader_num_workers=0, dataloader_drop_last=True,
    )
    cls = DeepseekTrainer if kind == "deepseek" else Trainer
    trainer = cls(model=model, args=args, train_dataset=dataset())
    if fp8:
        from quant.fp8_training import convert_to_fp8_training

        convert_to_fp8_training(model)
    return trainer


SEEN = {"local": [], "reduced": []}


def record_bias_updates():
    """Wrap the balancing update (once per process) to record each router's token count before and after the
    all-reduce into SEEN."""
    from modeling_deepseek import balancing

    seen = SEEN
    update, all_reduce = balancing.update_balancing_bias, balancing.dist.all_reduce

    def recording_all_reduce(tensor, *args, **kwargs):
        work = all_reduce(tensor, *args, **kwargs)
        seen["reduced"].append(tensor.sum(dim=-1).tolist())
        return work

    def counting_update(model):
        seen["local"].append([float(r.pending_load.sum()) for r in balancing.balancing_routers(model)])
        balancing.dist.all_reduce = recording_all_reduce
        try:
            return update(model)
        finally:
            balancing.dist.all_reduce = all_reduce

    balancing.update_balancing_bias = counting_update
    return seen


def losses(trainer) -> list[float]:
    return [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]


def run_layout(layout: str, ckpt: str, out: Path) -> dict:
    from conftest import random_ids
    from modeling_deepseek import DeepseekForCausalLM, balancing

    kind, _, rest = layout.partition("-")
    parallelism, *flags = rest.split("+") if rest else ["single"]
    single = parallelism == "single"
    cfg = None if single else distributed_config(parallelism)
    dp_size = 1 if single else cfg.dp_size
    out.mkdir(parents=True, exist_ok=True)
    SEEN["local"], SEEN["reduced"] = [], []

    def load():
        return DeepseekForCausalLM.from_pretrained(ckpt, distributed_config=cfg) if cfg else \
            DeepseekForCausalLM.from_pretrained(ckpt)

    fp8 = "fp8" in flags
    rec = {"layout": layout}
    if "resume" in flags:
        trainer = make_trainer(kind, load(), out / "run", dp_size, fp8, save_steps=STEPS // 2)
        trainer.train()
        rec["uninterrupted_losses"] = losses(trainer)
        uninterrupted = trainer.model
        resumed = make_trainer(kind, load(), out / "run", dp_size, fp8, save_steps=STEPS // 2)
        resumed.train(resume_from_checkpoint=str(out / "run" / f"checkpoint-{STEPS // 2}"))
        rec["resumed_losses"] = losses(resumed)
        params_a = dict(uninterrupted.named_parameters())
        rec["resume_param_max_diff"] = max(
            (p.detach().full_tensor() if hasattr(p, "full_tensor") else p.detach()).sub(
                params_a[n].detach().full_tensor() if hasattr(params_a[n], "full_tensor") else params_a[n].detach()
            ).abs().max().item() for n, p in resumed.model.named_parameters())
        trainer = resumed
    else:
        trainer = make_trainer(kind, load(), out / "run", dp_size, fp8, save_steps=None)
        trainer.train()
    model = trainer.model
    rec["losses"] = losses(trainer)
    rec["biases"] = [r.e_score_correction_bias.tolist() for r in balancing.balancing_routers(model)]
    rec["local_counts"], rec["reduced_counts"] = SEEN["local"], SEEN["reduced"]
    model.eval()
    with torch.no_grad():
        logits = model(random_ids(2, SEQ, seed=12)).logits
    rec["final_logits"] = logits.tolist()
    trainer.save_model(str(out / "final"))
    return rec


def main(out: Path, ckpt: str, layouts: list[str]) -> None:
    import transformers

    torch.set_num_threads(1)
    torch.use_deterministic_algorithms(True)
    transformers.logging.set_verbosity_error()
    rank = int(os.environ.get("RANK", 0))
    record_bias_updates()
    for layout in layouts:
        rec = run_layout(layout, ckpt, out / layout)
        (out / layout / f"rank{rank}.json").write_text(json.dumps(rec))


if __name__ == "__main__":
    out_dir = Path(sys.argv[1])
    out_dir.mkdir(parents=True, exist_ok=True)
    try:
        main(out_dir, sys.argv[2], sys.argv[3:])
    except Exception:
        (out_dir / f"rank{os.environ.get('RANK', 0)}.error.txt").write_text(traceback.format_exc())
        raise

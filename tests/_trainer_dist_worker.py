"""Worker for tests/test_trainer.py::test_two_ranks_log_means_over_both: DeepseekTrainer on 2 CPU ranks
(torchrun + gloo, ACCELERATE_USE_CPU=yes) evaluates the tiny model, trains 2 steps, and writes each rank's
log history to OUT/rank<r>.json.

    ACCELERATE_USE_CPU=yes torchrun --nproc_per_node 2 tests/_trainer_dist_worker.py OUT
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE), str(HERE.parent)]  # conftest's helpers; the repository root

EVAL_SAMPLES, SEQ = 4, 16


def main(out: Path) -> None:
    import torch
    from datasets import Dataset
    from transformers import TrainingArguments

    from conftest import random_ids, tiny_model
    from trainers import DeepseekTrainer

    def dataset(n, seed):
        ids = random_ids(n, SEQ, seed=seed).tolist()
        return Dataset.from_dict({"input_ids": ids, "labels": ids})

    torch.set_num_threads(1)
    args = TrainingArguments(output_dir=str(out), max_steps=2, per_device_train_batch_size=2,
                             per_device_eval_batch_size=1, logging_steps=1, save_strategy="no", report_to=[],
                             use_cpu=True, disable_tqdm=True, seed=0, data_seed=0, dataloader_num_workers=0)
    trainer = DeepseekTrainer(model=tiny_model(seed=0, train=True), args=args, train_dataset=dataset(8, seed=1),
                              eval_dataset=dataset(EVAL_SAMPLES, seed=7))
    trainer.evaluate()  # the initial weights: the test recomputes this evaluation in one process
    eval_history = list(trainer.state.log_history)  # train() starts a new TrainerState
    trainer.train()
    rank = trainer.args.process_index
    (out / f"rank{rank}.json").write_text(json.dumps({"world": trainer.args.world_size,
                                                      "log_history": eval_history + trainer.state.log_history}))
    # Trainer started the process group; ending it joins gloo's threads before the interpreter tears down (left to
    # exit, a rank can abort with "terminate called without an active exception" after its work is done).
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main(Path(sys.argv[1]))
    # Every result is written. With accelerate 1.16 a rank has been seen to abort in C++ teardown at interpreter exit
    # ("terminate called without an active exception", under a loaded full-suite run only): leave without it.
    sys.stdout.flush(), sys.stderr.flush()
    os._exit(0)

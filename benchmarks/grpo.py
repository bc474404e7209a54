"""GRPO step time: trainers.GRPOTrainer vs trl.GRPOTrainer, side by side in one run, on the same weights and data.

    python -m benchmarks.grpo --json-out benchmarks/results/grpo_cpu_fp32.json

Three runs of the same GRPO configuration, each in a fresh process:

    peer         trl.GRPOTrainer     + transformers' DeepseekV3ForCausalLM
    trl+ours     trl.GRPOTrainer     + modeling_deepseek.DeepseekForCausalLM   (the model's own generate)
    ours         trainers.GRPOTrainer + modeling_deepseek.DeepseekForCausalLM   (the package's rollout path)

Both models load one random checkpoint in transformers' DeepseekV3 format (benchmarks.common.make_checkpoint, the
reference shape). Prompts are random words of a word-level tokenizer built in code whose vocabulary is the model's;
every completion is generated to full length (min_new_tokens = max_completion_length), so the three runs do the
same work token for token. Timed: the wall time of each optimizer step (after warm-up steps) and, inside it, the
time spent in the model's generate (the rollout); the rest is scoring, the old-policy / loss forwards, backward
and the optimizer. Ratios are peer time / ours.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks import common  # noqa: E402
from benchmarks.common import REFERENCE_SHAPE  # noqa: E402

VARIANTS = ("peer", "trl+ours", "ours")


def word_tokenizer(vocab_size: int):
    """Words w0 .. w{V-1}, one token each, split on spaces; ids 0, 1, 2 are pad, bos, eos."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = ["<pad>", "<bos>", "<eos>"] + [f"w{i}" for i in range(3, vocab_size)]
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<pad>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", bos_token="<bos>", eos_token="<eos>")


def worker(spec: dict) -> None:
    import random

    import torch

    torch.set_num_threads(spec["threads"])
    common.quiet()
    import trl
    from datasets import Dataset
    from transformers import TrainerCallback

    import trainers.grpo as ours_grpo

    tokenizer = word_tokenizer(spec["vocab_size"])
    rng = random.Random(0)
    prompts = [" ".join(f"w{rng.randrange(3, spec['vocab_size'])}" for _ in range(spec["prompt_len"]))
               for _ in range(64)]
    data = Dataset.from_list([{"prompt": p} for p in prompts])
    if spec["variant"] == "peer":
        model = common.load_peer(spec["checkpoint"], torch.float32, "cpu")
    else:
        model = common.load_ours(spec["checkpoint"], torch.float32, "cpu")
    model.train()
    trainer_cls, config_cls = ((ours_grpo.GRPOTrainer, ours_grpo.GRPOConfig) if spec["variant"] == "ours"
                               else (trl.GRPOTrainer, trl.GRPOConfig))
    steps = spec["warmup"] + spec["steps"]
    args = config_cls(
        output_dir=spec["out"] + ".trainer", max_steps=steps, learning_rate=1e-5, logging_steps=1,
        per_device_train_batch_size=spec["batch"], num_generations=spec["num_generations"],
        max_completion_length=spec["new_tokens"], generation_kwargs={"min_new_tokens": spec["new_tokens"]},
        save_strategy="no", report_to=[], bf16=False, gradient_checkpointing=False, use_cpu=True, seed=0,
        disable_tqdm=True, dataloader_num_workers=0,
    )

    def length_reward(completions, **kwargs):
        return [float(len(c)) for c in completions]

    gen_seconds = []
    original_generate = model.generate

    def timed_generate(*a, **k):
        start = time.perf_counter()
        out = original_generate(*a, **k)
        gen_seconds.append(time.perf_counter() - start)
        return out

    model.generate = timed_generate

    class StepClock(TrainerCallback):
        def __init__(self):
            self.times = []

        def on_step_begin(self, *a, **k):
            self._start = time.perf_counter()

        def on_step_end(self, *a, **k):
            self.times.append(time.perf_counter() - self._start)

    clock = StepClock()
    trainer = trainer_cls(model, reward_funcs=length_reward, args=args, train_dataset=data,
                          processing_class=tokenizer, callbacks=[clock])
    trainer.train()
    lengths = [h["completions/mean_length"] for h in trainer.state.log_history if "completions/mean_length" in h]
    w = spec["warmup"]
    common.write_json(spec["out"], {
        "variant": spec["variant"], "step_s": clock.times[w:], "generate_s": gen_seconds[w:],
        "completion_lengths": lengths, "trainer": type(trainer).__module__ + "." + type(trainer).__name__,
        "model": type(model).__name__,
    })


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--prompt-len", type=int, default=256)
    p.add_argument("--new-tokens", type=int, default=256)
    p.add_argument("--batch", type=int, default=8, help="completions per step (prompts x num_generations)")
    p.add_argument("--num-generations", type=int, default=4)
    p.add_argument("--steps", type=int, default=2, help="timed steps per variant")
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--json-out", default=str(common.RESULTS_DIR / "grpo_cpu_fp32.json"))
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker:
        worker(json.loads(args.worker))
        return {}

    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        config = common.make_checkpoint(Path(tmp) / "ckpt")
        for variant in VARIANTS:
            spec = dict(variant=variant, checkpoint=str(Path(tmp) / "ckpt"), out=str(Path(tmp) / f"{variant}.json"),
                        vocab_size=REFERENCE_SHAPE["vocab_size"], prompt_len=args.prompt_len,
                        new_tokens=args.new_tokens, batch=args.batch, num_generations=args.num_generations,
                        steps=args.steps, warmup=args.warmup, threads=args.threads)
            print(f"running {variant} ...", flush=True)
            results[variant] = common.run_worker("benchmarks.grpo", spec, timeout=3600)
    per_step = {v: common.median(r["step_s"]) for v, r in results.items()}
    per_gen = {v: common.median(r["generate_s"]) for v, r in results.items()}
    summary = {
        "command": common.command_line(), "machine": common.machine_info("cpu"), "settings": vars(args),
        "model_config": config, "results": results,
        "median_step_s": per_step, "median_generate_s": per_gen,
        "speedup_step_vs_peer": per_step["peer"] / per_step["ours"],
        "speedup_step_trl_ours_vs_peer": per_step["peer"] / per_step["trl+ours"],
        "speedup_generate_vs_peer": per_gen["peer"] / per_gen["ours"],
        "speedup_generate_trl_ours_vs_peer": per_gen["peer"] / per_gen["trl+ours"],
    }
    common.write_json(args.json_out, summary)
    for v in VARIANTS:
        print(f"{v:9s} step {per_step[v]:.2f} s  generate {per_gen[v]:.2f} s  rest {per_step[v] - per_gen[v]:.2f} s")
    print(f"step speedup vs peer: ours {summary['speedup_step_vs_peer']:.2f}x, trl+ours "
          f"{summary['speedup_step_trl_ours_vs_peer']:.2f}x")
    return summary


if __name__ == "__main__":
    main()

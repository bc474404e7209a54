"""GRPO step time: trainers.GRPOTrainer vs trl.GRPOTrainer, side by side in one run, on the same weights and data.

    python -m benchmarks.grpo --json-out benchmarks/results/grpo_cpu_fp32.json
    python -m benchmarks.grpo --render-only     # rewrite the GRPO section of RESULTS.md from the JSON files

Three runs of the same GRPO configuration, each in a fresh process:

    peer         trl.GRPOTrainer     + transformers' DeepseekV3ForCausalLM
    trl+ours     trl.GRPOTrainer     + modeling_deepseek.DeepseekForCausalLM   (the model's own generate)
    ours         trainers.GRPOTrainer + modeling_deepseek.DeepseekForCausalLM   (the package's rollout path)

Both models load one random checkpoint in transformers' DeepseekV3 format (benchmarks.models.make_checkpoint, the
reference shape). Prompts are random words of a word-level tokenizer built in code whose vocabulary is the model's;
every completion is generated to full length (min_new_tokens = max_completion_length), so the three runs do the
same work token for token. Timed: the wall time of each optimizer step (after warm-up steps) and, inside it, the
time spent in the model's generate (the rollout); the rest is scoring, the old-policy / loss forwards, backward
and the optimizer. Ratios are peer time / ours.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

from benchmarks import harness
from benchmarks.harness import RESULTS_DIR
from benchmarks.measure import median
from benchmarks.models import REFERENCE_SHAPE, load_ours, load_peer, make_checkpoint

VARIANTS = ("peer", "trl+ours", "ours")


def word_tokenizer(vocab_size: int):
    """Words w0 .. w{V-1}, one token each, split on spaces; ids 0, 1, 2 are pad, bos, eos."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = ["<pad>", "<bos>", "<eos>"] + [f"w{i}" for i in range(3, vocab_size)]
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<pad>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", bos_token="<bos>", eos_token="<eos>")


def worker(spec: dict) -> dict:
    import random

    import torch

    harness.setup(threads=spec["threads"])
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
        model = load_peer(spec["checkpoint"], torch.float32, "cpu")
    else:
        model = load_ours(spec["checkpoint"], torch.float32, "cpu")
    model.train()
    trainer_cls, config_cls = ((ours_grpo.GRPOTrainer, ours_grpo.GRPOConfig) if spec["variant"] == "ours"
                               else (trl.GRPOTrainer, trl.GRPOConfig))
    steps = spec["warmup"] + spec["steps"]
    # Full-length completions: min_new_tokens, or for continuous-batching rollouts (whose engine cannot apply
    # min_new_tokens) no EOS at all. Either way every completion has max_completion_length tokens.
    cb = bool(spec.get("continuous_batching"))
    full_length = {"eos_token_id": -1} if cb else {"min_new_tokens": spec["new_tokens"]}
    args = config_cls(
        output_dir=spec["output_dir"], max_steps=steps, learning_rate=1e-5, logging_steps=1,
        per_device_train_batch_size=spec["batch"], num_generations=spec["num_generations"],
        max_completion_length=spec["new_tokens"], generation_kwargs=full_length,
        use_transformers_continuous_batching=cb,
        save_strategy="no", report_to=[], bf16=False, activation_checkpointing=False, use_cpu=True, seed=0,
        disable_tqdm=True, dataloader_num_workers=0,
    )

    def length_reward(completions, **kwargs):
        return [float(len(c)) for c in completions]

    gen_seconds = []

    def timed(fn):
        def wrapper(*a, **k):
            start = time.perf_counter()
            out = fn(*a, **k)
            gen_seconds.append(time.perf_counter() - start)
            return out
        return wrapper

    model.generate, model.generate_batch = timed(model.generate), timed(model.generate_batch)

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
    return {
        "variant": spec["variant"], "step_s": clock.times[w:], "generate_s": gen_seconds[w:],
        "completion_lengths": lengths, "trainer": type(trainer).__module__ + "." + type(trainer).__name__,
        "model": type(model).__name__,
    }


LEARNING_JSON = RESULTS_DIR / "grpo_arithmetic_metrics.json"  # examples/grpo_arithmetic.py's metrics.json
LEARNING_PNG = "results/grpo_arithmetic_curves.png"
LEARNING_NOTE = RESULTS_DIR / "grpo_arithmetic_note.md"  # hand-written findings about the learning run
SECTION = "grpo"


def render(bench: dict | None, learning: dict | None) -> str:
    """The GRPO section of RESULTS.md: the learning run of the example, then the step-time comparison."""
    lines = ["## GRPO: learning to reason on CPU, and step time vs trl.GRPOTrainer", ""]
    if learning:
        b, a = learning["before"], learning["after"]
        lines += [
            "### Held-out accuracy before and after GRPO (examples/grpo_arithmetic.py)", "",
            f"Command: `{learning['command']}`  ",
            f"Machine: {learning.get('machine_line', 'see the JSON')}; {learning['seconds'] / 60:.1f} min in total "
            f"(facts pre-training, cold start, GRPO and {len(learning['held_out_curve'])} held-out evaluations), "
            f"torch threads {learning['threads']}.  ",
            "Held-out: "
            f"{learning['args']['held_out']} problems never trained on; pass@1 = mean accuracy over "
            f"{learning['args']['eval_samples']} samples per problem at temperature 0.6 (R1's pass@1 setting; GRPO "
            "samples at 1.0); greedy = one greedy decode.",
            "",
            harness.markdown_table(
                ["", "pass@1 (T=0.6)", "greedy", "format", "worked out (share)", "right when worked out",
                 "completion tokens"],
                [[label, f"{m['sampled_accuracy']:.1%}", f"{m['greedy_accuracy']:.1%}",
                  f"{m['sampled_format']:.1%}", f"{m['sampled_worked_share']:.1%}",
                  f"{m['sampled_worked_accuracy']:.1%}", m["sampled_length"]]
                 for label, m in (("after cold start", b), (f"after {learning['args']['grpo_steps']} GRPO steps", a))]),
            "",
            f"Target: pass@1 <= 30% after the cold start and >= 60% after GRPO; measured "
            f"{b['sampled_accuracy']:.1%} -> {a['sampled_accuracy']:.1%} (**"
            f"{'met' if b['sampled_accuracy'] <= 0.3 and a['sampled_accuracy'] >= 0.6 else 'MISSED'}**).", "",
            *([LEARNING_NOTE.read_text().strip(), ""] if LEARNING_NOTE.exists() else []),
            f"![GRPO curves]({LEARNING_PNG})", "",
            "Example completions (sampled, first held-out problem): before "
            f"`{b['sampled_example'].strip()}`, after `{a['sampled_example'].strip()}`.", "",
        ]
    if bench:
        m = bench["machine"]
        names = {"peer": "trl.GRPOTrainer + transformers' DeepseekV3ForCausalLM",
                 "trl+ours": "trl.GRPOTrainer + DeepseekForCausalLM",
                 "ours": "trainers.GRPOTrainer + DeepseekForCausalLM"}
        rows = []
        for v in VARIANTS:
            step, gen = bench["median_step_s"][v], bench["median_generate_s"][v]
            rows.append([names[v], step, gen, step - gen, f"{bench['median_step_s']['peer'] / step:.2f}x",
                         f"{bench['median_generate_s']['peer'] / gen:.2f}x"])
        st = bench["settings"]
        lines += [
            "### GRPO step time, side by side", "",
            f"Command: `{bench['command']}`  ", f"Machine: {harness.machine_line(m)}  ",
            f"Model: the reference shape (`benchmarks.models.REFERENCE_SHAPE`), random weights in one checkpoint "
            f"loaded by both models; fp32. GRPO: {st['batch']} completions per step ({st['batch'] // st['num_generations']}"
            f" prompts x {st['num_generations']}), prompts of {st['prompt_len']} tokens, completions of "
            f"{st['new_tokens']} tokens (min_new_tokens = max_completion_length, so every run does the same work), "
            f"beta 0, loss dapo; median of {st['steps']} steps after {st['warmup']} warm-up step(s); each variant in "
            f"its own process with {st['threads']} torch thread(s), one after the other, on a machine shared with "
            "other jobs (the load average above).", "",
            harness.markdown_table(["trainer + model", "step s", "rollout (generate) s", "rest s", "step speedup",
                                   "rollout speedup"], rows), "",
            f"Target: ours >= 1.5x the peer per step; measured **{bench['speedup_step_vs_peer']:.2f}x** "
            f"({'met' if bench['speedup_step_vs_peer'] >= 1.5 else 'MISSED'}). trl.GRPOTrainer on our model gets "
            f"{bench['speedup_step_trl_ours_vs_peer']:.2f}x: the gain is the model's rollout, absorbed MLA over the "
            "latent cache where the peer rebuilds every head's keys and values from its cache at every decode step "
            "(rollout speedup column). TRL generates with the policy in training mode under no_grad, and the model "
            "decodes such forwards through absorbed MLA as in eval mode, so plain TRL gets it too; the package's "
            "rollout step adds eval-mode routing (no load counting, no dropout), the sampled tokens' "
            "log-probabilities (a log-softmax over the logits generate returns) and optional MTP speculation. The "
            "rest of the step (old-policy/loss forward, "
            "backward, optimizer) is the same work in all three; its spread is this shared machine's noise.", "",
        ]
    return "\n".join(lines)


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--prompt-len", type=int, default=512)
    p.add_argument("--new-tokens", type=int, default=256)
    p.add_argument("--batch", type=int, default=8, help="completions per step (prompts x num_generations)")
    p.add_argument("--num-generations", type=int, default=4)
    p.add_argument("--steps", type=int, default=2, help="timed steps per variant")
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--threads", type=int, default=1,
                   help="torch threads (1 avoids OpenMP spin contention on a shared host)")
    p.add_argument("--json-out", default=str(RESULTS_DIR / "grpo_cpu_fp32.json"))
    p.add_argument("--render-only", action="store_true",
                   help="rewrite the GRPO section of RESULTS.md from --json-out and the example's metrics")
    args = p.parse_args(argv)
    if args.render_only:
        bench = json.loads(Path(args.json_out).read_text()) if Path(args.json_out).exists() else None
        learning = json.loads(LEARNING_JSON.read_text()) if LEARNING_JSON.exists() else None
        harness.write_section(SECTION, render(bench, learning))
        return {}

    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        config = make_checkpoint(Path(tmp) / "ckpt")
        for variant in VARIANTS:
            spec = dict(variant=variant, checkpoint=str(Path(tmp) / "ckpt"), output_dir=str(Path(tmp) / variant),
                        label=variant,
                        vocab_size=REFERENCE_SHAPE["vocab_size"], prompt_len=args.prompt_len,
                        new_tokens=args.new_tokens, batch=args.batch, num_generations=args.num_generations,
                        steps=args.steps, warmup=args.warmup, threads=args.threads)
            print(f"running {variant} ...", flush=True)
            results[variant] = harness.run_worker(worker, spec, timeout=3600)
    per_step = {v: median(r["step_s"]) for v, r in results.items()}
    per_gen = {v: median(r["generate_s"]) for v, r in results.items()}
    summary = {
        **harness.report_head("grpo"), "settings": vars(args),
        "model_config": config, "results": results,
        "median_step_s": per_step, "median_generate_s": per_gen,
        "speedup_step_vs_peer": per_step["peer"] / per_step["ours"],
        "speedup_step_trl_ours_vs_peer": per_step["peer"] / per_step["trl+ours"],
        "speedup_generate_vs_peer": per_gen["peer"] / per_gen["ours"],
        "speedup_generate_trl_ours_vs_peer": per_gen["peer"] / per_gen["trl+ours"],
    }
    harness.write_json(args.json_out, summary)
    for v in VARIANTS:
        print(f"{v:9s} step {per_step[v]:.2f} s  generate {per_gen[v]:.2f} s  rest {per_step[v] - per_gen[v]:.2f} s")
    print(f"step speedup vs peer: ours {summary['speedup_step_vs_peer']:.2f}x, trl+ours "
          f"{summary['speedup_step_trl_ours_vs_peer']:.2f}x")
    if Path(args.json_out).resolve().parent == RESULTS_DIR.resolve():
        harness.write_section(SECTION, render(summary, json.loads(LEARNING_JSON.read_text()) if LEARNING_JSON.exists() else None))
    return summary


if __name__ == "__main__":
    main()

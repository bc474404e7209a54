#!/usr/bin/env python
"""Pretrain a small DeepSeek-V3-style model (MLA + DeepSeekMoE + MTP) from scratch on CPU.

The default corpus is the Python standard library's own source code, so the job needs no downloads:

    python examples/pretrain.py --config hub_configs/small --output runs/demo

Steps: build the corpus and a byte-level BPE tokenizer (saved to OUTPUT/tokenizer); pack it into fixed-length
blocks; build a DeepseekForCausalLM from the config (vocab = tokenizer size); evaluate; train with
trainers.DeepseekTrainer (transformers' Trainer with the DeepSeek callback); evaluate again; save model + tokenizer +
generation config to OUTPUT/final; reload it through AutoModelForCausalLM and generate code with
pipeline("text-generation"). A loss plot (OUTPUT/loss.png) and the metrics (OUTPUT/metrics.json) are written as well.

Checkpoints go to OUTPUT/trainer every --save-steps steps, written atomically (a killed job never leaves a half
checkpoint); after an interruption, run the same command with --resume to continue where the newest one left off.

Pipeline parallel (DeepSeek-V3's DualPipe, through torch.distributed.pipelining's schedules), under torchrun or
accelerate launch; the world is pp-way pipelines times world / pp data-parallel replicas:

    torchrun --nproc_per_node 4 examples/pretrain.py --config hub_configs/small --output runs/pp \\
        --pp 2 --pp-schedule dualpipev --pp-microbatches 4
    ACCELERATE_USE_CPU=yes accelerate launch --multi_gpu --num_processes 4 examples/pretrain.py ... --pp 2 \\
        --pp-schedule dualpipev                                   (ACCELERATE_USE_CPU=yes: CPU ranks)

--ep makes the data-parallel replicas of each pipeline rank split its routed experts as well (pipeline x expert
parallel on an (ep, pp) mesh, V3's PP x EP layout: trainers/pipeline_experts.py; --ep-size E below the replica count:
each expert shard on replicas / E ranks); with it, --pp-overlap runs
DualPipeV's overlapped forward-backward pairs side by side (trainers/pipeline_overlap.py; CPU ranks). --zero1
shards the AdamW state over the data-parallel replicas of each pipeline rank (ZeRO-1, as V3 trained:
trainers/pipeline_zero.py); each rank's checkpoint file then holds its own shard.
--batch-size is then the sequences per step per replica, split into --pp-microbatches; trainers/pipeline_training.py
runs the loop (progress, eval, checkpoints in OUTPUT/pipeline, --resume) and rank 0 saves OUTPUT/final, an ordinary
checkpoint that loads in one process.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from collections import defaultdict
from pathlib import Path

# Make the repository importable when the script is run from a checkout without `pip install -e .`.
REPO_ROOT = Path(__file__).resolve().parent.parent
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from transformers import TrainerCallback  # noqa: E402

# Defaults sized for the `small` config on 2 CPU cores: about 0.6 s per step of 8 x 256 tokens on an idle machine,
# so 600 steps and the evals, checkpoints, save, reload and generation take about 7 minutes (measured 6 min 35 s;
# eval LM loss 8.35 -> 3.67). The longer run matters for serving: a better-trained MTP module drafts more acceptable
# tokens.
DEFAULT_MAX_STEPS = 600
DEFAULT_BATCH_SIZE = 8
DEFAULT_BLOCK_SIZE = 256


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", required=True, help="folder with a config.json (e.g. hub_configs/small)")
    p.add_argument("--output", required=True, help="output folder (tokenizer/, final/, loss.png, metrics.json)")
    p.add_argument("--max-steps", type=int, default=DEFAULT_MAX_STEPS, help="optimizer steps")
    p.add_argument("--block-size", type=int, default=DEFAULT_BLOCK_SIZE, help="tokens per training sequence")
    p.add_argument("--batch-size", type=int, default=DEFAULT_BATCH_SIZE, help="sequences per micro-batch")
    p.add_argument("--grad-accum", type=int, default=1, help="gradient accumulation steps")
    p.add_argument("--lr", type=float, default=1e-3, help="peak learning rate (cosine schedule with warmup)")
    p.add_argument("--warmup", type=float, default=0.05, help="warmup steps (int) or fraction of max steps (<1)")
    p.add_argument("--weight-decay", type=float, default=0.1)
    p.add_argument("--vocab-size", type=int, default=None,
                   help="tokenizer vocabulary size (default: the config's vocab_size); the model uses len(tokenizer)")
    p.add_argument("--files", nargs="+", default=None,
                   help="text files (or folders, searched for *.py) to train on instead of the Python stdlib")
    p.add_argument("--max-files", type=int, default=None, help="use at most this many stdlib files")
    p.add_argument("--dataset", default=None, help="a `datasets` dataset name or path with a text column")
    p.add_argument("--dataset-config", default=None, help="dataset configuration name")
    p.add_argument("--dataset-split", default="train")
    p.add_argument("--text-column", default="text")
    p.add_argument("--max-tokens", type=int, default=None, help="cap on the number of corpus tokens packed")
    p.add_argument("--eval-fraction", type=float, default=0.05, help="fraction of blocks held out")
    p.add_argument("--eval-blocks", type=int, default=64, help="held-out blocks used by the before/after evals")
    p.add_argument("--logging-steps", type=int, default=10)
    p.add_argument("--eval-steps", type=int, default=None, help="Trainer eval interval (default: max_steps // 4)")
    p.add_argument("--prompt", default="def fibonacci(n):", help="prompt for the generation sample")
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--save-steps", type=int, default=None,
                   help="checkpoint interval in optimizer steps, into OUTPUT/trainer (default: max_steps // 4; 0: none)")
    p.add_argument("--save-total-limit", type=int, default=2, help="checkpoints kept")
    p.add_argument("--resume", action="store_true",
                   help="continue from the newest checkpoint in OUTPUT/trainer (run with the same arguments)")
    p.add_argument("--push-to-hub", metavar="REPO", default=None, help="push the final model and tokenizer to REPO")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--fp8", action="store_true",
                   help="train in FP8 (DeepSeek-V3's block-wise recipe, quant.fp8_training.convert_to_fp8_training; on "
                        "CPU the reference backend, slower than fp32)")
    p.add_argument("--pp", type=int, default=0, help="pipeline-parallel size (under torchrun; 0: no pipeline)")
    p.add_argument("--pp-schedule", default="dualpipev",
                   help="gpipe, 1f1b, interleaved1f1b, zbv or dualpipev (trainers.pipeline.SCHEDULES)")
    p.add_argument("--pp-microbatches", type=int, default=None,
                   help="micro-batches per step (default: the least the schedule takes)")
    p.add_argument("--ep", action="store_true",
                   help="with --pp: the world / pp data-parallel replicas also split the routed experts (expert "
                        "parallel, all_to_all dispatch)")
    p.add_argument("--ep-size", type=int, default=None,
                   help="with --ep: the expert-parallel width, a divisor of the world / pp replicas (default: all of "
                        "them); below it each expert shard sits on replicas / ep-size ranks, its gradient summed over "
                        "them (V3's EP64 inside DP128)")
    p.add_argument("--pp-overlap", action="store_true",
                   help="with --pp --ep under dualpipev: run each overlapped forward-backward pair side by side, one "
                        "micro-batch's expert all_to_all under the other's compute (trainers/pipeline_overlap.py)")
    p.add_argument("--zero1", action="store_true",
                   help="with --pp: shard the optimizer state over the data-parallel replicas of each pipeline rank "
                        "(ZeRO-1, torch's ZeroRedundancyOptimizer: trainers/pipeline_zero.py)")
    return p.parse_args(argv)


# ---------------------------------------------------------------------------------------------------------------
# Corpus
# ---------------------------------------------------------------------------------------------------------------
def load_texts(args) -> tuple[list[str], str]:
    """Return the corpus documents and a short description of where they came from."""
    from trainers.corpus import read_text, stdlib_source_files

    if args.dataset:
        import datasets

        ds = datasets.load_dataset(args.dataset, args.dataset_config, split=args.dataset_split)
        column = args.text_column
        if column not in ds.column_names:
            string_cols = [n for n, f in ds.features.items() if getattr(f, "dtype", None) in ("string", "large_string")]
            if not string_cols:
                raise SystemExit(f"dataset {args.dataset!r} has no text column (columns: {ds.column_names})")
            column = string_cols[0]
        texts = [t for t in ds[column] if t]
        return texts, f"dataset {args.dataset} [{args.dataset_split}] column {column!r}: {len(texts)} documents"
    if args.files:
        paths = []
        for f in args.files:
            f = Path(f)
            paths.extend(sorted(f.rglob("*.py")) if f.is_dir() else [f])
        return [read_text(f) for f in paths], f"{len(paths)} files from --files"
    paths = stdlib_source_files(limit=args.max_files, seed=args.seed)
    return [read_text(f) for f in paths], f"{len(paths)} Python stdlib source files"


# ---------------------------------------------------------------------------------------------------------------
# Evaluation
# ---------------------------------------------------------------------------------------------------------------
def _scalar(value) -> float | None:
    if value is None:
        return None
    if isinstance(value, torch.Tensor):
        if value.numel() != 1:
            return None
        return float(value.detach().float())
    return float(value)


def _num_main_moe_layers(model) -> int:
    """Number of MoE layers in the main model (expert_load rows after them belong to the MTP modules)."""
    if hasattr(model, "moe_layers"):
        try:
            return len(model.moe_layers(include_mtp=False))
        except TypeError:
            pass
    config = model.config
    if hasattr(config, "is_moe_layer"):
        return sum(bool(config.is_moe_layer(i)) for i in range(config.num_hidden_layers))
    return sum(i >= config.first_k_dense_replace for i in range(config.num_hidden_layers))


@torch.no_grad()
def evaluate(model, dataset, batch_size: int) -> dict[str, float | None]:
    """Average the model's own losses and MaxVio over ``dataset`` (model in eval mode, no bias updates).

    Returns loss (total training objective), lm_loss (next-token cross-entropy computed here from the logits),
    perplexity, mtp_loss, balance_loss, max_violation (mean of per-batch MaxVio) and max_violation_global (MaxVio
    of the expert loads summed over the whole eval set, averaged over MoE layers).
    """
    was_training = model.training
    model.eval()
    sums: dict[str, float] = defaultdict(float)
    counts: dict[str, int] = defaultdict(int)
    load_total = None
    device = next(model.parameters()).device
    n_main = _num_main_moe_layers(model)
    for start in range(0, len(dataset), batch_size):
        batch = dataset[start : start + batch_size]
        input_ids = torch.tensor(batch["input_ids"], dtype=torch.long, device=device)
        labels = torch.tensor(batch["labels"], dtype=torch.long, device=device)
        out = model(input_ids=input_ids, labels=labels, use_cache=False)
        rows = input_ids.shape[0]
        logits = out.logits[:, :-1].float()
        lm = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels[:, 1:].reshape(-1), ignore_index=-100)
        values = {
            "loss": _scalar(out.loss),
            "lm_loss": float(lm),
            "mtp_loss": _scalar(getattr(out, "mtp_loss", None)),
            "balance_loss": _scalar(getattr(out, "balance_loss", None)),
            "max_violation": _scalar(getattr(out, "max_violation", None)),
        }
        for k, v in values.items():
            if v is not None and math.isfinite(v):
                sums[k] += v * rows
                counts[k] += rows
        load = getattr(out, "expert_load", None)
        if isinstance(load, torch.Tensor) and load.numel():
            load = load.detach().double().cpu()[:n_main]  # rows beyond the main model's MoE layers are MTP
            load_total = load if load_total is None else load_total + load
    model.train(was_training)

    metrics: dict[str, float | None] = {k: sums[k] / counts[k] if counts[k] else None for k in
                                        ("loss", "lm_loss", "mtp_loss", "balance_loss", "max_violation")}
    metrics["perplexity"] = math.exp(min(metrics["lm_loss"], 50.0)) if metrics["lm_loss"] is not None else None
    if load_total is not None:
        mean = load_total.mean(dim=-1).clamp_min(1e-9)
        metrics["max_violation_global"] = float((load_total.max(dim=-1).values / mean - 1.0).mean())
    else:
        metrics["max_violation_global"] = None
    return metrics


def _fmt(v) -> str:
    return "n/a" if v is None else f"{v:.4f}"


def print_metrics(title: str, m: dict) -> None:
    print(f"[{title}] eval loss {_fmt(m['loss'])} | LM loss {_fmt(m['lm_loss'])} (ppl {_fmt(m['perplexity'])}) | "
          f"MTP loss {_fmt(m['mtp_loss'])} | MaxVio {_fmt(m['max_violation'])} "
          f"(global {_fmt(m['max_violation_global'])})", flush=True)


def print_table(before: dict, after: dict) -> None:
    rows = [("eval loss (total)", "loss"), ("eval LM loss", "lm_loss"), ("eval perplexity", "perplexity"),
            ("eval MTP loss", "mtp_loss"), ("eval balance loss", "balance_loss"),
            ("MaxVio (mean over batches)", "max_violation"), ("MaxVio (whole eval set)", "max_violation_global")]
    width = max(len(r[0]) for r in rows)
    print()
    print(f"{'metric':<{width}} | {'before':>10} | {'after':>10}")
    print(f"{'-' * width}-+-{'-' * 10}-+-{'-' * 10}")
    for label, key in rows:
        if before.get(key) is None and after.get(key) is None:
            continue  # e.g. the balance loss, which the model only computes in training mode
        print(f"{label:<{width}} | {_fmt(before.get(key)):>10} | {_fmt(after.get(key)):>10}")
    print()


# ---------------------------------------------------------------------------------------------------------------
# Training
# ---------------------------------------------------------------------------------------------------------------
class ExpertLoadRecorder(TrainerCallback):
    """Keeps, after every optimizer step, the share of routed tokens each expert got in each main MoE layer."""

    def __init__(self):
        self.steps: list[int] = []
        self.shares: list[torch.Tensor] = []  # [num MoE layers, n_routed_experts] per step

    def on_step_end(self, args, state, control, model=None, **kwargs):
        loads = [moe.last_load_E for moe in model.moe_layers(include_mtp=False) if moe.last_load_E is not None]
        if loads:
            load_LE = torch.stack(loads).float().cpu()
            self.steps.append(state.global_step)
            self.shares.append(load_LE / load_LE.sum(-1, keepdim=True))


def save_expert_load_heatmap(recorder: ExpertLoadRecorder, path: Path) -> None:
    """One panel per MoE layer: expert (rows) x step (columns), colour = share of that step's routed tokens."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if not recorder.shares:
        return
    share_SLE = torch.stack(recorder.shares).numpy()  # matplotlib takes arrays (a tensor's __array__ is deprecated)
    layers, experts = share_SLE.shape[1:]
    fig, axes = plt.subplots(1, layers, figsize=(4.5 * layers, 3.6), squeeze=False)
    for layer, ax in enumerate(axes[0]):
        image = ax.imshow(share_SLE[:, layer].T, aspect="auto", cmap="viridis", interpolation="nearest",
                          extent=(recorder.steps[0], recorder.steps[-1], experts - 0.5, -0.5))
        ax.set_title(f"MoE layer {layer + 1}: share of tokens (uniform = {1 / experts:.3f})", fontsize=9)
        ax.set_xlabel("step")
        ax.set_ylabel("expert")
        fig.colorbar(image, ax=ax)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def save_loss_plot(log_history: list[dict], path: Path, title: str, initial_eval_loss: float | None = None) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    train = [(h["step"], h["loss"]) for h in log_history if "loss" in h and "step" in h]
    evals = [(h["step"], h["eval_loss"]) for h in log_history if "eval_loss" in h]
    if initial_eval_loss is not None:
        evals.insert(0, (0, initial_eval_loss))
    # mtp_loss / maxvio (train) and eval_lm_loss (eval) are logged by trainers.callbacks.DeepseekTrainerCallback
    # (which DeepseekTrainer adds).
    eval_lm = [(h["step"], h["eval_lm_loss"]) for h in log_history if "eval_lm_loss" in h]
    mtp = [(h["step"], h["mtp_loss"]) for h in log_history if "mtp_loss" in h and "loss" in h]
    maxvio = [(h["step"], h.get("maxvio", h.get("max_violation"))) for h in log_history
              if "loss" in h and ("maxvio" in h or "max_violation" in h)]

    ncols = 2 if maxvio else 1
    fig, axes = plt.subplots(1, ncols, figsize=(6 * ncols, 4), squeeze=False)
    ax = axes[0][0]
    if train:
        ax.plot(*zip(*train), label="train loss (total)")
    if mtp:
        ax.plot(*zip(*mtp), label="train MTP loss", alpha=0.7)
    if evals:
        ax.plot(*zip(*evals), "o-", label="eval loss (total)")
    if eval_lm:
        ax.plot(*zip(*eval_lm), "s--", label="eval LM loss (next-token CE)")
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    if maxvio:
        ax = axes[0][1]
        ax.plot(*zip(*maxvio), color="tab:red")
        ax.set_xlabel("step")
        ax.set_ylabel("MaxVio (train batches)")
        ax.set_title("expert load balance")
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv=None) -> dict:
    args = parse_args(argv)
    t_start = time.time()
    out_dir = Path(args.output)
    out_dir.mkdir(parents=True, exist_ok=True)

    from transformers import (AutoModelForCausalLM, GenerationConfig, TrainingArguments, default_data_collator,
                              pipeline, set_seed)
    from transformers.trainer_utils import get_last_checkpoint

    import modeling_deepseek  # noqa: F401  (registers model_type "deepseek" with the Auto classes)
    from modeling_deepseek import DeepseekConfig, DeepseekForCausalLM
    from trainers import DeepseekTrainer
    from trainers.corpus import pack_texts, train_tokenizer_from_texts

    set_seed(args.seed)
    config_path = Path(args.config)
    raw_config = json.loads((config_path / "config.json").read_text())
    max_positions = int(raw_config.get("max_position_embeddings", args.block_size))
    if args.block_size > max_positions:
        raise SystemExit(f"--block-size {args.block_size} exceeds max_position_embeddings {max_positions}")
    if args.pp_overlap and not (args.pp and args.ep):
        raise SystemExit("--pp-overlap overlaps the expert all_to_alls of the pipeline's stages: it needs --pp and "
                         "--ep")
    if args.zero1 and not args.pp:
        raise SystemExit("--zero1 shards the pipeline runner's optimizer state over its data-parallel replicas: it "
                         "needs --pp")
    if args.ep_size is not None and not args.ep:
        raise SystemExit("--ep-size sets the expert-parallel width: it needs --ep")
    if args.ep and not args.pp:
        raise SystemExit("--ep splits the experts of the pipeline stages: it needs --pp (without a pipeline, load the "
                         "model with DistributedConfig(ep_size=...) instead)")

    # 1. corpus + tokenizer ---------------------------------------------------------------------------------------
    t0 = time.time()
    if args.pp:
        import torch.distributed as dist

        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    texts, source = load_texts(args)
    if not texts:
        raise SystemExit("empty corpus")
    vocab_size = args.vocab_size or int(raw_config["vocab_size"])
    if args.pp and dist.get_rank() != 0:  # one rank trains the tokenizer, the others read what it saved
        from transformers import AutoTokenizer

        dist.barrier()
        tokenizer = AutoTokenizer.from_pretrained(str(out_dir / "tokenizer"))
    else:
        tokenizer = train_tokenizer_from_texts(texts, vocab_size, out_dir / "tokenizer",
                                               model_max_length=max_positions, length=len(texts))
        if args.pp:
            dist.barrier()
    train_ds, eval_ds = pack_texts(tokenizer, texts, args.block_size, eval_fraction=args.eval_fraction,
                                   max_tokens=args.max_tokens, seed=args.seed)
    if len(eval_ds) == 0:
        raise SystemExit("corpus too small: no held-out block (lower --block-size or raise --eval-fraction)")
    eval_small = eval_ds.select(range(min(args.eval_blocks, len(eval_ds))))
    print(f"corpus: {source}; tokenizer vocab {len(tokenizer)} (saved to {out_dir / 'tokenizer'}); "
          f"{len(train_ds)} train / {len(eval_ds)} eval blocks of {args.block_size} tokens "
          f"({len(train_ds) * args.block_size / 1e6:.2f}M train tokens) [{time.time() - t0:.1f}s]", flush=True)

    # 2. model ----------------------------------------------------------------------------------------------------
    config = DeepseekConfig.from_pretrained(
        str(config_path), vocab_size=len(tokenizer), bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
    )
    if args.pp:
        set_seed(args.seed)  # the same initial weights on every rank, whatever the tokenizer step drew
    model = DeepseekForCausalLM(config)
    model.config.use_cache = False
    if args.fp8:  # the saved model is an ordinary high-precision checkpoint either way
        from quant.fp8_training import convert_to_fp8_training

        convert_to_fp8_training(model)
        print(model.fp8_training_report.__str__().splitlines()[0], flush=True)
    n_params = sum(p.numel() for p in model.parameters())
    print(f"model: {n_params / 1e6:.2f}M parameters ({config.num_hidden_layers} layers, {config.n_routed_experts} "
          f"routed + {config.n_shared_experts} shared experts, top-{config.num_experts_per_tok}, "
          f"{config.num_nextn_predict_layers} MTP module(s))", flush=True)

    if args.pp:
        return train_with_pipeline(args, model, tokenizer, train_ds, eval_small, out_dir)

    # 3. eval before ----------------------------------------------------------------------------------------------
    t0 = time.time()
    before = evaluate(model, eval_small, args.batch_size)
    print_metrics(f"before training, {len(eval_small)} blocks, {time.time() - t0:.1f}s", before)

    # 4. train ----------------------------------------------------------------------------------------------------
    eval_steps = args.eval_steps or max(1, args.max_steps // 4)
    warmup = args.warmup if args.warmup < 1 else int(args.warmup)
    save_steps = max(1, args.max_steps // 4) if args.save_steps is None else args.save_steps
    training_args = TrainingArguments(
        output_dir=str(out_dir / "trainer"),
        max_steps=args.max_steps,
        per_device_train_batch_size=args.batch_size,
        per_device_eval_batch_size=args.batch_size,
        gradient_accumulation_steps=args.grad_accum,
        learning_rate=args.lr,
        lr_scheduler_type="cosine",
        warmup_steps=warmup,
        weight_decay=args.weight_decay,
        adam_beta1=0.9,
        adam_beta2=0.95,
        max_grad_norm=1.0,
        logging_steps=args.logging_steps,
        logging_first_step=True,
        eval_strategy="steps",
        eval_steps=eval_steps,
        # Checkpoints to resume from (atomic: see trainers/checkpointing.py); the final model is saved below.
        save_strategy="steps" if save_steps > 0 else "no",
        save_steps=save_steps if save_steps > 0 else None,
        save_total_limit=args.save_total_limit,
        report_to="none",
        dataloader_num_workers=0,
        use_cpu=not torch.cuda.is_available(),
        disable_tqdm=False,
        seed=args.seed,
        data_seed=args.seed,
    )
    load_recorder = ExpertLoadRecorder()
    # DeepseekTrainer: transformers' Trainer plus DeepseekTrainerCallback (lm_loss / mtp_loss / MaxVio logging,
    # eval_lm_loss and eval_perplexity) and atomic checkpoints.
    trainer = DeepseekTrainer(
        model=model,
        args=training_args,
        train_dataset=train_ds,
        eval_dataset=eval_small,  # the same blocks as the before/after evals, so the curves line up
        data_collator=default_data_collator,
        processing_class=tokenizer,
        callbacks=[load_recorder],
    )
    resume_from = None
    if args.resume:
        resume_from = get_last_checkpoint(training_args.output_dir) if Path(training_args.output_dir).is_dir() else None
        print(f"resuming from {resume_from}" if resume_from else
              f"--resume: no checkpoint in {training_args.output_dir} yet, starting at step 0", flush=True)
    start_step = int(resume_from.rsplit("-", 1)[1]) if resume_from else 0
    t0 = time.time()
    train_result = trainer.train(resume_from_checkpoint=resume_from)
    train_seconds = time.time() - t0
    steps_run = args.max_steps - start_step
    tokens = steps_run * args.batch_size * args.grad_accum * args.block_size
    print(f"training: {steps_run} steps, {tokens / 1e6:.2f}M tokens in {train_seconds:.1f}s "
          f"({tokens / max(train_seconds, 1e-9):.0f} tokens/s); final train loss {train_result.training_loss:.4f}",
          flush=True)

    # 5. eval after -----------------------------------------------------------------------------------------------
    t0 = time.time()
    after = evaluate(model, eval_small, args.batch_size)
    print_metrics(f"after training, {len(eval_small)} blocks, {time.time() - t0:.1f}s", after)

    # 6. save -----------------------------------------------------------------------------------------------------
    final_dir = out_dir / "final"
    model.config.use_cache = True
    generation_config = GenerationConfig(
        do_sample=False,
        max_new_tokens=args.max_new_tokens,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    model.generation_config = generation_config
    trainer.save_model(str(final_dir))
    tokenizer.save_pretrained(str(final_dir))
    generation_config.save_pretrained(str(final_dir))  # written last so it is exactly this one
    save_loss_plot(trainer.state.log_history, out_dir / "loss.png", f"{config_path.name}: {args.max_steps} steps",
                   initial_eval_loss=before["loss"])
    save_expert_load_heatmap(load_recorder, out_dir / "expert_load.png")
    print(f"saved model + tokenizer to {final_dir}; plots {out_dir / 'loss.png'}, {out_dir / 'expert_load.png'}",
          flush=True)

    # 7. reload through the Auto classes and generate -------------------------------------------------------------
    reloaded = AutoModelForCausalLM.from_pretrained(str(final_dir))
    print(f"reloaded {type(reloaded).__name__} from {final_dir}", flush=True)
    del reloaded
    generator = pipeline("text-generation", model=str(final_dir), tokenizer=str(final_dir), device="cpu")
    t0 = time.time()
    generated = generator(args.prompt)[0]["generated_text"]
    print(f"--- generated from {args.prompt!r} (greedy, {args.max_new_tokens} new tokens, {time.time() - t0:.1f}s) ---")
    print(generated)
    print("---", flush=True)

    if args.push_to_hub:
        # Two commits: the reloaded model (config with auto_map, weights, modeling code, generation config), then the
        # tokenizer object that wrote final/ (a reloaded one would add its load kwargs `is_local`/`local_files_only`
        # to tokenizer_config.json).
        generator.model.push_to_hub(args.push_to_hub)
        tokenizer.push_to_hub(args.push_to_hub)
        print(f"pushed to https://huggingface.co/{args.push_to_hub}")

    print_table(before, after)
    metrics = {
        "config": str(config_path),
        "corpus": source,
        "parameters": n_params,
        "train_blocks": len(train_ds),
        "eval_blocks": len(eval_small),
        "max_steps": args.max_steps,
        "train_tokens": tokens,
        "train_seconds": train_seconds,
        "final_train_loss": train_result.training_loss,
        "before": before,
        "after": after,
        "generated": generated,
        "total_seconds": time.time() - t_start,
    }
    (out_dir / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
    print(f"total time {metrics['total_seconds']:.0f}s; metrics in {out_dir / 'metrics.json'}")
    return metrics


def train_with_pipeline(args, model, tokenizer, train_ds, eval_ds, out_dir: Path) -> dict:
    """The --pp path: trainers.pipeline.PipelineRunner over a (dp, pp) mesh, trainers.pipeline_training's loop."""
    import torch.distributed as dist

    from modeling_deepseek import DeepseekForCausalLM
    from trainers.pipeline import SCHEDULES, PipelineRunner, pipeline_mesh
    from trainers.pipeline_training import PipelineTrainer, PipelineTrainingArguments

    mesh = pipeline_mesh(args.pp, "cuda" if torch.cuda.is_available() else "cpu", expert_parallel=args.ep,
                         ep_size=args.ep_size)
    if torch.cuda.is_available():
        model.to(torch.device("cuda", dist.get_rank() % torch.cuda.device_count()))
    spec = SCHEDULES.get(args.pp_schedule)
    stages = args.pp * (spec.stages_per_rank if spec else 1)
    micro = args.pp_microbatches or max(1, spec.min_microbatches_per_stage * stages if spec else 1)
    runner = PipelineRunner(model, args.pp_schedule, micro, mesh, overlap_f_b=args.pp_overlap)
    ids = lambda ds: torch.tensor(ds["input_ids"], dtype=torch.long, device=runner.device)  # noqa: E731
    warmup = int(args.warmup * args.max_steps) if args.warmup < 1 else int(args.warmup)
    save_steps = max(1, args.max_steps // 4) if args.save_steps is None else args.save_steps
    training = PipelineTrainingArguments(
        output_dir=str(out_dir / "pipeline"), max_steps=args.max_steps, batch_size=args.batch_size, lr=args.lr,
        warmup_steps=warmup, weight_decay=args.weight_decay, logging_steps=args.logging_steps,
        eval_steps=args.eval_steps or max(1, args.max_steps // 4), save_steps=save_steps, seed=args.seed,
        zero1=args.zero1)
    trainer = PipelineTrainer(runner, training, ids(train_ds), ids(eval_ds))
    ep = f" (ep {args.ep_size or runner.dp_size})" if args.ep else ""
    replicas = f"dp {runner.dp_size}{ep}{' ZeRO-1' if args.zero1 else ''}"
    trainer.log(f"pipeline: {args.pp_schedule}, pp {args.pp} x {replicas}, {micro} micro-batches of "
                f"{args.batch_size // micro} sequences; rank 0 holds stages {[s.index for s in runner.stages]} "
                f"of {runner.stages[0].num_stages}", flush=True)
    before = trainer.evaluate()
    trainer.log(f"[before training] eval loss {before['loss']:.4f} | LM {before['main_loss']:.4f}", flush=True)
    t0 = time.time()
    history = trainer.train(resume=args.resume)
    after = trainer.evaluate()
    trainer.log(f"[after training] eval loss {after['loss']:.4f} | LM {after['main_loss']:.4f} "
                f"[{time.time() - t0:.1f}s]", flush=True)
    final_dir = out_dir / "final"
    model.config.use_cache = True
    trainer.save_final(final_dir, DeepseekForCausalLM)
    metrics = {"before": before, "after": after, "history": history, "schedule": args.pp_schedule, "pp": args.pp,
               "dp": runner.dp_size, "ep": args.ep, "ep_size": args.ep_size, "zero1": args.zero1,
               "micro_batches": micro}
    if dist.get_rank() == 0:
        tokenizer.save_pretrained(str(final_dir))
        reloaded = DeepseekForCausalLM.from_pretrained(str(final_dir))
        trainer.log(f"saved {final_dir}; reloaded {type(reloaded).__name__} in one process", flush=True)
        (out_dir / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
    dist.barrier()
    dist.destroy_process_group()
    return metrics


if __name__ == "__main__":
    main()

"""Load-balance study: auxiliary-loss-free balancing vs a conventional auxiliary loss vs no balancing.

    python -m benchmarks.balance_study                              # the full study (~10 min on 2 CPU cores)
    python -m benchmarks.balance_study --steps 20 --out /tmp/bs     # a smoke run

The same small DeepSeek-V3-shaped model (vocab 2048, hidden 128, 4 layers of which 3 MoE, 16 routed experts top-4 in
4 groups with topk_group 2, 1 shared expert, one MTP module) is trained from the same initialisation on the same
batches of Python standard-library source (trainers.corpus: stdlib_source_files, train_tokenizer, pack_dataset), once
per arm:

    A   aux-loss-free: use_bias_update, bias_update_speed gamma, seq_balance_alpha 1e-4 (V3's complementary loss)
        -- run with V3's gamma = 0.001 and with gamma = 0.01: V3 tuned 0.001 for ~14.8T tokens; a run of a few
        hundred steps moves each bias by at most steps * gamma, so the larger gamma is the one that can act here.
    B   auxiliary loss: no bias update, seq_balance_alpha 0.01 (large enough to be the balancer)
    C   no balancing: no bias update, seq_balance_alpha 0

Every step records each MoE layer's expert load (the forward output's `expert_load`, tokens per expert over the global
batch). At the end the model is evaluated on the held-out blocks: main next-token loss (perplexity) and MaxVio, where
MaxVio = max_i load_i / mean_i load_i - 1 is taken over the loads summed across the whole eval set ("global batch") per
layer and averaged over the main model's MoE layers; the mean of per-batch MaxVio is reported too.

Outputs: a markdown table on stdout and in <out>/balance_study.md, <out>/balance_load_heatmap.png (per-expert load
over steps for one layer, one panel per arm), <out>/balance_maxvio.png (MaxVio over steps) and <out>/balance_study.json
(all per-step numbers).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

from benchmarks import harness
from benchmarks.harness import RESULTS_DIR
from benchmarks.models import REFERENCE_SHAPE

import numpy as np
import torch
from tqdm.auto import tqdm

# The reference shape's routing (16 experts top-4 in 4 groups, topk_group 2, one shared expert, one dense layer) in a
# smaller body, with one MTP module, so that four arms of a few hundred steps fit in minutes on two cores.
MODEL = dict(
    REFERENCE_SHAPE,
    vocab_size=2048,
    hidden_size=128,
    intermediate_size=384,
    moe_intermediate_size=64,
    num_hidden_layers=4,
    num_attention_heads=4,
    q_lora_rank=64,
    kv_lora_rank=64,
    qk_nope_head_dim=32,
    qk_rope_head_dim=16,
    v_head_dim=32,
    num_nextn_predict_layers=1,
    max_position_embeddings=512,
    bos_token_id=0,
    eos_token_id=1,
    pad_token_id=2,
)

ARMS = {
    "A  aux-loss-free, gamma=0.001 (V3)": dict(use_bias_update=True, bias_update_speed=0.001, seq_balance_alpha=1e-4),
    "A' aux-loss-free, gamma=0.01": dict(use_bias_update=True, bias_update_speed=0.01, seq_balance_alpha=1e-4),
    "B  aux loss, alpha=0.01": dict(use_bias_update=False, bias_update_speed=0.001, seq_balance_alpha=0.01),
    "C  no balancing": dict(use_bias_update=False, bias_update_speed=0.001, seq_balance_alpha=0.0),
}


def parse_args():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=400)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--block-size", type=int, default=128)
    p.add_argument("--files", type=int, default=240, help="stdlib files in the corpus (a fixed random subset)")
    p.add_argument("--eval-blocks", type=int, default=32)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--warmup", type=int, default=20)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1,
                   help="torch threads (default 1: on a busy 2-core machine, 2 OpenMP threads spin against other jobs "
                        "and steps took 0.5-14 s instead of 0.3 s)")
    p.add_argument("--arms", default="all", help="comma-separated arm letters (A,A',B,C) or 'all'")
    p.add_argument("--heatmap-layer", type=int, default=None, help="MoE layer index (default: the last main one)")
    p.add_argument("--out", default=str(RESULTS_DIR),
                   help="folder of the outputs; the default (benchmarks/results) also rewrites the RESULTS.md section")
    return p.parse_args()


def build_data(args):
    from trainers.corpus import pack_dataset, stdlib_source_files, train_tokenizer

    files = stdlib_source_files(limit=args.files, seed=args.seed)
    tokenizer = train_tokenizer(files, vocab_size=MODEL["vocab_size"], model_max_length=args.block_size)
    need = (args.steps * args.batch_size + args.eval_blocks) * args.block_size
    train, evaluation = pack_dataset(tokenizer, files, block_size=args.block_size, eval_fraction=0.02, seed=args.seed)
    train_ids = torch.tensor(train["input_ids"], dtype=torch.long)
    eval_ids = torch.tensor(evaluation["input_ids"], dtype=torch.long)[: args.eval_blocks]
    if len(eval_ids) < args.eval_blocks:  # a small corpus: take the missing eval blocks from the end of train
        extra = args.eval_blocks - len(eval_ids)
        eval_ids, train_ids = torch.cat([train_ids[-extra:], eval_ids]), train_ids[:-extra]
    # One fixed order of training blocks shared by all arms (repeating the corpus if it is too short).
    g = torch.Generator().manual_seed(args.seed)
    n_needed = args.steps * args.batch_size
    order = torch.cat([torch.randperm(len(train_ids), generator=g) for _ in range(math.ceil(n_needed / len(train_ids)))])
    info = {"files": len(files), "train_blocks": len(train_ids), "eval_blocks": len(eval_ids),
            "train_tokens_used": n_needed * args.block_size, "corpus_tokens": (len(train_ids) + len(eval_ids)) * args.block_size,
            "tokens_needed": need}
    return train_ids, order[:n_needed].view(args.steps, args.batch_size), eval_ids, info


def lr_at(step: int, args) -> float:
    if step < args.warmup:
        return args.lr * (step + 1) / args.warmup
    progress = (step - args.warmup) / max(1, args.steps - args.warmup)
    return args.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))


def max_violation(load_LE: np.ndarray) -> np.ndarray:
    return load_LE.max(-1) / np.maximum(load_LE.mean(-1), 1e-9) - 1


def run_arm(name, knobs, train_ids, batches, eval_ids, args, position):
    from modeling_deepseek import DeepseekConfig, DeepseekForCausalLM

    torch.manual_seed(args.seed)
    config = DeepseekConfig(**MODEL, **knobs)
    model = DeepseekForCausalLM(config)  # same seed, same config shape: identical initial weights in every arm
    model.train()
    n_main = len(model.moe_layers(include_mtp=False))
    decay = [p for n, p in model.named_parameters() if p.ndim >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.ndim < 2]
    optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": 0.1}, {"params": no_decay, "weight_decay": 0.0}],
                                  lr=args.lr, betas=(0.9, 0.95))
    loads, losses, main_losses, balance_losses = [], [], [], []
    start = time.perf_counter()
    bar = tqdm(range(args.steps), desc=name.split()[0].ljust(2), position=position, leave=True, dynamic_ncols=True)
    for step in bar:
        for group in optimizer.param_groups:
            group["lr"] = lr_at(step, args)
        ids = train_ids[batches[step]]
        out = model(input_ids=ids, labels=ids)
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()  # the bias update (arms A) runs in the optimizer-step pre-hook
        optimizer.zero_grad(set_to_none=True)
        loads.append(out.expert_load[:n_main].detach().numpy().copy())
        losses.append(out.loss.item())
        main_losses.append(out.main_loss.item())
        balance_losses.append(0.0 if out.balance_loss is None else out.balance_loss.item())
        if step % 10 == 0 or step == args.steps - 1:
            bar.set_postfix(loss=f"{main_losses[-1]:.3f}", maxvio=f"{max_violation(loads[-1]).mean():.2f}")
    train_s = time.perf_counter() - start
    bar.close()

    model.eval()
    eval_load = np.zeros((n_main, config.n_routed_experts))
    batch_vio, nll_sum, n_tok = [], 0.0, 0
    with torch.no_grad():
        for i in range(0, len(eval_ids), args.batch_size):
            ids = eval_ids[i: i + args.batch_size]
            out = model(input_ids=ids, labels=ids)
            tokens = ids.numel() - ids.shape[0]  # predicted positions
            nll_sum += out.main_loss.item() * tokens
            n_tok += tokens
            load = out.expert_load[:n_main].numpy()
            eval_load += load
            batch_vio.append(max_violation(load).mean())
    eval_loss = nll_sum / n_tok
    loads = np.stack(loads)  # [steps, layers, experts]
    biases = [r.e_score_correction_bias.tolist() for r in model.modules()
              if getattr(r, "e_score_correction_bias", None) is not None][:n_main]
    return {
        "name": name, "knobs": knobs, "train_seconds": train_s, "loads": loads.tolist(), "loss": losses,
        "main_loss": main_losses, "balance_loss": balance_losses,
        "maxvio_per_step": max_violation(loads).mean(-1).tolist(),
        "eval_loss": eval_loss, "eval_ppl": math.exp(eval_loss),
        "eval_maxvio_global": float(max_violation(eval_load).mean()),
        "eval_maxvio_global_per_layer": max_violation(eval_load).tolist(),
        "eval_maxvio_batch_mean": float(np.mean(batch_vio)),
        "eval_load": eval_load.tolist(), "final_bias": biases,
    }


def summarise(results, args, info, report, total_s, figures: str = "") -> str:
    """The study's section: the table, per-layer MaxVio and the figures, whose paths start with `figures` (the
    folder of the PNGs relative to the markdown file)."""
    tail = max(1, args.steps // 10)
    lines = harness.section_head("Load balance: aux-loss-free vs auxiliary loss vs none (cpu, fp32)", report,
                                 " (other jobs shared the machine, so the times are indicative only)") + [
        "",
        f"- total wall time {total_s / 60:.1f} min",
        f"- model: vocab {MODEL['vocab_size']}, hidden {MODEL['hidden_size']}, {MODEL['num_hidden_layers']} layers "
        f"({MODEL['num_hidden_layers'] - MODEL['first_k_dense_replace']} MoE), {MODEL['n_routed_experts']} routed "
        f"experts top-{MODEL['num_experts_per_tok']}, n_group {MODEL['n_group']} topk_group {MODEL['topk_group']}, "
        f"{MODEL['n_shared_experts']} shared, MTP depth {MODEL['num_nextn_predict_layers']}; sigmoid noaux_tc routing",
        f"- data: {info['files']} stdlib files, byte-level BPE 2048, blocks of {args.block_size}; "
        f"{args.steps} steps x {args.batch_size} blocks = {info['train_tokens_used']:,} training tokens "
        f"(corpus {info['corpus_tokens']:,}); eval {info['eval_blocks']} held-out blocks; AdamW lr {args.lr} "
        f"(warmup {args.warmup}, cosine to 10%), clip 1.0, seed {args.seed}, same init and batches in every arm",
        "- MaxVio = max_i load_i / mean load - 1, per MoE layer of the main model, averaged over layers. "
        "`eval MaxVio (global)`: loads summed over the whole eval set; `(per batch)`: mean over eval batches of "
        f"{args.batch_size} x {args.block_size} tokens. `train MaxVio (last 10%)`: mean of the per-step global-batch "
        f"MaxVio over the last {tail} steps.",
        "",
        "| arm | gamma | alpha (seq. loss) | eval loss | eval ppl | eval MaxVio (global) | eval MaxVio (per batch) "
        "| train MaxVio (last 10%) | train MaxVio (first 10%) | train s |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        k = r["knobs"]
        gamma = f"{k['bias_update_speed']:g}" if k["use_bias_update"] else "-"
        vio = r["maxvio_per_step"]
        lines.append(
            f"| {r['name']} | {gamma} | {k['seq_balance_alpha']:g} | {r['eval_loss']:.4f} | {r['eval_ppl']:.2f} | "
            f"{r['eval_maxvio_global']:.3f} | {r['eval_maxvio_batch_mean']:.3f} | {np.mean(vio[-tail:]):.3f} | "
            f"{np.mean(vio[:tail]):.3f} | {r['train_seconds']:.0f} |"
        )
    lines += ["", "Per-layer eval MaxVio (global):", ""]
    n_layers = len(results[0]["eval_maxvio_global_per_layer"])
    lines.append("| arm | " + " | ".join(f"layer {MODEL['first_k_dense_replace'] + i}" for i in range(n_layers)) + " |")
    lines.append("|---|" + "---|" * n_layers)
    for r in results:
        lines.append(f"| {r['name']} | " + " | ".join(f"{v:.3f}" for v in r["eval_maxvio_global_per_layer"]) + " |")
    lines += [
        "",
        "Notes: gamma = 0.001 is V3's value for a run of 14.8T tokens; over "
        f"{args.steps} steps a bias can move by at most {args.steps} x gamma, which is why arm A' (gamma = 0.01) is "
        "reported next to it. Arm B's alpha = 0.01 is 100x V3's complementary alpha, so that the auxiliary loss is the "
        "main balancer. One seed per arm: differences of a few hundredths in eval loss are within run-to-run noise.",
        "",
        f"Figures: `{figures}balance_load_heatmap.png` (per-expert share of the routed tokens over training steps, "
        f"layer {MODEL['first_k_dense_replace'] + results[0]['heatmap_layer']}, one panel per arm) and "
        f"`{figures}balance_maxvio.png` (global-batch MaxVio per training step, averaged over MoE layers).",
        "",
        f"![per-expert load over steps]({figures}balance_load_heatmap.png)",
        "",
        f"![MaxVio over steps]({figures}balance_maxvio.png)",
    ]
    return "\n".join(lines) + "\n"


def plot(results, out: Path, layer: int) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(len(results), 1, figsize=(10, 2.2 * len(results) + 0.6), sharex=True, squeeze=False)
    vmax = max(np.asarray(r["loads"])[:, layer].max() / np.asarray(r["loads"])[:, layer].sum(-1).mean() for r in results)
    for ax, r in zip(axes[:, 0], results):
        load = np.asarray(r["loads"])[:, layer]  # [steps, experts]
        share = load / load.sum(-1, keepdims=True)
        im = ax.imshow(share.T, aspect="auto", origin="lower", cmap="viridis", vmin=0, vmax=vmax, interpolation="nearest")
        ax.set_ylabel("expert")
        ax.set_title(f"{r['name']}  (eval MaxVio {r['eval_maxvio_global']:.2f})", fontsize=9, loc="left")
    axes[-1, 0].set_xlabel("training step")
    fig.colorbar(im, ax=axes[:, 0], label="share of routed tokens (uniform = 1/16)", shrink=0.8)
    fig.suptitle(f"Per-expert load over training, MoE layer {MODEL['first_k_dense_replace'] + layer}", fontsize=11)
    fig.savefig(out / "balance_load_heatmap.png", dpi=120, bbox_inches="tight")
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(9, 4.5))
    for r in results:
        vio = np.asarray(r["maxvio_per_step"])
        window = max(1, len(vio) // 40)
        smooth = np.convolve(vio, np.ones(window) / window, mode="valid")
        line, = ax.plot(vio, alpha=0.25, linewidth=0.8)
        ax.plot(np.arange(window - 1, len(vio)), smooth, color=line.get_color(), linewidth=1.8, label=r["name"])
    ax.set_xlabel("training step")
    ax.set_ylabel("MaxVio (global batch, mean over MoE layers)")
    ax.set_yscale("log")
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=8)
    ax.set_title("Load imbalance during training (thin: per step; thick: moving average)", fontsize=10)
    fig.savefig(out / "balance_maxvio.png", dpi=120, bbox_inches="tight")
    plt.close(fig)


def main():
    args = parse_args()
    harness.setup(threads=args.threads)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    report = harness.report_head("balance_study")
    t0 = time.perf_counter()
    print(f"building the corpus and tokenizer ({args.files} stdlib files) ...", file=sys.stderr)
    train_ids, batches, eval_ids, info = build_data(args)
    print(f"data: {info}", file=sys.stderr)

    wanted = None if args.arms == "all" else {a.strip() for a in args.arms.split(",")}
    arms = {k: v for k, v in ARMS.items() if wanted is None or k.split()[0] in wanted}
    results = []
    for position, (name, knobs) in enumerate(arms.items()):
        results.append(run_arm(name, knobs, train_ids, batches, eval_ids, args, position))
    layer = args.heatmap_layer if args.heatmap_layer is not None else len(results[0]["eval_maxvio_global_per_layer"]) - 1
    for r in results:
        r["heatmap_layer"] = layer
    total = time.perf_counter() - t0

    table = summarise(results, args, info, report, total)
    print(table)
    (out / "balance_study.md").write_text(table)
    plot(results, out, layer)
    (out / "balance_study.json").write_text(json.dumps(
        {"args": vars(args), **report, "data": info, "model": MODEL, "total_seconds": total, "results": results}))
    if out.resolve() == RESULTS_DIR.resolve():
        harness.write_section("balance-study", summarise(results, args, info, report, total, figures="results/"))


if __name__ == "__main__":
    main()

"""Indexer-training study: DeepSeek-V3.2's dense warm-up and sparse stage on the small config, with Trainer.

    python -m benchmarks.indexer_training                                   # the study (~25 min on 2 busy cores)
    python -m benchmarks.indexer_training --pretrain-steps 4 --stage-steps 2 --out /tmp/it   # a smoke run

V3.2 was continued from a trained V3.1; an indexer learns nothing from a random model's near-uniform attention. So:

    0  pretrain  hub_configs/small with an indexer (index_topk k, dsa_impl "dense": the indexer idle), on Python
                 standard-library source (trainers.corpus), DeepseekTrainer
    1  warm-up   DeepseekIndexerTrainer(indexer_stage="dense"): the indexers alone, on their KL (V3.2's lr 1e-3)
    2  sparse    DeepseekIndexerTrainer(indexer_stage="sparse"): everything, attention on each query's top-k;
       control   the same steps, same data and lr, from the same weights, dense attention, no indexer (DeepseekTrainer)

Measured on held-out blocks after each stage (eval mode, no gradients):
- LM loss with dense attention and with sparse attention (top-k of the indexer), the main next-token CE;
- the indexer's KL to the dense attention's head-summed distribution (its warm-up loss), mean over layers;
- recall: the share of the dense attention's head-summed probability mass that falls on the indexer's top-k, over
  the queries with more than k keys (where the selection drops some), mean over layers; next to it the same share
  for the k most recent keys (a sliding window, what a sparse pattern without an indexer would keep).

Outputs: a markdown table on stdout, <out>/indexer_training.json, and with the default --out the RESULTS.md section.

    python -m benchmarks.indexer_training --warmup-memory     # one warm-up step's time and peak memory instead

measures the dense warm-up at V3.2's layer shape (V32_LAYER) and long contexts: its target taken from the eager
kernel's [B, H, T, S] probabilities or recomputed beside SDPA (indexer_loss.dense_attention_target), the indexer's
scores kept with their autograd graph or recomputed block by block in backward.
"""

from __future__ import annotations

import argparse
import copy
import sys
import time
from pathlib import Path

from benchmarks import harness
from benchmarks.harness import RESULTS_DIR

import torch


def parse_args():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--config", default="hub_configs/small")
    p.add_argument("--block-size", type=int, default=512)
    p.add_argument("--topk", type=int, default=64, help="index_topk: keys each query attends to (V3.2: 2048)")
    p.add_argument("--index-heads", type=int, default=8)
    p.add_argument("--index-head-dim", type=int, default=32)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--pretrain-steps", type=int, default=150)
    p.add_argument("--pretrain-lr", type=float, default=1e-3)
    p.add_argument("--stage-steps", type=int, default=60, help="steps of the warm-up, the sparse stage and the control")
    p.add_argument("--warmup-lr", type=float, default=1e-3, help="V3.2's warm-up learning rate")
    p.add_argument("--sparse-lr", type=float, default=3e-4)
    p.add_argument("--files", type=int, default=240, help="stdlib files in the corpus (a fixed random subset)")
    p.add_argument("--eval-blocks", type=int, default=8)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--warmup-memory", action="store_true",
                   help="measure instead one warm-up step's memory at V3.2's layer shape (module docstring)")
    p.add_argument("--memory-lengths", type=int, nargs="+", default=[1024, 2048])
    p.add_argument("--eager-max-tokens", type=int, default=1024,
                   help="longest context of the eager-probabilities variant (its [128, T, T] fp32 copies)")
    p.add_argument("--out", default=str(RESULTS_DIR),
                   help="folder of the outputs; the default (benchmarks/results) also rewrites the RESULTS.md section")
    return p.parse_args()


def build_data(args, vocab_size: int):
    from datasets import Dataset

    from trainers.corpus import pack_dataset, stdlib_source_files, train_tokenizer

    files = stdlib_source_files(limit=args.files, seed=args.seed)
    tokenizer = train_tokenizer(files, vocab_size=vocab_size, model_max_length=args.block_size)
    train, evaluation = pack_dataset(tokenizer, files, block_size=args.block_size, eval_fraction=0.02, seed=args.seed)
    eval_ids = torch.tensor(evaluation["input_ids"][: args.eval_blocks], dtype=torch.long)
    train = Dataset.from_dict({"input_ids": train["input_ids"], "labels": train["input_ids"]})
    return train, eval_ids, {"files": len(files), "train_blocks": len(train), "eval_blocks": len(eval_ids)}


def trainer_args(out: Path, name: str, steps: int, lr: float, args):
    from transformers import TrainingArguments

    return TrainingArguments(str(out / "runs" / name), max_steps=steps, learning_rate=lr, lr_scheduler_type="constant",
                             per_device_train_batch_size=args.batch_size, logging_steps=max(1, steps // 10),
                             save_strategy="no", report_to=[], use_cpu=True, disable_tqdm=True, seed=args.seed,
                             dataloader_num_workers=0)


@torch.no_grad()
def measure(model, eval_ids: torch.Tensor, k: int) -> dict:
    """The study's numbers on the eval blocks (module docstring), the model left as it was found."""
    from modeling_deepseek.indexer_loss import indexed_attentions, layer_indexer_loss

    was_training, impl = model.training, model.config.dsa_impl
    model.eval()
    out = {}
    try:
        for mode in ("dense", "sparse"):
            model.config.dsa_impl = mode
            out[f"lm_loss_{mode}"] = float(model(eval_ids, labels=eval_ids).main_loss)
        model.config.dsa_impl = "dense"
        indexers = [attn.indexer for attn in indexed_attentions(model)][: model.config.num_hidden_layers]
        for indexer in indexers:
            indexer.record = True
        model(eval_ids)
        kl, recall, window = [], [], []
        for indexer in indexers:
            record = indexer.last_record
            kl.append(float(layer_indexer_loss(record)))
            p_BTS, scores_BTS = record.attention_BTX, record.scores_BTS
            T = p_BTS.shape[1]
            topk_BTK = scores_BTS.topk(k, dim=-1).indices
            recall.append(float(p_BTS.gather(-1, topk_BTK).sum(-1)[:, k:].mean()))
            recent_BTS = torch.ones(T, T, dtype=torch.bool).tril() & ~torch.ones(T, T, dtype=torch.bool).tril(-k)
            window.append(float((p_BTS * recent_BTS).sum(-1)[:, k:].mean()))
        out.update(indexer_kl=sum(kl) / len(kl), recall=sum(recall) / len(recall),
                   window_recall=sum(window) / len(window))
    finally:
        for attn in indexed_attentions(model):
            attn.indexer.record = False
            attn.indexer.last_record = None
        model.config.dsa_impl = impl
        model.train(was_training)
    return out


# V3.2's attention (128 heads, kv_lora_rank 512, rope 64, nope / v 128) and indexer (64 heads x 128) in one layer
# with a narrow body, for the warm-up's memory at a long context on a CPU.
V32_LAYER = dict(vocab_size=1024, hidden_size=1024, intermediate_size=1024, num_hidden_layers=1, first_k_dense_replace=1,
                 num_attention_heads=128, q_lora_rank=512, kv_lora_rank=512, qk_nope_head_dim=128,
                 qk_rope_head_dim=64, v_head_dim=128, num_nextn_predict_layers=0, index_topk=2048, index_n_heads=64,
                 index_head_dim=128, max_position_embeddings=8192)


VARIANTS = {  # (target from eager probabilities, scores' autograd graph kept), see warmup_memory
    "eager probabilities, scores' graph kept": (True, True),
    "dense_attention_target, scores' graph kept": (False, True),
    "dense_attention_target, rescored in backward": (False, False),
}


def warmup_memory(args) -> list[dict]:
    """One dense warm-up step (forward and backward, only the indexer trains) at each context length, three ways:
    the target from the eager kernel's [B, H, T, S] probabilities or recomputed beside SDPA (indexer_loss.
    dense_attention_target), and the indexer's scores kept with their autograd graph (what plain autograd keeps:
    h27a's first cut, both) or recomputed block by block in backward (_RescoredIndexerKL). Time and peak memory."""
    from benchmarks.measure import PeakMemory

    from modeling_deepseek import DeepseekConfig, DeepseekForCausalLM
    from modeling_deepseek.indexer_loss import layer_indexer_loss
    from trainers.indexer_training import prepare_indexer_stage

    model = DeepseekForCausalLM(DeepseekConfig(**V32_LAYER, dsa_impl="dense")).train()
    prepare_indexer_stage(model, "dense")
    attn = model.model.layers[0].self_attn
    rows = []
    for T in args.memory_lengths:
        ids = torch.randint(3, V32_LAYER["vocab_size"], (1, T), generator=torch.Generator().manual_seed(0))
        for name, (eager, graph_kept) in VARIANTS.items():
            if eager and T > args.eager_max_tokens:
                continue
            # Where kv_b_proj cannot be absorbed the layer falls back to the eager probabilities.
            attn.absorbable = (lambda: False) if eager else type(attn).absorbable.__get__(attn)
            # Without a training stage a recording indexer keeps its scores' graph: the loss is then taken here.
            attn.indexer.training_stage = None if graph_kept else "dense"
            seconds = []
            for _ in range(2):
                model.zero_grad(set_to_none=True)
                with PeakMemory("cpu") as peak:
                    start = time.perf_counter()
                    if graph_kept:
                        model(ids)
                        layer_indexer_loss(attn.indexer.last_record).backward()
                    else:
                        model(ids, labels=ids).loss.backward()
                    seconds.append(time.perf_counter() - start)
                attn.indexer.last_record = None
            rows.append({"tokens": T, "variant": name, "seconds": min(seconds), "peak_bytes": peak.bytes,
                         "peak_kind": peak.kind})
            print(rows[-1], file=sys.stderr)
    return rows


def memory_section(rows, report) -> str:
    lines = harness.section_head("DeepSeek-V3.2 indexer warm-up step: time and memory (indexer_training "
                                 "--warmup-memory)", report, " (shared machine: other jobs ran at the same time)")
    lines += [f"Model: one layer at V3.2's latent width and indexer shape ({harness.config_line(V32_LAYER)}), fp32, "
              "batch 1; one dense warm-up step (forward and backward, the indexer alone trains); min of 2 runs, the "
              "peak RSS of the second.", ""]
    lines.append(harness.markdown_table(["tokens", "dense target; indexer scores", "step s", "peak memory GiB"],
                                        [[r["tokens"], r["variant"], f"{r['seconds']:.2f}",
                                          f"{r['peak_bytes'] / 2**30:.2f}"] for r in rows]))
    lines += ["", "The eager kernel materialises the 128 heads' [T, S] scores and probabilities in fp32; "
              "dense_attention_target holds [T, S] and 64 MiB blocks of heads, for a second pass over the scores. "
              "Autograd keeps the indexer's ReLU'd products, fp32 [T, S, index_n_heads] = T^2 x 256 bytes per layer "
              "(0.25 GiB at 1K tokens, 1 GiB at 2K, 4 GiB at 4K); rescored in backward, one block of them (64 MiB) "
              "exists at a time, for one more pass of the scoring GEMMs."]
    return "\n".join(lines) + "\n"


def summarise(rows, args, info, report, total_s, config: dict) -> str:
    lines = harness.section_head("DeepSeek-V3.2 indexer training: dense warm-up, then sparse (indexer_training)",
                                 report, " (shared machine: other jobs ran at the same time)")
    lines += [f"Model: {args.config} with index_topk={args.topk}, index_n_heads={args.index_heads}, "
              f"index_head_dim={args.index_head_dim} ({harness.config_line(config)}); blocks of {args.block_size} "
              f"tokens of Python standard-library source ({info['files']} files, {info['train_blocks']} train "
              f"blocks), batch {args.batch_size}; eval on {info['eval_blocks']} held-out blocks. Pretrain "
              f"{args.pretrain_steps} steps at lr {args.pretrain_lr} (dense attention), warm-up {args.stage_steps} "
              f"steps at lr {args.warmup_lr}, sparse stage and dense control {args.stage_steps} steps each at lr "
              f"{args.sparse_lr} (constant). Total {total_s / 60:.1f} min.", ""]
    headers = ["after", "LM loss, dense attention", "LM loss, top-k attention", "indexer KL",
               f"top-{args.topk} recall (indexer)", f"recall of the {args.topk} latest keys", "train s/step"]
    lines.append(harness.markdown_table(headers, [[r["stage"], f"{r['lm_loss_dense']:.3f}", f"{r['lm_loss_sparse']:.3f}",
                                                   f"{r['indexer_kl']:.4f}", f"{r['recall']:.3f}",
                                                   f"{r['window_recall']:.3f}", f"{r['s_per_step']:.2f}"]
                                                  for r in rows]))
    lines += ["", "Recall: the share of the dense attention's head-summed probability mass on the selected keys, "
              f"over the queries with more than {args.topk} keys, mean over the main layers. The control row is "
              "the same steps with dense attention and no indexer loss: the sparse stage's LM loss is to be read "
              "against it."]
    return "\n".join(lines) + "\n"


def main():
    args = parse_args()
    harness.setup(threads=args.threads, seed=args.seed)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    report = harness.report_head("indexer_training")
    if args.warmup_memory:
        rows = warmup_memory(args)
        section = memory_section(rows, report)
        print(section)
        harness.write_json(out / "indexer_warmup_memory.json", {"args": vars(args), **report, "rows": rows})
        if out.resolve() == RESULTS_DIR.resolve():
            harness.write_section("indexer-warmup-memory", section)
        return
    t0 = time.perf_counter()

    from modeling_deepseek import DeepseekConfig, DeepseekForCausalLM
    from trainers import DeepseekTrainer
    from trainers.indexer_training import DeepseekIndexerTrainer

    config = DeepseekConfig.from_pretrained(args.config, index_topk=args.topk, index_n_heads=args.index_heads,
                                            index_head_dim=args.index_head_dim, dsa_impl="dense",
                                            max_position_embeddings=max(2048, args.block_size))
    print(f"building the corpus and tokenizer ({args.files} stdlib files) ...", file=sys.stderr)
    train, eval_ids, info = build_data(args, config.vocab_size)
    model = DeepseekForCausalLM(config)
    rows = []

    def run(trainer, stage: str, lm=None):
        start = time.perf_counter()
        trainer.train()
        seconds = (time.perf_counter() - start) / max(1, trainer.state.global_step)
        row = {"stage": stage, **measure(lm or model, eval_ids, args.topk), "s_per_step": seconds}
        print(row, file=sys.stderr)
        rows.append(row)

    run(DeepseekTrainer(model=model, args=trainer_args(out, "pretrain", args.pretrain_steps, args.pretrain_lr, args),
                        train_dataset=train), f"pretraining ({args.pretrain_steps} steps, dense)")
    model.config.dsa_impl = "sparse"  # from here on the model is a V3.2 model; the warm-up attends densely itself
    run(DeepseekIndexerTrainer(model=model, args=trainer_args(out, "warmup", args.stage_steps, args.warmup_lr, args),
                               train_dataset=train, indexer_stage="dense"),
        f"dense warm-up ({args.stage_steps} steps)")
    control = copy.deepcopy(model)  # (its own config too: deepcopy copies the one its layers share, once)
    control.config.dsa_impl = "dense"
    run(DeepseekIndexerTrainer(model=model, args=trainer_args(out, "sparse", args.stage_steps, args.sparse_lr, args),
                               train_dataset=train, indexer_stage="sparse"),
        f"sparse stage ({args.stage_steps} steps)")
    from trainers.indexer_training import prepare_indexer_stage

    prepare_indexer_stage(control, None)
    run(DeepseekTrainer(model=control, args=trainer_args(out, "control", args.stage_steps, args.sparse_lr, args),
                        train_dataset=train), f"control: dense ({args.stage_steps} steps)", lm=control)
    total = time.perf_counter() - t0

    shape = {k: getattr(config, k) for k in ("hidden_size", "num_hidden_layers", "num_attention_heads",
                                             "kv_lora_rank", "qk_rope_head_dim", "vocab_size")}
    table = summarise(rows, args, info, report, total, shape)
    print(table)
    harness.write_json(out / "indexer_training.json",
                       {"args": vars(args), **report, "data": info, "total_seconds": total, "rows": rows})
    if out.resolve() == RESULTS_DIR.resolve():
        harness.write_section("indexer-training", table)


if __name__ == "__main__":
    main()

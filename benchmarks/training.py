"""Training throughput: forward + backward + AdamW step, ours against transformers' DeepseekV3ForCausalLM.

    python -m benchmarks.training --device cpu --steps 10 --batch 4 --seq 256

Same checkpoint (the serving benchmark's 3-layer 512-wide shape, vocab 4096), same random batches, same optimizer:

    peer       transformers' DeepseekV3ForCausalLM, experts_implementation="grouped_mm" (its default; checked below),
               loss = next-token CE (its router bias never updates)
    ours       DeepseekForCausalLM with the full V3 training signal: one MTP module (num_nextn_predict_layers=1,
               loss CE + 0.3 * MTP CE), the sequence-wise balance loss (seq_balance_alpha 1e-4) and the
               auxiliary-loss-free bias update (gamma 1e-3, applied by the optimizer pre-step hook)
    ours_nomtp the same without the MTP module (the peer's amount of work), for reference

Any model name with the suffix `_compiled` (e.g. `--models peer,peer_compiled,ours,ours_compiled`) is the same model
wrapped in torch.compile (inductor, what `TrainingArguments(torch_compile=True)` does), timed after its warm-up steps
have compiled it; its loss curve is reported next to the eager one's.

Steps are interleaved (peer, ours, ours_nomtp, peer, ...) after --warmup untimed steps each, so that load from other
processes hits all models alike. Reported: tokens/s from the best and from the median step time, and the FLOP
bound: the peer's training FLOPs per token over ours (modeling_deepseek.ledger), i.e. the ratio ours would reach
if both ran at the same FLOP rate. The MTP module's share of the FLOPs depends on the depth (--config-overrides
'{"num_hidden_layers": 12}'): 40% next to 3 layers, 3.7% next to DeepSeek-V3's 61.
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

from benchmarks import harness, models
from benchmarks.harness import RESULTS_DIR, RESULTS_MD
from benchmarks.measure import clock, median
from benchmarks.models import DTYPES

import torch

MODELS = ("peer", "ours", "ours_nomtp")
TARGET = 1.0  # ours (full training signal) / peer tokens per second


OPTIMIZERS = {
    # transformers' Trainer default with torch >= 2.8 (optim="adamw_torch_fused")
    "adamw_fused": lambda params, lr: torch.optim.AdamW(params, lr=lr, fused=True),
    # torch's default implementation (a single-tensor loop on CPU)
    "adamw": lambda params, lr: torch.optim.AdamW(params, lr=lr),
}


def flop_bound(config: dict, seq: int) -> dict:
    """Training FLOPs per token of the peer (no MTP) and of ours (+ one MTP module), from the ledger at the mean
    causal context seq / 2."""
    from modeling_deepseek import DeepseekConfig
    from modeling_deepseek.ledger import ledger

    row = ledger(DeepseekConfig(**{k: v for k, v in config.items() if k != "num_mtp_layers"},
                                num_nextn_predict_layers=1), context=seq // 2)
    peer = row["train_flops_per_token"]
    ours = peer + 3 * row["mtp_flops_per_token"]
    return {"peer_train_flops_per_token": peer, "ours_train_flops_per_token": ours, "bound": peer / ours}


def build(name: str, ckpt, dtype, device):
    if name.endswith("_compiled"):  # torch.compile around the eager model of the same name
        model, info = build(name.removesuffix("_compiled"), ckpt, dtype, device)
        return torch.compile(model), dict(info, compiled="torch.compile (inductor)")
    if name == "peer":
        model = models.load_peer(ckpt, dtype, device, experts_implementation="grouped_mm")
        info = {"experts_implementation": model.config._experts_implementation,
                "attn_implementation": model.config._attn_implementation}
    else:
        mtp = 1 if name == "ours" else 0
        model = models.load_ours(ckpt, dtype, device, num_nextn_predict_layers=mtp, seq_balance_alpha=1e-4,
                                 use_bias_update=True, bias_update_speed=1e-3, mtp_loss_weight=0.3,
                                 allow_missing_weights=True)  # the MTP module is new: initialised, not loaded
        info = {"experts_implementation": model.config._experts_implementation,
                "attn_implementation": model.config._attn_implementation,
                "num_nextn_predict_layers": model.config.num_nextn_predict_layers,
                "seq_balance_alpha": model.config.seq_balance_alpha,
                "bias_update_speed": model.config.bias_update_speed}
    model.train()
    info["parameters"] = sum(p.numel() for p in model.parameters())
    return model, info


def train_step(model, optimizer, ids):
    optimizer.zero_grad(set_to_none=True)
    out = model(input_ids=ids, labels=ids)
    out.loss.backward()
    optimizer.step()
    return out


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--dtype", default="fp32", choices=list(DTYPES))
    p.add_argument("--steps", type=int, default=10, help="timed steps per model")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps per model first")
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--seq", type=int, default=256)
    p.add_argument("--lr", type=float, default=1e-4)
    p.add_argument("--optim", default="adamw_fused", choices=list(OPTIMIZERS),
                   help="adamw_fused: Trainer's default optimizer; adamw: torch's default AdamW implementation")
    p.add_argument("--config-overrides", default="{}",
                   help='JSON merged into the reference shape, e.g. \'{"num_hidden_layers": 12}\'')
    p.add_argument("--models", default=",".join(MODELS), help=f"subset of {','.join(MODELS)}")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's own)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--profile", action="store_true",
                   help="after timing, torch.profiler tables of three more steps per model (written next to --json-out)")
    p.add_argument("--json-out", default=None, help="default: benchmarks/results/training_<device>_<dtype>.json")
    return p.parse_args(argv)


def main(argv=None) -> dict:
    args = parse_args(argv)
    harness.setup(args.device, args.threads)
    dtype = DTYPES[args.dtype]
    names = [m for m in args.models.split(",") if m]
    json_out = Path(args.json_out or RESULTS_DIR / f"training_{args.device}_{args.dtype}.json")
    report = {
        **harness.report_head("training", args.device),
        "settings": {"device": args.device, "dtype": args.dtype, "steps": args.steps, "warmup": args.warmup,
                     "batch": args.batch, "seq": args.seq, "lr": args.lr, "optimizer": {
                         "adamw_fused": "torch.optim.AdamW(fused=True) (Trainer's default optim adamw_torch_fused)",
                         "adamw": "torch.optim.AdamW (torch's default implementation)"}[args.optim],
                     "threads": torch.get_num_threads(), "seed": args.seed},
        "config": dict(models.REFERENCE_SHAPE, **json.loads(args.config_overrides)),
        "models": {},
    }
    with tempfile.TemporaryDirectory(prefix="bench_training_") as tmp:
        models.make_checkpoint(Path(tmp) / "ckpt", seed=args.seed, **json.loads(args.config_overrides))
        built, optims = {}, {}
        for name in names:
            built[name], report["models"][name] = build(name, Path(tmp) / "ckpt", dtype, args.device)
            optims[name] = OPTIMIZERS[args.optim](built[name].parameters(), args.lr)
    vocab = report["config"]["vocab_size"]
    report["flops"] = flop_bound(report["config"], args.seq)
    g = torch.Generator().manual_seed(args.seed)
    batches = [torch.randint(3, vocab, (args.batch, args.seq), generator=g).to(args.device)
               for _ in range(args.warmup + args.steps)]
    times = {n: [] for n in names}
    losses = {n: [] for n in names}
    bias_before = {n: _bias_snapshot(built[n]) for n in names}
    for i, ids in enumerate(batches):
        step_s = {}
        for name in names:
            t0 = clock(args.device)
            out = train_step(built[name], optims[name], ids)
            step_s[name] = clock(args.device) - t0
            if i >= args.warmup:
                times[name].append(step_s[name])
            losses[name].append({k: float(v) for k, v in (("loss", out.loss), ("mtp_loss", getattr(out, "mtp_loss", None)),
                                                           ("balance_loss", getattr(out, "balance_loss", None)))
                                 if v is not None})
        print(f"step {i + 1}/{len(batches)}{' (warm-up)' if i < args.warmup else ''}: "
              + "  ".join(f"{n} {t:.3f}s" for n, t in step_s.items()), flush=True)
    if args.profile:
        from torch.profiler import ProfilerActivity, profile

        acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if args.device == "cuda" else [])
        sort = "self_cuda_time_total" if args.device == "cuda" else "self_cpu_time_total"
        for name in names:
            with profile(activities=acts, record_shapes=True) as prof:
                for ids in batches[-3:]:
                    train_step(built[name], optims[name], ids)
                torch.cuda.synchronize() if args.device == "cuda" else None
            table = prof.key_averages(group_by_input_shape=True).table(
                sort_by=sort, row_limit=30, max_name_column_width=40, max_shapes_column_width=60)
            path = json_out.with_name(json_out.stem + f"_profile_{name}.txt")
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(f"three training steps of {name} (batch {args.batch} x seq {args.seq}), by operator "
                            f"and input shapes\n{table}\n")
            report["models"][name]["profile_file"] = path.name
    tokens = args.batch * args.seq
    for name in names:
        r = report["models"][name]
        r.update(step_s=times[name], tokens_per_s=tokens / min(times[name]),
                 tokens_per_s_median=tokens / median(times[name]), first_loss=losses[name][0],
                 last_loss=losses[name][-1], bias_moved=_bias_moved(bias_before[name], built[name]))
    if "peer" in names:
        for name in names:
            if name != "peer":
                report["models"][name]["ratio_vs_peer"] = (report["models"][name]["tokens_per_s"]
                                                           / report["models"]["peer"]["tokens_per_s"])
                report["models"][name]["ratio_vs_peer_median"] = (report["models"][name]["tokens_per_s_median"]
                                                                  / report["models"]["peer"]["tokens_per_s_median"])
        if "ours" in names:
            ratio = report["models"]["ours"]["ratio_vs_peer"]
            report["target"] = {"what": "training tokens/s ours (MTP + balancing) / peer", "target": TARGET,
                                "measured": ratio, "met": ratio >= TARGET, "flop_bound": report["flops"]["bound"]}
    harness.write_json(json_out, report)
    print(render_table(report))
    print(f"wrote {json_out}")
    return report


def _bias_snapshot(model):
    return [b.detach().clone() for n, b in model.named_buffers() if n.endswith("e_score_correction_bias")]


def _bias_moved(before, model) -> bool:
    after = _bias_snapshot(model)
    return any(not torch.equal(a, b) for a, b in zip(before, after))


def render_table(report) -> str:
    headers = ["model", "experts impl", "MTP", "balancing (seq loss / bias update)", "tokens/s (best)",
               "tokens/s (median)", "vs peer (best / median)", "loss first -> last", "router bias moved"]
    rows = []
    for name, r in report["models"].items():
        mtp = r.get("num_nextn_predict_layers", 0)
        bal = (f"alpha {r['seq_balance_alpha']:g} / gamma {r['bias_update_speed']:g}" if not name.startswith("peer")
               else "none (bias frozen)")
        ratio = (f"{r['ratio_vs_peer']:.2f}x / {r['ratio_vs_peer_median']:.2f}x" if "ratio_vs_peer" in r else "-")
        rows.append([name, r["experts_implementation"], str(mtp), bal, r["tokens_per_s"], r["tokens_per_s_median"],
                     ratio, f"{r['first_loss']['loss']:.3f} -> {r['last_loss']['loss']:.3f}",
                     "yes" if r["bias_moved"] else "no"])
    out = harness.markdown_table(headers, rows)
    compiled = [(n, r) for n, r in report["models"].items() if n.endswith("_compiled")
                and n.removesuffix("_compiled") in report["models"]]
    if compiled:
        out += "\n\ntorch.compile against eager (tokens/s, best / median): " + "; ".join(
            f"{n}: {r['tokens_per_s'] / report['models'][n.removesuffix('_compiled')]['tokens_per_s']:.2f}x / "
            f"{r['tokens_per_s_median'] / report['models'][n.removesuffix('_compiled')]['tokens_per_s_median']:.2f}x"
            for n, r in compiled)
    t = report.get("target")
    if t:
        out += (f"\n\ntarget: {t['what']} >= {t['target']:.1f}x: measured {t['measured']:.2f}x -> "
                f"{'met' if t['met'] else 'MISSED'}")
    f = report.get("flops")
    if f:
        out += (f"\n\nFLOP bound (ledger, mean causal context seq/2): training FLOPs per token peer "
                f"{f['peer_train_flops_per_token'] / 1e6:,.1f}M, ours with MTP {f['ours_train_flops_per_token'] / 1e6:,.1f}M "
                f"-> at an equal FLOP rate ours runs at {f['bound']:.2f}x the peer's tokens/s")
    return out


def render_section(report, results_dir: Path = RESULTS_DIR, md_dir: Path = RESULTS_MD.parent) -> str:
    """This benchmark's RESULTS.md section from its report; `results_dir` holds the report's side files, `md_dir`
    is the folder of the RESULTS.md that links to them."""
    s = report["settings"]
    head = harness.section_head(f"Training: forward + backward + AdamW step ({s['device']}, {s['dtype']})", report)
    return "\n".join(head + [
        f"Model: DeepseekV3Config({harness.config_line(report['config'])}), batch {s['batch']} x seq "
        f"{s['seq']}, {s['optimizer']} lr {s['lr']}, {s['steps']} timed steps per model after {s['warmup']} warm-up "
        f"steps, models interleaved step by step; {s['threads']} torch threads. Peer: "
        f"`DeepseekV3ForCausalLM.from_pretrained(..., experts_implementation=\"grouped_mm\")` (the value its config "
        "reports is in the table), CE loss only. Ours: MTP depth 1 (loss CE + 0.3 MTP CE), sequence-wise balance loss, "
        "bias update after each optimizer step; `ours_nomtp` drops the MTP module (the peer's amount of work).",
        "",
        render_table(report),
        "",
        "Parameters: " + ", ".join(f"{n} {r['parameters'] / 1e6:.2f}M" for n, r in report["models"].items()) + ".",
    ] + ([
        "",
        "torch.profiler tables (three steps each, written by `--profile`): " + ", ".join(
            f"[{n}]({(results_dir / r['profile_file']).relative_to(md_dir).as_posix()})"
            for n, r in report["models"].items() if r.get("profile_file")) + "."
    ] if any(r.get("profile_file") for r in report["models"].values()) else []))


if __name__ == "__main__":
    main()

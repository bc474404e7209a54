"""Compute planner: what a FLOP budget buys, and what a config costs to train.

    python -m trainers.plan --compute 1e21 [--seq-len 4096] [--json]
    python -m trainers.plan --config hub_configs/deepseek-v3 --tokens 14.8e12 --gpu H800 --gpu-hours 2.788e6

`--compute C` applies the scaling laws of DeepSeek LLM (2024, section 3), fitted on dense models from 1e17 to 3e20
FLOPs, with C = M D:

    batch        B_opt   = 0.2920 C^0.3271  tokens
    learning rate eta_opt = 0.3118 C^-0.1250
    model scale  M_opt   = 0.1715 C^0.5243  non-embedding training FLOPs per token, M = 72 n_layer d^2 + 12 n_layer d l_seq
    data         D_opt   = 5.8316 C^0.4757  tokens

and suggests a dense shape (n_layer, d_model) whose M is close to M_opt at the requested aspect ratio d_model / n_layer.

`--config DIR --tokens D` prices a config: training FLOPs per token from the cost ledger (modeling_deepseek.ledger,
on the meta device: active experts only, MLA attention over l_seq tokens, the MTP modules), times D tokens; with
`--gpu` and `--mfu`, GPU-hours; with `--gpu-hours`, the MFU those hours imply.

From dense to MoE (our extension, not fitted by DeepSeek): M is read as the *active* non-embedding training FLOPs per
token, 6 x (parameters one token touches, without the embedding and the output head) + 6 x attention (MLA scores
and weighted sums over l_seq tokens, per layer) -- what the ledger counts. The MTP modules and the output head are
left out of M (as the head is from DeepSeek LLM's M) but are counted in the training FLOPs that GPU-hours come from.
DeepSeek LLM's M counts attention over the full l_seq (no causal halving); so does the ledger.
"""

from __future__ import annotations

import argparse
import json
import math
import sys

# The fitted laws (DeepSeek LLM, 2024): coefficient, exponent.
BATCH_LAW = (0.2920, 0.3271)
LR_LAW = (0.3118, -0.1250)
MODEL_LAW = (0.1715, 0.5243)
DATA_LAW = (5.8316, 0.4757)
FIT_RANGE = (1e17, 3e20)  # compute budgets the laws were fitted on

# Dense tensor-core peaks per GPU (no 2:4 sparsity), TFLOPS.
PEAK_TFLOPS = {
    # H100 SXM5: NVIDIA H100 datasheet, 1,979 bf16 / 3,958 fp8 "with sparsity", halved for dense.
    "H100": {"bf16": 989.4, "fp8": 1978.9},
    # H800 SXM5: the H100 SXM5 die and clocks with NVLink cut to 400 GB/s (NVIDIA H800 datasheet; DeepSeek-V3
    # technical report, section 3.1): the same tensor-core peaks.
    "H800": {"bf16": 989.4, "fp8": 1978.9},
    # H200 SXM: NVIDIA H200 datasheet, the H100's compute with HBM3e (1,979 bf16 / 3,958 fp8 with sparsity).
    "H200": {"bf16": 989.4, "fp8": 1978.9},
    # B200 (HGX, 1,000 W): NVIDIA HGX B200 datasheet, 4.5 PFLOPS bf16 / 9 PFLOPS fp8 with sparsity.
    "B200": {"bf16": 2250.0, "fp8": 4500.0},
    # A100 SXM: NVIDIA A100 datasheet, 312 bf16 dense; no fp8 tensor cores.
    "A100": {"bf16": 312.0},
}
# DeepSeek-V3 technical report, table 1: 2,664K (pre-training) + 119K (context extension) + 5K (post-training)
# = 2,788K H800 GPU-hours for the whole model, pre-trained on 14.8T tokens in FP8 mixed precision.
V3_GPU_HOURS, V3_PRETRAIN_GPU_HOURS, V3_TOKENS = 2.788e6, 2.664e6, 14.8e12


def _law(law: tuple[float, float], compute: float) -> float:
    coef, exp = law
    return coef * compute ** exp


def model_flops_per_token(n_layer: int, d_model: int, seq_len: int) -> float:
    """DeepSeek LLM's M: non-embedding training FLOPs per token of a dense transformer."""
    return 72 * n_layer * d_model**2 + 12 * n_layer * d_model * seq_len


def suggest_shape(target_m: float, seq_len: int, aspect: float, multiple: int = 64) -> tuple[int, int]:
    """(n_layer, d_model) with d_model a multiple of `multiple`, M close to `target_m` and d_model / n_layer close to
    `aspect`: for each depth the width solving M(n, d) = target_m (a quadratic in d), then the depth whose
    aspect ratio is nearest (in log space)."""
    best = None
    for n in range(1, 1025):
        a, b = 72 * n, 12 * n * seq_len
        d = (-b + math.sqrt(b * b + 4 * a * target_m)) / (2 * a)
        if d < multiple:
            break
        d = max(multiple, round(d / multiple) * multiple)
        score = abs(math.log(d / n / aspect)) + abs(math.log(model_flops_per_token(n, d, seq_len) / target_m))
        if best is None or score < best[0]:
            best = (score, n, d)
    if best is None:
        raise ValueError(f"a model scale of {target_m:.3g} FLOPs/token is below one layer of width {multiple}")
    return best[1], best[2]


def plan_compute(compute: float, seq_len: int = 4096, aspect: float = 128.0) -> dict:
    """The compute-optimal allocation and hyperparameters for a budget of `compute` training FLOPs."""
    batch = _law(BATCH_LAW, compute)
    m_opt, d_opt = _law(MODEL_LAW, compute), _law(DATA_LAW, compute)
    n_layer, d_model = suggest_shape(m_opt, seq_len, aspect)
    m_shape = model_flops_per_token(n_layer, d_model, seq_len)
    return {
        "compute": compute,
        "batch_tokens": batch,
        "learning_rate": _law(LR_LAW, compute),
        "model_flops_per_token": m_opt,
        "train_tokens": d_opt,
        "seq_len": seq_len,
        "batch_sequences": max(1, round(batch / seq_len)),
        "train_steps": max(1, round(d_opt / batch)),
        "n_layer": n_layer,
        "d_model": d_model,
        "shape_flops_per_token": m_shape,
        "shape_non_embedding_params": 12 * n_layer * d_model**2,
        "in_fitted_range": FIT_RANGE[0] <= compute <= FIT_RANGE[1],
    }


def config_flops(config, seq_len: int = 4096) -> dict:
    """Training FLOPs per token of a DeepSeek config, from the ledger: `model_flops_per_token` (M, the scaling laws'
    quantity: active, non-embedding, no MTP) and `train_flops_per_token` (everything a step computes: M, the output
    head and the MTP modules; the embedding lookup is no matmul and counts nothing)."""
    from modeling_deepseek.ledger import ledger

    row = ledger(config, context=seq_len)
    head = config.vocab_size * config.hidden_size
    # The ledger's forward counts 2 FLOPs per active weight, an untied input embedding included: a lookup, no matmul.
    lookup = 0 if config.tie_word_embeddings else head
    forward = row["flops_per_token"] - 2 * lookup
    model_flops = 3 * (forward - 2 * head)
    train = 3 * (forward + row["mtp_flops_per_token"])
    return {
        "active_params": row["active_params"],
        "total_params": row["total_params"],
        "model_flops_per_token": model_flops,
        "train_flops_per_token": train,
        "mtp_share": 3 * row["mtp_flops_per_token"] / train,
    }


def plan_config(config, tokens: float, seq_len: int = 4096, gpu: str = "H800", precision: str = "bf16",
                mfu: float = 0.4, gpu_hours: float | None = None) -> dict:
    """FLOPs and GPU-hours to train `config` on `tokens` tokens; with `gpu_hours`, the MFU they imply."""
    peak = gpu_peak(gpu, precision)
    flops = config_flops(config, seq_len)
    total = flops["train_flops_per_token"] * tokens
    compute_m = flops["model_flops_per_token"] * tokens  # C = M D, the laws' budget
    out = {
        "config": getattr(config, "name_or_path", None) or None,
        "tokens": tokens,
        "seq_len": seq_len,
        **flops,
        "train_flops": total,
        "compute": compute_m,
        "gpu": gpu.upper(),
        "precision": precision,
        "peak_flops": peak,
        "mfu": mfu,
        "gpu_hours": total / (peak * mfu) / 3600,
        # what the dense laws would choose at this budget, for comparison (an extrapolation for MoE)
        "law_batch_tokens": _law(BATCH_LAW, compute_m),
        "law_learning_rate": _law(LR_LAW, compute_m),
        "law_train_tokens": _law(DATA_LAW, compute_m),
    }
    if gpu_hours is not None:
        out["given_gpu_hours"] = gpu_hours
        out["implied_mfu"] = total / (gpu_hours * 3600 * peak)
    return out


def gpu_peak(gpu: str, precision: str) -> float:
    """Dense peak FLOP/s of `gpu` at `precision`."""
    key = gpu.upper()
    if key not in PEAK_TFLOPS:
        raise ValueError(f"unknown GPU {gpu!r}; known: {', '.join(PEAK_TFLOPS)}")
    if precision not in PEAK_TFLOPS[key]:
        raise ValueError(f"{key} has no {precision} peak; known: {', '.join(PEAK_TFLOPS[key])}")
    return PEAK_TFLOPS[key][precision] * 1e12


def _positive(name: str):
    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{name} must be a positive number, got {text!r}") from None
        if not math.isfinite(value) or value <= 0:
            raise argparse.ArgumentTypeError(f"{name} must be a positive number, got {text!r}")
        return value

    parse.__name__ = name  # argparse names the type in its message
    return parse


def _fraction(text: str) -> float:
    value = _positive("--mfu")(text)
    if value > 1:
        raise argparse.ArgumentTypeError(f"--mfu is a fraction of peak in (0, 1], got {text!r}")
    return value


def _sci(x: float) -> str:
    return f"{x:.3e}"


def format_compute(row: dict) -> str:
    lines = [
        ("compute budget C", f"{_sci(row['compute'])} FLOPs"
         + ("" if row["in_fitted_range"] else "  (outside the fitted 1e17-3e20: an extrapolation)")),
        ("batch size", f"{_sci(row['batch_tokens'])} tokens = {row['batch_sequences']:,} sequences of "
                       f"{row['seq_len']}"),
        ("learning rate", f"{row['learning_rate']:.3e}"),
        ("model scale M", f"{_sci(row['model_flops_per_token'])} non-embedding FLOPs/token"),
        ("training tokens D", f"{_sci(row['train_tokens'])} ({row['train_steps']:,} steps)"),
        ("a dense shape for M", f"n_layer={row['n_layer']}, d_model={row['d_model']}: M = "
                                f"{_sci(row['shape_flops_per_token'])}, "
                                f"{row['shape_non_embedding_params'] / 1e6:,.1f}M non-embedding parameters"),
    ]
    width = max(len(k) for k, _ in lines)
    return "\n".join(f"{k:<{width}}  {v}" for k, v in lines)


def format_config(row: dict) -> str:
    lines = [
        ("config", str(row["config"])),
        ("parameters: total / active", f"{row['total_params']:.4g} / {row['active_params']:.4g}"),
        ("M (active, non-embedding)", f"{_sci(row['model_flops_per_token'])} FLOPs/token @ {row['seq_len']} ctx"),
        ("training FLOPs / token", f"{_sci(row['train_flops_per_token'])} (head and MTP included; MTP "
                                   f"{100 * row['mtp_share']:.1f}%)"),
        ("training FLOPs", f"{_sci(row['train_flops'])} for {_sci(row['tokens'])} tokens"),
        ("GPU-hours", f"{row['gpu_hours']:,.{0 if row['gpu_hours'] >= 100 else 3}g} on {row['gpu']} ({row['precision']} peak "
                      f"{row['peak_flops'] / 1e12:,.0f} TFLOPS) at {100 * row['mfu']:.0f}% MFU"),
        ("dense laws at C = M D", f"lr {row['law_learning_rate']:.2e}, batch {_sci(row['law_batch_tokens'])} tokens, "
                                  f"D_opt {_sci(row['law_train_tokens'])} tokens"),
    ]
    if "implied_mfu" in row:
        lines.append(("MFU implied", f"{100 * row['implied_mfu']:.1f}% of {row['precision']} peak by "
                                     f"{row['given_gpu_hours']:,.0f} GPU-hours"))
    width = max(len(k) for k, _ in lines)
    return "\n".join(f"{k:<{width}}  {v}" for k, v in lines)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m trainers.plan", description=__doc__.split("\n\n")[0],
        epilog="From dense to MoE: the laws were fitted on dense models (1e17-3e20 FLOPs). For a MoE config, M is\n"
               "read as the ACTIVE non-embedding training FLOPs per token: 6 x the parameters one token touches\n"
               "(routed experts it does not visit left out; no embedding, no output head) + 6 x MLA attention over\n"
               "l_seq tokens, as the cost ledger counts them, and the laws are applied to C = M x D. Training FLOPs\n"
               "(for GPU-hours and MFU) add the output head and the MTP modules.",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    what = parser.add_mutually_exclusive_group(required=True)
    what.add_argument("--compute", type=_positive("--compute"), metavar="C",
                      help="training FLOPs budget: print the compute-optimal allocation (DeepSeek LLM's laws)")
    what.add_argument("--config", metavar="DIR", help="a config folder (or config.json) to price; needs --tokens")
    parser.add_argument("--tokens", type=_positive("--tokens"), metavar="D", help="training tokens, with --config")
    parser.add_argument("--seq-len", type=int, default=4096, help="sequence length l_seq (default 4096)")
    parser.add_argument("--aspect", type=_positive("--aspect"), default=128.0,
                        help="d_model / n_layer of the suggested dense shape (default 128)")
    parser.add_argument("--gpu", default="H800", help=f"one of {', '.join(PEAK_TFLOPS)} (default H800)")
    parser.add_argument("--precision", default="bf16", choices=("bf16", "fp8"), help="whose peak MFU is of")
    parser.add_argument("--mfu", type=_fraction, default=0.4, help="assumed MFU for GPU-hours (default 0.4)")
    parser.add_argument("--gpu-hours", type=_positive("--gpu-hours"), metavar="H",
                        help="GPU-hours actually spent: print the MFU they imply")
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of a table")
    return parser


def _attach_negative_values(argv: list[str]) -> list[str]:
    """`--compute -1e20` as `--compute=-1e20`: argparse takes "-1e20" for an option (its negative-number pattern has
    no exponent) and would say only "expected one argument", not that the value must be positive."""
    out = []
    for arg in argv:
        if out and out[-1].startswith("--") and "=" not in out[-1] and arg.startswith("-"):
            try:
                float(arg)
            except ValueError:
                pass
            else:
                out[-1] = f"{out[-1]}={arg}"
                continue
        out.append(arg)
    return out


def main(argv: list[str] | None = None) -> None:
    parser = build_parser()
    args = parser.parse_args(_attach_negative_values(sys.argv[1:] if argv is None else list(argv)))
    if args.seq_len <= 0:
        parser.error(f"--seq-len must be a positive integer, got {args.seq_len}")
    if args.compute is not None:
        if args.tokens is not None or args.gpu_hours is not None:
            parser.error("--tokens and --gpu-hours go with --config, not --compute")
        row = plan_compute(args.compute, args.seq_len, args.aspect)
        print(json.dumps(row) if args.json else format_compute(row))
        return
    if args.tokens is None:
        parser.error("--config needs --tokens (the number of training tokens)")
    try:
        gpu_peak(args.gpu, args.precision)
    except ValueError as e:
        parser.error(str(e))
    from modeling_deepseek.ledger import load_config

    row = plan_config(load_config(args.config), args.tokens, args.seq_len, args.gpu, args.precision, args.mfu,
                      args.gpu_hours)
    row["config"] = args.config
    print(json.dumps(row) if args.json else format_config(row))


if __name__ == "__main__":
    sys.exit(main())

"""Worker for tests/test_parallel.py: the tiny model loaded through transformers' distributed engine
(`from_pretrained(..., distributed_config=DistributedConfig(...))`) on 2 CPU ranks, against the same checkpoint loaded
in one process, for every layout named on the command line; one torchrun launch serves them all.

    torchrun --nproc_per_node 2 tests/_parallel_worker.py OUT CKPTS LAYOUT [LAYOUT ...]

CKPTS holds checkpoints of the tiny model: `plain`, `tied` (tied embeddings: layouts named *_tied) and `q_proj` (a
full-rank query projection as in V2-Lite, q_lora_rank=None: layouts named *_q_proj). Layouts named *_eager load
with experts_implementation="eager" (the per-expert loop, which must skip the expert-parallel sentinel itself).
Every rank writes OUT/rank{r}.json:
{layout: {measurement: value}}; an exception goes to OUT/rank{r}.error.txt. Every measurement is a collective over
both ranks in the same order (DTensor gathers), so both ranks run every line.
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

GEN_TOKENS = 8


def layouts():
    from transformers.distributed import DistributedConfig

    return {
        "tp": lambda: DistributedConfig(tp_size=2),
        "ep": lambda: DistributedConfig(tp_size=2, tp_plan={}, ep_size=2),
        "ep_all_to_all": lambda: DistributedConfig(tp_size=2, tp_plan={}, ep_size=2, ep_implementation="all_to_all"),
        "tp_ep": lambda: DistributedConfig(tp_size=2, ep_size=2),
        "fsdp": lambda: DistributedConfig(fsdp_size=2),
        "fsdp_ep": lambda: DistributedConfig(fsdp_size=2, ep_size=2),
        "ep_eager": lambda: DistributedConfig(tp_size=2, tp_plan={}, ep_size=2),
        "tp_q_proj": lambda: DistributedConfig(tp_size=2),
        # transformers' TensorParallelTesterMixin loads these two (its EP cases through the deprecated flag)
        "mixin_tp": lambda: DistributedConfig(tp_size=2),
        "mixin_tp_tied": lambda: DistributedConfig(tp_size=2),
        "mixin_ep": lambda: DistributedConfig(tp_size=2, enable_expert_parallel=True),
        "mixin_ep_tied": lambda: DistributedConfig(tp_size=2, enable_expert_parallel=True),
    }


def full(t: torch.Tensor) -> torch.Tensor:
    return t.full_tensor() if hasattr(t, "full_tensor") else t


def local(t: torch.Tensor) -> torch.Tensor:
    return t.to_local() if hasattr(t, "to_local") else t


def diff(a, b) -> float:
    return (full(a).detach().float() - b.detach().float()).abs().max().item()


def grad_diffs(model, ref) -> dict[str, float]:
    ref_params = dict(ref.named_parameters())
    out = {}
    for name, p in model.named_parameters():  # same order on every rank: full_tensor is a collective
        r = ref_params[name]
        if p.grad is None or r.grad is None:
            out[name] = None if p.grad is None and r.grad is None else float("inf")
        else:
            out[name] = diff(p.grad, r.grad)
    return out


def train_step(model, ids, with_embeds: bool = True):
    """Loss parts and the gradient of the input embeddings of one training forward + backward."""
    model.train()
    model.zero_grad(set_to_none=True)
    embeds = model.get_input_embeddings()(ids).detach().requires_grad_(True) if with_embeds else None
    out = model(inputs_embeds=embeds, labels=ids) if with_embeds else model(ids, labels=ids)
    out.loss.backward()
    return out, (full(embeds.grad) if with_embeds else None)


def generate(model, prompt, **kwargs):
    model.eval()
    with torch.no_grad():
        return model.generate(prompt, max_new_tokens=kwargs.pop("max_new_tokens", GEN_TOKENS), do_sample=False,
                              output_scores=True, return_dict_in_generate=True, **kwargs)


def set_mla_impl(model, impl: str) -> None:
    for module in model.modules():
        if hasattr(module, "mla_impl"):
            module.mla_impl = impl


def compare_generation(model, ref, prompt, **kwargs) -> dict:
    a, b = generate(model, prompt, **kwargs), generate(ref, prompt, **kwargs)
    return {"tokens_equal": torch.equal(a.sequences, b.sequences),
            "scores_diff": max(diff(x, y) for x, y in zip(a.scores, b.scores)), "tokens": a.sequences.tolist()}


def measure(name: str, model, ref) -> dict:
    from conftest import random_ids

    rec = {"rank": torch.distributed.get_rank()}
    ref_params = dict(ref.named_parameters())
    rec["local_numel"] = {n: local(p).numel() for n, p in model.named_parameters()}
    rec["full_numel"] = {n: p.numel() for n, p in ref_params.items()}
    rec["local_shape"] = {n: list(local(p).shape) for n, p in model.named_parameters()}
    rec["local_bytes"] = sum(local(p).numel() * p.element_size() for p in model.parameters())
    rec["full_bytes"] = sum(p.numel() * p.element_size() for p in ref.parameters())

    if name.startswith("mixin"):
        # The mixin's own shapes: batch 2 x 64 tokens, ids over the whole vocabulary, 25 generated tokens.
        torch.manual_seed(0)
        ids = torch.randint(0, ref.config.vocab_size, (2, 64))
        model.eval(), ref.eval()
        with torch.no_grad():
            rec["logits_diff"] = diff(model(ids).logits, ref(ids).logits)
        model.train(), ref.train()
        labels = torch.randint(0, ref.config.vocab_size, (2, 64))
        model.zero_grad(set_to_none=True), ref.zero_grad(set_to_none=True)
        loss, ref_loss = model(ids, labels=labels).loss, ref(ids, labels=labels).loss
        loss.backward(), ref_loss.backward()
        rec["loss_diff"] = abs(loss.item() - ref_loss.item())
        # the mixin compares each rank's local gradient shard with the same slice of the reference gradient
        local_grad_diffs = {}
        for n, p in model.named_parameters():
            g, r = p.grad, ref_params[n].grad
            if g is None or r is None:
                continue
            g = local(g)
            for dim in range(r.ndim):
                if r.shape[dim] != g.shape[dim]:
                    r = r.narrow(dim, rec["rank"] * g.shape[dim], g.shape[dim])
                    break
            local_grad_diffs[n] = (g - r).abs().max().item()
        rec["local_grad_diffs"] = local_grad_diffs
        torch.manual_seed(0)
        prompt = torch.randint(0, ref.config.vocab_size, (1, 10))
        rec["generation"] = compare_generation(model, ref, prompt, max_new_tokens=25)
        return rec

    ids = random_ids(2, 12, seed=3)
    model.eval(), ref.eval()
    with torch.no_grad():
        rec["logits_diff"] = diff(model(ids).logits, ref(ids).logits)

    out, embeds_grad = train_step(model, ids)
    ref_out, ref_embeds_grad = train_step(ref, ids)
    for part in ("loss", "main_loss", "mtp_loss", "balance_loss"):
        rec[f"{part}_diff"] = abs(getattr(out, part).item() - getattr(ref_out, part).item())
    rec["loss"] = out.loss.item()
    rec["input_grad_diff"] = diff(embeds_grad, ref_embeds_grad)
    rec["grad_diffs"] = grad_diffs(model, ref)

    prompt = random_ids(1, 10, seed=5)
    rec["greedy"] = compare_generation(model, ref, prompt)
    if name.startswith("tp"):
        # Each rank's heads decode over the whole latent cache, absorbed (its own W_UK / W_UV) or expanded.
        for impl in ("absorbed", "expanded"):
            set_mla_impl(model, impl), set_mla_impl(ref, impl)
            rec[f"greedy_{impl}"] = compare_generation(model, ref, prompt)
        # A forced absorbed path in training: the latent's gradient must be summed over the ranks' heads.
        set_mla_impl(model, "absorbed"), set_mla_impl(ref, "absorbed")
        out, embeds_grad = train_step(model, ids)
        ref_out, ref_embeds_grad = train_step(ref, ids)
        rec["absorbed_train"] = {"loss_diff": abs(out.loss.item() - ref_out.loss.item()),
                                 "input_grad_diff": diff(embeds_grad, ref_embeds_grad),
                                 "grad_diffs": grad_diffs(model, ref)}
        set_mla_impl(model, "auto"), set_mla_impl(ref, "auto")
        # Prefill in chunks of 4 tokens, each attending to the latent cache of the chunks before.
        long_prompt = random_ids(1, 14, seed=6)
        rec["greedy_chunked"] = compare_generation(model, ref, long_prompt, prefill_chunk_size=4)
        plain = generate(ref, long_prompt)
        rec["greedy_chunked"]["equals_unchunked"] = rec["greedy_chunked"]["tokens"] == plain.sequences.tolist()
        # Self-speculative decoding with the MTP module: the same tokens as plain greedy decoding.
        with torch.no_grad():
            model.eval()
            spec = model.generate(prompt, max_new_tokens=GEN_TOKENS, do_sample=False, use_mtp=True,
                                  return_dict_in_generate=True)
        rec["mtp_speculative"] = {"tokens_equal": spec.sequences.tolist() == rec["greedy"]["tokens"],
                                  "drafted": spec.mtp_drafted, "accepted": spec.mtp_accepted}
    return rec


def main(out: Path, ckpts: Path, names: list[str]) -> None:
    import transformers

    from modeling_deepseek import DeepseekForCausalLM

    torch.set_num_threads(1)
    transformers.logging.set_verbosity_error()
    records = {}
    for name in names:
        path = ckpts / next((kind for kind in ("tied", "q_proj") if name.endswith(kind)), "plain")
        kwargs = {"experts_implementation": "eager"} if name.endswith("_eager") else {}
        model = DeepseekForCausalLM.from_pretrained(path, distributed_config=layouts()[name](), **kwargs)
        ref = DeepseekForCausalLM.from_pretrained(path, **kwargs)
        assert model.config._experts_implementation == ref.config._experts_implementation
        records[name] = measure(name, model, ref)
        del model
    rank = torch.distributed.get_rank()
    (out / f"rank{rank}.json").write_text(json.dumps(records))
    torch.distributed.barrier()


if __name__ == "__main__":
    out_dir = Path(sys.argv[1])
    try:
        main(out_dir, Path(sys.argv[2]), sys.argv[3:])
    except Exception:
        (out_dir / f"rank{os.environ.get('RANK', 0)}.error.txt").write_text(traceback.format_exc())
        raise

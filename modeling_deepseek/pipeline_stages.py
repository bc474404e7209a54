"""The pipeline split of DeepseekForCausalLM: stage modules built from the model's own modules.

transformers declares a model's pipeline cut points on its config (`base_model_pp_plan`, DeepseekConfig carries the
same plan as transformers' DeepseekV3Config): `embed_tokens` feeds `layers`, which feed `norm`. A split into S stages

    stage 0        embed_tokens, layers [0, n_0)
    stage s        layers [n_{s-1}, n_s)
    stage S-1      layers [.., N), norm, lm_head, the MTP modules (model.layers[N:]) and their shared_head norms

holds references to the modules of one DeepseekForCausalLM (the same Parameters: an optimizer over the stages trains
that model, and its state_dict saves as a checkpoint). `prune_to_stages` then drops from the model what no local stage
holds, so a rank keeps only its layers in memory.

Layer rule (uneven counts): every stage gets floor(N / S) decoder layers and the N mod S extra layers go to the stages
nearest the middle of the pipeline (of two equally near, the earlier), because the two end stages already carry the
embedding, and the head and MTP module. S > N cannot split (a stage without a layer) and raises naming both numbers.

The MTP module needs the input embeddings Emb(t_{i+k}) next to the last hidden state. Under V placement (rank r holds
stages r and 2P-1-r: DualPipeV, ZBV) the first and the last stage live on the same rank, so the last stage looks the
tokens up itself in the very `embed_tokens` of stage 0 (one Parameter, gradients from both uses add up in it), as
DeepSeek-V3 places them. Under loop placement the last stage is on another rank: stage 0 sends the embeddings down the
pipeline beside the hidden state (`carry_embeddings`), and their gradient comes back the same way, so there is still
one embedding, never a copy.

The sequence-wise balance loss of a MoE layer is a term of the loss, but the loss only exists on the last stage. Each
stage therefore attaches its layers' balance loss to the hidden state it sends on (`attach_loss`): identity forward,
and in backward the attached loss receives gradient 1, exactly what it would get were it added to the loss.
"""

from __future__ import annotations

import torch
from torch import nn

from .balancing import record_loads

PP_PLAN_ORDER = ("embed_tokens", "layers", "norm")  # base_model_pp_plan's modules in data-flow order


def stage_layer_counts(num_layers: int, num_stages: int) -> list[int]:
    """Decoder layers per stage under the rule of the module docstring."""
    if num_stages < 1 or num_stages > num_layers:
        raise ValueError(f"cannot split {num_layers} decoder layers into {num_stages} pipeline stages: every stage "
                         f"needs at least one layer (use at most {num_layers} stages, i.e. pp * stages_per_rank <= "
                         f"{num_layers})")
    base, extra = divmod(num_layers, num_stages)
    middle_first = sorted(range(num_stages), key=lambda s: (abs(2 * s - (num_stages - 1)), s))
    counts = [base] * num_stages
    for s in middle_first[:extra]:
        counts[s] += 1
    return counts


def stage_layer_ranges(num_layers: int, num_stages: int) -> list[range]:
    counts, start, ranges = stage_layer_counts(num_layers, num_stages), 0, []
    for n in counts:
        ranges.append(range(start, start + n))
        start += n
    return ranges


class _AttachLoss(torch.autograd.Function):
    """Identity on x; `loss` gets gradient 1 in backward (a loss term computed away from the loss's stage)."""

    @staticmethod
    def forward(ctx, x, loss):
        return x.clone()  # a new tensor, not a view: torch's pipeline stages detach their outputs in place

    @staticmethod
    def backward(ctx, grad_x):
        return grad_x, torch.ones((), dtype=grad_x.dtype, device=grad_x.device)


def attach_loss(x: torch.Tensor, loss: torch.Tensor) -> torch.Tensor:
    return _AttachLoss.apply(x, loss)


class DeepseekPipelineStage(nn.Module):
    """Stage `index` of `num_stages` over `lm`'s own modules (see the module docstring for what each stage holds).

    forward: stage 0 takes input_ids [B, T]; the others take the previous stage's output. The output is the hidden
    state [B, T, D] (after model.norm on the last stage), with the input embeddings beside it when they travel
    (`carry_embeddings`). Positions are 0..T-1 and every token is real (no padding mask: pack sequences instead).

    `balance_share` is the share of the whole batch's sequences one micro-batch of `B` sequences carries, set by the
    runner; each training forward appends its attached balance loss (detached) to `balance_log` for reporting.
    """

    def __init__(self, lm, index: int, num_stages: int, layers: range, carry_embeddings: bool):
        super().__init__()
        cfg = lm.config
        if set(type(cfg).base_model_pp_plan) != set(PP_PLAN_ORDER):
            raise ValueError(f"{type(cfg).__name__}.base_model_pp_plan names {sorted(type(cfg).base_model_pp_plan)}; "
                             f"this split builds {PP_PLAN_ORDER}")
        self.config = cfg
        self.index, self.num_stages = index, num_stages
        self.is_first, self.is_last = index == 0, index == num_stages - 1
        self.carry_embeddings = carry_embeddings
        self._model = [lm.model]  # a list: the stage borrows the model's helpers, not all of its parameters
        self.layer_ids = list(layers)
        self.layers = nn.ModuleList(lm.model.layers[i] for i in layers)
        # The last stage looks the MTP inputs up itself when it shares the rank with stage 0 (V placement).
        needs_embedding = self.is_first or (self.is_last and not carry_embeddings and cfg.num_nextn_predict_layers)
        self.embed_tokens = lm.model.embed_tokens if needs_embedding else None
        if self.is_last:
            self.norm, self.lm_head = lm.model.norm, lm.lm_head
            self.mtp_layers = nn.ModuleList(lm.model.mtp_layers)
        self.balance_share = lambda batch: 1.0
        self.balance_log: list[torch.Tensor] = []

    @property
    def moe_layers(self) -> list[nn.Module]:
        return [layer.moe for layer in self.layers if layer.moe is not None]

    def forward(self, x, embeds_BTD=None):
        model = self._model[0]
        if self.is_first:
            embeds_BTD = model.embed_tokens(x)
            h_BTD = embeds_BTD
        else:
            h_BTD = x
        positions = torch.arange(h_BTD.shape[1], device=h_BTD.device).unsqueeze(0)
        shared = model.block_inputs(h_BTD, None, None, positions)
        for layer in self.layers:
            h_BTD = layer(h_BTD, **shared)
        if model.training and torch.is_grad_enabled():  # the model's mode (lm.train() / lm.eval()), not the stage's
            record_loads(self.moe_layers, self.config)
            terms = [moe.last_balance_loss for moe in self.moe_layers if moe.last_balance_loss is not None]
            if terms:
                balance = self.balance_share(h_BTD.shape[0]) * torch.stack(terms).sum()
                self.balance_log.append(balance.detach())
                h_BTD = attach_loss(h_BTD, balance)
        if self.is_last:
            h_BTD = self.norm(h_BTD)
        return (h_BTD, embeds_BTD) if self.carry_embeddings else h_BTD


class _NotHere(nn.Module):
    """Stands where the model keeps a module that another pipeline rank holds (no parameters, never runs)."""

    moe = None

    def __init__(self, name: str):
        super().__init__()
        self.name = name

    def forward(self, *args, **kwargs):
        raise RuntimeError(f"{self.name} lives on another pipeline rank")


def prune_to_stages(lm, stages: list[DeepseekPipelineStage]) -> None:
    """Replace in `lm` every decoder / MTP layer, embedding, norm and head that none of `stages` holds by a
    placeholder, so that this rank's model owns (and saves, and optimizes) exactly its stages' parameters."""
    kept = {id(m) for stage in stages for m in stage.modules()}
    model = lm.model
    for i, layer in enumerate(model.layers):
        if id(layer) not in kept:
            model.layers[i] = _NotHere(f"model.layers.{i}")
    for owner, name, path in ((model, "embed_tokens", "model.embed_tokens"), (model, "norm", "model.norm"),
                              (lm, "lm_head", "lm_head")):
        if id(getattr(owner, name)) not in kept:
            setattr(owner, name, _NotHere(path))


def pipeline_rank_bytes(config, pp_size: int, stages_per_rank: int = 2, placement: str = "v", ep_size: int = 1,
                        dp_size: int = 1, weight_bytes: int = 2, grad_bytes: int = 4,
                        optimizer_bytes: int = 4 + 2 + 2) -> list[dict]:
    """What each pipeline rank holds under pp_size ranks x stages_per_rank stages (the layer rule above; placement
    "v": rank r holds stages r and 2P-1-r, "loop": r, r+P, ...), routed experts split over ep_size ranks, and ZeRO-1
    (optimizer state split over dp_size data-parallel ranks, weights and gradients whole; an expert shard's state over
    its dp_size / ep_size replicas; dp_size=1: no ZeRO-1). Counted on a meta-device
    model, MTP included. Defaults are V3's recipe: bf16 weights, fp32 gradients, fp32 master weights with bf16 AdamW
    moments (8 B per parameter of optimizer state)."""
    from .modeling import DeepseekForCausalLM

    with torch.device("meta"):
        lm = DeepseekForCausalLM(config)
    num_stages = pp_size * stages_per_rank
    ranges = stage_layer_ranges(config.num_hidden_layers, num_stages)
    rows = []
    for rank in range(pp_size):
        stages = [rank, num_stages - 1 - rank] if placement == "v" else [rank + k * pp_size
                                                                          for k in range(stages_per_rank)]
        modules = {}
        for s in stages:
            modules.update({f"model.layers.{i}": lm.model.layers[i] for i in ranges[s]})
            if s == 0:
                modules["model.embed_tokens"] = lm.model.embed_tokens
            if s == num_stages - 1:
                modules.update({"model.norm": lm.model.norm, "lm_head": lm.lm_head})
                modules.update({f"model.layers.{config.num_hidden_layers + k}": m
                                for k, m in enumerate(lm.model.mtp_layers)})
        params = {id(p): (f"{prefix}.{n}", p.numel()) for prefix, m in modules.items()
                  for n, p in m.named_parameters()}
        held = sum(n / ep_size if ".mlp.experts." in name else n for name, n in params.values())
        # ZeRO-1 shards each parameter's state over the ranks that hold a copy of it: all dp_size replicas for the
        # replicated parameters; for an expert shard, the dp_size / ep_size replicas of it (none beyond itself when
        # ep_size >= dp_size), so an expert's state per rank is n / max(dp_size, ep_size).
        states = sum(n / max(dp_size, ep_size) if ".mlp.experts." in name else n / dp_size
                     for name, n in params.values())
        rows.append({"rank": rank, "stages": stages, "layers": sum(len(ranges[s]) for s in stages),
                     "parameters": int(held), "weight_bytes": int(held * weight_bytes),
                     "grad_bytes": int(held * grad_bytes), "optimizer_bytes": int(states * optimizer_bytes)})
    return rows


__all__ = ["DeepseekPipelineStage", "attach_loss", "pipeline_rank_bytes", "prune_to_stages", "stage_layer_counts",
           "stage_layer_ranges"]

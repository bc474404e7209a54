"""The lightning indexer's training objective: DeepSeek-V3.2's two stages (DSA; V3.2 report, section 2.1).

The indexer (indexer.py) scores, for every query t, each key s it may attend: I[t, s]. Sparse attention then attends
to the top-k of those only. The indexer is trained to predict where the main attention looks:

    p[t, :] = L1-normalise( sum over heads h of P_h[t, :] )           (the main attention, head-summed; a target)
    L_I     = mean over the scored queries t of  KL( p[t, X_t] || softmax(I[t, X_t]) )

- dense warm-up (`stage="dense"`): X_t is every key query t may attend (causal, not padding, the caller's 4-D mask).
  The main attention runs dense and the main model is frozen: the indexer alone trains, on L_I alone (V3.2: 1000
  steps of 16 x 128K tokens at a learning rate of 1e-3).
- sparse stage (`stage="sparse"`): X_t = S_t, the indexer's own top-k. The main attention attends to S_t only, so
  p[t, S_t] is its actual distribution. The indexer's inputs (the hidden state and the query's low-rank activation)
  are detached: L_I trains the indexer and nothing else, the language-modelling loss trains the main model and not
  the indexer (the top-k indices carry no gradient).

p is computed in fp32 and detached: it is a target, not a path for gradients into the main attention. A key outside
X_t counts in neither distribution: the indexer's softmax is taken over X_t (its other scores are filled with the
lowest float, so that a query with no key at all still has a finite softmax; it counts in no mean).

Reductions: each layer's L_I is a mean over its scored queries (real tokens with at least one key), the layers' L_I
are summed as the MoE balance losses are (objective.py): each layer's indexer gets exactly the gradient of its own
KL, and the two stages' losses compare across batch shapes.

The pieces here are functions of tensors. In the model, `set_indexer_training_stage` asks every indexer to record
its scores, its selection and the main attention's head-summed distribution (indexer.IndexerRecord, left on the
indexer by sparse_attention.py); objective.training_objective turns the records into the layers' L_I
(`recorded_indexer_losses`), adds their sum to the loss and reports it as `indexer_loss`.

Memory, which is what limits the context a stage trains at: autograd would keep, per layer, the indexer's ReLU'd
products (fp32 [T, S, index_n_heads]: 4 GiB at 4K tokens with V3.2's 64 heads) and, for the dense target, the main
attention's [H, T, S] probabilities. In a stage the indexer's scores are computed without a graph and
_RescoredIndexerKL's backward recomputes them one query block at a time; the dense target is recomputed beside the
attention kernel a few heads at a time (dense_attention_target). Both are checked against plain autograd and the
eager probabilities in tests/test_indexer_training.py.
"""

from __future__ import annotations

import torch

from .indexer import SCORE_BLOCK_BYTES

INDEXER_STAGES = ("dense", "sparse")


def check_stage(stage: str | None) -> str | None:
    """`stage` if it is one of INDEXER_STAGES or None (no indexer loss); anything else raises, naming it."""
    if stage is not None and stage not in INDEXER_STAGES:
        raise ValueError(f"indexer training stage {stage!r} is not one of {INDEXER_STAGES} (or None: no indexer loss)")
    return stage


def indexer_kl(index_scores_BTX: torch.Tensor, target_BTX: torch.Tensor, valid_BTX: torch.Tensor,
               query_mask_BT: torch.Tensor | None = None) -> torch.Tensor:
    """mean over the scored queries of KL(target || softmax(index scores)), both over each query's valid keys.

    `index_scores_BTX` carry the gradient (to the indexer); `target_BTX` is a distribution over the valid keys
    (indexer.head_summed_distribution). A query is scored when `query_mask_BT` (None: all) says it is a real token
    and it has at least one valid key. 0 when none is scored."""
    scores_BTX = index_scores_BTX.float().masked_fill(~valid_BTX, torch.finfo(torch.float32).min)
    log_q_BTX = scores_BTX.log_softmax(dim=-1).masked_fill(~valid_BTX, 0.0)
    target_BTX = target_BTX.float()
    # xlogy: 0 log 0 = 0 where the target has no mass.
    kl_BT = (torch.special.xlogy(target_BTX, target_BTX) - target_BTX * log_q_BTX).sum(dim=-1)
    scored_BT = valid_BTX.any(dim=-1).expand_as(kl_BT)
    if query_mask_BT is not None:
        scored_BT = scored_BT & query_mask_BT.bool()
    return (kl_BT * scored_BT).sum() / scored_BT.sum().clamp_min(1)


def _keys_of(record):
    """(the indexer's scores over X, which keys of X count) of a record: every allowed key, or the selected ones."""
    if record.topk_BTK is None:
        return record.scores_BTS, torch.isfinite(record.scores_BTS.detach())
    return record.scores_BTS.gather(-1, record.topk_BTK), record.valid_BTK


def layer_indexer_loss(record, query_mask_BT: torch.Tensor | None = None) -> torch.Tensor | None:
    """One layer's L_I from what its forward recorded (indexer.IndexerRecord): over every allowed key where nothing
    was selected (dense warm-up; or k covered every key, where the sparse stage's S_t is every allowed key), else
    over the selected keys. None where the main attention's distribution was not recorded. A record with `rescore`
    (an indexer training stage) gets its gradient from _RescoredIndexerKL."""
    if record is None or record.attention_BTX is None:
        return None
    if record.rescore is not None:
        params = tuple(p for p in record.indexer.parameters() if p.requires_grad)
        return _RescoredIndexerKL.apply(record, query_mask_BT, record.keys_BSD, *params)
    scores_BTX, valid_BTX = _keys_of(record)
    return indexer_kl(scores_BTX, record.attention_BTX, valid_BTX, query_mask_BT)


class _RescoredIndexerKL(torch.autograd.Function):
    """L_I of one layer whose indexer scores were computed without a graph: the loss from those scores; in backward,
    dL/dI[t, x] = (softmax(I[t, X_t])[x] sum_x p[t, x] - p[t, x]) / scored queries (0 outside X_t), then the scores are
    recomputed one query block at a time (`record.rescore`) and that gradient is pulled through each block's graph to
    the indexer's parameters and its keys. Autograd would keep the whole [T, S, heads] of ReLU'd products between
    forward and backward (T^2 x 256 bytes per layer at V3.2's 64 heads); this holds one block of it, for one more
    pass of the scoring GEMMs."""

    @staticmethod
    def forward(ctx, record, query_mask_BT, keys_BSD, *params):
        scores_BTX, valid_BTX = _keys_of(record)
        ctx.record, ctx.query_mask_BT = record, query_mask_BT
        ctx.save_for_backward(keys_BSD, *params)
        return indexer_kl(scores_BTX, record.attention_BTX, valid_BTX, query_mask_BT)

    @staticmethod
    def backward(ctx, grad_loss):
        keys_BSD, *params = ctx.saved_tensors
        record, query_mask_BT = ctx.record, ctx.query_mask_BT
        # The analytic gradient of indexer_kl with respect to the scores, on the whole [B, T, X] (no graph kept).
        with torch.enable_grad():
            scores_BTX, valid_BTX = _keys_of(record)
            scores_BTX = scores_BTX.detach().requires_grad_()
            loss = indexer_kl(scores_BTX, record.attention_BTX, valid_BTX, query_mask_BT)
            (grad_BTX,) = torch.autograd.grad(loss, scores_BTX, grad_loss)
        if record.topk_BTK is not None:  # back to the S keys the selection was taken from
            grad_BTX = torch.zeros_like(record.scores_BTS).scatter_(-1, record.topk_BTK, grad_BTX)
        B, T, S = grad_BTX.shape
        keys = keys_BSD.detach().requires_grad_(keys_BSD.requires_grad)
        leaves = [t for t in (keys, *params) if t.requires_grad]
        grads = [None] * len(leaves)
        block = max(1, SCORE_BLOCK_BYTES // (4 * record.indexer.n_heads * S * B))
        for t0 in range(0, T, block):
            t1 = min(T, t0 + block)
            with torch.enable_grad():
                scores_BtS = record.rescore(t0, t1, keys)
                # -inf at forbidden keys, whose gradient is 0: keep it out of the product.
                grad_BtS = grad_BTX[:, t0:t1].masked_fill(~torch.isfinite(scores_BtS.detach()), 0.0)
                block_grads = torch.autograd.grad(scores_BtS, leaves, grad_BtS, allow_unused=True)
            grads = [g if b is None else (b if g is None else g + b) for g, b in zip(grads, block_grads)]
        by_leaf = dict(zip(map(id, leaves), grads))
        return (None, None, by_leaf.get(id(keys)), *(by_leaf.get(id(p)) for p in params))


# Upper bound on the fp32 [B, heads, T, S] block of main-attention scores dense_attention_target holds at once.
TARGET_BLOCK_BYTES = 64 * 2**20


@torch.no_grad()
def dense_attention_target(attn, q_nope_BHTN: torch.Tensor, q_rope_BHTR: torch.Tensor, latent_B1SC: torch.Tensor,
                           k_rope_B1SR: torch.Tensor, allowed_BTS: torch.Tensor) -> torch.Tensor:
    """The dense warm-up's target p [B, T, S] (fp32), without the main attention's [B, H, T, S] probabilities.

    The attention layer `attn` (absorbable: attention.DeepseekAttention.absorbable) then runs its usual kernel, which
    never materialises them (SDPA); p is recomputed beside it in MLA's absorbed form, where every head attends as
    MQA with [q_nope W_UK | q_rope] against the cached [latent | rope key] rows, a few heads at a time so that at
    most TARGET_BLOCK_BYTES of scores exist at once. The same p as head_summed_distribution of the probabilities
    (tests/test_indexer_training.py: the warm-up's loss against the eager probabilities)."""
    B, H, T, nope = q_nope_BHTN.shape
    C, S = attn.kv_lora_rank, latent_B1SC.shape[2]
    w_uk_HNC = attn.absorbed_weight(q_nope_BHTN.dtype).view(H, -1, C)[:, :nope].float()
    keys_BXS = torch.cat((latent_B1SC.squeeze(1), k_rope_B1SR.squeeze(1)), dim=-1).float().transpose(1, 2)
    blocked_B1TS = ~allowed_BTS.unsqueeze(1)
    heads = max(1, TARGET_BLOCK_BYTES // (4 * B * T * S))
    summed_BTS = torch.zeros(B, T, S, dtype=torch.float32, device=q_nope_BHTN.device)
    for h0 in range(0, H, heads):
        h1 = min(H, h0 + heads)
        q_latent_BhTC = torch.matmul(q_nope_BHTN[:, h0:h1].float(), w_uk_HNC[h0:h1])
        q_BhTX = torch.cat((q_latent_BhTC, q_rope_BHTR[:, h0:h1].float()), dim=-1)
        scores_BhTS = torch.matmul(q_BhTX, keys_BXS.unsqueeze(1)) * attn.scaling
        summed_BTS += scores_BhTS.masked_fill(blocked_B1TS, torch.finfo(torch.float32).min).softmax(-1).sum(1)
    summed_BTS = summed_BTS.masked_fill(~allowed_BTS, 0.0)
    return summed_BTS / summed_BTS.sum(dim=-1, keepdim=True).clamp_min(torch.finfo(torch.float32).tiny)


# ---------------------------------------------------------------------------------------------------------------------
# The stage, as runtime state on the attention layers' indexers (not in the config: a checkpoint saved during the
# warm-up must not load as a model that attends densely), and the losses of what their forwards recorded.


def indexed_attentions(model) -> list:
    """The attention layers of `model` (a DeepseekModel, or anything whose `.model` is one: the causal LM, the
    pipeline's head view) that have a lightning indexer, the MTP modules' included."""
    layers = model.layers if isinstance(getattr(model, "layers", None), torch.nn.ModuleList) else model.model.layers
    # (getattr: a pipeline stage holds placeholders for the layers of other stages)
    attentions = [getattr(layer, "self_attn", None) for layer in layers]
    return [attn for attn in attentions if getattr(attn, "indexer", None) is not None]


def set_indexer_training_stage(model, stage: str | None) -> None:
    """Ask `model` for the indexer loss of `stage` ("dense", "sparse"; None: none) in every training forward, on
    every attention layer with an indexer: each indexer records what its loss needs (indexer.IndexerRecord), the
    dense warm-up attends densely, the sparse stage detaches the indexer's inputs. The parameters' requires_grad is
    the trainer's business (trainers/indexer_training.py). A model without an indexer raises."""
    check_stage(stage)
    attentions = indexed_attentions(model)
    if not attentions:
        raise ValueError(f"{type(model).__name__} has no lightning indexer: an indexer training stage needs a "
                         "DeepSeek-V3.2 model (index_topk set in the config)")
    for attn in attentions:
        indexer = attn.indexer
        indexer.training_stage = stage
        indexer.record = stage is not None
        indexer.detach_input = stage == "sparse"
        indexer.last_record = None


def forget_indexer_records(model) -> None:
    """Drop what the previous forward's indexers recorded (DeepseekModel.forward, first thing: the MTP modules may
    not run)."""
    for attn in indexed_attentions(model):
        attn.indexer.last_record = None


def recorded_indexer_losses(model, query_mask_BT: torch.Tensor | None = None) -> list[torch.Tensor]:
    """The L_I of every attention layer whose indexer recorded this forward in an indexer training stage, in a
    forward that records gradients (objective.training_objective). The records are dropped once read: their
    [B, T, S] scores would otherwise outlive the step."""
    losses = []
    for attn in indexed_attentions(model):
        indexer = attn.indexer
        if getattr(indexer, "training_stage", None) is not None and attn.training and torch.is_grad_enabled():
            loss = layer_indexer_loss(indexer.last_record, query_mask_BT)
            if loss is not None:
                losses.append(loss)
            indexer.last_record = None
    return losses

"""Training DeepSeek-V3.2's lightning indexer with Trainer: the dense warm-up, then the sparse stage.

V3.2 was continued from V3.1 in two stages (V3.2 report, section 2.1; the loss: modeling_deepseek/indexer_loss.py):

    stage     attention   trains                      loss of the indexer            V3.2's run
    dense     dense       the indexers only           KL to the head-summed          1000 steps x 16 x 128K tokens,
                          (everything else frozen)    attention, every key           lr 1e-3
    sparse    top-k       everything: the main model  KL on its own top-k, its       15000 steps x 480 x 128K tokens,
                          on the LM loss, the         input detached                 lr 7.3e-6
                          indexers on their KL

One Trainer run per stage, as V3.2 did them (learning rates three orders of magnitude apart):

    DeepseekIndexerTrainer(model=model, args=warmup_args, indexer_stage="dense", ...).train()
    DeepseekIndexerTrainer(model=model, args=sparse_args, indexer_stage="sparse", ...).train()

The stage is set before the Trainer builds its optimizer (in train()), because Trainer gives the optimizer the
parameters that require gradients at that moment; DeepseekIndexerTrainer does it in its constructor and checks, when
it builds the optimizer, that the model is still in its stage. The model's `loss` is the whole objective,
CE + ... + indexer KL: in the warm-up the CE has no gradient (its parameters are frozen); DeepseekTrainerCallback logs
`indexer_loss` next to `lm_loss`.

The warm-up freezes the main model whole: its parameters, and its routers' aux-loss-free balancing bias (a buffer
the optimizer step would otherwise move; `bias_frozen`, modeling_deepseek/balancing.py). Leaving the warm-up (a later
stage, or None) gives back requires_grad to exactly the parameters the warm-up froze (a parameter the user had frozen
before stays frozen) and lets the biases move again.
"""

from __future__ import annotations

from modeling_deepseek.balancing import balancing_routers
from modeling_deepseek.indexer_loss import check_stage, indexed_attentions, set_indexer_training_stage

from .trainer import DeepseekTrainer

_FROZEN_BY_WARMUP = "_frozen_by_indexer_warmup"


def indexer_parameters(model) -> dict[str, object]:
    """The parameters of the lightning indexers inside `model`, by name."""
    ids = {id(p) for attn in indexed_attentions(model) for p in attn.indexer.parameters()}
    return {name: p for name, p in model.named_parameters() if id(p) in ids}


def prepare_indexer_stage(model, stage: str | None) -> str | None:
    """Put `model` (a DeepSeek-V3.2 causal LM) in an indexer training stage: "dense" freezes every parameter but the
    indexers'; "sparse" trains what was trainable before the warm-up, the indexers included; None ends indexer
    training (no indexer loss; the parameters the warm-up froze train again). Returns the stage."""
    check_stage(stage)
    set_indexer_training_stage(model, stage)  # raises for a model without an indexer
    indexer = indexer_parameters(model)
    for p in getattr(model, _FROZEN_BY_WARMUP, ()):  # leave the previous warm-up, if any
        p.requires_grad_(True)
    setattr(model, _FROZEN_BY_WARMUP, [])
    if stage == "dense":
        frozen = [p for name, p in model.named_parameters() if name not in indexer and p.requires_grad]
        for p in frozen:
            p.requires_grad_(False)
        setattr(model, _FROZEN_BY_WARMUP, frozen)
    for router in balancing_routers(model):  # the aux-loss-free balancing bias is the main model's too
        router.bias_frozen = stage == "dense"
    if stage is not None:  # both stages train the indexers
        for p in indexer.values():
            p.requires_grad_(True)
    return stage


class DeepseekIndexerTrainer(DeepseekTrainer):
    """DeepseekTrainer for one indexer training stage: `indexer_stage="dense"` or `"sparse"` (see the module
    docstring). The model is put in the stage when the trainer is built; it stays in it afterwards."""

    def __init__(self, *args, indexer_stage: str, **kwargs):
        if check_stage(indexer_stage) is None:
            raise ValueError("DeepseekIndexerTrainer needs indexer_stage='dense' or 'sparse'")
        self.indexer_stage = indexer_stage
        super().__init__(*args, **kwargs)
        prepare_indexer_stage(self.model, indexer_stage)

    def create_optimizer(self, *args, **kwargs):
        optimizer = super().create_optimizer(*args, **kwargs)
        # The stage may have been changed since this trainer was built (another trainer, prepare_indexer_stage):
        # Trainer would then train what that stage left trainable, not this one's parameters.
        stage_now = {getattr(attn.indexer, "training_stage", None) for attn in indexed_attentions(self.model)}
        if stage_now != {self.indexer_stage}:
            raise RuntimeError(
                f"the model is no longer in the indexer stage {self.indexer_stage!r} this trainer was built for "
                f"(its layers are in {sorted(map(str, stage_now))}): call prepare_indexer_stage(model, "
                f"{self.indexer_stage!r}) before train(), or build one trainer per stage just before its run")
        return optimizer

"""TRL's SFTTrainer, training the full DeepSeek objective.

trl 1.16's SFTTrainer patches the model's forward with a fused LM head (`trl.trainer.utils.add_fused_lm_head`) that
runs the backbone and scores the labels itself: the main next-token CE is right and the balancing bias still moves
once per optimizer step, but DeepseekForCausalLM.forward never runs, so the MTP loss and the sequence-wise balance
loss are neither trained nor logged, and the MTP module's router counts nothing.

DeepseekSFTTrainer computes the loss with the model's own forward (transformers' Trainer.compute_loss): CE +
mtp_loss_weight * MTP + balance loss, all logged by DeepseekTrainerCallback, which it adds (with atomic checkpoints,
like trainers.DeepseekTrainer). TRL's data handling (formatting, packing, completion-only masks) is unchanged; its
entropy and token-accuracy metrics are not logged. A plain SFTTrainer given `callbacks=[DeepseekTrainerCallback()]`
warns when training starts on a model with MTP or the sequence-balance loss (the callback sees the replaced forward).
"""

from __future__ import annotations

from transformers import Trainer
from trl import SFTTrainer

from .compat import restore_class_forward

from .trainer import DeepseekTrainerMixin


class DeepseekSFTTrainer(DeepseekTrainerMixin, SFTTrainer):
    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        # SFTTrainer patched the model's forward with its fused LM head, used only by its compute_loss; this
        # trainer's loss is the model's own forward, so put the class's forward back.
        restore_class_forward(self.model.get_base_model() if hasattr(self.model, "get_base_model") else self.model)

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        inputs = {**inputs, "use_cache": False}
        return Trainer.compute_loss(self, model, inputs, return_outputs=return_outputs,
                                    num_items_in_batch=num_items_in_batch)

"""DeepseekTrainer: transformers' Trainer with the DeepSeek integration switched on.

    trainer = DeepseekTrainer(model=model, args=args, train_dataset=...)       # a Trainer in every other respect

adds DeepseekTrainerCallback (lm_loss / mtp_loss / maxvio logging, eval_lm_loss and eval_perplexity, the MTP-weight
schedule; trainers/callbacks.py) and writes atomic checkpoints (trainers/checkpointing.py). The same two pieces work
on their own with any Trainer: `callbacks=[DeepseekTrainerCallback()]` and `make_checkpoints_atomic(trainer)`.
DeepseekTrainerMixin puts both on another Trainer class (TRL's: see trainers/sft.py).
"""

from __future__ import annotations

from transformers import Trainer

from .callbacks import DeepseekTrainerCallback
from .checkpointing import AtomicCheckpointMixin


class DeepseekTrainerMixin(AtomicCheckpointMixin):
    """Put before a Trainer class: `class MyTrainer(DeepseekTrainerMixin, SomeTrainer)`."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        callback = next((cb for cb in self.callback_handler.callbacks if isinstance(cb, DeepseekTrainerCallback)), None)
        if callback is None:
            callback = DeepseekTrainerCallback()
            self.add_callback(callback)
        # Trainer's on_init_end has passed: watch the model now, before an evaluate() that may come first.
        callback.watch(self.model)


class DeepseekTrainer(DeepseekTrainerMixin, Trainer):
    pass

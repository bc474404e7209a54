"""Task heads over DeepseekModel: sequence classification (reward models) and token classification.

Their forward and loss are transformers' generic heads'. Their __init__ is ours: the generic one builds the backbone
with AutoModel.from_config, which fails where this file runs as remote code (the config class transformers loads
there is not the one modeling.py imports); these build DeepseekModel directly. The backbone has no MTP module, since
a classifier predicts no next token.

Like modeling.py, this file is the entry point of its classes' remote code (save_pretrained writes
"heads.DeepseekFor..." into auto_map and copies this file with what it imports), and like it, it names
`@use_experts_implementation` (experts.py): transformers lets a model switch experts kernels
(`set_experts_implementation`) only when the module defining its class mentions that decorator.
"""

from __future__ import annotations

import copy

from torch import nn
from transformers.modeling_layers import GenericForSequenceClassification, GenericForTokenClassification

from .configuration import DeepseekConfig
from .modeling import DeepseekModel, DeepseekPreTrainedModel


def without_mtp(config: DeepseekConfig) -> DeepseekConfig:
    """The config of a task head's backbone: a classifier predicts no next tokens, so no MTP module is built (a causal
    LM checkpoint's MTP weights are then left unused on load, as its lm_head is)."""
    if not config.num_nextn_predict_layers:
        return config
    config = copy.deepcopy(config)
    config.num_nextn_predict_layers = 0
    return config


class DeepseekForSequenceClassification(GenericForSequenceClassification, DeepseekPreTrainedModel):
    """transformers' generic sequence-classification head over DeepseekModel (without MTP modules): `score` reads the
    last non-padding token (config.pad_token_id) of each sequence. With num_labels=1 it is a reward model (TRL's
    RewardTrainer, a GRPO reward function). The sequence-wise balance loss is not added to the task loss."""

    def __init__(self, config: DeepseekConfig):
        config = without_mtp(config)
        DeepseekPreTrainedModel.__init__(self, config)
        self.num_labels = config.num_labels
        self.model = DeepseekModel(config)
        self.score = nn.Linear(config.hidden_size, config.num_labels, bias=False)
        self.post_init()


class DeepseekForTokenClassification(GenericForTokenClassification, DeepseekPreTrainedModel):
    """transformers' generic token-classification head over DeepseekModel (without MTP modules): dropout
    (config.classifier_dropout, 0.1 when unset, as transformers' generic head), then `score` per token."""

    def __init__(self, config: DeepseekConfig):
        config = without_mtp(config)
        DeepseekPreTrainedModel.__init__(self, config)
        self.num_labels = config.num_labels
        self.model = DeepseekModel(config)
        dropout = getattr(config, "classifier_dropout", None)
        self.dropout = nn.Dropout(0.1 if dropout is None else dropout)
        self.score = nn.Linear(config.hidden_size, config.num_labels,
                               bias=getattr(config, "token_classification_bias", True))
        self.post_init()


# As in modeling.py: save_pretrained writes auto_map and copies the code, so the folder loads as remote code.
DeepseekForSequenceClassification.register_for_auto_class("AutoModelForSequenceClassification")
DeepseekForTokenClassification.register_for_auto_class("AutoModelForTokenClassification")

__all__ = ["DeepseekForSequenceClassification", "DeepseekForTokenClassification", "without_mtp"]

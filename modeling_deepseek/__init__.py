"""DeepSeek-V3 / V2 for the Hugging Face stack.

Importing this package registers model_type "deepseek" with AutoConfig, AutoModel, AutoModelForCausalLM,
AutoModelForSequenceClassification and AutoModelForTokenClassification, and the
checkpoint conversion that maps official per-expert keys (`mlp.experts.{j}.gate_proj.weight` ...) onto our fused
expert tensors on load and back on save. Both are idempotent: importing or reloading twice never raises.

Nothing else outside the package changes: no Trainer default, no class of another library is patched, and none of
trl / peft / datasets / bitsandbytes is imported. Training integration is explicit, in trainers/ (see the README):
`Trainer(..., callbacks=[DeepseekTrainerCallback()])`, or `trainers.DeepseekTrainer`.
"""

from transformers import (AutoConfig, AutoModel, AutoModelForCausalLM, AutoModelForSequenceClassification,
                          AutoModelForTokenClassification)

from .configuration import DeepseekConfig
from .heads import DeepseekForSequenceClassification, DeepseekForTokenClassification
from .modeling import DeepseekCausalLMOutput, DeepseekForCausalLM, DeepseekModel, DeepseekPreTrainedModel
from .balancing import update_balancing_bias
from .objective import max_violation


def _register() -> None:
    AutoConfig.register(DeepseekConfig.model_type, DeepseekConfig, exist_ok=True)
    AutoModel.register(DeepseekConfig, DeepseekModel, exist_ok=True)
    AutoModelForCausalLM.register(DeepseekConfig, DeepseekForCausalLM, exist_ok=True)
    AutoModelForSequenceClassification.register(DeepseekConfig, DeepseekForSequenceClassification, exist_ok=True)
    AutoModelForTokenClassification.register(DeepseekConfig, DeepseekForTokenClassification, exist_ok=True)


_register()

__all__ = [
    "DeepseekConfig",
    "DeepseekModel",
    "DeepseekForCausalLM",
    "DeepseekForSequenceClassification",
    "DeepseekForTokenClassification",
    "DeepseekPreTrainedModel",
    "DeepseekCausalLMOutput",
    "update_balancing_bias",
    "max_violation",
]

"""DeepSeek-V3 / V2 for the Hugging Face stack.

Importing this package registers model_type "deepseek" with AutoConfig, AutoModel and AutoModelForCausalLM, and the
checkpoint conversion that maps official per-expert keys (`mlp.experts.{j}.gate_proj.weight` ...) onto our fused
expert tensors on load and back on save. Both are idempotent: importing or reloading twice never raises.
"""

from transformers import AutoConfig, AutoModel, AutoModelForCausalLM

from .configuration import DeepseekConfig
from .modeling import DeepseekCausalLMOutput, DeepseekForCausalLM, DeepseekModel, DeepseekPreTrainedModel
from .balancing import update_balancing_bias, max_violation


def _register() -> None:
    AutoConfig.register(DeepseekConfig.model_type, DeepseekConfig, exist_ok=True)
    AutoModel.register(DeepseekConfig, DeepseekModel, exist_ok=True)
    AutoModelForCausalLM.register(DeepseekConfig, DeepseekForCausalLM, exist_ok=True)
    try:  # Trainer integration (every Trainer, TRL's too): MTP / MaxVio logging, the MTP-weight schedule, and
        # atomic checkpoints for DeepSeek models
        from trainers.callbacks import register_default_callback
        from trainers.checkpointing import install_default_atomic_checkpoints
    except ImportError:  # the package installed without its trainers/ sibling
        return
    register_default_callback()
    install_default_atomic_checkpoints()


_register()

__all__ = [
    "DeepseekConfig",
    "DeepseekModel",
    "DeepseekForCausalLM",
    "DeepseekPreTrainedModel",
    "DeepseekCausalLMOutput",
    "update_balancing_bias",
    "max_violation",
]

"""How a checkpoint becomes a model and a model a checkpoint: the loading policy of every Deepseek class.

`DeepseekLoadingMixin` sits in front of transformers' PreTrainedModel (DeepseekPreTrainedModel inherits both) and
changes what transformers would let pass quietly:

- from_pretrained is strict: a checkpoint holding some of the model's weights but lacking others raises, naming
  them, instead of initialising the gap randomly. Legitimate gaps load with a warning (a checkpoint holding none of
  the weights, a new task head) or silently (the MTP modules, a tied lm_head); `allow_missing_weights=True` accepts
  any gap.
- a distributed load (`distributed_config=`) checks the tensor / expert parallel layout against the config before
  any weight is read (parallel.py), and quantized checkpoints go through quantized.py around transformers' loader.
- save_pretrained refuses a model whose weights were kept in FP8 at load: no loader reads what it would write.
- the experts kernel transformers picks while building or loading a model falls back to the eager loop where
  grouped_mm cannot run the shapes.
"""

from __future__ import annotations

import re
import warnings

from transformers import PreTrainedConfig

from .balancing import balancing_routers
from .fp8 import DeepseekFP8Experts, DeepseekFP8Linear
from .parallel import check_parallel_layout
from .quantized import finish_quantized_load, prepare_quantized_load


class DeepseekLoadingMixin:
    """The loading and saving policy above; to be listed before PreTrainedModel among a model class's bases."""

    @classmethod
    def from_pretrained(cls, *args, allow_missing_weights: bool = False, **kwargs):
        """transformers' loader, made strict: a checkpoint that holds some of the model's weights but lacks others
        raises (a truncated or mismatched file), instead of initialising the gap randomly.

        What transformers treats as legitimate loads with a warning: a checkpoint that holds none of the model's
        weights (`state_dict={}`, every weight initialised on purpose), and a new task head (lm_head, score) over a
        checkpoint saved from another class (a base model, or a causal LM under a classification head).
        Known-optional weights are exempt: the MTP modules (transformers' DeepseekV3 drops them on save; they are then
        trained from scratch) and a tied lm_head. Pass `allow_missing_weights=True` to accept any gap.

        Hub kernels are off unless asked for (`use_kernels=True`): transformers would otherwise swap the activations
        for kernels downloaded at load on CUDA. This model's fast paths (absorbed MLA, grouped experts) are its own,
        loading needs no network, and what runs is what the parity tests checked.
        """
        kwargs.setdefault("use_kernels", False)
        want_info = kwargs.pop("output_loading_info", False)
        if kwargs.get("distributed_config") is not None:
            config = kwargs.get("config")
            if not isinstance(config, PreTrainedConfig):
                where = {k: kwargs[k] for k in ("cache_dir", "revision", "token", "local_files_only", "subfolder")
                         if k in kwargs}
                config = cls.config_class.from_pretrained(
                    args[0] if args else kwargs["pretrained_model_name_or_path"], **where)
            check_parallel_layout(config, kwargs["distributed_config"])
        # FP8 checkpoints (dequantized, or kept FP8 on CUDA) and bitsandbytes-quantized experts: see quantized.py
        args, kwargs, quant_plan = prepare_quantized_load(cls, args, kwargs)
        model, info = super().from_pretrained(*args, output_loading_info=True, **kwargs)
        model = finish_quantized_load(model, info, quant_plan)
        for router in balancing_routers(model):  # non-persistent, so never loaded: start from zero
            router.pending_load.zero_()
            router.has_pending_load = False
        missing = [k for k in info.get("missing_keys", []) if not model._is_optional_weight(k)]
        if missing and not set(model.state_dict()) - set(info.get("missing_keys", [])):
            warnings.warn(
                f"{cls.__name__}.from_pretrained: the checkpoint holds none of the model's weights; all were "
                "initialised (a checkpoint holding only some of them raises)", stacklevel=2,
            )
            missing = []
        new_head = model._new_head_weights(missing)
        if new_head:
            missing = [k for k in missing if k not in new_head]
            warnings.warn(
                f"{cls.__name__}.from_pretrained: the checkpoint was saved from "
                f"{', '.join(model.config.architectures)}, which has no {', '.join(sorted(new_head))}: initialised "
                "randomly; train the head before using it",
                stacklevel=2,
            )
        if missing and not allow_missing_weights:
            shown = ", ".join(sorted(missing)[:20])
            raise OSError(
                f"{cls.__name__}.from_pretrained: the checkpoint is missing {len(missing)} weight(s) the model needs: "
                f"{shown}{' ...' if len(missing) > 20 else ''}. Pass allow_missing_weights=True to initialise them."
            )
        return (model, info) if want_info else model

    def get_correct_experts_implementation(self, requested_experts: str | None) -> str:
        """transformers' choice, except that its grouped_mm kernel needs 16-byte aligned rows (hidden, 2 x expert and
        expert widths multiples of 8 elements): other shapes use the eager experts, or raise when grouped_mm was asked
        for by name."""
        implementation = super().get_correct_experts_implementation(requested_experts)
        c = self.config
        widths = (c.hidden_size, c.moe_intermediate_size)
        if implementation == "grouped_mm" and any(w % 8 for w in widths):
            if requested_experts == "grouped_mm":
                raise ValueError(f"experts_implementation='grouped_mm' needs hidden_size and moe_intermediate_size "
                                 f"to be multiples of 8 (16-byte aligned rows), got {widths}; use 'eager'")
            implementation = "eager"
        return implementation

    def save_pretrained(self, save_directory, *args, **kwargs):
        """transformers' save_pretrained; refuses a model whose weights were kept in FP8 at load
        (`fp8_keep_quantized`), which it would write in no layout any loader reads."""
        kept = [name for name, m in self.named_modules() if isinstance(m, (DeepseekFP8Linear, DeepseekFP8Experts))]
        if kept:
            raise ValueError(
                f"save_pretrained: {len(kept)} module(s) hold FP8 inference weights (e.g. {kept[0]}), loaded with "
                "fp8_keep_quantized. Save the FP8 checkpoint you loaded from as it is, or load it with "
                "fp8_keep_quantized=False to save in high precision (and `python -m modeling_deepseek.export --fp8` "
                "to write DeepSeek's FP8 layout again)."
            )
        return super().save_pretrained(save_directory, *args, **kwargs)

    def _new_head_weights(self, missing: list[str]) -> list[str]:
        """The missing weights outside the base model (a task head), when the checkpoint was saved for another task
        (a base model under any head, a causal LM under a classification head ...): that head is new, not truncated.
        A checkpoint of the same task (DeepseekV3ForCausalLM for DeepseekForCausalLM) must bring its head."""
        def task(name: str) -> str:
            return name[name.rfind("For"):] if "For" in name else "Model"

        saved_from = self.config.architectures or []
        if not saved_from or self.base_model is self or task(type(self).__name__) in map(task, saved_from):
            return []
        return [k for k in missing if not k.startswith(f"{self.base_model_prefix}.")]

    def _is_optional_weight(self, key: str) -> bool:
        """The MTP modules (layers from num_hidden_layers on) and a tied lm_head: a checkpoint may lack them."""
        match = re.search(r"layers\.(\d+)\.", key)
        if match and int(match.group(1)) >= self.config.num_hidden_layers:
            return True  # an MTP module
        return key.endswith("lm_head.weight") and self.config.tie_word_embeddings

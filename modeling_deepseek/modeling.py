"""DeepseekModel and DeepseekForCausalLM: the decoder stack, the LM head, MTP and the training-signal bookkeeping.

The layout follows transformers' DeepSeek classes (and so the official checkpoint keys):

    model.embed_tokens
    model.layers.{0 .. N-1}            DeepseekDecoderLayer   (dense FFN below first_k_dense_replace, MoE above)
    model.layers.{N .. N+D-1}          DeepseekMTPLayer       (the D multi-token-prediction modules)
    model.norm, lm_head

The loss with labels is   CE_main + mtp_loss_weight * mean_k CE_k + sum over MoE layers of the sequence-wise balance
loss, and the output carries each part on its own together with the per-layer expert load and MaxVio.
"""

from __future__ import annotations

import copy
import functools
import re
from dataclasses import dataclass

import torch
from torch import nn
from transformers import GenerationMixin, PreTrainedModel
from transformers import initialization as init
from transformers.cache_utils import Cache
from transformers.generation.utils import GenerateDecoderOnlyOutput
from transformers.utils import logging
from transformers.masking_utils import create_causal_mask
from transformers.modeling_outputs import MoeCausalLMOutputWithPast, MoeModelOutputWithPast

from .attention import prefix_causal_applies
from .balancing import balancing_routers, bias_update_enabled, max_violation, record_loads, track
from .cache import DeepseekLatentCache
from .speculative import mtp_generate
from .configuration import DeepseekConfig
from .decoder import DeepseekDecoderLayer
from .experts import DeepseekExperts
from .layers import DeepseekRMSNorm
from .mtp import DeepseekMTPLayer, mtp_inputs, mtp_labels
from .moe import DeepseekMoE
from .quantized import finish_quantized_load, prepare_quantized_load
from .rope import DeepseekRotaryEmbedding
from .routing import DeepseekTopkRouter


logger = logging.get_logger(__name__)


def _register_checkpoint_conversion() -> None:
    """Map official per-expert keys onto the fused expert tensors on load, and back on save.

    Lives here rather than in __init__ so that it also runs when this file is loaded as remote code.
    """
    from transformers.conversion_mapping import get_checkpoint_conversion_mapping, register_checkpoint_conversion_mapping

    register_checkpoint_conversion_mapping(
        DeepseekConfig.model_type, get_checkpoint_conversion_mapping("deepseek_v3"), overwrite=True
    )


_register_checkpoint_conversion()


@dataclass
class MTPGenerateOutput(GenerateDecoderOnlyOutput):
    """generate(use_mtp=True, return_dict_in_generate=True): the sequences plus how the drafts fared."""

    mtp_acceptance_rate: float | None = None
    mtp_drafted: int | None = None
    mtp_accepted: int | None = None


@dataclass
class DeepseekModelOutput(MoeModelOutputWithPast):
    """`pre_norm_hidden_state`: the last block's output before model.norm, the h^0 that MTP module 1 reads."""

    pre_norm_hidden_state: torch.Tensor | None = None


@dataclass
class DeepseekCausalLMOutput(MoeCausalLMOutputWithPast):
    """`loss` is the total; its parts, and the routing statistics of this forward, are reported alongside.

    main_loss: next-token CE. mtp_loss: mean over depths of the MTP CE (unweighted). balance_loss: the sequence-wise
    balance loss summed over MoE layers (already weighted by alpha). expert_load: [num MoE layers, n_routed_experts]
    tokens per expert. max_violation: MaxVio averaged over the main model's MoE layers.
    """

    main_loss: torch.Tensor | None = None
    mtp_loss: torch.Tensor | None = None
    balance_loss: torch.Tensor | None = None
    expert_load: torch.Tensor | None = None
    max_violation: torch.Tensor | None = None
    mtp_logits: tuple[torch.Tensor, ...] | None = None


class DeepseekPreTrainedModel(PreTrainedModel):
    config_class = DeepseekConfig
    config: DeepseekConfig
    base_model_prefix = "model"
    supports_gradient_checkpointing = True
    _no_split_modules = ["DeepseekDecoderLayer", "DeepseekMTPLayer"]
    _skip_keys_device_placement = ["past_key_values"]
    _supports_sdpa = True
    _supports_flash_attn = False  # kv_b_proj gives v_head_dim != qk_head_dim, which FA2's padding handles poorly
    _supports_flex_attn = False
    _supports_attention_backend = True
    _keep_in_fp32_modules_strict = ["e_score_correction_bias"]
    # Official checkpoints store copies of the shared embedding and head inside each MTP layer.
    _keys_to_ignore_on_load_unexpected = [r"model\.layers\.\d+\.(embed_tokens|shared_head\.head)\.weight"]

    @torch.no_grad()
    def _init_weights(self, module):
        std = self.config.initializer_range
        if isinstance(module, DeepseekTopkRouter):
            init.normal_(module.weight, mean=0.0, std=std)
            if module.e_score_correction_bias is not None:
                init.zeros_(module.e_score_correction_bias)
                init.zeros_(module.pending_load)
        elif isinstance(module, DeepseekExperts):
            init.normal_(module.gate_up_proj, mean=0.0, std=std)
            init.normal_(module.down_proj, mean=0.0, std=std)
        elif isinstance(module, DeepseekRMSNorm):
            init.ones_(module.weight)
        elif isinstance(module, DeepseekRotaryEmbedding):
            init.copy_(module.inv_freq, module.compute_inv_freq()[0])
        else:
            super()._init_weights(module)

    @classmethod
    def from_pretrained(cls, *args, allow_missing_weights: bool = False, **kwargs):
        """transformers' loader, made strict: a weight the checkpoint lacks raises instead of being randomly initialised.

        Known-optional weights are exempt: the MTP modules (transformers' DeepseekV3 drops them on save; they are then
        trained from scratch) and a tied lm_head. Pass `allow_missing_weights=True` to accept any gap.
        """
        want_info = kwargs.pop("output_loading_info", False)
        # FP8 checkpoints (dequantized, or kept FP8 on CUDA) and bitsandbytes-quantized experts: see quantized.py
        args, kwargs, quant_plan = prepare_quantized_load(cls, args, kwargs)
        model, info = super().from_pretrained(*args, output_loading_info=True, **kwargs)
        model = finish_quantized_load(model, info, quant_plan)
        for router in balancing_routers(model):  # non-persistent, so never loaded: start from zero
            router.pending_load.zero_()
            router.has_pending_load = False
        missing = [k for k in info.get("missing_keys", []) if not model._is_optional_weight(k)]
        if missing and not allow_missing_weights:
            shown = ", ".join(sorted(missing)[:20])
            raise OSError(
                f"{cls.__name__}.from_pretrained: the checkpoint is missing {len(missing)} weight(s) the model needs: "
                f"{shown}{' ...' if len(missing) > 20 else ''}. Pass allow_missing_weights=True to initialise them."
            )
        return (model, info) if want_info else model

    def _set_gradient_checkpointing(self, enable: bool = True, gradient_checkpointing_func=None, **kwargs):
        # Reentrant checkpointing runs a layer's first forward under no_grad, which would silently drop the
        # sequence-wise balance loss's gradient: use the non-reentrant form whenever that loss is on.
        if enable and self.config.seq_balance_alpha > 0 and getattr(gradient_checkpointing_func, "keywords", {}).get(
            "use_reentrant"
        ):
            logger.warning_once("seq_balance_alpha > 0: switching gradient checkpointing to use_reentrant=False")
            gradient_checkpointing_func = functools.partial(
                gradient_checkpointing_func.func, **{**gradient_checkpointing_func.keywords, "use_reentrant": False}
            )
        super()._set_gradient_checkpointing(
            enable=enable, gradient_checkpointing_func=gradient_checkpointing_func, **kwargs
        )

    def _is_optional_weight(self, key: str) -> bool:
        match = re.search(r"layers\.(\d+)\.", key)
        if match and int(match.group(1)) >= self.config.num_hidden_layers:
            return True  # an MTP module
        return key.endswith("lm_head.weight") and self.config.tie_word_embeddings

    def moe_layers(self, include_mtp: bool = True) -> list[DeepseekMoE]:
        decoder = self.get_decoder()
        layers = decoder.layers if include_mtp else decoder.layers[: self.config.num_hidden_layers]
        return [layer.moe for layer in layers if layer.moe is not None]


class DeepseekModel(DeepseekPreTrainedModel):
    def __init__(self, config: DeepseekConfig):
        super().__init__(config)
        self.padding_idx = config.pad_token_id
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size, self.padding_idx)
        N, D = config.num_hidden_layers, config.num_nextn_predict_layers
        self.layers = nn.ModuleList(
            [DeepseekDecoderLayer(config, i) for i in range(N)] + [DeepseekMTPLayer(config, N + k) for k in range(D)]
        )
        self.norm = DeepseekRMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.rotary_emb = DeepseekRotaryEmbedding(config)
        self.gradient_checkpointing = False
        if bias_update_enabled(config):
            track(self)
        self.post_init()

    def mask_and_rope(self, inputs_embeds, attention_mask, past_key_values, position_ids):
        """What every block of one forward shares: the attention mask and the RoPE angles."""
        T = inputs_embeds.shape[1]
        past = past_key_values.get_seq_length() if T > 1 and past_key_values is not None else 0  # decode: skipped
        if prefix_causal_applies(T, past + T, inputs_embeds.device, self.config._attn_implementation) and (
                attention_mask is None or (attention_mask.dim() == 2 and bool(attention_mask.all()))):  # CPU only
            causal_mask = None  # a prefill chunk without padding: attention runs prefix + causal, no [T, S] mask
        else:
            causal_mask = create_causal_mask(
                config=self.config,
                inputs_embeds=inputs_embeds,
                attention_mask=attention_mask,
                past_key_values=past_key_values,
                position_ids=position_ids,
            )
        return causal_mask, self.rotary_emb(inputs_embeds, position_ids)

    @property
    def mtp_layers(self) -> nn.ModuleList:
        return self.layers[self.config.num_hidden_layers :]

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        past_key_values: Cache | None = None,
        inputs_embeds: torch.Tensor | None = None,
        use_cache: bool | None = None,
        output_hidden_states: bool | None = None,
        return_dict: bool | None = None,
        **kwargs,
    ) -> DeepseekModelOutput:
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("Specify exactly one of input_ids or inputs_embeds")
        use_cache = self.config.use_cache if use_cache is None else use_cache
        if self.gradient_checkpointing and self.training:
            use_cache = False
        output_hidden_states = self.config.output_hidden_states if output_hidden_states is None else output_hidden_states
        for unused in ("output_attentions", "output_router_logits"):
            kwargs.pop(unused, None)
        if inputs_embeds is None:
            inputs_embeds = self.embed_tokens(input_ids)
        for moe in self.moe_layers():  # forget the previous forward's routing statistics (MTP layers may not run)
            moe.last_load_E = moe.last_balance_loss = None
        if use_cache and past_key_values is None:
            past_key_values = DeepseekLatentCache(fp8=self.config.latent_cache_dtype == "fp8")
        if position_ids is None:
            past = past_key_values.get_seq_length() if past_key_values is not None else 0
            position_ids = torch.arange(inputs_embeds.shape[1], device=inputs_embeds.device).unsqueeze(0) + past

        causal_mask, position_embeddings = self.mask_and_rope(inputs_embeds, attention_mask, past_key_values, position_ids)

        hidden_states = inputs_embeds
        all_hidden = [hidden_states] if output_hidden_states else None
        for layer in self.layers[: self.config.num_hidden_layers]:
            hidden_states = layer(
                hidden_states,
                attention_mask=causal_mask,
                position_ids=position_ids,
                past_key_values=past_key_values,
                use_cache=use_cache,
                position_embeddings=position_embeddings,
                **kwargs,
            )
            if output_hidden_states:
                all_hidden.append(hidden_states)
        # The only place the per-forward expert counts are committed: layers may be re-run by checkpointing, this may not.
        if self.training and torch.is_grad_enabled():
            record_loads(self.moe_layers(include_mtp=False), self.config)

        return DeepseekModelOutput(
            last_hidden_state=self.norm(hidden_states),
            past_key_values=past_key_values if use_cache else None,
            hidden_states=tuple(all_hidden) if output_hidden_states else None,
            pre_norm_hidden_state=hidden_states,
        )

    def run_mtp(self, h0_BTD, inputs_embeds_BTD, position_ids, attention_mask=None, depths=None, **kwargs):
        """Run MTP modules 1..depths over full-length sequences; returns [shared_head.norm(h^k) for k = 1..depths]."""
        depths = len(self.mtp_layers) if depths is None else depths
        causal_mask, position_embeddings = self.mask_and_rope(inputs_embeds_BTD, attention_mask, None, position_ids)
        h, outputs = h0_BTD, []
        for k, layer in enumerate(self.mtp_layers[:depths], start=1):
            h, h_normed = layer(
                *mtp_inputs(h, inputs_embeds_BTD, k),
                attention_mask=causal_mask,
                position_ids=position_ids,
                position_embeddings=position_embeddings,
                **kwargs,
            )
            outputs.append(h_normed)
        record_loads([layer.moe for layer in self.mtp_layers[:depths] if layer.moe is not None], self.config)
        return outputs


class DeepseekForCausalLM(DeepseekPreTrainedModel, GenerationMixin):
    _tied_weights_keys = {"lm_head.weight": "model.embed_tokens.weight"}

    def __init__(self, config: DeepseekConfig):
        super().__init__(config)
        self.model = DeepseekModel(config)
        self.vocab_size = config.vocab_size
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        past_key_values: Cache | None = None,
        inputs_embeds: torch.Tensor | None = None,
        labels: torch.LongTensor | None = None,
        use_cache: bool | None = None,
        logits_to_keep: int | torch.Tensor = 0,
        output_hidden_states: bool | None = None,
        return_dict: bool | None = None,
        **kwargs,
    ) -> DeepseekCausalLMOutput:
        num_items_in_batch = kwargs.pop("num_items_in_batch", None)
        if inputs_embeds is None and input_ids is not None:
            inputs_embeds = self.model.embed_tokens(input_ids)
        outputs = self.model(
            inputs_embeds=inputs_embeds,
            attention_mask=attention_mask,
            position_ids=position_ids,
            past_key_values=past_key_values,
            use_cache=use_cache,
            output_hidden_states=output_hidden_states,
            **kwargs,
        )
        hidden_states = outputs.last_hidden_state
        keep = slice(-logits_to_keep, None) if isinstance(logits_to_keep, int) else logits_to_keep
        logits = self.lm_head(hidden_states[:, keep, :])

        loss = main_loss = mtp_loss = balance_loss = mtp_logits = None
        if labels is not None:
            loss_kwargs = {"vocab_size": self.config.vocab_size, "num_items_in_batch": num_items_in_batch}
            main_loss = self.loss_function(logits=logits, labels=labels, **loss_kwargs)
            loss = main_loss
            if self.config.num_nextn_predict_layers > 0:
                if position_ids is None:
                    position_ids = torch.arange(labels.shape[1], device=labels.device).unsqueeze(0)
                hs = self.model.run_mtp(outputs.pre_norm_hidden_state, inputs_embeds, position_ids, attention_mask)
                mtp_logits = tuple(self.lm_head(h) for h in hs)
                depth_losses = []
                for k, lg in enumerate(mtp_logits, start=1):
                    labels_k = mtp_labels(labels, k)
                    ce_k = self.loss_function(logits=lg, labels=labels_k, **loss_kwargs)
                    if num_items_in_batch is not None:
                        # Under gradient accumulation CE is a share of the step's sum (sum / num_items_in_batch);
                        # the reported MTP loss is this forward's own mean, like main_loss without accumulation.
                        ce_k = ce_k * num_items_in_batch / (labels_k[:, 1:] != -100).sum().clamp_min(1)
                    depth_losses.append(ce_k)
                mtp_loss = torch.stack(depth_losses).mean()
                mtp_share = mtp_loss
                if num_items_in_batch is not None:
                    valid = (labels[:, 1:] != -100).sum().clamp_min(1)
                    mtp_share = mtp_loss * valid / num_items_in_batch
                loss = loss + self.config.mtp_loss_weight * mtp_share
            balance_terms = [m.last_balance_loss for m in self.moe_layers() if m.last_balance_loss is not None]
            if balance_terms:
                balance_loss = torch.stack(balance_terms).sum()
                loss = loss + balance_loss

        expert_load = max_vio = None
        loads = [m.last_load_E for m in self.moe_layers() if m.last_load_E is not None] if (
            self.training or labels is not None
        ) else []
        if loads:
            expert_load = torch.stack(loads)
            main_loads = expert_load[: len(self.moe_layers(include_mtp=False))]
            max_vio = max_violation(main_loads).mean() if len(main_loads) else None
        if self.training and torch.is_grad_enabled() and labels is not None:
            self._accumulate_train_metrics(mtp_loss=mtp_loss, balance_loss=balance_loss, maxvio=max_vio)

        return DeepseekCausalLMOutput(
            loss=loss,
            aux_loss=balance_loss,
            logits=logits,
            past_key_values=outputs.past_key_values,
            hidden_states=outputs.hidden_states,
            main_loss=main_loss,
            mtp_loss=mtp_loss,
            balance_loss=balance_loss,
            expert_load=expert_load,
            max_violation=max_vio,
            mtp_logits=mtp_logits,
        )

    # ------------------------------------------------------------------------------------------------------------
    # Training metrics, read by trainers.callbacks.DeepseekTrainerCallback at every Trainer log step
    def _accumulate_train_metrics(self, **values) -> None:
        sums = self.__dict__.setdefault("_train_metric_sums", {})
        for name, value in values.items():
            if value is not None:  # detached device tensors: no host sync per step
                total, count = sums.get(name, (0.0, 0))
                sums[name] = (total + value.detach().float(), count + 1)

    def pop_train_metrics(self) -> dict[str, float]:
        """Means of the MTP loss, balance loss and MaxVio over the training forwards since the last call."""
        sums = self.__dict__.pop("_train_metric_sums", {})
        return {name: float(total) / count for name, (total, count) in sums.items() if count}

    # ------------------------------------------------------------------------------------------------------------
    # Serving
    def _prepare_cache_for_generation(self, generation_config, model_kwargs, *args, **kwargs):
        """generate() gets the latent cache; FP8 with generate(latent_cache_dtype="fp8") or config.latent_cache_dtype."""
        if model_kwargs.get("past_key_values") is None and generation_config.cache_implementation in (None, "dynamic"):
            model_kwargs["past_key_values"] = DeepseekLatentCache(fp8=self._latent_cache_dtype == "fp8")
            return
        return super()._prepare_cache_for_generation(generation_config, model_kwargs, *args, **kwargs)

    def generate(self, inputs=None, generation_config=None, **kwargs):
        """transformers' generate, plus `use_mtp=True`: self-speculative decoding with the MTP module (speculative.py).

        Works at any batch size and with left padding. The acceptance rate is logged, kept on `self.last_mtp_stats`,
        and returned on the output with return_dict_in_generate=True.
        """
        self._latent_cache_dtype = kwargs.pop("latent_cache_dtype", self.config.latent_cache_dtype)
        if self._latent_cache_dtype not in (None, "fp8"):
            raise ValueError(f"`latent_cache_dtype` must be None or 'fp8', got {self._latent_cache_dtype!r}")
        use_mtp = kwargs.pop("use_mtp", None)
        draft_tokens = kwargs.pop("mtp_draft_tokens", None)
        base = generation_config if generation_config is not None else self.generation_config
        kwargs.update(self._long_prompt_chunking(inputs, base, kwargs))
        if use_mtp is None:
            use_mtp = bool(getattr(base, "use_mtp", False))
        if not use_mtp:
            if generation_config is not None and getattr(generation_config, "use_mtp", False):
                generation_config = copy.deepcopy(generation_config)
                generation_config.use_mtp = False
            return super().generate(inputs, generation_config=generation_config, **kwargs)

        gc = copy.deepcopy(base)
        gc.use_mtp = False
        model_kwargs = gc.update(**kwargs)
        input_ids = inputs if inputs is not None else model_kwargs.pop("input_ids")
        attention_mask = model_kwargs.pop("attention_mask", None)
        streamer = model_kwargs.pop("streamer", None)
        for ignored in ("logits_processor", "stopping_criteria", "past_key_values", "use_cache"):
            if model_kwargs.pop(ignored, None) not in (None, True, [], ()):
                raise ValueError(f"generate(use_mtp=True) does not take `{ignored}`")
        if model_kwargs:
            raise ValueError(f"generate(use_mtp=True) got unexpected arguments: {sorted(model_kwargs)}")
        sequences, stats = mtp_generate(
            self, input_ids, attention_mask, gc, streamer=streamer, fp8_cache=self._latent_cache_dtype == "fp8",
            draft_tokens=draft_tokens,
        )
        self.last_mtp_stats = stats
        logger.info(f"MTP speculation: {stats.accepted}/{stats.drafted} drafts accepted ({stats.acceptance_rate:.1%})")
        if gc.return_dict_in_generate:
            return MTPGenerateOutput(
                sequences=sequences, mtp_acceptance_rate=stats.acceptance_rate,
                mtp_drafted=stats.drafted, mtp_accepted=stats.accepted,
            )
        return sequences

    def _long_prompt_chunking(self, inputs, generation_config, kwargs) -> dict:
        """{"prefill_chunk_size": config.prefill_chunk_tokens} when the prompt is longer than that and nobody chose a
        chunk size: activation memory stays bounded by the chunk, whatever the prompt length."""
        chunk = self.config.prefill_chunk_tokens
        ids = inputs if isinstance(inputs, torch.Tensor) else kwargs.get("input_ids")
        if (chunk is None or ids is None or ids.shape[-1] <= chunk or "prefill_chunk_size" in kwargs
                or getattr(generation_config, "prefill_chunk_size", None) is not None
                or kwargs.get("use_cache", getattr(generation_config, "use_cache", True)) is False):
            return {}
        return {"prefill_chunk_size": chunk}


# save_pretrained writes `auto_map` into config.json and copies this file and the files it imports next to the
# weights, so `AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True)` works where this package is not
# installed. With the package imported and trust_remote_code unset, transformers still picks the registered classes.
DeepseekModel.register_for_auto_class("AutoModel")
DeepseekForCausalLM.register_for_auto_class("AutoModelForCausalLM")


__all__ = ["DeepseekPreTrainedModel", "DeepseekModel", "DeepseekForCausalLM", "DeepseekCausalLMOutput"]

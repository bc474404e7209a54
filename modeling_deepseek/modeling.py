"""The PreTrainedModel classes and their forwards: DeepseekModel (the decoder stack and the MTP modules) and
DeepseekForCausalLM (the LM head, the training objective).

The layout follows transformers' DeepSeek classes (and so the official checkpoint keys):

    model.embed_tokens
    model.layers.{0 .. N-1}            DeepseekDecoderLayer   (dense FFN below first_k_dense_replace, MoE above)
    model.layers.{N .. N+D-1}          DeepseekMTPLayer       (the D multi-token-prediction modules)
    model.norm, lm_head

The loss with labels is   CE_main + mtp_loss_weight * mean_k CE_k + sum over MoE layers of the sequence-wise balance
loss (objective.py computes it, for GRPO too), and the output carries each part on its own together with the per-layer
expert load and MaxVio.

What the classes take from elsewhere: the loading and saving policy (loading.py), generation and continuous
batching (generation.py), the attention masks of a forward (masks.py), the objective (objective.py). The task heads
are in heads.py.

The routed experts are dispatched through transformers' experts interface (experts.py, `@use_experts_implementation`):
`config.experts_implementation` / `model.set_experts_implementation("eager" | "grouped_mm")` choose the kernel.
(transformers decides whether a model may switch by finding that decorator's name in the model's own module.)
"""

from dataclasses import dataclass

import torch
from torch import nn
from transformers import PreTrainedModel
from transformers import initialization as init
from transformers.cache_utils import Cache
from transformers.modeling_outputs import MoeCausalLMOutputWithPast, MoeModelOutputWithPast

from .attention import DeepseekAttention
from .balancing import bias_update_enabled, record_loads, track
from .cache import DeepseekLatentCache, DeepseekStaticLatentCache
from .compat import (CACHE_NAME, OutputRecorder, can_return_tuple, cache_kwargs, capture_outputs,
                     merge_with_config_defaults, pop_cache_argument, register_deepseek_v3_conversion)
from .configuration import DeepseekConfig
from .decoder import DeepseekDecoderLayer
from .experts import DeepseekExperts
from .generation import DeepseekGenerationMixin
from .layers import DeepseekRMSNorm
from .loading import DeepseekLoadingMixin
from .masks import causal_mask, check_attention_mask, padding_free_tokens
from .mtp import DeepseekMTPLayer, mtp_inputs
from .moe import DeepseekMoE
from .objective import (Objective, head_cross_entropy, routing_statistics, shifted_labels, step_fraction,
                        training_objective)
from .rope import DeepseekRotaryEmbedding
from .routing import DeepseekTopkRouter


# Official per-expert keys <-> the fused expert tensors, on load and on save (transformers' own DeepseekV3 mapping).
# Registered here rather than in __init__ so that it also runs when this file is loaded as remote code.
register_deepseek_v3_conversion(DeepseekConfig.model_type)


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


class DeepseekPreTrainedModel(DeepseekLoadingMixin, PreTrainedModel):
    config_class = DeepseekConfig
    config: DeepseekConfig
    base_model_prefix = "model"
    supports_gradient_checkpointing = True
    _no_split_modules = ["DeepseekDecoderLayer", "DeepseekMTPLayer"]
    _skip_keys_device_placement = [CACHE_NAME]
    _supports_sdpa = True
    _supports_flash_attn = False  # kv_b_proj gives v_head_dim != qk_head_dim, which FA2's padding handles poorly
    _supports_flex_attn = False
    _supports_attention_backend = True
    # With DeepseekStaticLatentCache (generate(cache_implementation="static")) a decode step has fixed shapes and no
    # data-dependent branch: torch.compile(fullgraph=True) traces it whole (tests/test_compile.py).
    _can_compile_fullgraph = True
    _keep_in_fp32_modules_strict = ["e_score_correction_bias"]
    _keep_in_fp32_modules = ["indexer.weights_proj"]  # DeepSeek-V3.2 (as transformers keeps it)
    # What transformers' output capturing records in DeepseekModel.forward (hooks on these modules' outputs). The MTP
    # modules (DeepseekMTPLayer is a DeepseekDecoderLayer) run after that forward has returned, so they add nothing.
    _can_record_outputs = {
        "hidden_states": DeepseekDecoderLayer,
        "attentions": OutputRecorder(DeepseekAttention, index=1),
        "router_logits": OutputRecorder(DeepseekTopkRouter, index=0),
    }
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
            inv_freq = module.compute_inv_freq()[0]
            init.copy_(module.inv_freq, inv_freq)
            init.copy_(module.original_inv_freq, inv_freq)
        else:
            super()._init_weights(module)

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
        self.norm = DeepseekRMSNorm(config.hidden_size, eps=config.rms_norm_eps, config=config)
        self.rotary_emb = DeepseekRotaryEmbedding(config)
        self.gradient_checkpointing = False
        if bias_update_enabled(config):
            track(self)
        self.post_init()

    def block_inputs(self, inputs_embeds, attention_mask, cache, position_ids) -> dict:
        """The keyword arguments every block of one forward shares: the attention mask (masks.py), the positions and
        their RoPE angles, and which of the current tokens are padding (they count in no routing statistic)."""
        return dict(
            attention_mask=causal_mask(self.config, inputs_embeds, attention_mask, cache, position_ids),
            position_ids=position_ids,
            position_embeddings=self.rotary_emb(inputs_embeds, position_ids),
            token_mask=padding_free_tokens(attention_mask, inputs_embeds.shape[1]),
        )

    @property
    def mtp_layers(self) -> nn.ModuleList:
        return self.layers[self.config.num_hidden_layers :]

    @merge_with_config_defaults
    @capture_outputs
    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        cache: Cache | None = None,
        inputs_embeds: torch.Tensor | None = None,
        use_cache: bool | None = None,
        **kwargs,
    ) -> MoeModelOutputWithPast:
        """transformers' conventions: `cache` (or the older `past_key_values`); `output_hidden_states`,
        `output_attentions` and `output_router_logits` (arguments or config) are recorded by transformers' output
        capturing (`_can_record_outputs`): the embeddings and every block's output with the last one after model.norm,
        the attention probabilities per layer (computed eagerly when asked for), the router logits per MoE layer
        [B*T, E]; a tuple with return_dict=False. `attention_mask` is a [B, S] padding mask or a caller's 4-D mask
        ([B, 1, T, S], bool "may attend" or additive float), e.g. block-diagonal for sequences packed in one row."""
        cache = pop_cache_argument(cache, kwargs)
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("Specify exactly one of input_ids or inputs_embeds")
        if getattr(cache, "is_compileable", False) and not isinstance(cache, DeepseekStaticLatentCache):
            raise ValueError(
                f"{type(cache).__name__} is not supported: MLA caches a {self.config.latent_cache_dim}-wide latent per "
                "token, not per-head keys and values; use the default (DeepseekLatentCache), DeepseekStaticLatentCache "
                "(fixed size, for torch.compile) or a DynamicCache"
            )
        cfg = self.config
        use_cache = cfg.use_cache if use_cache is None else use_cache
        if self.gradient_checkpointing and self.training:
            use_cache = False
        # Recorded by the hooks, not passed on; attention probabilities exist only where the eager kernel runs, so
        # every attention is told whether they are wanted.
        kwargs.pop("output_hidden_states", None)
        kwargs.pop("output_router_logits", None)
        output_attentions = bool(kwargs.pop("output_attentions", None) or cfg.output_attentions)
        check_attention_mask(attention_mask, inputs_embeds if input_ids is None else input_ids)
        if inputs_embeds is None:
            inputs_embeds = self.embed_tokens(input_ids)
        for moe in self.moe_layers():  # forget the previous forward's routing statistics (MTP layers may not run)
            moe.last_load_E = moe.last_balance_loss = None
        if use_cache and cache is None:
            cache = DeepseekLatentCache(config=cfg)
        if position_ids is None:
            past = cache.get_seq_length() if cache is not None else 0
            position_ids = torch.arange(inputs_embeds.shape[1], device=inputs_embeds.device).unsqueeze(0) + past

        shared = self.block_inputs(inputs_embeds, attention_mask, cache, position_ids)
        hidden_states = inputs_embeds
        for layer in self.layers[: cfg.num_hidden_layers]:
            hidden_states = layer(hidden_states, cache=cache, use_cache=use_cache, output_attentions=output_attentions,
                                  **shared, **kwargs)
        # The only place the per-forward expert counts are committed: layers may be re-run by checkpointing, this may not.
        if self.training and torch.is_grad_enabled():
            if bias_update_enabled(cfg):
                track(self)  # also a copy (copy.deepcopy, a reference model) that __init__ never registered
            record_loads(self.moe_layers(include_mtp=False), cfg)

        return MoeModelOutputWithPast(last_hidden_state=self.norm(hidden_states),
                                      **cache_kwargs(cache if use_cache else None))

    def run_mtp(self, h0_BTD, inputs_embeds_BTD, position_ids, attention_mask=None, depths=None, **kwargs):
        """Run MTP modules 1..depths over full-length sequences; returns [shared_head.norm(h^k) for k = 1..depths].

        h^0 is the main model's final hidden state after model.norm, as in transformers' MtpModel, vLLM and SGLang:
        the same MTP weights then draft the same tokens in every engine."""
        depths = len(self.mtp_layers) if depths is None else depths
        shared = self.block_inputs(inputs_embeds_BTD, attention_mask, None, position_ids)
        h, outputs = h0_BTD, []
        for k, layer in enumerate(self.mtp_layers[:depths], start=1):
            h, h_normed = layer(*mtp_inputs(h, inputs_embeds_BTD, k), **shared, **kwargs)
            outputs.append(h_normed)
        if self.training and torch.is_grad_enabled():
            record_loads([layer.moe for layer in self.mtp_layers[:depths] if layer.moe is not None], self.config)
        return outputs


class DeepseekForCausalLM(DeepseekPreTrainedModel, DeepseekGenerationMixin):
    _tied_weights_keys = {"lm_head.weight": "model.embed_tokens.weight"}
    # Distributed engine (the base model's plans are on the config): the head is split over the vocabulary and its
    # logits gathered, so every rank sees whole logits (the loss, MTP's drafts and generation need them).
    _tp_plan = {"lm_head": "colwise_gather_output"}
    _fsdp_plan = {"lm_head": "keep_full_weight"}

    def __init__(self, config: DeepseekConfig):
        super().__init__(config)
        self.model = DeepseekModel(config)
        self.vocab_size = config.vocab_size
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        # The MTP loss weight of the current training step when a schedule sets one (trainers.callbacks: V3 lowers
        # it late in training); None: config.mtp_loss_weight. Runtime state, so config.json keeps the user's weight.
        self.scheduled_mtp_loss_weight: float | None = None
        self.post_init()

    @property
    def current_mtp_loss_weight(self) -> float:
        """The MTP loss weight of this training step: the schedule's when one is set, else config.mtp_loss_weight."""
        scheduled = self.scheduled_mtp_loss_weight
        return self.config.mtp_loss_weight if scheduled is None else scheduled

    @can_return_tuple
    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        cache: Cache | None = None,
        inputs_embeds: torch.Tensor | None = None,
        labels: torch.LongTensor | None = None,
        use_cache: bool | None = None,
        logits_to_keep: int | torch.Tensor = 0,
        **kwargs,
    ) -> DeepseekCausalLMOutput:
        """`labels` (shifted inside, as in transformers) or `shift_labels` (already shifted: position i is scored on
        shift_labels[i]) give the loss; the MTP module k is scored on shift_labels[i + k]. `shift_labels` comes
        through **kwargs, as in transformers' models: Trainer treats every "label" argument of the signature as
        required in each eval batch. output_hidden_states / output_attentions / output_router_logits / return_dict
        as for DeepseekModel; the MTP modules (run after the main stack) add nothing to them."""
        cache = pop_cache_argument(cache, kwargs)
        shift_labels = kwargs.pop("shift_labels", None)
        num_items_in_batch = kwargs.pop("num_items_in_batch", None)
        if inputs_embeds is None and input_ids is not None:
            inputs_embeds = self.model.embed_tokens(input_ids)
        outputs = self.model(
            inputs_embeds=inputs_embeds,
            attention_mask=attention_mask,
            position_ids=position_ids,
            cache=cache,
            use_cache=use_cache,
            return_dict=True,
            **kwargs,
        )
        hidden_states = outputs.last_hidden_state
        keep = slice(-logits_to_keep, None) if isinstance(logits_to_keep, int) else logits_to_keep
        shift_labels = shifted_labels(labels, shift_labels)
        logits = main_ce = None
        if shift_labels is not None and isinstance(logits_to_keep, int) and logits_to_keep == 0:
            # The loss and, unless the memory option chunked_cross_entropy applies, the logits (else None).
            logits, main_ce = head_cross_entropy(self, hidden_states, shift_labels)
        else:
            logits = self.lm_head(hidden_states[:, keep, :])

        objective = Objective()  # no labels: no loss
        if shift_labels is not None:
            mtp_loss_weight = self.current_mtp_loss_weight
            objective = training_objective(
                self, hidden_states, inputs_embeds, shift_labels, main_ce=main_ce, logits_BTV=logits,
                mtp_loss_weight=mtp_loss_weight,
                position_ids=position_ids, attention_mask=attention_mask,
                fraction=step_fraction(shift_labels, num_items_in_batch))
        # A forward without labels reports its routing in training only (eval and generation never need it).
        routing = routing_statistics(self) if self.training or shift_labels is not None else None
        expert_load, max_vio = (routing.expert_load_LE, routing.max_violation) if routing else (None, None)

        return DeepseekCausalLMOutput(
            loss=objective.loss,
            aux_loss=objective.balance_loss,
            logits=logits,
            hidden_states=outputs.hidden_states,
            attentions=outputs.attentions,
            router_logits=outputs.router_logits,
            main_loss=objective.main_loss,
            mtp_loss=objective.mtp_loss,
            balance_loss=objective.balance_loss,
            expert_load=expert_load,
            max_violation=max_vio,
            mtp_logits=objective.mtp_logits,
            **cache_kwargs(getattr(outputs, CACHE_NAME)),
        )


# save_pretrained writes `auto_map` into config.json and copies this file and the files it imports next to the
# weights, so `AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True)` works where this package is not
# installed. With the package imported and trust_remote_code unset, transformers still picks the registered classes.
DeepseekModel.register_for_auto_class("AutoModel")
DeepseekForCausalLM.register_for_auto_class("AutoModelForCausalLM")


__all__ = ["DeepseekPreTrainedModel", "DeepseekModel", "DeepseekForCausalLM", "DeepseekCausalLMOutput"]

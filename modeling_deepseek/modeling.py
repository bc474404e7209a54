"""DeepseekModel and DeepseekForCausalLM: the decoder stack, the LM head, MTP and the training-signal bookkeeping.

The layout follows transformers' DeepSeek classes (and so the official checkpoint keys):

    model.embed_tokens
    model.layers.{0 .. N-1}            DeepseekDecoderLayer   (dense FFN below first_k_dense_replace, MoE above)
    model.layers.{N .. N+D-1}          DeepseekMTPLayer       (the D multi-token-prediction modules)
    model.norm, lm_head

The loss with labels is   CE_main + mtp_loss_weight * mean_k CE_k + sum over MoE layers of the sequence-wise balance
loss, and the output carries each part on its own together with the per-layer expert load and MaxVio.

The routed experts are dispatched through transformers' experts interface (experts.py, `@use_experts_implementation`):
`config.experts_implementation` / `model.set_experts_implementation("eager" | "grouped_mm")` choose the kernel.
(transformers decides whether a model may switch by finding that decorator's name in the model's own module.)
"""

import copy
import re
import warnings
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from transformers import GenerationMixin, PreTrainedConfig, PreTrainedModel
from transformers import initialization as init
from transformers.cache_utils import Cache
from transformers.generation.utils import GenerateDecoderOnlyOutput
from transformers.utils import logging
from transformers.masking_utils import create_causal_mask
from transformers.modeling_layers import GenericForSequenceClassification, GenericForTokenClassification
from transformers.modeling_outputs import MoeCausalLMOutputWithPast, MoeModelOutputWithPast

from .attention import DeepseekAttention, prefix_causal_applies
from .balancing import balancing_routers, bias_update_enabled, max_violation, record_loads, track
from .cache import (DeepseekLatentCache, DeepseekStaticLatentCache, latent_cache_for_generate,
                    static_latent_cache_for_generate, uses_static_cache)
from .compat import (CACHE_NAME, BuildsGenerationCache, OutputRecorder, can_return_tuple, cache_kwargs,
                     capture_outputs, merge_with_config_defaults, pop_cache_argument, register_deepseek_v3_conversion)
from .speculative import check_generation_config, mtp_generate
from .configuration import DeepseekConfig
from .decoder import DeepseekDecoderLayer
from .experts import DeepseekExperts
from .fp8 import DeepseekFP8Experts, DeepseekFP8Linear
from .layers import DeepseekRMSNorm
from .mtp import DeepseekMTPLayer, mtp_inputs, mtp_labels
from .parallel import check_parallel_layout
from .paged import (
    check_continuous_batching,
    cpu_batching_defaults,
    is_paged_cache,
    latent_cache_dtype_of,
    raise_failed_requests,
)
from .moe import DeepseekMoE
from .quantized import finish_quantized_load, prepare_quantized_load
from .rope import DeepseekRotaryEmbedding
from .routing import DeepseekTopkRouter


logger = logging.get_logger(__name__)


# Official per-expert keys <-> the fused expert tensors, on load and on save (transformers' own DeepseekV3 mapping).
# Registered here rather than in __init__ so that it also runs when this file is loaded as remote code.
register_deepseek_v3_conversion(DeepseekConfig.model_type)


@dataclass
class MTPGenerateOutput(GenerateDecoderOnlyOutput):
    """generate(use_mtp=True, return_dict_in_generate=True): the sequences plus how the drafts fared."""

    mtp_acceptance_rate: float | None = None
    mtp_drafted: int | None = None
    mtp_accepted: int | None = None


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
    _skip_keys_device_placement = [CACHE_NAME]
    _supports_sdpa = True
    _supports_flash_attn = False  # kv_b_proj gives v_head_dim != qk_head_dim, which FA2's padding handles poorly
    _supports_flex_attn = False
    _supports_attention_backend = True
    # With DeepseekStaticLatentCache (generate(cache_implementation="static")) a decode step has fixed shapes and no
    # data-dependent branch: torch.compile(fullgraph=True) traces it whole (tests/test_compile.py).
    _can_compile_fullgraph = True
    _keep_in_fp32_modules_strict = ["e_score_correction_bias"]
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

    def mask_and_rope(self, inputs_embeds, attention_mask, cache, position_ids):
        """What every block of one forward shares: the attention mask and the RoPE angles."""
        T = inputs_embeds.shape[1]
        if is_paged_cache(cache):  # continuous batching: attention runs request by request, no mask (paged.py)
            return None, self.rotary_emb(inputs_embeds, position_ids)
        static = cache is not None and cache.is_compileable  # attends over its whole buffer, under a mask
        past = cache.get_seq_length() if T > 1 and cache is not None and not static else 0  # decode: skipped
        if not static and prefix_causal_applies(T, past + T, inputs_embeds.device, self.config._attn_implementation) and (
                attention_mask is None or (attention_mask.dim() == 2 and bool(attention_mask.all()))):  # CPU only
            causal_mask = None  # a prefill chunk without padding: attention runs prefix + causal, no [T, S] mask
        else:
            causal_mask = create_causal_mask(
                config=self.config,
                inputs_embeds=inputs_embeds,
                attention_mask=attention_mask,
                position_ids=position_ids,
                # With no mask, attention takes the queries for the last T of the S keys; a static cache's S is its
                # whole buffer, so its mask is always built.
                allow_is_causal_skip=not static,
                **cache_kwargs(cache),
            )
        return causal_mask, self.rotary_emb(inputs_embeds, position_ids)

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

        causal_mask, position_embeddings = self.mask_and_rope(inputs_embeds, attention_mask, cache, position_ids)
        token_mask = padding_free_tokens(attention_mask, inputs_embeds.shape[1])

        hidden_states = inputs_embeds
        for layer in self.layers[: cfg.num_hidden_layers]:
            hidden_states = layer(
                hidden_states,
                attention_mask=causal_mask,
                position_ids=position_ids,
                cache=cache,
                use_cache=use_cache,
                position_embeddings=position_embeddings,
                token_mask=token_mask,
                output_attentions=output_attentions,
                **kwargs,
            )
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
        causal_mask, position_embeddings = self.mask_and_rope(inputs_embeds_BTD, attention_mask, None, position_ids)
        token_mask = padding_free_tokens(attention_mask, inputs_embeds_BTD.shape[1])
        h, outputs = h0_BTD, []
        for k, layer in enumerate(self.mtp_layers[:depths], start=1):
            h, h_normed = layer(
                *mtp_inputs(h, inputs_embeds_BTD, k),
                attention_mask=causal_mask,
                position_ids=position_ids,
                position_embeddings=position_embeddings,
                token_mask=token_mask,
                **kwargs,
            )
            outputs.append(h_normed)
        if self.training and torch.is_grad_enabled():
            record_loads([layer.moe for layer in self.mtp_layers[:depths] if layer.moe is not None], self.config)
        return outputs


def check_attention_mask(attention_mask: torch.Tensor | None, inputs: torch.Tensor) -> None:
    """A padding mask [B, S], or a 4-D mask [B or 1, 1 or heads, T, S] that every attention path applies as given
    (bool: True may attend; float: added to the scores). Any other shape raises here, naming it."""
    if attention_mask is None or attention_mask.dim() == 2:
        return
    B, T = inputs.shape[:2]
    shape = tuple(attention_mask.shape)
    if attention_mask.dim() != 4 or shape[0] not in (1, B) or shape[2] != T or shape[3] < T:
        raise ValueError(
            f"attention_mask of shape {shape} is neither a padding mask [batch, keys] nor a 4-D mask "
            f"[batch, 1, queries, keys] for {B} sequence(s) of {T} token(s) (keys >= queries: past tokens first)"
        )


def padding_free_tokens(attention_mask: torch.Tensor | None, T: int) -> torch.Tensor | None:
    """[B, T] bool, False at the padding positions of the T current tokens (2-D masks only; None: no padding known).
    A decode step's single token is never padding, so nothing is built for it."""
    if attention_mask is None or attention_mask.dim() != 2 or T == 1:
        return None
    return attention_mask[:, -T:].bool()


class DeepseekForCausalLM(BuildsGenerationCache, DeepseekPreTrainedModel, GenerationMixin):
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
        self.post_init()

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
        logits = self.lm_head(hidden_states[:, keep, :])

        loss = main_loss = mtp_loss = balance_loss = mtp_logits = None
        if shift_labels is None and labels is not None:
            shift_labels = F.pad(labels, (0, 1), value=-100)[:, 1:]
        if shift_labels is not None:
            shift_labels = shift_labels.contiguous()
            loss_kwargs = {"vocab_size": self.config.vocab_size, "num_items_in_batch": num_items_in_batch}
            main_loss = self.loss_function(logits=logits, labels=None, shift_labels=shift_labels, **loss_kwargs)
            loss = main_loss
            if self.config.num_nextn_predict_layers > 0:
                packed = position_ids  # the caller's position ids mark where packed sequences start
                if position_ids is None:
                    position_ids = torch.arange(shift_labels.shape[1], device=shift_labels.device).unsqueeze(0)
                hs = self.model.run_mtp(hidden_states, inputs_embeds, position_ids, attention_mask)
                mtp_logits = tuple(self.lm_head(h) for h in hs)
                depth_losses = []
                for k, lg in enumerate(mtp_logits, start=1):
                    targets_k = mtp_labels(shift_labels, k, position_ids=packed)
                    ce_k = self.loss_function(logits=lg, labels=None, shift_labels=targets_k, **loss_kwargs)
                    if num_items_in_batch is not None:
                        # Under gradient accumulation CE is a share of the step's sum (sum / num_items_in_batch);
                        # the reported MTP loss is this forward's own mean, like main_loss without accumulation.
                        ce_k = ce_k * num_items_in_batch / (targets_k != -100).sum().clamp_min(1)
                    depth_losses.append(ce_k)
                mtp_loss = torch.stack(depth_losses).mean()
                mtp_share = mtp_loss
                if num_items_in_batch is not None:
                    mtp_share = mtp_loss * (shift_labels != -100).sum().clamp_min(1) / num_items_in_batch
                loss = loss + self.config.mtp_loss_weight * mtp_share
            balance_terms = [m.last_balance_loss for m in self.moe_layers() if m.last_balance_loss is not None]
            if balance_terms:
                balance_loss = torch.stack(balance_terms).sum()
                balance_share = balance_loss
                if num_items_in_batch is not None:
                    # Like the MTP term: this forward's share of the step. Trainer sums the micro-batches' losses
                    # (gradient accumulation) and multiplies by the data-parallel size; a plain mean would count
                    # once per micro-batch and per rank.
                    balance_share = balance_loss * (shift_labels != -100).sum().clamp_min(1) / num_items_in_batch
                loss = loss + balance_share
            elif self.training and torch.is_grad_enabled() and self.config.seq_balance_alpha > 0 and self.moe_layers():
                warnings.warn(
                    "seq_balance_alpha > 0 but no MoE layer produced the sequence-wise balance loss: reentrant "
                    "gradient checkpointing (use_reentrant=True) runs the layers without gradients. Use "
                    "use_reentrant=False (transformers' default) to train it.", stacklevel=2)

        expert_load = max_vio = None
        loads = [m.last_load_E for m in self.moe_layers() if m.last_load_E is not None] if (
            self.training or shift_labels is not None
        ) else []
        if loads:
            expert_load = torch.stack(loads)
            main_loads = expert_load[: len(self.moe_layers(include_mtp=False))]
            max_vio = max_violation(main_loads).mean() if len(main_loads) else None
        if shift_labels is not None:
            # Under gradient accumulation main_loss is this forward's share of the step's sum; report its own mean.
            lm_loss = main_loss if num_items_in_batch is None else (
                main_loss * num_items_in_batch / (shift_labels != -100).sum().clamp_min(1))
            if self.training and torch.is_grad_enabled():
                self._accumulate_metrics("train", lm_loss=lm_loss, mtp_loss=mtp_loss, balance_loss=balance_loss,
                                         maxvio=max_vio)
            elif not self.training:
                self._accumulate_metrics("eval", lm_loss=lm_loss, mtp_loss=mtp_loss)

        output = DeepseekCausalLMOutput(
            loss=loss,
            aux_loss=balance_loss,
            logits=logits,
            hidden_states=outputs.hidden_states,
            attentions=outputs.attentions,
            router_logits=outputs.router_logits,
            main_loss=main_loss,
            mtp_loss=mtp_loss,
            balance_loss=balance_loss,
            expert_load=expert_load,
            max_violation=max_vio,
            mtp_logits=mtp_logits,
            **cache_kwargs(getattr(outputs, CACHE_NAME)),
        )
        return output

    # ------------------------------------------------------------------------------------------------------------
    # Training and evaluation metrics, read by trainers.callbacks.DeepseekTrainerCallback at every log / evaluation
    def _accumulate_metrics(self, split: str, **values) -> None:
        sums = self.__dict__.setdefault("_metric_sums", {}).setdefault(split, {})
        for name, value in values.items():
            if value is not None:  # detached device tensors: no host sync per step
                total, count = sums.get(name, (0.0, 0))
                sums[name] = (total + value.detach().float(), count + 1)

    def _pop_metrics(self, split: str) -> dict[str, float]:
        sums = self.__dict__.get("_metric_sums", {}).pop(split, {})
        return {name: float(total) / count for name, (total, count) in sums.items() if count}

    def pop_train_metrics(self) -> dict[str, float]:
        """Means of the LM loss, MTP loss, balance loss and MaxVio over the training forwards since the last call."""
        return self._pop_metrics("train")

    def pop_eval_metrics(self) -> dict[str, float]:
        """Means of the LM loss (next-token CE alone) and the MTP loss over the eval forwards with labels since the
        last call. `loss` / Trainer's eval_loss is the total objective; lm_loss is what compares with other models."""
        return self._pop_metrics("eval")

    # ------------------------------------------------------------------------------------------------------------
    # Serving
    def generate(self, inputs=None, generation_config=None, **kwargs):
        """transformers' generate over the latent cache, plus `use_mtp=True`: self-speculative decoding with the MTP
        module (speculative.py).

        It starts from a DeepseekLatentCache (FP8 with `latent_cache_dtype="fp8"` or config.latent_cache_dtype), a
        DynamicCache holding the latent, where transformers would build its per-head one. `cache_implementation=
        "static"` (an argument, the generation config or generation_config.json) makes it a DeepseekStaticLatentCache
        of `max_cache_len` slots (default: what this call needs), a StaticCache which a compiled forward decodes over
        without recompiling (transformers' `compile_config` path included). The per-head caches (cache_implementation
        "offloaded_static", "quantized", "offloaded", ...) cannot hold the latent and are refused. MTP speculation
        works at any batch size and with left padding; the acceptance rate is logged, kept on `self.last_mtp_stats`,
        and returned on the output with return_dict_in_generate=True.
        """
        base = generation_config if generation_config is not None else self.generation_config
        latent_cache_dtype = kwargs.pop("latent_cache_dtype", latent_cache_dtype_of(self, base))
        if latent_cache_dtype not in (None, "fp8"):
            raise ValueError(f"`latent_cache_dtype` must be None or 'fp8', got {latent_cache_dtype!r}")
        use_mtp = kwargs.pop("use_mtp", None)
        draft_tokens = kwargs.pop("mtp_draft_tokens", None)
        kwargs.update(self._long_prompt_chunking(inputs, base, kwargs))
        if use_mtp is None:
            use_mtp = bool(getattr(base, "use_mtp", False))
        # One copy of the generation config, this call's settings in it: the cache generate() starts from is read
        # off it (generation_cache: latent_cache_dtype, cache_implementation, max_cache_len).
        gc = copy.deepcopy(base)
        gc.use_mtp = False
        gc.latent_cache_dtype = latent_cache_dtype
        model_kwargs = gc.update(**kwargs)
        if not use_mtp:
            # Either name is ours to accept; transformers gets the one its release wants.
            user_cache = pop_cache_argument(model_kwargs.pop("cache", None), model_kwargs)
            if user_cache is not None:
                model_kwargs[CACHE_NAME] = user_cache
            return super().generate(inputs, generation_config=gc, **model_kwargs)

        input_ids = inputs if inputs is not None else model_kwargs.pop("input_ids", None)
        if input_ids is None:
            raise ValueError("generate(use_mtp=True) needs input_ids (the MTP module embeds each next token); "
                             "inputs_embeds alone is not supported")
        attention_mask = model_kwargs.pop("attention_mask", None)
        streamer = model_kwargs.pop("streamer", None)
        model_kwargs.pop("tokenizer", None)  # generate() takes it for stop_strings, which speculation refuses below
        check_generation_config(gc)
        for ignored in ("logits_processor", "stopping_criteria", "past_key_values", "cache", "use_cache"):
            if model_kwargs.pop(ignored, None) not in (None, True, [], ()):
                raise ValueError(f"generate(use_mtp=True) does not take `{ignored}`")
        if model_kwargs:
            raise ValueError(f"generate(use_mtp=True) got unexpected arguments: {sorted(model_kwargs)}")
        caches, fp8 = None, latent_cache_dtype == "fp8"
        if uses_static_cache(gc, self.config):  # every step appends k + 1 slots, rejected drafts staying as holes
            k = self.config.num_nextn_predict_layers if draft_tokens is None else draft_tokens
            (B, P), N = input_ids.shape, self.config.num_hidden_layers
            new = gc.max_new_tokens if gc.max_new_tokens is not None else gc.max_length - P
            caches = tuple(static_latent_cache_for_generate(self, gc, B, P + (k + 1) * new - 1, fp8, prompt_length=P,
                                                            slots_per_token=k + 1, layers=layers)
                           for layers in (range(N), [N]))
        sequences, stats = mtp_generate(
            self, input_ids, attention_mask, gc, streamer=streamer, fp8_cache=fp8, draft_tokens=draft_tokens,
            caches=caches,
        )
        self.last_mtp_stats = stats
        logger.info(f"MTP speculation: {stats.accepted}/{stats.drafted} drafts accepted ({stats.acceptance_rate:.1%})")
        if gc.return_dict_in_generate:
            return MTPGenerateOutput(
                sequences=sequences, mtp_acceptance_rate=stats.acceptance_rate,
                mtp_drafted=stats.drafted, mtp_accepted=stats.accepted,
            )
        return sequences

    def generation_cache(self, generation_config, batch_size, max_cache_length):
        """The cache transformers' generate() starts from (compat.BuildsGenerationCache): a latent cache, never its
        per-head DynamicCache / StaticCache."""
        fp8 = latent_cache_dtype_of(self, generation_config) == "fp8"
        return latent_cache_for_generate(self, generation_config, batch_size, max_cache_length, fp8)

    def init_continuous_batching(self, generation_config=None, continuous_batching_config=None, workload_hints=None):
        """transformers' continuous-batching manager (the engine behind generate_batch, `transformers serve
        --continuous-batching` and TRL's continuous-batching rollouts) over its paged latent cache (paged.py).

        With config.latent_cache_dtype = "fp8" (or a generation config's `latent_cache_dtype`) the paged cache holds
        the latent in e4m3 with per-token scales (paged_fp8.py): half the bytes per token of bf16.
        Refuses up front what that engine cannot run (transformers < 5.25, use_mtp, beam search, min_new_tokens and
        the repetition penalties, which it would leave out), and a kept manager (persistent_manager=True) asked for
        another latent cache dtype than it was built with.
        On CPU, an unsized cache is sized for the workload (or 32k tokens) with 512-token batches, instead of
        transformers' 60% of the RAM. The generation config is copied: transformers writes eos_token_id = -1 into
        one without an EOS."""
        gc = copy.deepcopy(generation_config if generation_config is not None else self.generation_config)
        check_continuous_batching(self, gc)
        if self.device.type == "cpu":
            from transformers.generation.configuration_utils import ContinuousBatchingConfig

            page = (continuous_batching_config or ContinuousBatchingConfig()).page_size
            continuous_batching_config = cpu_batching_defaults(continuous_batching_config, workload_hints, page)
        manager = super().init_continuous_batching(
            generation_config=gc, continuous_batching_config=continuous_batching_config,
            workload_hints=workload_hints)
        latent_cache_dtype = latent_cache_dtype_of(self, gc)
        if not hasattr(manager, "latent_cache_dtype"):  # a new manager, its cache not built yet
            manager.latent_cache_dtype = latent_cache_dtype
            if latent_cache_dtype == "fp8":
                from .paged_fp8 import use_fp8_latent_cache

                use_fp8_latent_cache(manager)
        elif manager.latent_cache_dtype != latent_cache_dtype:
            kept, asked = (dtype or "the model dtype" for dtype in (manager.latent_cache_dtype, latent_cache_dtype))
            raise ValueError(f"the kept continuous-batching manager stores the latent as {kept}, this call asks for "
                             f"{asked}: call model.destroy_cached_continuous_batching_manager() first")
        return manager

    def generate_batch(self, inputs, generation_config=None, continuous_batching_config=None, **kwargs):
        """transformers' generate_batch (continuous batching over the paged latent cache: absorbed decode, each
        request on its own), except that nothing fails quietly: an unsupported option raises before the loop starts,
        an unknown keyword raises, and a request that failed inside the loop raises instead of coming back empty.
        `latent_cache_dtype="fp8"` stores the paged latent in e4m3 (as config.latent_cache_dtype does).
        Returns {request_id: GenerationOutput} in input order, like transformers'."""
        if kwargs.pop("use_mtp", False):
            gc = copy.deepcopy(generation_config if generation_config is not None else self.generation_config)
            gc.use_mtp = True
            check_continuous_batching(self, gc)
        if "latent_cache_dtype" in kwargs:  # the manager reads it from the generation config
            generation_config = copy.deepcopy(generation_config if generation_config is not None
                                              else self.generation_config)
            generation_config.latent_cache_dtype = kwargs.pop("latent_cache_dtype")
        known = {"max_new_tokens", "record_timestamps", "progress_bar", "persistent_manager", "warmup"}
        unknown = sorted(set(kwargs) - known)
        if unknown:
            raise ValueError(f"generate_batch got unsupported arguments {unknown}; it takes {sorted(known)} (other "
                             "generation settings go in generation_config)")
        results = super().generate_batch(inputs, generation_config=generation_config,
                                         continuous_batching_config=continuous_batching_config, **kwargs)
        gc = generation_config if generation_config is not None else self.generation_config
        raise_failed_requests(results, len(inputs) * (getattr(gc, "num_return_sequences", None) or 1))
        return results

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


def without_mtp(config: DeepseekConfig) -> DeepseekConfig:
    """The config of a task head's backbone: a classifier predicts no next tokens, so no MTP module is built (a causal
    LM checkpoint's MTP weights are then left unused on load, as its lm_head is)."""
    if not config.num_nextn_predict_layers:
        return config
    config = copy.deepcopy(config)
    config.num_nextn_predict_layers = 0
    return config


# The task heads take their forward (and loss) from transformers' generic heads. Their __init__ is ours: the generic
# one builds the backbone with AutoModel.from_config, which fails where this file runs as remote code (the config
# class transformers loads there is not the one this file imports); these build DeepseekModel directly.
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


# save_pretrained writes `auto_map` into config.json and copies this file and the files it imports next to the
# weights, so `AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True)` works where this package is not
# installed. With the package imported and trust_remote_code unset, transformers still picks the registered classes.
DeepseekModel.register_for_auto_class("AutoModel")
DeepseekForCausalLM.register_for_auto_class("AutoModelForCausalLM")
DeepseekForSequenceClassification.register_for_auto_class("AutoModelForSequenceClassification")
DeepseekForTokenClassification.register_for_auto_class("AutoModelForTokenClassification")


__all__ = ["DeepseekPreTrainedModel", "DeepseekModel", "DeepseekForCausalLM", "DeepseekCausalLMOutput",
           "DeepseekForSequenceClassification", "DeepseekForTokenClassification"]

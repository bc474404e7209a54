"""DeepseekConfig: one config for DeepSeek-V3 and DeepSeek-V2 shaped models.

Field names and meanings are those of the official `config.json` files, so an official DeepSeek-V3 / V2 config (or
one saved by transformers' `deepseek_v3` / `deepseek_v2` classes) loads unchanged. The only additions are the
training knobs of the V3 report, which the official files do not carry:

    bias_update_speed   gamma of auxiliary-loss-free balancing (V3: 0.001); 0 or use_bias_update=False turns it off
    seq_balance_alpha   weight of the complementary sequence-wise balance loss (V3: 0.0001); 0 turns it off
    mtp_loss_weight     lambda of the multi-token-prediction loss (V3: 0.3 for the first 10T tokens, then 0.1)
    mtp_loss_weight_late, mtp_late_fraction
                        the schedule: after that fraction of the Trainer's max_steps, lambda becomes the late value

and the memory options of V3's training (report section 3.2.3), all off by default: each trades a little compute in
backward for activation memory, and none changes a loss or a gradient (tests/test_memory_options.py):

    recompute_norms     every RMSNorm keeps only its input for backward and recomputes its output there
    recompute_mla_up_proj
                        attention keeps only the low-rank q / kv-latent activations; the up-projections (q_b_proj,
                        kv_b_proj), their norms and the attention core over them are recomputed in backward
    recompute_swiglu    dense MLPs and experts keep the SwiGLU inputs (gate, up) only; act(gate) * up and the down
                        projection over it are recomputed in backward
    chunked_cross_entropy
                        the LM head and MTP's shared head run through a chunked linear cross-entropy
                        (chunked_ce.py) that never saves [tokens, vocab] logits: with a 129K vocabulary those are
                        the largest activation of a token. A training forward with labels then returns logits=None
    cross_entropy_chunk_tokens
                        tokens per chunk of that cross-entropy (the transient logits are chunk x vocab)

and DeepSeek-V3.2's sparse attention (DSA, sparse_attention.py), on when `index_topk` is set (transformers'
deepseek_v32 names; an official V3.2 config.json sets all three):

    index_topk          k: each query attends to the k earlier tokens its lightning indexer scores highest (V3.2: 2048)
    index_n_heads, index_head_dim
                        the indexer's heads and their width (V3.2: 64 x 128); its key is one index_head_dim vector
    dsa_impl            "sparse" (default: each query gathers its k latent rows), "masked" (dense attention under
                        the top-k mask, as transformers' DeepseekV32 and DeepSeek's reference code run it) or
                        "dense" (the indexer runs but attention ignores it: V3.2's dense warm-up)

quant.fp8_training.convert_to_fp8_training turns all four on (V3's recipe); its FP8TrainingConfig switches each off.

Invalid combinations raise a ValueError that names the field, at construction time rather than deep in a forward.
"""

from __future__ import annotations

from transformers import PreTrainedConfig
from transformers.activations import ACT2FN

# model_type of the official / transformers configs that this config reads unchanged.
OFFICIAL_MODEL_TYPES = ("deepseek_v3", "deepseek_v2", "deepseek_v32")
# topk_method names of the official configs, and the scoring function each one implies.
TOPK_METHODS = ("noaux_tc", "greedy", "group_limited_greedy")
SCORING_FUNCS = ("sigmoid", "softmax")
# RoPE variants the model implements (transformers' ROPE_INIT_FUNCTIONS computes the frequencies; "dynamic" NTK
# recomputes them for inputs longer than max_position_embeddings, with transformers' dynamic_rope_update).
SUPPORTED_ROPE_TYPES = ("default", "linear", "dynamic", "yarn", "llama3")
MLA_IMPLS = ("auto", "absorbed", "expanded")  # attention.py: which MLA path runs
LATENT_CACHE_DTYPES = (None, "fp8")  # None: the model dtype
# The memory options (module docstring): booleans, off by default; FP8 training turns them all on.
DSA_IMPLS = ("sparse", "masked", "dense")  # sparse_attention.py: how the indexer's top-k is applied
MEMORY_OPTIONS = ("recompute_norms", "recompute_mla_up_proj", "recompute_swiglu", "chunked_cross_entropy")


def check_latent_cache_dtype(value: str | None) -> str | None:
    """`value` if it is a latent cache dtype, else ValueError naming the field. The config validates its own field with
    it, and generate() / generate_batch() the same setting given as an argument or on a generation config."""
    if value not in LATENT_CACHE_DTYPES:
        raise ValueError(f"`latent_cache_dtype` must be None or 'fp8', got {value!r}")
    return value


def check_index_cache_dtype(value: str | None, index_topk: int | None) -> str | None:
    """`value` if it is how a cache may hold DeepSeek-V3.2's indexer keys (None: the model dtype; "fp8": e4m3 with a
    per-token scale) for a config with this `index_topk`, else ValueError naming the field. The config, generate() and
    the paged engine all check the setting with it."""
    if value not in LATENT_CACHE_DTYPES:
        raise ValueError(f"`index_cache_dtype` must be None or 'fp8', got {value!r}")
    if value is not None and index_topk is None:
        raise ValueError(f"`index_cache_dtype`={value!r} needs DeepSeek-V3.2's lightning indexer (`index_topk` set); "
                         "this config has none")
    return value


class DeepseekConfig(PreTrainedConfig):
    model_type = "deepseek"
    keys_to_ignore_at_inference = ["past_key_values"]
    # Names transformers' own DeepSeek configs use for the same fields.
    attribute_map = {"num_local_experts": "n_routed_experts", "num_mtp_layers": "num_nextn_predict_layers"}
    # Plans for transformers' distributed engine (from_pretrained(..., distributed_config=DistributedConfig(...)) under
    # torchrun); `*` is the layer index, and the MTP blocks (layers N..N+D-1) are matched like any other layer.
    # Tensor parallel: each rank holds num_attention_heads / tp_size heads of q_b_proj / q_proj, kv_b_proj (its own
    # W_UK / W_UV, which the absorbed path folds in) and o_proj. q_a_proj and the latent (kv_a_proj_with_mqa) are small
    # and computed whole on every rank: the cached latent is the same everywhere; mla_kv_a_proj sums the rope key's
    # per-rank gradients (the latent's come back summed through kv_b_proj). Dense MLPs and shared experts are split
    # Megatron-style (gate/up by columns, down by rows). Routed experts are left to the expert-parallel plan.
    base_model_tp_plan = {
        "layers.*.self_attn.q_proj": "colwise",
        "layers.*.self_attn.q_b_proj": "colwise",
        "layers.*.self_attn.kv_a_proj_with_mqa": "mla_kv_a_proj",
        "layers.*.self_attn.kv_b_proj": "colwise",
        "layers.*.self_attn.o_proj": "rowwise",
        "layers.*.mlp.shared_experts.gate_proj": "colwise",
        "layers.*.mlp.shared_experts.up_proj": "colwise",
        "layers.*.mlp.shared_experts.down_proj": "rowwise",
        "layers.*.mlp.gate_proj": "colwise",
        "layers.*.mlp.up_proj": "colwise",
        "layers.*.mlp.down_proj": "rowwise",
    }
    # Expert parallel: whole experts per rank (n_routed_experts / ep_size each, Shard(0) of the fused tensors); the
    # engine's ep_implementation (all_to_all, all_reduce) brings each expert its tokens.
    base_model_ep_plan = {
        "layers.*.mlp.experts.gate_up_proj": "grouped_gemm",
        "layers.*.mlp.experts.down_proj": "grouped_gemm",
        "layers.*.mlp.experts": "ep_dispatch_experts",
    }
    # Pipeline cut points, as transformers' DeepseekV3Config declares them (module: (inputs, outputs)); the split
    # itself (pipeline_stages.py) puts the MTP modules, norm and lm_head on the last stage.
    base_model_pp_plan = {
        "embed_tokens": (["input_ids"], ["inputs_embeds"]),
        "layers": (["hidden_states", "attention_mask"], ["hidden_states"]),
        "norm": (["hidden_states"], ["hidden_states"]),
    }
    # FSDP2: one unit per decoder layer (MTP blocks included), gathered for its forward and freed after; the final
    # norm (and lm_head, on the model class) stay gathered from the last forward to the backward.
    base_model_fsdp_plan = {
        "embed_tokens": "free_full_weight",
        "layers.*": "free_full_weight",
        "norm": "keep_full_weight",
    }

    def __init__(
        self,
        vocab_size: int = 129280,
        hidden_size: int = 7168,
        intermediate_size: int = 18432,  # dense FFN width (the first first_k_dense_replace layers)
        moe_intermediate_size: int = 2048,  # width of ONE fine-grained expert
        num_hidden_layers: int = 61,
        num_attention_heads: int = 128,
        num_key_value_heads: int | None = None,  # MLA has no KV heads; kept because official files carry it
        n_shared_experts: int = 1,  # always-on experts, fused into one MLP of n_shared * moe_intermediate
        n_routed_experts: int = 256,
        num_experts_per_tok: int = 8,
        n_group: int = 8,  # experts are split in n_group groups (one group per node in V3's deployment)
        topk_group: int = 4,  # a token may only pick experts inside its topk_group best groups
        topk_method: str = "noaux_tc",  # V3: noaux_tc (sigmoid + bias); V2: greedy / group_limited_greedy
        scoring_func: str | None = None,  # None: sigmoid for noaux_tc (V3), softmax otherwise (V2)
        norm_topk_prob: bool = True,
        routed_scaling_factor: float = 2.5,
        first_k_dense_replace: int = 3,
        moe_layer_freq: int = 1,
        q_lora_rank: int | None = 1536,  # None: full-rank q_proj (V2-Lite)
        kv_lora_rank: int = 512,  # the cached latent's width
        qk_nope_head_dim: int = 128,
        qk_rope_head_dim: int = 64,  # decoupled RoPE key, shared by all heads and cached beside the latent
        v_head_dim: int = 128,
        hidden_act: str = "silu",
        max_position_embeddings: int = 163840,
        initializer_range: float = 0.02,
        rms_norm_eps: float = 1e-6,
        use_cache: bool = True,
        pad_token_id: int | None = None,
        bos_token_id: int | None = 0,
        eos_token_id: int | list[int] | None = 1,
        tie_word_embeddings: bool = False,
        rope_theta: float = 10000.0,
        rope_scaling: dict | None = None,
        rope_parameters: dict | None = None,
        rope_interleave: bool = True,  # official weights rotate interleaved pairs (x0,x1),(x2,x3)...
        attention_bias: bool = False,
        attention_dropout: float = 0.0,
        num_nextn_predict_layers: int = 1,  # MTP depth D
        # --- training knobs from the V3 report (not in official files) ---
        use_bias_update: bool = True,
        bias_update_speed: float = 0.001,
        seq_balance_alpha: float = 0.0001,
        mtp_loss_weight: float = 0.3,
        mtp_loss_weight_late: float | None = None,  # V3: 0.1 for the last 4.8T of 14.8T tokens; None keeps one weight
        mtp_late_fraction: float = 10 / 14.8,  # fraction of training after which mtp_loss_weight_late applies
        # router logits per MoE layer in every output (transformers' MoE convention; also output_router_logits=True)
        output_router_logits: bool = False,
        # --- serving knobs ---
        mla_impl: str = "auto",  # "auto" | "absorbed" | "expanded": see attention.py
        latent_cache_dtype: str | None = None,  # None (model dtype) or "fp8": e4m3 latent cache, half the bytes
        index_cache_dtype: str | None = None,  # None (model dtype) or "fp8": V3.2's cached indexer keys in e4m3
        # generate() prefills prompts longer than this in chunks of this many tokens, so activation memory stays
        # bounded at any context (each chunk attends to the latent cache of the ones before); None: one shot. An
        # explicit generate(prefill_chunk_size=...) wins. (Not named prefill_chunk_size: transformers would copy
        # that into every generation config and chunk where no cache exists.)
        prefill_chunk_tokens: int | None = 4096,
        experts_implementation: str | None = None,
        # --- memory options (see the module docstring) ---
        recompute_norms: bool = False,
        recompute_mla_up_proj: bool = False,
        recompute_swiglu: bool = False,
        chunked_cross_entropy: bool = False,
        cross_entropy_chunk_tokens: int = 1024,
        # --- DeepSeek-V3.2 sparse attention (see the module docstring); index_topk None: no indexer (V3) ---
        index_topk: int | None = None,
        index_n_heads: int = 64,
        index_head_dim: int = 128,
        dsa_impl: str = "sparse",
        **kwargs,
    ):
        self.vocab_size = vocab_size
        self.hidden_size = hidden_size
        self.intermediate_size = intermediate_size
        self.moe_intermediate_size = moe_intermediate_size
        self.num_hidden_layers = num_hidden_layers
        self.num_attention_heads = num_attention_heads
        self.num_key_value_heads = num_attention_heads if num_key_value_heads is None else num_key_value_heads
        self.n_shared_experts = n_shared_experts
        self.n_routed_experts = n_routed_experts
        self.num_experts_per_tok = num_experts_per_tok
        # transformers' DeepseekV2Config leaves these None for greedy routing, where groups play no part.
        self.n_group = 1 if n_group is None else n_group
        self.topk_group = 1 if topk_group is None else topk_group
        self.topk_method = topk_method
        self.scoring_func = scoring_func or ("sigmoid" if topk_method == "noaux_tc" else "softmax")
        self.norm_topk_prob = norm_topk_prob
        self.routed_scaling_factor = routed_scaling_factor
        self.first_k_dense_replace = first_k_dense_replace
        self.moe_layer_freq = moe_layer_freq
        self.q_lora_rank = q_lora_rank
        self.kv_lora_rank = kv_lora_rank
        self.qk_nope_head_dim = qk_nope_head_dim
        self.qk_rope_head_dim = qk_rope_head_dim
        self.v_head_dim = v_head_dim
        self.hidden_act = hidden_act
        self.max_position_embeddings = max_position_embeddings
        self.initializer_range = initializer_range
        self.rms_norm_eps = rms_norm_eps
        self.use_cache = use_cache
        self.rope_theta = rope_theta
        self.rope_interleave = rope_interleave
        self.attention_bias = attention_bias
        self.attention_dropout = attention_dropout
        self.num_nextn_predict_layers = num_nextn_predict_layers
        self.use_bias_update = use_bias_update
        self.bias_update_speed = bias_update_speed
        self.seq_balance_alpha = seq_balance_alpha
        self.mtp_loss_weight = mtp_loss_weight
        self.mtp_loss_weight_late = mtp_loss_weight_late
        self.mtp_late_fraction = mtp_late_fraction
        self.output_router_logits = output_router_logits
        self.mla_impl = mla_impl
        self.latent_cache_dtype = latent_cache_dtype
        self.index_cache_dtype = index_cache_dtype
        self.prefill_chunk_tokens = prefill_chunk_tokens
        self.recompute_norms = recompute_norms
        self.recompute_mla_up_proj = recompute_mla_up_proj
        self.recompute_swiglu = recompute_swiglu
        self.chunked_cross_entropy = chunked_cross_entropy
        self.cross_entropy_chunk_tokens = cross_entropy_chunk_tokens
        self.index_topk = index_topk
        self.index_n_heads = index_n_heads
        self.index_head_dim = index_head_dim
        self.dsa_impl = dsa_impl
        # transformers' rope machinery reads `head_dim` for the rotary width: in MLA only the RoPE part rotates.
        self.head_dim = qk_rope_head_dim
        self.qk_head_dim = qk_nope_head_dim + qk_rope_head_dim
        # Official files say `rope_scaling` (with "type"); transformers 5 says `rope_parameters` (with "rope_type").
        self.rope_parameters = dict(rope_parameters or rope_scaling or {})
        if "type" in self.rope_parameters and "rope_type" not in self.rope_parameters:
            self.rope_parameters["rope_type"] = self.rope_parameters.pop("type")
        # Fields of official files that we do not model, dropped so they do not pollute the saved config.
        for legacy in ("aux_loss_alpha", "seq_aux", "ep_size", "scoring_func_v2", "pretraining_tp", "qk_head_dim",
                       "head_dim", "router_aux_loss_coef", "num_experts", "mlp_bias", "layer_types"):
            kwargs.pop(legacy, None)
        # transformers' deepseek_v32 spells the dense / MoE layout out per layer; ours derives it (is_moe_layer).
        mlp_layer_types = kwargs.pop("mlp_layer_types", None)
        kwargs.pop("model_type", None)
        self.validate_deepseek()  # before transformers' own rope checks, so errors name our fields
        derived = ["sparse" if self.is_moe_layer(i) else "dense" for i in range(num_hidden_layers)]
        if mlp_layer_types is not None and list(mlp_layer_types) != derived:
            raise ValueError(f"`mlp_layer_types` {mlp_layer_types} differs from the layout first_k_dense_replace="
                             f"{first_k_dense_replace} and moe_layer_freq={moe_layer_freq} give ({derived})")
        super().__init__(pad_token_id=pad_token_id, bos_token_id=bos_token_id, eos_token_id=eos_token_id,
                         tie_word_embeddings=tie_word_embeddings, experts_implementation=experts_implementation,
                         rope_theta=rope_theta, **kwargs)

    @classmethod
    def from_dict(cls, config_dict, **kwargs):
        """transformers' from_dict (behind from_pretrained and AutoConfig), which sets the caller's keyword overrides
        on the config after __init__ has validated the file's values: validated again, so that
        `from_pretrained(folder, mla_impl=...)` is checked like a value in config.json."""
        loaded = super().from_dict(config_dict, **kwargs)
        (loaded[0] if isinstance(loaded, tuple) else loaded).validate_deepseek()
        return loaded

    @classmethod
    def get_config_dict(cls, *args, **kwargs):
        """Read official `deepseek_v3` / `deepseek_v2` config.json files as ours (same fields, other model_type)."""
        config_dict, kwargs = super().get_config_dict(*args, **kwargs)
        if config_dict.get("model_type") in OFFICIAL_MODEL_TYPES:
            if config_dict["model_type"] == "deepseek_v2" and not any(
                    k in config_dict for k in ("num_nextn_predict_layers", "num_mtp_layers")):
                config_dict = dict(config_dict, num_nextn_predict_layers=0)  # DeepSeek-V2 has no MTP module
            if config_dict["model_type"] == "deepseek_v32":  # transformers' defaults, where a file omits them
                config_dict = {"index_topk": 2048, "index_n_heads": 64, "index_head_dim": 128, **config_dict}
            config_dict = dict(config_dict, model_type=cls.model_type)
        return config_dict, kwargs

    # ------------------------------------------------------------------------------------------------------------
    def validate_deepseek(self) -> None:
        """Raise ValueError naming the offending field for every value the model cannot use. Every field is checked on
        every config, a dense one (no MoE layer, no MTP module) included: its routing fields go unused there, but the
        config is saved and shared, and the serving knobs apply to any model."""
        for name in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                     "qk_nope_head_dim", "v_head_dim", "max_position_embeddings"):
            _positive_int(self, name)
        if not isinstance(self.kv_lora_rank, int) or self.kv_lora_rank <= 0:
            raise ValueError(
                f"`kv_lora_rank` must be a positive integer (the cached latent width), got {self.kv_lora_rank!r}")
        if self.q_lora_rank is not None and (not isinstance(self.q_lora_rank, int) or self.q_lora_rank <= 0):
            raise ValueError(f"`q_lora_rank` must be a positive integer or null, got {self.q_lora_rank!r}")
        if not isinstance(self.qk_rope_head_dim, int) or self.qk_rope_head_dim <= 0 or self.qk_rope_head_dim % 2:
            raise ValueError(
                f"`qk_rope_head_dim` must be a positive even integer (RoPE rotates pairs), got {self.qk_rope_head_dim!r}")
        rope_type = (self.rope_parameters or {}).get("rope_type", "default")
        if rope_type not in SUPPORTED_ROPE_TYPES:
            raise ValueError(f"`rope_scaling` type {rope_type!r} is not supported; use one of {SUPPORTED_ROPE_TYPES}")
        if self.hidden_act not in ACT2FN:
            raise ValueError(f"`hidden_act` must name one of transformers' activations, got {self.hidden_act!r}")
        for name in ("rms_norm_eps", "routed_scaling_factor"):
            if not isinstance(getattr(self, name), (int, float)) or getattr(self, name) <= 0:
                raise ValueError(f"`{name}` must be a number > 0, got {getattr(self, name)!r}")
        if not isinstance(self.attention_dropout, (int, float)) or not 0 <= self.attention_dropout < 1:
            raise ValueError(f"`attention_dropout` must be in [0, 1), got {self.attention_dropout!r}")
        if self.num_nextn_predict_layers is None or self.num_nextn_predict_layers < 0:
            raise ValueError(f"`num_nextn_predict_layers` must be >= 0, got {self.num_nextn_predict_layers!r}")
        if self.first_k_dense_replace < 0:
            raise ValueError(f"`first_k_dense_replace` must be >= 0, got {self.first_k_dense_replace!r}")
        self._validate_routing()
        self._validate_training_knobs()
        self._validate_memory_options()
        self._validate_sparse_attention()
        if self.mla_impl not in MLA_IMPLS:
            raise ValueError(f"`mla_impl` must be one of {MLA_IMPLS}, got {self.mla_impl!r}")
        check_latent_cache_dtype(self.latent_cache_dtype)
        check_index_cache_dtype(self.index_cache_dtype, self.index_topk)
        chunk = self.prefill_chunk_tokens
        if chunk is not None and (not isinstance(chunk, int) or isinstance(chunk, bool) or chunk < 1):
            raise ValueError(f"`prefill_chunk_tokens` must be a positive integer or null, got {chunk!r}")

    def _validate_routing(self) -> None:
        for name in ("moe_intermediate_size", "n_routed_experts", "num_experts_per_tok", "n_group", "topk_group",
                     "moe_layer_freq"):
            _positive_int(self, name)
        if self.n_shared_experts is None or self.n_shared_experts < 0:
            raise ValueError(f"`n_shared_experts` must be >= 0, got {self.n_shared_experts!r}")
        if self.topk_method not in TOPK_METHODS:
            raise ValueError(f"`topk_method` must be one of {TOPK_METHODS}, got {self.topk_method!r}")
        if self.scoring_func not in SCORING_FUNCS:
            raise ValueError(f"`scoring_func` must be one of {SCORING_FUNCS}, got {self.scoring_func!r}")
        if self.n_routed_experts % self.n_group:
            raise ValueError(
                f"`n_routed_experts` ({self.n_routed_experts}) must be divisible by `n_group` ({self.n_group})"
            )
        if self.topk_group > self.n_group:
            raise ValueError(f"`topk_group` ({self.topk_group}) must not exceed `n_group` ({self.n_group})")
        reachable = self.topk_group * (self.n_routed_experts // self.n_group)
        if self.topk_method != "greedy" and self.num_experts_per_tok > reachable:
            raise ValueError(
                f"`num_experts_per_tok` ({self.num_experts_per_tok}) exceeds the {reachable} experts inside "
                f"`topk_group` ({self.topk_group}) of `n_group` ({self.n_group}) groups"
            )
        if self.num_experts_per_tok > self.n_routed_experts:
            raise ValueError(
                f"`num_experts_per_tok` ({self.num_experts_per_tok}) exceeds `n_routed_experts` ({self.n_routed_experts})"
            )
        if self.topk_method == "noaux_tc" and self.n_routed_experts // self.n_group < 2:
            raise ValueError("`noaux_tc` scores a group by its top-2 experts: `n_routed_experts / n_group` must be >= 2")

    def _validate_training_knobs(self) -> None:
        for name in ("bias_update_speed", "seq_balance_alpha", "mtp_loss_weight"):
            _non_negative(self, name)
        if self.mtp_loss_weight_late is not None:
            _non_negative(self, "mtp_loss_weight_late")
        fraction = self.mtp_late_fraction
        if not isinstance(fraction, (int, float)) or isinstance(fraction, bool) or not 0 <= fraction <= 1:
            raise ValueError(f"`mtp_late_fraction` must be in [0, 1] (a fraction of max_steps), got {fraction!r}")

    def _validate_memory_options(self) -> None:
        for name in MEMORY_OPTIONS:
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"`{name}` must be True or False, got {getattr(self, name)!r}")
        _positive_int(self, "cross_entropy_chunk_tokens")

    def _validate_sparse_attention(self) -> None:
        if self.dsa_impl not in DSA_IMPLS:
            raise ValueError(f"`dsa_impl` must be one of {DSA_IMPLS}, got {self.dsa_impl!r}")
        if self.index_topk is None:
            return
        k = self.index_topk
        if not isinstance(k, int) or isinstance(k, bool) or k < 1:  # k > context is fine: every token is kept
            raise ValueError(f"`index_topk` must be a positive integer (tokens each query attends to) or null, "
                             f"got {k!r}")
        _positive_int(self, "index_n_heads")
        _positive_int(self, "index_head_dim")
        if self.index_head_dim < self.qk_rope_head_dim:
            raise ValueError(f"`index_head_dim` ({self.index_head_dim}) must be >= `qk_rope_head_dim` "
                             f"({self.qk_rope_head_dim}): the indexer rotates that many of its dimensions")
        if self.q_lora_rank is None:
            raise ValueError("the lightning indexer (`index_topk` set) reads the query's low-rank activation: "
                             "`q_lora_rank` must be set")

    @property
    def uses_sparse_attention(self) -> bool:
        """Whether the layers carry a lightning indexer (DeepSeek-V3.2)."""
        return self.index_topk is not None

    # ------------------------------------------------------------------------------------------------------------
    def is_moe_layer(self, layer_idx: int) -> bool:
        """Layers below first_k_dense_replace are dense (V3: 3, V2: 1); MTP blocks (idx >= num_hidden_layers) are MoE."""
        return layer_idx >= self.first_k_dense_replace and layer_idx % self.moe_layer_freq == 0

    @property
    def latent_cache_dim(self) -> int:
        """Values cached per token per layer: the compressed KV latent plus the shared RoPE key (576 for V3)."""
        return self.kv_lora_rank + self.qk_rope_head_dim


def _positive_int(config: DeepseekConfig, name: str) -> None:
    value = getattr(config, name)
    if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
        raise ValueError(f"`{name}` must be a positive integer, got {value!r}")


def _non_negative(config: DeepseekConfig, name: str) -> None:
    value = getattr(config, name)
    if not isinstance(value, (int, float)) or isinstance(value, bool) or value < 0:
        raise ValueError(f"`{name}` must be a number >= 0, got {value!r}")


# save_pretrained of a config (and of our models) writes auto_map["AutoConfig"] and copies this file (remote code).
DeepseekConfig.register_for_auto_class()

__all__ = ["DeepseekConfig"]

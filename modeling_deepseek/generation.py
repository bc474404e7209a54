"""Generation for DeepseekForCausalLM: `generate` over the latent cache, MTP speculation, continuous batching.

`DeepseekGenerationMixin` is transformers' GenerationMixin with what MLA and the MTP module change:

- generate() starts from a latent cache of ours where transformers would build its per-head one
  (compat.BuildsGenerationCache asks `generation_cache`): a DeepseekLatentCache (a DynamicCache; FP8 with
  `latent_cache_dtype="fp8"` or config.latent_cache_dtype; V3.2's indexer keys in e4m3 with index_cache_dtype="fp8"),
  or with `cache_implementation="static"` a DeepseekStaticLatentCache (a StaticCache) sized for the call, which a
  compiled forward decodes over without recompiling. The per-head caches of the other cache_implementations cannot hold the latent and are refused.
- prompts longer than config.prefill_chunk_tokens are prefilled in chunks, so activation memory stays bounded.
- `use_mtp=True` dispatches to the self-speculative loop of speculative.py, which checks its own arguments.
- init_continuous_batching / generate_batch run transformers' continuous-batching engine over its paged cache
  (continuous_batching.py), refusing up front what that engine would do wrong or drop.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import torch
from transformers import GenerationMixin
from transformers.generation.utils import GenerateDecoderOnlyOutput
from transformers.utils import logging

from .cache import DeepseekLatentCache, latent_cache_for_generate, static_latent_cache_for_generate, uses_static_cache
from .compat import CACHE_NAME, BuildsGenerationCache, pop_cache_argument
from .configuration import check_index_cache_dtype, check_latent_cache_dtype
from .continuous_batching import (
    check_continuous_batching,
    cpu_batching_defaults,
    guard_requests,
    index_cache_dtype_of,
    latent_cache_dtype_of,
    raise_failed_requests,
)
from .speculative import mtp_arguments, mtp_generate

logger = logging.get_logger(__name__)

@dataclass
class MTPGenerateOutput(GenerateDecoderOnlyOutput):
    """generate(use_mtp=True, return_dict_in_generate=True): the sequences plus how the drafts fared."""

    mtp_acceptance_rate: float | None = None
    mtp_drafted: int | None = None
    mtp_accepted: int | None = None


class DeepseekGenerationMixin(BuildsGenerationCache, GenerationMixin):
    """What DeepseekForCausalLM generates with; see the module docstring."""

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
        latent_cache_dtype = check_latent_cache_dtype(
            kwargs.pop("latent_cache_dtype", latent_cache_dtype_of(self, base)))
        index_cache_dtype = check_index_cache_dtype(
            kwargs.pop("index_cache_dtype", index_cache_dtype_of(self, base)), self.config.index_topk)
        use_mtp = kwargs.pop("use_mtp", None)
        if use_mtp is None:
            use_mtp = bool(getattr(base, "use_mtp", False))
        draft_tokens = kwargs.pop("mtp_draft_tokens", None)
        kwargs.update(self._long_prompt_chunking(inputs, base, kwargs))
        # The one copy of the generation config, with this call's settings in it: generation_cache() reads the cache
        # to start from off it (latent_cache_dtype, index_cache_dtype, cache_implementation, max_cache_len).
        gc = copy.deepcopy(base)
        gc.use_mtp = False
        gc.latent_cache_dtype, gc.index_cache_dtype = latent_cache_dtype, index_cache_dtype
        if use_mtp:
            return self._mtp_generate(inputs, gc, kwargs, draft_tokens)
        model_kwargs = gc.update(**kwargs)
        # Either name is ours to accept; transformers gets the one its release wants.
        user_cache = pop_cache_argument(model_kwargs.pop("cache", None), model_kwargs)
        if user_cache is not None:
            model_kwargs[CACHE_NAME] = user_cache
        return super().generate(inputs, generation_config=gc, **model_kwargs)

    def generation_cache(self, generation_config, batch_size, max_cache_length):
        """The cache transformers' generate() starts from (compat.BuildsGenerationCache): a latent cache, never its
        per-head DynamicCache / StaticCache."""
        fp8 = latent_cache_dtype_of(self, generation_config) == "fp8"
        index_fp8 = index_cache_dtype_of(self, generation_config) == "fp8"
        return latent_cache_for_generate(self, generation_config, batch_size, max_cache_length, fp8, index_fp8)

    def _mtp_generate(self, inputs, generation_config, kwargs, draft_tokens):
        """generate(use_mtp=True): speculative.py checks the arguments and runs the loop; `generation_config` is this
        call's own copy."""
        call = mtp_arguments(self, inputs, generation_config, kwargs, draft_tokens)
        fp8, index_fp8 = generation_config.latent_cache_dtype == "fp8", generation_config.index_cache_dtype == "fp8"
        caches = tuple(DeepseekLatentCache(self.config, fp8=fp8, index_fp8=index_fp8) for _ in range(2))
        if uses_static_cache(generation_config, self.config):  # each step appends k + 1 slots, rejected drafts as holes
            (B, P), N = call.input_ids.shape, self.config.num_hidden_layers
            new = generation_config.max_new_tokens
            if new is None:
                new = generation_config.max_length - P
            k = call.draft_tokens
            caches = tuple(static_latent_cache_for_generate(self, generation_config, B, P + (k + 1) * new - 1, fp8,
                                                            prompt_length=P, slots_per_token=k + 1, layers=layers,
                                                            index_fp8=index_fp8)
                           for layers in (range(N), [N]))
        sequences, stats = mtp_generate(self, call, generation_config, fp8_cache=fp8, caches=caches)
        self.last_mtp_stats = stats
        logger.info(f"MTP speculation: {stats.accepted}/{stats.drafted} drafts accepted ({stats.acceptance_rate:.1%})")
        if generation_config.return_dict_in_generate:
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

    # ------------------------------------------------------------------------------------------------------------
    # Continuous batching
    def init_continuous_batching(self, generation_config=None, continuous_batching_config=None, workload_hints=None):
        """transformers' continuous-batching manager (the engine behind generate_batch, `transformers serve
        --continuous-batching` and TRL's continuous-batching rollouts) over its paged latent cache
        (continuous_batching.py).

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
        index_cache_dtype = index_cache_dtype_of(self, gc)
        if not hasattr(manager, "latent_cache_dtype"):  # a new manager, its cache not built yet
            manager.latent_cache_dtype, manager.index_cache_dtype = latent_cache_dtype, index_cache_dtype
            guard_requests(manager)  # one request cannot stop it (the server's runs for good)
            if latent_cache_dtype == "fp8" or getattr(self.config, "index_topk", None) is not None:
                from .paged_fp8 import use_paged_latent_rows

                index_head_dim = self.config.index_head_dim if getattr(self.config, "index_topk", None) is not None else 0
                use_paged_latent_rows(manager, index_head_dim, latent_fp8=latent_cache_dtype == "fp8",
                                      index_fp8=index_cache_dtype == "fp8")
        elif (manager.latent_cache_dtype, manager.index_cache_dtype) != (latent_cache_dtype, index_cache_dtype):
            kept, asked = ("{} (indexer keys: {})".format(*(dtype or "the model dtype" for dtype in pair)) for pair in (
                (manager.latent_cache_dtype, manager.index_cache_dtype), (latent_cache_dtype, index_cache_dtype)))
            raise ValueError(f"the kept continuous-batching manager stores the latent as {kept}, this call asks for "
                             f"{asked}: call model.destroy_cached_continuous_batching_manager() first")
        return manager

    def generate_batch(self, inputs, generation_config=None, continuous_batching_config=None, **kwargs):
        """transformers' generate_batch (continuous batching over the paged latent cache: absorbed decode, each
        request on its own), except that nothing fails quietly: an unsupported option raises before the loop starts,
        an unknown keyword raises, and a request that failed inside the loop raises instead of coming back empty.
        `latent_cache_dtype="fp8"` stores the paged latent in e4m3 (as config.latent_cache_dtype does).
        Returns {request_id: GenerationOutput} in input order, like transformers'."""
        gc = generation_config if generation_config is not None else self.generation_config
        # Settings given as arguments go on a copy of the generation config, where the manager reads them.
        overrides = {"use_mtp": True} if kwargs.pop("use_mtp", False) else {}
        for name in ("latent_cache_dtype", "index_cache_dtype"):
            if name in kwargs:
                overrides[name] = kwargs.pop(name)
        if overrides:
            generation_config = gc = copy.deepcopy(gc)
            for name, value in overrides.items():
                setattr(gc, name, value)
        if "use_mtp" in overrides:
            check_continuous_batching(self, gc)  # refuses it, before any other complaint
        known = {"max_new_tokens", "record_timestamps", "progress_bar", "persistent_manager", "warmup"}
        unknown = sorted(set(kwargs) - known)
        if unknown:
            raise ValueError(f"generate_batch got unsupported arguments {unknown}; it takes {sorted(known)} (other "
                             "generation settings go in generation_config)")
        results = super().generate_batch(inputs, generation_config=generation_config,
                                         continuous_batching_config=continuous_batching_config, **kwargs)
        raise_failed_requests(results, len(inputs) * (getattr(gc, "num_return_sequences", None) or 1))
        return results

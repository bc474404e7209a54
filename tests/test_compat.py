"""One test per internal in modeling_deepseek/compat.py (model side) and trainers/compat.py (training side): each
checks that the installed library still has the private name or version-dependent behaviour the package relies on, and
fails with a message that names it."""

from __future__ import annotations

import inspect

import pytest
import torch
from transformers import GenerationConfig

from modeling_deepseek import compat
from trainers import compat as trainers_compat

from conftest import random_ids, tiny_model


# ---------------------------------------------------------------------------------------------------------------------
# Model side: modeling_deepseek/compat.py


def test_cache_name_matches_the_installed_transformers():
    """compat.CACHE_NAME: the name transformers' generate() hands the cache under and model outputs carry it in."""
    import dataclasses
    import inspect

    from transformers import GenerationMixin
    from transformers.modeling_outputs import CausalLMOutputWithPast

    from modeling_deepseek import compat

    fields = {f.name for f in dataclasses.fields(CausalLMOutputWithPast)}
    assert compat.CACHE_NAME in fields, (
        f"transformers' model outputs no longer have a `{compat.CACHE_NAME}` field ({sorted(fields)}): "
        "compat.CACHE_NAME and cache_kwargs() must follow the rename")
    params = inspect.signature(GenerationMixin.prepare_inputs_for_generation).parameters
    assert compat.CACHE_NAME in params, (
        f"GenerationMixin.prepare_inputs_for_generation no longer takes `{compat.CACHE_NAME}`: generate() would hand "
        "the model its cache under another name, and the model would decode without one")


def test_create_causal_mask_takes_the_cache_name_without_warning():
    import warnings

    from transformers.masking_utils import create_causal_mask

    from modeling_deepseek import compat
    from conftest import tiny_config

    from modeling_deepseek.cache import DeepseekLatentCache

    config = tiny_config()
    config._attn_implementation = "eager"  # a materialised mask, whose key length shows the cache was read
    embeds = torch.zeros(1, 3, config.hidden_size)
    cache = DeepseekLatentCache()
    cache.update(torch.zeros(1, 1, 2, config.kv_lora_rank), torch.zeros(1, 1, 2, config.qk_rope_head_dim), 0)
    # transformers 5.25 shows the deprecated name in the signature too; the cache must go in under the current one.
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        mask = create_causal_mask(config=config, inputs_embeds=embeds,
                                  attention_mask=torch.ones(1, 5, dtype=torch.long),
                                  position_ids=torch.arange(2, 5)[None], **compat.cache_kwargs(cache))
    assert mask.shape[-2:] == (3, 5), (
        f"create_causal_mask ignored the cache passed as `{compat.CACHE_NAME}` (mask {tuple(mask.shape)}, expected "
        "3 queries over 2 cached + 3 new keys)")


def test_cpu_flash_attention_returns_the_log_sum_exp():
    """compat.CPU_FLASH_ATTENTION: aten::_scaled_dot_product_flash_attention_for_cpu(q, k, v, dropout, is_causal,
    scale=) -> (out [B, H, T, D], logsumexp [B, H, T]); chunked prefill merges two calls by their log-sum-exps."""
    from modeling_deepseek import compat

    assert compat.CPU_FLASH_ATTENTION is not None, "torch no longer has aten::_scaled_dot_product_flash_attention_for_cpu"
    q, k, v = (torch.randn(1, 2, 4, 8) for _ in range(3))
    result = compat.CPU_FLASH_ATTENTION(q, k, v, 0.0, False, scale=0.5)
    out, lse = result[0], result[1]
    scores = (q @ k.transpose(-1, -2)) * 0.5
    assert torch.allclose(out, scores.softmax(-1) @ v, atol=1e-5), "the CPU flash kernel's output changed"
    assert torch.allclose(lse, scores.logsumexp(-1), atol=1e-5), "the CPU flash kernel no longer returns the LSE"


def test_module_apply_keeps_fp32_buffers_through_dtype_casts_and_to_empty():
    """compat.keep_fp32_buffers overrides torch's private nn.Module._apply(fn, recurse)."""
    import inspect

    from modeling_deepseek import compat
    from modeling_deepseek.routing import DeepseekTopkRouter
    from conftest import tiny_config

    assert list(inspect.signature(torch.nn.Module._apply).parameters)[:3] == ["self", "fn", "recurse"], (
        "torch.nn.Module._apply(fn, recurse) changed its signature")
    router = DeepseekTopkRouter(tiny_config())
    router.e_score_correction_bias.fill_(1 + 2**-10)  # not representable in bf16
    router.to(torch.bfloat16)
    assert router.weight.dtype == torch.bfloat16
    assert router.e_score_correction_bias.dtype == torch.float32
    assert router.e_score_correction_bias[0].item() == 1 + 2**-10
    with torch.device("meta"):
        meta = DeepseekTopkRouter(tiny_config())
    meta.to_empty(device="cpu")
    assert meta.e_score_correction_bias.device.type == "cpu" and meta.e_score_correction_bias.dtype == torch.float32


def test_experts_interface_dispatch_and_switch_detection():
    """transformers' use_experts_implementation dispatches on config._experts_implementation, and
    PreTrainedModel allows set_experts_implementation only when the model's module names the decorator."""
    import inspect

    from transformers.integrations.moe import ALL_EXPERTS_FUNCTIONS

    from modeling_deepseek import modeling
    from conftest import tiny_model

    assert "grouped_mm" in ALL_EXPERTS_FUNCTIONS, "transformers' experts interface has no grouped_mm kernel any more"
    assert "@use_experts_implementation" in inspect.getsource(modeling)
    model = tiny_model()
    model.set_experts_implementation("eager")
    assert model.config._experts_implementation == "eager"


def test_deepseek_v3_conversion_mapping_exists():
    """compat.register_deepseek_v3_conversion copies transformers' checkpoint conversion for deepseek_v3."""
    from transformers.conversion_mapping import get_checkpoint_conversion_mapping

    assert get_checkpoint_conversion_mapping("deepseek_v3"), (
        "transformers.conversion_mapping has no deepseek_v3 mapping: official per-expert keys would not load into "
        "the fused experts")
    assert get_checkpoint_conversion_mapping("deepseek")


# ---------------------------------------------------------------------------------------------------------------------
# Quantized loading


def test_optional_hub_file_returns_none_for_a_missing_file(tmp_path):
    """compat.optional_hub_file: cached_file's private _raise_exceptions_for_missing_entries=False."""
    (tmp_path / "config.json").write_text("{}")
    assert compat.optional_hub_file(str(tmp_path), "model.safetensors.index.json") is None
    assert compat.optional_hub_file(str(tmp_path), "config.json") == str(tmp_path / "config.json")


def test_bnb_quantizer_names_the_modules_it_skipped(tmp_path):
    """compat.bnb_modules_to_not_convert reads transformers' bitsandbytes quantizer's `modules_to_not_convert`."""
    pytest.importorskip("bitsandbytes")
    from transformers import BitsAndBytesConfig

    from modeling_deepseek import DeepseekForCausalLM

    tiny_model().save_pretrained(tmp_path)
    config = BitsAndBytesConfig(load_in_8bit=True, llm_int8_skip_modules=["model.layers.2"])
    model = DeepseekForCausalLM.from_pretrained(tmp_path, quantization_config=config)
    skipped = compat.bnb_modules_to_not_convert(model)
    assert "model.layers.2" in skipped, f"hf_quantizer.modules_to_not_convert no longer lists the skipped modules: {skipped}"
    assert not compat.bnb_should_convert("model.layers.2.mlp.experts", skipped)
    assert compat.bnb_should_convert("model.layers.1.mlp.experts", skipped)
    assert compat.bnb_should_convert("model.layers.21.mlp.experts", ["model.layers.2"])  # a module boundary


def test_bnb_linear4bit_cpu_avx512_flag():
    """compat.avoid_bnb_cpu_avx512_packing switches bitsandbytes' `support_avx512bf16_for_cpu` off for out % 32."""
    bnb = pytest.importorskip("bitsandbytes")
    layer = bnb.nn.Linear4bit(64, 80, bias=False)
    assert hasattr(layer, "support_avx512bf16_for_cpu"), "bitsandbytes' Linear4bit has no support_avx512bf16_for_cpu"
    layer.support_avx512bf16_for_cpu = True
    assert compat.avoid_bnb_cpu_avx512_packing(layer) and layer.support_avx512bf16_for_cpu is False
    aligned = bnb.nn.Linear4bit(64, 96, bias=False)
    aligned.support_avx512bf16_for_cpu = True
    assert not compat.avoid_bnb_cpu_avx512_packing(aligned) and aligned.support_avx512bf16_for_cpu


def test_grouped_mm_is_torchs_grouped_gemm():
    """compat.grouped_mm: F.grouped_mm (torch >= 2.10) or the older private torch._grouped_mm, with `offs` = the
    cumulative group ends."""
    x = torch.randn(5, 8)
    w = torch.randn(2, 8, 4)  # rows 16-byte aligned, as the kernel needs
    offs = torch.tensor([2, 5], dtype=torch.int32)
    y = compat.grouped_mm(x, w, offs=offs)
    assert torch.allclose(y, torch.cat([x[:2] @ w[0], x[2:] @ w[1]]), atol=1e-5), "torch's grouped_mm changed"


def test_mark_static_address_keeps_a_compiled_graph_reading_the_buffer_in_place():
    """compat.mark_static_address: torch._dynamo.mark_static_address exists and tags the tensor; a compiled function
    then sees in-place writes to it without recompiling (what the static latent cache relies on)."""
    import torch._dynamo

    buf = torch.zeros(4)
    compat.mark_static_address(buf)
    assert getattr(buf, "_dynamo_static_input_type", None) is not None, (
        "torch._dynamo.mark_static_address no longer tags the tensor (compat.mark_static_address)")
    torch._dynamo.reset()
    compiled = torch.compile(lambda x: (x * buf).sum(), backend="eager", fullgraph=True)
    assert compiled(torch.ones(4)) == 0
    buf.add_(1)
    assert compiled(torch.ones(4)) == 4
    torch._dynamo.reset()


def test_compile_on_any_device_makes_generate_compile_on_cpu(model):
    """compat.compile_on_any_device: CompileConfig's private `_compile_all_devices` flag is what lets generate()
    compile on a CPU (GenerationMixin._valid_auto_compile_criteria reads it)."""
    from transformers import CompileConfig, GenerationConfig

    from modeling_deepseek.cache import DeepseekStaticLatentCache

    assert "_compile_all_devices" in vars(CompileConfig), "CompileConfig._compile_all_devices is gone"
    cache = DeepseekStaticLatentCache(model.config, max_cache_len=8)
    cache.early_initialization(1, torch.float32, "cpu")
    gc = GenerationConfig(compile_config=CompileConfig())
    assert not model._valid_auto_compile_criteria({compat.CACHE_NAME: cache}, gc)
    gc = GenerationConfig(compile_config=compat.compile_on_any_device(CompileConfig()))
    assert model._valid_auto_compile_criteria({compat.CACHE_NAME: cache}, gc), (
        "generate() no longer compiles on CPU with CompileConfig._compile_all_devices (compat.compile_on_any_device)")


def test_generate_builds_its_cache_in_prepare_cache_for_generation(model, monkeypatch):
    """compat.BuildsGenerationCache: transformers' generate() builds the cache it starts from in the private
    GenerationMixin._prepare_cache_for_generation(generation_config, model_kwargs, generation_mode, batch_size,
    max_cache_length), and decodes over the cache that method leaves in model_kwargs."""
    from transformers import GenerationMixin

    from modeling_deepseek.cache import DeepseekLatentCache

    method = getattr(GenerationMixin, "_prepare_cache_for_generation", None)
    assert method is not None, "GenerationMixin._prepare_cache_for_generation is gone (compat.BuildsGenerationCache)"
    params = ["self", "generation_config", "model_kwargs", "generation_mode", "batch_size", "max_cache_length"]
    assert list(inspect.signature(method).parameters) == params, (
        f"GenerationMixin._prepare_cache_for_generation now takes {list(inspect.signature(method).parameters)} "
        f"(compat.BuildsGenerationCache expects {params})")
    built, asked = DeepseekLatentCache(), []
    monkeypatch.setattr(model, "generation_cache", lambda *args: asked.append(args[1:]) or built)
    out = model.generate(random_ids(2, 5), max_new_tokens=3, do_sample=False, return_dict_in_generate=True)
    assert asked == [(2, 5 + 3 - 1)], f"generate() asked for {asked}: (batch size, slots) expected"
    assert out.past_key_values is built, (
        "generate() did not decode over the cache _prepare_cache_for_generation left in model_kwargs")


def test_engine_takes_an_empty_tp_plan_from_the_release_compat_names():
    """DistributedMixin._resolve_parallel_plans: expert parallelism alone (tp_size=2, tp_plan={}, ep_size=2) resolves
    from EMPTY_TP_PLAN_RELEASE on and raises "has no `tp_plan`" before; parallel.py refuses it up front there."""
    from transformers.distributed import DistributedConfig

    from conftest import tiny_config
    from modeling_deepseek import DeepseekForCausalLM
    from modeling_deepseek.compat import engine_takes_empty_tp_plan

    with torch.device("meta"):
        model = DeepseekForCausalLM(tiny_config())
    layout = DistributedConfig(tp_size=2, tp_plan={}, ep_size=2)
    if engine_takes_empty_tp_plan():
        tp_plan, ep_plan, _ = model._resolve_parallel_plans(layout)
        assert not tp_plan and "model.layers.1.mlp.experts" in ep_plan
    else:
        with pytest.raises(ValueError, match="has no `tp_plan`"):
            model._resolve_parallel_plans(layout)


def test_rebind_engine_forward_points_the_engines_wrappers_at_a_swapped_class():
    """compat.rebind_engine_forward: transformers' TensorParallelLayer.install_forward wraps `module.forward` in a
    closure over `original_forward`, and EpDispatchExpertsParallel.install_forward in one over `implementation`
    (whose `experts_forward` is the captured forward). A class swapped afterwards is reached only once rebound.
    compat.ep_implementation_class: the registry's entry by name (trainers/pipeline_experts.py)."""
    from transformers.distributed.expert_parallel import EpDispatchExpertsParallel
    from transformers.distributed.tensor_parallel import TensorParallelLayer

    class Doubled(torch.nn.Linear):
        def forward(self, x):
            return 2 * super().forward(x)

    linear = torch.nn.Linear(4, 3)
    TensorParallelLayer().install_forward(linear, None)  # identity transforms: runs without a mesh
    x = torch.randn(2, 4)
    plain = linear(x)
    linear.__class__ = Doubled
    assert torch.equal(linear(x), plain), "the engine's wrapper calls the forward captured at install"
    assert compat.rebind_engine_forward(linear)
    assert torch.equal(linear(x), 2 * plain)

    class Probe:  # the EPImplementation protocol: built with (experts, ep_mesh, tp_mesh), holds experts_forward
        def __init__(self, experts, ep_mesh, tp_mesh):
            self.experts_forward = experts.forward

        def __call__(self, hidden, index, weights):
            return self.experts_forward(hidden)

    compat.register_ep_implementation("_compat_probe", Probe)
    assert compat.ep_implementation_class("_compat_probe") is Probe  # the pipeline's ep shards look it up by name
    assert compat.ep_implementation_class("all_to_all").__name__ == "AllToAllEP"
    with pytest.raises(ValueError, match="no expert-parallel implementation named 'nope'"):
        compat.ep_implementation_class("nope")
    experts = torch.nn.Linear(4, 4)
    EpDispatchExpertsParallel().install_forward(experts, None, tp_mesh=None, ep_implementation="_compat_probe")
    plain = experts(x, None, None)
    experts.__class__ = Doubled
    assert compat.rebind_engine_forward(experts)
    assert torch.equal(experts(x, None, None), 2 * plain)
    assert not compat.rebind_engine_forward(torch.nn.Linear(2, 2))  # no engine wrapper: nothing to do
    assert "experts_forward" in inspect.getsource(compat.ep_implementation_base())


def test_output_capturing_records_once_per_forward(monkeypatch):
    """compat.capture_outputs, OutputRecorder, merge_with_config_defaults, can_return_tuple
    (transformers.utils.output_capturing / transformers.utils.generic): DeepseekModel.forward collects what
    `_can_record_outputs` names through one active collector (the heads and the MTP modules open none), ties the last
    hidden state to the normed output, and takes use_cache from the config."""
    from transformers.utils import output_capturing

    recorder = compat.OutputRecorder(torch.nn.Linear, index=1)
    assert (recorder.target_class, recorder.index) == (torch.nn.Linear, 1), "OutputRecorder's fields changed"
    collectors = []
    original_set = output_capturing.CompileableContextVar.set

    def counting_set(self, value):
        collectors.append(sorted(value))
        return original_set(self, value)

    monkeypatch.setattr(output_capturing.CompileableContextVar, "set", counting_set)
    model = tiny_model()
    ids = random_ids(2, 6)
    with torch.no_grad():
        out = model(ids, labels=ids, output_hidden_states=True, output_attentions=True, output_router_logits=True)
    assert collectors == [["attentions", "hidden_states", "router_logits"]], (
        f"capture_outputs opened collectors {collectors} for one forward (one expected, from DeepseekModel.forward)")
    assert len(out.hidden_states) == model.config.num_hidden_layers + 1 and out.mtp_loss is not None
    with torch.no_grad():
        base = model.model(ids, output_hidden_states=True)
        model.config.use_cache = False
        uncached = model.model(ids)
    model.config.use_cache = True
    assert torch.equal(base.hidden_states[-1], base.last_hidden_state), "capture_outputs no longer ties the last one"
    assert compat.output_cache(base) is not None and compat.output_cache(uncached) is None, (
        "merge_with_config_defaults no longer fills use_cache from the config")


# ---------------------------------------------------------------------------------------------------------------------
# Continuous batching and transformers serve (continuous_batching.py, serve.py)


def test_paged_cache_class_and_mla_allocator():
    from transformers.generation.continuous_batching import PagedAttentionCache

    assert compat.PagedAttentionCache is PagedAttentionCache, (
        "transformers.generation.continuous_batching.cache.PagedAttentionCache moved: the model recognises "
        "continuous batching by it")
    if not compat.MLA_PAGED_CACHE:
        pytest.skip(f"transformers {compat.installed_transformers_version()} has no MLACacheAllocator")
    update = inspect.signature(PagedAttentionCache.update).parameters
    assert list(update) == ["self", "key_states", "value_states", "layer_idx", "kwargs"], (
        f"PagedAttentionCache.update changed its signature to {list(update)}: "
        "continuous_batching.paged_attention calls it")


@pytest.mark.skipif(not compat.MLA_PAGED_CACHE, reason="the FP8 paged latent needs transformers' MLACacheAllocator")
def test_a_manager_builds_the_paged_cache_class_it_is_given(model):
    """The FP8 paged latent (paged_fp8.py) relies on: the manager building its cache in _create_batch_processor by the
    name PagedAttentionCache (compat.build_paged_cache_with), the cache making one allocator per attention kind in
    _create_allocator, and the allocator subclass contract (_before / _after_cache_tensor_init, MLACacheAllocator's
    attributes). transformers' own manager and class must keep building the plain cache."""
    from transformers.generation.continuous_batching import ContinuousBatchingManager, PagedAttentionCache
    from transformers.generation.continuous_batching.cache_allocators import CacheAllocator, MLACacheAllocator

    from modeling_deepseek.paged_fp8 import FP8LatentAllocator, FP8PagedLatentCache

    assert "PagedAttentionCache" in ContinuousBatchingManager._create_batch_processor.__code__.co_names
    assert "_create_allocator" in PagedAttentionCache.__init__.__code__.co_names
    for name in ("_before_cache_tensor_init", "_after_cache_tensor_init", "register_cache_tensor", "update"):
        assert hasattr(CacheAllocator, name), f"CacheAllocator.{name} is gone: FP8LatentAllocator relies on it"
    managers = [model.init_continuous_batching(generation_config=GenerationConfig(
        do_sample=False, max_new_tokens=2, eos_token_id=-1, latent_cache_dtype=dtype)) for dtype in ("fp8", None)]
    plain = ContinuousBatchingManager(model, managers[1].generation_config, managers[1].continuous_batching_config)
    try:
        for manager in (*managers, plain):
            manager.warmup()
        fp8_cache, cache, plain_cache = (m.batch_processor.cache for m in (*managers, plain))
        assert type(fp8_cache) is FP8PagedLatentCache and type(cache) is type(plain_cache) is PagedAttentionCache
        (allocator,) = fp8_cache.cache_allocators.values()
        assert type(allocator) is FP8LatentAllocator and isinstance(allocator, MLACacheAllocator)
        assert type(next(iter(cache.cache_allocators.values()))) is MLACacheAllocator
    finally:
        for manager in (*managers, plain):
            manager.destroy()


@pytest.mark.skipif(not compat.MLA_PAGED_CACHE, reason=f"transformers serve of our models needs transformers >= "
                    f"{compat.SERVE_MIN_VERSION}")
def test_transformers_serve_model_loader_and_serve_run(tmp_path):
    """transformers serve's ModelLoader._load_model takes the class as getattr(transformers, architectures[0]) (so it
    refuses our folders) and Serve.run hands the model's process `self.loader`: modeling_deepseek.serve swaps in a
    loader that knows our classes."""
    from transformers.cli.serve import Serve
    from transformers.cli.serving.model_manager import ModelLoader

    from modeling_deepseek import DeepseekForCausalLM
    from modeling_deepseek.serve import DeepseekModelLoader

    tiny_model().save_pretrained(tmp_path)
    with pytest.raises(AttributeError, match="DeepseekForCausalLM"):
        ModelLoader(device="cpu")._load_model(str(tmp_path))
    assert not hasattr(__import__("transformers"), "DeepseekForCausalLM")
    loaded = DeepseekModelLoader(device="cpu")._load_model(str(tmp_path))
    assert type(loaded) is DeepseekForCausalLM
    assert not hasattr(__import__("transformers"), "DeepseekForCausalLM"), "the class stayed in transformers' namespace"
    assert "self.loader" in inspect.getsource(Serve.__init__) and "self.loader" in inspect.getsource(Serve.run), (
        "transformers' Serve no longer keeps its ModelLoader in self.loader for run(): modeling_deepseek.serve swaps "
        "its class there")


@pytest.mark.skipif(not compat.MLA_PAGED_CACHE, reason=f"transformers serve of our models needs transformers >= "
                    f"{compat.SERVE_MIN_VERSION}")
def test_transformers_serve_app_and_handler_hooks():
    """modeling_deepseek.serve_app reaches transformers' server through: Serve.run importing build_server from
    transformers.cli.serving.server when it runs (compat.app_built_with swaps it), build_server's first three
    arguments, and the handlers' private hooks (compat.SERVING_HANDLER_HOOKS), called in that order by handle_request;
    the continuous-batching loop's private _generation_loop_body (compat.survive_step_failures)."""
    from transformers.cli.serve import Serve
    from transformers.cli.serving import server
    from transformers.generation.continuous_batching import ContinuousBatchingManager

    assert "from .serving.server import build_server" in inspect.getsource(Serve.run), (
        "Serve.run no longer imports build_server as it runs: compat.app_built_with cannot add the request checks")
    assert list(inspect.signature(server.build_server).parameters)[:3] == [
        "model_manager", "chat_handler", "completion_handler"], (
        "build_server's arguments changed (compat.app_built_with)")
    for handler in compat.serving_handlers()[:2]:
        source = inspect.getsource(handler.handle_request)
        where = [source.find(f"self.{name}(") for name in compat.SERVING_HANDLER_HOOKS]
        assert -1 not in where and where == sorted(where), (
            f"{handler.__name__}.handle_request no longer calls {compat.SERVING_HANDLER_HOOKS} in this order "
            "(serve_app.CheckedRequests)")
    assert "self._generation_loop_body(" in inspect.getsource(ContinuousBatchingManager._run_generation_loop), (
        "the continuous-batching loop no longer steps through _generation_loop_body (compat.survive_step_failures)")


# ---------------------------------------------------------------------------------------------------------------------
# Training side: trainers/compat.py (Trainer, trl and accelerate internals)


def test_trainer_save_checkpoint_and_get_output_dir(tmp_path):
    """trainers.compat.CheckpointSaveHook, checkpoint_run_dir, redirect_checkpoint_run_dir: the training loop saves
    through the private Trainer._save_checkpoint(model, trial) (its signature: the test below), which writes
    <Trainer._get_output_dir(trial)>/checkpoint-N."""
    from datasets import Dataset
    from transformers import Trainer, TrainingArguments

    get_output_dir = getattr(Trainer, "_get_output_dir", None)
    assert get_output_dir is not None, "Trainer._get_output_dir is gone (trainers.compat.checkpoint_run_dir)"
    assert list(inspect.signature(get_output_dir).parameters) == ["self", "trial"], (
        f"Trainer._get_output_dir now takes {inspect.signature(get_output_dir)} (trainers.compat.checkpoint_run_dir)")

    seen = []

    class Hooked(trainers_compat.CheckpointSaveHook, Trainer):
        def around_checkpoint_save(self, save, trial):
            seen.append(trainers_compat.checkpoint_run_dir(self, trial))
            with trainers_compat.redirect_checkpoint_run_dir(self, tmp_path / "elsewhere"):
                save()

    ids = random_ids(2, 8).tolist()
    args = TrainingArguments(output_dir=str(tmp_path / "out"), max_steps=1, per_device_train_batch_size=2,
                             save_strategy="steps", save_steps=1, save_only_model=True, report_to=[], use_cpu=True,
                             disable_tqdm=True, logging_strategy="no")
    trainer = Hooked(model=tiny_model(train=True), args=args,
                     train_dataset=Dataset.from_dict({"input_ids": ids, "labels": ids}))
    trainer.train()
    assert seen == [str(tmp_path / "out")], (
        f"Trainer._save_checkpoint was called {len(seen)} times by the training loop, run dir {seen} "
        "(trainers.compat.CheckpointSaveHook overrides it; trainers.compat.checkpoint_run_dir reads "
        "Trainer._get_output_dir)")
    assert (tmp_path / "elsewhere" / "checkpoint-1" / "model.safetensors").is_file(), (
        "Trainer._save_checkpoint no longer writes under Trainer._get_output_dir() "
        "(trainers.compat.redirect_checkpoint_run_dir)")
    assert not (tmp_path / "out" / "checkpoint-1").exists()
    assert "_get_output_dir" not in vars(trainer)  # the redirect is undone


def test_trl_fused_lm_head_replaces_instance_forward():
    """trainers.compat.forward_replaced_by_trl / restore_class_forward: trl's SFTTrainer calls
    trl.trainer.utils.add_fused_lm_head(model), which sets an instance attribute `forward` defined in trl; accelerate's
    mixed-precision wrapper keeps the forward it wraps in `model._original_forward`."""
    from accelerate import Accelerator
    from trl import SFTTrainer
    from trl.trainer import utils as trl_utils

    add_fused_lm_head = getattr(trl_utils, "add_fused_lm_head", None)
    assert add_fused_lm_head is not None, (
        "trl.trainer.utils.add_fused_lm_head is gone (trainers.compat.forward_replaced_by_trl)")
    assert "add_fused_lm_head(" in inspect.getsource(SFTTrainer.__init__), (
        "trl's SFTTrainer.__init__ no longer calls add_fused_lm_head (trainers.compat.forward_replaced_by_trl)")
    assert "model._original_forward = model.forward" in inspect.getsource(Accelerator.prepare_model), (
        "accelerate's Accelerator.prepare_model no longer keeps model._original_forward "
        "(trainers.compat.forward_replaced_by_trl)")

    model = tiny_model()
    ids = random_ids(1, 8)
    with torch.no_grad():
        reference = model(ids, labels=ids).loss
    assert not trainers_compat.forward_replaced_by_trl(model)
    add_fused_lm_head(model)
    assert "forward" in vars(model) and trainers_compat.forward_replaced_by_trl(model), (
        "add_fused_lm_head no longer sets the instance's forward to a function of trl "
        "(trainers.compat.forward_replaced_by_trl)")
    model._original_forward, model.forward = model.forward, lambda *a, **k: None  # what accelerate's wrapper does
    assert trainers_compat.forward_replaced_by_trl(model)
    del model._original_forward
    trainers_compat.restore_class_forward(model)
    assert not trainers_compat.forward_replaced_by_trl(model)
    with torch.no_grad():
        assert torch.equal(model(ids, labels=ids).loss, reference)


# The class whose private methods each mixin of trainers/compat.py overrides.
OVERRIDDEN_CLASSES = {"CheckpointSaveHook": ("transformers", "Trainer"), "GRPOTrainerHooks": ("trl", "GRPOTrainer")}


def private_methods(cls) -> dict:
    return {name: fn for name, fn in vars(cls).items()
            if name.startswith("_") and not name.startswith("__") and callable(fn)}


def parameters(fn) -> list[tuple]:
    """Names, kinds and defaults of `fn`'s parameters (what a caller relies on; annotations are not)."""
    return [(p.name, p.kind, p.default) for p in inspect.signature(fn).parameters.values()]


def test_every_private_method_trainers_compat_overrides_exists_with_its_signature():
    """trainers.compat's mixins override Trainer._save_checkpoint(model, trial), trl.GRPOTrainer._generate_single_turn
    (prompt_ids, images, multimodal_fields, num_generations, has_tool_images) and trl.GRPOTrainer._compute_loss(model,
    inputs): each must still exist on the library's class, with the parameters the override takes."""
    import importlib

    mixins = {name: cls for name, cls in vars(trainers_compat).items()
              if isinstance(cls, type) and cls.__module__ == trainers_compat.__name__ and private_methods(cls)}
    assert set(mixins) == set(OVERRIDDEN_CLASSES), (
        f"trainers/compat.py overrides private methods in {sorted(mixins)}; this test knows "
        f"{sorted(OVERRIDDEN_CLASSES)}")
    for mixin_name, (module, class_name) in OVERRIDDEN_CLASSES.items():
        base = getattr(importlib.import_module(module), class_name)
        for name, override in private_methods(mixins[mixin_name]).items():
            original = getattr(base, name, None)
            assert original is not None, f"{module}.{class_name}.{name} is gone (trainers.compat.{mixin_name})"
            ours, theirs = parameters(override), parameters(original)
            assert ours == theirs, (f"{module}.{class_name}.{name} now takes {inspect.signature(original)}; "
                                    f"trainers.compat.{mixin_name} overrides it as {inspect.signature(override)}")


def test_our_trainers_override_private_methods_only_through_trainers_compat():
    """A private method of Trainer / trl overridden outside trainers/compat.py would escape the test above."""
    import trainers

    for name in ("DeepseekTrainer", "DeepseekSFTTrainer", "GRPOTrainer"):
        cls = getattr(trainers, name)
        for klass in cls.__mro__:
            if klass.__module__.startswith("trainers.") and klass.__module__ != "trainers.compat":
                overridden = [m for m in private_methods(klass) if any(hasattr(base, m) for base in cls.__mro__
                                                                       if not base.__module__.startswith("trainers."))]
                assert not overridden, f"{klass.__qualname__} overrides {overridden} outside trainers/compat.py"


def test_trl_grpo_trainer_attributes_the_deepseek_trainer_reads():
    """trainers.GRPOTrainer reads these attributes of trl.GRPOTrainer after its __init__, and these batch keys."""
    import trl

    source = inspect.getsource(trl.GRPOTrainer)
    for name in ("self.use_vllm", "self.use_transformers_continuous_batching", "self.temperature",
                 "self.reward_func_names", "self.generation_config", "sampling_per_token_logps",
                 "old_per_token_logps", "completion_mask"):
        assert name in source, f"trl.GRPOTrainer no longer uses `{name}`, which trainers.GRPOTrainer reads"


def test_compiled_modules_are_recognised_both_ways():
    """trainers.compat.is_compiled_module reads torch._dynamo's OptimizedModule and nn.Module._compiled_call_impl."""
    from torch import nn

    plain = nn.Sequential(nn.Linear(2, 2))
    assert not trainers_compat.is_compiled_module(plain)
    assert trainers_compat.is_compiled_module(torch.compile(nn.Linear(2, 2))), "torch.compile no longer wraps the module"
    plain[0].compile()
    assert trainers_compat.is_compiled_module(plain), "Module.compile() no longer sets _compiled_call_impl"

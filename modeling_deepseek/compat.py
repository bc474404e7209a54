"""Every private or version-dependent internal of another library that the model side touches, in one place.

modeling_deepseek reaches transformers, bitsandbytes and torch through their public APIs only. Where no public API
does the job, the touch lives here, named for what it does, and tests/test_compat.py checks each one against the
installed release: when a library changes the internal, that test fails with a message naming it, instead of the
package going silently wrong. save_pretrained copies this module into every remote-code checkpoint, so it holds
nothing the training stack needs: the Trainer / trl internals that trainers/ touches live in trainers/compat.py.
"""

from __future__ import annotations

# ---------------------------------------------------------------------------------------------------------------------
# Modeling, generation and caches (transformers), torch kernels

import dataclasses

import torch
import transformers
from packaging import version
from transformers.modeling_outputs import MoeModelOutputWithPast

# Output capturing, as transformers' own models do it: `capture_outputs` wraps the base model's forward and records,
# through forward hooks, what the class's `_can_record_outputs` names (OutputRecorder: module class + output index)
# into `hidden_states` / `attentions` / `router_logits`; `merge_with_config_defaults` fills `use_cache` from the
# config; `can_return_tuple` honours return_dict=False on the heads. transformers exports none of them at the top
# level: its models import them from these modules (the same names in 5.23, 5.24 and 5.25).
from transformers.utils.generic import can_return_tuple, merge_with_config_defaults
from transformers.utils.output_capturing import OutputRecorder, capture_outputs

# transformers 5.24 renamed the cache argument of forward(), generate(), create_causal_mask() and the field of every
# model output from `past_key_values` to `cache` (the old name is deprecated); 5.23 knows only `past_key_values`.
# The model takes either name from its callers and hands the cache on under the name the installed release wants.
CACHE_NAME = "cache" if "cache" in {f.name for f in dataclasses.fields(MoeModelOutputWithPast)} else "past_key_values"


# The first release whose distributed engine (DistributedMixin._resolve_parallel_plans) reads tp_plan={} with
# tp_size > 1 as "no tensor-parallel rules", i.e. expert parallelism alone over the tensor-parallel ranks; 5.23
# raises "has no `tp_plan`" there. parallel.py refuses that layout up front on older releases.
EMPTY_TP_PLAN_RELEASE = "5.25"


def engine_takes_empty_tp_plan() -> bool:
    return version.parse(transformers.__version__) >= version.parse(EMPTY_TP_PLAN_RELEASE)


def cache_kwargs(cache) -> dict:
    """{name: cache} under the installed release's name, for model outputs and create_causal_mask."""
    return {CACHE_NAME: cache}


def output_cache(output):
    """The cache a model output carries, read without touching the deprecated alias."""
    return getattr(output, CACHE_NAME, None)


def pop_cache_argument(cache, kwargs: dict):
    """The cache a caller passed to forward(), under either name (never both)."""
    legacy = kwargs.pop("past_key_values", None)
    if cache is not None and legacy is not None:
        raise ValueError("pass the cache as `cache` or as `past_key_values`, not both")
    return cache if cache is not None else legacy


class BuildsGenerationCache:
    """Mixin for a model whose generate() starts from its own cache classes, built by its `generation_cache(
    generation_config, batch_size, max_cache_length)`, instead of transformers' per-head DynamicCache / StaticCache.

    transformers' generate() builds its cache in the private `GenerationMixin._prepare_cache_for_generation(
    generation_config, model_kwargs, generation_mode, batch_size, max_cache_length)` (5.23-5.25), naming those classes
    itself: no public hook lets a model choose. Building the cache before generate() and passing it in is no way
    round: transformers refuses a cache together with a `cache_implementation`, which a model's generation config
    (or generation_config.json) may hold. A cache the caller passes, or use_cache=False, takes transformers' path."""

    def _prepare_cache_for_generation(self, generation_config, model_kwargs, generation_mode, batch_size,
                                      max_cache_length):
        if model_kwargs.get(CACHE_NAME) is None and generation_config.use_cache is not False:
            model_kwargs[CACHE_NAME] = self.generation_cache(generation_config, batch_size, max_cache_length)
            return
        super()._prepare_cache_for_generation(generation_config, model_kwargs, generation_mode, batch_size,
                                              max_cache_length)


# torch's CPU flash-attention kernel returns the log-sum-exp next to the output, which lets two attention calls over
# disjoint key sets be merged exactly (chunked prefill, attention.prefix_causal_sdpa). No public op returns it.
CPU_FLASH_ATTENTION = getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu", None)


# transformers' continuous batching (generate_batch, `transformers serve --continuous-batching`, TRL's
# use_transformers_continuous_batching) hands the model its PagedAttentionCache; the model recognises it by class
# (masking_utils does the same). Storing MLA's latent there needs the MLACacheAllocator, new in transformers 5.25;
# 5.23's paged cache would lay the latent out as per-head keys and values.
try:
    from transformers.generation.continuous_batching.cache import PagedAttentionCache
except ImportError:  # pragma: no cover - every supported release has it
    PagedAttentionCache = None
try:
    from transformers.generation.continuous_batching.cache_allocators import MLACacheAllocator  # noqa: F401

    MLA_PAGED_CACHE = True
except ImportError:
    MLA_PAGED_CACHE = False
PAGED_CACHE_MIN_VERSION = "5.25"


def build_paged_cache_with(manager, cache_class) -> None:
    """Make one continuous-batching `manager` build `cache_class` (a PagedAttentionCache subclass) as its cache.

    transformers' ContinuousBatchingManager builds the cache in its private `_create_batch_processor`, naming
    PagedAttentionCache as a global of its module; no argument chooses another class. The manager gets its own copy of
    that method whose global resolves to `cache_class`; transformers' class and module are left as they are."""
    import types

    method = type(manager)._create_batch_processor
    if "PagedAttentionCache" not in method.__code__.co_names:
        raise RuntimeError(
            f"transformers {installed_transformers_version()}: ContinuousBatchingManager._create_batch_processor no "
            "longer builds its cache as PagedAttentionCache, so another cache class cannot be given to it "
            "(modeling_deepseek.compat.build_paged_cache_with needs updating)")
    scope = {**method.__globals__, "PagedAttentionCache": cache_class}
    rebuilt = types.FunctionType(method.__code__, scope, method.__name__, method.__defaults__, method.__closure__)
    manager._create_batch_processor = types.MethodType(rebuilt, manager)


def survive_step_failures(manager, on_failure) -> None:
    """Keep one continuous-batching `manager`'s loop alive through a failed step.

    transformers' loop treats any exception of a step (its private `_generation_loop_body`: schedule, forward,
    sample) as fatal: every request fails and the manager takes no more (`fatal_error`), for good. Here the manager's
    own copy of that method hands such an exception to `on_failure(batch_processor, error)`, which fails the requests
    it holds, and the loop goes on with the next requests."""
    body = manager._generation_loop_body

    def guarded(batch_processor, bootstrapping):
        try:
            return body(batch_processor, bootstrapping)
        except Exception as error:  # noqa: BLE001 - any failure of a step: it is reported to its requests
            on_failure(batch_processor, error)
            return True

    manager._generation_loop_body = guarded


def installed_transformers_version() -> str:
    import transformers

    return transformers.__version__


# torch's grouped GEMM: public as torch.nn.functional.grouped_mm from torch 2.10 on, torch._grouped_mm before.
grouped_mm = getattr(torch.nn.functional, "grouped_mm", None) or torch._grouped_mm


# A buffer that keeps its address for the life of a static cache is declared so to dynamo, which then reads it in
# place instead of treating it as a graph input (what lets CUDA graphs replay over the cache). torch offers this only
# under torch._dynamo (transformers' StaticLayer uses the same call). Looked up at call time: importing torch._dynamo
# is not free, and only a static cache needs it.
def mark_static_address(tensor: torch.Tensor) -> None:
    torch._dynamo.mark_static_address(tensor)


def compile_on_any_device(compile_config):
    """Let generate() compile with `compile_config` on any device: transformers compiles automatically only on
    accelerators unless the private CompileConfig._compile_all_devices flag is set (its own tests set it for CPU)."""
    compile_config._compile_all_devices = True
    return compile_config


def keep_fp32_buffers(module: torch.nn.Module, fn, recurse: bool, names: tuple[str, ...]) -> torch.nn.Module:
    """nn.Module._apply for `module` that leaves the buffers `names` in float32 (the device still follows `fn`).

    torch offers no public per-buffer opt-out of `model.to(dtype)` / `.half()`; the balancing bias must not be
    rounded to bf16 (a gamma = 1e-3 step vanishes next to values near 1). `to_empty()` after meta-device init passes
    through here too: a meta buffer has no value to keep, so the new (empty) one is taken as it is, in float32.
    """
    kept = {name: module._buffers[name] for name in names if module._buffers.get(name) is not None}
    torch.nn.Module._apply(module, fn, recurse)
    for name, old in kept.items():
        new = module._buffers[name]
        module._buffers[name] = new.float() if old.is_meta else old.to(device=new.device, dtype=torch.float32)
    return module


def register_deepseek_v3_conversion(model_type: str) -> None:
    """Load official per-expert keys (`mlp.experts.{j}.gate_proj.weight` ...) into the fused expert tensors and save
    them back, with transformers' own mapping for deepseek_v3. The registry has no other public door for a model
    type outside transformers; `overwrite=True` keeps a second import (remote code) from raising."""
    from transformers.conversion_mapping import get_checkpoint_conversion_mapping, register_checkpoint_conversion_mapping

    register_checkpoint_conversion_mapping(model_type, get_checkpoint_conversion_mapping("deepseek_v3"), overwrite=True)



# transformers serve (5.25: transformers.cli.serve.Serve) loads its model in a spawned process through its ModelLoader's
# private `_load_model`, which takes the class as getattr(transformers, config.architectures[0]): a class outside
# transformers is refused, with or without trust_remote_code. No public hook chooses the class. `Serve.__init__` builds
# the loader (`self.loader`) and serves at its end, through `Serve.run`, which hands the loader to the model's process.
SERVE_MIN_VERSION = "5.25"


def transformers_serve(loader_class, **serve_options) -> None:
    """Run transformers serve (the OpenAI-compatible server) with `serve_options` (Serve's own keyword arguments),
    its models loaded by `loader_class`, a subclass of its ModelLoader: the loader Serve built is switched to that
    class in `Serve.run`, before the model's process gets it. `serve_cli_class(loader_class)` is the same as a class
    for typer (`python -m modeling_deepseek.serve`)."""
    serve_cli_class(loader_class)(**serve_options)


def serve_cli_class(loader_class, customize_app=None, extra_options=()):
    """transformers' Serve (a class for typer), serving through `loader_class`; `customize_app(app, *handlers)`, if
    given, gets the FastAPI app and its handlers (build_server's arguments) before the server starts, and
    `extra_options` (inspect.Parameters, keyword-only) are options of the command beside Serve's own, kept on the
    instance by their names (Serve.__init__ starts serving: they are set before it runs)."""
    import inspect

    from transformers.cli.serve import Serve

    names = [option.name for option in extra_options]

    class DeepseekServe(Serve):
        __doc__ = Serve.__doc__

        def __init__(self, *args, **kwargs):
            for name in names:
                setattr(self, name, kwargs.pop(name, None))
            super().__init__(*args, **kwargs)

        def run(self, *args, **kwargs):
            self.loader.__class__ = loader_class
            if customize_app is None:
                return super().run(*args, **kwargs)
            with app_built_with(lambda app, *handlers: customize_app(self, app, *handlers)):
                return super().run(*args, **kwargs)

    signature = inspect.signature(Serve.__init__)
    DeepseekServe.__init__.__signature__ = signature.replace(
        parameters=[*signature.parameters.values(), *extra_options])
    return DeepseekServe


def serve_model_loader_base():
    """transformers' ModelLoader (transformers.cli.serving.model_manager), or an error naming the version that has it
    and the commands that get it."""
    try:
        from transformers.cli.serving.model_manager import ModelLoader
    except ImportError:
        ModelLoader = None
    if ModelLoader is None or not hasattr(ModelLoader, "_load_model"):
        raise RuntimeError(f"python -m modeling_deepseek.serve needs transformers >= {SERVE_MIN_VERSION} (its serving "
                           f"ModelLoader); transformers {installed_transformers_version()} is installed. Serve from "
                           f"the newest-releases venv (`make serve`, which builds it with `make venv-latest`), or "
                           f"upgrade this one: pip install -U 'transformers>={SERVE_MIN_VERSION}'")
    return ModelLoader


# Serve.run builds its FastAPI app with transformers.cli.serving.server.build_server(model_manager, chat_handler,
# completion_handler, ...), imported from that module when it runs; the app and its handlers are locals of run, and no
# argument adds a middleware, an exception handler or a check. The module's build_server is swapped for the duration
# of run (the life of the server), for one that hands the app and handlers to `customize` before returning the app.
# The handlers' request checks are overridden through their private methods, called in this order for each request:
# _validate_request(body) first, _build_generation_kwargs(body, generation_config) once the model is known, then
# _check_prompt_length(engine, inputs) with the tokenized prompt, before generation starts.
SERVING_HANDLER_HOOKS = ("_validate_request", "_build_generation_kwargs", "_check_prompt_length")


class app_built_with:
    def __init__(self, customize):
        self.customize = customize

    def __enter__(self):
        from transformers.cli.serving import server

        self.original = original = server.build_server

        def build_server(model_manager, chat_handler, completion_handler, *args, **kwargs):
            app = original(model_manager, chat_handler, completion_handler, *args, **kwargs)
            self.customize(app, model_manager, chat_handler, completion_handler)
            return app

        server.build_server = build_server

    def __exit__(self, *exc):
        from transformers.cli.serving import server

        server.build_server = self.original


def serving_handlers():
    """transformers' handlers of /v1/completions and /v1/chat/completions, their prompt_length(inputs), and the error
    of a dead engine; the handlers checked to have the hooks serve_app.py overrides."""
    from transformers.cli.serving.chat_completion import ChatCompletionHandler
    from transformers.cli.serving.completion import CompletionHandler
    from transformers.cli.serving.utils import EngineDeadError, prompt_length

    for handler in (CompletionHandler, ChatCompletionHandler):
        missing = [name for name in SERVING_HANDLER_HOOKS if not callable(getattr(handler, name, None))]
        if missing:
            raise RuntimeError(f"transformers {installed_transformers_version()}: {handler.__name__} has no {missing}, "
                               "where modeling_deepseek.serve_app checks requests (compat.serving_handlers needs "
                               "updating)")
    return CompletionHandler, ChatCompletionHandler, prompt_length, EngineDeadError


class exposed_in_transformers:
    """`with exposed_in_transformers(cls, ...):` the classes are attributes of the `transformers` module (by their
    names) for the duration, so that getattr(transformers, config.architectures[0]) finds them."""

    def __init__(self, *classes):
        self.classes = classes

    def __enter__(self):
        import transformers

        self.saved = {cls.__name__: transformers.__dict__.get(cls.__name__) for cls in self.classes}
        for cls in self.classes:
            setattr(transformers, cls.__name__, cls)

    def __exit__(self, *exc):
        import transformers

        for name, previous in self.saved.items():
            if previous is None:
                delattr(transformers, name)
            else:
                setattr(transformers, name, previous)

# ---------------------------------------------------------------------------------------------------------------------
# Quantized loading (transformers' quantizers and hub files, bitsandbytes' CPU kernels)


def optional_hub_file(path: str, filename: str, **hub_kwargs) -> str | None:
    """transformers' cached_file, returning None for a file the repository does not have (its private
    `_raise_exceptions_for_missing_entries=False`): a sharded checkpoint's index is optional."""
    from transformers.utils import cached_file

    return cached_file(path, filename, _raise_exceptions_for_missing_entries=False, **hub_kwargs)


def bnb_modules_to_not_convert(model) -> list[str]:
    """The module names transformers' bitsandbytes quantizer left in full precision (its `modules_to_not_convert`,
    the config's llm_int8_skip_modules plus the output embedding); the fused experts follow the same list."""
    return list(getattr(getattr(model, "hf_quantizer", None), "modules_to_not_convert", None) or [])


def bnb_should_convert(name: str, modules_to_not_convert: list[str]) -> bool:
    """transformers' own rule for which module names a quantizer skips (prefix, dotted boundary or suffix)."""
    from transformers.quantizers.quantizers_utils import should_convert_module

    return should_convert_module(name, list(modules_to_not_convert))


def avoid_bnb_cpu_avx512_packing(module) -> bool:
    """bitsandbytes 0.50's CPU Linear4bit repacks its weight for AVX512-BF16 kernels on the first forward (its
    `support_avx512bf16_for_cpu` flag) and asserts out_features % 32 == 0 (e.g. kv_a_proj_with_mqa of a small model:
    kv_lora_rank + rope = 80). Such a layer is sent down bitsandbytes' generic path instead, which has no such
    constraint as long as in_features is a multiple of the 4-bit block size (it dequantizes wrongly otherwise, so
    those are left to fail loudly). Returns whether the module was switched."""
    if not getattr(module, "support_avx512bf16_for_cpu", False):
        return False
    blocksize = getattr(getattr(module, "weight", None), "blocksize", 64) or 64
    if module.out_features % 32 and module.in_features % blocksize == 0:
        module.support_avx512bf16_for_cpu = False
        return True
    return False


# ---------------------------------------------------------------------------------------------------------------------
# transformers' distributed engine: the module forward its tensor- / expert-parallel wrappers call

def rebind_engine_forward(module: torch.nn.Module) -> bool:
    """Point the engine's wrapper around `module` at the forward of the module's *current* class.

    Loaded with DistributedConfig(tp / ep), a planned module's `forward` is an instance attribute: the engine's
    closure (`TensorParallelLayer.install_forward` / `ExpertParallelLayer.install_forward`: free variable
    `original_forward`; `EpDispatchExpertsParallel.install_forward`: free variable `implementation`, an
    EPImplementation whose documented `experts_forward` attribute, also on the implementations an AutoEP holds) calls
    the bound forward it captured at load. A class swapped afterwards (FP8 training's in-place conversion) is not
    reached through that bound method; this rebinds every captured forward of `module` to `type(module).forward`.
    Returns False when `module` has no engine wrapper; raises when it has one this function cannot read."""
    installed = module.__dict__.get("forward")
    if installed is None:
        return False
    fresh = type(module).forward.__get__(module)

    def captured(obj) -> bool:
        return getattr(obj, "__self__", None) is module and callable(obj)

    def rebind_implementation(impl, seen) -> int:
        if id(impl) in seen:
            return 0
        seen.add(id(impl))
        count = 0
        for name, value in vars(impl).items():
            if name == "experts_forward" and captured(value):
                setattr(impl, name, fresh)
                count += 1
            elif hasattr(value, "experts_forward"):
                count += rebind_implementation(value, seen)
        return count

    count = 0
    for name, cell in zip(installed.__code__.co_freevars, installed.__closure__ or ()):
        value = cell.cell_contents
        if name == "original_forward" and captured(value):
            cell.cell_contents = fresh
            count += 1
        elif name == "implementation" and hasattr(value, "experts_forward"):
            count += rebind_implementation(value, set())
    if count == 0:
        raise RuntimeError(
            f"{type(module).__name__}: transformers {transformers.__version__}'s distributed engine wrapped this "
            f"module's forward in {installed.__qualname__!r}, which holds no `original_forward` / `implementation` "
            "this package knows how to rebind (modeling_deepseek/compat.py rebind_engine_forward)")
    return True


# The engine's registry of how an `ep_dispatch_experts` module reaches its experts (DistributedConfig.ep_implementation
# names an entry). Its module documents `EPImplementationInterface.register(name, cls)` and the `EPImplementation`
# base class for exactly this, but transformers.distributed does not export them (the same in 5.23 and 5.25).

def ep_implementation_base() -> type:
    from transformers.distributed.expert_parallel import EPImplementation

    return EPImplementation


def register_ep_implementation(name: str, cls: type) -> None:
    from transformers.distributed.expert_parallel import EPImplementationInterface

    EPImplementationInterface.register(name, cls)


def ep_implementation_class(name: str) -> type:
    """The EPImplementation registered under `name` (transformers' EPImplementationInterface: "all_to_all", ...)."""
    from transformers.distributed.expert_parallel import EPImplementationInterface

    implementations = EPImplementationInterface()
    if name not in implementations:
        raise ValueError(f"no expert-parallel implementation named {name!r}; registered: {sorted(implementations)}")
    return implementations[name]

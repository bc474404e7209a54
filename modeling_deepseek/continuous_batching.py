"""MLA over transformers' paged cache: continuous batching (`generate_batch`, `init_continuous_batching`, the
OpenAI-compatible server, TRL's continuous-batching rollouts).

transformers' continuous-batching engine packs every scheduled request into one row: the queries of all requests
side by side ([1, H, sum T_i, *]), each request a prefill chunk or a single decode token. From 5.25 its paged cache
stores MLA layers as one [latent | rope key] row per token (`MLACacheAllocator`, 576 values for V3), and
`cache.update(latent, k_rope, layer_idx, kwargs)` writes the new rows and hands back, for the requests of the batch
one after the other, their cached rows plus the new ones ([1, 1, sum S_i, *]), with `cu_seq_lens_q` /
`cu_seq_lens_k` telling where each request starts.

transformers' own DeepseekV3 expands all sum S_i rows through kv_b_proj at every step and attends with a
[sum T_i, sum S_i] block-diagonal mask. Here each request attends on its own to its own rows, through the same two
paths as any other forward (attention.py): absorbed (MQA over the latent rows, nothing per head per cached token) for
decode tokens, expanded for prefill chunks, whichever the FLOP count says. Decode tokens of several requests are
attended in one padded batch. With latent_cache_dtype="fp8" the rows are e4m3 with per-token scales (paged_fp8.py);
attention gets them dequantized, like any other. A DeepSeek-V3.2 model (lightning indexer) keeps its indexer key in the
same rows and attends sparsely: decode tokens read their indexer keys and only their top-k latent rows
(paged_sparse.py); index_cache_dtype="fp8" stores the indexer key in e4m3.

What the paged engine cannot do is refused before it starts (`check_continuous_batching`), since inside its loop an
exception only marks requests as failed; `raise_failed_requests` turns such failures back into an exception.
`guard_requests` keeps one request from stopping a running manager (the server's): a prompt of no tokens is refused
as it is added (with no token there is no query row for attention to reshape: the step would fail), and a step that
fails anyway fails only the request at fault (`StepFailureIsolation`): the requests it held are put back from their
prompt + generated tokens and retried alone, so the one that fails on its own gets the error and the others complete
with the tokens they would have had; the loop goes on.
"""

from __future__ import annotations

import torch

from .compat import (
    MLA_PAGED_CACHE,
    PAGED_CACHE_MIN_VERSION,
    PagedAttentionCache,
    installed_transformers_version,
)
from .compat_batching import schedule_alone, survive_step_failures
from .configuration import check_index_cache_dtype, check_latent_cache_dtype

# CPU defaults when the caller sizes nothing (transformers' default takes 60% of the RAM for the cache on CPU and
# 8192-token batches, whose [batch tokens x cached tokens] mask alone can outgrow the cache).
CPU_MAX_BATCH_TOKENS = 512
CPU_DEFAULT_CACHE_TOKENS = 32 * 1024
# Generation options (with their no-op values) that the engine's logits processors do not apply.
UNBATCHABLE_OPTIONS = (("min_length", 0), ("min_new_tokens", None), ("repetition_penalty", 1.0),
                       ("encoder_repetition_penalty", 1.0))


def is_paged_cache(cache) -> bool:
    return PagedAttentionCache is not None and isinstance(cache, PagedAttentionCache)


def _segments(kwargs, total_q: int) -> list[tuple[int, int, int, int]]:
    """(q0, q1, k0, k1) per request with at least one query, from the engine's cumulative lengths."""
    cu_q = kwargs["cu_seq_lens_q"].tolist()
    cu_k = kwargs["cu_seq_lens_k"]
    cu_k = (cu_k if torch.is_tensor(cu_k) else next(iter(cu_k.values()))).tolist()
    return [(cu_q[i], cu_q[i + 1], cu_k[i], cu_k[i + 1]) for i in range(len(cu_q) - 1)
            if cu_q[i + 1] > cu_q[i] and cu_q[i + 1] <= total_q]


def paged_attention(attn, q_nope, q_rope, latent_B1TC, k_rope_B1TR, cache, kwargs,
                    indexer_inputs=None) -> torch.Tensor:
    """Write this step's latent rows into the paged cache and attend request by request; returns [1, sum T_i, H, V].

    q_nope / q_rope [1, H, sum T_i, *]; latent / k_rope [1, 1, sum T_i, *] (rope already applied). A V3.2 layer
    (with a lightning indexer) passes `indexer_inputs` = (hidden states, q_low, its keys, cos, sin) and attends
    sparsely (paged_sparse.py)."""
    if indexer_inputs is not None:
        from .paged_sparse import paged_indexed_attention

        x_1TD, q_low_1TX, index_keys_1TI, cos, sin = indexer_inputs
        return paged_indexed_attention(attn, x_1TD, q_low_1TX, q_nope, q_rope, latent_B1TC[:, 0], k_rope_B1TR[:, 0],
                                       index_keys_1TI, cos, sin, cache, kwargs, _segments)
    latent_B1SC, k_rope_B1SR = cache.update(latent_B1TC, k_rope_B1TR, attn.layer_idx, kwargs)
    H, total_q = q_nope.shape[1], q_nope.shape[2]
    out_BTHV = q_nope.new_zeros(1, total_q, H, attn.v_head_dim)
    impl = attn.config._attn_implementation
    impl = "eager" if impl in ("eager", "paged|eager") else impl
    decode = []
    for q0, q1, k0, k1 in _segments(kwargs, total_q):
        if q1 - q0 == 1 and attn.use_absorbed(1, k1 - k0):
            decode.append((q0, k0, k1))
            continue
        qn, qr = q_nope[:, :, q0:q1], q_rope[:, :, q0:q1]
        latent, k_rope = latent_B1SC[:, :, k0:k1], k_rope_B1SR[:, :, k0:k1]
        if attn.use_absorbed(q1 - q0, k1 - k0):
            out, _ = attn.absorbed_attention(qn, qr, latent, k_rope, None)
        else:
            out, _ = attn.expanded_attention(qn, qr, latent, k_rope, None, impl)
        out_BTHV[:, q0:q1] = out
    if decode:
        _batched_decode(attn, q_nope, q_rope, latent_B1SC, k_rope_B1SR, decode, out_BTHV)
    return out_BTHV


def _batched_decode(attn, q_nope, q_rope, latent_B1SC, k_rope_B1SR, decode, out_BTHV) -> None:
    """Absorbed attention of D single-token requests at once: their latent rows padded to the longest, the padding
    masked out. One batched GEMM per step instead of D small ones."""
    q_idx = torch.tensor([q0 for q0, _, _ in decode], device=q_nope.device)
    lengths = [k1 - k0 for _, k0, k1 in decode]
    S = max(lengths)
    rows = torch.cat([torch.arange(k0, k1) for _, k0, k1 in decode]).to(q_nope.device)
    slots = torch.cat([torch.arange(n) + i * S for i, n in enumerate(lengths)]).to(q_nope.device)
    D = len(decode)

    def padded(x_B1SX):
        x_SX = x_B1SX[0, 0]
        buf = x_SX.new_zeros(D * S, x_SX.shape[-1])
        buf[slots] = x_SX[rows]
        return buf.view(D, 1, S, -1)

    valid_DS = torch.zeros(D * S, dtype=torch.bool, device=q_nope.device)
    valid_DS[slots] = True
    mask_D11S = valid_DS.view(D, 1, 1, S)
    qn = q_nope[0, :, q_idx].transpose(0, 1).unsqueeze(2)  # [D, H, 1, nope]
    qr = q_rope[0, :, q_idx].transpose(0, 1).unsqueeze(2)
    out, _ = attn.absorbed_attention(qn, qr, padded(latent_B1SC), padded(k_rope_B1SR), mask_D11S)
    out_BTHV[0, q_idx] = out[:, 0]


# ---------------------------------------------------------------------------------------------------------------------
# Before and after the engine's loop


def check_continuous_batching(model, generation_config) -> None:
    """Raise, naming the reason, for what the paged engine cannot run with this model (checked before its loop starts:
    inside the loop, errors only mark the requests failed)."""
    if not MLA_PAGED_CACHE:
        raise RuntimeError(
            f"Continuous batching (generate_batch, init_continuous_batching, `transformers serve "
            f"--continuous-batching`, TRL's use_transformers_continuous_batching) of DeepSeek's MLA needs transformers "
            f">= {PAGED_CACHE_MIN_VERSION}, whose paged cache stores the {model.config.latent_cache_dim}-wide latent "
            f"(MLACacheAllocator); transformers {installed_transformers_version()} is installed. Use generate(), or "
            "upgrade transformers."
        )
    check_latent_cache_dtype(latent_cache_dtype_of(model, generation_config))
    check_index_cache_dtype(index_cache_dtype_of(model, generation_config), model.config.index_topk)
    if generation_config is not None and getattr(generation_config, "use_mtp", False):
        raise ValueError(
            "Continuous batching with use_mtp=True is not supported: transformers' continuous-batching engine has no "
            "speculative decoding (one token per request and step). Use generate(use_mtp=True), or set "
            "use_mtp=False for continuous batching."
        )
    if generation_config is not None and (generation_config.num_beams or 1) > 1:
        raise ValueError("Continuous batching does not do beam search (num_beams > 1); use generate()")
    if generation_config is not None:
        # Options whose logits processor the engine leaves out: min lengths (built only with a prompt length, which
        # it does not pass) and the repetition penalties (marked unsupported, dropped with a warning).
        ignored = [f"{name}={getattr(generation_config, name)!r}" for name, no_op in UNBATCHABLE_OPTIONS
                   if getattr(generation_config, name, no_op) not in (no_op, None)]
        if ignored:
            raise ValueError(f"Continuous batching cannot apply {', '.join(ignored)}: transformers' engine would "
                             "leave it out. Unset it, or use generate().")
    if model.config._attn_implementation not in ("sdpa", "eager", "paged|eager"):
        raise ValueError(f"Continuous batching of this model runs with attn_implementation 'sdpa' or 'eager', got "
                         f"{model.config._attn_implementation!r}")


def guard_requests(manager) -> None:
    """Make a continuous-batching manager refuse a prompt of no tokens when it is added (ValueError: the server
    answers 400), and survive a failed step failing only the request(s) at fault (StepFailureIsolation)."""
    add_request = manager.add_request

    def checked_add_request(input_ids, *args, **kwargs):
        if len(input_ids) == 0:
            raise ValueError("A request needs at least one prompt token: this one has none (a tokenizer that adds no "
                             "BOS token turns an empty prompt into no tokens)")
        return add_request(input_ids, *args, **kwargs)

    manager.add_request = checked_add_request  # add_requests goes through it too
    survive_step_failures(manager, StepFailureIsolation())


# ---------------------------------------------------------------------------------------------------------------------
# A failed step fails the request at fault, alone

# A request held by this many failed steps fails with the cause of the last, even if it never failed alone (a fault
# that needs several requests together, such as running out of memory, would otherwise re-queue them for ever).
STEP_FAILURE_LIMIT = 3


class StepFailureIsolation:
    """What a manager's loop does when a step fails (compat_batching.survive_step_failures hands it the failure).

    One forward covers every request of a step, so the exception names no culprit. The requests the step held are
    put back in the waiting queue, restarted from their prompt + the tokens they already generated (transformers'
    soft reset, `RequestState.create_equivalent_initial_request`: their prefill is redone, their outputs go on where
    they were), and become suspects. While there are suspects, each step schedules the oldest one alone
    (compat_batching.schedule_alone) until it has generated a token; then it rejoins the others. So:

    - a step that fails holding one request fails that request, with the cause: it failed on its own;
    - a step that fails holding several fails none of them (until STEP_FAILURE_LIMIT): each is retried alone, the
      culprit fails there, the others complete with the tokens an undisturbed run gives them;
    - a step that fails before it was scheduled suspects every request (each one retried alone).

    Bounded: every failed step either fails a request or counts one more failure for each request it held, and a
    request fails at its STEP_FAILURE_LIMIT-th. The cost of a failure: the held requests' prefill redone, one step
    alone each. The other requests (running but not in the step, or waiting) are put back too, since the step's
    buffers and the cache are reset to a clean state (`ContinuousBatchProcessor.reset`); they are not suspects."""

    def __init__(self) -> None:
        self.suspects: list[str] = []  # request ids to run alone, oldest first
        self.failed_steps: dict[str, int] = {}  # failed steps that held each request
        self.scheduled: list[str] | None = None  # the requests of the step in progress; None: not scheduled yet
        self.scheduler = None  # the scheduler whose schedule_batch goes through self.schedule

    def before_step(self, batch_processor) -> None:
        self.scheduled = None
        scheduler = batch_processor.scheduler
        if self.scheduler is not scheduler:  # the first step of this batch processor
            schedule_batch = scheduler.schedule_batch
            scheduler.schedule_batch = lambda token_budget, cache_budget: self.schedule(
                scheduler, schedule_batch, token_budget, cache_budget)
            self.scheduler = scheduler

    def schedule(self, scheduler, schedule_batch, token_budget: int, cache_budget: int):
        suspect = self.next_suspect(scheduler)
        if suspect is None:
            batch = schedule_batch(token_budget, cache_budget)
            self.scheduled = None if batch[0] is None else [future.state.request_id for future in batch[0]]
        else:
            batch = schedule_alone(scheduler, schedule_batch, suspect, token_budget, cache_budget)
            self.scheduled = [suspect.request_id]
        return batch

    def next_suspect(self, scheduler):
        """The oldest suspect still to run alone: one that was put back and has not generated a token since."""
        while self.suspects:
            request_id = self.suspects[0]
            state = scheduler.active_requests.get(request_id) or scheduler.waiting_requests.get(request_id)
            if state is not None and not state.generated_tokens:
                return state
            self.suspects.pop(0)  # through a step alone, or finished, failed or cancelled meanwhile
        return None

    def after_failure(self, batch_processor, error: Exception) -> None:
        from transformers.utils import logging

        scheduler = batch_processor.scheduler
        active = list(scheduler.active_requests.values())
        waiting = list(scheduler.waiting_requests.values())
        known = {state.request_id: state for state in active + waiting}
        held = [rid for rid in (self.scheduled if self.scheduled is not None else known) if rid in known]
        cause = f"{type(error).__name__}: {error}"
        failing = {}
        if len(held) == 1:
            failing[held[0]] = RuntimeError(f"{cause} (a continuous-batching step with this request alone failed)")
        for request_id in held if len(held) > 1 else ():
            self.failed_steps[request_id] = self.failed_steps.get(request_id, 0) + 1
            if self.failed_steps[request_id] >= STEP_FAILURE_LIMIT:
                failing[request_id] = RuntimeError(
                    f"{cause} (this request was in {STEP_FAILURE_LIMIT} failed continuous-batching steps)")
        logging.get_logger(__name__).error(
            "A continuous-batching step holding %d request(s) failed: %s. Failing %s; retrying the others alone.",
            len(held), cause, sorted(failing) or "none", exc_info=error)

        for request_id, reason in failing.items():
            batch_processor.output_router.fail_and_deliver(known[request_id], reason)
        batch_processor.reset()  # the cache's pages, the scheduler's queues and the step's buffers: emptied
        for state in active + waiting:  # the step's requests first (active ones), then the waiting, in their order
            if state.request_id not in failing:
                scheduler.add_waiting_request(restarted(state))
        self.suspects = [rid for rid in dict.fromkeys(held + self.suspects) if rid in known and rid not in failing]
        self.failed_steps = {rid: n for rid, n in self.failed_steps.items() if rid in known and rid not in failing}


def restarted(state):
    """A request as it goes back to the waiting queue after a failed step: untouched if it never started, otherwise
    transformers' soft reset of it (prompt + generated tokens as the new prompt, the same id, max_new_tokens less the
    tokens it has; its output still splits them as prompt and generated)."""
    started = state.position_offset > 0 or state.generated_tokens or state.is_cpu_offloaded
    return state.create_equivalent_initial_request() if started or state.tokens_to_process else state


def latent_cache_dtype_of(model, generation_config) -> str | None:
    """The latent cache dtype a generation asks for: the generation config's `latent_cache_dtype` where it has one
    (generate_batch(latent_cache_dtype=...) puts it there), else the model config's."""
    return getattr(generation_config, "latent_cache_dtype", model.config.latent_cache_dtype)


def index_cache_dtype_of(model, generation_config) -> str | None:
    """How the caches (paged, and generate()'s) store a V3.2 model's indexer keys: the generation config's
    `index_cache_dtype` where it has one (generate / generate_batch(index_cache_dtype=...) put it there), else the
    model config's (None: the model dtype)."""
    return getattr(generation_config, "index_cache_dtype", model.config.index_cache_dtype)


def cpu_batching_defaults(cb_config, workload_hints, page_size: int):
    """A copy of `cb_config` with the cache size and batch-token budget filled in for a CPU run when unset. The cache
    holds the workload (every request at its longest) when the hints say it (more could never be used, whatever
    share of the RAM max_memory_percent allows: TRL sets 0.5 for GPUs); otherwise CPU_DEFAULT_CACHE_TOKENS unless
    max_memory_percent was set."""
    import copy

    from transformers.generation.configuration_utils import ContinuousBatchingConfig

    cb_config = copy.deepcopy(cb_config) if cb_config is not None else ContinuousBatchingConfig()
    if cb_config.num_blocks is None:
        hints = workload_hints
        longest = (hints.max_prompt_length + hints.max_generated_length) if hints is not None else 0
        if hints is not None and hints.num_requests > 0 and longest > 0:
            cb_config.num_blocks = hints.num_requests * (-(-longest // page_size) + 1)
        elif cb_config.max_memory_percent is None:
            cb_config.num_blocks = -(-CPU_DEFAULT_CACHE_TOKENS // page_size)
    if cb_config.max_batch_tokens is None:
        cb_config.max_batch_tokens = CPU_MAX_BATCH_TOKENS
    return cb_config


def raise_failed_requests(results: dict, expected: int) -> None:
    """generate_batch's results, checked: a failed or missing request raises instead of coming back empty."""
    failed = {rid: out.error for rid, out in results.items() if out.error is not None}
    if failed:
        rid, error = next(iter(failed.items()))
        raise RuntimeError(f"generate_batch: {len(failed)} of {expected} request(s) failed; {rid}: {error}")
    if len(results) != expected:
        raise RuntimeError(f"generate_batch: {expected - len(results)} of {expected} request(s) returned no result "
                           "(the continuous-batching loop stopped early; see the log above)")

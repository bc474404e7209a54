"""The internals of transformers' continuous-batching loop (5.25) that its failure isolation touches
(continuous_batching.StepFailureIsolation), kept apart from compat.py, and like it tested against the installed
release by tests/test_compat.py, which fails naming the piece when transformers changes it.

transformers' loop runs each step (schedule, forward, sample, update) through the manager's private
`_generation_loop_body`, and lets an exception there end the manager for good; its schedulers take every request
they hold, with no way to schedule a subset. Failure isolation needs both: to outlive a failed step, and to run one
request alone.
"""

from __future__ import annotations

from collections import deque


def survive_step_failures(manager, isolation) -> None:
    """Keep one continuous-batching `manager`'s loop alive through a failed step.

    transformers' loop treats any exception of a step (its private `_generation_loop_body`: schedule, forward,
    sample, update) as fatal: every request fails and the manager takes no more (`fatal_error`), for good. Here the
    manager's own copy of that method calls `isolation.before_step(batch_processor)` first and hands an exception of
    the step to `isolation.after_failure(batch_processor, error)`; the loop goes on."""
    body = manager._generation_loop_body

    def guarded(batch_processor, bootstrapping):
        isolation.before_step(batch_processor)
        try:
            return body(batch_processor, bootstrapping)
        except Exception as error:  # noqa: BLE001 - any failure of a step: isolation.after_failure reports it
            isolation.after_failure(batch_processor, error)
            return True

    manager._generation_loop_body = guarded


# A scheduler's queues between steps (transformers 5.25 Scheduler.reset sets them; schedule_batch reads them).
SCHEDULER_QUEUES = ("active_requests", "waiting_requests", "waiting_requests_order", "block_new_requests")


def schedule_alone(scheduler, schedule_batch, state, token_budget: int, cache_budget: int):
    """The scheduler's own `schedule_batch` as if `state` were its only request (no scheduler of transformers takes
    a subset): for the call, its SCHEDULER_QUEUES hold `state` alone; what scheduling did to `state` (waiting ->
    running) is carried back into the real ones, which keep every other request as it was."""
    rid, saved = state.request_id, {name: getattr(scheduler, name) for name in SCHEDULER_QUEUES}
    was_waiting = rid in saved["waiting_requests"]
    scheduler.active_requests = {rid: state} if rid in saved["active_requests"] else {}
    scheduler.waiting_requests = {rid: state} if was_waiting else {}
    scheduler.waiting_requests_order, scheduler.block_new_requests = deque([rid] if was_waiting else []), False
    try:
        return schedule_batch(token_budget, cache_budget)
    finally:
        now_active, still_waiting = rid in scheduler.active_requests, rid in scheduler.waiting_requests
        for name, queue in saved.items():
            setattr(scheduler, name, queue)
        if now_active:
            scheduler.active_requests[rid] = state
        if was_waiting and not still_waiting:
            del scheduler.waiting_requests[rid]
            if rid in scheduler.waiting_requests_order:
                scheduler.waiting_requests_order.remove(rid)

"""A probe for tests/test_serve_network.py, on the PYTHONPATH of the server subprocess it starts (and so of the
model's process that server spawns): with DEEPSEEK_FORWARD_LOG set, every forward of DeepseekForCausalLM appends a
line to that file, so the test sees whether the model is still generating; and a forward whose input ids hold the id
DEEPSEEK_POISON_TOKEN twice in a row (a prompt that has the pair: wherever the engine packs it among the step's other
requests) fails, as a bug inside the batching loop would, logging "failed N" with the N requests of that step."""

import os

if os.environ.get("DEEPSEEK_FORWARD_LOG"):
    import functools

    from modeling_deepseek.modeling import DeepseekForCausalLM

    _forward = DeepseekForCausalLM.forward
    _log = os.environ["DEEPSEEK_FORWARD_LOG"]
    _poison = int(os.environ.get("DEEPSEEK_POISON_TOKEN", -1))

    def _append(line: str) -> None:
        with open(_log, "a") as log:  # one short append per step: lines from two processes never interleave
            log.write(line + "\n")

    @functools.wraps(_forward)
    def _counted_forward(self, *args, **kwargs):
        ids = kwargs.get("input_ids", args[0] if args else None)
        if ids is not None and bool(((ids[..., :-1] == _poison) & (ids[..., 1:] == _poison)).any()):
            cu_seq_lens_q = kwargs.get("cu_seq_lens_q")  # continuous batching: one row, the requests side by side
            _append(f"failed {1 if cu_seq_lens_q is None else len(cu_seq_lens_q) - 1}")
            raise RuntimeError("the probe's poisoned token reached the model")
        out = _forward(self, *args, **kwargs)
        _append("1")
        return out

    DeepseekForCausalLM.forward = _counted_forward

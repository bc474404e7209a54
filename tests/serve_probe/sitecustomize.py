"""A probe for tests/test_serve_network.py, on the PYTHONPATH of the server subprocess it starts (and so of the
model's process that server spawns): with DEEPSEEK_FORWARD_LOG set, every forward of DeepseekForCausalLM appends a
line to that file, so the test sees whether the model is still generating; and a prefill whose first token is the id
DEEPSEEK_POISON_TOKEN fails, as a bug inside the batching loop would."""

import os

if os.environ.get("DEEPSEEK_FORWARD_LOG"):
    import functools

    from modeling_deepseek.modeling import DeepseekForCausalLM

    _forward = DeepseekForCausalLM.forward
    _log = os.environ["DEEPSEEK_FORWARD_LOG"]

    @functools.wraps(_forward)
    def _counted_forward(self, *args, **kwargs):
        ids = kwargs.get("input_ids", args[0] if args else None)
        # a prefill that starts with the token (a generated one never does: decode steps are one token per request)
        if ids is not None and ids.shape[-1] > 1 and ids[0, 0] == int(os.environ.get("DEEPSEEK_POISON_TOKEN", -1)):
            raise RuntimeError("the probe's poisoned token reached the model")
        out = _forward(self, *args, **kwargs)
        with open(_log, "a") as log:  # one short append per step: lines from two processes never interleave
            log.write("1\n")
        return out

    DeepseekForCausalLM.forward = _counted_forward

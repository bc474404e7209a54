"""A probe for tests/test_serve_network.py, on the PYTHONPATH of the server subprocess it starts (and so of the
model's process that server spawns): with DEEPSEEK_FORWARD_LOG set, every forward of DeepseekForCausalLM appends a
line to that file, so the test sees whether the model is still generating."""

import os

if os.environ.get("DEEPSEEK_FORWARD_LOG"):
    import functools

    from modeling_deepseek.modeling import DeepseekForCausalLM

    _forward = DeepseekForCausalLM.forward
    _log = os.environ["DEEPSEEK_FORWARD_LOG"]

    @functools.wraps(_forward)
    def _counted_forward(self, *args, **kwargs):
        out = _forward(self, *args, **kwargs)
        with open(_log, "a") as log:  # one short append per step: lines from two processes never interleave
            log.write("1\n")
        return out

    DeepseekForCausalLM.forward = _counted_forward

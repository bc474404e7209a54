"""`import modeling_deepseek` is cheap and quiet: it imports none of the training or quantization stack, prints
nothing, changes no other library's classes or defaults, and costs about what transformers' own DeepseekV3 import
costs. Each check runs in a fresh interpreter, since this test process has long imported everything."""

from __future__ import annotations

import compileall
import json
import os
import subprocess
import sys
import textwrap
import warnings
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
HEAVY = ("trl", "peft", "datasets", "bitsandbytes", "trainers", "quant", "fastapi", "uvicorn", "openai", "typer")


def _python(code: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PYTEST", "PYTHONWARNINGS"))}
    env["PYTHONPATH"] = str(REPO)
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=300)


MARK = "--- modeling_deepseek imported ---"

# One fresh interpreter: the CPU time of `import modeling_deepseek` after torch and transformers (which transformers' own model
# import pays too), check what it loaded and printed, then inspect transformers' Trainer for anything not its own.
PROBE = f"""
import json, sys, time
import torch, transformers
loaded_before = set(sys.modules)
t0 = time.process_time()
import modeling_deepseek
seconds = time.process_time() - t0
heavy = sorted(m for m in set(sys.modules) - loaded_before if m.split(".")[0] in {HEAVY!r})
print({MARK!r}); print({MARK!r}, file=sys.stderr)

import transformers.trainer as trainer_module
from transformers import Trainer

def owner(value):
    value = getattr(value, "__func__", None) or getattr(value, "fget", None) or value
    return getattr(value, "__module__", None) or "transformers"

foreign = sorted(k for k, v in vars(Trainer).items() if not owner(v).startswith("transformers"))
callbacks = [f"{{cb.__module__}}.{{cb.__qualname__}}" for cb in trainer_module.DEFAULT_CALLBACKS]
print(json.dumps(dict(seconds=seconds, heavy=heavy, foreign=foreign, callbacks=callbacks)))
"""


def _import_seconds(module: str) -> float:
    out = _python(f"import time, torch, transformers; t0 = time.process_time(); import {module}; "
                  "print(time.process_time() - t0)")
    assert out.returncode == 0, out.stderr
    return float(out.stdout.strip().splitlines()[-1])


def test_import_is_cheap_quiet_and_touches_nothing_outside():
    probe = _python(PROBE)
    assert probe.returncode == 0, probe.stderr
    stdout, _, after = probe.stdout.partition(MARK + "\n")
    stderr = probe.stderr.partition(MARK + "\n")[0]
    assert stdout == "" and stderr == "", f"import modeling_deepseek printed: {stdout!r} {stderr!r}"
    report = json.loads(after)
    assert report["heavy"] == [], f"import modeling_deepseek imported {report['heavy']}"
    assert report["foreign"] == [], f"transformers' Trainer carries attributes from elsewhere: {report['foreign']}"
    assert report["callbacks"] == ["transformers.trainer_callback.DefaultFlowCallback"], report["callbacks"]

    # Cost: no more than transformers' own DeepseekV3 model import plus 1 s of CPU time (fresh interpreters, each after
    # torch and transformers; CPU time, not wall time, since the 2 cores are shared). A miss is measured again (best
    # of three) before it counts. Both sides
    # import from bytecode, as an installed package does (with PYTHONDONTWRITEBYTECODE set, a checkout's edited
    # sources would otherwise be compiled on every import).
    compileall.compile_dir(str(REPO / "modeling_deepseek"), quiet=1)
    ours, theirs = [report["seconds"]], [_import_seconds("transformers.models.deepseek_v3.modeling_deepseek_v3")]
    while min(ours) > min(theirs) + 1.0 and len(ours) < 3:
        ours.append(_import_seconds("modeling_deepseek"))
        theirs.append(_import_seconds("transformers.models.deepseek_v3.modeling_deepseek_v3"))
    assert min(ours) <= min(theirs) + 1.0, (
        f"import modeling_deepseek takes {min(ours):.2f}s of CPU, transformers' deepseek_v3 {min(theirs):.2f}s")


@pytest.mark.parametrize("category", [DeprecationWarning, FutureWarning])
def test_deprecation_warnings_from_our_code_are_errors(category):
    """pyproject's filterwarnings: a DeprecationWarning / FutureWarning attributed to our modules raises; one from
    another library stays a warning."""
    for module in ("modeling_deepseek", "modeling_deepseek.modeling", "trainers.callbacks", "quant.fp8",
                   "benchmarks.run", "pretrain_example", "test_trainer", "conftest", "_dist_worker"):
        with pytest.raises(category):
            warnings.warn_explicit("old API", category, f"{module}.py", 1, module=module)
    for module in ("transformers.generation.utils", "torch.jit._script", "quanto", "modeling_deepseek_v3"):
        with pytest.warns(category):
            warnings.warn_explicit("old API", category, f"{module}.py", 1, module=module)

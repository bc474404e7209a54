"""`import modeling_deepseek` is cheap and quiet: it imports none of the training or quantization stack, prints
nothing, changes no other library's classes or defaults, and costs about what transformers' own DeepseekV3 import
costs. Each check runs in a fresh interpreter, since this test process has long imported everything."""

from __future__ import annotations

import compileall
import json
import os
import re
import subprocess
import sys
import textwrap
import warnings
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
HEAVY = ("trl", "peft", "datasets", "bitsandbytes", "trainers", "quant")
OURS = ("modeling_deepseek", "trainers", "quant")


def _python(code: str, extra_path: str | None = None, *args: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PYTEST", "PYTHONWARNINGS"))}
    env["PYTHONPATH"] = os.pathsep.join(p for p in (extra_path, str(REPO), env.get("PYTHONPATH")) if p)
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code), *args], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=300)


MARK = "--- imported ---"

# One fresh interpreter: the CPU time of `import modeling_deepseek` after torch and transformers (which transformers' own model
# import pays too), what it loaded and printed, then transformers' Trainer inspected for anything not its own.
PROBE = f"""
import json, sys, time
import torch, transformers
loaded_before = list(sys.modules)
print({MARK!r}, flush=True); print({MARK!r}, file=sys.stderr, flush=True)
t0 = time.process_time()
import modeling_deepseek
seconds = time.process_time() - t0
print({MARK!r}, flush=True); print({MARK!r}, file=sys.stderr, flush=True)
new = [m for m in sys.modules if m not in set(loaded_before)]
heavy = sorted(m for m in new if m.split(".")[0] in {HEAVY!r})

import transformers.trainer as trainer_module
from transformers import Trainer

def owner(value):
    value = getattr(value, "__func__", None) or getattr(value, "fget", None) or value
    return getattr(value, "__module__", None) or "transformers"

foreign = sorted(k for k, v in vars(Trainer).items() if not owner(v).startswith("transformers"))
callbacks = [f"{{cb.__module__}}.{{cb.__qualname__}}" for cb in trainer_module.DEFAULT_CALLBACKS]
print(json.dumps(dict(seconds=seconds, heavy=heavy, foreign=foreign, callbacks=callbacks, new=new)))
"""

# The same environment without our package: after torch and transformers, import every other module that importing
# ours loaded (transformers' model classes, integrations, ...), in the same order. What that prints is theirs.
REFERENCE = f"""
import importlib, json, sys
import torch, transformers
print({MARK!r}, flush=True); print({MARK!r}, file=sys.stderr, flush=True)
for name in json.loads(sys.argv[1]):
    if name not in sys.modules:
        try:
            importlib.import_module(name)
        except Exception:  # a module object registered under another name (aliases, lazy submodules)
            pass
print({MARK!r}, flush=True); print({MARK!r}, file=sys.stderr, flush=True)
"""


# torch's logging prefixes each line with its level, the time and the process id: "W1205 00:31:43.926000 12293 ..."
LOG_PREFIX = re.compile(r"^[DIWEF]\d{4} \d\d:\d\d:\d\d\.\d+ +\d+ ")


def _between_marks(text: str) -> list[str]:
    return [LOG_PREFIX.sub("", line) for line in text.split(MARK + "\n")[1].splitlines()]


def _added_output(package: str, extra_path: str | None = None) -> tuple[list[str], dict]:
    """The lines `import package` prints (stdout and stderr) beyond what the libraries it loads print on their own in
    the same environment, and the probe's report."""
    probe_code = PROBE.replace("modeling_deepseek", package)
    probe = _python(probe_code, extra_path)
    assert probe.returncode == 0, probe.stderr
    report = json.loads(probe.stdout.split(MARK + "\n")[2])
    theirs_loaded = [m for m in report["new"] if m.split(".")[0] not in (package.split(".")[0], *OURS)]
    reference = _python(REFERENCE, extra_path, json.dumps(theirs_loaded))
    assert reference.returncode == 0, reference.stderr
    theirs = set(_between_marks(reference.stdout) + _between_marks(reference.stderr))
    printed = _between_marks(probe.stdout) + _between_marks(probe.stderr)
    return [line for line in printed if line not in theirs], report


def test_import_is_cheap_quiet_and_touches_nothing_outside():
    added, report = _added_output("modeling_deepseek")
    assert added == [], f"import modeling_deepseek printed: {added}"
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


def test_import_check_tells_our_output_from_the_libraries(tmp_path):
    """The check above counts what a package prints itself, not what the libraries it imports print in this
    environment (torchao's or the kernels package's notices, say): a dependency's noise passes, the package's fails."""
    (tmp_path / "loud_dependency.py").write_text("print('a dependency speaking')\n")
    (tmp_path / "quiet_package.py").write_text("import loud_dependency\n")
    (tmp_path / "noisy_package.py").write_text("import sys, loud_dependency\nprint('ours speaking', file=sys.stderr)\n")
    assert _added_output("quiet_package", str(tmp_path))[0] == []
    assert _added_output("noisy_package", str(tmp_path))[0] == ["ours speaking"]


def _import_seconds(module: str) -> float:
    out = _python(f"import time, torch, transformers; t0 = time.process_time(); import {module}; "
                  "print(time.process_time() - t0)")
    assert out.returncode == 0, out.stderr
    return float(out.stdout.strip().splitlines()[-1])


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

"""Remote code: save_pretrained writes auto_map and copies our modeling files next to the weights, so a process that
cannot import `modeling_deepseek` loads the folder with `trust_remote_code=True`; push_to_hub commits exactly that.

How transformers copies code (dynamic_module_utils.custom_object_save): the file defining the class, plus every
file reached through relative imports, recursively, flattened by basename into the folder. Its scanner is two
regexes, `^\\s*import\\s+\\.(\\S+)` and `^\\s*from\\s+\\.(\\S+)\\s+import`: a relative import written
`from . import name` is NOT followed, and neither are sub-packages or absolute imports of our own package.
"""

from __future__ import annotations

import ast
import json
import os
import site
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from conftest import random_ids, tiny_model
import modeling_deepseek
from modeling_deepseek import DeepseekConfig, DeepseekForCausalLM, DeepseekModel

PKG = Path(modeling_deepseek.__file__).resolve().parent
ENTRY_FILES = ("configuration.py", "modeling.py")  # the files defining the causal LM's auto classes
HEAD_FILES = ("heads.py",)  # the entry point of the task heads' remote code


def imported_code_files(entry_files=ENTRY_FILES) -> set[str]:
    """Every file of the package the entry files reach through imports, by reading the code (ast, not regexes)."""
    seen, todo = set(), list(entry_files)
    while todo:
        name = todo.pop()
        if name in seen:
            continue
        seen.add(name)
        for node in ast.walk(ast.parse((PKG / name).read_text())):
            if isinstance(node, ast.ImportFrom) and node.level:
                if node.module:
                    todo.append(node.module.split(".")[0] + ".py")
                else:  # from . import a, b
                    todo.extend(alias.name + ".py" for alias in node.names if (PKG / f"{alias.name}.py").exists())
    return seen


def transformers_copied_files() -> set[str]:
    from transformers.dynamic_module_utils import get_relative_import_files

    files = set(ENTRY_FILES)
    for entry in ENTRY_FILES:
        files |= {Path(f).name for f in get_relative_import_files(str(PKG / entry))}
    return files


@pytest.fixture
def registered():
    """register_for_auto_class on our classes for one test, restoring the class attributes afterwards."""
    classes = (DeepseekConfig, DeepseekModel, DeepseekForCausalLM)
    saved = {cls: cls.__dict__.get("_auto_class", KeyError) for cls in classes}
    DeepseekConfig.register_for_auto_class()
    DeepseekForCausalLM.register_for_auto_class("AutoModelForCausalLM")
    yield
    for cls, value in saved.items():
        if value is KeyError:
            if "_auto_class" in cls.__dict__:
                delattr(cls, "_auto_class")
        else:
            cls._auto_class = value


@pytest.fixture(scope="module")
def model():
    return tiny_model(seed=11).eval()


# ------------------------------------------------------------------------------------------------------------------
def test_code_uses_only_flat_relative_imports():
    """Inside the copied files: relative imports of sibling modules only (level 1, no sub-packages), no absolute import
    of our package, no import of the package __init__ (which is not copied and not needed)."""
    files = imported_code_files(ENTRY_FILES + HEAD_FILES)
    assert "__init__.py" not in files and {"attention.py", "balancing.py", "experts.py", "heads.py"} <= files
    for name in files:
        for node in ast.walk(ast.parse((PKG / name).read_text())):
            if isinstance(node, ast.ImportFrom):
                where = f"{name}:{node.lineno}"
                if node.level:
                    assert node.level == 1, f"{where}: parent-package import"
                    if node.module:
                        assert "." not in node.module, f"{where}: sub-package import"
                        assert (PKG / f"{node.module}.py").exists(), where
                    else:
                        assert all((PKG / f"{a.name}.py").exists() for a in node.names), where
                else:
                    assert not (node.module or "").startswith(("modeling_deepseek", "trainers", "quant")), where
            elif isinstance(node, ast.Import):
                for alias in node.names:
                    assert not alias.name.startswith(("modeling_deepseek", "trainers", "quant")), name


def test_save_pretrained_writes_auto_map_and_code(registered, model, tmp_path):
    model.save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["auto_map"] == {
        "AutoConfig": "configuration.DeepseekConfig",
        "AutoModelForCausalLM": "modeling.DeepseekForCausalLM",
    }
    assert config["model_type"] == "deepseek"
    written = {p.name for p in tmp_path.glob("*.py")}
    assert set(ENTRY_FILES) <= written
    assert written == transformers_copied_files()
    assert "__init__.py" not in written and "export.py" not in written and "ledger.py" not in written
    for name in written:  # byte-identical copies, flattened
        assert (tmp_path / name).read_bytes() == (PKG / name).read_bytes()
    assert not [p for p in tmp_path.iterdir() if p.is_dir()]


def test_saved_code_is_complete(registered, model, tmp_path):
    model.save_pretrained(tmp_path)
    assert {p.name for p in tmp_path.glob("*.py")} == imported_code_files()


def test_save_pretrained_writes_remote_code_by_default(model, tmp_path):
    model.save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    assert config.get("auto_map", {}).get("AutoModelForCausalLM") == "modeling.DeepseekForCausalLM"
    assert config["auto_map"].get("AutoConfig") == "configuration.DeepseekConfig"
    assert set(ENTRY_FILES) <= {p.name for p in tmp_path.glob("*.py")}


# ------------------------------------------------------------------------------------------------------------------
CHILD = textwrap.dedent(
    """
    import importlib.util, sys
    # Started with -S: no site processing, so no .pth file ran and the editable install's finder of
    # modeling_deepseek is absent. Only plain site-packages directories are added back.
    sys.path[:] = [p for p in sys.path if p not in ("", ".")] + SITE_PACKAGES
    assert not any("editable" in type(f).__name__.lower() or "editable" in repr(f).lower() for f in sys.meta_path)
    try:
        import modeling_deepseek
    except ImportError:
        print("NO_LOCAL_PACKAGE")
    else:
        raise SystemExit("modeling_deepseek is importable from " + modeling_deepseek.__file__)
    if FOLDER is None:
        raise SystemExit(0)
    import torch
    torch.set_num_threads(THREADS)  # the parent's setting: same reduction order, bit-identical logits
    import transformers
    model = getattr(transformers, AUTO).from_pretrained(FOLDER, trust_remote_code=True).eval()
    assert "modeling_deepseek" not in sys.modules
    print("CLASS", type(model).__module__, type(model).__name__)
    with torch.no_grad():
        logits = model(torch.load(IDS)).logits
    torch.save(logits, OUT)
    """
)


def run_child(folder: Path | None, work: Path, ids: torch.Tensor,
              auto: str = "AutoModelForCausalLM") -> subprocess.CompletedProcess:
    torch.save(ids, work / "ids.pt")
    header = (
        f"SITE_PACKAGES = {[p for p in site.getsitepackages() if os.path.isdir(p)]!r}\n"
        f"AUTO = {auto!r}\n"
        f"FOLDER, IDS, OUT = {folder and str(folder)!r}, {str(work / 'ids.pt')!r}, {str(work / 'logits.pt')!r}\n"
        f"THREADS = {torch.get_num_threads()}\n"
    )
    script = work / "child.py"
    script.write_text(header + CHILD)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PYTHON", "HF_", "TRANSFORMERS_"))}
    env.update(HF_HOME=str(work / "hf"), HF_MODULES_CACHE=str(work / "modules"), HF_HUB_OFFLINE="1")
    return subprocess.run(
        [sys.executable, "-S", str(script)], cwd=work, env=env, capture_output=True, text=True, timeout=180
    )


def test_fresh_process_cannot_import_package(tmp_path):
    """The isolation the remote-code test relies on: the child really cannot import modeling_deepseek."""
    (tmp_path / "child").mkdir()
    proc = run_child(None, tmp_path / "child", torch.zeros(1, 1, dtype=torch.long))
    assert proc.returncode == 0 and "NO_LOCAL_PACKAGE" in proc.stdout, proc.stdout + proc.stderr[-2000:]
    # ... while the same interpreter with its normal start-up (site, .pth files: the editable install) can.
    normal = subprocess.run([sys.executable, "-c", "import modeling_deepseek"], cwd=tmp_path, capture_output=True)
    assert normal.returncode == 0


def test_fresh_process_loads_remote_code_with_identical_logits(registered, model, tmp_path):
    folder, work = tmp_path / "saved", tmp_path / "child"
    work.mkdir()
    model.save_pretrained(folder)
    ids = random_ids(2, 12)
    proc = run_child(folder, work, ids)
    assert proc.returncode == 0, proc.stdout + proc.stderr[-4000:]
    assert "NO_LOCAL_PACKAGE" in proc.stdout
    assert "CLASS transformers_modules." in proc.stdout and "DeepseekForCausalLM" in proc.stdout, proc.stdout
    with torch.no_grad():
        expected = model(ids).logits
    assert torch.equal(torch.load(work / "logits.pt"), expected)


def test_fresh_process_loads_a_classification_head_as_remote_code(tmp_path):
    """The task heads build their backbone without AutoModel, so they load as remote code too."""
    from conftest import tiny_config
    from modeling_deepseek import DeepseekForSequenceClassification

    folder, work = tmp_path / "saved", tmp_path / "child"
    work.mkdir()
    torch.manual_seed(0)
    head = DeepseekForSequenceClassification(tiny_config(pad_token_id=0, num_labels=2)).eval()
    head.save_pretrained(folder)
    assert json.loads((folder / "config.json").read_text())["auto_map"]["AutoModelForSequenceClassification"] == (
        "heads.DeepseekForSequenceClassification")
    assert {p.name for p in folder.glob("*.py")} >= {"heads.py", "modeling.py", "configuration.py"}
    ids = random_ids(2, 12)
    proc = run_child(folder, work, ids, auto="AutoModelForSequenceClassification")
    assert proc.returncode == 0, proc.stdout + proc.stderr[-4000:]
    assert "CLASS transformers_modules." in proc.stdout and "DeepseekForSequenceClassification" in proc.stdout
    with torch.no_grad():
        expected = head(ids).logits
    assert torch.equal(torch.load(work / "logits.pt"), expected)


# ------------------------------------------------------------------------------------------------------------------
def test_push_to_hub_uploads_exactly_the_saved_files(registered, model, tmp_path, hub_commits):
    model.push_to_hub("tiny-deepseek")
    assert len(hub_commits) == 1
    repo_id, uploaded, _ = hub_commits[0]
    assert repo_id == "someone/tiny-deepseek"

    model.save_pretrained(tmp_path / "local")
    saved = {p.name: p.read_bytes() for p in (tmp_path / "local").iterdir()}
    expected = set(saved) | {"README.md"}  # push_to_hub adds the model card, nothing else
    assert set(uploaded) == expected
    assert {"config.json", "model.safetensors", "generation_config.json", "modeling.py", "configuration.py"} <= set(uploaded)
    assert {name for name in uploaded if name.endswith(".py")} == transformers_copied_files()
    assert all("/" not in name for name in uploaded)
    for name in saved:
        if name.endswith(".py") or name.endswith(".json"):
            assert uploaded[name] == saved[name], name
    assert json.loads(uploaded["config.json"])["auto_map"]["AutoModelForCausalLM"] == "modeling.DeepseekForCausalLM"

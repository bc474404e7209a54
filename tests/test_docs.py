"""Every ```python block of README.md and docs/**/*.md runs here, so the documentation cannot drift from the code.

A page's blocks run in order in one namespace, because a page builds its example up block by block (a later block
uses the `model` an earlier one made). Each page runs in its own temporary directory holding a link to hub_configs/,
so examples load `hub_configs/tiny` and write `runs/...` as a user would, without writing into the checkout.

A block that cannot run inside one pytest process says so in the markdown, on the line right before its fence:

    <!-- docs-test: skip needs-torchrun -->

It is then skipped with that reason, or run when the reason does not hold here (a GPU block on a CUDA machine).
A marker with a reason not in REASONS, or not followed by a python block, fails the suite: a typo must not skip a
block silently. ```bash blocks are shown, not run.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import torch
import transformers
from packaging.version import Version

REPO = Path(__file__).resolve().parents[1]
PAGES = [REPO / "README.md", *sorted((REPO / "docs").rglob("*.md"))]

MARKER = re.compile(r"<!--\s*docs-test:\s*skip\s+(\S+)\s*-->")
FENCE_OPEN = re.compile(r"^```(\w*)\s*$")


def _transformers_older_than(version: str) -> bool:
    return Version(transformers.__version__) < Version(version)


# reason -> (does it hold here, i.e. must the block be skipped?, what the block needs)
REASONS = {
    "needs-torchrun": (lambda: True, "several processes started by torchrun"),
    "needs-server": (lambda: True, "a running `python -m modeling_deepseek.serve` server"),
    "needs-checkpoint": (lambda: True, "an official DeepSeek checkpoint (hundreds of GB)"),
    "needs-gpu": (lambda: not torch.cuda.is_available(), "a CUDA device"),
    "needs-transformers-5.25": (lambda: _transformers_older_than("5.25"),
                                "transformers >= 5.25 (continuous batching)"),
}


@dataclass
class Block:
    page: Path
    line: int  # 1-based line of the opening fence
    source: str
    skip_reason: str | None

    @property
    def name(self) -> str:
        return f"{self.page.relative_to(REPO)}:{self.line}"


def parse(page: Path) -> tuple[list[Block], list[str]]:
    """The page's python blocks in order, and the problems with its markers (unknown reason, dangling marker)."""
    lines = page.read_text().splitlines()
    blocks, problems = [], []
    pending: tuple[int, str] | None = None  # a marker waiting for its block: (line, reason)
    i = 0
    while i < len(lines):
        text = lines[i]
        marker = MARKER.search(text)
        fence = FENCE_OPEN.match(text)
        if marker:
            if pending:
                problems.append(f"{page.name}:{pending[0]}: marker not followed by a python block")
            reason = marker.group(1)
            if reason not in REASONS:
                problems.append(f"{page.name}:{i + 1}: unknown docs-test reason {reason!r} (known: {sorted(REASONS)})")
            pending = (i + 1, reason)
        elif fence:
            end = next((j for j in range(i + 1, len(lines)) if lines[j].startswith("```")), None)
            if end is None:
                problems.append(f"{page.name}:{i + 1}: unclosed code fence")
                break
            if fence.group(1) == "python":
                # pad with blank lines so a traceback's line numbers are the markdown's
                source = "\n" * (i + 1) + "\n".join(lines[i + 1:end]) + "\n"
                blocks.append(Block(page, i + 1, source, pending[1] if pending else None))
            elif pending:
                problems.append(f"{page.name}:{pending[0]}: marker not followed by a python block")
            pending = None
            i = end
        elif pending and text.strip():
            problems.append(f"{page.name}:{pending[0]}: marker not followed by a python block")
            pending = None
        i += 1
    if pending:
        problems.append(f"{page.name}:{pending[0]}: marker not followed by a python block")
    return blocks, problems


BLOCKS = [block for page in PAGES for block in parse(page)[0]]


@dataclass
class PageRun:
    """One page's shared namespace, its working directory, and how many of its blocks have run."""
    workdir: Path
    namespace: dict = field(default_factory=lambda: {"__name__": "test_docs_example"})
    done: int = 0
    failed: str | None = None


_RUNS: dict[Path, PageRun] = {}


def _page_run(page: Path, tmp_path_factory) -> PageRun:
    if page not in _RUNS:
        workdir = tmp_path_factory.mktemp(page.stem)
        (workdir / "hub_configs").symlink_to(REPO / "hub_configs")
        _RUNS[page] = PageRun(workdir)
    return _RUNS[page]


def _skips(block: Block) -> bool:
    return block.skip_reason is not None and REASONS[block.skip_reason][0]()


def test_pages_found():
    names = {p.relative_to(REPO).as_posix() for p in PAGES}
    assert {"README.md", "docs/index.md"} <= names, names
    assert BLOCKS, "no python block found in README.md or docs/"


def test_readme_links_resolve():
    """mkdocs --strict checks the links inside docs/; README.md is outside the site, so its links are checked here."""
    targets = re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", (REPO / "README.md").read_text())
    local = [t for t in targets if "://" not in t]
    assert local, "no relative link found in README.md"
    assert [t for t in local if not (REPO / t).exists()] == []


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(REPO)))
def test_markers(page):
    assert parse(page)[1] == []


def test_marker_parsing_catches_mistakes(tmp_path):
    page = tmp_path / "page.md"
    page.write_text("<!-- docs-test: skip needs-tpu -->\n```python\npass\n```\n"
                    "<!-- docs-test: skip needs-gpu -->\n\nSome prose.\n```python\npass\n```\n"
                    "<!-- docs-test: skip needs-server -->\n```bash\nls\n```\n")
    blocks, problems = parse(page)
    assert [b.skip_reason for b in blocks] == ["needs-tpu", None]
    assert len(problems) == 3, problems
    assert "unknown docs-test reason 'needs-tpu'" in problems[0]
    assert all("not followed by a python block" in p for p in problems[1:])


@pytest.mark.parametrize("block", BLOCKS, ids=lambda b: b.name)
def test_example(block, tmp_path_factory, monkeypatch):
    run = _page_run(block.page, tmp_path_factory)
    monkeypatch.chdir(run.workdir)
    page_blocks = [b for b in BLOCKS if b.page == block.page]
    index = page_blocks.index(block)
    # earlier blocks of the page first, when this one is run alone (pytest -k)
    for earlier in page_blocks[run.done:index]:
        _run(earlier, run)
    if _skips(block):
        run.done = index + 1
        pytest.skip(f"{block.skip_reason}: needs {REASONS[block.skip_reason][1]}")
    _run(block, run)


def _run(block: Block, run: PageRun) -> None:
    if run.failed:
        pytest.fail(f"an earlier block of this page failed: {run.failed}")
    run.done = max(run.done, [b for b in BLOCKS if b.page == block.page].index(block) + 1)
    if _skips(block):
        return
    try:
        exec(compile(block.source, str(block.page), "exec"), run.namespace)
    except BaseException:
        run.failed = block.name
        raise

"""The code sandbox (trainers/sandbox.py): right answers score, and every hostile-by-accident program scores 0
without touching the host or the trainer."""

from __future__ import annotations

import os
import subprocess
import time

import pytest

from trainers.sandbox import SandboxLimits, run_tests, run_tests_many

TESTS = ["assert add(1, 2) == 3", "assert add(2, 2) == 4", "assert add(-1, 1) == 0", "assert add(0, 0) == 1"]
ADD = "def add(a, b):\n    return a + b\n"
FAST = SandboxLimits(timeout_s=2.0, memory_bytes=512 << 20)


def _sandbox_uids_alive() -> list[str]:
    out = subprocess.run(["ps", "-eo", "uid=,pid=,args="], capture_output=True, text=True).stdout
    return [line for line in out.splitlines() if line.split() and int(line.split()[0]) >= 61000]


def test_fraction_of_tests_passed():
    result = run_tests(ADD, TESTS, FAST)
    assert (result.passed, result.total) == (3, 4) and result.score == 0.75
    assert "test 3" in result.error
    assert run_tests("def add(a, b):\n    return a * b\n", TESTS, FAST).score == 0.25


@pytest.mark.parametrize("name, code, why", [
    ("crash", "import os\nos.abort()\n" + ADD, "crashed"),
    ("raise", "raise SystemExit(0)\n" + ADD, "SystemExit"),
    ("endless loop", "while True:\n    pass\n", "timed out"),
    ("sleeper", "import time\ntime.sleep(60)\n", "timed out"),
    ("memory hog", "block = bytearray(3 << 30)\n" + ADD, "MemoryError"),
    ("fork bomb", "import os\nwhile True:\n    os.fork()\n", ""),
    ("network", "import socket\nsocket.create_connection(('1.1.1.1', 53), timeout=1)\n" + ADD, "unreachable"),
])
def test_hostile_programs_score_zero(name, code, why):
    start = time.monotonic()
    result = run_tests(code, TESTS, FAST)
    assert result.score == 0.0, (name, result)
    assert not result.sandbox_failed, result.error
    assert why in (result.error or ""), (name, result.error)
    assert time.monotonic() - start < FAST.timeout_s + 3
    assert not _sandbox_uids_alive(), "a sandboxed process outlived its run"


def test_writes_never_reach_the_host(tmp_path):
    open_dir = tmp_path / "world_writable"
    open_dir.mkdir()
    open_dir.chmod(0o777)
    target = open_dir / "escaped.txt"
    code = (f"open({str(target)!r}, 'w').write('x')\n" + ADD)
    assert run_tests(code, TESTS, FAST).score == 0.0
    # /tmp is writable inside (a private tmpfs), yet nothing lands in the host's /tmp
    marker = f"/tmp/sandbox_marker_{os.getpid()}"
    result = run_tests(f"open({marker!r}, 'w').write('x')\nopen('local.txt', 'w').write('ok')\n" + ADD, TESTS, FAST)
    assert result.passed == 3, result
    assert not target.exists() and not os.path.exists(marker)


def test_runs_as_an_unprivileged_uid():
    code = "import os\nUID = os.getuid()\n"
    assert run_tests(code, ["assert UID >= 61000", "assert os.getgroups() == []"], FAST).score == 1.0


def test_escaping_the_process_group_is_still_killed():
    code = "import os, time\nif os.fork() == 0:\n    os.setsid()\n    time.sleep(60)\nelse:\n    time.sleep(60)\n"
    result = run_tests(code, TESTS, FAST)
    assert result.timed_out and result.score == 0.0
    time.sleep(0.2)
    assert not _sandbox_uids_alive()


def test_parallel_and_limits_validated():
    start = time.monotonic()
    results = run_tests_many([ADD, "while True: pass\n", ADD], [TESTS, TESTS, TESTS[:3]], FAST)
    assert [r.score for r in results] == [0.75, 0.0, 1.0]
    assert time.monotonic() - start < 2 * FAST.timeout_s + 3
    with pytest.raises(ValueError, match="memory_bytes"):
        SandboxLimits(memory_bytes=3 << 30)

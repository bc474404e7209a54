"""The code sandbox (trainers/sandbox.py): right answers score, and every hostile-by-accident program scores 0
without touching the host or the trainer; for root (the uid drop) and for an ordinary user (a user namespace, or
bubblewrap), the latter tested by dropping to uid 65534."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from trainers.rewards import make_code_reward
from trainers.sandbox import SandboxLimits, SandboxUnavailableError, run_tests, run_tests_many

REPO = Path(__file__).resolve().parent.parent
IS_ROOT = os.geteuid() == 0

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
    # gaming the harness: leave before the tests run, or from inside the tested function
    ("sys.exit", "import sys\nsys.exit(0)\n" + ADD, "SystemExit"),
    ("os._exit", "import os\nos._exit(0)\n" + ADD, "crashed"),
    ("exit inside", "import sys\ndef add(a, b):\n    sys.exit(0)\n", "SystemExit"),
    ("SystemExit inside", "def add(a, b):\n    raise SystemExit\n", "SystemExit"),
    ("os._exit inside", "import os\ndef add(a, b):\n    os._exit(0)\n", "crashed"),
    ("kill the parent", "import os, signal\nos.kill(os.getppid(), signal.SIGKILL)\n", "NameError"),
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
    code = "import os\nUID = os.getuid()\nPIDS = [p for p in os.listdir('/proc') if p.isdigit()]\n"
    result = run_tests(code, ["assert UID >= 61000", "assert os.getgroups() == []", "assert PIDS == ['1'], PIDS"],
                       FAST)
    assert result.score == 1.0, result.error
    assert result.backend == ("root" if IS_ROOT else "userns") or result.backend == "bwrap"


def test_killing_the_parent_changes_nothing():
    # from pid 1 of the namespace getppid() is 0: kill(0) would reach the launcher's process group, were the runner
    # not in a session of its own; the program runs on and scores what its tests say
    code = ("import os, signal\nos.kill(os.getppid(), signal.SIGKILL)\n"
            "try:\n    os.kill(-1, signal.SIGKILL)  # every process it may signal: none but its own\n"
            "except ProcessLookupError:\n    pass\n" + ADD)
    result = run_tests(code, TESTS, FAST)
    assert not result.sandbox_failed, result.error
    assert result.score == 0.75, result


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


@pytest.mark.skipif(not IS_ROOT, reason="as root the other backends are refused; checked here as root")
def test_a_backend_that_cannot_be_had_raises_when_the_reward_is_built():
    # root is exempt from RLIMIT_NPROC even in a user namespace, so "userns" is refused to root: an unusable
    # sandbox is an error when the reward is built, not a zero score
    with pytest.raises(SandboxUnavailableError, match="ordinary users"):
        make_code_reward(backend="userns")


# ---------------------------------------------------------------------------------------------------------------------
# As an ordinary user (uid 65534)

NOBODY = 65534
# One batch through the code reward as uid 65534: correct and partial programs, the exits, killing the parent and
# the trainer, the hostile programs, and what the code can see and do (capabilities, processes, user namespaces).
AS_USER = r"""
import json, os, subprocess, sys, time
from trainers.rewards import make_code_reward
from trainers.sandbox import SandboxLimits, SandboxUnavailableError

tests = ["assert add(1, 2) == 3", "assert add(2, 2) == 4"]
ADD = "def add(a, b):\n    return a + b\n"
me = os.getpid()
programs = {
    "correct": ADD,
    "half": "def add(a, b):\n    return 4\n",
    "sys.exit": "import sys\nsys.exit(0)\n" + ADD,
    "SystemExit": "raise SystemExit\n" + ADD,
    "os._exit": "import os\nos._exit(0)\n" + ADD,
    "exit inside": "import sys\ndef add(a, b):\n    sys.exit(0)\n",
    "os._exit inside": "import os\ndef add(a, b):\n    os._exit(0)\n",
    "kill the parent": "import os, signal\nos.kill(os.getppid(), signal.SIGKILL)\n",
    "kill the parent, then add": "import os, signal\nos.kill(os.getppid(), signal.SIGKILL)\n" + ADD,
    # the trainer (this process, same uid) is not in the code's pid namespace: no such process; it lives on
    "kill the trainer": f"import os, signal\ntry:\n    os.kill({me}, signal.SIGKILL)\nexcept OSError:\n    pass\n"
                        + ADD,
    "kill everything": "import os, signal\ntry:\n    os.kill(-1, signal.SIGKILL)\nexcept OSError:\n    pass\n"
                       + ADD,
    "endless loop": "while True:\n    pass\n",
    "memory hog": "block = bytearray(3 << 30)\n" + ADD,
    "fork bomb": "import os\nwhile True:\n    os.fork()\n",
    "network": "import socket\nsocket.create_connection(('1.1.1.1', 53), timeout=1)\n" + ADD,
    # a directory this uid may write to on the host: read-only inside; /tmp inside is the run's own tmpfs
    "write to the host": f"open({os.environ['OPEN_DIR'] + '/escaped'!r}, 'w').write('x')\n" + ADD,
    "write locally": f"open('local.txt', 'w').write('ok')\nopen('/tmp/escaped_{me}', 'w').write('ok')\n" + ADD,
    "what it sees": "import os, ctypes\n"
                    "caps = [l for l in open('/proc/self/status') if l.startswith(('CapEff', 'CapPrm', 'CapBnd'))]\n"
                    "assert all(int(l.split()[1], 16) == 0 for l in caps), caps\n"
                    "assert len([p for p in os.listdir('/proc') if p.isdigit()]) <= 2\n"
                    "assert os.getuid() >= 61000\n"
                    "assert ctypes.CDLL(None).unshare(0x10000000) != 0  # no nested user namespace\n"
                    "try:\n    os.setuid(0)\nexcept OSError:\n    pass\nelse:\n    raise RuntimeError('became root')\n"
                    + ADD,
}
limits = SandboxLimits(timeout_s=3.0, memory_bytes=512 << 20)
out = {"uid": os.getuid(), "backends": {}}
for backend in ["auto"] + (["bwrap"] if os.environ.get("TRY_BWRAP") else []):
    try:
        reward = make_code_reward(limits, backend=backend)
    except SandboxUnavailableError as e:
        out["backends"][backend] = {"unavailable": str(e)}
        continue
    logged = {}
    scores = reward(list(programs.values()), [tests] * len(programs), log_extra=lambda k, v: logged.update({k: v}))
    time.sleep(0.3)
    # exited processes not yet reaped by the machine's init (bwrap's) are no longer running: stat Z is left out
    ps = subprocess.run(["ps", "-u", str(os.getuid()), "-o", "pid=,stat=,args="], capture_output=True, text=True).stdout
    out["backends"][backend] = {
        "backend": reward.sandbox_backend, "scores": dict(zip(programs, scores)),
        "errors": dict(zip(programs, logged["sandbox_error"])), "escaped": [p for p in (f"/tmp/escaped_{me}", os.environ["OPEN_DIR"] + "/escaped") if os.path.exists(p)],
        "left": [line for line in ps.splitlines()
                 if int(line.split()[0]) != me and not line.split()[1].startswith("Z")
                 and ("sandbox.py" in line or "bwrap" in line)]}
try:
    make_code_reward(backend="root")
except SandboxUnavailableError as e:
    out["root_backend"] = str(e)
print(json.dumps(out))
"""


def _as_nobody(script: str, env: dict, user_namespaces: bool = True) -> subprocess.CompletedProcess:
    """Runs `script` with this interpreter as uid/gid 65534 (no groups). As root (CI), first in a private mount
    namespace in which the interpreter, its venv and the repo are reachable for that uid although a directory above
    them may be closed (pyenv under /root, mode 700): trainers.sandbox.expose_paths, as the root sandbox does for its
    sandbox uid. As an ordinary user, directly. `user_namespaces=False` (root only): inside a user namespace that
    maps every uid to itself and allows no user namespace below it (user.max_user_namespaces = 0 there), i.e. a
    kernel that refuses them to ordinary users."""
    env = {"PYTHONPATH": str(REPO), "PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": "/tmp", **env}
    if not IS_ROOT:
        return subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=300)
    boot = (
        "import ctypes, os, sys\n"
        "from trainers.sandbox import expose_paths\n"
        "libc = ctypes.CDLL(None, use_errno=True)\n"
        "if libc.unshare(0x00020000) or libc.mount(None, b'/', None, 16384 | (1 << 18), None):\n"
        "    sys.exit('no private mount namespace: ' + os.strerror(ctypes.get_errno()))\n"
        f"expose_paths([sys.base_prefix, sys.prefix, {str(REPO)!r}])\n"
    )
    if not user_namespaces:
        # the identity map of every uid must be written from outside the new namespace: by the parent of a fork
        boot += (
            "ready_r, ready_w = os.pipe()\n"
            "mapped_r, mapped_w = os.pipe()\n"
            "child = os.fork()\n"
            "if child:\n"
            "    os.read(ready_r, 1)\n"
            "    for name in ('uid_map', 'gid_map'):\n"
            "        with open(f'/proc/{child}/{name}', 'w') as f:\n"
            "            f.write('0 0 4294967295')\n"
            "    os.write(mapped_w, b'1')\n"
            "    sys.exit(os.waitstatus_to_exitcode(os.waitpid(child, 0)[1]))\n"
            "if libc.unshare(0x10000000):\n"
            "    sys.exit('no user namespace: ' + os.strerror(ctypes.get_errno()))\n"
            "os.write(ready_w, b'1')\n"
            "os.read(mapped_r, 1)\n"
            "with open('/proc/sys/user/max_user_namespaces', 'w') as f:\n"
            "    f.write('0')\n"
        )
    boot += (
        f"os.setgroups([]); os.setgid({NOBODY}); os.setuid({NOBODY})\n"
        "os.execve(sys.executable, [sys.executable, '-c', sys.argv[1]], os.environ)\n"
    )
    return subprocess.run([sys.executable, "-c", boot, script], env=env, cwd=REPO, capture_output=True, text=True,
                          timeout=300)


def _userns_allowed() -> bool:
    """What the kernel says about unprivileged user namespaces (read here, independently of the sandbox's probe)."""
    def read(path, default):
        try:
            return int(Path(path).read_text())
        except (OSError, ValueError):
            return default
    return (read("/proc/sys/user/max_user_namespaces", 0) > 0
            and read("/proc/sys/kernel/unprivileged_userns_clone", 1) == 1
            and read("/proc/sys/kernel/apparmor_restrict_unprivileged_userns", 0) == 0)


def _host_dir_for_an_open_folder() -> Path:
    """A folder in which to make one that anyone may write: outside /tmp, /var/tmp, /run/lock and /dev/shm (inside the
    sandbox those are the run's own tmpfs, which would hide it) and reachable by the unprivileged user. The checkout,
    unless it was cloned under one of those."""
    from trainers.sandbox import WRITABLE_DIRS

    def usable(d: Path) -> bool:
        hidden = any(d == Path(w) or Path(w) in d.parents for w in WRITABLE_DIRS)
        reachable = all(p.stat().st_mode & 0o001 for p in (d, *d.parents))
        return d.is_dir() and not hidden and reachable and os.access(d, os.W_OK)

    found = next((d for d in (REPO, Path("/var/lib"), Path("/opt"), Path("/srv")) if usable(d)), None)
    if found is None:
        pytest.skip("no folder outside the sandbox's tmpfs directories that the unprivileged user can reach")
    return found


def test_code_reward_as_an_ordinary_user():
    # writable by anyone and outside /tmp, /var/tmp, /run/lock, /dev/shm (which are the run's own tmpfs inside)
    open_dir = _host_dir_for_an_open_folder() / f".sandbox_open_dir_{os.getpid()}"
    open_dir.mkdir()
    try:
        open_dir.chmod(0o777)
        proc = _as_nobody(AS_USER, {"TRY_BWRAP": "1" if shutil.which("bwrap") else "", "OPEN_DIR": str(open_dir)})
    finally:
        shutil.rmtree(open_dir)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out["uid"] == (NOBODY if IS_ROOT else os.getuid())
    assert "needs root" in out["root_backend"]
    auto = out["backends"]["auto"]
    if not _userns_allowed() and not shutil.which("bwrap"):
        # nothing can isolate the code here: the reward refuses to be built, saying why and how to enable it
        assert "bubblewrap" in auto["unavailable"] and "user namespaces" in auto["unavailable"]
        return
    expected = {"correct": 1.0, "half": 0.5, "kill the parent, then add": 1.0, "kill the trainer": 1.0,
                "kill everything": 1.0, "write locally": 1.0, "what it sees": 1.0}
    tried = ["auto"] + (["bwrap"] if shutil.which("bwrap") else [])
    assert sorted(out["backends"]) == sorted(tried)
    for name in tried:
        run = out["backends"][name]
        assert "unavailable" not in run, run
        assert run["backend"] == ("userns" if name == "auto" and _userns_allowed() else "bwrap")
        for program, score in run["scores"].items():
            assert score == expected.get(program, 0.0), (name, program, score, run["errors"][program])
        assert "timed out" in run["errors"]["endless loop"]
        assert "Read-only file system" in run["errors"]["write to the host"] and run["escaped"] == []
        assert "unreachable" in run["errors"]["network"]
        assert run["left"] == [], "a sandboxed process outlived its run"


REFUSED = r"""
import json
from trainers.rewards import code_reward, make_code_reward
from trainers.sandbox import SandboxUnavailableError
out = {}
try:
    make_code_reward()
except SandboxUnavailableError as e:
    out["built"] = str(e)
try:
    out["scores"] = code_reward(["def f():\n    return 1\n"], [["assert f() == 1"]])
except SandboxUnavailableError as e:
    out["called"] = str(e)
print(json.dumps(out))
"""


@pytest.mark.skipif(not IS_ROOT, reason="switching user namespaces off for one process tree needs root")
def test_code_reward_refuses_where_user_namespaces_are_off():
    proc = _as_nobody(REFUSED, {}, user_namespaces=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    # no score at all (not zeros): an error when the reward is built, and at a call of the plain function
    assert "scores" not in out, out
    for message in (out["built"], out["called"]):
        assert "cannot run on this machine" in message and "user namespace" in message, message
        assert "bubblewrap" in message, message  # what would enable it

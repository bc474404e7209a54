"""A sandbox for running model-written Python against tests (the code reward of GRPO).

The code comes from a policy being optimised to make tests pass, so it is treated as hostile by accident: endless
loops, memory hogs, fork bombs, deletes, network calls. Each run gets its own process tree, isolated with Linux
primitives only (no container runtime):

    trainer --(stdin: code, tests, limits)--> launcher (root, own session)
        unshare(mount | net | pid namespaces)
        mount: "/" and every other mount remounted read-only, fresh tmpfs on /tmp, /var/tmp, /run/lock
        fork --> runner = pid 1 of the new pid namespace
                 rlimits: address space, processes, file size, open files, CPU, no core dumps
                 setgroups([]) / setgid / setuid to a sandbox uid (no passwd entry, owns nothing on the host)
                 runs the code and each test (assert statement), writes {passed, total, error} to a pipe
        waits with a deadline; on expiry SIGKILLs the runner: the kernel then kills every process of its pid
        namespace, even ones that left the process group
    trainer: reads the result; as a backstop kills the launcher's whole process group

Why each piece:
- a network namespace has only a loopback that is down: every connection fails;
- read-only mounts + tmpfs: the code may write in its working directory (on the tmpfs), and nothing it writes
  anywhere reaches the host; the tmpfs vanishes with the namespace;
- the uid drop: sessions and CI run as root, and root ignores RLIMIT_NPROC (CAP_SYS_RESOURCE); the runner switches
  to an unprivileged uid, distinct for each concurrent run so that a fork bomb's process count binds to its run
  alone, and that runs cannot signal each other;
- the pid namespace: killing its pid 1 kills everything in it, which a process-group kill alone does not
  guarantee (a child can call setsid).

It fails closed: if a namespace, a mount or the uid drop cannot be had (not root, a restricted container), the run
scores 0 with the reason in `SandboxResult.error`, and the code is never run unprotected.

What it is not: a defence against code written to attack this sandbox (the runner and the code share a process, so
such code could forge its result). It keeps an RL run and its host safe from what a policy writes by accident.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

GIB = 1 << 30
MAX_MEMORY_BYTES = 2 * GIB


@dataclass(frozen=True)
class SandboxLimits:
    timeout_s: float = 5.0  # wall clock per completion: interpreter start, the code and all its tests
    memory_bytes: int = 1 * GIB  # RLIMIT_AS; at most MAX_MEMORY_BYTES
    max_processes: int = 16  # RLIMIT_NPROC of the sandbox uid (threads count too)
    max_file_bytes: int = 16 << 20  # RLIMIT_FSIZE: the largest file it may write
    tmpfs_bytes: int = 64 << 20  # all it may write in total
    max_open_files: int = 64

    def __post_init__(self):
        if not 0 < self.memory_bytes <= MAX_MEMORY_BYTES:
            raise ValueError(f"memory_bytes must be in (0, 2 GiB], got {self.memory_bytes}")
        for name in ("timeout_s", "max_processes", "max_file_bytes", "tmpfs_bytes", "max_open_files"):
            if getattr(self, name) <= 0:
                raise ValueError(f"SandboxLimits.{name} must be positive, got {getattr(self, name)}")


@dataclass
class SandboxResult:
    passed: int = 0
    total: int = 0
    error: str | None = None  # why the code failed (first failing test, crash, timeout) or why no sandbox
    timed_out: bool = False
    sandbox_failed: bool = False  # the protections could not be set up; the code did not run

    @property
    def score(self) -> float:
        """Fraction of tests passed; 0 after a timeout, a crash or a sandbox failure."""
        if self.timed_out or self.sandbox_failed or not self.total:
            return 0.0
        return self.passed / self.total


# ---------------------------------------------------------------------------------------------------------------------
# Trainer side

UID_BASE = 61000
_slot_lock = threading.Lock()
_free_slots = list(range(64))


def _take_uid() -> tuple[int, int]:
    with _slot_lock:
        if not _free_slots:
            raise RuntimeError("more than 64 concurrent sandbox runs in one process")
        slot = _free_slots.pop(0)
    # distinct per process too (two trainer ranks on one host); no passwd entry owns these uids
    return slot, UID_BASE + (os.getpid() % 256) * 64 + slot


def _release(slot: int) -> None:
    with _slot_lock:
        _free_slots.append(slot)


def run_tests(code: str, tests: list[str], limits: SandboxLimits | None = None) -> SandboxResult:
    """Run `code` then each assert in `tests` in a fresh sandbox; returns how many tests passed."""
    limits = limits or SandboxLimits()
    if not tests:
        return SandboxResult(error="no tests to run")
    slot, uid = _take_uid()
    payload = json.dumps({"code": code, "tests": list(tests), "uid": uid, "limits": vars(limits)})
    try:
        proc = subprocess.Popen(
            [sys.executable, "-I", "-S", os.path.abspath(__file__), "--launcher"],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
            start_new_session=True, close_fds=True,
        )
        try:
            # the launcher enforces timeout_s itself; this is the backstop should it be stuck
            out, err = proc.communicate(payload.encode(), timeout=limits.timeout_s + 10)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.communicate()
            return SandboxResult(error="sandbox launcher did not return", timed_out=True)
        finally:
            try:
                os.killpg(proc.pid, signal.SIGKILL)  # anything left in the launcher's session
            except ProcessLookupError:
                pass
    finally:
        _release(slot)
    lines = out.decode(errors="replace").strip().splitlines()
    if proc.returncode != 0 or not lines:
        return SandboxResult(error=f"sandbox launcher failed (exit {proc.returncode}): "
                                   f"{err.decode(errors='replace').strip()[-500:]}", sandbox_failed=True)
    return SandboxResult(**json.loads(lines[-1]))


def run_tests_many(codes: list[str], tests: list[list[str]], limits: SandboxLimits | None = None,
                   max_workers: int | None = None) -> list[SandboxResult]:
    """`run_tests` for every (code, tests) pair, in parallel (one sandbox per pair, up to max_workers at a time)."""
    if len(codes) != len(tests):
        raise ValueError(f"{len(codes)} programs but {len(tests)} test lists")
    if not codes:
        return []
    workers = max_workers or min(len(codes), os.cpu_count() or 1, 16)
    with ThreadPoolExecutor(workers) as pool:
        return list(pool.map(lambda pair: run_tests(pair[0], pair[1], limits), zip(codes, tests)))


# ---------------------------------------------------------------------------------------------------------------------
# Launcher side: this file run as `python -I -S sandbox.py --launcher` (standard library only from here on)

CLONE_NEWNS, CLONE_NEWPID, CLONE_NEWNET = 0x00020000, 0x20000000, 0x40000000
MS_RDONLY, MS_NOSUID, MS_NODEV, MS_REMOUNT, MS_BIND, MS_REC, MS_PRIVATE = 1, 2, 4, 32, 4096, 16384, 1 << 18
WRITABLE_DIRS = ("/tmp", "/var/tmp", "/run/lock", "/dev/shm")
WORKDIR = "/tmp/sandbox"


class _SetupError(Exception):
    pass


def _libc():
    import ctypes

    return ctypes, ctypes.CDLL(None, use_errno=True)


def _check(ret: int, what: str) -> None:
    if ret != 0:
        ctypes, _ = _libc()
        raise _SetupError(f"{what}: {os.strerror(ctypes.get_errno())}")


def _isolate(limits: dict) -> None:
    """New mount / network / pid namespaces; every mount read-only; private tmpfs where the code may write."""
    _, libc = _libc()
    _check(libc.unshare(CLONE_NEWNS | CLONE_NEWNET | CLONE_NEWPID), "unshare(mount, net, pid namespaces)")
    _check(libc.mount(None, b"/", None, MS_REC | MS_PRIVATE, None), "making mounts private")
    with open("/proc/self/mountinfo") as f:
        mount_points = [line.split()[4].replace("\\040", " ") for line in f]
    for mp in sorted(set(mount_points), key=len):
        ret = libc.mount(None, mp.encode(), None, MS_REMOUNT | MS_BIND | MS_RDONLY, None)
        if mp == "/":
            _check(ret, "remounting / read-only")
    options = f"size={int(limits['tmpfs_bytes'])},mode=1777".encode()
    for d in WRITABLE_DIRS:
        if os.path.isdir(d):
            _check(libc.mount(b"tmpfs", d.encode(), b"tmpfs", MS_NOSUID | MS_NODEV, options), f"tmpfs on {d}")
    _expose_stdlib(libc)


def _expose_stdlib(libc) -> None:
    """The sandbox uid must read the standard library, which may sit below a directory closed to others (pyenv
    under /root, mode 700). In this namespace only, that directory is covered by an empty tmpfs into which the
    interpreter's prefix alone is bind-mounted back, read-only, at the same path."""
    prefix = os.path.realpath(sys.base_prefix)
    closed = next((p for p in _ancestors(prefix) if not os.stat(p).st_mode & 0o001), None)
    if closed is None:
        return
    staging = "/tmp/.sandbox-python"
    os.makedirs(staging)
    _check(libc.mount(prefix.encode(), staging.encode(), None, MS_BIND | MS_REC, None), f"binding {prefix}")
    _check(libc.mount(b"tmpfs", closed.encode(), b"tmpfs", MS_NOSUID | MS_NODEV, b"size=1m,mode=755"),
           f"tmpfs on {closed}")
    os.makedirs(prefix, mode=0o755, exist_ok=True)
    _check(libc.mount(staging.encode(), prefix.encode(), None, MS_BIND | MS_REC, None), f"re-binding {prefix}")
    _check(libc.mount(None, prefix.encode(), None, MS_REMOUNT | MS_BIND | MS_RDONLY, None), f"{prefix} read-only")
    _check(libc.mount(b"tmpfs", closed.encode(), None, MS_REMOUNT | MS_RDONLY, b"size=1m,mode=755"),
           f"{closed} read-only")
    _check(libc.umount2(staging.encode(), 2), f"detaching {staging}")  # MNT_DETACH
    os.rmdir(staging)


def _ancestors(path: str) -> list[str]:
    """`/a/b/c` -> [`/a`, `/a/b`, `/a/b/c`]."""
    parts = path.strip("/").split("/")
    return ["/" + "/".join(parts[: i + 1]) for i in range(len(parts))]


def _drop_privileges(uid: int, limits: dict) -> None:
    import resource

    os.makedirs(WORKDIR, exist_ok=True)
    os.chown(WORKDIR, uid, uid)
    os.chdir(WORKDIR)
    mem = int(limits["memory_bytes"])
    for res, value in ((resource.RLIMIT_AS, mem), (resource.RLIMIT_DATA, mem),
                       (resource.RLIMIT_NPROC, int(limits["max_processes"])),
                       (resource.RLIMIT_FSIZE, int(limits["max_file_bytes"])),
                       (resource.RLIMIT_NOFILE, int(limits["max_open_files"])),
                       (resource.RLIMIT_CPU, int(limits["timeout_s"]) + 1),
                       (resource.RLIMIT_CORE, 0)):
        resource.setrlimit(res, (value, value))
    os.setgroups([])
    os.setgid(uid)
    os.setuid(uid)
    try:
        os.setuid(0)
    except PermissionError:
        pass
    else:
        raise _SetupError("the uid drop did not hold (could become root again)")
    if os.getuid() == 0 or os.geteuid() == 0:
        raise _SetupError("still root after the uid drop")
    _, libc = _libc()
    libc.prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG: die with the launcher (cleared by setuid, so set after it)
    os.environ.clear()
    os.environ.update({"PATH": "/usr/bin:/bin", "HOME": WORKDIR, "TMPDIR": WORKDIR})


def _run_untrusted(code: str, tests: list[str], result_fd: int) -> None:
    """Runs in the sandboxed runner: the code, then each test in the same namespace."""
    devnull = os.open(os.devnull, os.O_RDWR)
    for fd in (0, 1, 2):
        os.dup2(devnull, fd)
    passed, error = 0, None
    scope = {"__name__": "__main__"}
    try:
        exec(compile(code, "solution.py", "exec"), scope)
    except BaseException as e:  # noqa: BLE001  (SystemExit, KeyboardInterrupt: still just a failed program)
        error = f"the code raised {type(e).__name__}: {e}"[:500]
    else:
        for i, test in enumerate(tests):
            try:
                exec(compile(test, f"test_{i}", "exec"), scope)
                passed += 1
            except BaseException as e:  # noqa: BLE001
                if error is None:
                    error = f"test {i} failed: {type(e).__name__}: {e}"[:500]
    with os.fdopen(result_fd, "w") as f:
        f.write(json.dumps({"passed": passed, "total": len(tests), "error": error}))


def _launcher_main() -> int:
    import time

    request = json.loads(sys.stdin.read())
    limits, tests = request["limits"], request["tests"]
    try:
        if os.geteuid() != 0:
            raise _SetupError("the sandbox needs root (namespaces and a uid drop); refusing to run unprotected")
        _isolate(limits)
    except _SetupError as e:
        print(f"sandbox unavailable: {e}", file=sys.stderr)
        return 3
    read_fd, write_fd = os.pipe()
    setup_r, setup_w = os.pipe()
    pid = os.fork()
    if pid == 0:  # pid 1 of the new pid namespace
        os.close(read_fd)
        os.close(setup_r)
        try:
            _drop_privileges(int(request["uid"]), limits)
        except (_SetupError, OSError) as e:
            os.write(setup_w, f"sandbox unavailable: {e}".encode())
            os._exit(3)
        os.close(setup_w)
        try:
            _run_untrusted(request["code"], tests, write_fd)
        finally:
            os._exit(0)
    os.close(write_fd)
    os.close(setup_w)
    deadline = time.monotonic() + float(limits["timeout_s"])
    status, timed_out = None, False
    while status is None:
        done, st = os.waitpid(pid, os.WNOHANG)
        if done:
            status = st
        elif time.monotonic() > deadline:
            os.kill(pid, signal.SIGKILL)  # pid 1 of the namespace: the kernel kills all of its processes
            os.waitpid(pid, 0)
            timed_out = True
            break
        else:
            time.sleep(0.005)
    setup_error = os.read(setup_r, 4096).decode(errors="replace")
    if setup_error:
        print(setup_error, file=sys.stderr)
        return 3
    with os.fdopen(read_fd) as f:
        raw = f.read()
    if timed_out:
        result = {"passed": 0, "total": len(tests), "error": f"timed out after {limits['timeout_s']} s",
                  "timed_out": True}
    else:
        try:
            result = json.loads(raw)
            result = {"passed": int(result["passed"]), "total": len(tests), "error": result.get("error")}
        except (ValueError, KeyError, TypeError):
            code = os.waitstatus_to_exitcode(status)
            why = f"killed by signal {-code}" if code < 0 else f"exited with status {code}"
            result = {"passed": 0, "total": len(tests), "error": f"the program crashed ({why})"}
    print(json.dumps(result))
    return 0


if __name__ == "__main__" and sys.argv[1:] == ["--launcher"]:
    sys.exit(_launcher_main())

"""A sandbox for running model-written Python against tests (the code reward of GRPO).

The code comes from a policy being optimised to make tests pass, so it is treated as hostile by accident: endless
loops, memory hogs, fork bombs, deletes, network calls, and the shortcuts a policy finds to a passing score (exiting
before the tests run, killing the process that scores it). Each run gets its own process tree, isolated with Linux
primitives only (no container runtime), the same protections for root and for an ordinary user:

    trainer --(stdin: code, tests, limits)--> launcher (own session)
        unshare(mount | net | pid namespaces), and a user namespace when not root (backend "userns")
        mount: "/" and every other mount remounted read-only (checked), fresh tmpfs on /tmp, /var/tmp, /run/lock,
               /dev/shm
        fork --> runner = pid 1 of the new pid namespace, in a session of its own
                 a fresh /proc (only this run's processes are visible)
                 rlimits: address space, processes, file size, open files, CPU, no core dumps
                 root: setgroups([]) / setgid / setuid to a sandbox uid (no passwd entry, owns nothing on the host)
                 user: the caller's uid is mapped to that sandbox uid; every capability dropped, no new privileges,
                       no further user namespaces
                 runs the code and each test (assert statement), writes {passed, total, error} to a pipe
        waits with a deadline; on expiry SIGKILLs the runner: the kernel then kills every process of its pid
        namespace, even ones that left the process group
    trainer: reads the result; as a backstop kills the launcher's whole process group

Backends, chosen by the launcher ("auto"): "root" when it runs as root; "userns" for an ordinary user where the
kernel allows unprivileged user namespaces (user.max_user_namespaces > 0 and no LSM policy against them: checked by
trying, in a throwaway child); else "bwrap" (bubblewrap, the same namespaces set up by a tool that distributions
permit where they restrict them, e.g. Ubuntu's AppArmor profile) when it is installed. Where none works,
`require_sandbox()` raises `SandboxUnavailableError` saying why, and `rewards.code_reward` raises it too: nothing
is scored and the code is never run unprotected.

Why each piece:
- a network namespace has only a loopback that is down: every connection fails;
- read-only mounts + tmpfs: the code may write in its working directory (on the tmpfs), and nothing it writes
  anywhere reaches the host; the tmpfs vanishes with the namespace;
- a distinct uid per concurrent run (root) or a user namespace per run (user): RLIMIT_NPROC counts processes per
  uid per user namespace, so a fork bomb's process count binds to its run alone (root ignores RLIMIT_NPROC, hence
  the uid drop);
- the pid namespace and fresh /proc: the code sees no process outside its run, so it cannot signal the launcher or
  the trainer (which, for an ordinary user, run under the same uid); killing its pid 1 kills everything in it,
  which a process-group kill alone does not guarantee (a child can call setsid);
- the runner's own session: `os.kill(os.getppid(), ...)` from pid 1 is kill(0), the caller's process group, which
  would otherwise include the launcher.

Gaming the harness scores 0: `sys.exit` / `raise SystemExit` in the code or inside the tested function counts as a
failed program or test, and `os._exit` or a killed runner leaves no result (a crash). A sandbox that cannot be set
up is an infrastructure failure (`SandboxResult.sandbox_failed`), never a score.

What it is not: a defence against code written to attack this sandbox (the runner and the code share a process, so
such code could forge its result, and an object whose `__eq__` always says True passes `assert f(x) == y`). It
keeps an RL run and its host safe from what a policy writes by accident, and from the shortcuts above.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

GIB = 1 << 30
MAX_MEMORY_BYTES = 2 * GIB
BACKENDS = ("auto", "root", "userns", "bwrap")
HOW_TO_ENABLE = (
    "As an ordinary user the sandbox needs unprivileged user namespaces (sysctl user.max_user_namespaces > 0; "
    "Debian's kernel.unprivileged_userns_clone=1; Ubuntu 23.10+: kernel.apparmor_restrict_unprivileged_userns=0) or "
    "bubblewrap (`apt-get install bubblewrap`) where it may create them (Ubuntu's AppArmor profile for bwrap, or a "
    "setuid bwrap); as root it needs no more than Linux namespaces.")


class SandboxUnavailableError(RuntimeError):
    """No isolation can be set up on this machine: the code is not run (never unprotected) and nothing is scored."""


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
    backend: str | None = None  # "root", "userns" or "bwrap": how this run was isolated

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


def run_tests(code: str, tests: list[str], limits: SandboxLimits | None = None,
              backend: str = "auto") -> SandboxResult:
    """Run `code` then each assert in `tests` in a fresh sandbox; returns how many tests passed. `backend`: "auto"
    (see the module docstring) or one of "root", "userns", "bwrap" (an error result if it cannot be had)."""
    limits = limits or SandboxLimits()
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if not tests:
        return SandboxResult(error="no tests to run")
    slot, uid = _take_uid()
    payload = json.dumps({"code": code, "tests": list(tests), "uid": uid, "limits": vars(limits),
                          "backend": backend})
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
            # it enforces the deadline itself: one that is stuck past it is the infrastructure, not the code
            return SandboxResult(error=f"sandbox launcher did not return within {limits.timeout_s + 10} s",
                                 sandbox_failed=True)
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
                   max_workers: int | None = None, backend: str = "auto") -> list[SandboxResult]:
    """`run_tests` for every (code, tests) pair, in parallel (one sandbox per pair, up to max_workers at a time)."""
    if len(codes) != len(tests):
        raise ValueError(f"{len(codes)} programs but {len(tests)} test lists")
    if not codes:
        return []
    workers = max_workers or min(len(codes), os.cpu_count() or 1, 16)
    with ThreadPoolExecutor(workers) as pool:
        return list(pool.map(lambda pair: run_tests(pair[0], pair[1], limits, backend), zip(codes, tests)))


_probe_lock = threading.Lock()
_probed: dict[str, str] = {}


def require_sandbox(backend: str = "auto") -> str:
    """The backend that isolates code on this machine, found by running a trivial program once per process; raises
    SandboxUnavailableError naming why when there is none (call it where a trainer or reward is built)."""
    with _probe_lock:
        if backend in _probed:
            return _probed[backend]
    # a generous deadline: this asks whether the sandbox can be set up, not how fast on a loaded machine
    result = run_tests("X = 1\n", ["assert X == 1"], SandboxLimits(timeout_s=60), backend)
    if result.score != 1.0:
        raise SandboxUnavailableError(f"the code sandbox cannot run on this machine: {result.error}. {HOW_TO_ENABLE}")
    with _probe_lock:
        _probed[backend] = result.backend
    return result.backend


# ---------------------------------------------------------------------------------------------------------------------
# Launcher side: this file run as `python -I -S sandbox.py --launcher` (standard library only from here on)

CLONE_NEWNS, CLONE_NEWUSER, CLONE_NEWPID, CLONE_NEWNET = 0x00020000, 0x10000000, 0x20000000, 0x40000000
MS_RDONLY, MS_NOSUID, MS_NODEV, MS_NOEXEC, MS_REMOUNT, MS_BIND, MS_REC, MS_PRIVATE = 1, 2, 4, 8, 32, 4096, 16384, 1 << 18
# per-mount options as /proc/self/mountinfo spells them: a remount inside a user namespace must keep them
MOUNT_OPTION_FLAGS = {"nosuid": MS_NOSUID, "nodev": MS_NODEV, "noexec": MS_NOEXEC, "noatime": 1024,
                      "nodiratime": 2048, "relatime": 1 << 21}
WRITABLE_DIRS = ("/tmp", "/var/tmp", "/run/lock", "/dev/shm")
WORKDIR = "/tmp/sandbox"
PR_SET_PDEATHSIG, PR_CAPBSET_DROP, PR_SET_NO_NEW_PRIVS, PR_CAP_AMBIENT = 1, 24, 38, 47


class _SetupError(Exception):
    pass


def _libc():
    import ctypes

    return ctypes, ctypes.CDLL(None, use_errno=True)


def _check(ret: int, what: str) -> None:
    if ret != 0:
        ctypes, _ = _libc()
        raise _SetupError(f"{what}: {os.strerror(ctypes.get_errno())}")


def _write(path: str, text: str) -> None:
    with open(path, "w") as f:
        f.write(text)


def _enter_namespaces(backend: str, inside_uid: int) -> None:
    """unshare(mount, net, pid) and, for an ordinary user, a user namespace in which the caller is `inside_uid`
    (one uid mapped: root of the host, and every other uid, stay unmapped)."""
    _, libc = _libc()
    if backend == "root":
        _check(libc.unshare(CLONE_NEWNS | CLONE_NEWNET | CLONE_NEWPID), "unshare(mount, net, pid namespaces)")
        return
    uid, gid = os.getuid(), os.getgid()
    _check(libc.unshare(CLONE_NEWUSER | CLONE_NEWNS | CLONE_NEWNET | CLONE_NEWPID),
           "unshare(user, mount, net, pid namespaces)")
    try:
        _write("/proc/self/setgroups", "deny")  # an unprivileged gid_map requires it
        _write("/proc/self/uid_map", f"{inside_uid} {uid} 1")
        _write("/proc/self/gid_map", f"{inside_uid} {gid} 1")
    except OSError as e:
        raise _SetupError(f"mapping the uid into the user namespace: {e}") from e


def _isolate_mounts(limits: dict) -> None:
    """Every mount read-only (and checked); private tmpfs where the code may write."""
    _, libc = _libc()
    _check(libc.mount(None, b"/", None, MS_REC | MS_PRIVATE, None), "making mounts private")
    with open("/proc/self/mountinfo") as f:
        mounts = {}
        for line in f:
            fields = line.split()
            # mountinfo writes space, tab, newline and backslash in a path as octal escapes (\040 ...)
            path = re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), fields[4])
            mounts[path] = fields[5].split(",")
    for mp in sorted(mounts, key=len):
        keep = sum(MOUNT_OPTION_FLAGS.get(o, 0) for o in mounts[mp])
        libc.mount(None, mp.encode(), None, MS_REMOUNT | MS_BIND | MS_RDONLY | keep, None)
    for mp in mounts:  # fail closed: a mount that stayed writable is named, and the code is not run
        try:
            writable = not os.statvfs(mp).f_flag & os.ST_RDONLY
        except OSError:  # not reachable from here (a closed directory above it): not by the code either
            continue
        if writable and mp not in WRITABLE_DIRS:
            raise _SetupError(f"could not make the mount {mp} read-only")
    options = f"size={int(limits['tmpfs_bytes'])},mode=1777".encode()
    for d in WRITABLE_DIRS:
        if os.path.isdir(d):
            _check(libc.mount(b"tmpfs", d.encode(), b"tmpfs", MS_NOSUID | MS_NODEV, options), f"tmpfs on {d}")


def expose_paths(paths: list[str]) -> None:
    """Make `paths` (directories) reachable for any uid in this mount namespace although a directory above them is
    closed to others (pyenv under /root, mode 700): that directory is covered by an empty read-only tmpfs into which
    the paths alone are bind-mounted back, read-only, where they were. Call it in a private mount namespace."""
    _, libc = _libc()
    by_closed: dict[str, list[str]] = {}
    for path in dict.fromkeys(os.path.realpath(p) for p in paths):
        closed = next((p for p in _ancestors(path) if not os.stat(p).st_mode & 0o001), None)
        if closed is not None and closed != path:
            by_closed.setdefault(closed, []).append(path)
    for closed, inner in by_closed.items():
        staging = []
        for i, path in enumerate(inner):
            stage = f"/tmp/.sandbox-expose-{os.getpid()}-{i}"
            os.makedirs(stage)
            _check(libc.mount(path.encode(), stage.encode(), None, MS_BIND | MS_REC, None), f"binding {path}")
            staging.append(stage)
        _check(libc.mount(b"tmpfs", closed.encode(), b"tmpfs", MS_NOSUID | MS_NODEV, b"size=1m,mode=755"),
               f"tmpfs on {closed}")
        for path, stage in zip(inner, staging):
            os.makedirs(path, mode=0o755, exist_ok=True)
            _check(libc.mount(stage.encode(), path.encode(), None, MS_BIND | MS_REC, None), f"re-binding {path}")
            _check(libc.mount(None, path.encode(), None, MS_REMOUNT | MS_BIND | MS_RDONLY, None), f"{path} read-only")
        _check(libc.mount(b"tmpfs", closed.encode(), None, MS_REMOUNT | MS_RDONLY, b"size=1m,mode=755"),
               f"{closed} read-only")
        for stage in staging:
            _check(libc.umount2(stage.encode(), 2), f"detaching {stage}")  # MNT_DETACH
            os.rmdir(stage)


def _ancestors(path: str) -> list[str]:
    """`/a/b/c` -> [`/a`, `/a/b`, `/a/b/c`]."""
    parts = path.strip("/").split("/")
    return ["/" + "/".join(parts[: i + 1]) for i in range(len(parts))]


def _fresh_proc(backend: str) -> None:
    """/proc of this pid namespace only: the host's processes (the trainer among them) vanish from view. Where the
    kernel refuses a new proc mount, an empty tmpfs hides the host's /proc instead."""
    _, libc = _libc()
    flags = MS_NOSUID | MS_NODEV | MS_NOEXEC
    if libc.mount(b"proc", b"/proc", b"proc", flags, None) == 0:
        if backend == "userns":
            # no user namespaces inside this one: the code cannot regain capabilities in a nested one
            _write("/proc/sys/user/max_user_namespaces", "0")
        _check(libc.mount(None, b"/proc", None, MS_REMOUNT | MS_BIND | MS_RDONLY | flags, None), "/proc read-only")
    else:
        _check(libc.mount(b"tmpfs", b"/proc", b"tmpfs", flags | MS_RDONLY, b"size=4k,mode=555"), "hiding /proc")


def _limit_resources(limits: dict) -> None:
    import resource

    mem = int(limits["memory_bytes"])
    for res, value in ((resource.RLIMIT_AS, mem), (resource.RLIMIT_DATA, mem),
                       (resource.RLIMIT_NPROC, int(limits["max_processes"])),
                       (resource.RLIMIT_FSIZE, int(limits["max_file_bytes"])),
                       (resource.RLIMIT_NOFILE, int(limits["max_open_files"])),
                       (resource.RLIMIT_CPU, int(limits["timeout_s"]) + 1),
                       (resource.RLIMIT_CORE, 0)):
        resource.setrlimit(res, (value, value))


def _drop_uid(uid: int) -> None:
    """Root: become the sandbox uid, with no groups, for good."""
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


def _drop_capabilities() -> None:
    """User namespace: give up every capability the namespace granted (bounding, ambient, effective, permitted,
    inheritable) and the means to gain new ones (no setuid binaries, no file capabilities); the uid stays the one
    mapped uid."""
    ctypes, libc = _libc()
    with open("/proc/sys/kernel/cap_last_cap") as f:
        last_cap = int(f.read())
    for cap in range(last_cap + 1):
        _check(libc.prctl(PR_CAPBSET_DROP, cap, 0, 0, 0), f"dropping capability {cap} from the bounding set")
    _check(libc.prctl(PR_CAP_AMBIENT, 4, 0, 0, 0), "clearing ambient capabilities")  # PR_CAP_AMBIENT_CLEAR_ALL
    _check(libc.prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0), "no_new_privs")
    header = (ctypes.c_uint32 * 2)(0x20080522, 0)  # _LINUX_CAPABILITY_VERSION_3, this process
    data = (ctypes.c_uint32 * 6)()  # effective, permitted, inheritable x 2 words: all zero
    _check(libc.capset(header, data), "capset")
    with open("/proc/self/status") as f:
        caps = {k: v.strip() for k, v in (line.split(":", 1) for line in f if line.startswith("Cap"))}
    if any(int(caps[k], 16) for k in ("CapEff", "CapPrm", "CapBnd")):
        raise _SetupError(f"capabilities remain after dropping them: {caps}")
    try:
        os.setuid(0)
    except OSError:
        pass
    else:
        raise _SetupError("could become uid 0 inside the user namespace")


def _enter_runner(backend: str, request: dict) -> None:
    """In the forked runner (pid 1 of the pid namespace), before the code: everything but the code itself."""
    limits, uid = request["limits"], int(request["uid"])
    os.setsid()  # kill(0) (os.kill(os.getppid(), ...) from pid 1) reaches this session only, not the launcher
    _fresh_proc(backend)
    os.makedirs(WORKDIR, exist_ok=True)
    if backend == "root":
        os.chown(WORKDIR, uid, uid)
    os.chdir(WORKDIR)
    _limit_resources(limits)
    if backend == "root":
        _drop_uid(uid)
    else:
        _drop_capabilities()
    _, libc = _libc()
    libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL)  # die with the launcher (a uid change clears it: set after)
    _clean_environment()


def _clean_environment() -> None:
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


def _outcome(raw: str, exit_code: int | None, timed_out: bool, tests: list[str], limits: dict) -> dict:
    """The result to report, from what the runner wrote and how it ended (exit_code < 0: killed by that signal)."""
    if timed_out:
        return {"passed": 0, "total": len(tests), "error": f"timed out after {limits['timeout_s']} s",
                "timed_out": True}
    try:
        result = json.loads(raw)
        return {"passed": int(result["passed"]), "total": len(tests), "error": result.get("error")}
    except (ValueError, KeyError, TypeError):
        why = f"killed by signal {-exit_code}" if exit_code < 0 else f"exited with status {exit_code}"
        return {"passed": 0, "total": len(tests), "error": f"the program crashed ({why}) before reporting"}


def _run_in_namespaces(backend: str, request: dict) -> dict:
    import time

    limits, tests = request["limits"], request["tests"]
    read_fd, write_fd = os.pipe()
    setup_r, setup_w = os.pipe()
    pid = os.fork()
    if pid == 0:  # pid 1 of the new pid namespace
        os.close(read_fd)
        os.close(setup_r)
        try:
            _enter_runner(backend, request)
        except (_SetupError, OSError) as e:
            os.write(setup_w, str(e).encode())
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
        raise _SetupError(setup_error)
    with os.fdopen(read_fd) as f:
        raw = f.read()
    return _outcome(raw, None if timed_out else os.waitstatus_to_exitcode(status), timed_out, tests, limits)


def _bwrap_argv(request: dict) -> list[str]:
    limits, uid = request["limits"], str(int(request["uid"]))
    size = str(int(limits["tmpfs_bytes"]))
    argv = [shutil.which("bwrap"), "--unshare-all", "--unshare-user", "--disable-userns", "--die-with-parent",
            "--new-session", "--cap-drop", "ALL", "--uid", uid, "--gid", uid,
            "--ro-bind", "/", "/", "--dev", "/dev", "--proc", "/proc"]
    for d in WRITABLE_DIRS:
        if os.path.isdir(d):
            argv += ["--size", size, "--tmpfs", d]
    return argv + ["--chdir", "/tmp", "--", sys.executable, "-I", "-S", os.path.abspath(__file__), "--runner"]


def _run_in_bwrap(request: dict) -> dict:
    """bubblewrap sets up the namespaces and mounts and drops the capabilities; this file's `--runner` inside it
    applies the rlimits and runs the code."""
    limits, tests = request["limits"], request["tests"]
    proc = subprocess.Popen(_bwrap_argv(request), stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, close_fds=True)
    timed_out = False
    try:
        out, err = proc.communicate(json.dumps(request).encode(), timeout=float(limits["timeout_s"]))
    except subprocess.TimeoutExpired:
        proc.kill()  # --die-with-parent: the namespace's init dies with bwrap, and every process with it
        out, err = proc.communicate()
        timed_out = True
    err = err.decode(errors="replace").strip()
    if err:  # bwrap's own errors, or the runner's before the code ran (the code's stderr is /dev/null)
        raise _SetupError(f"bubblewrap: {err[-500:]}")
    return _outcome(out.decode(errors="replace"), proc.returncode, timed_out, tests, limits)


def _runner_main() -> int:
    """Inside bubblewrap: the rlimits, a clean environment, the code; the result on the saved stdout."""
    request = json.loads(sys.stdin.read())
    try:
        os.makedirs(WORKDIR, exist_ok=True)
        os.chdir(WORKDIR)
        _limit_resources(request["limits"])
        _clean_environment()
        result_fd = os.dup(1)
    except OSError as e:
        print(f"runner setup: {e}", file=sys.stderr)
        return 3
    _run_untrusted(request["code"], request["tests"], result_fd)
    return 0


def _userns_usable() -> str | None:
    """None when this user can set up the "userns" sandbox, else why not: tried in a throwaway child."""
    read_fd, write_fd = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.close(read_fd)
        try:
            _enter_namespaces("userns", os.getuid())
            _, libc = _libc()
            _check(libc.mount(b"tmpfs", b"/tmp", b"tmpfs", MS_NOSUID | MS_NODEV, b"size=4k"), "mounting a tmpfs")
        except (_SetupError, OSError) as e:
            os.write(write_fd, str(e).encode())
            os._exit(1)
        os._exit(0)
    os.close(write_fd)
    _, status = os.waitpid(pid, 0)
    with os.fdopen(read_fd) as f:
        why = f.read()
    return None if status == 0 else (why or f"probe exited with {os.waitstatus_to_exitcode(status)}")


def _choose_backend(wanted: str) -> str:
    is_root = os.geteuid() == 0
    if wanted == "root" or (wanted == "auto" and is_root):
        if not is_root:
            raise _SetupError("backend 'root' needs root")
        return "root"
    if is_root:
        # root is exempt from RLIMIT_NPROC even inside a user namespace: only the uid drop bounds a fork bomb
        raise _SetupError(f"backend {wanted!r} is for ordinary users; as root the sandbox uses backend 'root'")
    if wanted in ("auto", "userns"):
        why_not = _userns_usable()
        if why_not is None:
            return "userns"
        if wanted == "userns":
            raise _SetupError(f"no unprivileged user namespace: {why_not}")
    else:
        why_not = "not tried"
    if shutil.which("bwrap") is None:
        raise _SetupError(f"running as uid {os.getuid()}: no unprivileged user namespace ({why_not}) and "
                          "bubblewrap (bwrap) is not installed")
    return "bwrap"


def _launcher_main() -> int:
    request = json.loads(sys.stdin.read())
    try:
        backend = _choose_backend(request.get("backend", "auto"))
        if backend == "bwrap":
            result = _run_in_bwrap(request)
        else:
            _enter_namespaces(backend, int(request["uid"]))
            _isolate_mounts(request["limits"])
            if backend == "root":
                # the sandbox uid must read the standard library, which may sit below a directory closed to others
                expose_paths([sys.base_prefix])
            result = _run_in_namespaces(backend, request)
    except (_SetupError, OSError) as e:
        print(f"sandbox unavailable: {e}", file=sys.stderr)
        return 3
    print(json.dumps({**result, "backend": backend}))
    return 0


if __name__ == "__main__" and sys.argv[1:] == ["--launcher"]:
    sys.exit(_launcher_main())
if __name__ == "__main__" and sys.argv[1:] == ["--runner"]:
    sys.exit(_runner_main())

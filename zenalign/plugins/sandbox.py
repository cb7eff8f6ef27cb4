"""Running a model's code: a child process with limits, for the ``code_tests`` reward source and
the ``python`` tool.

    result = run_python("print(1 + 1)", SandboxOptions(timeout_s=5))
    result.stdout == "2\\n"; result.status == "ok"

Each run gets a fresh temporary directory (its working directory and ``HOME``, removed afterwards)
and an environment with nothing inherited (no tokens or keys), no file descriptor but its pipes,
its own session, and limits: wall-clock ``timeout_s``, CPU seconds, address space
(``memory_mb``), processes (``max_processes``), file size (``max_file_mb``, which also bounds its
output), no core files; its stdout and stderr are cut to ``max_output_bytes``. When zenalign runs
as root, the code runs as ``nobody`` (so the process limit holds and system files are read-only to
it). Where the kernel has Landlock (Linux 5.13+), writes outside the temporary directory and TCP
connections are refused too. When the run ends, every process left in its session is killed.

**This is not a security boundary against a hostile model.** It stops the accidents a policy
makes while learning (an infinite loop, a fork bomb, a huge allocation, a stray write); code that
means to escape can (through a second ``setsid``, or shared kernel resources). For real isolation
give ``command``: a wrapper such as ``["bwrap", "--ro-bind", "/", "/", "--bind", "{dir}", "{dir}",
"--unshare-all", "--die-with-parent"]``, ``nsjail`` or ``docker run``, in front of the Python
command (``{dir}`` is the run's temporary directory).
"""

from __future__ import annotations

import functools
import logging
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from pydantic import Field

from zenalign.errors import RewardError
from zenalign.plugins.api import Options

log = logging.getLogger("zenalign")

# Runs first in the child (python -I -c LAUNCHER DIR LIMITS...): the limits, then the user's code
# by execve, so nothing of it is shared with zenalign's process. Standard library only.
LAUNCHER = r"""
import ctypes, os, resource, signal, struct, sys
directory, target, cpu, memory, nproc, fsize, landlock, drop = sys.argv[1], sys.argv[2], *map(int, sys.argv[3:9])
def limit(kind, value):
    try:
        resource.setrlimit(kind, (value, value))
    except (ValueError, OSError):
        pass
limit(resource.RLIMIT_CPU, cpu)
limit(resource.RLIMIT_AS, memory)
limit(resource.RLIMIT_FSIZE, fsize)
limit(resource.RLIMIT_CORE, 0)
limit(resource.RLIMIT_NPROC, nproc)
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the file-size limit fails instead of killing
if drop:
    os.setgroups([])
    os.setgid(65534)
    os.setuid(65534)
restricted = 0
if landlock:
    libc = ctypes.CDLL(None, use_errno=True)
    libc.syscall.restype = ctypes.c_long
    PR_SET_NO_NEW_PRIVS = 38
    abi = libc.syscall(444, None, ctypes.c_size_t(0), ctypes.c_uint32(1))
    if abi > 0 and libc.prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) == 0:
        write = (1 << 1) | sum(1 << bit for bit in range(4, 13)) | ((1 << 13) if abi >= 2 else 0) | ((1 << 14) if abi >= 3 else 0)
        net = 3 if abi >= 4 else 0  # bind and connect over TCP
        attr = struct.pack("QQ", write, net) if net else struct.pack("Q", write)
        ruleset = libc.syscall(444, ctypes.c_char_p(attr), ctypes.c_size_t(len(attr)), ctypes.c_uint32(0))
        if ruleset >= 0:
            ok = True
            for path in (directory, "/dev/null"):
                fd = os.open(path, os.O_PATH | os.O_CLOEXEC)
                rule = struct.pack("=Qi", write if path == directory else (1 << 1), fd)
                ok &= libc.syscall(445, ctypes.c_int(ruleset), ctypes.c_int(1), ctypes.c_char_p(rule), ctypes.c_uint32(0)) == 0
                os.close(fd)
            restricted = int(ok and libc.syscall(446, ctypes.c_int(ruleset), ctypes.c_uint32(0)) == 0)
            os.close(ruleset)
with open(os.path.join(directory, ".landlock"), "w") as marker:
    marker.write(str(restricted))
os.execv(target, [target, "-I", "-B", os.path.join(directory, "main.py")])
"""


class SandboxOptions(Options):
    """Limits of one run of a model's code (see :mod:`zenalign.plugins.sandbox`)."""

    timeout_s: float = Field(10.0, gt=0, le=3600, description="Wall-clock seconds before the run is killed.")
    cpu_s: int = Field(10, ge=1, le=3600, description="CPU seconds before the run is killed (RLIMIT_CPU).")
    memory_mb: int = Field(1024, ge=64, le=1 << 20, description="Address space in MiB (RLIMIT_AS): an allocation "
                           "beyond it fails with MemoryError.")
    max_processes: int = Field(32, ge=1, le=4096, description="Processes of the sandbox user (RLIMIT_NPROC): "
                               "a fork beyond it fails.")
    max_file_mb: int = Field(16, ge=1, le=1 << 16, description="Largest file the code may write, in MiB "
                             "(RLIMIT_FSIZE); its output is kept in such files too.")
    max_output_bytes: int = Field(16384, ge=256, le=1 << 24, description="stdout and stderr are each cut to this "
                                  "many bytes, with a marker saying how much was cut.")
    command: Optional[list[str]] = Field(None, description="A wrapper run in front of the Python command, for real "
                                         "isolation (bwrap, nsjail, docker run ...); '{dir}' in it stands for the "
                                         "run's temporary directory. null: none.")


@dataclass
class SandboxResult:
    status: str  # ok | error (non-zero exit) | timeout | killed (by a signal: the CPU limit, out of memory)
    returncode: int
    stdout: str
    stderr: str
    seconds: float
    landlocked: bool  # writes outside the directory were refused (Landlock)
    session: int  # the run's session id: no process of it is left when run_python returns

    def text(self) -> str:
        """What a tool returns to the policy: the output, or the error with it."""
        if self.status == "ok":
            return self.stdout
        what = {"timeout": "timed out", "killed": f"was killed (signal {-self.returncode})",
                "error": f"exited with code {self.returncode}"}[self.status]
        return f"{self.stdout}{self.stderr}[the program {what}]"


def cut(handle, limit: int) -> str:
    """The first ``limit`` bytes written to ``handle`` (from its start), with a marker for the rest."""
    size = os.fstat(handle.fileno()).st_size
    handle.seek(0)
    text = handle.read(limit).decode("utf-8", errors="replace")
    return text if size <= limit else f"{text}\n[... {size - limit} more bytes cut]\n"


def run_python(code: str, options: SandboxOptions = SandboxOptions(), stdin: str = "") -> SandboxResult:
    """Run ``code`` as a Python program in a fresh temporary directory, with ``options``' limits
    (see the module docstring); ``stdin`` is its standard input."""
    directory = Path(tempfile.mkdtemp(prefix="zenalign-sandbox-"))
    try:
        (directory / "main.py").write_text(code, encoding="utf-8")
        target, drop = interpreter()
        if drop:  # the code runs as nobody: it may write here, and only here
            os.chown(directory, NOBODY, NOBODY)
        limits = [options.cpu_s, options.memory_mb << 20, options.max_processes, options.max_file_mb << 20, 1, int(drop)]
        argv = [sys.executable, "-I", "-c", LAUNCHER, str(directory), target, *map(str, limits)]
        if options.command:
            argv = [part.replace("{dir}", str(directory)) for part in options.command] + argv
        return _run(argv, directory, options, stdin)
    finally:
        shutil.rmtree(directory, ignore_errors=True)


NOBODY = 65534


@functools.lru_cache(maxsize=None)
def interpreter() -> tuple[str, bool]:
    """The Python that runs the code, and whether it runs as nobody (when zenalign runs as root:
    root is exempt from the process limit). The interpreter itself, not a virtual environment's
    link to it (``-I`` leaves the environment's packages out anyway: the standard library only);
    as nobody, the first of it, ``/usr/bin/python3`` and ``/usr/local/bin/python3`` that nobody
    can start (a Python under /root cannot be)."""
    own = os.path.realpath(sys.executable)
    if os.geteuid() != 0:
        return own, False
    for candidate in dict.fromkeys([own, "/usr/bin/python3", "/usr/local/bin/python3"]):
        path = os.path.realpath(candidate)
        if os.path.isfile(path) and _starts_as_nobody(path):
            return path, True
    log.warning("sandbox: no Python that the user 'nobody' can start (%s is not reachable to it); model code "
                "runs as root, where the process limit does not hold. Install a system python3, or give "
                "sandbox.command", own)
    return own, False


def _starts_as_nobody(path: str) -> bool:
    directory = Path(tempfile.mkdtemp(prefix="zenalign-sandbox-"))
    try:
        (directory / "main.py").write_text("import encodings, json\n", encoding="utf-8")
        os.chown(directory, NOBODY, NOBODY)
        argv = [sys.executable, "-I", "-c", LAUNCHER, str(directory), path, "10", str(512 << 20), "16", str(1 << 20), "0", "1"]
        return subprocess.run(argv, cwd=directory, capture_output=True, timeout=30, env={"PATH": "/usr/bin:/bin"}).returncode == 0
    except (OSError, subprocess.SubprocessError):
        return False
    finally:
        shutil.rmtree(directory, ignore_errors=True)


def _run(argv: list[str], directory: Path, options: SandboxOptions, stdin: str) -> SandboxResult:
    env = {"PATH": "/usr/local/bin:/usr/bin:/bin", "HOME": str(directory), "TMPDIR": str(directory),
           "LANG": "C.UTF-8", "PYTHONDONTWRITEBYTECODE": "1", "OMP_NUM_THREADS": "1"}
    # output goes to unnamed files outside the directory: the code cannot swap them for a link to
    # a file it may not read, which zenalign would then read back to it
    with tempfile.TemporaryFile() as stdout, tempfile.TemporaryFile() as stderr:
        start = time.monotonic()
        try:
            process = subprocess.Popen(argv, cwd=directory, env=env, stdin=subprocess.PIPE, stdout=stdout,
                                       stderr=stderr, close_fds=True, start_new_session=True)
        except OSError as exc:  # sandbox.command names a program this machine lacks
            raise RewardError(f"sandbox: {argv[0]!r} could not be started ({exc.strerror or exc}); check "
                              f"sandbox.command (null: no wrapper)") from None
        status = _wait(process, options, stdin)
        seconds = time.monotonic() - start
        out, err = cut(stdout, options.max_output_bytes), cut(stderr, options.max_output_bytes)
    if status == "ok" and process.returncode:
        status = "killed" if process.returncode < 0 else "error"
    marker = directory / ".landlock"
    landlocked = marker.is_file() and not marker.is_symlink() and marker.read_text().strip() == "1"
    return SandboxResult(status, process.returncode, out, err, seconds, landlocked, process.pid)


def _wait(process: subprocess.Popen, options: SandboxOptions, stdin: str) -> str:
    """Feed stdin and wait for the run, at most ``timeout_s``; then kill what is left of its session."""
    status = "ok"
    try:
        process.communicate(stdin.encode("utf-8"), timeout=options.timeout_s)
    except subprocess.TimeoutExpired:
        status = "timeout"
    finally:
        kill_session(process.pid, process)
    return status


def kill_session(session: int, leader: subprocess.Popen) -> None:
    """SIGKILL every process of the session (the run and whatever it forked), until none is left
    (orphans are reaped by init; after 2 s the rest are left to it)."""
    try:
        os.killpg(session, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
    leader.wait()
    for _ in range(200):
        try:
            os.killpg(session, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            return
        time.sleep(0.01)


def python(code: str) -> str:
    """Run a Python program and return what it prints.

    Args:
        code: The program. It runs in a fresh directory with the standard library, for at most 10 seconds.

    Returns:
        Its standard output; when it fails, its errors and how it ended.
    """
    return run_python(code).text()

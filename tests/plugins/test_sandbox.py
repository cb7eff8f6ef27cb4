"""zenalign.plugins.sandbox: a model's code in a child process with limits. Each misbehaviour ends
as a clean result within its limit and leaves no process behind."""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest

from zenalign.errors import RewardError
from zenalign.plugins.sandbox import SandboxOptions, python, run_python

QUICK = SandboxOptions(timeout_s=5, cpu_s=5)


def session_processes(session: int) -> list[int]:
    """The processes still alive in a session (from /proc: the 6th field of stat is the session id)."""
    alive = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(fields[3]) == session and fields[0] != "Z":
                alive.append(int(entry.name))
    return alive


def test_a_program_runs_in_a_fresh_directory_with_nothing_of_zenalign_s_environment(monkeypatch):
    monkeypatch.setenv("ZEN_SECRET_TOKEN", "hunter2")
    result = run_python("import os, sys\nprint(os.getcwd())\nprint(os.environ.get('ZEN_SECRET_TOKEN'))\n"
                        "print(sorted(os.environ))\nprint(sys.stdin.read())", QUICK, stdin="from stdin")
    assert result.status == "ok" and result.returncode == 0 and result.stderr == ""
    cwd, secret, names, given = result.stdout.splitlines()
    assert Path(cwd).name.startswith("zenalign-sandbox-") and not Path(cwd).exists()  # removed afterwards
    assert secret == "None" and "ZEN_SECRET_TOKEN" not in names and given == "from stdin"
    if os.geteuid() == 0:  # root runs the code as nobody
        assert run_python("import os; print(os.getuid())", QUICK).stdout == "65534\n"


def test_an_infinite_loop_is_ended_at_the_wall_clock_limit_and_leaves_nothing_behind():
    start = time.monotonic()
    result = run_python("while True: pass", SandboxOptions(timeout_s=1.5, cpu_s=60))
    assert result.status == "timeout" and result.returncode == -9
    assert 1.5 <= time.monotonic() - start < 10
    assert session_processes(result.session) == []
    assert "[the program timed out]" in result.text()


def test_the_cpu_limit_kills_a_busy_program_before_the_wall_clock_one():
    result = run_python("while True: pass", SandboxOptions(timeout_s=120, cpu_s=1))
    assert result.status == "killed" and result.seconds < 60  # SIGXCPU at 1 s of CPU, SIGKILL at 2


def test_a_fork_bomb_is_held_by_the_process_limit_and_every_fork_is_killed():
    bomb = "import os\nwhile True:\n    try:\n        os.fork()\n    except OSError:\n        pass\n"
    result = run_python(bomb, SandboxOptions(timeout_s=2, cpu_s=30, max_processes=16))
    assert result.status == "timeout"
    time.sleep(0.2)
    assert session_processes(result.session) == []
    assert run_python("print('still here')", QUICK).stdout == "still here\n"  # the machine is fine


def test_a_10_gb_allocation_fails_with_memory_error_at_once():
    result = run_python("x = bytearray(10 * 1024 ** 3)", QUICK)
    assert result.status == "error" and result.stderr.rstrip().endswith("MemoryError") and result.seconds < 5


def test_a_write_outside_the_directory_is_refused(tmp_path):
    outside = Path("/tmp") / f"zenalign-sandbox-outside-{os.getpid()}"
    result = run_python(f"open({str(outside)!r}, 'w').write('x')\n", QUICK)
    if not result.landlocked:
        pytest.skip("this kernel has no Landlock (Linux 5.13+): writes outside the directory are not refused here")
    assert result.status == "error" and "PermissionError" in result.stderr and not outside.exists()
    inside = run_python("open('mine.txt', 'w').write('fine'); print(open('mine.txt').read())", QUICK)
    assert inside.status == "ok" and inside.stdout == "fine\n"


def test_no_file_descriptor_of_zenalign_reaches_the_program(tmp_path):
    with open(tmp_path / "open.txt", "w") as f:
        os.set_inheritable(f.fileno(), True)  # even one marked inheritable
        result = run_python(f"import os\ntry:\n    os.fstat({f.fileno()})\n    print('open')\nexcept OSError:\n"
                            f"    print('closed')\n", QUICK)
    assert result.stdout == "closed\n"


def test_output_is_cut_to_the_limit_with_a_marker():
    result = run_python("print('a' * 5000)", SandboxOptions(max_output_bytes=1000))
    assert result.stdout.startswith("a" * 1000) and "[... 4001 more bytes cut]" in result.stdout
    assert len(result.stdout) < 1100


def test_the_python_tool_returns_the_output_or_the_error():
    assert python("print(6 * 7)") == "42\n"
    failed = python("raise ValueError('no')")
    assert "ValueError: no" in failed and failed.endswith("[the program exited with code 1]")


def test_the_code_cannot_make_zenalign_read_a_file_back_to_it(tmp_path):
    """Its output is read from files with no name: links it plants in its directory are never
    followed (a file only zenalign's user may read stays unread)."""
    private = tmp_path / "private"
    private.mkdir(mode=0o700)
    (private / "secret.txt").write_text("the secret")
    plant = (f"import os\nfor name in ('.stdout', '.stderr', 'out.txt'):\n"
             f"    os.symlink({str(private / 'secret.txt')!r}, name)\nprint('done')\n")
    result = run_python(plant, QUICK)
    assert result.stdout == "done\n" and "the secret" not in result.stdout + result.stderr


def test_a_wrapper_that_does_not_exist_is_one_line_naming_sandbox_command():
    with pytest.raises(RewardError, match=r"^sandbox: 'no-such-wrapper' could not be started \(No such file or "
                                          r"directory\); check sandbox.command"):
        run_python("print(1)", SandboxOptions(command=["no-such-wrapper", "--flag"]))

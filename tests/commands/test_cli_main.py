"""zenalign.commands.cli.main on its own, called in this process: what each way a command can end
prints and returns (tests/commands/test_cli.py runs the real command in subprocesses)."""

from __future__ import annotations

import signal

import pytest

from helpers import RECIPES, cli_in_process
from zenalign.commands import cli
from zenalign.errors import RecipeError
from zenalign.train.preemption import Stopped

QUICKSTART = str(RECIPES / "quickstart.yaml")


def test_validate_prints_one_line_and_returns_0():
    done = cli_in_process("validate", QUICKSTART, "grpo.kl_coef=0.02")
    assert done.returncode == 0 and done.stderr == ""
    assert done.stdout.startswith(f"{QUICKSTART}: valid (data: ") and done.stdout.count("\n") == 1


def test_a_zenalign_error_is_one_line_and_returns_2():
    done = cli_in_process("validate", QUICKSTART, "grpo.kl_coeff=0.02")
    assert done.returncode == 2 and done.stdout == ""
    assert done.stderr.startswith("zenalign: error: ") and done.stderr.count("\n") == 1
    assert "grpo.kl_coeff: unknown field" in done.stderr


def test_debug_shows_the_exception_itself(monkeypatch):
    with pytest.raises(RecipeError, match="kl_coeff"):
        cli.main(["validate", QUICKSTART, "grpo.kl_coeff=0.02", "--debug"])


def raises(exc):
    def handler(args):
        raise exc
    return handler


@pytest.mark.parametrize("exc, code, line", [
    (KeyboardInterrupt(), 130, "zenalign: interrupted"),
    (Stopped(signal.SIGTERM, 7), 143, "zenalign: stopped by SIGTERM at step 7; resume with --resume auto"),
    (Stopped(signal.SIGUSR1, 3), 128 + signal.SIGUSR1, "zenalign: stopped by SIGUSR1 at step 3; resume with --resume auto"),
], ids=["interrupt", "sigterm", "sigusr1"])
def test_an_interrupted_or_preempted_command_says_so_and_returns_its_code(monkeypatch, exc, code, line):
    monkeypatch.setattr(cli, "cmd_validate", raises(exc))
    done = cli_in_process("validate", QUICKSTART)
    assert done.returncode == code and done.stderr.strip() == line


def test_overrides_may_follow_options_and_unknown_options_are_usage_errors(monkeypatch):
    seen = []
    monkeypatch.setattr(cli, "cmd_run", lambda args: seen.append((args.quiet, args.overrides)) or 0)
    assert cli_in_process("run", QUICKSTART, "-q", "run.seed=3", "grpo.kl_coef=0").returncode == 0
    assert seen == [(True, ["run.seed=3", "grpo.kl_coef=0"])]
    done = cli_in_process("run", QUICKSTART, "--no-such-option")
    assert done.returncode == 2 and "unrecognized arguments: --no-such-option" in done.stderr

"""Issue 30, item 1: a run directory is zenalign's only if zenalign marked it, and zenalign never
removes, replaces or appends to a file it did not write."""

import json
from pathlib import Path

import pytest

from helpers import RECIPES, cli_in_process, run_cli
from zenalign.errors import RecipeError
from zenalign.recipe.loader import load_recipe
from zenalign.train.rundir import MARKER, RunDir

QUICKSTART = str(RECIPES / "quickstart.yaml")
ONE_STEP = ["run.steps=1", "run.eval_interval=0", "data.eval_size=4", "-q"]


def tree(root: Path) -> dict[str, str]:
    """Every file under ``root`` and its text."""
    return {p.relative_to(root).as_posix(): p.read_bytes().decode("utf-8", "replace")
            for p in sorted(root.rglob("*")) if p.is_file()}


def planted(root: Path) -> Path:
    """The issue's repro: a directory with someone else's files where a run's would go."""
    (root / "checkpoints").mkdir(parents=True)
    (root / "attempts").mkdir()
    (root / "checkpoints" / "important.ckpt").write_text("precious\n")
    (root / "run.log").write_text("mylog\n")
    (root / "attempts" / "a.txt").write_text("keep\n")
    return root


def test_resume_auto_refuses_a_directory_zenalign_did_not_write(tmp_path):
    """`--resume auto` on a directory with no checkpoint turned overwrite on and deleted
    checkpoints/important.ckpt, attempts/a.txt and run.log (exit 0). It is now refused, with or
    without run.overwrite (whose run would write into run.log and checkpoints/), and nothing changes."""
    out = planted(tmp_path / "x")
    before = tree(out)
    for extra in ([], ["run.overwrite=true"]):
        done = cli_in_process("run", QUICKSTART, *ONE_STEP, f"run.output_dir={out}", "--resume", "auto", *extra)
        assert done.returncode == 2, done.stderr
        message = done.stderr.strip().splitlines()[-1]
        assert message.startswith("zenalign: error: run.output_dir: ") and str(out) in message
        assert "is not a zenalign run" in message and "Traceback" not in done.stderr
        assert tree(out) == before


def test_a_run_may_start_beside_files_it_does_not_write_only_with_overwrite(tmp_path):
    out = tmp_path / "mine"
    out.mkdir()
    (out / "README.txt").write_text("my notes\n")
    with pytest.raises(RecipeError, match="is not empty \\(README.txt\\) and is not a zenalign run"):
        RunDir(out).check(overwrite=False)
    RunDir(out).check(overwrite=True)  # no clash: the run may start beside it
    RunDir(out).prepare(overwrite=True)
    assert (out / MARKER).is_file() and (out / "README.txt").read_text() == "my notes\n"


def test_overwrite_removes_only_what_a_run_wrote(tmp_path):
    """A zenalign run replaced with run.overwrite loses its own files; anything a user put beside
    them, inside its folders too, stays byte for byte."""
    out = tmp_path / "run"
    done = run_cli("run", QUICKSTART, *ONE_STEP, f"run.output_dir={out}")
    assert done.returncode == 0, done.stderr
    old_id = json.loads((out / MARKER).read_text())["run_id"]
    theirs = {"notes.txt": "mine\n", "checkpoints/important.ckpt": "precious\n", "attempts/a.txt": "keep\n",
              "final/README.md": "inside final/, which a run writes whole\n", "abandoned/keep.txt": "keep\n"}
    for name, text in theirs.items():
        (out / name).parent.mkdir(parents=True, exist_ok=True)
        (out / name).write_text(text)
    assert (out / "checkpoints" / "step-00000001").is_dir()

    done = cli_in_process("run", QUICKSTART, *ONE_STEP, f"run.output_dir={out}")  # without overwrite: refused
    assert done.returncode == 2 and "already holds a run" in done.stderr

    RunDir(out).prepare(overwrite=True)
    left = tree(out)
    assert {k: v for k, v in left.items() if k != MARKER} == {k: v for k, v in theirs.items() if not k.startswith("final/")}
    assert json.loads(left[MARKER])["run_id"] != old_id  # a new run, a new identity


def test_the_identity_file_and_older_runs(tmp_path):
    out = tmp_path / "run"
    assert not RunDir(out).is_run()
    RunDir(out).prepare(overwrite=False)
    identity = json.loads((out / MARKER).read_text())
    assert len(identity["run_id"]) == 32 and RunDir(out).is_run()
    # a run started before the identity file existed: zenalign's attempts.jsonl marks it
    older = tmp_path / "older"
    older.mkdir()
    (older / "attempts.jsonl").write_text(json.dumps({"attempt": 1, "from_step": 0, "recipe": "attempts/001.yaml"}) + "\n")
    assert RunDir(older).is_run()
    (older / "attempts.jsonl").write_text('{"attempt": 1}\n')  # someone else's file of that name
    assert not RunDir(older).is_run()
    garbage = tmp_path / "garbage"
    garbage.mkdir()
    (garbage / MARKER).write_text("[1, 2]")
    assert not RunDir(garbage).is_run()


@pytest.mark.parametrize("value, expected", [
    ("", "run.output_dir: empty"),
    ("   ", "run.output_dir: empty"),
    ("/", "the file system's root"),
    ("FILE", "is an existing file"),
])
def test_output_dirs_that_cannot_hold_a_run_are_refused_at_validate(tmp_path, value, expected):
    if value == "FILE":
        value = str(tmp_path / "a-file")
        Path(value).write_text("x")
    with pytest.raises(RecipeError, match=expected):
        load_recipe(Path(QUICKSTART), [f"run.output_dir={value}"])
    done = cli_in_process("validate", QUICKSTART, f"run.output_dir={value}")
    assert done.returncode == 2 and expected in done.stderr and "Traceback" not in done.stderr

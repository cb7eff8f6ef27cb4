"""Checkpoints and exact resume (torch backend, CPU), in real subprocesses killed with SIGKILL.

A resume that is refused before any step runs calls the CLI in this process (``cli_in_process``:
the same exit code and output, without a new Python); every run that trains is a real process."""

import json
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from helpers import RECIPES, REPO, cli_in_process, kill_after, read, run_cli, start, without_timing
from zenalign.train import checkpoint as ckpt

COMMON = ["run.steps=10", "run.checkpoint_interval=2", "run.eval_interval=4", "data.eval_size=16",
          "run.log_interval=2", "run.progress_bar=false", "run.keep_checkpoints=2"]
QUICKSTART = str(RECIPES / "quickstart.yaml")


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("uninterrupted") / "run"
    done = run_cli("run", QUICKSTART, *COMMON, f"run.output_dir={out}")
    assert done.returncode == 0, done.stderr
    return out


def test_checkpoints_hold_what_resuming_needs(uninterrupted):
    found = ckpt.list_checkpoints(uninterrupted)
    assert [p.name for p in found] == ["step-00000008", "step-00000010"]  # keep_checkpoints=2
    latest = found[-1]
    state = ckpt.verify(latest)
    assert state["step"] == 10 and state["samples"] == 640
    assert state["sampler"] == {"epoch": 0, "index": 80}
    assert state["fingerprint"]["sampling.group_size"] == 8 and state["fingerprint"]["processes"] == 1
    for name in ("policy/model.safetensors", "policy/config.json", "engine/optimizer.pt", "rng/rank-00000.json",
                 "rng/rank-00000.safetensors", "recipe.yaml", "MANIFEST.json"):
        assert (latest / name).is_file(), name
    # the checkpoint's policy is a plain Hugging Face directory, equal to the final policy
    policy = AutoModelForCausalLM.from_pretrained(latest / "policy")
    final = load_file(str(uninterrupted / "final" / "model.safetensors"))
    for key, value in policy.state_dict().items():
        if key in final:
            assert torch.equal(value, final[key]), key
    # the optimizer state loads without unpickling code
    assert "optimizer" in torch.load(latest / "engine" / "optimizer.pt", weights_only=True)


@pytest.mark.slow
def test_resume_after_sigkill_matches_an_uninterrupted_run(tmp_path, uninterrupted):
    out = tmp_path / "run"
    steps_done = kill_after(start(QUICKSTART, *COMMON, f"run.output_dir={out}"), out / "metrics.jsonl", steps=5)
    assert steps_done < 10
    assert [p.name for p in ckpt.list_checkpoints(out)][-1] == "step-00000004"
    done = run_cli("run", QUICKSTART, *COMMON, f"run.output_dir={out}", "--resume", "auto")
    assert done.returncode == 0, done.stderr
    for name in ("metrics.jsonl", "eval.jsonl", "samples.jsonl"):
        assert without_timing(read(out / name)) == without_timing(read(uninterrupted / name)), name
    resumed, reference = load_file(str(out / "final" / "model.safetensors")), load_file(str(uninterrupted / "final" / "model.safetensors"))
    assert all(torch.equal(resumed[k], reference[k]) for k in reference)


def signal_after(process: subprocess.Popen, metrics: Path, steps: int, signum: int, timeout: float = 120) -> str:
    """Send ``signum`` once ``metrics`` holds ``steps`` lines; the process's stderr once it exits."""
    deadline = time.time() + timeout
    while not (metrics.exists() and len(metrics.read_text().splitlines()) >= steps):
        assert process.poll() is None, "the run ended before it could be signalled"
        assert time.time() < deadline
        time.sleep(0.01)
    process.send_signal(signum)
    _, stderr = process.communicate(timeout=timeout)
    return stderr


@pytest.mark.slow
@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT, signal.SIGUSR1], ids=["TERM", "INT", "USR1"])
def test_a_stop_signal_checkpoints_exits_cleanly_and_resumes_exactly(tmp_path, uninterrupted, signum):
    """Issue 30, item 2: SIGTERM exited -15 with no message, no checkpoint since the last
    periodic one and run.lock left behind. The step in progress now finishes, a checkpoint of it
    is written, the lock is released, one line says so and the exit code is 128 + the signal's
    number; --resume auto then ends exactly as the uninterrupted run."""
    out = tmp_path / "run"
    job = subprocess.Popen([sys.executable, "-m", "zenalign", "run", QUICKSTART, *COMMON, "run.checkpoint_interval=4",
                            f"run.output_dir={out}"], cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    stderr = signal_after(job, out / "metrics.jsonl", 5, signum)
    assert job.returncode == 128 + signum, stderr
    done = len(read(out / "metrics.jsonl"))
    assert 5 <= done < 10 and "Traceback" not in stderr
    assert stderr.strip().splitlines()[-1] == (f"zenalign: stopped by {signal.Signals(signum).name} at step {done}; "
                                               f"resume with --resume auto")
    assert not (out / "run.lock").exists()
    assert ckpt.list_checkpoints(out)[-1].name == f"step-{done:08d}"  # not only the periodic step-00000004
    assert ckpt.verify(ckpt.list_checkpoints(out)[-1])["step"] == done
    if signum != signal.SIGTERM:  # the same path after the signal: resuming is checked once
        return
    resumed = run_cli("run", QUICKSTART, *COMMON, f"run.output_dir={out}", "--resume", "auto")
    assert resumed.returncode == 0, resumed.stderr
    for name in ("metrics.jsonl", "eval.jsonl", "samples.jsonl"):
        assert without_timing(read(out / name)) == without_timing(read(uninterrupted / name)), name
    got, want = load_file(str(out / "final" / "model.safetensors")), load_file(str(uninterrupted / "final" / "model.safetensors"))
    assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want)


@pytest.mark.slow
def test_a_stop_signal_while_the_run_loads_stops_it_before_its_first_step(tmp_path, uninterrupted):
    """The signal arrives while the run builds its parts (it holds run.lock, no step has run): it
    stops before its first step, keeps nothing (a new run has nothing worth a checkpoint) and
    --resume auto starts it again, ending as the uninterrupted run."""
    out = tmp_path / "run"
    job = subprocess.Popen([sys.executable, "-m", "zenalign", "run", QUICKSTART, *COMMON, f"run.output_dir={out}"],
                           cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while not (out / "run.lock").exists():
        assert job.poll() is None and time.time() < deadline
        time.sleep(0.01)
    job.send_signal(signal.SIGTERM)
    _, stderr = job.communicate(timeout=120)
    assert job.returncode == 143, stderr
    assert stderr.strip().splitlines()[-1] == "zenalign: stopped by SIGTERM at step 0; resume with --resume auto"
    assert not (out / "metrics.jsonl").exists() and not ckpt.list_checkpoints(out) and not (out / "run.lock").exists()
    resumed = run_cli("run", QUICKSTART, *COMMON, f"run.output_dir={out}", "--resume", "auto")
    assert resumed.returncode == 0, resumed.stderr
    for name in ("metrics.jsonl", "eval.jsonl", "samples.jsonl"):
        assert without_timing(read(out / name)) == without_timing(read(uninterrupted / name)), name


def test_a_second_stop_signal_exits_at_once_and_releases_the_lock(tmp_path):
    """A reward that hangs holds the step open; the first SIGTERM waits for the step boundary, the
    second ends the process at once, with the lock released and nothing half-written."""
    hang = tmp_path / "hang.py"
    hang.write_text("import time\n\ndef fn(completions):\n    time.sleep(3600)\n")
    out = tmp_path / "run"
    job = subprocess.Popen([sys.executable, "-m", "zenalign", "run", QUICKSTART, "run.steps=3", "run.eval_interval=0",
                            "data.eval_size=4", f"run.output_dir={out}",
                            f"rewards=[{{type: python_function, name: hang, function: '{hang}:fn'}}]"],
                           cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while not (out / "attempts.jsonl").exists():  # the run holds its directory and is about to sample
        assert job.poll() is None, job.communicate()[1]
        assert time.time() < deadline
        time.sleep(0.05)
    time.sleep(1.0)
    job.send_signal(signal.SIGTERM)
    time.sleep(1.0)
    assert job.poll() is None  # still in the step, waiting for the hung reward
    job.send_signal(signal.SIGTERM)
    _, stderr = job.communicate(timeout=30)
    assert job.returncode == 128 + signal.SIGTERM, stderr
    assert "second SIGTERM: exiting at once" in stderr and not (out / "run.lock").exists()
    assert not list(out.glob("checkpoints/*"))  # no step finished: nothing to checkpoint, nothing half-written


@pytest.mark.slow
def test_rolling_back_abandons_the_later_timeline(tmp_path, uninterrupted):
    """Finding 5: a run of 10 steps (checkpoints 8, 10, final/) resumed from step 8 and killed at
    step 9; `--resume auto` then picked the abandoned step-10 checkpoint, so metrics.jsonl stopped
    at 9 and final/ held the abandoned weights. Resuming from step 8 now moves the later checkpoint,
    final/ and the later lines to abandoned/; auto-resume continues the new timeline."""
    out = copy_run(uninterrupted, tmp_path)
    old_final = load_file(str(out / "final" / "model.safetensors"))
    job = start(QUICKSTART, *COMMON, "run.steps=12", "run.checkpoint_interval=100", f"run.output_dir={out}",
                "--resume", str(out / "checkpoints" / "step-00000008"))
    deadline = time.time() + 120
    # The rewind to step 8 happens before step 9: wait until the attempt is recorded, which comes
    # after it. Until then metrics.jsonl still holds the abandoned lines 9 and 10, which
    # kill_after would count as this attempt's steps (it killed the run mid-rewind once).
    while len((out / "attempts.jsonl").read_text().splitlines()) < 2:
        assert job.poll() is None and time.time() < deadline
        time.sleep(0.01)
    assert (out / "abandoned").exists()
    assert kill_after(job, out / "metrics.jsonl", steps=9) < 12
    [aside] = (out / "abandoned").iterdir()
    assert aside.name.startswith("after-step-00000008-")
    assert [p.name for p in (aside / "checkpoints").iterdir()] == ["step-00000010"]
    assert [m["step"] for m in read(aside / "metrics.jsonl")] == [9, 10]
    moved = load_file(str(aside / "final" / "model.safetensors"))
    assert moved.keys() == old_final.keys() and all(torch.equal(moved[k], old_final[k]) for k in moved)
    assert [p.name for p in ckpt.list_checkpoints(out)] == ["step-00000008"]
    done = run_cli("run", QUICKSTART, *COMMON, f"run.output_dir={out}", "--resume", "auto")
    assert done.returncode == 0, done.stderr
    assert "resuming from" in done.stderr and "step-00000008" in done.stderr
    for name in ("metrics.jsonl", "eval.jsonl", "samples.jsonl"):  # the same seed and recipe: the same timeline again
        assert without_timing(read(out / name)) == without_timing(read(uninterrupted / name)), name
    assert [line["from_step"] for line in read(out / "attempts.jsonl")] == [0, 8, 8]
    assert sorted(p.name for p in (out / "attempts").iterdir()) == ["001.yaml", "002.yaml", "003.yaml"]
    assert "steps: 12" in (out / "attempts" / "002.yaml").read_text()  # what the abandoned attempt ran with


def test_a_changed_learning_rate_is_applied_on_resume_and_said(tmp_path, uninterrupted):
    """Finding 6: a changed grpo.learning_rate was silently replaced by the checkpoint's."""
    out = copy_run(uninterrupted, tmp_path)
    done = run_cli("run", QUICKSTART, *COMMON, "run.steps=12", "grpo.learning_rate=2.5e-3", f"run.output_dir={out}",
                   "--resume", "auto")
    assert done.returncode == 0, done.stderr
    assert "grpo.learning_rate changed on resume: 0.001 -> 0.0025" in done.stderr
    assert [m["lr"] for m in read(out / "metrics.jsonl")] == [1e-3] * 10 + [2.5e-3] * 2  # constant schedule
    assert "learning_rate: 0.0025" in (out / "recipe.yaml").read_text()
    assert "learning_rate: 0.001" in (out / "attempts" / "001.yaml").read_text()


def test_resume_with_the_same_config_but_other_weights_is_refused(tmp_path, uninterrupted):
    """Finding 6: the fingerprint compared four config.json fields, so another model of the same
    architecture was accepted. A sampled hash of the weight files now tells them apart."""
    from helpers import REVERSE_POLICY

    other = tmp_path / "other-policy"
    shutil.copytree(REVERSE_POLICY, other)
    weights = other / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[len(data) * 5 // 64 + 100] ^= 0x01  # one bit of one weight
    weights.write_bytes(bytes(data))
    out = copy_run(uninterrupted, tmp_path)
    before = snapshot(out)
    message = error_of(run_cli("run", QUICKSTART, *COMMON, f"model.path={other}", f"model.reference_path={REVERSE_POLICY}",
                               f"run.output_dir={out}", "--resume", "auto"))
    assert "the model's weights (sampled sha256)" in message and "start a new run" in message
    assert snapshot(out) == before


KILLER_PLUGIN = '''
"""A group z-score normalizer with state, that SIGKILLs its own process while the checkpoint of
step 4 is being written (once: it leaves a marker file)."""
import os, signal
from pathlib import Path
from zenalign import NormalizerType, Options, hookimpl
from zenalign.plugins.advantages import combine_objectives, standardize_groups

MARKER = Path(__file__).with_name("killed-once")

class CountingZScore:
    def __init__(self):
        self.calls = 0
    def __call__(self, rewards, objectives):
        self.calls += 1
        return standardize_groups(combine_objectives(rewards, objectives.weights), 1e-6)
    def state_dict(self):
        if self.calls == 4 and not MARKER.exists():
            MARKER.touch()
            os.kill(os.getpid(), signal.SIGKILL)
        return {"calls": self.calls}
    def load_state_dict(self, state):
        self.calls = state["calls"]

@hookimpl
def zenalign_normalizer_types():
    return [NormalizerType("counting_zscore", Options, CountingZScore)]
'''


@pytest.mark.slow
def test_kill_during_a_checkpoint_write_leaves_the_previous_one_loadable(tmp_path, uninterrupted):
    plugin = tmp_path / "killer.py"
    plugin.write_text(KILLER_PLUGIN)
    out = tmp_path / "run"
    args = [*COMMON, f"run.output_dir={out}", f"plugins=[{plugin}]", "normalizer.type=counting_zscore"]
    done = run_cli("run", QUICKSTART, *args)
    assert done.returncode == -signal.SIGKILL
    root = out / "checkpoints"
    assert sorted(p.name for p in root.iterdir()) == [".tmp-step-00000004", "step-00000002"]
    assert ckpt.verify(root / "step-00000002")["step"] == 2
    assert ckpt.find_checkpoint("auto", out) == root / "step-00000002"
    done = run_cli("run", QUICKSTART, *args, "--resume", "auto")
    assert done.returncode == 0, done.stderr
    # the same numbers as the run with the built-in normalizer, and the plugin's state carried over
    assert without_timing(read(out / "metrics.jsonl")) == without_timing(read(uninterrupted / "metrics.jsonl"))
    assert json.loads((root / "step-00000010" / "plugins" / "normalizer" / "state.json").read_text()) == {"calls": 10}
    assert not (root / ".tmp-step-00000004").exists()


# ---------------------------------------------------------------------------------------------- errors

def error_of(done) -> str:
    assert done.returncode == 2, done.stderr
    assert "Traceback" not in done.stderr
    lines = [line for line in done.stderr.splitlines() if line.startswith("zenalign: error:")]
    assert len(lines) == 1, done.stderr
    return lines[0]


def snapshot(path: Path) -> dict[str, bytes]:
    return {p.relative_to(path).as_posix(): p.read_bytes() for p in sorted(path.rglob("*")) if p.is_file()}


def copy_run(uninterrupted: Path, tmp_path: Path) -> Path:
    out = tmp_path / "run"
    shutil.copytree(uninterrupted, out)
    return out


def test_resume_from_a_missing_path(tmp_path):
    message = error_of(cli_in_process("run", QUICKSTART, f"run.output_dir={tmp_path / 'run'}", "--resume", str(tmp_path / "nope")))
    assert "--resume" in message and "does not exist" in message and "auto" in message


def test_resume_from_a_corrupt_checkpoint_changes_nothing(tmp_path, uninterrupted):
    out = copy_run(uninterrupted, tmp_path)
    weights = out / "checkpoints" / "step-00000010" / "policy" / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[len(data) // 2] ^= 0xFF
    weights.write_bytes(bytes(data))
    before = snapshot(out)
    message = error_of(cli_in_process("run", QUICKSTART, *COMMON, "run.steps=12", f"run.output_dir={out}", "--resume", "auto"))
    assert "step-00000010' is corrupt: policy/model.safetensors does not match its manifest" in message
    assert snapshot(out) == before


def test_resume_from_an_incomplete_checkpoint(tmp_path, uninterrupted):
    out = copy_run(uninterrupted, tmp_path)
    (out / "checkpoints" / "step-00000010" / "MANIFEST.json").unlink()
    message = error_of(cli_in_process("run", QUICKSTART, *COMMON, f"run.output_dir={out}", "--resume",
                               str(out / "checkpoints" / "step-00000010")))
    assert "incomplete checkpoint" in message


@pytest.mark.parametrize("override, expected", [
    ("sampling.group_size=4", "sampling.group_size = 8; this run has 4"),
    ("grpo.prompts_per_step=4", "grpo.prompts_per_step = 8; this run has 4"),
    ("normalizer.type=rank", "normalizer.type = group_zscore; this run has rank"),
    ("filters=[{type: mask_truncated}]", "filters = []; this run has [{'type': 'mask_truncated'}]"),
    ("rewards=[{type: exact_answer, name: accuracy, case_sensitive: false}]", "'case_sensitive': False"),
])
def test_resume_with_a_different_recipe_is_refused(tmp_path, uninterrupted, override, expected):
    out = copy_run(uninterrupted, tmp_path)
    before = snapshot(out)
    message = error_of(cli_in_process("run", QUICKSTART, *COMMON, override, f"run.output_dir={out}", "--resume", "auto"))
    assert expected in message and "start a new run" in message
    assert snapshot(out) == before


def test_resume_with_a_different_model_is_refused(tmp_path, uninterrupted, tiny_model_dir):
    out = copy_run(uninterrupted, tmp_path)
    before = snapshot(out)
    message = error_of(cli_in_process("run", QUICKSTART, *COMMON, f"model.path={tiny_model_dir}", "model.reference_path=null",
                               f"run.output_dir={out}", "--resume", "auto"))
    assert "the model (config.json)" in message
    assert snapshot(out) == before


def test_export_copies_a_plain_policy(tmp_path, uninterrupted):
    done = run_cli("export", str(uninterrupted), str(tmp_path / "exported"))
    assert done.returncode == 0, done.stderr
    AutoModelForCausalLM.from_pretrained(tmp_path / "exported")
    message = error_of(run_cli("export", str(uninterrupted), str(tmp_path / "exported")))
    assert "already exists and is not empty" in message


# ---------------------------------------------------------------------------------------------- issue 15

def write_lock(out: Path, pid: int) -> Path:
    import socket

    out.mkdir(parents=True, exist_ok=True)
    lock = out / "run.lock"
    lock.write_text(json.dumps({"pid": pid, "host": socket.gethostname(), "since": "2026-11-30 12:00:00"}))
    return lock


def test_a_second_run_on_a_directory_in_use_is_refused(tmp_path, uninterrupted):
    """Finding 4: two runs on one directory duplicated steps. A live process's lock (this test's
    own pid stands for it) refuses the second run, which changes nothing."""
    import os

    out = copy_run(uninterrupted, tmp_path)
    write_lock(out, os.getpid())
    before = snapshot(out)
    message = error_of(cli_in_process("run", QUICKSTART, *COMMON, "run.steps=12", f"run.output_dir={out}", "--resume", "auto"))
    assert f"is in use by process {os.getpid()}" in message and "remove" in message and "run.lock" in message
    assert snapshot(out) == before


def test_a_lock_left_by_a_dead_process_is_taken_over_and_released(tmp_path):
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    out = tmp_path / "run"
    write_lock(out, dead.pid)
    done = run_cli("run", QUICKSTART, "run.steps=2", "run.eval_interval=0", "data.eval_size=8", f"run.output_dir={out}",
                   "run.overwrite=true", "-q")
    assert done.returncode == 0, done.stderr
    assert "taking over" in done.stderr and not (out / "run.lock").exists()
    assert len(read(out / "metrics.jsonl")) == 2


def test_a_real_second_run_is_refused_while_the_first_runs(tmp_path):
    out = tmp_path / "run"
    first = subprocess.Popen([sys.executable, "-m", "zenalign", "run", QUICKSTART, "run.steps=400", "run.eval_interval=0",
                              "data.eval_size=8", f"run.output_dir={out}", "-q"], cwd=REPO,
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 120
        while not (out / "metrics.jsonl").exists():
            assert first.poll() is None and time.time() < deadline
            time.sleep(0.05)
        message = error_of(run_cli("run", QUICKSTART, "run.steps=400", f"run.output_dir={out}", "--resume", "auto"))
        assert f"in use by process {first.pid}" in message
    finally:
        first.kill()
        first.wait()


def test_resume_auto_before_the_first_checkpoint_starts_fresh(tmp_path):
    """Finding 7: a run killed before its first checkpoint refused `--resume auto` ("already holds
    a run"). It now starts again, replacing the unfinished attempt's files."""
    from zenalign.train.rundir import RunDir

    out = tmp_path / "run"
    RunDir(out).prepare(overwrite=False)  # what a run writes when it starts: its identity file
    (out / "metrics.jsonl").write_text(json.dumps({"step": 1, "samples": 64, "reward_mean": 0.5}) + "\n")
    (out / "recipe.yaml").write_text("model: {}\n")
    done = run_cli("run", QUICKSTART, "run.steps=2", "run.eval_interval=0", "data.eval_size=8", f"run.output_dir={out}",
                   "--resume", "auto", "-q")
    assert done.returncode == 0, done.stderr
    assert [m["step"] for m in read(out / "metrics.jsonl")] == [1, 2] and "reward_std" in read(out / "metrics.jsonl")[0]


def test_resume_auto_never_overwrites_a_finished_run_without_checkpoints(tmp_path, uninterrupted):
    out = copy_run(uninterrupted, tmp_path)
    shutil.rmtree(out / "checkpoints")
    before = snapshot(out)
    message = error_of(cli_in_process("run", QUICKSTART, *COMMON, f"run.output_dir={out}", "--resume", "auto"))
    assert "already holds a run" in message and snapshot(out) == before


def test_resume_into_a_directory_that_does_not_exist(tmp_path, uninterrupted):
    """Finding 9: FileNotFoundError in rundir.py. A checkpoint resumed into a new directory continues there."""
    out = tmp_path / "new" / "run"
    done = run_cli("run", QUICKSTART, *COMMON, "run.steps=12", f"run.output_dir={out}", "--resume",
                   str(uninterrupted / "checkpoints" / "step-00000010"))
    assert done.returncode == 0, done.stderr
    assert [m["step"] for m in read(out / "metrics.jsonl")] == [11, 12]


def test_resume_of_another_runs_checkpoint_into_an_existing_run_needs_overwrite(tmp_path, uninterrupted):
    """Finding 6: `--resume runA/ckpt` into run B replaced B's later metrics without run.overwrite."""
    other = copy_run(uninterrupted, tmp_path / "b")
    before = snapshot(other)
    args = ["run", QUICKSTART, *COMMON, "run.steps=12", f"run.output_dir={other}", "--resume",
            str(uninterrupted / "checkpoints" / "step-00000008")]
    message = error_of(run_cli(*args))
    assert "already holds a run" in message and "run.overwrite=true" in message
    assert snapshot(other) == before
    done = run_cli(*args, "run.overwrite=true")
    assert done.returncode == 0, done.stderr
    assert [m["step"] for m in read(other / "metrics.jsonl")] == [9, 10, 11, 12]  # B's own history is replaced


class Payload:
    """What a planted pickle would run on load (here it only records that it ran)."""

    def __reduce__(self):
        return (print, ("PAYLOAD RAN",))


def test_an_optimizer_state_holding_pickled_code_is_refused(tmp_path, uninterrupted):
    """Finding 9 (and 3, torch backend): a pickle in optimizer.pt gave a 29-line traceback. It is
    refused with one line, nothing it holds runs, and the run is untouched."""
    out = copy_run(uninterrupted, tmp_path)
    checkpoint = out / "checkpoints" / "step-00000010"
    torch.save({"optimizer": Payload(), "scheduler": {}}, checkpoint / "engine" / "optimizer.pt")
    (checkpoint / "MANIFEST.json").unlink()
    ckpt.write_manifest(checkpoint)  # an attacker who can write the file can rewrite the manifest too
    before = snapshot(out)
    done = run_cli("run", QUICKSTART, *COMMON, "run.steps=12", f"run.output_dir={out}", "--resume", "auto")
    message = error_of(done)
    assert "optimizer.pt' could not be read as plain tensors" in message and "never unpickles code" in message
    assert "PAYLOAD RAN" not in done.stdout + done.stderr
    assert snapshot(out) == before
    # issue 30, item 4: nothing printed before the one line (torch's warnings), and not torch's advice
    # to load the file with weights_only=False, which would run the code
    assert done.stderr.strip().splitlines()[-1] == message and "Warning" not in done.stderr
    assert "Unsupported global: GLOBAL print was not an allowed global" in message and "weights_only" not in message


# ---------------------------------------------------------------------------------------------- issue 30, item 4

LATEST = "checkpoints/step-00000010"


def resign(checkpoint: Path) -> None:
    """Rewrite the manifest over what the checkpoint now holds: whoever can change a file can."""
    (checkpoint / "MANIFEST.json").unlink()
    ckpt.write_manifest(checkpoint)


def edit_manifest(checkpoint: Path, change) -> None:
    manifest = json.loads((checkpoint / "MANIFEST.json").read_text())
    change(manifest)
    (checkpoint / "MANIFEST.json").write_text(json.dumps(manifest))


@pytest.mark.parametrize("change, expected", [
    (lambda m: m.update(files={}), "'files' must map every file of the checkpoint to its size and sha256 (found dict (empty))"),
    (lambda m: m.update(files=["policy/config.json"]), "'files' must map every file of the checkpoint to its size and sha256 (found list)"),
    (lambda m: m["files"].update({"recipe.yaml": "abc"}), "the entry of 'recipe.yaml' must be {\"bytes\": int, \"sha256\": str} (found 'abc')"),
    (lambda m: m["files"]["recipe.yaml"].update(bytes="12"), "the entry of 'recipe.yaml' must be"),
    (lambda m: m["files"].pop("recipe.yaml"), "holds recipe.yaml, which its MANIFEST.json does not list"),
    (lambda m: m["files"].update({"../../etc/passwd": {"bytes": 1, "sha256": "0" * 64}}), "../../etc/passwd is missing"),
], ids=["empty", "list", "entry-not-a-dict", "bytes-not-an-int", "entry-missing", "outside"])
def test_a_manifest_must_list_exactly_the_checkpoints_files(tmp_path, uninterrupted, change, expected):
    """An empty `files` map passed verification (nothing to check), a file missing from the map was
    never checked, and a malformed map was a TypeError/AttributeError traceback."""
    out = copy_run(uninterrupted, tmp_path)
    edit_manifest(out / LATEST, change)
    with pytest.raises(ckpt.ModelLoadError) as err:
        ckpt.verify(out / LATEST)
    assert expected in str(err.value) and "\n" not in str(err.value)


def test_a_file_the_manifest_does_not_list_is_refused(tmp_path, uninterrupted):
    out = copy_run(uninterrupted, tmp_path)
    (out / LATEST / "engine" / "extra.pt").write_bytes(b"planted")
    message = error_of(cli_in_process("run", QUICKSTART, *COMMON, "run.steps=12", f"run.output_dir={out}", "--resume", "auto"))
    assert "holds engine/extra.pt, which its MANIFEST.json does not list" in message


def test_symbolic_links_in_or_as_a_checkpoint_are_refused(tmp_path, uninterrupted):
    """A link inside was followed; a checkpoint directory that was itself a link was reported as
    "already holds a run"."""
    out = copy_run(uninterrupted, tmp_path)
    checkpoint = out / LATEST
    rng = checkpoint / "rng" / "rank-00000.json"
    elsewhere = tmp_path / "elsewhere.json"
    shutil.move(rng, elsewhere)
    rng.symlink_to(elsewhere)
    resign(checkpoint)
    with pytest.raises(ckpt.ModelLoadError, match="holds a symbolic link \\(rng/rank-00000.json\\); zenalign never writes one"):
        ckpt.verify(checkpoint)

    linked = copy_run(uninterrupted, tmp_path / "b")
    real = tmp_path / "real-step"
    shutil.move(linked / LATEST, real)
    (linked / LATEST).symlink_to(real, target_is_directory=True)
    before = snapshot(linked)
    message = error_of(cli_in_process("run", QUICKSTART, *COMMON, "run.steps=12", f"run.output_dir={linked}", "--resume", "auto"))
    assert f"checkpoint '{linked / LATEST}' is a symbolic link" in message and "already holds" not in message
    assert snapshot(linked) == before


def test_resuming_a_finished_run_writes_nothing(tmp_path, uninterrupted):
    """A no-op resume rewrote the newest checkpoint (signing the run's recipe.yaml, which it had not
    verified) and final/."""
    out = copy_run(uninterrupted, tmp_path)
    before = {p: (p.stat().st_mtime_ns, p.read_bytes()) for p in sorted(out.rglob("*")) if p.is_file()}
    done = cli_in_process("run", QUICKSTART, *COMMON, f"run.output_dir={out}", "--resume", "auto")
    assert done.returncode == 0, done.stderr
    assert "the run finished at step 10 already" in done.stderr and "eval accuracy:" in done.stdout
    assert {p: (p.stat().st_mtime_ns, p.read_bytes()) for p in sorted(out.rglob("*")) if p.is_file()} == before


def bomb(path: Path) -> None:
    """A safetensors file whose header claims 1 TiB."""
    import struct

    path.write_bytes(struct.pack("<Q", 1 << 40) + b'{"torch": {}}')


@pytest.mark.parametrize("damage, expected", [
    (lambda c: (c / "rng/rank-00000.json").write_text('{"python": 5}'), "rng/rank-00000.json and its .safetensors do not hold random states"),
    (lambda c: (c / "rng/rank-00000.json").write_text('[1, 2]'), "rng/rank-00000.json and its .safetensors do not hold random states"),
    (lambda c: bomb(c / "rng/rank-00000.safetensors"), "could not be read as safetensors (SafetensorError"),
    (lambda c: edit_trainer_state(c, sampler={"epoch": 0, "index": "abc"}), "sampler.index must be a whole number >= 0 (found 'abc')"),
    (lambda c: edit_trainer_state(c, sampler={"epoch": 0, "index": -5}), "sampler.index must be a whole number >= 0 (found -5)"),
    (lambda c: edit_trainer_state(c, step=None), "step must be a whole number >= 0 (found None)"),
], ids=["python-5", "rng-list", "header-bomb", "index-abc", "index-negative", "step-null"])
def test_malformed_rng_or_sampler_state_is_one_line(tmp_path, uninterrupted, damage, expected):
    out = copy_run(uninterrupted, tmp_path)
    damage(out / LATEST)
    resign(out / LATEST)
    before = snapshot(out)
    message = error_of(cli_in_process("run", QUICKSTART, *COMMON, "run.steps=12", f"run.output_dir={out}", "--resume", "auto"))
    assert expected in message
    assert snapshot(out) == before


def edit_trainer_state(checkpoint: Path, **fields) -> None:
    state = json.loads((checkpoint / "trainer_state.json").read_text())
    state.update(fields)
    (checkpoint / "trainer_state.json").write_text(json.dumps(state))


NAN_RUN = ["grpo.learning_rate=1.0e+10", "engine.max_grad_norm=null", "run.eval_interval=0", "data.eval_size=8", "-q"]


def test_a_run_that_turns_nan_stops_before_writing_nan_weights(tmp_path):
    """Finding 2: `grpo.learning_rate=1e10 engine.max_grad_norm=null` wrote 38 of 38 NaN tensors to
    final/ and both checkpoints, with exit 0. The NaN loss of step 2 now stops the run (exit 2,
    one line naming the step and the quantity); the step-1 checkpoint stays, finite."""
    out = tmp_path / "run"
    message = error_of(run_cli("run", QUICKSTART, *NAN_RUN, "run.steps=8", "run.checkpoint_interval=1",
                               f"run.output_dir={out}"))
    assert "step 2: the loss is nan" in message and "engine.on_nonfinite: skip" in message
    assert [p.name for p in ckpt.list_checkpoints(out)] == ["step-00000001"]
    weights = load_file(str(out / "checkpoints" / "step-00000001" / "policy" / "model.safetensors"))
    assert all(torch.isfinite(t).all() for t in weights.values())
    assert not (out / "final").exists()


def test_on_nonfinite_skip_drops_the_step_and_counts_it(tmp_path):
    out = tmp_path / "run"
    done = run_cli("run", QUICKSTART, *NAN_RUN, "run.steps=4", "engine.on_nonfinite=skip", f"run.output_dir={out}")
    assert done.returncode == 0, done.stderr
    lines = read(out / "metrics.jsonl")
    assert [m["nonfinite_skipped"] for m in lines] == [0.0, 1.0, 1.0, 1.0]
    assert lines[0]["grad_norm"] > 0 and all(m["grad_norm"] is None for m in lines[1:])
    weights = load_file(str(out / "final" / "model.safetensors"))  # nothing non-finite was ever stepped in
    assert all(torch.isfinite(t).all() for t in weights.values())


def test_skip_is_refused_with_deepspeed():
    from zenalign.errors import RecipeError
    from zenalign.recipe.loader import load_recipe

    with pytest.raises(RecipeError, match="engine.on_nonfinite: skip needs engine.backend: torch"):
        load_recipe(QUICKSTART, ["engine.backend=deepspeed", "engine.on_nonfinite=skip"])


# ---------------------------------------------------------------------------------------------- storage

@pytest.fixture
def small_disk(tmp_path):
    """A real 18 MiB file system (tmpfs): one 12 MiB checkpoint of the quickstart fits, two don't."""
    mount = tmp_path / "disk"
    mount.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=18m", "tmpfs", str(mount)], capture_output=True, text=True)
    if done.returncode != 0:
        pytest.skip(f"mounting a tmpfs needs root in a container that allows it ({done.stderr.strip()}); "
                    f"test_a_failed_write_is_a_storage_error covers the same path by injection")
    yield mount
    subprocess.run(["umount", "-l", str(mount)], capture_output=True)


@pytest.mark.slow
def test_a_full_disk_is_one_line_and_keeps_what_was_written(small_disk):
    """Finding 9: a full disk gave a traceback (safetensors' SafetensorError, torch.save's
    RuntimeError) and left the partial checkpoint filling the disk. Now: one line, exit 2, the
    step-2 checkpoint intact, the partial step-4 one removed, the lock released; after space is
    freed, --resume auto finishes the run."""
    out = small_disk / "run"
    args = ["run.steps=6", "run.checkpoint_interval=2", "run.keep_checkpoints=3", "run.eval_interval=0",
            "data.eval_size=8", "-q", f"run.output_dir={out}"]
    message = error_of(run_cli("run", QUICKSTART, *args))
    assert f"cannot write the run in '{out}'" in message and "No space left on device" in message
    assert "--resume auto" in message
    assert [p.name for p in ckpt.list_checkpoints(out)] == ["step-00000002"]
    ckpt.verify(out / "checkpoints" / "step-00000002")
    assert not list((out / "checkpoints").glob(".tmp-*")) and not (out / "run.lock").exists()
    assert [m["step"] for m in read(out / "metrics.jsonl")] == [1, 2, 3, 4]
    subprocess.run(["mount", "-o", "remount,size=64m", str(small_disk)], check=True)
    done = run_cli("run", QUICKSTART, *args, "--resume", "auto")
    assert done.returncode == 0, done.stderr
    assert [m["step"] for m in read(out / "metrics.jsonl")] == [1, 2, 3, 4, 5, 6]


def test_a_read_only_run_directory_is_one_line(small_disk):
    out = small_disk / "run"
    out.mkdir()
    subprocess.run(["mount", "-o", "remount,ro", str(small_disk)], check=True)
    message = error_of(run_cli("run", QUICKSTART, "run.steps=2", f"run.output_dir={out}"))
    assert f"run.output_dir: cannot write in '{out}': Read-only file system" in message


def test_a_failed_write_is_a_storage_error(tmp_path, monkeypatch):
    """The same path by injection, in-process (no mount needed): the second checkpoint's rng file
    hits ENOSPC."""
    import errno

    from zenalign import GRPOTrainer, load_recipe
    from zenalign.errors import StorageError

    real, calls = ckpt.save_file, []

    def save_file(tensors, path, *args, **kwargs):
        calls.append(path)
        if "step-00000004" in path:
            raise OSError(errno.ENOSPC, "No space left on device", path)
        return real(tensors, path, *args, **kwargs)

    monkeypatch.setattr(ckpt, "save_file", save_file)
    out = tmp_path / "run"
    loaded = load_recipe(QUICKSTART, ["run.steps=4", "run.checkpoint_interval=2", "run.eval_interval=0",
                                      "data.eval_size=8", "run.progress_bar=false", f"run.output_dir={out}"])
    with pytest.raises(StorageError, match=r"cannot write the run in .*No space left on device \(.*step-00000004"):
        GRPOTrainer.from_recipe(loaded).train()
    assert [p.name for p in ckpt.list_checkpoints(out)] == ["step-00000002"]
    assert not list((out / "checkpoints").glob(".tmp-*")) and not (out / "run.lock").exists()

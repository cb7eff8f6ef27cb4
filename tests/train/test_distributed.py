"""DeepSpeed ZeRO on CPU (DS_ACCELERATOR=cpu, gloo) and 2-process runs under torchrun and the
deepspeed launcher, against the torch backend on one process.

Tolerance: sampling is batch-invariant (zenalign.generation.gumbel), so every configuration samples the same
completions and must give *identical* rewards; losses, KL and gradient norms may differ only by
floating-point operation order: 1e-4 relative (plus 1e-7 absolute). The orders do differ: the
single-process torch run uses torch's fused AdamW and runs each group's prompt once
(engine.shared_prompts), while DeepSpeed steps its own AdamW and wrapped models run the plain
pass; over four steps that moves the KL by about 1e-5 relative.
"""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from helpers import RECIPES, REPO, free_port, launch, metrics, run_cli

sys.path.insert(0, str(REPO / "bench"))
from faults import rank_pid  # noqa: E402  (torchrun's worker of a rank, from /proc)

pytestmark = pytest.mark.slow

QUICKSTART = str(RECIPES / "quickstart.yaml")
COMMON = ["run.steps=4", "run.eval_interval=0", "data.eval_size=16", "run.progress_bar=false", "-q"]


def assert_same_run(got: list[dict], want: list[dict]) -> None:
    assert len(got) == len(want)
    for g, w in zip(got, want):
        assert (g["step"], g["samples"]) == (w["step"], w["samples"])
        for key in ("reward_mean", "reward_std", "zero_std_frac", "completion_len"):
            assert g[key] == w[key], (g["step"], key)
        for key in ("loss", "kl", "grad_norm"):
            assert g[key] == pytest.approx(w[key], rel=1e-4, abs=1e-7), (g["step"], key)


@pytest.fixture(scope="module")
def torch_run(tmp_path_factory) -> list[dict]:
    out = tmp_path_factory.mktemp("torch") / "run"
    done = run_cli("run", QUICKSTART, *COMMON, f"run.output_dir={out}")
    assert done.returncode == 0, done.stderr
    return metrics(out)


@pytest.mark.parametrize("stage", [0, 2, 3])
def test_deepspeed_single_process_matches_torch(tmp_path, torch_run, stage):
    out = tmp_path / "run"
    done = run_cli("run", QUICKSTART, *COMMON, "engine.backend=deepspeed", f"engine.zero_stage={stage}",
                   f"run.output_dir={out}")
    assert done.returncode == 0, done.stderr
    assert_same_run(metrics(out), torch_run)


@pytest.mark.parametrize("launcher, engine", [
    ("torchrun", ["engine.backend=torch"]),
    ("torchrun", ["engine.backend=deepspeed", "engine.zero_stage=2"]),
    ("deepspeed", ["engine.backend=deepspeed", "engine.zero_stage=2"]),
    ("deepspeed", ["engine.backend=deepspeed", "engine.zero_stage=3"]),
], ids=["torchrun-ddp", "torchrun-zero2", "deepspeed-zero2", "deepspeed-zero3"])
def test_two_processes_match_one(tmp_path, torch_run, launcher, engine):
    out = tmp_path / "run"
    args = ["run", QUICKSTART, *COMMON, *engine, f"run.output_dir={out}"]
    if launcher == "torchrun":
        done = launch(sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", free_port(),
                      "-m", "zenalign", *args)
    else:
        done = launch(shutil.which("deepspeed"), "--num_gpus", "2", "--master_port", free_port(), "--module", "zenalign", *args)
    assert done.returncode == 0, done.stderr[-3000:]
    got = metrics(out)
    assert_same_run(got, torch_run)
    assert done.stdout.count("run directory:") == 1  # rank 0 alone reports


def test_two_processes_leaving_out_zero_advantage_rows_match_one_running_every_row(tmp_path):
    """beta = 0: each rank leaves its zero-advantage completions out of the update (keeping one
    row per micro-batch, so both ranks run every backward pass and DDP's all-reduce pairs up);
    the run equals a single process that runs every row."""
    beta0 = ["grpo.kl_coef=0", "engine.micro_batch_size=8"]
    want_out, got_out = tmp_path / "one", tmp_path / "two"
    done = run_cli("run", QUICKSTART, *COMMON, *beta0, "engine.skip_zero_advantage=false", f"run.output_dir={want_out}")
    assert done.returncode == 0, done.stderr
    done = launch(sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", free_port(),
                  "-m", "zenalign", "run", QUICKSTART, *COMMON, *beta0, f"run.output_dir={got_out}")
    assert done.returncode == 0, done.stderr[-3000:]
    want = metrics(want_out)
    assert_same_run(metrics(got_out), want)
    assert any(m["zero_std_frac"] > 0 for m in want)  # there were rows to leave out


def two_runs(tmp_path, *options: str) -> tuple[list[dict], list[dict]]:
    """The quickstart with ``options`` on one process and under torchrun on two: (one, two)."""
    one, two = tmp_path / "one", tmp_path / "two"
    done = run_cli("run", QUICKSTART, *COMMON, *options, f"run.output_dir={one}")
    assert done.returncode == 0, done.stderr
    done = launch(sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", free_port(),
                  "-m", "zenalign", "run", QUICKSTART, *COMMON, *options, f"run.output_dir={two}")
    assert done.returncode == 0, done.stderr[-3000:]
    return metrics(one), metrics(two)


def test_two_processes_with_rollout_filters_match_one(tmp_path):
    """Dynamic sampling decides on the gathered rewards, so both ranks draw the same extra rounds;
    the groups kept are gathered as token rows and each rank rebuilds its half. The run equals
    one process doing it all."""
    want, got = two_runs(tmp_path, "filters=[{type: overlong_shaping, cache_length: 3}, "
                         "{type: dynamic_sampling, max_extra_rounds: 2}, {type: mask_truncated}]")
    assert_same_run(got, want)
    for g, w in zip(got, want):
        for key in ("filter/rounds", "filter/groups_dropped", "filter/groups_trained", "filter/masked_frac"):
            assert g[key] == w[key], (g["step"], key)
    assert any(m["filter/rounds"] > 1 for m in want)  # groups were dropped and refilled


def test_two_processes_take_the_entropy_quantile_over_both_ranks(tmp_path):
    """The threshold is over both ranks' tokens. Two steps only: a hard threshold amplifies the
    1e-7 differences between the two layouts' entropies once tokens with near-equal entropies
    straddle it, so later steps drift apart by more than the float tolerance (4e-4 in KL at step 4)."""
    want, got = two_runs(tmp_path, "grpo.top_entropy_quantile=0.5", "run.steps=2")
    assert_same_run(got, want)
    for g, w in zip(got, want):
        assert g["entropy_threshold"] == pytest.approx(w["entropy_threshold"], rel=1e-5)
        assert g["entropy"] == pytest.approx(w["entropy"], rel=1e-5)


def test_zero3_checkpoint_is_a_plain_policy_and_exports_from_shards(tmp_path):
    out = tmp_path / "run"
    done = run_cli("run", QUICKSTART, *COMMON, "run.steps=2", "engine.backend=deepspeed", "engine.zero_stage=3",
                   "engine.consolidate_checkpoints=false", f"run.output_dir={out}")
    assert done.returncode == 0, done.stderr
    checkpoint = out / "checkpoints" / "step-00000002"
    assert not (checkpoint / "policy" / "model.safetensors").exists()  # not consolidated: shards only
    exported = tmp_path / "exported"
    done = run_cli("export", str(checkpoint), str(exported))
    assert done.returncode == 0, done.stderr
    from transformers import AutoModelForCausalLM

    rebuilt = AutoModelForCausalLM.from_pretrained(exported).state_dict()
    final = load_file(str(out / "final" / "model.safetensors"))  # gathered at the end of the run
    for key, value in final.items():
        assert torch.equal(rebuilt[key], value), key


def test_deepspeed_resume_continues_the_run(tmp_path):
    out = tmp_path / "run"
    args = [*COMMON, "engine.backend=deepspeed", "engine.zero_stage=2", "run.checkpoint_interval=2", f"run.output_dir={out}"]
    assert run_cli("run", QUICKSTART, *args).returncode == 0
    uninterrupted = metrics(out)
    done = run_cli("run", QUICKSTART, *args, "--resume", str(out / "checkpoints" / "step-00000002"))
    assert done.returncode == 0, done.stderr
    assert_same_run(metrics(out), uninterrupted)


EXIT_SCRIPT = r"""
import atexit, sys
import torch.distributed as dist
from zenalign.commands.cli import main

given = sys.argv[1] == "given"
if given:
    dist.init_process_group("gloo", init_method="file://" + sys.argv[2], rank=0, world_size=1)
    group = dist.group.WORLD

def report():  # registered first, so it runs after what the run registered
    print("at exit:", dist.is_initialized() and (not given or dist.group.WORLD is group))
    if dist.is_initialized():
        dist.destroy_process_group()

atexit.register(report)
print("code", main(sys.argv[3:]), "after main:", dist.is_initialized())
"""


TERM_AT_STEP_2 = """import os, signal


def fn(completions, step):
    if step == 2:  # a preemption's SIGTERM, delivered while step 2 scores
        os.kill(os.getpid(), signal.SIGTERM)
    return [float(len(c)) for c in completions]
"""


@pytest.mark.parametrize("group, code, at_exit", [("joined", 0, "False"), ("given", 0, "True"), ("stopped", 143, "False")])
def test_a_run_destroys_the_process_group_it_joined_at_exit_and_keeps_one_it_was_given(tmp_path, group, code, at_exit):
    """A process that exits with its gloo group alive can abort in the interpreter's teardown
    ("terminate called without an active exception", SIGABRT) after a finished run, and a launcher
    then reports it failed. So `zenalign run` destroys the group it joined as the process exits,
    after a run that ended well or stopped on a signal (every process agreed, its checkpoint
    written); a group that existed before the command (a caller's) is left to the caller. DeepSpeed
    on one process joins a world of one."""
    args = ["run", QUICKSTART, *COMMON, "run.steps=1", "engine.backend=deepspeed", "engine.zero_stage=0",
            f"run.output_dir={tmp_path / 'run'}"]
    if group == "stopped":
        (tmp_path / "term.py").write_text(TERM_AT_STEP_2)
        args += ["run.steps=3", "rewards=[{type: python_function, function: " + str(tmp_path / "term.py") + ":fn}]"]
    done = subprocess.run([sys.executable, "-c", EXIT_SCRIPT, group, str(tmp_path / "store"), *args], cwd=REPO,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.splitlines()[-2:] == [f"code {code} after main: True", f"at exit: {at_exit}"]
    assert [m["step"] for m in metrics(tmp_path / "run")] == ([1, 2] if group == "stopped" else [1])


class Payload:
    """What a planted pickle would run on load (here it only records that it ran)."""

    def __reduce__(self):
        return (print, ("PAYLOAD RAN",))


def test_a_deepspeed_checkpoint_holding_pickled_code_is_refused_by_resume_and_export(tmp_path):
    """Issue 15, finding 3: DeepSpeed loads its files with torch.load(weights_only=False), so a
    payload planted in mp_rank_00_model_states.pt (manifest regenerated) ran on resume, and in
    export through zero_to_fp32. Both now refuse the file in one line and nothing runs."""
    from zenalign.train import checkpoint as ckpt

    out = tmp_path / "run"
    args = [*COMMON, "run.steps=2", "engine.backend=deepspeed", "engine.zero_stage=2",
            "engine.consolidate_checkpoints=false", f"run.output_dir={out}"]
    assert run_cli("run", QUICKSTART, *args).returncode == 0
    checkpoint = out / "checkpoints" / "step-00000002"
    target = checkpoint / "engine" / "zero" / "mp_rank_00_model_states.pt"
    state = torch.load(target, weights_only=False)  # our own file, written just now
    state["planted"] = Payload()
    torch.save(state, target)
    (checkpoint / "MANIFEST.json").unlink()
    ckpt.write_manifest(checkpoint)
    for command in (["run", QUICKSTART, *args, "run.steps=3", "--resume", "auto"],
                    ["export", str(checkpoint), str(tmp_path / "exported")]):
        done = run_cli(*command)
        assert done.returncode == 2
        lines = done.stderr.strip().splitlines()
        assert "mp_rank_00_model_states.pt' holds more than tensors and DeepSpeed's own state" in lines[-1]
        assert "Traceback" not in done.stderr
        assert "PAYLOAD RAN" not in done.stdout + done.stderr
    assert len(metrics(out)) == 2 and not (tmp_path / "exported").exists()


@pytest.mark.parametrize("stage, expected", [
    (0, "optimizer step 2: the gradient norm is nan; it was stopped before DeepSpeed stepped it"),
    (2, "step 2: the loss is nan"),  # ZeRO itself skips a step whose gradient norm is not finite
])
def test_a_deepspeed_run_that_turns_nan_stops_before_stepping_or_writing_it(tmp_path, stage, expected):
    """Issue 15, finding 2 under DeepSpeed: the NaN step is never taken (stage 0: zenalign checks the
    all-reduced norm before engine.step(); ZeRO: DeepSpeed's own overflow check), the run stops in one
    line, and the step-1 checkpoint stays finite."""
    from zenalign.train import checkpoint as ckpt

    out = tmp_path / "run"
    done = run_cli("run", QUICKSTART, "grpo.learning_rate=1.0e+10", "engine.max_grad_norm=null", "run.eval_interval=0",
                   "data.eval_size=8", "-q", "run.steps=4", "run.checkpoint_interval=1", "engine.backend=deepspeed",
                   f"engine.zero_stage={stage}", f"run.output_dir={out}")
    assert done.returncode == 2 and "Traceback" not in done.stderr
    assert expected in done.stderr.strip().splitlines()[-1]
    assert [p.name for p in ckpt.list_checkpoints(out)] == ["step-00000001"]
    weights = load_file(str(out / "checkpoints" / "step-00000001" / "policy" / "model.safetensors"))
    assert all(torch.isfinite(t).all() for t in weights.values())
    assert not (out / "final").exists()


def test_optimizer_offload_uses_deepspeeds_cpu_adam(tmp_path, torch_run):
    out = tmp_path / "run"
    done = run_cli("run", QUICKSTART, *COMMON, "run.steps=2", "engine.backend=deepspeed", "engine.zero_stage=2",
                   "engine.offload_optimizer=true", f"run.output_dir={out}")
    assert done.returncode == 0, done.stderr
    got = metrics(out)
    # DeepSpeed's CPU Adam is not bit-identical to torch's AdamW: same samples at step 1, close losses after
    assert got[0]["reward_mean"] == torch_run[0]["reward_mean"]
    assert got[1]["loss"] == pytest.approx(torch_run[1]["loss"], rel=1e-3, abs=1e-6)


ENGINES = {"ddp": ["engine.backend=torch"], "zero2": ["engine.backend=deepspeed", "engine.zero_stage=2"]}
TWO = ["run", QUICKSTART, "run.steps=6", "run.checkpoint_interval=2", "run.eval_interval=0", "data.eval_size=8",
       "run.progress_bar=false", "-q"]
TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2"]


@pytest.fixture(scope="module")
def two_process_runs(tmp_path_factory) -> dict[str, Path]:
    """The uninterrupted 2-process run of each engine, made once for the tests that interrupt it."""
    runs = {}
    for name, engine in ENGINES.items():
        runs[name] = tmp_path_factory.mktemp(name) / "whole"
        done = launch(*TORCHRUN, "--master_port", free_port(), "-m", "zenalign", *TWO, *engine,
                      f"run.output_dir={runs[name]}")
        assert done.returncode == 0, done.stderr[-3000:]
    return runs


@pytest.mark.parametrize("interrupt", ["sigkill-all", "sigterm-rank-1"])
@pytest.mark.parametrize("engine", list(ENGINES))
def test_two_processes_interrupted_and_resumed_match_the_uninterrupted_run(tmp_path, two_process_runs, engine, interrupt):
    """sigkill-all: torchrun and both workers killed. Both ranks must agree on whether to evaluate
    before resuming: rank 0 alone reads eval.jsonl, and a rank that evaluated while the other did
    not paired its collectives with the wrong ones (gloo: "Received data size doesn't match
    expected size"). sigterm-rank-1 (issue 30, item 2): a preemption signal that reaches one rank
    only; both ranks stop at the same step boundary with a checkpoint of it and exit 143."""
    import signal
    import time

    out = tmp_path / "run"
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    job = subprocess.Popen([*TORCHRUN, "--master_port", free_port(), "-m", "zenalign", *TWO, *ENGINES[engine],
                            f"run.output_dir={out}"], cwd=REPO, env=env, stdout=subprocess.DEVNULL,
                           stderr=subprocess.PIPE, text=True, start_new_session=True)
    deadline = time.time() + 300
    while not ((out / "metrics.jsonl").exists() and len((out / "metrics.jsonl").read_text().splitlines()) >= 3):
        assert job.poll() is None and time.time() < deadline, "the run ended before it could be interrupted"
        time.sleep(0.05)
    if interrupt == "sigkill-all":
        os.killpg(job.pid, signal.SIGKILL)
        job.wait()
    else:
        os.kill(rank_pid(job.pid, 1), signal.SIGTERM)
        _, stderr = job.communicate(timeout=300)
        stopped = len(metrics(out))
        assert f"zenalign: stopped by SIGTERM at step {stopped}; resume with --resume auto" in stderr
        assert "exitcode  : 143" in stderr  # torchrun's report of each worker
        assert json.loads((out / "checkpoints" / f"step-{stopped:08d}" / "trainer_state.json").read_text())["step"] == stopped
        assert not (out / "run.lock").exists()
    assert len(metrics(out)) < 6
    done = launch(*TORCHRUN, "--master_port", free_port(), "-m", "zenalign", *TWO, *ENGINES[engine],
                  f"run.output_dir={out}", "--resume", "auto")
    assert done.returncode == 0, done.stderr[-3000:]
    got, want = metrics(out), metrics(two_process_runs[engine])
    assert [m["step"] for m in got] == list(range(1, 7))
    for g, w in zip(got, want):  # the same process count and code path: equal, not just close
        for key in ("samples", "loss", "kl", "reward_mean", "reward_std", "reward_mean/accuracy", "grad_norm"):
            assert g[key] == w[key], (g["step"], key)


STOP_RANK_1 = '''
import os, signal

def fn(completions, step):
    if step == 2 and os.environ.get("RANK") == "1":
        os.kill(os.getpid(), signal.SIGSTOP)  # a rank that hangs
    return [float(len(c)) for c in completions]
'''


def test_a_hung_rank_ends_the_job_after_the_collective_timeout(tmp_path):
    """Issue 15, finding 10: a stopped rank hung the other and torchrun for gloo's 30 minutes.
    With engine.collective_timeout_s the waiting rank stops with one line, and the job ends."""
    import time

    (tmp_path / "stopper.py").write_text(STOP_RANK_1)
    reward = "rewards=[{type: python_function, function: " + str(tmp_path / "stopper.py") + ":fn}]"
    started = time.time()
    done = launch(sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", free_port(),
                  "-m", "zenalign", "run", QUICKSTART, *COMMON, reward, "engine.collective_timeout_s=5",
                  f"run.output_dir={tmp_path / 'run'}")
    assert done.returncode != 0
    assert time.time() - started < 240
    assert "zenalign: error: rank 0 of 2: a collective operation failed after waiting up to " \
           "engine.collective_timeout_s (5 s)" in done.stderr, done.stderr[-3000:]
    assert len(metrics(tmp_path / "run")) == 1  # step 1 was logged; step 2 never finished

"""Kill -9 and SIGTERM trials: a run killed or preempted at a random moment and continued with
``--resume auto`` must end exactly as an uninterrupted run (metrics, evals, samples, final weights).

    python bench/faults.py --trials 10 --write-trials 4 --two-process-trials 4 --sigterm-trials 4 \
        --two-process-sigterm-trials 4

Each trial starts the quickstart (10 steps, a checkpoint every 2) in its own process group, kills
the whole group with SIGKILL after a random delay drawn over the uninterrupted run's duration,
notes where it died (before the first checkpoint, while a checkpoint was being written, between
checkpoints), then runs ``--resume auto`` and compares. Write trials kill it the moment a
checkpoint starts being written. Two-process trials do the same under torchrun (DDP and
DeepSpeed ZeRO-2 alternately). SIGTERM trials send SIGTERM instead (two processes: to torchrun,
which forwards it, or to rank 1 alone, alternately) and also check that the run stopped by
itself, said so in one line and released run.lock. Prints one line per trial and a summary.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
QUICKSTART = str(REPO / "recipes" / "quickstart.yaml")
ARGS = ["run.steps=10", "run.checkpoint_interval=2", "run.eval_interval=4", "data.eval_size=16", "run.log_interval=2",
        "run.progress_bar=false", "run.keep_checkpoints=2", "-q"]
ENGINES = {"torch": [], "ddp": [], "zero2": ["engine.backend=deepspeed", "engine.zero_stage=2"]}


def command(out: Path, processes: int, engine: str, *extra: str) -> list[str]:
    launcher = [sys.executable, "-m", "zenalign"]
    if processes > 1:
        launcher = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(processes),
                    "--master_port", str(random.randint(20000, 40000)), "-m", "zenalign"]
    return [*launcher, "run", QUICKSTART, *ARGS, *ENGINES[engine], f"run.output_dir={out}", *extra]


def env() -> dict[str, str]:
    return dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")


def lines(path: Path) -> list[dict]:
    if not path.exists():
        return []
    drop = ("time/", "completions_per_s")
    return [{k: v for k, v in json.loads(line).items() if not k.startswith(drop)}
            for line in path.read_text().splitlines() if line.strip()]


def weights(path: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(str(path / "final" / "model.safetensors"))


def same_run(out: Path, whole: Path) -> str:
    for name in ("metrics.jsonl", "eval.jsonl", "samples.jsonl"):
        got, want = lines(out / name), lines(whole / name)
        if got != want:
            return f"{name} differs ({len(got)} vs {len(want)} lines)"
    a, b = weights(out), weights(whole)
    if a.keys() != b.keys() or any(not (a[k] == b[k]).all() for k in a):
        return "final weights differ"
    return ""


def where_killed(out: Path) -> str:
    root = out / "checkpoints"
    if root.is_dir() and any(root.glob(".tmp-*")):
        return "during a checkpoint write"
    if not root.is_dir() or not any(p.name.startswith("step-") for p in root.iterdir()):
        return "before the first checkpoint"
    return "between checkpoints"


def rank_pid(launcher: int, rank: int) -> int | None:
    """The pid of torchrun's worker of ``rank`` (from /proc)."""
    for status in Path("/proc").glob("[0-9]*/status"):
        try:
            ppid = int(next(line.split()[1] for line in status.read_text().splitlines() if line.startswith("PPid:")))
            environ = (status.parent / "environ").read_bytes().split(b"\0")
        except (OSError, StopIteration, ValueError):
            continue
        if ppid == launcher and f"RANK={rank}".encode() in environ:
            return int(status.parent.name)
    return None


def interrupt(job: subprocess.Popen, how: str) -> str:
    """SIGKILL the group, or SIGTERM the launcher or rank 1, and wait; for SIGTERM, what went wrong ('' if nothing)."""
    if how == "kill":
        os.killpg(job.pid, signal.SIGKILL)
        job.wait()
        return ""
    target = rank_pid(job.pid, 1) if how == "term-rank1" else job.pid
    os.kill(target or job.pid, signal.SIGTERM)
    try:
        job.wait(timeout=180)
    except subprocess.TimeoutExpired:
        os.killpg(job.pid, signal.SIGKILL)
        job.wait()
        return "did not stop within 180 s of SIGTERM"
    return ""


def trial(workdir: Path, whole: Path, duration: float, processes: int, engine: str, rng: random.Random,
          during_write: bool = False, how: str = "kill") -> dict:
    out = workdir / "run"
    shutil.rmtree(out, ignore_errors=True)
    delay = rng.uniform(0.15, 0.8) * duration  # the reference run also paid for its imports
    started = time.perf_counter()
    log = workdir / "stderr.txt"
    with log.open("w") as stderr:
        job = subprocess.Popen(command(out, processes, engine), cwd=REPO, env=env(), stdout=subprocess.DEVNULL,
                               stderr=stderr, start_new_session=True)
        if during_write:  # the moment a checkpoint (the first after `delay`) starts being written
            while job.poll() is None and not (time.perf_counter() - started > delay
                                              and any((out / "checkpoints").glob(".tmp-*"))):
                time.sleep(0.002)
            delay = time.perf_counter() - started
        else:
            time.sleep(delay)
        finished = job.poll() is not None
        where = "after it finished" if finished else where_killed(out)
        problem = "" if finished else interrupt(job, how)
    if how != "kill" and not finished and not problem:
        if "zenalign: stopped by SIGTERM at step" not in log.read_text():
            problem = f"no stop line (exit {job.returncode}): {log.read_text().strip()[-300:]}"
        elif (out / "run.lock").exists():
            problem = "run.lock left behind"
    steps = len(lines(out / "metrics.jsonl"))
    done = subprocess.run(command(out, processes, engine, "--resume", "auto"), cwd=REPO, env=env(),
                          capture_output=True, text=True, timeout=900)
    if done.returncode != 0:
        return {"delay": delay, "where": where, "steps": steps, "result": f"resume failed: {done.stderr.strip()[-300:]}"}
    return {"delay": delay, "where": where, "steps": steps, "result": problem or same_run(out, whole) or "identical"}


def uninterrupted(workdir: Path, processes: int, engine: str) -> tuple[Path, float]:
    out = workdir / f"whole-{processes}-{engine}"
    started = time.perf_counter()
    done = subprocess.run(command(out, processes, engine), cwd=REPO, env=env(), capture_output=True, text=True, timeout=900)
    if done.returncode != 0:
        sys.exit(f"the uninterrupted run failed: {done.stderr[-2000:]}")
    return out, time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--trials", type=int, default=10, help="single-process trials (torch backend)")
    parser.add_argument("--two-process-trials", type=int, default=4, help="torchrun trials, DDP and ZeRO-2 alternately")
    parser.add_argument("--write-trials", type=int, default=4,
                        help="single-process trials killed the moment a checkpoint starts being written")
    parser.add_argument("--sigterm-trials", type=int, default=0, help="single-process trials stopped with SIGTERM")
    parser.add_argument("--two-process-sigterm-trials", type=int, default=0,
                        help="torchrun trials stopped with SIGTERM (to torchrun, then to rank 1 alone, alternately)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    rng = random.Random(args.seed)
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(tmp)
        two = lambda i: "ddp" if i % 2 == 0 else "zero2"
        plan = ([(1, "torch", False, "kill")] * args.trials + [(1, "torch", True, "kill")] * args.write_trials
                + [(2, two(i), False, "kill") for i in range(args.two_process_trials)]
                + [(1, "torch", False, "term")] * args.sigterm_trials
                + [(2, two(i // 2), False, "term" if i % 2 == 0 else "term-rank1")
                   for i in range(args.two_process_sigterm_trials)])
        references = {}
        for processes, engine, during_write, how in plan:
            if (processes, engine) not in references:
                references[processes, engine] = uninterrupted(workdir, processes, engine)
            whole, duration = references[processes, engine]
            found = trial(workdir, whole, duration, processes, engine, rng, during_write, how)
            found.update(processes=processes, engine=engine, how=how)
            results.append(found)
            verb = {"kill": "killed", "term": "SIGTERM", "term-rank1": "SIGTERM to rank 1"}[how]
            print(f"{processes} process(es) {engine:5s} {verb} at {found['delay']:5.1f} s of {duration:4.1f} "
                  f"({found['where']}, {found['steps']} steps logged): {found['result']}", flush=True)
    for processes in (1, 2):
        for signalled in (False, True):
            mine = [r for r in results if r["processes"] == processes and (r["how"] != "kill") == signalled]
            if mine:
                good = sum(r["result"] == "identical" for r in mine)
                writes = sum(r["where"] == "during a checkpoint write" for r in mine)
                print(f"{processes} process(es), {'SIGTERM' if signalled else 'SIGKILL'}: {good} of {len(mine)} "
                      f"identical to the uninterrupted run ({writes} during a checkpoint write)")


if __name__ == "__main__":
    main()

"""The GPU check: every part of zenalign that takes another branch on a GPU, run in one command on
a bare GPU machine (one H200, no network, minutes at a time), with one JSON and one markdown table
of results.

    bash bench/gpu_wheels.sh                         # here, with network: the wheels the image lacks
    python3 bench/gpu_check.py OUT_DIR               # there, carrying bench/gpu_wheels
    python bench/gpu_check.py --dry-run OUT_DIR      # the same sequence on the CPU at toy sizes

Parts, in order, each in its own subprocess with its own timeout, under one deadline (7 minutes;
``--dry-run``: toy sizes, about a minute). A part that fails or times out is recorded with the
end of its output, and the next one runs; a part that no time is left for is recorded as skipped.

    install      the carried wheels (pip --no-index --no-deps; floors only where the image's
                 version is lower), then zenalign (pip install --no-deps -e .); the image's torch
                 and other packages are not touched; then every package is imported. Dry run:
                 checks that they are installed.
    pytest-gpu   python -m pytest -m gpu over the test files that hold device tests
    quickstart   recipes/quickstart.yaml on the device; it must learn as on the CPU (held-out
                 accuracy up by at least 0.5; the CPU's 0.020 -> 0.865). Dry run: 2 steps.
    shape-135m   bench/perf.py at the 135m shape, bf16, zenalign and TRL side by side, each with
                 its own generation: s/step, completions/s, peak GPU memory, MFU against the
                 GPU's measured bf16 matmul peak. Dry run: the 1m size on the CPU.
    qwen2-0.5b   bench/shape_05b.py: a Qwen2-0.5B-shaped model built in-process, one full step,
                 the update alone, the lean forward against transformers' SDPA forward.
    deepspeed    the quickstart for 3 steps on DeepSpeed ZeRO-2, one process (NCCL; gloo on a CPU).
    lora         recipes/quickstart-lora.yaml for 3 steps.
    lag          the quickstart for 4 steps with sampling.lag 1: the background sampler (a frozen
                 copy of the policy on the device, in a thread) beside the update.

OUT_DIR receives results.json, results.md and parts.log (every part's command and output).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
WHEELS = HERE / "gpu_wheels"
DEADLINE_S = 420  # the whole check, well inside the machine's 10 minutes a command
DRY_DEADLINE_S = 600  # a busy 2-core CI machine: each part's timeout doubled, under this
CARRIED = ("pydantic", "deepspeed", "datasets", "trl")  # imported after the install (trl and datasets: the benchmark)


@dataclass
class Part:
    """One part: the command (given the device, the dry-run flag and a scratch directory), its
    timeout, and what to read from its output files into the results (``figures``)."""

    name: str
    what: str
    command: Callable[[str, bool, Path], list[list[str]]]
    timeout_s: int
    figures: Callable[[Path, bool], dict] = lambda scratch, dry: {}
    result: dict = field(default_factory=dict)


def python() -> list[str]:
    return [sys.executable]


# ------------------------------------------------------------------------------------------- install

def install_commands(device: str, dry: bool, scratch: Path) -> list[list[str]]:
    if dry:  # the packages are installed here already: check that they are, without the imports' seconds
        return [python() + ["-c", IMPORT_CHECK.replace("importlib.import_module(name)", "md.distribution(name)")]]
    wheels = sorted(str(p) for p in WHEELS.glob("*.whl"))
    if not wheels:
        raise RuntimeError(f"no wheels in {WHEELS}: run bash bench/gpu_wheels.sh here first and carry that folder")
    pip = python() + ["-m", "pip", "install", "-q", "--no-index", "--no-deps", "--no-compile", "--root-user-action=ignore",
                      "--disable-pip-version-check"]
    commands = [pip + ["--find-links", str(WHEELS)] + wheels]
    commands += [pip + [str(floor)] for floor in sorted((WHEELS / "floors").glob("*.whl")) if _below_floor(floor)]
    commands.append(pip + ["--no-build-isolation", "-e", str(REPO)])  # zenalign itself, no dependency touched
    return commands + [python() + ["-c", IMPORT_CHECK]]


def _below_floor(wheel: Path) -> bool:
    """Whether the image's version of a floor wheel's package is older than the wheel's (or absent)."""
    from importlib.metadata import PackageNotFoundError, version

    from packaging.version import Version

    name, wanted = wheel.name.split("-")[:2]
    try:
        return Version(version(name.replace("_", "-"))) < Version(wanted)
    except PackageNotFoundError:
        return True


IMPORT_CHECK = """
import importlib, importlib.metadata as md, json, sys
found = {}
for name in ("torch", "transformers", "peft", "accelerate", "zenalign") + %r:
    try:
        importlib.import_module(name)
        found[name] = md.version(name)
    except Exception as error:
        found[name] = "missing: " + type(error).__name__ + ": " + str(error)[:200]
print("VERSIONS " + json.dumps(found))
sys.exit(1 if any(v.startswith("missing") for k, v in found.items() if k not in ("trl", "datasets")) else 0)
""" % (CARRIED,)


# ---------------------------------------------------------------------------------------------- runs

def cli_run(recipe: str, out: Path, device: str, *overrides: str) -> list[str]:
    """``zenalign run`` on the device, writing no checkpoint (a run's final policy only)."""
    return python() + ["-m", "zenalign", "run", recipe, f"run.output_dir={out}", f"engine.device={device}",
                       "run.overwrite=true", "run.checkpoint_interval=0", "-q", *overrides]


def quickstart_commands(device: str, dry: bool, scratch: Path) -> list[list[str]]:
    steps = ["run.steps=2", "run.eval_interval=0", "data.eval_size=16"] if dry else []
    return [cli_run("recipes/quickstart.yaml", scratch / "quickstart", device, *steps)]


def run_figures(run: Path, dry: bool, learning: bool = False) -> dict:
    """s/step, the last step's loss and gradient norm, and the held-out accuracy before and after."""
    metrics = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    evals = [json.loads(line) for line in (run / "eval.jsonl").read_text().splitlines()] if (run / "eval.jsonl").exists() else []
    times = sorted(sum(v for k, v in m.items() if k.startswith("time/")) for m in metrics[1:] or metrics)
    out = {"steps": len(metrics), "median_step_s": round(times[len(times) // 2], 4), "loss": metrics[-1].get("loss"),
           "grad_norm": metrics[-1].get("grad_norm"), "reward_mean_last": metrics[-1].get("reward_mean")}
    accuracy = [e.get("eval/reward_mean/accuracy", e.get("eval/reward_mean")) for e in evals]
    if accuracy:
        out["eval_accuracy"] = [accuracy[0], accuracy[-1]]
    if learning and not dry:
        out["learned"] = bool(accuracy) and accuracy[-1] - accuracy[0] >= 0.5  # the CPU: 0.020 -> 0.865
        if not out["learned"]:
            raise AssertionError(f"the quickstart did not learn as on the CPU: held-out accuracy {accuracy}")
    return out


def shape_135m_commands(device: str, dry: bool, scratch: Path) -> list[list[str]]:
    frameworks = "trl,zenalign" if _importable("trl") else "zenalign"
    # dry: the gate on one group (its per-sequence reference is most of a toy run's seconds on a CPU)
    size = ["--sizes", "1m", "--steps", "1", "--gate-prompts", "1"] if dry else ["--sizes", "135m", "--steps", "3"]
    return [python() + [str(HERE / "perf.py"), *size, "--repeats", "1", "--no-learning", "--precision", "bf16",
                        "--device", device, "--frameworks", frameworks, "--out", str(scratch / "perf.json")]]


def shape_135m_figures(scratch: Path, dry: bool) -> dict:
    """Per framework: s/step, completions/s, MFU (against the bf16 matmul peak measured in its own
    process), peak GPU memory and RSS, the mean completion length, zenalign's phases."""
    perf = json.loads((scratch / "perf.json").read_text())
    out = {}
    for size, pair in perf["throughput"].items():
        for framework, r in pair.items():
            keep = ("seconds_per_step", "completion_len", "peak_gpu_mb", "peak_rss_mb", "matmul_peak_gflops", "phases")
            out[f"{size}/{framework}"] = {"completions_per_s": perf["completions_per_s"][size][framework],
                                          "mfu": perf["mfu"][size][framework], **{k: r.get(k) for k in keep}}
        if {"trl", "zenalign"} <= set(pair):
            out[f"{size}/zenalign_over_trl"] = pair["trl"]["seconds_per_step"] / pair["zenalign"]["seconds_per_step"]
    return out


def shape_05b_commands(device: str, dry: bool, scratch: Path) -> list[list[str]]:
    return [python() + [str(HERE / "shape_05b.py"), "--device", device, "--out", str(scratch / "shape.json")]
            + (["--toy"] if dry else [])]


def shape_05b_figures(scratch: Path, dry: bool) -> dict:
    result = json.loads((scratch / "shape.json").read_text())
    return {k: result[k] for k in ("size", "parameters", "step", "update", "logprob_pass", "attn_implementation")}


def deepspeed_commands(device: str, dry: bool, scratch: Path) -> list[list[str]]:
    return [cli_run("recipes/quickstart.yaml", scratch / "zero2", device, "engine.backend=deepspeed",
                    "engine.zero_stage=2", "run.steps=3", "run.eval_interval=0", "data.eval_size=16")]


def lora_commands(device: str, dry: bool, scratch: Path) -> list[list[str]]:
    return [cli_run("recipes/quickstart-lora.yaml", scratch / "lora", device, "run.steps=3", "run.eval_interval=0",
                    "data.eval_size=16")]


def lag_commands(device: str, dry: bool, scratch: Path) -> list[list[str]]:
    return [cli_run("recipes/quickstart.yaml", scratch / "lag", device, "sampling.lag=1", "run.steps=4",
                    "run.eval_interval=0", "data.eval_size=16")]


def lag_figures(scratch: Path, dry: bool) -> dict:
    """run_figures, with the lag and the stale samples' log-prob gap of each step."""
    metrics = [json.loads(line) for line in (scratch / "lag" / "metrics.jsonl").read_text().splitlines()]
    return {**run_figures(scratch / "lag", dry), "policy_lag": [m["policy_lag"] for m in metrics],
            "sampler_logp_diff": [m["sampler/logp_diff"] for m in metrics]}


def pytest_commands(device: str, dry: bool, scratch: Path) -> list[list[str]]:
    return [python() + ["-m", "pytest", "-m", "gpu", "-q", "-p", "no:cacheprovider", f"--junitxml={scratch / 'junit.xml'}",
                        *device_test_files()]]


def device_test_files() -> list[str]:
    """The test files that hold gpu-marked tests (the marker, or tests/helpers.py's DEVICES):
    collecting the whole suite would import every test module for nothing."""
    return [path.relative_to(REPO).as_posix() for path in sorted((REPO / "tests").rglob("test_*.py"))
            if "mark.gpu" in path.read_text(encoding="utf-8") or "DEVICES" in path.read_text(encoding="utf-8")]


def pytest_figures(scratch: Path, dry: bool) -> dict:
    import xml.etree.ElementTree as ET

    suite = ET.parse(scratch / "junit.xml").getroot()
    suite = suite if suite.tag == "testsuite" else suite.find("testsuite")
    failed = [f"{case.get('classname')}::{case.get('name')}" for case in suite.iter("testcase")
              if case.find("failure") is not None or case.find("error") is not None]
    counts = {k: int(suite.get(k, 0)) for k in ("tests", "failures", "errors", "skipped")}
    return {**counts, "passed": counts["tests"] - counts["failures"] - counts["errors"] - counts["skipped"],
            "failed": failed}


PARTS = [
    Part("install", "carried wheels, then zenalign (--no-deps)", install_commands, 150),
    Part("pytest-gpu", "pytest -m gpu", pytest_commands, 180, pytest_figures),
    Part("quickstart", "recipes/quickstart.yaml on the device", quickstart_commands, 120,
         lambda scratch, dry: run_figures(scratch / "quickstart", dry, learning=True)),
    Part("shape-135m", "135m shape, bf16, zenalign and TRL side by side", shape_135m_commands, 180, shape_135m_figures),
    Part("qwen2-0.5b", "Qwen2-0.5B shape: step, update, lean vs SDPA forward", shape_05b_commands, 150,
         shape_05b_figures),
    Part("deepspeed", "DeepSpeed ZeRO-2, one process", deepspeed_commands, 120,
         lambda scratch, dry: run_figures(scratch / "zero2", dry)),
    Part("lora", "LoRA (quickstart-lora), 3 steps", lora_commands, 90, lambda scratch, dry: run_figures(scratch / "lora", dry)),
    Part("lag", "sampling.lag 1 (background sampler), 4 steps", lag_commands, 90, lag_figures),
]


def _importable(name: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(name) is not None


# ------------------------------------------------------------------------------------------- running

def run_part(part: Part, device: str, dry: bool, scratch: Path, log, remaining_s: float) -> dict:
    """Run the part's commands in turn (each stops the part if it fails), within its timeout
    (doubled in a dry run) and what is left of the deadline; read its figures. Never raises."""
    limit = min(part.timeout_s * (2 if dry else 1), remaining_s)
    started = time.monotonic()
    result = {"name": part.name, "what": part.what, "status": "ok", "seconds": 0.0, "figures": {}, "note": ""}
    if remaining_s < 10:
        result.update(status="skipped", note=f"no time left before the {int(remaining_s)} s deadline")
        return result
    env = dict(os.environ, PYTHONUNBUFFERED="1", TOKENIZERS_PARALLELISM="false", TRANSFORMERS_VERBOSITY="error",
               HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    if dry:
        env.setdefault("OMP_NUM_THREADS", "1")  # a busy 2-core CI machine: oversubscribed threads are slower
    output = ""
    try:
        for command in part.command(device, dry, scratch):
            left = limit - (time.monotonic() - started)
            log.write(f"\n===== {part.name}: {' '.join(command)}\n")
            log.flush()
            done = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=max(left, 1))
            output = done.stdout + done.stderr
            log.write(output)
            if "VERSIONS " in done.stdout:
                result["figures"]["versions"] = json.loads(done.stdout.split("VERSIONS ", 1)[1].splitlines()[0])
            if done.returncode != 0:
                result.update(status="failed", note=f"exit {done.returncode}: {_tail(output)}")
                break
        if result["status"] == "ok":
            result["figures"].update(part.figures(scratch, dry))
    except subprocess.TimeoutExpired as expired:
        text = (expired.stdout or b"").decode(errors="replace") + (expired.stderr or b"").decode(errors="replace") \
            if isinstance(expired.stdout, bytes) else (expired.stdout or "") + (expired.stderr or "")
        log.write(text)
        result.update(status="timeout", note=f"stopped after {limit:.0f} s: {_tail(text)}")
    except Exception as error:  # a part's own setup or its figures: recorded, the rest still run
        result.update(status="failed", note=f"{type(error).__name__}: {error}"[:600])
    result["seconds"] = round(time.monotonic() - started, 1)
    log.write(f"===== {part.name}: {result['status']} in {result['seconds']} s\n")
    log.flush()
    return result


def _tail(text: str, lines: int = 6) -> str:
    return " | ".join(line.strip() for line in text.strip().splitlines()[-lines:])[-800:]


def markdown(results: dict) -> str:
    lines = [f"# GPU check ({'dry run, CPU' if results['dry_run'] else results['device_name']}), {results['date']}", "",
             f"Total {results['wall_s']} s. torch {results['torch']}, Python {results['python']}.", "",
             "| part | status | s | what | figures or note |", "|---|---|---|---|---|"]
    for part in results["parts"]:
        detail = part["note"] or _brief(part["figures"])
        lines.append(f"| {part['name']} | {part['status']} | {part['seconds']} | {part['what']} | {detail} |")
    return "\n".join(lines) + "\n"


def _brief(figures: dict) -> str:
    """The figures as one table cell: nested dicts flattened to key=value, numbers rounded."""
    def flat(prefix: str, value) -> list[str]:
        if isinstance(value, dict):
            return [item for k, v in value.items() for item in flat(f"{prefix}{k}.", v)]
        if isinstance(value, float):
            value = f"{value:.4g}"
        return [f"{prefix[:-1]}={value}"]

    return "; ".join(flat("", figures)).replace("|", "/")[:1500]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out_dir", type=Path)
    parser.add_argument("--dry-run", action="store_true", help="the same sequence on the CPU at toy sizes")
    parser.add_argument("--parts", default=",".join(p.name for p in PARTS), help="a comma-separated subset")
    args = parser.parse_args()
    import torch

    device = "cpu" if args.dry_run else "cuda"
    if device == "cuda" and not torch.cuda.is_available():
        sys.exit("bench/gpu_check.py: torch sees no CUDA device here; --dry-run runs the same sequence on the CPU")
    args.out_dir.mkdir(parents=True, exist_ok=True)
    deadline = time.monotonic() + (DRY_DEADLINE_S if args.dry_run else DEADLINE_S)
    started = time.monotonic()
    chosen = args.parts.split(",")
    results = {"dry_run": args.dry_run, "device": device, "date": time.strftime("%Y-%m-%d %H:%M"),
               "device_name": torch.cuda.get_device_name(0) if device == "cuda" else "cpu", "torch": torch.__version__,
               "python": sys.version.split()[0], "parts": []}
    with tempfile.TemporaryDirectory(prefix="gpu-check-") as tmp, (args.out_dir / "parts.log").open("w") as log:
        for part in PARTS:
            if part.name not in chosen:
                continue
            scratch = Path(tmp) / part.name
            scratch.mkdir()
            print(f"gpu_check: {part.name} ...", flush=True)
            result = run_part(part, device, args.dry_run, scratch, log, deadline - time.monotonic())
            print(f"gpu_check: {part.name}: {result['status']} in {result['seconds']} s {result['note'][:300]}", flush=True)
            results["parts"].append(result)
            results["wall_s"] = round(time.monotonic() - started, 1)
            (args.out_dir / "results.json").write_text(json.dumps(results, indent=1))  # kept up to date part by part
    results["wall_s"] = round(time.monotonic() - started, 1)
    (args.out_dir / "results.json").write_text(json.dumps(results, indent=1))
    (args.out_dir / "results.md").write_text(markdown(results))
    print(markdown(results))
    return 0 if all(p["status"] == "ok" for p in results["parts"]) else 1


if __name__ == "__main__":
    sys.exit(main())

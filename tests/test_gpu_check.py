"""bench/gpu_check.py, the one command a GPU window runs: its parts are guarded (a failure or a
timeout is recorded and the next part runs; a part with no time left is skipped), and its dry run
runs the same sequence on the CPU at toy sizes and writes every part's status."""

from __future__ import annotations

import io
import json
import subprocess
import sys
import time

import pytest

from helpers import REPO

sys.path.insert(0, str(REPO / "bench"))

import gpu_check  # noqa: E402


def part(name: str, code: str, timeout_s: int = 30, figures=lambda scratch, dry: {"read": True}) -> gpu_check.Part:
    return gpu_check.Part(name, f"runs {code!r}", lambda device, dry, scratch: [[sys.executable, "-c", code]],
                          timeout_s, figures)


def test_a_part_that_fails_or_hangs_is_recorded_and_the_next_one_runs(tmp_path):
    log = io.StringIO()
    results = [gpu_check.run_part(p, "cuda", False, tmp_path, log, remaining)
               for p, remaining in ((part("fails", "import sys; print('partial'); sys.exit(3)"), 60),
                                    (part("hangs", "import time; print('waiting', flush=True); time.sleep(30)", 2), 60),
                                    (part("works", "print('fine')"), 60),
                                    (part("late", "print('never')"), 5))]
    assert [r["status"] for r in results] == ["failed", "timeout", "ok", "skipped"]
    failed, hung, works, late = results
    assert failed["note"].startswith("exit 3: partial") and failed["figures"] == {}
    assert "stopped after 2 s" in hung["note"] and 2 <= hung["seconds"] < 10
    assert works["figures"] == {"read": True} and works["note"] == ""
    assert "no time left" in late["note"]
    assert "===== works: ok in" in log.getvalue() and "fine" in log.getvalue()


def test_a_part_whose_figures_cannot_be_read_fails_with_the_reason(tmp_path):
    def unreadable(scratch, dry):
        raise AssertionError("the quickstart did not learn as on the CPU: held-out accuracy [0.02, 0.1]")

    result = gpu_check.run_part(part("reads", "print(1)", figures=unreadable), "cuda", False, tmp_path, io.StringIO(), 60)
    assert result["status"] == "failed" and "did not learn" in result["note"]


def test_the_markdown_has_one_row_per_part_with_its_status_and_figures():
    results = {"dry_run": True, "date": "2026-12-04 12:00", "wall_s": 3.0, "torch": "2", "python": "3", "device": "cpu",
               "parts": [{"name": "quickstart", "status": "ok", "seconds": 1.5, "what": "w", "note": "",
                          "figures": {"step": {"seconds": 0.123456, "rows": 8}, "eval_accuracy": [0.02, 0.865]}},
                         {"name": "lora", "status": "failed", "seconds": 0.5, "what": "w", "note": "exit 1: boom | x",
                          "figures": {}}]}
    text = gpu_check.markdown(results)
    assert "| quickstart | ok | 1.5 | w | step.seconds=0.1235; step.rows=8; eval_accuracy=[0.02, 0.865] |" in text
    assert "| lora | failed | 0.5 | w | exit 1: boom | x |" in text


@pytest.mark.slow
def test_the_dry_run_runs_every_part_on_the_cpu_and_writes_their_results(tmp_path):
    """The whole sequence at toy sizes (TRL's side only where TRL is installed): every part ok,
    with its figures, in results.json and results.md."""
    start = time.monotonic()
    done = subprocess.run([sys.executable, "bench/gpu_check.py", "--dry-run", str(tmp_path)], cwd=REPO,
                          capture_output=True, text=True, timeout=600)
    seconds = time.monotonic() - start
    results = json.loads((tmp_path / "results.json").read_text())
    parts = {p["name"]: p for p in results["parts"]}
    assert list(parts) == [p.name for p in gpu_check.PARTS]
    assert {name: p["status"] for name, p in parts.items()} == {name: "ok" for name in parts}, \
        {name: p["note"] for name, p in parts.items()}
    assert done.returncode == 0, done.stdout[-3000:]
    markdown = (tmp_path / "results.md").read_text()
    assert all(f"| {name} | ok |" in markdown for name in parts)
    tests = parts["pytest-gpu"]["figures"]
    assert tests["tests"] > 0 and tests["skipped"] == tests["tests"] and not tests["failed"]  # no GPU here
    assert parts["install"]["figures"]["versions"]["zenalign"] == "0.1.0"
    assert parts["quickstart"]["figures"]["steps"] == 2 and len(parts["quickstart"]["figures"]["eval_accuracy"]) == 2
    zenalign = parts["shape-135m"]["figures"]["1m/zenalign"]
    assert zenalign["seconds_per_step"] > 0 and zenalign["completions_per_s"] == pytest.approx(64 / zenalign["seconds_per_step"])
    assert 0 < zenalign["mfu"] and zenalign["matmul_peak_gflops"]["bfloat16"] > 0
    shape = parts["qwen2-0.5b"]["figures"]
    assert shape["size"] == "toy" and shape["update"]["tokens_per_s"] > 0
    assert shape["logprob_pass"]["max_logp_diff"] < 0.1  # bf16: the lean pass against transformers' SDPA
    for name in ("deepspeed", "lora"):
        assert parts[name]["figures"]["steps"] == 3 and parts[name]["figures"]["grad_norm"] > 0
    assert parts["lag"]["figures"]["policy_lag"] == [0.0, 1.0, 1.0, 1.0]
    assert (tmp_path / "parts.log").read_text().count("=====") >= 2 * len(parts)
    print(f"dry run: {seconds:.1f} s")

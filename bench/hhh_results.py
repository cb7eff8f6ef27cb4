"""Regenerate the results table of docs/results.md on the three-dimension (hhh) task.

    python bench/hhh_results.py                  # 6 methods x 3 seeds + learning-rate sensitivity
    python bench/hhh_results.py --seeds 1 --steps 20 --out /tmp/smoke.md   # a quick smoke run

Every method sees the same number of completions per step (96), the same policy, prompts, verifier
and learning rate; only the advantage computation (and the group size) differs. PPO learns a
critic (GAE) and takes its KL penalty in the reward at PPO's usual 0.1; the GRPO rows keep the
recipe's 0.01 in the loss, the settings the paper compares. Generated tables go between the markers in the output file, so
the analysis written around them survives a rerun.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
RECIPE = REPO / "recipes" / "hhh.yaml"
OBJECTIVES = ("helpful", "harmless", "honest")
START, END = "<!-- results:start -->", "<!-- results:end -->"

# PPO as the paper sets it up: a critic with GAE, the KL to the reference in the reward at beta = 0.1
# (GRPO keeps the recipe's 0.01 in the loss); the critic's learning rate is the policy's.
PPO = ["normalizer={type: gae, kl_coef: 0.1}", "grpo.kl_coef=0"]

# name -> overrides; every row generates 96 completions per step
METHODS = {
    "PPO (critic + GAE, k=1)": [*PPO, "sampling.group_size=1", "grpo.prompts_per_step=96"],
    "PPO (critic + GAE, k=2)": [*PPO, "sampling.group_size=2", "grpo.prompts_per_step=48"],
    "GRPO with k=2 (group z-score)": ["normalizer.type=sum_then_normalize", "sampling.group_size=2", "grpo.prompts_per_step=48"],
    "GRPO z-score (sum, then normalize)": ["normalizer.type=sum_then_normalize"],
    "rank": ["normalizer.type=rank"],
    "RLOO": ["normalizer.type=rloo"],
    "GDPO (normalize, then sum)": ["normalizer.type=normalize_then_sum"],
    "MO-GRPO": ["normalizer.type=mo_grpo"],
}


def run_one(overrides: list[str], out: Path) -> dict:
    from zenalign.recipe.loader import load_recipe
    from zenalign.train.trainer import GRPOTrainer

    if not (out / "final").is_dir():
        loaded = load_recipe(RECIPE, [*overrides, f"run.output_dir={out}", "run.overwrite=true", "run.progress_bar=false",
                                      "run.eval_group_size=0", "run.log_samples=0"])
        GRPOTrainer.from_recipe(loaded).train()
    read = lambda name: [json.loads(l) for l in (out / name).read_text().splitlines() if l.strip()]
    return {"metrics": read("metrics.jsonl"), "evals": read("eval.jsonl")}


def mean_score(record: dict) -> float:
    return statistics.fmean(record[f"eval/reward_mean/{o}"] for o in OBJECTIVES)


def samples_to(threshold: float, evals: list[dict]) -> float:
    for record in evals:
        if mean_score(record) >= threshold:
            return record["samples"]
    return math.inf


def step_variance(metrics: list[dict], key: str) -> float:
    """Variance of the step-to-step change: how noisy the series is, whatever its trend."""
    values = [m[key] for m in metrics]
    return statistics.pvariance([b - a for a, b in zip(values, values[1:])])


def fmt(values: list[float], spec: str = ".3f") -> str:
    """mean ± std of the finite values in ``spec`` format, noting runs that never got there."""
    finite = [v for v in values if math.isfinite(v)]
    if not finite:
        return "not reached"
    text = f"{statistics.fmean(finite):{spec}} ± {statistics.pstdev(finite):{spec}}"
    missed = len(values) - len(finite)
    return text + (f" ({missed} of {len(values)} never)" if missed else "")


def train_seconds(metrics: list[dict]) -> float:
    """A run's training time from its own step timings (so cached runs report it too)."""
    return sum(v for m in metrics for k, v in m.items() if k.startswith("time/"))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=80)
    parser.add_argument("--eval-interval", type=int, default=10)
    parser.add_argument("--threshold", type=float, default=0.8, help="mean of the three eval scores to reach")
    parser.add_argument("--lr-factors", default="0.3,1,3", help="learning rates to try, as multiples of the recipe's")
    parser.add_argument("--runs", type=Path, default=REPO / "runs" / "results")
    parser.add_argument("--out", type=Path, default=REPO / "docs" / "results.md")
    args = parser.parse_args(argv)

    from zenalign.recipe.loader import load_recipe

    base_lr = load_recipe(RECIPE).recipe.grpo.learning_rate
    factors = [float(f) for f in args.lr_factors.split(",")]
    common = [f"run.steps={args.steps}", f"run.eval_interval={args.eval_interval}"]
    started = time.time()
    rows, lr_rows, compute = [], [], []
    for method, overrides in METHODS.items():
        slug = "".join(c if c.isalnum() else "-" for c in method.lower())[:40]
        t0 = time.time()
        runs = [run_one([*overrides, *common, f"run.seed={seed}"], args.runs / f"{slug}-seed{seed}") for seed in range(args.seeds)]
        compute.extend(train_seconds(r["metrics"]) for r in runs)
        finals = [r["evals"][-1] for r in runs]
        rows.append({
            "method": method,
            **{o: fmt([f[f"eval/reward_mean/{o}"] for f in finals]) for o in OBJECTIVES},
            "samples": fmt([samples_to(args.threshold, r["evals"]) for r in runs], ",.0f"),
            "loss_var": fmt([step_variance(r["metrics"], "loss") for r in runs], ".1e"),
            "reward_var": fmt([step_variance(r["metrics"], "reward_mean") for r in runs], ".4f"),
            "seconds": statistics.fmean(train_seconds(r["metrics"]) for r in runs),
        })
        scores = []
        for factor in factors:
            if factor == 1.0:
                scores.append(statistics.fmean(mean_score(f) for f in finals))
                continue
            run = run_one([*overrides, *common, "run.seed=0", f"grpo.learning_rate={base_lr * factor}"],
                          args.runs / f"{slug}-seed0-lr{factor:g}")
            scores.append(mean_score(run["evals"][-1]))
            compute.append(train_seconds(run["metrics"]))
        lr_rows.append((method, scores))
        print(f"{method}: done in {time.time() - t0:.0f}s", file=sys.stderr, flush=True)
    wall = time.time() - started
    table = render(rows, lr_rows, factors, base_lr, args, wall, sum(compute))
    write(args.out, table)
    print(table)
    return 0


def render(rows, lr_rows, factors, base_lr, args, wall, compute) -> str:
    command = "python bench/hhh_results.py" + ("" if (args.seeds, args.steps) == (3, 80) else f" --seeds {args.seeds} --steps {args.steps}")
    lines = [
        f"Command: `{command}` — {compute / 60:.1f} min of training summed over the runs on this machine (2 CPU cores; "
        f"this invocation took {wall / 60:.1f} min, reusing finished runs in runs/results), "
        f"{args.seeds} seeds x {len(rows)} methods, plus {len(factors) - 1} extra learning rates x {len(rows)} methods.",
        f"Each run: {args.steps} steps x 96 completions; held-out greedy evaluation every {args.eval_interval} steps. "
        f"Scores are final held-out means, mean ± std over seeds.",
        "",
        f"| Method | Helpfulness | Harmlessness | Honesty | Samples to reach a mean score of {args.threshold} |",
        "|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(f"| {r['method']} | {r['helpful']} | {r['harmless']} | {r['honest']} | {r['samples']} |")
    lines += ["", "Step-to-step variance (variance of the change between consecutive steps), mean ± std over seeds:", "",
              "| Method | loss | training reward | training seconds per run |", "|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['method']} | {r['loss_var']} | {r['reward_var']} | {r['seconds']:.0f} |")
    header = " | ".join(f"lr = {base_lr * f:.1e}" for f in factors)
    lines += ["", "Learning-rate sensitivity: final mean of the three scores (seed 0; the middle column is the "
              "mean over seeds):", "", f"| Method | {header} | spread |", "|---|" + "---|" * (len(factors) + 1)]
    for method, scores in lr_rows:
        cells = " | ".join(f"{s:.3f}" for s in scores)
        lines.append(f"| {method} | {cells} | {max(scores) - min(scores):.3f} |")
    return "\n".join(lines)


def write(path: Path, table: str) -> None:
    text = path.read_text(encoding="utf-8") if path.exists() else f"# Results\n\n{START}\n{END}\n"
    if START not in text:
        text += f"\n{START}\n{END}\n"
    before, rest = text.split(START, 1)
    after = rest.split(END, 1)[1] if END in rest else ""
    path.write_text(f"{before}{START}\n{table}\n{END}{after}", encoding="utf-8")


if __name__ == "__main__":
    sys.exit(main())

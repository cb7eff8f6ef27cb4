"""``zenalign plot``: reward curves per objective and the Pareto front of final evaluations."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Sequence

from zenalign.errors import ZenalignError
from zenalign.commands.pareto import hypervolume, pareto_front


def _read(path: Path) -> list[dict[str, Any]]:
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def load_runs(run_dirs: Sequence[Path]) -> list[dict[str, Any]]:
    runs = []
    for d in run_dirs:
        metrics, evals = _read(d / "metrics.jsonl"), _read(d / "eval.jsonl")
        if not metrics and not evals:
            raise ZenalignError(f"plot: '{d}' is not a run directory (no metrics.jsonl or eval.jsonl)")
        runs.append({"name": d.name, "dir": d, "metrics": metrics, "evals": evals})
    return runs


def objective_names(runs: list[dict[str, Any]]) -> list[str]:
    names: list[str] = []
    for run in runs:
        for record in run["evals"] or run["metrics"]:
            for key in record:
                prefix = "eval/reward_mean/" if key.startswith("eval/") else "reward_mean/"
                if key.startswith(prefix) and key[len(prefix):] not in names and "/" not in key[len(prefix):]:
                    names.append(key[len(prefix):])
    return names


def _pyplot():
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as exc:
        raise ZenalignError("plot: matplotlib is not installed; pip install 'zenalign[plot]'") from exc
    return plt


def plot_curves(runs: list[dict[str, Any]], names: list[str], out: Path) -> Path:
    """Training reward (thin) and held-out eval reward (markers) per objective, against samples."""
    plt = _pyplot()
    fig, axes = plt.subplots(1, len(names), figsize=(4.2 * len(names), 3.4), squeeze=False)
    for ax, name in zip(axes[0], names):
        for run in runs:
            xs = [m["samples"] for m in run["metrics"] if m.get(f"reward_mean/{name}") is not None]
            ys = [m[f"reward_mean/{name}"] for m in run["metrics"] if m.get(f"reward_mean/{name}") is not None]
            line = ax.plot(xs, ys, linewidth=0.8, alpha=0.5)[0]
            ex = [e["samples"] for e in run["evals"] if e.get(f"eval/reward_mean/{name}") is not None]
            ey = [e[f"eval/reward_mean/{name}"] for e in run["evals"] if e.get(f"eval/reward_mean/{name}") is not None]
            ax.plot(ex, ey, marker="o", color=line.get_color(), label=run["name"])
        ax.set_title(name)
        ax.set_xlabel("completions seen")
        ax.set_ylabel("reward (line: train, dots: eval)")
        ax.grid(alpha=0.3)
    axes[0][-1].legend(fontsize=7, loc="best")
    fig.tight_layout()
    path = out / "reward_curves.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def final_scores(runs: list[dict[str, Any]], names: list[str]) -> list[list[float]]:
    scores = []
    for run in runs:
        last = run["evals"][-1] if run["evals"] else {}
        scores.append([float(last.get(f"eval/reward_mean/{name}") or 0.0) for name in names])
    return scores


def plot_front(runs: list[dict[str, Any]], names: list[str], scores: list[list[float]], out: Path) -> Path:
    """Final eval scores of every run, each pair of objectives; the Pareto-optimal runs highlighted."""
    plt = _pyplot()
    front = set(pareto_front(scores))
    pairs = [(a, b) for a in range(len(names)) for b in range(a + 1, len(names))] or [(0, 0)]
    fig, axes = plt.subplots(1, len(pairs), figsize=(4.2 * len(pairs), 3.8), squeeze=False)
    for ax, (a, b) in zip(axes[0], pairs):
        for i, (run, s) in enumerate(zip(runs, scores)):
            ax.scatter(s[a], s[b], s=60 if i in front else 25, marker="*" if i in front else "o",
                       color="crimson" if i in front else "gray", zorder=3)
            ax.annotate(run["name"], (s[a], s[b]), fontsize=6, xytext=(3, 3), textcoords="offset points")
        ax.set_xlabel(names[a])
        ax.set_ylabel(names[b])
        ax.grid(alpha=0.3)
    fig.suptitle("final eval scores (stars: Pareto front)")
    fig.tight_layout()
    path = out / "pareto_front.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_runs(run_dirs: Sequence[Path], out: Path, reference: float = 0.0) -> dict[str, Any]:
    runs = load_runs(run_dirs)
    names = objective_names(runs)
    if not names:
        raise ZenalignError("plot: the runs have no per-objective rewards to plot")
    out.mkdir(parents=True, exist_ok=True)
    scores = final_scores(runs, names)
    front = pareto_front(scores)
    return {
        "curves": plot_curves(runs, names, out),
        "front_plot": plot_front(runs, names, scores, out),
        "objectives": names,
        "front": [runs[i]["name"] for i in front],
        "hypervolume": hypervolume([scores[i] for i in front], [reference] * len(names)),
        "scores": {run["name"]: s for run, s in zip(runs, scores)},
    }

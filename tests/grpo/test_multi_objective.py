"""Multi-objective aggregation, Lagrangian constraints, diagnostics and Pareto tools, against values
worked out by hand."""

import math

import pytest
import torch

from zenalign.grpo.metrics import collapse_rate, correlation, hacking_warnings, reward_metrics
from zenalign.commands.pareto import hypervolume, pareto_front
from zenalign.plugins import Objectives
from zenalign.plugins import collect_registry

NAN = float("nan")
S3 = math.sqrt(3) / 2  # z-score of a {0, 1, 1, 0} objective: +-0.866


def normalizer(name, **options):
    plugin_type = collect_registry().get("normalizer", name)
    return plugin_type.build(plugin_type.options(**options))


def two(weights=(1.0, 1.0), roles=(), thresholds=(), directions=()):
    return Objectives(("helpful", "harmless"), torch.tensor(weights, dtype=torch.float64), roles, thresholds, directions)


# One group of four completions scored on two binary objectives. (1, 0) and (0, 1) are distinct
# reward vectors with the same sum.
VECTORS = torch.tensor([[[1.0, 0.0], [0.0, 1.0], [0.0, 1.0], [0.0, 0.0]]], dtype=torch.float64)
# Per-objective group z-scores (unbiased std):
#   objective 1 over {1, 0, 0, 0}: mean 1/4, std 1/2                 -> [1.5, -0.5, -0.5, -0.5]
#   objective 2 over {0, 1, 1, 0}: mean 1/2, std sqrt(1/3)           -> [-0.866, 0.866, 0.866, -0.866]
Z1 = [1.5, -0.5, -0.5, -0.5]
Z2 = [-S3, S3, S3, -S3]
SUM = [a + b for a, b in zip(Z1, Z2)]  # [0.634, 0.366, 0.366, -1.366]


def test_sum_then_normalize_collapses_distinct_vectors():
    adv = normalizer("sum_then_normalize", eps=1e-12)(VECTORS, two())
    # sums {1, 1, 1, 0}: mean 3/4, std 1/2 -> [0.5, 0.5, 0.5, -1.5]
    assert adv[0].tolist() == pytest.approx([0.5, 0.5, 0.5, -1.5])
    assert adv[0, 0] == adv[0, 1]  # (1, 0) and (0, 1) get the same advantage
    assert collapse_rate(VECTORS, adv) == 1.0


def test_mo_grpo_keeps_them_apart():
    adv = normalizer("mo_grpo", eps=1e-12)(VECTORS, two())
    assert adv[0].tolist() == pytest.approx(SUM)
    assert collapse_rate(VECTORS, adv) == 0.0  # the repeated (0, 1) vector does not count
    weighted = normalizer("mo_grpo", eps=1e-12)(VECTORS, two(weights=(2.0, 0.5)))
    assert weighted[0].tolist() == pytest.approx([2 * a + 0.5 * b for a, b in zip(Z1, Z2)])


def test_normalize_then_sum_rescales_over_the_batch():
    adv = normalizer("normalize_then_sum", eps=1e-12)(VECTORS, two())
    # the sums are zero-mean; their unbiased std over the batch is sqrt(sum(s^2) / 3)
    std = math.sqrt(sum(s * s for s in SUM) / 3)
    assert adv[0].tolist() == pytest.approx([s / std for s in SUM])
    assert collapse_rate(VECTORS, adv) == 0.0
    assert normalizer("gdpo", eps=1e-12)(VECTORS, two()).tolist() == adv.tolist()


def test_normalize_then_sum_over_two_groups_and_abstentions():
    rewards = torch.tensor([
        [[1.0, 0.0], [0.0, 1.0], [0.0, 1.0], [0.0, 0.0]],
        [[1.0, NAN], [0.0, NAN], [1.0, NAN], [NAN, NAN]],  # objective 2 abstains; the last completion on both
    ], dtype=torch.float64)
    adv = normalizer("normalize_then_sum", eps=1e-12)(rewards, two())
    # group 2: objective 1 over {1, 0, 1}: mean 2/3, std sqrt(1/3) -> [0.577, -1.155, 0.577]; objective 2 -> 0
    s = 1 / math.sqrt(3)
    second = [s, -2 * s, s]
    # batch std over the seven completions that did not abstain on everything
    values = SUM + second
    std = math.sqrt(sum(v * v for v in values) / 6)
    assert adv[0].tolist() == pytest.approx([v / std for v in SUM])
    assert adv[1, :3].tolist() == pytest.approx([v / std for v in second])
    assert adv[1, 3] == 0.0


def test_lagrangian_combines_normalised_advantages_with_the_multiplier():
    lagrangian = normalizer("lagrangian", lambda_lr=0.5, lambda_init=0.0, eps=1e-12)
    objectives = two(roles=("reward", "constraint"), thresholds=(None, 0.9), directions=(">=", ">="))
    # step 1: lambda = 0, so A is the reward's z-score; harmless mean 0.5 < 0.9 -> lambda = 0.5 * 0.4 = 0.2
    assert lagrangian(VECTORS, objectives)[0].tolist() == pytest.approx(Z1)
    assert lagrangian.lambdas["harmless"] == pytest.approx(0.2)
    assert lagrangian.metrics() == pytest.approx({"lambda/harmless": 0.2, "constraint_violation/harmless": 0.4})
    # step 2: A = (1 * Z1 + 0.2 * Z2) / (1 + 0.2); then lambda = 0.2 + 0.2 = 0.4
    adv = lagrangian(VECTORS, objectives)
    assert adv[0].tolist() == pytest.approx([(a + 0.2 * b) / 1.2 for a, b in zip(Z1, Z2)])
    assert lagrangian.lambdas["harmless"] == pytest.approx(0.4)


def test_lagrangian_cost_constraint_points_the_other_way():
    lagrangian = normalizer("lagrangian", lambda_lr=1.0, lambda_init=0.5, eps=1e-12)
    objectives = two(roles=("reward", "constraint"), thresholds=(None, 0.2), directions=(">=", "<="))
    # "harmless" is now a cost that must stay <= 0.2: its advantage enters with a minus sign
    adv = lagrangian(VECTORS, objectives)
    assert adv[0].tolist() == pytest.approx([(a - 0.5 * b) / 1.5 for a, b in zip(Z1, Z2)])
    # violation = mean - threshold = 0.5 - 0.2 = 0.3 -> lambda = 0.5 + 0.3
    assert lagrangian.lambdas["harmless"] == pytest.approx(0.8)


def test_lambda_rises_while_violated_and_returns_to_zero_once_satisfied():
    lagrangian = normalizer("lagrangian", lambda_lr=0.5)
    objectives = two(roles=("reward", "constraint"), thresholds=(None, 0.9), directions=(">=", ">="))

    def batch(harmless_mean):
        # harmless scores with the given mean, helpful varying
        n_ones = round(harmless_mean * 10)
        harmless = [1.0] * n_ones + [0.0] * (10 - n_ones)
        return torch.tensor([[[float(i % 2), h] for i, h in enumerate(harmless)]], dtype=torch.float64)

    seen = []
    for _ in range(5):  # violated: mean 0.5 -> +0.2 per step
        lagrangian(batch(0.5), objectives)
        seen.append(lagrangian.lambdas["harmless"])
    assert seen == pytest.approx([0.2, 0.4, 0.6, 0.8, 1.0])
    for _ in range(25):  # satisfied: mean 1.0 -> -0.05 per step, projected at 0
        lagrangian(batch(1.0), objectives)
        seen.append(lagrangian.lambdas["harmless"])
    assert seen[5:8] == pytest.approx([0.95, 0.9, 0.85])
    assert seen[-1] == 0.0 and min(seen) == 0.0
    # the state goes into checkpoints and comes back
    restored = normalizer("lagrangian")
    restored.load_state_dict(lagrangian.state_dict())
    assert restored.lambdas == lagrangian.lambdas


# ---------------------------------------------------------------------------------------- metrics

def test_per_objective_metrics_and_correlations():
    rewards = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0], [1.0, NAN]], dtype=torch.float64)
    m = reward_metrics(rewards, two(), group_size=2)
    assert m["reward_mean/helpful"] == pytest.approx(0.75)
    assert m["reward_std/helpful"] == pytest.approx(math.sqrt(0.1875))
    assert m["reward_mean/harmless"] == pytest.approx(2 / 3)
    # group 1: helpful {1, 0} varies, harmless {0, 1} varies; group 2: helpful {1, 1} constant,
    # harmless has one score only (not counted)
    assert m["zero_std_frac/helpful"] == 0.5
    assert m["zero_std_frac/harmless"] == 0.0
    # correlation over the three completions both scored: (1,0), (0,1), (1,1)
    x, y = torch.tensor([1.0, 0.0, 1.0]), torch.tensor([0.0, 1.0, 1.0])
    xc, yc = x - x.mean(), y - y.mean()
    assert m["corr/helpful/harmless"] == pytest.approx(float((xc * yc).sum() / (xc.norm() * yc.norm())))
    assert math.isnan(correlation(torch.tensor([1.0, 1.0]), torch.tensor([0.0, 1.0])))


def test_hacking_warning_after_n_opposite_moves():
    def evals(helpful, harmless):
        return [{"eval/reward_mean/helpful": a, "eval/reward_mean/harmless": b} for a, b in zip(helpful, harmless)]

    names = ("helpful", "harmless")
    rising_falling = evals([0.1, 0.2, 0.3, 0.4], [0.9, 0.8, 0.7, 0.6])
    assert hacking_warnings(rising_falling, names, patience=3) == [
        "'helpful' rose while 'harmless' fell for 3 consecutive evaluations"]
    assert hacking_warnings(rising_falling[:3], names, patience=3) == []  # only 2 moves so far
    assert hacking_warnings(evals([0.1, 0.2, 0.3, 0.4], [0.9, 0.8, 0.85, 0.6]), names, patience=3) == []
    assert hacking_warnings(rising_falling, names, patience=0) == []


# ---------------------------------------------------------------------------------------- Pareto

def test_pareto_front():
    points = [(1, 2), (2, 1), (1, 1), (2, 1)]
    assert pareto_front(points) == [0, 1, 3]


@pytest.mark.parametrize("points, reference, volume", [
    ([(1, 2), (2, 1)], (0, 0), 3.0),  # 2 + 2 - 1 overlap
    ([(1, 2), (2, 1)], (0.5, 0.5), 0.5 * 1.5 + 1.5 * 0.5 - 0.5 * 0.5),
    ([(1, 1, 1)], (0, 0, 0), 1.0),
    ([(2, 1, 1), (1, 2, 1)], (0, 0, 0), 3.0),  # 2 + 2 - 1
    ([(1, 1, 2), (2, 2, 1)], (0, 0, 0), 5.0),  # 2 + 4 - 1
    ([(1, 1, 2), (2, 2, 1), (0.5, 0.5, 0.5)], (0, 0, 0), 5.0),  # a dominated point adds nothing
    ([(0.5, 2.0)], (1.0, 0.0), 0.0),  # not above the reference
])
def test_hypervolume(points, reference, volume):
    assert hypervolume(points, reference) == pytest.approx(volume)


# ---------------------------------------------------------------------------------------- end to end

import json  # noqa: E402

from helpers import RECIPES, run_cli  # noqa: E402


def read(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


@pytest.mark.slow
def test_every_objective_improves_on_the_three_dimension_task(tmp_path):
    out = tmp_path / "hhh"
    done = run_cli("run", str(RECIPES / "hhh.yaml"), "run.steps=40", "run.eval_interval=20", f"run.output_dir={out}")
    assert done.returncode == 0, done.stderr
    first, last = read(out / "eval.jsonl")[0], read(out / "eval.jsonl")[-1]
    gains = {o: last[f"eval/reward_mean/{o}"] - first[f"eval/reward_mean/{o}"] for o in ("helpful", "harmless", "honest")}
    # measured with seed 0: helpful 0.062 -> 0.208, harmless 0.000 -> 1.000, honest 0.722 -> 0.972
    assert gains["helpful"] >= 0.10 and gains["harmless"] >= 0.5 and gains["honest"] >= 0.10, gains
    metrics = read(out / "metrics.jsonl")[-1]
    for o in ("helpful", "harmless", "honest"):
        assert {f"reward_mean/{o}", f"reward_std/{o}", f"zero_std_frac/{o}"} <= set(metrics)
        assert f"eval/sampled/zero_std_frac/{o}" in last and f"eval/reward_std/{o}" in last
    assert {"corr/helpful/honest", "adv_collapse_frac"} <= set(metrics)
    assert "eval harmless: 0.000 -> " in done.stdout


@pytest.mark.slow
def test_constrained_recipe_logs_and_checkpoints_lambda(tmp_path):
    out = tmp_path / "constrained"
    done = run_cli("run", str(RECIPES / "hhh-constrained.yaml"), "run.steps=20", "run.eval_interval=0",
                   "run.checkpoint_interval=10", f"run.output_dir={out}")
    assert done.returncode == 0, done.stderr
    metrics = read(out / "metrics.jsonl")
    lambdas = [m["lambda/harmless"] for m in metrics]
    # harmlessness starts far below its 0.9 threshold, so the multiplier climbs
    assert lambdas[0] > 0 and lambdas[9] > lambdas[0] and all("constraint_violation/harmless" in m for m in metrics)
    state = json.loads((out / "checkpoints" / "step-00000020" / "plugins" / "normalizer" / "state.json").read_text())
    assert state["lambdas"]["harmless"] == pytest.approx(lambdas[-1])
    evals = read(out / "eval.jsonl")
    assert evals[-1]["eval/reward_mean/harmless"] > evals[0]["eval/reward_mean/harmless"]

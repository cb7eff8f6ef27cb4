"""The loss owns its hyperparameters: ``loss: {type: grpo, clip_epsilon, clip_epsilon_high,
kl_estimator, aggregation}``. Every older spelling (``grpo.clip_epsilon`` in a file or an override,
``GRPOTrainer(clip_epsilon=...)``, TRL's ``epsilon``) sets the same option, two spellings with
different values are refused naming both, and checkpoints written before still resume."""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path

import pytest
import torch
import yaml

from helpers import RECIPES, REVERSE_POLICY, cli_in_process, run_cli
from zenalign.errors import ModelLoadError, RecipeError
from zenalign.plugins import BuildContext
from zenalign.plugins.losses import GRPOLoss
from zenalign.recipe.loader import load_recipe, recipe_from_options, validate_recipe
from zenalign.train import checkpoint as ckpt
from zenalign.train.build import Builder, Inputs

NEW = {"loss": {"type": "grpo", "clip_epsilon": 0.15, "clip_epsilon_high": 0.28, "kl_estimator": "k1",
                "aggregation": "dapo"}}
OLD = {"clip_epsilon": 0.15, "clip_epsilon_high": 0.28, "kl_estimator": "k1", "loss_aggregation": "dapo"}


def validate(data, overrides=()):
    return validate_recipe(data, source="r.yaml", base_dir=Path("."), name="r", overrides=overrides).recipe


@pytest.mark.parametrize("spelling", ["file", "overrides", "section-override", "keywords", "grpo-keyword", "trl"])
def test_every_older_spelling_sets_the_loss_options(spelling):
    dotted = [f"grpo.{key}={value}" for key, value in OLD.items()]
    recipe = {
        "file": lambda: validate({"grpo": OLD}),
        "overrides": lambda: validate({}, dotted),
        "section-override": lambda: validate({}, ["grpo={" + ", ".join(f"{k}: {v}" for k, v in OLD.items()) + "}"]),
        "keywords": lambda: recipe_from_options(OLD, "r").recipe,
        "grpo-keyword": lambda: recipe_from_options({"grpo": OLD}, "r").recipe,
        # TRL has no name for the KL estimator: its grpo. spelling goes along
        "trl": lambda: validate({"epsilon": 0.15, "epsilon_high": 0.28, "loss_type": "bnpo", "grpo": {"kl_estimator": "k1"}}),
    }[spelling]()
    assert recipe.loss.model_dump() == validate(NEW).loss.model_dump() == \
        {"type": "grpo", "clip_epsilon": 0.15, "clip_epsilon_high": 0.28, "kl_estimator": "k1", "aggregation": "dapo"}
    assert recipe.grpo.model_dump() == validate(NEW).grpo.model_dump()  # nothing else moved


@pytest.mark.parametrize("make, message", [
    (lambda: validate({"grpo": {"clip_epsilon": 0.1}, "loss": {"clip_epsilon": 0.3}}),
     "r.yaml: loss.clip_epsilon and grpo.clip_epsilon (now loss.clip_epsilon) both set loss.clip_epsilon (0.3 vs 0.1); "
     "give it once"),
    (lambda: validate({"epsilon": 0.1, "grpo": {"clip_epsilon": 0.2}}),
     "epsilon (TRL's name for loss.clip_epsilon) and grpo.clip_epsilon (now loss.clip_epsilon) both set "
     "loss.clip_epsilon (0.1 vs 0.2); give it once"),
    (lambda: validate({}, ["grpo.loss_aggregation=dapo", "loss.aggregation=dr_grpo"]),
     "override 'grpo.loss_aggregation=dapo' and override 'loss.aggregation=dr_grpo' both set loss.aggregation ('dapo' vs "
     "'dr_grpo'); give it once"),
    (lambda: recipe_from_options({"clip_epsilon": 0.15, "epsilon": 0.2}, "r"),
     "clip_epsilon=0.15 (now loss.clip_epsilon) and epsilon=0.2 (TRL's name for loss.clip_epsilon) both set "
     "loss.clip_epsilon (0.15 vs 0.2); give it once"),
    (lambda: recipe_from_options({"kl_estimator": "k1", "loss": {"type": "grpo", "kl_estimator": "k2"}}, "r"),
     "kl_estimator='k1' (now loss.kl_estimator) and loss={'type': 'grpo', 'kl_estimator': 'k2'} both set "
     "loss.kl_estimator ('k1' vs 'k2'); give it once"),
])
def test_two_spellings_with_different_values_are_refused_naming_both(make, message):
    with pytest.raises(RecipeError) as caught:
        make()
    assert str(caught.value) == message


def test_the_same_value_twice_is_accepted_and_an_override_wins_over_the_file():
    assert validate({"grpo": {"clip_epsilon": 0.1}, "loss": {"clip_epsilon": 0.1}}).loss.clip_epsilon == 0.1
    assert load_recipe(RECIPES / "quickstart.yaml").recipe.loss.clip_epsilon == 0.2  # the file's loss section
    assert load_recipe(RECIPES / "quickstart.yaml", ["grpo.clip_epsilon=0.3"]).recipe.loss.clip_epsilon == 0.3
    with pytest.raises(RecipeError) as caught:  # a bad value is blamed on the override that gave it
        load_recipe(RECIPES / "quickstart.yaml", ["grpo.clip_epsilon=1.5"])
    assert str(caught.value).startswith("override 'grpo.clip_epsilon=1.5': loss.clip_epsilon: must be < 1")


def test_a_loss_without_the_option_ignores_its_older_name_as_before_and_says_so(caplog):
    with caplog.at_level(logging.WARNING, logger="zenalign"):
        gspo = validate({"grpo": {"clip_epsilon": 0.1, "kl_estimator": "k2"}, "loss": {"type": "gspo"}}).loss
    assert gspo.model_dump() == {"type": "gspo", "kl_estimator": "k2", "epsilon": 3e-4, "epsilon_high": 4e-4}
    assert caplog.messages == ["r.yaml: grpo.clip_epsilon (now loss.clip_epsilon): loss 'gspo' has no option "
                               "'clip_epsilon'; left out"]
    with pytest.raises(RecipeError, match="loss.clip_epsilon: unknown field; accepted here: type, kl_estimator, epsilon"):
        validate({"loss": {"type": "gspo", "clip_epsilon": 0.1}})  # the new spelling is the loss's own: no such option


def test_a_plugin_reading_the_older_names_gets_the_values_in_force_with_a_warning():
    """A loss plugin written before reads context.recipe.grpo.loss_aggregation: it still gets the value."""
    with pytest.warns(FutureWarning, match="recipe.grpo.loss_aggregation is now the loss's option loss.aggregation"):
        assert validate({"loss": {"aggregation": "dapo"}}).grpo.loss_aggregation == "dapo"
    gspo = validate({"grpo": {"clip_epsilon": 0.1}, "loss": {"type": "gspo"}}).grpo  # left out of gspo's options
    cispo = validate({"loss": {"type": "cispo", "kl_estimator": "k2"}}).grpo
    with pytest.warns(FutureWarning):
        assert (gspo.clip_epsilon, gspo.upper_clip_epsilon, gspo.loss_aggregation) == (0.1, 0.1, "grpo")  # the default
        assert (cispo.kl_estimator, cispo.clip_epsilon_high) == ("k2", None)


def built_loss(data, tmp_path):
    loaded = validate_recipe(data, source="r.yaml", base_dir=tmp_path, name="r")
    return Builder(loaded, Inputs(), BuildContext(recipe=loaded.recipe, base_dir=tmp_path)).loss()


def test_each_built_loss_takes_its_hyperparameters_from_its_options(tmp_path):
    run = {"grpo": {"kl_coef": 0.05}, "sampling": {"max_new_tokens": 5}}
    grpo = built_loss({**run, "loss": {"clip_epsilon": 0.1, "clip_epsilon_high": 0.3, "kl_estimator": "k1",
                                       "aggregation": "dr_grpo"}}, tmp_path)
    assert isinstance(grpo, GRPOLoss)
    assert (grpo.clip_low, grpo.clip_high, grpo.kl_estimator, grpo.kl_coef) == (0.1, 0.3, "k1", 0.05)
    mask = torch.tensor([[1.0, 1.0, 0.0], [1.0, 0.0, 0.0]])
    # dr_grpo: 1 / (2 completions * 5 max_new_tokens) on every real token
    assert grpo.token_weights(mask).flatten().tolist() == pytest.approx([0.1, 0.1, 0.0, 0.1, 0.0, 0.0])
    # rho = 1.25 with A = 1 is inside [1 - 0.1, 1 + 0.3]: -rho * A = -1.25 (with 0.2 for both bounds it would be
    # clipped to -1.2); the k1 KL to a reference at half the probability is log pi - log pi_ref = log 2, times 0.05
    logp = torch.tensor([[math.log(0.5)]], dtype=torch.float64)
    token = grpo.per_token(logp, logp - math.log(1.25), torch.tensor([1.0], dtype=torch.float64),
                           ref_logp=torch.tensor([[math.log(0.25)]], dtype=torch.float64))
    assert float(token.loss) == pytest.approx(-1.25 + 0.05 * math.log(2.0))
    cispo = built_loss({**run, "grpo": {"kl_coef": 0.05, "clip_epsilon": 0.1, "loss_aggregation": "dapo"},
                        "loss": {"type": "cispo", "epsilon_high": 0.5}}, tmp_path)
    # cispo's range is its own (weights up to 1 + 0.5); grpo.clip_epsilon never reaches it, its aggregation does
    assert (cispo.low, cispo.high, cispo.aggregation, cispo.kl_coef, cispo.max_new_tokens) == (0.0, 1.5, "dapo", 0.05, 5)
    assert cispo.token_weights(mask).flatten().tolist() == pytest.approx([1 / 3, 1 / 3, 0.0, 1 / 3, 0.0, 0.0])  # 3 tokens


# ------------------------------------------------------------------------------------------------
# checkpoints written before the loss owned its hyperparameters

# What a checkpoint's trainer_state.json held under "loss" before: the loss entry, grpo's had no options.
BEFORE = {"grpo": {"type": "grpo"}, "gspo": {"type": "gspo", "epsilon": 3e-4, "epsilon_high": 4e-4},
          "cispo": {"type": "cispo", "epsilon_low": None, "epsilon_high": 3.0}}


@pytest.mark.parametrize("loss", sorted(BEFORE))
def test_the_loss_fingerprint_is_the_one_written_before(loss):
    for data in ({"loss": {"type": loss}, "grpo": {"kl_estimator": "k2", "loss_aggregation": "dapo"}},
                 {"loss": {"type": loss}}):
        recipe = validate(data)
        assert ckpt.fingerprint(recipe, 1, ("accuracy",), None)["loss"] == BEFORE[loss]
    saved = {"loss": BEFORE["gspo"]}
    ckpt.check_compatible(saved, {"loss": ckpt.fingerprint(validate({"loss": {"type": "gspo"}}), 1, (), None)["loss"]},
                          Path("c"))
    with pytest.raises(ModelLoadError, match="was written with loss = .*'epsilon': 0.0003.*this run has .*'epsilon': 0.001"):
        changed = validate({"loss": {"type": "gspo", "epsilon": 1e-3}})
        ckpt.check_compatible(saved, {"loss": ckpt.fingerprint(changed, 1, (), None)["loss"]}, Path("c"))


def test_a_checkpoint_of_an_older_recipe_resumes_with_the_new_spelling(tmp_path):
    """A run whose recipe has grpo.clip_epsilon (the older spelling) checkpoints; the shipped recipe,
    in the new spelling with the same values, resumes it; another value of a loss option that moved
    is applied, as grpo.clip_epsilon's was; another loss is refused."""
    old = yaml.safe_load((RECIPES / "quickstart.yaml").read_text())
    old["grpo"]["clip_epsilon"] = old.pop("loss")["clip_epsilon"]
    old["model"]["path"] = str(REVERSE_POLICY)
    (tmp_path / "old.yaml").write_text(yaml.safe_dump(old))
    out = tmp_path / "run"
    short = ["run.checkpoint_interval=1", "run.eval_interval=0", "run.log_interval=1", "run.progress_bar=false",
             f"run.output_dir={out}"]
    done = run_cli("run", str(tmp_path / "old.yaml"), "run.steps=1", *short)
    assert done.returncode == 0, done.stderr
    state = json.loads((ckpt.list_checkpoints(out)[-1] / "trainer_state.json").read_text())
    assert state["fingerprint"]["loss"] == BEFORE["grpo"]
    refused = cli_in_process("run", str(RECIPES / "quickstart.yaml"), "run.steps=2", "loss={type: cispo}", *short,
                             "--resume", "auto")
    assert refused.returncode == 2 and "was written with loss = {'type': 'grpo'}" in refused.stderr
    done = run_cli("run", str(RECIPES / "quickstart.yaml"), "run.steps=2", "grpo.clip_epsilon=0.25", *short,
                   "--resume", "auto")
    assert done.returncode == 0, done.stderr
    assert [line["step"] for line in map(json.loads, (out / "metrics.jsonl").read_text().splitlines())] == [1, 2]
    assert yaml.safe_load((out / "recipe.yaml").read_text())["loss"]["clip_epsilon"] == 0.25

"""A seeded fuzz of the recipe: mutations of recipes/quickstart.yaml, each checked in-process the way
`zenalign validate` checks a recipe (cmd_validate: the schema, the model directory, the prompt
source, rewards and normalizer, the prompts against the tokenizer and the model's config, the
sampling batch's memory).

Every mutation ends one of three ways:
- refused: a ZenalignError whose message is one line (what the CLI prints after `zenalign: error:`);
- accepted: validate passes (perhaps with a warning), and then the mutation must be listed in
  ACCEPTABLE with the reason it is a valid recipe;
- anything else (another exception, a message of several lines, a check that runs past its time):
  a traceback the user would see, which the test refuses.

Run with -s to see the counts.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import fnmatch
import io
import logging
import math
import random
import signal
import warnings
from dataclasses import dataclass
from typing import Any

import yaml

from helpers import RECIPES
from zenalign.errors import ZenalignError

SEED = 0
MUTATIONS = 300
SECONDS_PER_CHECK = 20  # one validate takes about 0.1 s; one that runs this long is a hang

# What each kind of mutation puts in place of a value.
VALUES: dict[str, Any] = {
    "null": None, "string": "abc", "empty": "", "long": "x" * 5000, "unicode": "réglé ✓ 🙂 \u202e",
    "list": [1, "a"], "dict": {"a": 1}, "nested": {"a": [{"b": None}, [[]]]}, "true": True, "false": False,
    "zero": 0, "negative": -1, "negative_float": -0.5, "fraction": 0.5, "huge": 1_000_000_000,
    "int64": 2**63, "bigger": 10**30, "nan": math.nan, "inf": math.inf, "-inf": -math.inf, "tiny": 1e-300,
    "nul": "a\0b", "unknown_type": "no_such_plugin",
}
# Mutations of the key rather than the value: delete, typo (a misspelt key), unknown_key (a key added).


def base_recipe(tmp_path) -> dict[str, Any]:
    """quickstart.yaml as it is, except: the model path made absolute (the recipe is written
    elsewhere), the run directory in tmp_path, and 100 training and 20 held-out words instead of
    20,000 and 200 (tokenizing those is 1 s of every check)."""
    recipe = yaml.safe_load((RECIPES / "quickstart.yaml").read_text(encoding="utf-8"))
    recipe["model"]["path"] = str(RECIPES / recipe["model"]["path"])
    recipe["data"].update(train_size=100, eval_size=20)
    recipe["run"]["output_dir"] = str(tmp_path / "run")
    return recipe


def schema_paths(base: dict[str, Any]) -> list[tuple]:
    """Every field the base recipe sets, every field of its sections (set or not), every option of
    its plugins, and the sections themselves."""
    from zenalign.plugins import collect_registry
    from zenalign.recipe.schema import Recipe

    registry = collect_registry()
    paths = set()

    def walk(prefix: tuple, value: Any) -> None:
        paths.add(prefix)
        if isinstance(value, dict):
            for key, item in value.items():
                walk((*prefix, key), item)
        elif isinstance(value, list):
            for i, item in enumerate(value):
                walk((*prefix, i), item)

    walk((), base)
    for section in ("model", "sampling", "grpo", "engine", "run"):
        model = Recipe.model_fields[section].annotation
        paths.update((section, name) for name in model.model_fields)
    for section, kind in (("data", "task"), (("rewards", 0), "reward"), ("normalizer", "normalizer")):
        prefix = section if isinstance(section, tuple) else (section,)
        entry = base.get(prefix[0]) if len(prefix) == 1 else base[prefix[0]][prefix[1]]
        entry = entry or {"type": registry.default(kind)}
        options = registry.types[kind][entry["type"]].options
        paths.update((*prefix, name) for name in options.model_fields)
    paths.update(("sweep", "plugins", "objectives", "filters", "loss"))
    paths.discard(())
    return sorted(paths, key=lambda p: tuple(str(k) for k in p))


def typo(key: str) -> str:
    """A key with its second and third letters swapped (`group_size` -> `gorup_size`), or its last
    letter doubled where that changes nothing (`seed` -> `seedd`)."""
    swapped = key[0] + key[2] + key[1] + key[3:] if len(key) > 3 else key[::-1]
    return swapped if swapped != key else key + key[-1]


def apply(recipe: dict[str, Any], path: tuple, kind: str) -> dict[str, Any]:
    """The recipe with ``kind`` applied at ``path`` (a copy)."""
    out = copy.deepcopy(recipe)
    *parents, last = path
    node: Any = out
    for key in parents:
        node = node.setdefault(key, {}) if isinstance(node, dict) else node[key]
    if kind == "delete":
        node.pop(last)
    elif kind == "typo":
        node[typo(last)] = node.pop(last)
    elif kind == "unknown_key":
        target = node.get(last) if isinstance(node, dict) else node[last]
        (target if isinstance(target, dict) else node)["bogus_field"] = 1
    else:
        node[last] = copy.deepcopy(VALUES[kind])
    return out


def present(recipe: dict[str, Any], path: tuple) -> bool:
    """Whether the recipe sets ``path`` (a field of a section, an entry of a list)."""
    node: Any = recipe
    for key in path:
        if isinstance(node, dict) and key in node or isinstance(node, list) and isinstance(key, int) and key < len(node):
            node = node[key]
        else:
            return False
    return True


def applicable(base: dict[str, Any], path: tuple) -> list[str]:
    """Every value kind (`unknown_type` only for a `type`); deleting and misspelling only a key the
    recipe has (a list entry can be deleted, not misspelled)."""
    kinds = [kind for kind in VALUES if kind != "unknown_type" or path[-1] == "type"] + ["unknown_key"]
    if present(base, path):
        kinds += ["delete"] + (["typo"] if isinstance(path[-1], str) else [])
    return kinds


@dataclass
class Outcome:
    path: str
    kind: str
    result: str  # "refused", "accepted", "traceback"
    detail: str = ""
    warnings: tuple[str, ...] = ()


class Hang(BaseException):
    """A check that ran too long (a BaseException: plugin builders turn an Exception into a one-line error)."""


def _alarm(signum, frame):
    raise Hang(f"validate ran past {SECONDS_PER_CHECK} s")


def validate_in_process(recipe: dict[str, Any], tmp_path) -> tuple[str, str, tuple[str, ...]]:
    """Run `zenalign validate` on the recipe in this process: (result, detail, warnings)."""
    from zenalign.commands.cli import cmd_validate

    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe, allow_unicode=True, sort_keys=False), encoding="utf-8")
    records: list[str] = []
    handler = logging.Handler(logging.WARNING)
    handler.emit = lambda record: records.append(record.getMessage())
    logger = logging.getLogger("zenalign")
    logger.addHandler(handler)
    previous = signal.signal(signal.SIGALRM, _alarm)
    signal.alarm(SECONDS_PER_CHECK)
    try:
        with warnings.catch_warnings(record=True) as caught, contextlib.redirect_stdout(io.StringIO()):
            warnings.simplefilter("always")
            cmd_validate(argparse.Namespace(recipe=str(path), overrides=[]))
        return "accepted", "", tuple(records) + tuple(str(w.message) for w in caught)
    except ZenalignError as exc:
        message = str(exc)
        if "\n" in message or len(message) > 1000:
            return "traceback", f"a message of {message.count(chr(10)) + 1} lines, {len(message)} characters: {message[:300]!r}", ()
        return "refused", message, ()
    except (Exception, Hang) as exc:  # noqa: BLE001 - anything else is what the fuzz looks for
        return "traceback", f"{type(exc).__name__}: {exc}"[:500], ()
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)
        logger.removeHandler(handler)


def dotted(path: tuple) -> str:
    return ".".join(f"[{k}]" if isinstance(k, int) else k for k in path).replace(".[", "[")


BOOLEANS = ("engine.consolidate_checkpoints", "engine.gradient_checkpointing", "engine.keep_freed_memory",
            "engine.lean_forward", "engine.offload_optimizer", "engine.offload_params", "engine.shared_prompts",
            "engine.skip_zero_advantage", "model.trust_remote_code", "normalizer.unbiased_std", "rewards[0].case_sensitive",
            "rewards[0].numeric", "rewards[0].strip", "run.overwrite", "run.progress_bar")
LARGE = ("huge", "int64", "bigger")  # 10^9, 2^63, 10^30


@dataclass(frozen=True)
class Acceptable:
    """Mutations that make a valid recipe: the fields (fnmatch patterns), the mutation kinds, why
    the result is valid, and whether validate must say something about it (a warning)."""

    paths: tuple[str, ...]
    kinds: tuple[str, ...]
    reason: str
    warns: bool = False


ACCEPTABLE = [
    Acceptable(("*",), ("delete",), "a field left out takes the schema's default (and a plugin entry its type's)"),
    Acceptable(("model.lora", "model.reference_path", "model.tokenizer_path", "engine.num_threads",
                "engine.micro_batch_size", "engine.max_grad_norm", "loss.clip_epsilon_high", "rewards[0].extract",
                "rewards[0].name", "run.eval_temperature", "run.eval_answer_pattern", "sampling.max_prompt_length"), ("null",),
               "null is the field's documented default or 'off'"),
    Acceptable(BOOLEANS, ("true", "false", "zero"), "a switch set to true or false (0 reads as false: pydantic)"),
    Acceptable(("engine.zero_stage", "loss.clip_epsilon", "loss.clip_epsilon_high", "grpo.kl_coef", "grpo.warmup_steps",
                "grpo.weight_decay", "grpo.top_entropy_quantile", "run.checkpoint_interval", "run.eval_interval",
                "run.hacking_patience", "run.log_samples", "run.eval_group_size", "run.seed", "data.eval_size",
                "data.seed", "sampling.top_k", "rewards[0].correct_score", "rewards[0].wrong_score",
                "run.eval_correct_reward"), ("zero",),
               "0 is documented for the field: off, none, or a value like any other"),
    Acceptable(("run.steps", "grpo.num_iterations", "grpo.warmup_steps", "run.checkpoint_interval", "run.eval_interval",
                "run.log_interval", "run.hacking_patience", "run.keep_checkpoints", "run.log_samples"), LARGE,
               "a count of steps, passes or checkpoints: a large one makes a long run or an event that never comes, not "
               "a wrong one (and a run stops at SIGINT with a checkpoint)"),
    Acceptable(("run.eval_batch_size", "engine.micro_batch_size"), LARGE,
               "a batch larger than the prompts or completions there are holds all of them (the memory check counts "
               "what there is)"),
    Acceptable(("sampling.top_k",), LARGE, "more than the vocabulary keeps every token (top-k takes the smaller)"),
    Acceptable(("run.seed",), ("huge",), "a seed in 0 .. 2^32 - 1"),
    Acceptable(("data.seed",), LARGE + ("negative",), "the word lists' seed: Python's random.Random takes any integer"),
    Acceptable(("grpo.learning_rate",), LARGE + ("tiny", "fraction"),
               "a positive finite rate: one too high diverges, and engine.on_nonfinite stops that run with one line"),
    Acceptable(("grpo.kl_coef",), LARGE, "a KL weight above 10: valid, but validate warns that the penalty then "
               "outweighs the policy gradient", warns=True),
    Acceptable(("grpo.kl_coef", "loss.clip_epsilon", "grpo.weight_decay"), ("tiny", "fraction"),
               "within the field's range (weight decay: learning_rate x weight_decay < 1)"),
    Acceptable(("loss.clip_epsilon_high",), LARGE + ("tiny", "fraction"),
               "the upper clip range: a large one leaves the ratio unclipped above (clip-higher taken to its end)"),
    Acceptable(("grpo.top_entropy_quantile",), ("tiny", "fraction"),
               "rho in [0, 1]: the share of tokens that carry the policy gradient, at least the highest-entropy one"),
    Acceptable(("engine.max_grad_norm",), LARGE + ("tiny", "fraction"),
               "a positive norm: a tiny one scales every step down, a huge one never clips"),
    Acceptable(("normalizer.eps",), LARGE + ("tiny", "fraction"),
               "a positive eps: a large one shrinks every advantage towards 0"),
    Acceptable(("rewards[0].correct_score", "rewards[0].wrong_score", "run.eval_correct_reward"),
               LARGE + ("negative", "negative_float", "fraction", "tiny"), "a score (or the score counted correct): any finite number"),
    Acceptable(("sampling.temperature", "run.eval_temperature"), LARGE + ("fraction",),
               "a finite temperature of at least 1e-6: a high one samples near-uniform tokens, as asked"),
    Acceptable(("sampling.top_p",), ("tiny", "fraction"),
               "in (0, 1]: a tiny one keeps only the most likely token (the filter keeps at least one)"),
    Acceptable(("data.alphabet",), ("string", "unicode", "nul"), "the letters words are made of: any two or more"),
    Acceptable(("rewards[0].answer_field",), ("string", "empty", "long", "unicode", "nul"),
               "a field name; the records lack it, so validate warns that the verifier abstains on them", warns=True),
    Acceptable(("rewards[0].extract", "run.eval_answer_pattern"), ("string", "empty", "long", "unicode", "nul"),
               "a valid regular expression"),
    Acceptable(("rewards[0].name",), ("string", "long", "unicode", "nul"), "an objective's name: any text but blank"),
    Acceptable(("run.output_dir",), ("string", "unicode"), "a directory relative to the working directory"),
    Acceptable(("run.name",), ("null", "string", "empty", "long", "unicode", "nul"),
               "the run's name in trackers: any text (null or empty: the run directory's name)"),
]


def reason_for(outcome: Outcome) -> Acceptable | None:
    """The allow-list entry that explains an accepted mutation (one that must warn, only if it did)."""
    for entry in ACCEPTABLE:
        if outcome.kind in entry.kinds and any(fnmatch.fnmatchcase(outcome.path, p.replace("[", "[[]")) for p in entry.paths):
            if not entry.warns or outcome.warnings:
                return entry
    return None


def fuzz(tmp_path) -> list[Outcome]:
    rng = random.Random(SEED)
    base = base_recipe(tmp_path)
    paths = schema_paths(base)
    outcomes = []
    for _ in range(MUTATIONS):
        path = rng.choice(paths)
        kind = rng.choice(applicable(base, path))
        result, detail, warned = validate_in_process(apply(base, path, kind), tmp_path)
        outcomes.append(Outcome(dotted(path), kind, result, detail, warned))
    return outcomes


def one_recipe_model(monkeypatch) -> None:
    """Build the recipe's pydantic model once for the installed plugins instead of at every
    validate (two thirds of the fuzz's time): no mutation loads a plugin (`plugins` takes a list of
    strings, which no mutation makes), so it is the same model every time."""
    from zenalign.recipe import loader

    built = {}

    def cached(registry):
        key = tuple((kind, tuple(registry.names(kind))) for kind in sorted(registry.types))
        if key not in built:
            built[key] = build_recipe_model(registry)
        return built[key]

    build_recipe_model = loader.build_recipe_model
    monkeypatch.setattr(loader, "build_recipe_model", cached)


def test_the_recipe_fuzz_finds_no_traceback_and_no_unexplained_acceptance(tmp_path, monkeypatch):
    one_recipe_model(monkeypatch)
    outcomes = fuzz(tmp_path)
    tracebacks = [o for o in outcomes if o.result == "traceback"]
    accepted = [o for o in outcomes if o.result == "accepted"]
    unexplained = [o for o in accepted if reason_for(o) is None]
    print(f"\nrecipe fuzz (seed {SEED}): {len(outcomes)} tried, "
          f"{sum(o.result == 'refused' for o in outcomes)} refused with one line, "
          f"{len(accepted) - len(unexplained)} accepted with a reason ({sum(bool(o.warnings) for o in accepted)} of them "
          f"warned about), {len(unexplained)} accepted without one, {len(tracebacks)} tracebacks")
    for entry in ACCEPTABLE:
        used = sorted({f"{o.path}={o.kind}" for o in accepted if reason_for(o) is entry})
        if used:
            print(f"  {len(used):3d} x {entry.reason}: {', '.join(used)}")
    assert not tracebacks, [f"{o.path} = {o.kind}: {o.detail}" for o in tracebacks]
    assert not unexplained, sorted({f"{o.path} = {o.kind} (warnings: {o.warnings})" for o in unexplained})

"""Building a run's parts from a recipe: the policy and its tokenizer, the reference, reward
sources, the normalizer and the prompts. Plugins are built through the registry only; nothing
here knows any particular plugin."""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Optional, Sequence

import torch

from zenalign.data import check_records, messages_field, render_prompt
from zenalign.errors import DataError, ModelLoadError, PluginError, RecipeError, ZenalignError, one_line
from zenalign.models.loading import (check_tokenizer_fits, frozen_copy, load_causal_lm, load_tokenizer, model_config,
                                     pick_device, prepare_tokenizer)
from zenalign.models.lora import (add_adapters, holds_adapter, is_adapted, load_adapter, load_adapter_weights,
                                  require_peft)
from zenalign.plugins import (BuildContext, Critic, Objectives, default_name, enforces_constraints, fields_read,
                              get_plugin_manager, import_object, takes_token_advantages)
from zenalign.recipe.loader import LoadedRecipe
from zenalign.recipe.schema import KL_COEF_WARNING, EnvironmentEntry, RewardEntry
from zenalign.grpo.scoring import BoundReward, Scorer, bind_reward
from zenalign.generation.environment import Budgets, Choice, EnvironmentReward, Environments
from zenalign.generation.episodes import render_episode_prompt
from zenalign.generation.vllm_engine import check_vllm
from zenalign.train.budget import check_memory

log = logging.getLogger("zenalign")


@dataclass
class Inputs:
    """What the Python API hands over directly instead of naming it in the recipe."""

    model: Any = None
    tokenizer: Any = None
    reference: Any = None
    rewards: Any = None
    normalizer: Any = None
    reward_weights: Optional[Sequence[float]] = None  # one per given reward (TRL's reward_weights)
    train_dataset: Any = None  # prompts when train() gets none (TRL's train_dataset: a list or datasets.Dataset)
    eval_dataset: Any = None
    tools: Optional[Sequence[Any]] = None  # TRL's tools=: plain functions the policy may call
    environment_factory: Any = None  # TRL's environment_factory=: a class or callable, or {name: one}


def take_trl_arguments(options: dict[str, Any], reward_model: Any, tokenizer: Any) -> tuple[Any, ...]:
    """TRL's GRPOTrainer argument names, taken out of ``options``: ``reward_funcs`` (our
    ``reward_model``), ``processing_class`` (``tokenizer``), ``reward_weights``, ``train_dataset``,
    ``eval_dataset``, ``tools`` and ``environment_factory``. Returns (reward_model, tokenizer,
    reward_weights, train_dataset, eval_dataset, tools, environment_factory)."""
    for ours, theirs, given in (("reward_model", "reward_funcs", reward_model), ("tokenizer", "processing_class", tokenizer)):
        if theirs in options and given is not None:
            raise RecipeError(f"GRPOTrainer: give {ours} or TRL's name for it, {theirs}, not both")
    return (options.pop("reward_funcs", reward_model), options.pop("processing_class", tokenizer),
            options.pop("reward_weights", None), options.pop("train_dataset", None), options.pop("eval_dataset", None),
            options.pop("tools", None), options.pop("environment_factory", None))


def api_environment(factory: Any) -> tuple[Any, str]:
    """The environment source and name for ``GRPOTrainer(environment_factory=...)``."""
    factories = factory if isinstance(factory, dict) else {None: factory}
    for key, one in factories.items():
        if not callable(one):
            raise RecipeError(f"GRPOTrainer: environment_factory{f'[{key!r}]' if key is not None else ''} is a "
                              f"{type(one).__name__}; give a class or a function returning an environment object "
                              f"(TRL's environment_factory)")
    sources = {key: _FactorySource(one) for key, one in factories.items()}
    if isinstance(factory, dict):  # each record's 'environment' field picks one, as in TRL
        return Choice(sources), "environment"
    return sources[None], getattr(factory, "__name__", type(factory).__name__)


class _FactorySource:
    """An environment source from a factory given to the API: one call per episode."""

    def __init__(self, factory: Any):
        self.factory = factory

    def new_episode(self) -> Any:
        return self.factory()


class Builder:
    """Builds each part of a run from the recipe, or takes it from ``Inputs``."""

    def __init__(self, loaded: LoadedRecipe, inputs: Inputs, context: BuildContext):
        self.loaded = loaded
        self.recipe = loaded.recipe
        self.inputs = inputs
        self.context = context
        self.longest_prompt = 0  # tokens, over the training and eval prompts (set by check_prompts)
        self.environments: Optional[Environments] = None  # set by environment()

    def path(self, path: str) -> Path:
        return self.context.resolve_path(path)

    @property
    def policy_dir(self) -> Optional[Path]:
        """The policy's directory, when it comes from one."""
        if self.inputs.model is not None or self.recipe.model.path is None:
            return None
        return self.path(self.recipe.model.path)

    def check(self) -> tuple[Objectives, Scorer]:
        """Every part but the policy, each built as ``run`` builds it (what ``validate`` runs):
        the prompts, the reward sources, their inputs, the objectives, normalizer, loss and filters."""
        if self.recipe.model.lora is not None:
            require_peft()
        train, evals = self.prompts(None, None)
        rewards = self.rewards(self.environment())
        m = self.recipe.model
        has_tokenizer = m.path or m.tokenizer_path or self.inputs.tokenizer is not None
        self.check_inputs(self.tokenizer() if has_tokenizer else None, train, evals, rewards)  # not the model
        scorer, objectives = Scorer(rewards), self.objectives(rewards)
        self.loss(self.normalizer())
        self.filters()
        return objectives, scorer

    def tokenizer(self):
        m = self.recipe.model
        if self.inputs.tokenizer is not None:
            return prepare_tokenizer(self.inputs.tokenizer)
        source = m.tokenizer_path or m.path
        if source is None and self.inputs.model is not None:
            source = getattr(self.inputs.model, "name_or_path", None)
            if not source or not self.path(source).is_dir():
                raise RecipeError("GRPOTrainer: pass tokenizer=... along with a model object (or model.tokenizer_path)")
        if source is None:
            raise RecipeError(f"{self.loaded.source}: model.path: required field is missing; give a local Hugging Face model directory")
        return load_tokenizer(self.path(source), "model.tokenizer_path" if m.tokenizer_path else "model.path", m.trust_remote_code)

    def policy(self, checkpoint_policy: Optional[Path] = None) -> torch.nn.Module:
        """The policy: from a checkpoint being resumed, the model object given, or model.path; with
        ``model.lora``, wrapped with adapters (fresh ones, or the checkpoint's)."""
        m = self.recipe.model
        adapter = checkpoint_policy is not None and holds_adapter(checkpoint_policy)
        self._check_resumed_layout(checkpoint_policy, adapter)
        if checkpoint_policy is not None and not adapter:
            return load_causal_lm(checkpoint_policy, "--resume", m.trust_remote_code)
        model = self.inputs.model if self.inputs.model is not None else self._base()
        if is_adapted(model):
            if m.lora is not None:
                raise RecipeError("GRPOTrainer: the model given already has peft adapters; leave out lora=...")
            if not any(p.requires_grad for p in model.parameters()):
                raise RecipeError("GRPOTrainer: the peft model given has no trainable parameters; load its adapter with "
                                  "PeftModel.from_pretrained(base, path, is_trainable=True)")
            if adapter:
                load_adapter_weights(model, checkpoint_policy)
            return model
        if m.lora is None:
            return model
        return load_adapter(model, checkpoint_policy) if adapter else add_adapters(model, m.lora)

    def _base(self) -> torch.nn.Module:
        m = self.recipe.model
        if m.path is None:
            raise RecipeError(f"{self.loaded.source}: model.path: required field is missing; give a local Hugging Face model directory")
        return load_causal_lm(self.path(m.path), "model.path", m.trust_remote_code)

    def _check_resumed_layout(self, checkpoint_policy: Optional[Path], adapter: bool) -> None:
        """A LoRA checkpoint resumes only with LoRA, a full-model one only without."""
        if checkpoint_policy is None:
            return
        with_lora = self.recipe.model.lora is not None or is_adapted(self.inputs.model)
        if adapter and not with_lora:
            raise ModelLoadError(f"--resume: checkpoint '{checkpoint_policy.parent}' holds LoRA adapters (its run set "
                                 f"model.lora); resume with the same model.lora, or start a new run")
        if with_lora and not adapter:
            raise ModelLoadError(f"--resume: checkpoint '{checkpoint_policy.parent}' holds a full model (its run had no "
                                 f"model.lora); resume without model.lora, or start a new run")

    def reference(self, policy: torch.nn.Module, needed: bool) -> Optional[torch.nn.Module]:
        """The frozen reference, or None when no KL term ``needed`` it (it is then never loaded) or
        when the policy has adapters (the reference is then the policy with its adapters off)."""
        m = self.recipe.model
        if not needed:
            return None
        if self.inputs.reference is not None:
            ref = self.inputs.reference
        elif m.reference_path is not None:
            ref = load_causal_lm(self.path(m.reference_path), "model.reference_path", m.trust_remote_code)
        elif is_adapted(policy):
            return None
        elif self.inputs.model is None and m.path is not None:
            ref = load_causal_lm(self.path(m.path), "model.reference_path", m.trust_remote_code)
        else:
            ref = frozen_copy(policy)
        ref.eval()
        ref.requires_grad_(False)
        return ref

    def plugin(self, kind: str, section: str, entry: Any, context: Optional[BuildContext] = None) -> Any:
        if entry is None:
            installed = ", ".join(self.loaded.registry.names(kind)) or "none"
            raise RecipeError(f"{self.loaded.source}: {section}: is null; give {{type: ...}} (installed: {installed})")
        plugin_type = self.loaded.registry.get(kind, entry.type)
        where = f"{self.loaded.source}: {section} ({entry.type})"
        try:
            return plugin_type.build(entry, context or self.context)
        except ZenalignError as exc:
            raise type(exc)(f"{where}: {exc}") from exc
        except Exception as exc:
            raise PluginError(f"{where}: could not be built: {type(exc).__name__}: {one_line(exc)}") from exc

    def environment(self) -> Optional[Environments]:
        """The run's environment (None for one-turn completions): the recipe's ``environment``
        section, or the Python API's ``tools=`` and ``environment_factory=``. Its first episode is
        made here, so a factory that raises, an episode without ``reset`` or a tool the chat
        template cannot be told about stops the run before it starts."""
        entry, given_tools, factory = self.recipe.environment, self.inputs.tools, self.inputs.environment_factory
        if entry is None and not given_tools and factory is None:
            return None
        if given_tools or factory is not None:  # the recipe's section may still set the budgets, and add tools
            if entry is not None and entry.type != "python_tools":
                raise RecipeError(f"GRPOTrainer: environment_factory/tools given and the recipe's environment is "
                                  f"'{entry.type}'; give one environment")
            entry = entry or EnvironmentEntry()
            source, name = (None, "tools") if factory is None else api_environment(factory)
        else:
            source = self.plugin("environment", "environment", entry)
            name = entry.name or entry.type
        tools = [import_object(spec, self.context.base_dir, f"{self.loaded.source}: environment.tools[{i}]")
                 for i, spec in enumerate(entry.tools)] + list(given_tools or [])
        budgets = Budgets(entry.max_turns, entry.max_episode_tokens, entry.tool_timeout_s, entry.max_tool_output_chars)
        environments = self.environments = Environments(name, source, tools, budgets)
        return environments

    def rewards(self, environments: Optional[Environments] = None) -> list[BoundReward]:
        bound = []
        for i, entry in enumerate(self.recipe.rewards):
            source = self.plugin("reward", f"rewards[{i}]", entry)
            name = entry.name or default_name(source) or entry.type
            bound.append(bind_reward(source, name, entry.type, entry.weight, where=f"rewards[{i}]",
                                     timeout_s=entry.timeout_s))
        given = self.inputs.rewards
        given = [] if given is None else list(given) if isinstance(given, (list, tuple)) else [given]
        weights = self.inputs.reward_weights
        if weights is not None and len(weights) != len(given):
            raise RecipeError(f"GRPOTrainer: reward_weights has {len(weights)} entries but {len(given)} reward "
                              f"function(s) were given; give one weight per reward function")
        if given:
            for i, source in enumerate(given):
                adapted = get_plugin_manager().hook.zenalign_reward_from_object(obj=source, context=self.context)
                if adapted is not None:
                    source = adapted
                name = getattr(source, "name", None) or getattr(source, "__name__", None)
                name = name if name and name != "<lambda>" else f"reward_{i}"
                weight = float(weights[i]) if weights is not None else getattr(source, "weight", 1.0)
                if not math.isfinite(weight):
                    raise RecipeError(f"GRPOTrainer: the weight of reward_model[{i}] '{name}' is {weight}; give a "
                                      f"finite number")
                bound.append(bind_reward(source, name, type(source).__name__, weight, where=f"reward_model[{i}]",
                                         timeout_s=RewardEntry.model_fields["timeout_s"].default))
        if environments is not None and environments.has_reward:
            several = len(environments.sources) > 1
            for cls in environments.rewarded:
                source = EnvironmentReward(environments, cls if several else None)
                bound.append(bind_reward(source, source.default_name, "environment", 1.0, where="environment",
                                         timeout_s=RewardEntry.model_fields["timeout_s"].default))
        if not bound:
            raise RecipeError(
                f"{self.loaded.source}: rewards: no reward source is configured; add at least one "
                f"{{type: ...}} entry (installed: {', '.join(self.loaded.registry.names('reward'))})"
            )
        return bound

    def objectives(self, rewards: list[BoundReward], where: str = "objectives") -> Objectives:
        """Names from the reward sources; weight, role and threshold from the recipe's ``objectives``."""
        produced = [name for bound in rewards for name in bound.objectives]
        entry_weight = {name: w for bound in rewards for name, w in zip(bound.objectives, bound.weights)}
        specs = self.recipe.objectives
        for name in specs:
            if name not in entry_weight:
                raise RecipeError(
                    f"{self.loaded.source}: {where}.{name}: no reward source produces objective '{name}'; "
                    f"produced: {', '.join(produced)}"
                )
        weights, roles, thresholds, directions = [], [], [], []
        for name in produced:
            spec = specs.get(name)
            weights.append(spec.weight if spec is not None and spec.weight is not None else entry_weight[name])
            roles.append(spec.role if spec is not None else "reward")
            thresholds.append(spec.threshold if spec is not None else None)
            directions.append(spec.direction if spec is not None else ">=")
        if all(w == 0 for w, role in zip(weights, roles) if role == "reward"):
            raise RecipeError(
                f"{self.loaded.source}: {where}: every reward objective has weight 0 ({', '.join(produced)}); "
                f"give at least one a non-zero weight"
            )
        return Objectives(tuple(produced), torch.tensor(weights, dtype=torch.float64), tuple(roles),
                          tuple(thresholds), tuple(directions))

    def loss(self, normalizer: Any = None):
        """The policy loss named by the recipe's ``loss`` section (the default loss when it is left out);
        one that declares ``takes_token_advantages = False`` is refused with a per-token normalizer."""
        # the two run settings a loss formula needs besides its own options (BuildContext says why)
        settings = replace(self.context, kl_coef=self.recipe.grpo.kl_coef,
                           max_new_tokens=self.recipe.sampling.max_new_tokens)
        loss = self.plugin("loss", "loss", self.recipe.loss, settings)
        if isinstance(normalizer, Critic) and not takes_token_advantages(loss):
            raise RecipeError(f"{self.loaded.source}: loss ({self.recipe.loss.type}): takes one advantage per completion, "
                              f"but normalizer '{getattr(self.recipe.normalizer, 'type', 'given')}' gives one per token; "
                              f"use a per-token loss such as grpo or cispo")
        return loss

    def filters(self) -> list[tuple[str, Any]]:
        """The rollout filters of the recipe's ``filters`` list, in order, each with its name."""
        return [(entry.type, self.plugin("filter", f"filters[{i}]", entry)) for i, entry in enumerate(self.recipe.filters)]

    def warn_unenforced_constraints(self, objectives: Objectives, normalizer: Any) -> None:
        """Constraint objectives with a normalizer that does not enforce them are combined as rewards: say so."""
        if objectives.constraint_indices and not enforces_constraints(normalizer):
            log.warning("objectives %s are constraints, but normalizer '%s' does not enforce constraints; they are "
                        "combined as weighted rewards (choose a normalizer that enforces constraints; see `zenalign plugins`)",
                        ", ".join(objectives.names[k] for k in objectives.constraint_indices),
                        getattr(self.recipe.normalizer, "type", "given"))

    def normalizer(self):
        if self.inputs.normalizer is not None:
            return self.inputs.normalizer
        return self.plugin("normalizer", "normalizer", self.recipe.normalizer)

    def check_inputs(self, tokenizer: Any, train: Sequence[dict[str, Any]], evals: Sequence[dict[str, Any]],
                     rewards: Sequence[BoundReward]) -> None:
        """What ``validate`` and ``run`` check before step 1: a warning for each field a reward
        reads that training records lack, and for a KL coefficient that outweighs the advantages;
        and, with the tokenizer, :meth:`check_prompts`."""
        kl_coef = self.recipe.grpo.kl_coef
        if kl_coef > KL_COEF_WARNING:
            log.warning("grpo.kl_coef is %g: above %g the KL penalty outweighs the policy-gradient term (advantages are "
                        "about 1 in size) and the policy barely moves from the reference; the GRPO paper uses 0.01",
                        kl_coef, KL_COEF_WARNING)
        for bound in rewards:
            for name in fields_read(bound.source):
                missing = sum(record.get(name) is None for record in train)
                patience = self.recipe.run.hacking_patience
                if missing:  # the Scorer keeps those completions from it: they abstain
                    log.warning("%s reads the field '%s', which %d of %d training prompts lack (or hold null): it "
                                "abstains on their completions (abstain_frac/%s in metrics.jsonl)%s", bound.label, name,
                                missing, len(train), bound.objectives[0],
                                f"; with every prompt lacking it, the run stops after {patience} steps without a score "
                                f"(run.hacking_patience)" if missing == len(train) and patience else "")
        if tokenizer is not None:
            self.check_prompts(tokenizer, train, evals)

    def check_prompts(self, tokenizer: Any, train: Sequence[dict[str, Any]], evals: Sequence[dict[str, Any]]) -> None:
        """With the tokenizer loaded: its ids fit the model's embedding table, every prompt renders
        (chat messages need a chat template), and the longest prompt plus
        ``sampling.max_new_tokens`` fits the model's positions; with ``sampling.decoder: vllm``, what
        vLLM needs (:func:`~zenalign.generation.vllm_engine.check_vllm`)."""
        model_dir = self.policy_dir
        check_tokenizer_fits(tokenizer, model_dir, "model.tokenizer_path" if self.recipe.model.tokenizer_path else "model.path")
        rows = [("prompts", i, r) for i, r in enumerate(train)] + [("eval prompts", i, r) for i, r in enumerate(evals)]
        source = self.recipe.model.tokenizer_path or self.recipe.model.path
        for where, i, record in rows:
            if messages_field(record) and getattr(tokenizer, "chat_template", None) is None:
                raise DataError(f"{where}[{i}]: '{messages_field(record)}' is a list of chat messages but the tokenizer "
                                f"{f'of {source!r}' if source else 'given'} has no chat template; give a tokenizer "
                                f"with one (model.tokenizer_path) or 'prompt' as text")
        environments = self.environments
        texts = [render_prompt(record, tokenizer) if environments is None else
                 render_episode_prompt(record, tokenizer, environments.described, None) for _, _, record in rows]
        lengths = [len(ids) for ids in tokenizer(texts, add_special_tokens=False).input_ids] if texts else [0]
        longest = max(lengths)
        where, i, _ = rows[lengths.index(longest)] if texts else ("prompts", 0, None)
        at = f"{where}[{i}]"
        longest = self.longest_prompt = self._prompt_limit(lengths, longest, at)
        config = model_config(model_dir)
        positions = config.get("text_config", config).get("max_position_embeddings")
        new = self.recipe.sampling.max_new_tokens
        if isinstance(positions, int) and longest + new > positions:
            raise RecipeError(f"sampling.max_new_tokens: the longest prompt ({at}) is {longest} tokens, and "
                              f"{longest} + {new} = {longest + new} exceeds the model's {positions} positions "
                              f"(max_position_embeddings in {model_dir}/config.json); lower max_new_tokens or shorten the prompts "
                              f"(sampling.max_prompt_length)")
        device = self.context.device.type if self.context.device is not None else pick_device(self.recipe.engine.device).type
        if self.recipe.sampling.decoder == "vllm":
            check_vllm(self.recipe.sampling, config, longest, at, device)
        given = getattr(self.inputs.model, "config", None)  # a model object: its config, as config.json would hold it
        check_memory(self.recipe, given.to_dict() if hasattr(given, "to_dict") else config, longest, len(evals), device,
                     self.loaded.source)

    def _prompt_limit(self, lengths: list[int], longest: int, at: str) -> int:
        """The longest prompt as sampled: ``sampling.max_prompt_length`` truncates longer ones (and
        says how many) or refuses them (naming the longest, ``at``)."""
        limit, how = self.recipe.sampling.max_prompt_length, self.recipe.sampling.long_prompts
        over = sum(length > limit for length in lengths) if limit is not None else 0
        if over and how == "refuse":
            raise RecipeError(f"sampling.max_prompt_length: {over} prompt(s) are longer than {limit} tokens, the longest "
                              f"({at}) {longest}; shorten them, raise max_prompt_length, or set sampling.long_prompts: "
                              f"truncate (each keeps its last {limit} tokens)")
        if over:
            log.info("sampling.max_prompt_length: %d of %d prompts are longer than %d tokens; they keep their last %d "
                     "(sampling.long_prompts: truncate)", over, len(lengths), limit, limit)
        return min(longest, limit) if limit is not None else longest

    def prompts(self, prompts: Optional[Sequence[Any]], eval_prompts: Optional[Sequence[Any]]):
        prompts = prompts if prompts is not None else self.inputs.train_dataset
        eval_prompts = eval_prompts if eval_prompts is not None else self.inputs.eval_dataset
        if prompts is not None:
            train = check_records(prompts, "prompts")
            evals = check_records(eval_prompts or [], "eval_prompts")
        elif self.recipe.data is not None:
            task = self.plugin("task", "data", self.recipe.data)
            path = getattr(self.recipe.data, "path", None)
            source = f"{self.loaded.source}: data ({self.recipe.data.type}{f', {path}' if isinstance(path, str) else ''})"
            train = check_records(task.train_prompts(), source)
            evals = check_records(task.eval_prompts(), f"{source} eval")
        else:
            raise RecipeError(
                f"{self.loaded.source}: data: required field is missing; name a prompt source "
                f"{{type: ...}} (installed: {', '.join(self.loaded.registry.names('task'))})"
            )
        if not train:
            raise RecipeError(f"{self.loaded.source}: data: the prompt set is empty; give at least one training prompt")
        return train, evals

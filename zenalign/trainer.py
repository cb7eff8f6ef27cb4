"""GRPOTrainer: the GRPO loop as a sequence of named, timed phases.

    prompts -> sample (k per prompt) -> score (K objectives) -> normalize (advantages)
            -> reference (log-probs, if KL) -> update (mu passes) -> log

``setup()`` builds the parts, ``train()`` runs the loop, ``cleanup()`` ends it. The CLI
(``zenalign run``) and the Python API (``GRPOTrainer(model=..., reward_model=...)``) both end up
here, with the same recipe object.
"""

from __future__ import annotations

import logging
import random
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

import numpy as np
import torch
from tqdm.auto import tqdm

from zenalign.data import PromptSampler, check_records, metadata_columns, render_prompt
from zenalign.engine import TorchEngine
from zenalign.errors import PluginError, RecipeError, ZenalignError, one_line
from zenalign.loss import completion_logprobs, grpo_token_loss, masked_mean, token_weights
from zenalign.metrics import PhaseTimer, reward_metrics
from zenalign.models import eos_token_ids, frozen_copy, load_causal_lm, load_tokenizer, pick_device, prepare_tokenizer
from zenalign.plugin_types import BuildContext, ScoreBatch
from zenalign.plugins import get_plugin_manager
from zenalign.recipe import Recipe
from zenalign.recipe_loader import LoadedRecipe, validate_recipe
from zenalign.rundir import RunDir
from zenalign.sampling import Rollout, generate_groups
from zenalign.scoring import Scorer, bind_reward

log = logging.getLogger("zenalign")

# Recipe sections whose fields GRPOTrainer accepts as plain keyword arguments.
FLAT_SECTIONS = ("model", "sampling", "grpo", "engine", "run")


@dataclass
class TrainResult:
    """What ``train()`` returns: where the run is and the first and last evaluations."""

    output_dir: Path
    steps: int
    initial_eval: dict[str, Any] = field(default_factory=dict)
    final_eval: dict[str, Any] = field(default_factory=dict)


def _option_sections() -> dict[str, str]:
    owner: dict[str, str] = {}
    for section in FLAT_SECTIONS:
        for name in Recipe.model_fields[section].annotation.model_fields:
            owner[name] = section
    return owner


def recipe_from_options(options: dict[str, Any], name: str) -> LoadedRecipe:
    """Build a recipe from keyword arguments: section names (``grpo={...}``) or any field of
    model/sampling/grpo/engine/run by its own name (``group_size=12``)."""
    owner = _option_sections()
    data: dict[str, Any] = {}
    for key, value in options.items():
        if key in Recipe.model_fields:
            data[key] = value
        elif key in owner:
            data.setdefault(owner[key], {})[key] = value
        else:
            raise RecipeError(
                f"GRPOTrainer: unknown option '{key}'; options are recipe sections ({', '.join(Recipe.model_fields)}) "
                f"or fields of {', '.join(FLAT_SECTIONS)} such as group_size, clip_epsilon, kl_coef, learning_rate, steps"
            )
    return validate_recipe(data, source="GRPOTrainer(...)", base_dir=Path.cwd(), name=name)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


class GRPOTrainer:
    """Group Relative Policy Optimization.

    ``GRPOTrainer(model=model, reward_model=reward_model, group_size=12, clip_epsilon=0.15).train(prompts)``

    ``model`` is a local Hugging Face directory or a loaded causal LM; ``reward_model`` is a
    reward source, a plain function ``(prompts, completions, **fields) -> scores``, or a list of
    them (one objective each). Any recipe field is accepted by name (``kl_coef=0.0``,
    ``steps=50``) or a whole section as a dict (``grpo={...}``).
    """

    def __init__(
        self,
        model: Any = None,
        reward_model: Any = None,
        *,
        tokenizer: Any = None,
        reference_model: Any = None,
        normalizer: Any = None,
        recipe: Optional[LoadedRecipe] = None,
        **options: Any,
    ):
        if isinstance(model, (str, Path)):
            options.setdefault("path", str(model))
            model = None
        if isinstance(normalizer, str):
            options["normalizer"] = {"type": normalizer}
            normalizer = None
        elif isinstance(normalizer, dict):
            options["normalizer"], normalizer = normalizer, None
        if recipe is None:
            recipe = recipe_from_options(options, name=time.strftime("grpo-%Y%m%d-%H%M%S"))
        elif options:
            raise RecipeError("GRPOTrainer: give either a recipe or keyword options, not both")
        self.loaded = recipe
        self.recipe: Recipe = recipe.recipe
        self._model_in = model
        self._tokenizer_in = tokenizer
        self._reference_in = reference_model
        self._rewards_in = reward_model
        self._normalizer_in = normalizer
        self.hook = get_plugin_manager().hook
        self.step = 0
        self.samples_seen = 0

    @classmethod
    def from_recipe(cls, loaded: LoadedRecipe) -> "GRPOTrainer":
        return cls(recipe=loaded)

    # ------------------------------------------------------------------------------------------
    # setup

    def check(self) -> None:
        """Build the prompt source, reward sources and normalizer without loading the policy:
        what ``zenalign validate`` runs, so it catches what ``run`` would reject before step 1."""
        self.context = BuildContext(recipe=self.recipe, base_dir=self.loaded.base_dir)
        self._build_prompts(None, None)
        Scorer(self._build_rewards())
        self._build_normalizer()

    def setup(self, prompts: Optional[Sequence[Any]] = None, eval_prompts: Optional[Sequence[Any]] = None) -> None:
        r = self.recipe
        self.run_dir = RunDir(self.loaded.output_dir)
        self.run_dir.check(overwrite=r.run.overwrite)  # before loading anything: fail fast
        seed_everything(r.run.seed)
        self.device = pick_device(r.engine.device)
        self.tokenizer, model = self._build_policy()
        self.context = BuildContext(recipe=r, base_dir=self.loaded.base_dir, tokenizer=self.tokenizer, device=self.device)
        self.eos_ids = eos_token_ids(model, self.tokenizer)
        self.reference = self._build_reference(model) if r.grpo.kl_coef > 0 else None
        self.scorer = Scorer(self._build_rewards())
        self.objectives = self.scorer.objectives
        self.normalizer = self._build_normalizer()
        train_records, eval_records = self._build_prompts(prompts, eval_prompts)
        self.sampler = PromptSampler(train_records, seed=r.run.seed)
        self.eval_records = eval_records
        total_optimizer_steps = r.run.steps * r.grpo.num_iterations
        self.engine = TorchEngine(model, r.grpo, r.engine, total_optimizer_steps, self.device)
        if self.reference is not None:
            self.reference.to(self.device)
        self.run_dir.prepare(overwrite=r.run.overwrite)
        self.run_dir.write_recipe(r.model_dump(mode="json"))
        self._log_handler = logging.FileHandler(self.run_dir.path / "run.log", encoding="utf-8")
        self._log_handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
        log.addHandler(self._log_handler)

    @property
    def model(self) -> torch.nn.Module:
        """The policy being trained."""
        return self.engine.model

    def context_path(self, path: str) -> Path:
        p = Path(path).expanduser()
        return p if p.is_absolute() else self.loaded.base_dir / p

    def _build_policy(self):
        m = self.recipe.model
        if self._model_in is not None:
            model = self._model_in
            tokenizer = self._tokenizer_in
            if tokenizer is None:
                source = m.tokenizer_path or getattr(model, "name_or_path", None)
                if not source or not Path(self.context_path(source)).is_dir():
                    raise RecipeError("GRPOTrainer: pass tokenizer=... along with a model object (or model.tokenizer_path)")
                tokenizer = load_tokenizer(self.context_path(source), "model.tokenizer_path", m.trust_remote_code)
            return prepare_tokenizer(tokenizer), model
        if m.path is None:
            raise RecipeError(f"{self.loaded.source}: model.path: required field is missing; give a local Hugging Face model directory")
        path = self.context_path(m.path)
        model = load_causal_lm(path, "model.path", m.trust_remote_code)
        if self._tokenizer_in is not None:
            tokenizer = prepare_tokenizer(self._tokenizer_in)
        else:
            tokenizer = load_tokenizer(self.context_path(m.tokenizer_path or m.path), "model.tokenizer_path", m.trust_remote_code)
        return tokenizer, model

    def _build_reference(self, policy: torch.nn.Module) -> torch.nn.Module:
        m = self.recipe.model
        if self._reference_in is not None:
            ref = self._reference_in
        elif m.reference_path is not None or (self._model_in is None and m.path is not None):
            ref = load_causal_lm(self.context_path(m.reference_path or m.path), "model.reference_path", m.trust_remote_code)
        else:
            ref = frozen_copy(policy)
        ref.eval()
        ref.requires_grad_(False)
        return ref

    def _build_plugin(self, kind: str, section: str, entry: Any) -> Any:
        plugin_type = self.loaded.registry.get(kind, entry.type)
        where = f"{self.loaded.source}: {section} ({entry.type})"
        try:
            return plugin_type.build(entry, self.context)
        except ZenalignError as exc:
            raise type(exc)(f"{where}: {exc}") from exc
        except Exception as exc:
            raise PluginError(f"{where}: could not be built: {type(exc).__name__}: {one_line(exc)}") from exc

    def _build_rewards(self):
        bound = []
        for i, entry in enumerate(self.recipe.rewards):
            source = self._build_plugin("reward", f"rewards[{i}]", entry)
            bound.append(bind_reward(source, entry.name or entry.type, entry.type, entry.weight, where=f"rewards[{i}]"))
        given = self._rewards_in
        if given is not None:
            for i, source in enumerate(given if isinstance(given, (list, tuple)) else [given]):
                name = getattr(source, "name", None) or getattr(source, "__name__", None)
                name = name if name and name != "<lambda>" else f"reward_{i}"
                weight = getattr(source, "weight", 1.0)
                bound.append(bind_reward(source, name, type(source).__name__, weight, where=f"reward_model[{i}]"))
        if not bound:
            raise RecipeError(
                f"{self.loaded.source}: rewards: no reward source is configured; add at least one "
                f"{{type: ...}} entry (installed: {', '.join(self.loaded.registry.names('reward'))})"
            )
        return bound

    def _build_normalizer(self) -> Callable:
        if self._normalizer_in is not None:
            return self._normalizer_in
        return self._build_plugin("normalizer", "normalizer", self.recipe.normalizer)

    def _build_prompts(self, prompts, eval_prompts):
        if prompts is not None:
            train = check_records(prompts, "prompts")
            evals = check_records(eval_prompts or [], "eval_prompts")
        elif self.recipe.data is not None:
            task = self._build_plugin("task", "data", self.recipe.data)
            train = check_records(task.train_prompts(), f"data ({self.recipe.data.type})")
            evals = check_records(task.eval_prompts(), f"data ({self.recipe.data.type}) eval")
        else:
            raise RecipeError(
                f"{self.loaded.source}: data: required field is missing; name a prompt source "
                f"{{type: ...}} (installed: {', '.join(self.loaded.registry.names('task'))})"
            )
        if not train:
            raise RecipeError(f"{self.loaded.source}: data: the prompt set is empty; give at least one training prompt")
        return train, evals

    # ------------------------------------------------------------------------------------------
    # train

    def train(self, prompts: Optional[Sequence[Any]] = None, eval_prompts: Optional[Sequence[Any]] = None) -> TrainResult:
        """Run ``run.steps`` GRPO steps; evaluate before, every ``run.eval_interval`` steps, and after."""
        self.setup(prompts, eval_prompts)
        try:
            return self._loop()
        finally:
            self.cleanup()

    def _loop(self) -> TrainResult:
        r = self.recipe.run
        self.hook.zenalign_on_train_start(trainer=self, start_step=self.step)
        result = TrainResult(self.run_dir.path, r.steps)
        result.initial_eval = self.evaluate()
        progress = tqdm(total=r.steps, initial=self.step, desc="GRPO", unit="step", disable=not r.progress_bar, dynamic_ncols=True)
        with progress:
            while self.step < r.steps:
                self.step += 1
                metrics = self.train_step()
                progress.set_postfix(reward=f"{metrics['reward_mean']:.3f}", kl=f"{metrics['kl']:.4f}", refresh=False)
                progress.update(1)
                if r.eval_interval and self.step % r.eval_interval == 0 and self.step < r.steps:
                    self.evaluate()
        result.final_eval = self.evaluate()
        self.save_final()
        self.hook.zenalign_on_train_end(trainer=self, step=self.step)
        return result

    def train_step(self) -> dict[str, Any]:
        """One GRPO step: sample -> score -> normalize -> reference -> update -> log."""
        g = self.recipe.grpo
        timer = PhaseTimer()
        with timer("sample"):
            records = self.sampler.next_batch(g.prompts_per_step)
            rollout = self.sample(records, greedy=False)
        with timer("score"):
            rewards = self.score(records, rollout, self.recipe.sampling.group_size)  # (N, K)
        with timer("normalize"):
            advantages = self.normalize(rewards)  # (N,)
        ref_logp = None
        if self.reference is not None:
            with timer("reference"):
                ref_logp = self.logprobs(self.reference, rollout)
        with timer("update"):
            update = self.update(rollout, advantages, ref_logp)
        with timer("log"):
            self.samples_seen += len(rollout)
            metrics = self.step_metrics(rollout, rewards, update, timer)
            self._log_samples(records, rollout, rewards, advantages)
        metrics["time/log"] = round(timer.seconds["log"], 6)
        self.run_dir.append("metrics.jsonl", [metrics])
        self.hook.zenalign_on_step_end(trainer=self, step=self.step, metrics=metrics)
        return metrics

    def sample(self, records: list[dict[str, Any]], greedy: bool) -> Rollout:
        texts = [render_prompt(rec, self.tokenizer) for rec in records]
        group_size = 1 if greedy else self.recipe.sampling.group_size
        return generate_groups(
            self.engine.model, self.tokenizer, texts, self.recipe.sampling, self.eos_ids, group_size,
            greedy=greedy, autocast=self.engine.autocast(),
        )

    def score(self, records: list[dict[str, Any]], rollout: Rollout, group_size: int) -> torch.Tensor:
        prompts = [render_prompt(rec, self.tokenizer) for rec in records for _ in range(group_size)]
        batch = ScoreBatch(
            prompts=prompts,
            completions=rollout.completions,
            columns=metadata_columns(records, group_size),
            completion_ids=rollout.completion_ids,
            group_size=group_size,
            step=self.step,
        )
        return self.scorer(batch)

    def normalize(self, rewards: torch.Tensor) -> torch.Tensor:
        n, k = rewards.shape
        group_size = self.recipe.sampling.group_size
        advantages = self.normalizer(rewards.view(n // group_size, group_size, k), self.objectives)
        if not isinstance(advantages, torch.Tensor) or advantages.numel() != n:
            raise PluginError(
                f"normalizer '{getattr(self.recipe.normalizer, 'type', type(self.normalizer).__name__)}' returned "
                f"{getattr(advantages, 'shape', type(advantages).__name__)}; expected one advantage per completion ({n // group_size}, {group_size})"
            )
        if torch.isnan(advantages).any():
            raise PluginError(f"normalizer '{getattr(self.recipe.normalizer, 'type', '?')}' returned NaN advantages")
        return advantages.reshape(n).to(torch.float32)

    @torch.no_grad()
    def logprobs(self, model: torch.nn.Module, rollout: Rollout) -> torch.Tensor:
        """Log-probs of the sampled tokens under ``model`` (no gradient), micro-batched."""
        chunks = []
        for rows in self._micro_batches(len(rollout)):
            with self.engine.autocast():
                chunks.append(
                    completion_logprobs(model, rollout.sequences[rows], rollout.attention_mask[rows],
                                        rollout.prompt_length, self.recipe.sampling.temperature)
                )
        return torch.cat(chunks)

    def _micro_batches(self, n: int) -> list[slice]:
        size = self.recipe.engine.micro_batch_size or n
        return [slice(start, min(start + size, n)) for start in range(0, n, size)]

    def update(self, rollout: Rollout, advantages: torch.Tensor, ref_logp: Optional[torch.Tensor]) -> dict[str, float]:
        """mu optimizer steps on this batch of generations, each over all its micro-batches."""
        g = self.recipe.grpo
        model = self.engine.model
        model.train()
        mask = rollout.completion_mask
        weights = token_weights(mask, g.loss_aggregation, self.recipe.sampling.max_new_tokens)
        # Old log-probs once per generation; with mu = 1 the policy has not moved yet, so the
        # detached current log-probs are exactly pi_old and that forward pass is skipped.
        old_logp = self.logprobs(model, rollout) if g.num_iterations > 1 else None
        clip_high = g.clip_epsilon_high if g.clip_epsilon_high is not None else g.clip_epsilon
        totals = {"loss": 0.0, "kl": 0.0, "clip": 0.0, "ratio": 0.0, "grad_norm": 0.0}
        for _ in range(g.num_iterations):
            for rows in self._micro_batches(len(rollout)):
                with self.engine.autocast():
                    logp = completion_logprobs(model, rollout.sequences[rows], rollout.attention_mask[rows],
                                               rollout.prompt_length, self.recipe.sampling.temperature)
                old = old_logp[rows] if old_logp is not None else logp.detach()
                token = grpo_token_loss(
                    logp, old, advantages[rows], g.clip_epsilon, clip_high,
                    ref_logp=ref_logp[rows] if ref_logp is not None else None,
                    kl_coef=g.kl_coef, kl_estimator=g.kl_estimator,
                )
                loss = (token.loss * weights[rows]).sum()
                self.engine.backward(loss)
                totals["loss"] += float(loss.detach())
                share = float(mask[rows].sum()) / max(float(mask.sum()), 1.0)
                totals["clip"] += masked_mean(token.clipped.detach(), mask[rows]) * share
                totals["ratio"] += masked_mean(token.ratio.detach(), mask[rows]) * share
                if token.kl is not None:
                    totals["kl"] += masked_mean(token.kl.detach(), mask[rows]) * share
            totals["grad_norm"] += self.engine.step()
        return {key: value / g.num_iterations for key, value in totals.items()}

    def step_metrics(self, rollout: Rollout, rewards: torch.Tensor, update: dict[str, float], timer: PhaseTimer) -> dict[str, Any]:
        mask = rollout.completion_mask.float()
        step_seconds = timer.elapsed()
        metrics: dict[str, Any] = {"step": self.step, "samples": self.samples_seen}
        metrics.update(reward_metrics(rewards, self.objectives, self.recipe.sampling.group_size))
        metrics.update(
            loss=update["loss"],
            kl=update["kl"],
            clip_frac=update["clip"],
            ratio_mean=update["ratio"],
            grad_norm=update["grad_norm"],
            lr=self.engine.learning_rate,
            completion_len=float(mask.sum(1).mean()),
            truncated_frac=float(rollout.truncated.float().mean()),
            completions_per_s=len(rollout) / step_seconds if step_seconds > 0 else 0.0,
        )
        metrics.update(timer.as_metrics())
        if self.step % self.recipe.run.log_interval == 0:
            log.info(
                "step %d/%d  reward %.3f  kl %.4f  clip %.3f  %.1f completions/s",
                self.step, self.recipe.run.steps, metrics["reward_mean"], metrics["kl"], metrics["clip_frac"],
                metrics["completions_per_s"],
            )
        return metrics

    def _log_samples(self, records, rollout: Rollout, rewards: torch.Tensor, advantages: torch.Tensor) -> None:
        r = self.recipe.run
        if not r.log_samples or self.step % r.log_interval != 0:
            return
        group_size = self.recipe.sampling.group_size
        lines = []
        for p, rec in enumerate(records[: r.log_samples]):
            for i in range(p * group_size, (p + 1) * group_size):
                lines.append({
                    "step": self.step,
                    "prompt": render_prompt(rec, self.tokenizer),
                    "completion": rollout.completions[i],
                    "rewards": dict(zip(self.objectives.names, rewards[i].tolist())),
                    "advantage": float(advantages[i]),
                })
        self.run_dir.append("samples.jsonl", lines)

    # ------------------------------------------------------------------------------------------
    # evaluation, saving, cleanup

    def evaluate(self) -> dict[str, Any]:
        """Greedy completions for every held-out prompt, scored by every reward source."""
        if not self.eval_records:
            return {}
        size = self.recipe.run.eval_batch_size
        scores, shown = [], []
        for start in range(0, len(self.eval_records), size):
            records = self.eval_records[start : start + size]
            rollout = self.sample(records, greedy=True)
            scores.append(self.score(records, rollout, 1))
            if start == 0:
                shown = [{"step": self.step, "eval": True, "prompt": render_prompt(rec, self.tokenizer), "completion": c}
                         for rec, c in zip(records[:4], rollout.completions)]
        rewards = torch.cat(scores)
        metrics = {"step": self.step, "samples": self.samples_seen}
        metrics.update(reward_metrics(rewards, self.objectives, 1, prefix="eval/"))
        self.run_dir.append("eval.jsonl", [metrics])
        self.run_dir.append("samples.jsonl", shown)
        self.hook.zenalign_on_eval_end(trainer=self, step=self.step, metrics=metrics)
        summary = "  ".join(f"{name} {metrics[f'eval/reward_mean/{name}']:.3f}" for name in self.objectives.names)
        log.info("eval at step %d: %s", self.step, summary)
        return metrics

    def save_final(self) -> Path:
        """The trained policy as a save_pretrained directory (safetensors), written atomically."""
        final = self.run_dir.path / "final"
        staging = self.run_dir.path / "final.tmp"
        import shutil

        shutil.rmtree(staging, ignore_errors=True)
        self.engine.model.save_pretrained(staging, safe_serialization=True)
        self.tokenizer.save_pretrained(staging)
        shutil.rmtree(final, ignore_errors=True)
        staging.rename(final)
        return final

    def cleanup(self) -> None:
        handler = getattr(self, "_log_handler", None)
        if handler is not None:
            log.removeHandler(handler)
            handler.close()

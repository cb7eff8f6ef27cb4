"""GRPOTrainer: the GRPO loop as a sequence of named, timed phases.

    prompts -> sample (k per prompt) -> score (K objectives) -> normalize (advantages)
            -> reference (log-probs, if KL) -> update (mu passes) -> log

``setup()`` builds the parts, ``train()`` runs the loop, ``cleanup()`` ends it. The CLI
(``zenalign run``) and the Python API (``GRPOTrainer(model=..., reward_model=...)``) both end up
here with the same recipe object.

Several processes (torchrun or the deepspeed launcher): every rank draws the same global batch of
prompts and samples its own slice of whole groups; rewards are gathered before normalising, so
group and batch statistics are those of the global batch; each rank's loss uses global token
counts, so the update equals the single-process one. Rank 0 writes the run directory.
"""

from __future__ import annotations

import logging
import random
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Sequence

import numpy as np
import torch
from tqdm.auto import tqdm

from zenalign import checkpoint as ckpt
from zenalign.components import Builder, Inputs, recipe_from_options
from zenalign.data import PromptSampler, metadata_columns, render_prompt
from zenalign.distributed import Dist, init_distributed
from zenalign.engine import create_engine
from zenalign.errors import PluginError, RecipeError
from zenalign.gumbel import completion_keys
from zenalign.loss import completion_logprobs, grpo_token_loss, token_weights
from zenalign.metrics import PhaseTimer, collapse_rate, hacking_warnings, reward_metrics
from zenalign.memory import keep_freed_memory
from zenalign.models import eos_token_ids, pick_device
from zenalign.plugin_types import BuildContext, Objectives, ScoreBatch
from zenalign.plugins import get_plugin_manager
from zenalign.recipe import Recipe
from zenalign.recipe_loader import LoadedRecipe
from zenalign.rundir import RunDir
from zenalign.sampling import Rollout, generate_groups
from zenalign.scoring import Scorer

log = logging.getLogger("zenalign")


@dataclass
class TrainResult:
    """What ``train()`` returns: where the run is and the first and last evaluations."""

    output_dir: Path
    steps: int
    initial_eval: dict[str, Any] = field(default_factory=dict)
    final_eval: dict[str, Any] = field(default_factory=dict)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def rows_that_move(batches: list[slice], advantages: torch.Tensor,
                   mask: torch.Tensor) -> tuple[list[slice | torch.Tensor], float]:
    """The micro-batches with the completions whose advantage is exactly zero left out, and how
    many completion tokens those held.

    Without a KL term and with pi_old the current policy (mu = 1), such a completion's per-token
    loss is ``-min(1 * 0, clip(1) * 0) = 0`` with a zero gradient: leaving it out of the forward
    and backward pass changes neither the loss nor the gradient (the token weights are computed
    from the whole batch first). A group whose completions all earned the same reward is all
    zeros under the group normalizers. Each micro-batch keeps at least its first row, so every
    micro-batch still runs a backward pass: ranks under DDP or DeepSpeed stay in step, and every
    parameter gets a gradient (zero where nothing moved), so the optimizer step is the same too.
    """
    kept, skipped_tokens = [], 0.0
    for rows in batches:
        moving = advantages[rows] != 0
        if bool(moving.all()):
            kept.append(rows)
            continue
        moving[0] = True
        index = torch.arange(rows.start, rows.stop, device=advantages.device)[moving]
        skipped_tokens += float(mask[rows][~moving].sum())
        kept.append(index)
    return kept, skipped_tokens


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
        if isinstance(normalizer, (str, dict)):
            options["normalizer"] = {"type": normalizer} if isinstance(normalizer, str) else normalizer
            normalizer = None
        if recipe is None:
            recipe = recipe_from_options(options, name=time.strftime("grpo-%Y%m%d-%H%M%S"))
        elif options:
            raise RecipeError("GRPOTrainer: give either a recipe or keyword options, not both")
        self.loaded = recipe
        self.recipe: Recipe = recipe.recipe
        self.inputs = Inputs(model, tokenizer, reference_model, reward_model, normalizer)
        self.hook = get_plugin_manager().hook
        self.dist = Dist()
        self.step = 0
        self.samples_seen = 0
        self.reference_was_reset = False

    @classmethod
    def from_recipe(cls, loaded: LoadedRecipe) -> "GRPOTrainer":
        return cls(recipe=loaded)

    # ------------------------------------------------------------------------------------------
    # setup

    def check(self) -> Objectives:
        """Build the prompt source, reward sources and normalizer without loading the policy:
        what ``zenalign validate`` runs, so it catches what ``run`` would reject before step 1.
        Returns the run's objectives."""
        builder = Builder(self.loaded, self.inputs, BuildContext(recipe=self.recipe, base_dir=self.loaded.base_dir))
        builder.prompts(None, None)
        rewards = builder.rewards()
        Scorer(rewards)
        objectives = builder.objectives(rewards)
        builder.normalizer()
        return objectives

    def setup(self, prompts=None, eval_prompts=None, resume: Optional[str] = None) -> None:
        r = self.recipe
        self.dist = init_distributed(r.engine.backend)
        if r.grpo.prompts_per_step % self.dist.world_size:
            raise RecipeError(
                f"{self.loaded.source}: grpo.prompts_per_step ({r.grpo.prompts_per_step}) must be divisible by the "
                f"number of processes ({self.dist.world_size}), so every process samples whole groups"
            )
        self.run_dir = RunDir(self.loaded.output_dir)
        self.resumed_from = ckpt.find_checkpoint(resume, self.run_dir.path) if resume else None
        saved = ckpt.verify(self.resumed_from) if self.resumed_from else None
        if saved is None:
            self.run_dir.check(overwrite=r.run.overwrite)  # before loading anything: fail fast
        elif self.dist.is_main:
            log.info("resuming from %s (step %d)", self.resumed_from, saved["step"])
        seed_everything(r.run.seed)
        device = pick_device(r.engine.device)
        self.device = torch.device("cuda", self.dist.local_rank) if device.type == "cuda" else device
        if self.device.type == "cpu" and r.engine.keep_freed_memory:
            keep_freed_memory()
        self.context = BuildContext(recipe=r, base_dir=self.loaded.base_dir, device=self.device)
        self.engine = create_engine(r, self.dist, self.device)  # first: ZeRO-3 must see the models load
        builder = Builder(self.loaded, self.inputs, self.context)
        self.tokenizer = builder.tokenizer()
        self.context = BuildContext(recipe=r, base_dir=self.loaded.base_dir, tokenizer=self.tokenizer, device=self.device)
        builder.context = self.context
        from_checkpoint = self.resumed_from / "policy" if saved and saved.get("consolidated") else None
        policy = builder.policy(from_checkpoint)
        self.policy_config_dir = builder.policy_dir
        self.eos_ids = eos_token_ids(policy, self.tokenizer)
        reference = builder.reference(policy)
        rewards = builder.rewards()
        self.scorer = Scorer(rewards)
        self.objectives = builder.objectives(rewards)
        self.normalizer = builder.normalizer()
        if self.objectives.constraint_indices and not getattr(self.normalizer, "enforces_constraints", False):
            log.warning("objectives %s are constraints, but normalizer '%s' does not enforce constraints; they are "
                        "combined as weighted rewards (choose a normalizer that enforces constraints; see `zenalign plugins`)",
                        ", ".join(self.objectives.names[k] for k in self.objectives.constraint_indices),
                        getattr(self.recipe.normalizer, "type", "given"))
        train_records, self.eval_records = builder.prompts(prompts, eval_prompts)
        self.sampler = PromptSampler(train_records, seed=r.run.seed)
        local = r.grpo.prompts_per_step // self.dist.world_size * r.sampling.group_size
        micro_batches = -(-local // (r.engine.micro_batch_size or local))
        self.engine.attach(policy, r.run.steps * r.grpo.num_iterations, micro_batches)
        self.reference = self.engine.prepare_reference(reference) if reference is not None else None
        if saved is not None:
            ckpt.check_compatible(saved["fingerprint"], ckpt.fingerprint(self), self.resumed_from)
            ckpt.restore(self, self.resumed_from, saved)
            if self.dist.is_main:
                self.run_dir.truncate_after(self.step)
        elif self.dist.is_main:
            self.run_dir.prepare(overwrite=r.run.overwrite)
        if self.dist.is_main:
            self.run_dir.write_recipe(r.model_dump(mode="json"))
            self._log_handler = logging.FileHandler(self.run_dir.path / "run.log", encoding="utf-8")
            self._log_handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
            log.addHandler(self._log_handler)
        self.dist.barrier()

    @property
    def model(self) -> torch.nn.Module:
        """The policy being trained (the plain Hugging Face module)."""
        return self.engine.model

    def reset_reference_to_policy(self) -> None:
        """Make the KL reference a copy of the current policy (online preference learning may ask
        for it at each reward-model refresh). Checkpoints then carry the reference weights."""
        if self.reference is None:
            return
        if self.recipe.engine.zero_stage == 3:
            raise RecipeError("resetting the reference policy is not supported at ZeRO stage 3; use stage 0-2")
        state = {k: v.detach() for k, v in self.engine.model.state_dict().items()}
        self.reference.load_state_dict(state)
        self.reference_was_reset = True

    def stateful_plugins(self) -> dict[str, Any]:
        """Plugins whose state goes into checkpoints, by slot name."""
        slots = {"normalizer": self.normalizer}
        slots.update({f"rewards-{i}": bound.source for i, bound in enumerate(self.scorer.rewards)})
        return {k: v for k, v in slots.items() if hasattr(v, "state_dict") or hasattr(v, "save_state")}

    # ------------------------------------------------------------------------------------------
    # train

    def train(self, prompts: Optional[Sequence[Any]] = None, eval_prompts: Optional[Sequence[Any]] = None,
              resume: Optional[str] = None) -> TrainResult:
        """Run ``run.steps`` GRPO steps; evaluate before, every ``run.eval_interval`` steps, and after.

        ``resume``: ``"auto"`` continues from the newest checkpoint in the run directory (or starts
        fresh if there is none); a path continues from that checkpoint.
        """
        self.setup(prompts, eval_prompts, resume)
        try:
            return self._loop()
        finally:
            self.cleanup()

    def _loop(self) -> TrainResult:
        r = self.recipe.run
        main = self.dist.is_main
        if main:
            self.hook.zenalign_on_train_start(trainer=self, start_step=self.step)
        result = TrainResult(self.run_dir.path, r.steps)
        evals = self.run_dir.read("eval.jsonl") if self.resumed_from and main else []
        result.initial_eval = evals[0] if evals else self.evaluate()
        last_eval = evals[-1]["step"] if evals else 0
        progress = tqdm(total=r.steps, initial=self.step, desc="GRPO", unit="step", dynamic_ncols=True,
                        disable=not (r.progress_bar and main))
        with progress:
            while self.step < r.steps:
                self.step += 1
                metrics = self.train_step()
                progress.set_postfix(reward=f"{metrics['reward_mean']:.3f}", kl=f"{metrics['kl']:.4f}", refresh=False)
                progress.update(1)
                if r.eval_interval and self.step % r.eval_interval == 0 and self.step < r.steps:
                    self.evaluate()
                    last_eval = self.step
                if r.checkpoint_interval and self.step % r.checkpoint_interval == 0 and self.step < r.steps:
                    ckpt.save_checkpoint(self)
        result.final_eval = self.evaluate() if last_eval != self.step or not evals else evals[-1]
        ckpt.save_checkpoint(self)
        self.save_final()
        if main:
            self.hook.zenalign_on_train_end(trainer=self, step=self.step)
        return result

    def train_step(self) -> dict[str, Any]:
        """One GRPO step: sample -> score -> normalize -> reference -> update -> log."""
        g, group_size = self.recipe.grpo, self.recipe.sampling.group_size
        per_rank = g.prompts_per_step // self.dist.world_size
        timer = PhaseTimer()
        with timer("sample"):
            records = self.sampler.next_batch(g.prompts_per_step)  # the same global batch on every rank
            records = records[self.dist.rank * per_rank : (self.dist.rank + 1) * per_rank]
            first = self.dist.rank * per_rank * group_size
            keys = completion_keys(self.recipe.run.seed, self.step, first, per_rank * group_size)
            rollout = self.sample(records, keys)
        with timer("score"):
            batch = self.score_batch(records, rollout, group_size)
            local_rewards = self.scorer(batch)  # (N_local, K)
            for bound in self.scorer.rewards:
                if hasattr(bound.source, "on_scored"):  # e.g. a reward model refreshed online
                    bound.source.on_scored(batch, local_rewards, self.objectives, self)
            rewards = self.dist.gather_rows(local_rewards)  # (N, K), all ranks
        with timer("normalize"):
            all_advantages = self.normalize(rewards)  # (N,), the global batch
            advantages = all_advantages[first : first + len(rollout)]  # this rank's rows
        ref_logp = None
        if self.reference is not None:
            with timer("reference"):
                ref_logp = self.logprobs(self.reference, rollout)
        with timer("update"):
            update = self.update(rollout, advantages, ref_logp)
        with timer("log"):
            self.samples_seen += len(rollout) * self.dist.world_size
            metrics = self.step_metrics(rollout, rewards, update, timer)
            metrics["adv_collapse_frac"] = collapse_rate(rewards.view(-1, group_size, rewards.shape[1]),
                                                         all_advantages.view(-1, group_size))
            if hasattr(self.normalizer, "metrics"):
                metrics.update(self.normalizer.metrics())
            for bound in self.scorer.rewards:
                if hasattr(bound.source, "metrics"):
                    metrics.update({f"{bound.name}/{k}": v for k, v in bound.source.metrics().items()})
            if self.dist.is_main:
                self._log_samples(records, rollout, rewards, advantages)
        metrics["time/log"] = round(timer.seconds["log"], 6)
        if self.dist.is_main:
            self.run_dir.append("metrics.jsonl", [metrics])
            self.hook.zenalign_on_step_end(trainer=self, step=self.step, metrics=metrics)
        return metrics

    def sample(self, records: list[dict[str, Any]], keys: Optional[torch.Tensor], group_size: Optional[int] = None) -> Rollout:
        """``group_size`` (default: the recipe's) sampled completions per prompt, one per key; or,
        without keys, one greedy completion per prompt."""
        texts = [render_prompt(rec, self.tokenizer) for rec in records]
        group_size = (group_size or self.recipe.sampling.group_size) if keys is not None else 1
        return generate_groups(
            self.engine.model, self.tokenizer, texts, self.recipe.sampling, self.eos_ids, group_size,
            keys=keys, autocast=self.engine.autocast(), synced_gpus=self.engine.synced_gpus,
            lean_forward=self.recipe.engine.lean_forward,
        )

    def score_batch(self, records: list[dict[str, Any]], rollout: Rollout, group_size: int) -> ScoreBatch:
        prompts = [render_prompt(rec, self.tokenizer) for rec in records for _ in range(group_size)]
        return ScoreBatch(
            prompts=prompts,
            completions=rollout.completions,
            columns=metadata_columns(records, group_size),
            completion_ids=rollout.completion_ids,
            group_size=group_size,
            step=self.step,
        )

    def score(self, records: list[dict[str, Any]], rollout: Rollout, group_size: int) -> torch.Tensor:
        return self.scorer(self.score_batch(records, rollout, group_size))

    def normalize(self, rewards: torch.Tensor) -> torch.Tensor:
        """Advantages for the global batch ``(N,)`` from rewards ``(N, K)``."""
        n, k = rewards.shape
        group_size = self.recipe.sampling.group_size
        name = getattr(self.recipe.normalizer, "type", type(self.normalizer).__name__)
        advantages = self.normalizer(rewards.view(n // group_size, group_size, k), self.objectives)
        if not isinstance(advantages, torch.Tensor) or advantages.numel() != n:
            raise PluginError(
                f"normalizer '{name}' returned {getattr(advantages, 'shape', type(advantages).__name__)}; expected one "
                f"advantage per completion ({n // group_size}, {group_size})"
            )
        if torch.isnan(advantages).any():
            raise PluginError(f"normalizer '{name}' returned NaN advantages")
        return advantages.reshape(n).to(torch.float32)

    @torch.no_grad()
    def logprobs(self, model: torch.nn.Module, rollout: Rollout) -> torch.Tensor:
        """Log-probs of the sampled tokens under ``model`` (no gradient), micro-batched."""
        chunks = []
        for rows in self._micro_batches(len(rollout)):
            with self.engine.autocast():
                chunks.append(completion_logprobs(model, rollout.sequences[rows], rollout.attention_mask[rows],
                                                  rollout.prompt_length, self.recipe.sampling.temperature,
                                                  share_prompts=self.recipe.engine.shared_prompts,
                                                  lean=self.recipe.engine.lean_forward))
        return torch.cat(chunks)

    def _micro_batches(self, n: int) -> list[slice]:
        size = self.recipe.engine.micro_batch_size or n
        return [slice(start, min(start + size, n)) for start in range(0, n, size)]

    def update(self, rollout: Rollout, advantages: torch.Tensor, ref_logp: Optional[torch.Tensor]) -> dict[str, float]:
        """mu optimizer steps on this batch of generations, each over all its micro-batches.

        Returns this rank's sums (loss, and KL/clip/ratio over its tokens) per pass, averaged over
        passes, for :meth:`step_metrics` to combine across ranks.
        """
        g = self.recipe.grpo
        world = self.dist.world_size
        self.engine.train_model.train()
        mask = rollout.completion_mask
        advantages = advantages.to(mask.device)  # rewards are scored on the CPU; the loss runs where the model does
        local_tokens = float(mask.sum())
        global_tokens = self.dist.sum([local_tokens])[0]
        weights = token_weights(mask, g.loss_aggregation, self.recipe.sampling.max_new_tokens,
                                num_sequences=len(rollout) * world, num_tokens=global_tokens)
        # Old log-probs once per generation; with mu = 1 the policy has not moved yet, so the
        # detached current log-probs are exactly pi_old and that forward pass is skipped.
        old_logp = self.logprobs(self.engine.train_model, rollout) if g.num_iterations > 1 else None
        sums = {"loss": 0.0, "kl": 0.0, "clip": 0.0, "ratio": 0.0, "grad_norm": 0.0}
        batches = self._micro_batches(len(rollout))
        if self.recipe.engine.skip_zero_advantage and old_logp is None and ref_logp is None:
            batches, skipped_tokens = rows_that_move(batches, advantages, mask)
            sums["ratio"] += skipped_tokens  # pi = pi_old on every skipped token: a ratio of exactly 1, never clipped
        for _ in range(g.num_iterations):
            for i, rows in enumerate(batches):
                with self.engine.micro_batch(last=i == len(batches) - 1):
                    loss, token = self.policy_loss(rollout, rows, advantages, weights, old_logp, ref_logp)
                    # Processes' gradients are averaged; scaling by the world size makes them sum.
                    self.engine.backward(loss * world)
                m = mask[rows].to(token.loss.dtype)
                sums["loss"] += float(loss.detach())
                sums["clip"] += float((token.clipped.detach() * m).sum())
                sums["ratio"] += float((token.ratio.detach() * m).sum())
                if token.kl is not None:
                    sums["kl"] += float((token.kl.detach() * m).sum())
            sums["grad_norm"] += self.engine.optimizer_step()
        passes = g.num_iterations
        return {key: value / passes for key, value in sums.items()} | {"tokens": local_tokens}

    def policy_loss(self, rollout: Rollout, rows: slice | torch.Tensor, advantages: torch.Tensor, weights: torch.Tensor,
                    old_logp: Optional[torch.Tensor], ref_logp: Optional[torch.Tensor]):
        """This micro-batch's share of the batch loss, ``sum(w * per-token loss)``, with gradient,
        and the per-token terms. ``old_logp=None`` means pi_old is the current policy (mu = 1)."""
        g = self.recipe.grpo
        clip_high = g.clip_epsilon_high if g.clip_epsilon_high is not None else g.clip_epsilon
        with self.engine.autocast():
            logp = completion_logprobs(self.engine.train_model, rollout.sequences[rows], rollout.attention_mask[rows],
                                       rollout.prompt_length, self.recipe.sampling.temperature,
                                       share_prompts=self.recipe.engine.shared_prompts,
                                       lean=self.recipe.engine.lean_forward)
        old = old_logp[rows] if old_logp is not None else logp.detach()
        token = grpo_token_loss(logp, old, advantages[rows], g.clip_epsilon, clip_high,
                                ref_logp=ref_logp[rows] if ref_logp is not None else None,
                                kl_coef=g.kl_coef, kl_estimator=g.kl_estimator)
        return (token.loss * weights[rows]).sum(), token

    def step_metrics(self, rollout: Rollout, rewards: torch.Tensor, update: dict[str, float], timer: PhaseTimer) -> dict[str, Any]:
        """The step's metrics over all ranks (every rank computes the same numbers)."""
        loss, kl, clip, ratio, tokens, lengths, truncated = self.dist.sum([
            update["loss"], update["kl"], update["clip"], update["ratio"], update["tokens"],
            float(rollout.completion_mask.sum()), float(rollout.truncated.sum()),
        ])
        seconds = dict(zip(timer.seconds, self.dist.max(list(timer.seconds.values()))))
        n = len(rollout) * self.dist.world_size
        step_seconds = self.dist.max([timer.elapsed()])[0]
        metrics: dict[str, Any] = {"step": self.step, "samples": self.samples_seen}
        metrics.update(reward_metrics(rewards, self.objectives, self.recipe.sampling.group_size))
        metrics.update(
            loss=loss, kl=kl / max(tokens, 1.0), clip_frac=clip / max(tokens, 1.0), ratio_mean=ratio / max(tokens, 1.0),
            grad_norm=update["grad_norm"], lr=self.engine.learning_rate, completion_len=lengths / n,
            truncated_frac=truncated / n, completions_per_s=n / step_seconds if step_seconds > 0 else 0.0,
        )
        metrics.update({f"time/{k}": round(v, 6) for k, v in seconds.items()})
        if self.dist.is_main and self.step % self.recipe.run.log_interval == 0:
            log.info("step %d/%d  reward %.3f  kl %.4f  clip %.3f  %.1f completions/s", self.step, self.recipe.run.steps,
                     metrics["reward_mean"], metrics["kl"], metrics["clip_frac"], metrics["completions_per_s"])
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
                    "step": self.step, "prompt": render_prompt(rec, self.tokenizer), "completion": rollout.completions[i],
                    "rewards": dict(zip(self.objectives.names, rewards[i].tolist())), "advantage": float(advantages[i]),
                })
        self.run_dir.append("samples.jsonl", lines)

    # ------------------------------------------------------------------------------------------
    # evaluation, saving, cleanup

    def evaluate(self) -> dict[str, Any]:
        """Greedy completions for every held-out prompt, scored by every reward source (and, with
        ``run.eval_group_size``, sampled groups too). The prompts are split evenly over ranks,
        padded so every rank makes the same calls."""
        if not self.eval_records:
            return {}
        run = self.recipe.run
        world, rank = self.dist.world_size, self.dist.rank
        share = -(-len(self.eval_records) // world)
        mine = self.eval_records[rank * share : (rank + 1) * share]
        valid = torch.zeros(share, dtype=torch.bool)
        valid[: len(mine)] = True
        mine = mine + [self.eval_records[0]] * (share - len(mine))
        metrics: dict[str, Any] = {"step": self.step, "samples": self.samples_seen}
        greedy, shown = self._eval_pass(mine, group_size=1)
        greedy = self.dist.gather_rows(greedy)[self.dist.gather_rows(valid)]
        metrics.update(reward_metrics(greedy, self.objectives, 1, prefix="eval/"))
        if run.eval_group_size > 1:
            sampled, _ = self._eval_pass(mine, group_size=run.eval_group_size, first=rank * share)
            keep = self.dist.gather_rows(valid).repeat_interleave(run.eval_group_size)
            sampled = self.dist.gather_rows(sampled)[keep]
            stats = reward_metrics(sampled, self.objectives, run.eval_group_size, prefix="eval/sampled/")
            metrics.update({k: v for k, v in stats.items() if not k.startswith("eval/sampled/corr/")})
        if self.dist.is_main:
            history = self.run_dir.read("eval.jsonl") + [metrics]
            warnings = hacking_warnings(history, self.objectives.names, run.hacking_patience)
            if warnings:
                metrics["warnings"] = warnings
                for text in warnings:
                    log.warning("possible reward hacking at step %d: %s", self.step, text)
            self.run_dir.append("eval.jsonl", [metrics])
            self.run_dir.append("samples.jsonl", shown)
            self.hook.zenalign_on_eval_end(trainer=self, step=self.step, metrics=metrics)
            summary = "  ".join(f"{name} {metrics[f'eval/reward_mean/{name}']:.3f}" for name in self.objectives.names)
            log.info("eval at step %d: %s", self.step, summary)
        return metrics

    def _eval_pass(self, records: list[dict[str, Any]], group_size: int, first: int = 0):
        """Scores ``(len(records) * group_size, K)``: greedy (group_size 1) or sampled groups with keys
        of their own (independent of the training samples)."""
        size = self.recipe.run.eval_batch_size
        scores, shown = [], []
        for start in range(0, len(records), size):
            chunk = records[start : start + size]
            keys = None
            if group_size > 1:
                keys = completion_keys(self.recipe.run.seed + 1_000_003, self.step, (first + start) * group_size,
                                       len(chunk) * group_size)
            rollout = self.sample(chunk, keys, group_size)
            scores.append(self.score(chunk, rollout, group_size))
            if start == 0 and self.dist.is_main and group_size == 1:
                shown = [{"step": self.step, "eval": True, "prompt": render_prompt(rec, self.tokenizer), "completion": c}
                         for rec, c in zip(chunk[:4], rollout.completions)]
        return torch.cat(scores), shown

    def save_final(self) -> Optional[Path]:
        """The trained policy as a save_pretrained directory (safetensors), written atomically."""
        state = self.engine.policy_state_dict()  # collective at ZeRO-3
        if not self.dist.is_main:
            return None
        final, staging = self.run_dir.path / "final", self.run_dir.path / "final.tmp"
        shutil.rmtree(staging, ignore_errors=True)
        self.engine.model.save_pretrained(staging, state_dict=state, safe_serialization=True)
        self.tokenizer.save_pretrained(staging)
        shutil.rmtree(final, ignore_errors=True)
        staging.rename(final)
        return final

    def cleanup(self) -> None:
        handler = getattr(self, "_log_handler", None)
        if handler is not None:
            log.removeHandler(handler)
            handler.close()

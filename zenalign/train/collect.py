"""The sample, score and filter phases of a step: draw prompts, sample a group per prompt, score
every completion, and run the rollout filters; draw more rounds while a refilling filter
(DAPO's dynamic sampling) has dropped groups and its cap allows.

Every process draws the same global batch of prompts and samples its own slice of whole groups;
rewards are gathered, so filters see the global batch and every process makes the same choice.
Round ``r`` samples with the keys of completions ``r * N ..`` of the step, so round 0 is exactly
the batch a run without filters samples, and the prompt sampler advances by what was drawn, which
a checkpoint records (exact resume holds). When the groups chosen are not simply round 0's, they
are gathered as token rows and each process rebuilds its slice of them.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Optional, Sequence

import torch

from zenalign.data import PromptSampler, render_prompt
from zenalign.grpo.filtering import apply_filters, extra_rounds, select_groups
from zenalign.generation.gumbel import completion_keys
from zenalign.grpo.metrics import PhaseTimer
from zenalign.generation.rollout import Rollout, completion_rows, rollout_from_rows, sampler_logp_rows
from zenalign.grpo.scoring import Scorer
from zenalign.plugins import Objectives, RolloutGroups, RunContext
from zenalign.train.distributed import Dist


@dataclass
class Collected:
    """A step's batch after the filters.

    ``rollout`` and ``records`` are this process's slice of the groups trained on; ``rewards``
    ``(N, K)`` are the global batch's as the normalizer sees them (NaN for groups a filter dropped,
    so they never move the statistics); ``loss_mask`` ``(N_local,)`` says which of this process's
    completions count in the loss (None: all); ``sampled_rewards`` are every completion sampled
    this step, over all rounds (reward metrics are about the policy, not the filtered batch).
    """

    records: list[dict[str, Any]]
    rollout: Rollout
    rewards: torch.Tensor
    sampled_rewards: torch.Tensor
    loss_mask: Optional[torch.Tensor] = None
    metrics: dict[str, float] = field(default_factory=dict)


@dataclass
class Round:
    records: list[dict[str, Any]]  # global
    rollout: Rollout  # this process's slice
    groups: RolloutGroups  # global, after the filters
    rows: list[list[int]]  # global completion token rows (gathered only when a later round may replace groups)
    sampler_rows: list[list[float]]  # their sampler log-probs (vLLM), [] each without


class BatchCollector:
    """Runs the sample -> score -> filter phases of a step (see the module docstring)."""

    def __init__(self, recipe: Any, dist: Dist, sampler: PromptSampler, scorer: Scorer, objectives: Objectives,
                 filters: Sequence[tuple[str, Any]], sample: Callable[..., Rollout], score_batch: Callable[..., Any],
                 tokenizer: Any, eos_ids: Sequence[int], context: RunContext):
        self.recipe, self.dist, self.sampler, self.scorer = recipe, dist, sampler, scorer
        self.objectives, self.filters, self.context = objectives, list(filters), context
        self.sample, self.score_batch, self.tokenizer, self.eos_ids = sample, score_batch, tokenizer, eos_ids
        self.max_rounds = 1 + extra_rounds(self.filters)

    def __call__(self, step: int, timer: PhaseTimer) -> Collected:
        """The step's batch; the time goes to ``timer``'s sample, score and filter phases. A run
        whose reward scored nothing for ``run.hacking_patience`` steps stops here."""
        batch = self.collect(step, timer)
        self.scorer.check_abstentions(batch.sampled_rewards, self.objectives.names, self.recipe.run.hacking_patience, step)
        return batch

    def collect(self, step: int, timer: PhaseTimer) -> Collected:
        target = self.recipe.grpo.prompts_per_step
        rounds: list[Round] = []
        while True:
            records, rollout, rewards = self.sample_round(step, len(rounds), timer)
            if not self.filters:
                return Collected(records[self.local(target)], rollout, rewards, rewards)
            with timer("filter"):
                rounds.append(self.filter_round(step, records, rollout, rewards))
                kept = sum(int(r.groups.keep.sum()) for r in rounds)
                if kept >= target or len(rounds) >= self.max_rounds:
                    return self.assemble(rounds, target)

    def local(self, count: int) -> slice:
        per_rank = count // self.dist.world_size
        return slice(self.dist.rank * per_rank, (self.dist.rank + 1) * per_rank)

    def sample_round(self, step: int, index: int, timer: PhaseTimer) -> tuple[list[dict[str, Any]], Rollout, torch.Tensor]:
        """Draw a global batch of prompts, sample this process's groups, score them; the global ``(N, K)`` rewards."""
        g, group_size = self.recipe.grpo, self.recipe.sampling.group_size
        with timer("sample"):
            records = self.sampler.next_batch(g.prompts_per_step)  # the same global batch on every rank
            mine = records[self.local(g.prompts_per_step)]
            first = (index * g.prompts_per_step + self.local(g.prompts_per_step).start) * group_size
            rollout = self.sample(mine, completion_keys(self.recipe.run.seed, step, first, len(mine) * group_size))
        with timer("score"):
            batch = self.score_batch(mine, rollout, group_size)
            local_rewards = self.scorer(batch)  # (N_local, K)
            self.scorer.observe(batch, local_rewards, self.objectives, self.context)
            return records, rollout, self.dist.gather_rows(local_rewards)

    def filter_round(self, step: int, records: list[dict[str, Any]], rollout: Rollout, rewards: torch.Tensor) -> Round:
        group_size, dist = self.recipe.sampling.group_size, self.dist
        p = len(records)
        lengths = dist.gather_rows(rollout.completion_mask.sum(dim=1).long().cpu())  # with the EOS
        truncated = dist.gather_rows(rollout.truncated.cpu())
        texts = dist.gather_objects(rollout.completions)
        rows = dist.gather_objects(completion_rows(rollout)) if self.max_rounds > 1 else []  # to rebuild a batch
        sampler_rows = dist.gather_objects(sampler_logp_rows(rollout)) if self.max_rounds > 1 else []
        groups = RolloutGroups(
            rewards=rewards.view(p, group_size, -1).clone(), keep=torch.ones(p, dtype=torch.bool),
            loss_mask=torch.ones(p, group_size, dtype=torch.bool), lengths=lengths.view(p, group_size),
            truncated=truncated.view(p, group_size), prompts=[render_prompt(rec, self.tokenizer) for rec in records],
            completions=[texts[i * group_size:(i + 1) * group_size] for i in range(p)], records=list(records),
            max_new_tokens=self.recipe.sampling.max_new_tokens, step=step)
        return Round(records, rollout, apply_filters(self.filters, groups, self.objectives), rows, sampler_rows)

    def assemble(self, rounds: list[Round], target: int) -> Collected:
        """The groups chosen over the rounds, as this process's rollout and the global rewards."""
        group_size, k = self.recipe.sampling.group_size, len(self.objectives)
        selection = select_groups([r.groups.keep for r in rounds], target)
        rewards = torch.stack([rounds[r].groups.rewards[i] for r, i in selection.chosen])          # (P, G, K)
        loss_mask = torch.stack([rounds[r].groups.loss_mask[i] for r, i in selection.chosen])      # (P, G)
        dropped = torch.tensor(selection.dropped, dtype=torch.bool)
        rewards[dropped] = float("nan")  # a dropped group moves no statistic and gets advantage 0
        loss_mask[dropped] = False
        mine = self.local(target)
        if selection.is_first_round:
            records, rollout = rounds[0].records[mine], rounds[0].rollout
        else:
            chosen = selection.chosen[mine]
            records = [rounds[r].records[i] for r, i in chosen]
            rows = [row for r, i in chosen for row in rounds[r].rows[i * group_size:(i + 1) * group_size]]
            logps = [row for r, i in chosen for row in rounds[r].sampler_rows[i * group_size:(i + 1) * group_size]]
            prompts = [rounds[r].groups.prompts[i] for r, i in chosen]
            rollout = rollout_from_rows(self.tokenizer, prompts, rows, group_size, self.eos_ids,
                                        rounds[0].rollout.sequences.device, sampler_rows=logps,
                                        max_prompt_length=self.recipe.sampling.max_prompt_length)
        sampled = torch.cat([r.groups.rewards.reshape(-1, k) for r in rounds])
        masked = loss_mask[mine].reshape(-1)  # (N_local,)
        metrics = {"filter/rounds": float(len(rounds)),
                   "filter/groups_dropped": float(sum(int((~r.groups.keep).sum()) for r in rounds)),
                   "filter/groups_trained": float(target - int(dropped.sum())),
                   "filter/masked_frac": float((~loss_mask).float().mean())}
        return Collected(records, rollout, rewards.reshape(-1, k), sampled,
                         None if bool(masked.all()) else masked.to(rollout.sequences.device), metrics)

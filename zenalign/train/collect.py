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

from concurrent.futures import Future
from dataclasses import dataclass, replace
from typing import Any, Optional, Sequence

import torch

from zenalign.data import PromptSampler, SamplerState, render_prompt
from zenalign.errors import GenerationServerError
from zenalign.grpo.filtering import apply_filters, extra_rounds, select_groups
from zenalign.generation.gumbel import completion_keys
from zenalign.grpo.metrics import PhaseTimer
from zenalign.generation.rollout import (Rollout, completion_rows, policy_mask_rows, prompt_rows, rollout_from_rows,
                                         sampler_logp_rows)
from zenalign.grpo.scoring import Scorer, make_batch
from zenalign.plugins import Objectives, RolloutGroups, RunContext, ScoreBatch
from zenalign.recipe.schema import RunSection, SamplingSection
from zenalign.train.batch import StepBatch
from zenalign.train.distributed import Dist
from zenalign.train.lag import PolicyVersions, sampling_version
from zenalign.train.state import TrainState
from zenalign.generation.generator import Generator


@dataclass
class Round:
    """One round of sampling, scoring and filtering (a refilling filter may ask for more)."""

    records: list[dict[str, Any]]  # global
    prompts: list[str]  # global, rendered
    rollout: Rollout  # this process's slice
    groups: RolloutGroups  # global, after the filters
    rows: list[list[int]]  # global completion token rows (gathered only when a later round may replace groups)
    sampler_rows: list[list[float]]  # their sampler log-probs (vLLM), [] each without
    policy_rows: list[list[int]]  # their policy masks (episodes), [] each without
    prompt_rows: list[list[int]]  # episodes: each row's own prompt tokens (gathered as the rows are); [] otherwise


@dataclass
class Pending:
    """A step's first round, drawn and being generated ahead of its step (``sampling.lag``)."""

    step: int
    records: list[dict[str, Any]]  # global
    prompts: list[str]  # global, rendered
    rollout: Future  # this process's slice


class EpisodeTotals:
    """A step's multi-turn episodes on this process, over every round sampled, for the metrics."""

    def __init__(self):
        self.episodes = self.turns = self.calls = self.errors = self.timeouts = 0.0
        self.policy = self.inserted = self.seconds = 0.0

    def add(self, rollout: Rollout) -> None:
        log, policy = rollout.episodes, float(rollout.policy_token_mask.sum())
        self.episodes += len(rollout)
        self.turns, self.calls = self.turns + sum(log.turns), self.calls + sum(log.calls)
        self.errors, self.timeouts = self.errors + sum(log.errors), self.timeouts + sum(log.timeouts)
        self.policy, self.inserted = self.policy + policy, self.inserted + float(rollout.completion_mask.sum()) - policy
        self.seconds += log.seconds

    def metrics(self, dist: Dist) -> dict[str, float]:
        """Over every process: assistant turns per episode, the step's tool calls and how they ended, the
        time spent in the environment (the slowest process), and an episode's tokens after its prompt
        split into the policy's and those inserted between turns."""
        n, turns, calls, errors, timeouts, policy, inserted = dist.sum([
            self.episodes, self.turns, self.calls, self.errors, self.timeouts, self.policy, self.inserted])
        return {"turns/mean": turns / n, "tools/calls": calls, "tools/errors": errors, "tools/timeouts": timeouts,
                "time/environment": round(dist.max([self.seconds])[0], 6), "episode/policy_tokens": policy / n,
                "episode/environment_tokens": inserted / n}


class BatchCollector:
    """Runs the sample -> score -> filter phases of a step (see the module docstring)."""

    def __init__(self, sampling: SamplingSection, prompts_per_step: int, run: RunSection, dist: Dist,
                 sampler: PromptSampler, generator: Generator, scorer: Scorer, objectives: Objectives,
                 filters: Sequence[tuple[str, Any]], tokenizer: Any, eos_ids: Sequence[int], context: RunContext,
                 state: Optional[TrainState] = None):
        self.sampling, self.prompts_per_step, self.run, self.dist = sampling, prompts_per_step, run, dist
        self.state = state or TrainState(sampler=sampler.state)
        # sampling.lag: the versions still sampled with, and the next step's first round, generating
        self.versions = (PolicyVersions(sampling.lag, generator.lagged.weights) if generator.lagged is not None
                         else None)
        self.pending: Optional[Pending] = None
        self.mark = SamplerState()  # where the sampler stood before this step's batches were drawn
        self.sampler, self.generator, self.scorer = sampler, generator, scorer
        self.objectives, self.filters, self.context = objectives, list(filters), context
        self.tokenizer, self.eos_ids = tokenizer, eos_ids
        self.max_rounds = 1 + extra_rounds(self.filters)
        self.episodes: Optional[EpisodeTotals] = None  # the step's, with an environment
        self.scored: list[tuple[ScoreBatch, torch.Tensor]] = []  # the step's rounds, for reward sources that observe

    def __call__(self, step: int, timer: PhaseTimer) -> StepBatch:
        """The step's batch; the time goes to ``timer``'s sample, score and filter phases. A run
        whose reward scored nothing for ``run.hacking_patience`` steps stops here."""
        self.episodes = EpisodeTotals() if self.generator.environments is not None else None
        self.mark = replace(self.state.pending_sampler or self.sampler.state)
        self.scored = []
        try:
            return self.collect_step(step, timer)
        except GenerationServerError:  # before the update: the step is drawn again when the run resumes
            self.state.step -= 1
            self.rewind()
            raise

    def collect_step(self, step: int, timer: PhaseTimer) -> StepBatch:
        batch = self.collect(step, timer)
        if self.episodes is not None:
            batch.metrics.update(self.episodes.metrics(self.dist))
        self.scorer.check_abstentions(batch.sampled_rewards, self.objectives.names, self.run.hacking_patience, step)
        if self.versions is not None:
            batch.rollout.policy_version = sampling_version(step, self.sampling.lag)
            batch.metrics["policy_lag"] = float(step - 1 - batch.rollout.policy_version)
            self.versions.snapshot(step)  # at the last step too: a checkpoint then holds what step + 1 needs
            if step < self.run.steps:
                with timer("sample"):
                    self.prefetch(step)
            self.versions.prune(step)
        # Reward sources that learn from scored batches see the step's rounds once the step is sure to
        # train on them: a step that fails before (a generation server lost) is drawn again on resume.
        for scored, rewards in self.scored:
            self.scorer.observe(scored, rewards, self.objectives, self.context)
        return batch

    def prefetch(self, step: int) -> None:
        """During step ``step``, before its update: draw step + 1's first round and start generating it
        in the background with its version (:mod:`zenalign.train.lag`)."""
        self.state.pending_sampler = replace(self.sampler.state)
        records, prompts, keys = self.draw(step + 1, 0)
        self.hold(step + 1)
        mine = self.local(self.prompts_per_step)
        rollout = self.generator.lagged.submit(prompts[mine], keys, self.sampling.group_size, records[mine])
        self.pending = Pending(step + 1, records, prompts, rollout)

    def hold(self, step: int) -> None:
        """The lagged sampler holds the version that samples step ``step`` (while a step collects, the
        live policy is the version before it)."""
        version = sampling_version(step, self.sampling.lag)
        self.generator.lagged.hold(version, self.versions.of(version, live=self.state.step - 1))

    def rewind(self) -> None:
        """Put the prompt sampler back where it stood before this step's batches were drawn, and drop
        what is generating ahead (a step that failed before its update is then drawn again)."""
        self.sampler.state.epoch, self.sampler.state.index = self.mark.epoch, self.mark.index
        self.sampler.reorder()
        self.state.pending_sampler, self.pending = None, None
        if self.generator.lagged is not None:
            self.generator.lagged.idle()

    def collect(self, step: int, timer: PhaseTimer) -> StepBatch:
        target = self.prompts_per_step
        rounds: list[Round] = []
        while True:
            records, prompts, rollout, rewards = self.sample_round(step, len(rounds), timer)
            if not self.filters:
                mine = self.local(target)
                grouped = rewards.view(target, self.sampling.group_size, -1)
                return StepBatch(step, self.sampling.group_size, records[mine], prompts[mine], rollout, grouped, rewards,
                                 torch.ones(target, dtype=torch.bool), mine.start * self.sampling.group_size)
            with timer("filter"):
                rounds.append(self.filter_round(step, records, prompts, rollout, rewards))
                kept = sum(int(r.groups.keep.sum()) for r in rounds)
                if kept >= target or len(rounds) >= self.max_rounds:
                    return self.assemble(step, rounds, target)

    def local(self, count: int) -> slice:
        per_rank = count // self.dist.world_size
        return slice(self.dist.rank * per_rank, (self.dist.rank + 1) * per_rank)

    def sample_round(self, step: int, index: int,
                     timer: PhaseTimer) -> tuple[list[dict[str, Any]], list[str], Rollout, torch.Tensor]:
        """Draw a global batch of prompts (rendered once), sample this process's groups, score
        them; the global ``(N, K)`` rewards."""
        group_size = self.sampling.group_size
        mine = self.local(self.prompts_per_step)
        with timer("sample"):
            if index == 0 and self.pending is not None:  # generated ahead (sampling.lag)
                pending, self.pending = self.pending, None
                self.state.pending_sampler = None
                if pending.step != step:
                    raise RuntimeError(f"sampling.lag: step {pending.step}'s batch was generated ahead, not step {step}'s")
                records, prompts, rollout = pending.records, pending.prompts, self.generator.lagged.result(pending.rollout)
            else:
                records, prompts, keys = self.draw(step, index)
                if self.versions is None:
                    rollout = self.generator(prompts[mine], keys, group_size, records=records[mine])
                else:  # through the background sampler too, so a step's numbers do not depend on where it ran
                    self.hold(step)
                    lagged = self.generator.lagged
                    rollout = lagged.result(lagged.submit(prompts[mine], keys, group_size, records[mine]))
            if rollout.episodes is not None:
                self.episodes.add(rollout)
        with timer("score"):
            batch = make_batch(prompts[mine], records[mine], rollout.completions, rollout.completion_ids, group_size, step,
                               rollout.episodes, rollout.scored_lengths())
            local_rewards = self.scorer(batch)  # (N_local, K)
            self.scored.append((batch, local_rewards))
            return records, prompts, rollout, self.dist.gather_rows(local_rewards)

    def draw(self, step: int, index: int) -> tuple[list[dict[str, Any]], list[str], torch.Tensor]:
        """Round ``index`` of step ``step``: the global batch of prompts (the same on every rank),
        rendered, and the keys of this process's completions."""
        count, group_size = self.prompts_per_step, self.sampling.group_size
        mine = self.local(count)
        records = self.sampler.next_batch(count)
        prompts = [render_prompt(record, self.tokenizer) for record in records]  # the filters see every group
        first = (index * count + mine.start) * group_size
        return records, prompts, completion_keys(self.run.seed, step, first, len(prompts[mine]) * group_size)

    def filter_round(self, step: int, records: list[dict[str, Any]], prompts: list[str], rollout: Rollout,
                     rewards: torch.Tensor) -> Round:
        group_size, dist = self.sampling.group_size, self.dist
        p = len(records)
        lengths = dist.gather_rows(rollout.policy_lengths.long().cpu())  # the policy's tokens, with the EOS
        truncated = dist.gather_rows(rollout.truncated.cpu())
        texts = dist.gather_objects(rollout.completions)
        rows = dist.gather_objects(completion_rows(rollout)) if self.max_rounds > 1 else []  # to rebuild a batch
        sampler_rows = dist.gather_objects(sampler_logp_rows(rollout)) if self.max_rounds > 1 else []
        policy_rows = dist.gather_objects(policy_mask_rows(rollout)) if self.max_rounds > 1 else []
        episodes = self.max_rounds > 1 and rollout.episodes is not None
        own_prompts = dist.gather_objects(prompt_rows(rollout)) if episodes else []
        groups = RolloutGroups(
            rewards=rewards.view(p, group_size, -1).clone(), keep=torch.ones(p, dtype=torch.bool),
            loss_mask=torch.ones(p, group_size, dtype=torch.bool), lengths=lengths.view(p, group_size),
            truncated=truncated.view(p, group_size), prompts=list(prompts),
            completions=[texts[i * group_size:(i + 1) * group_size] for i in range(p)], records=list(records),
            max_new_tokens=self.sampling.max_new_tokens, step=step)
        return Round(records, prompts, rollout, apply_filters(self.filters, groups, self.objectives), rows, sampler_rows,
                     policy_rows, own_prompts)

    def assemble(self, step: int, rounds: list[Round], target: int) -> StepBatch:
        """The groups chosen over the rounds, as this process's rollout and the global rewards."""
        group_size, k = self.sampling.group_size, len(self.objectives)
        selection = select_groups([r.groups.keep for r in rounds], target)
        rewards = torch.stack([rounds[r].groups.rewards[i] for r, i in selection.chosen])          # (P, G, K)
        loss_mask = torch.stack([rounds[r].groups.loss_mask[i] for r, i in selection.chosen])      # (P, G)
        dropped = torch.tensor(selection.dropped, dtype=torch.bool)
        rewards[dropped] = float("nan")  # a dropped group moves no statistic and gets advantage 0
        loss_mask[dropped] = False
        mine = self.local(target)
        if selection.is_first_round:
            records, prompts, rollout = rounds[0].records[mine], rounds[0].prompts[mine], rounds[0].rollout
        else:
            chosen = selection.chosen[mine]
            records = [rounds[r].records[i] for r, i in chosen]
            prompts = [rounds[r].prompts[i] for r, i in chosen]

            def rows_of(field: str) -> list[list]:  # the chosen groups' rows of a Round field, in order
                return [row for r, i in chosen for row in getattr(rounds[r], field)[i * group_size:(i + 1) * group_size]]

            truncated = torch.cat([rounds[r].groups.truncated[i] for r, i in chosen])                 # (N_local,)
            rollout = rollout_from_rows(self.tokenizer, prompts, rows_of("rows"), group_size, self.eos_ids,
                                        rounds[0].rollout.sequences.device, sampler_rows=rows_of("sampler_rows"),
                                        max_prompt_length=self.sampling.max_prompt_length,
                                        policy_rows=rows_of("policy_rows"), truncated=truncated,
                                        prompt_rows=rows_of("prompt_rows") if rounds[0].prompt_rows else None)
            # the texts as sampled: an episode's is its last assistant message, not its decoded row
            rollout.completions = [text for r, i in chosen for text in rounds[r].groups.completions[i]]
        sampled = torch.cat([r.groups.rewards.reshape(-1, k) for r in rounds])
        masked = loss_mask[mine].reshape(-1)  # (N_local,)
        metrics = {"filter/rounds": float(len(rounds)),
                   "filter/groups_dropped": float(sum(int((~r.groups.keep).sum()) for r in rounds)),
                   "filter/groups_trained": float(target - int(dropped.sum())),
                   "filter/masked_frac": float((~loss_mask).float().mean())}
        return StepBatch(step, group_size, records, prompts, rollout, rewards, sampled, ~dropped, mine.start * group_size,
                         None if bool(masked.all()) else masked.to(rollout.sequences.device), metrics=metrics)

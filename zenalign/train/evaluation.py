"""Evaluation: greedy completions for every held-out prompt, scored by every reward source (and,
with ``run.eval_group_size``, sampled groups too, with pass@k and maj@k for each ``run.eval_k``),
appended to eval.jsonl with a reward-hacking check. The prompts are split evenly over ranks, padded
so every rank makes the same calls."""

from __future__ import annotations

import logging
import re
from typing import Any

import torch

from zenalign.data import render_prompt
from zenalign.generation.gumbel import completion_keys
from zenalign.grpo.metrics import extract_answer, hacking_warnings, k_sample_metrics, reward_metrics
from zenalign.grpo.scoring import Scorer, make_batch
from zenalign.plugins import Objectives, RunContext
from zenalign.plugins.advantages import combine_objectives
from zenalign.recipe.schema import RunSection
from zenalign.train.distributed import Dist
from zenalign.generation.generator import Generator
from zenalign.train.rundir import RunDir
from zenalign.train.state import TrainState

log = logging.getLogger("zenalign")

class Evaluator:
    def __init__(self, records: list[dict[str, Any]], run: RunSection, objectives: Objectives, dist: Dist,
                 run_dir: RunDir, state: TrainState, generator: Generator, scorer: Scorer, tokenizer: Any, hook: Any,
                 context: RunContext):
        self.records, self.run, self.objectives, self.dist = records, run, objectives, dist
        self.run_dir, self.state, self.hook, self.context = run_dir, state, hook, context
        self.generator, self.scorer, self.tokenizer = generator, scorer, tokenizer

    def __call__(self) -> dict[str, Any]:
        if not self.records:
            return {}
        world, rank = self.dist.world_size, self.dist.rank
        share = -(-len(self.records) // world)
        mine = self.records[rank * share : (rank + 1) * share]
        valid = torch.zeros(share, dtype=torch.bool)
        valid[: len(mine)] = True
        mine = mine + [self.records[0]] * (share - len(mine))
        metrics: dict[str, Any] = {"step": self.state.step, "samples": self.state.samples_seen}
        greedy, shown, _ = self._pass(mine, group_size=1)
        greedy = self.dist.gather_rows(greedy)[self.dist.gather_rows(valid)]
        metrics.update(reward_metrics(greedy, self.objectives, 1, prefix="eval/"))
        n = self.run.eval_group_size
        if n > 1 or self.run.eval_k:
            sampled, _, completions = self._pass(mine, group_size=n, first=rank * share, sampled=True)
            if self.run.eval_k:
                metrics.update(self._k_metrics(sampled, completions, valid))
            keep = self.dist.gather_rows(valid).repeat_interleave(n)
            sampled = self.dist.gather_rows(sampled)[keep]
            stats = reward_metrics(sampled, self.objectives, n, prefix="eval/sampled/")
            metrics.update({k: v for k, v in stats.items() if not k.startswith("eval/sampled/corr/")})
        if self.dist.is_main:
            self._write(metrics, shown)
        return metrics

    def _k_metrics(self, sampled: torch.Tensor, completions: list[str], valid: torch.Tensor) -> dict[str, float]:
        """pass@k and maj@k for each run.eval_k, averaged over the held-out prompts (see
        :func:`~zenalign.grpo.metrics.k_sample_metrics`); computed on each rank, then gathered."""
        n, ks = self.run.eval_group_size, self.run.eval_k
        reward = combine_objectives(sampled.view(-1, n, sampled.shape[-1]), self.objectives.weights)  # (P, n)
        correct = reward >= self.run.eval_correct_reward  # an abstention (NaN) is not correct
        pattern = re.compile(self.run.eval_answer_pattern) if self.run.eval_answer_pattern else None
        answers = [extract_answer(text, pattern) for text in completions]
        per_prompt = k_sample_metrics(correct, [answers[i:i + n] for i in range(0, len(answers), n)], ks)
        per_prompt = self.dist.gather_rows(per_prompt)[self.dist.gather_rows(valid)].mean(0)
        names = [f"eval/sampled/pass@{k}" for k in ks] + [f"eval/sampled/maj@{k}" for k in ks]
        return dict(zip(names, per_prompt.tolist()))

    def _pass(self, records: list[dict[str, Any]], group_size: int, first: int = 0, sampled: bool = False):
        """Scores ``(len(records) * group_size, K)``, the first records' greedy completions to show,
        and every completion: greedy (one per record), or ``sampled`` groups with keys of their own
        (independent of the training samples) at run.eval_temperature."""
        size = self.run.eval_batch_size
        scores, shown, completions = [], [], []
        for start in range(0, len(records), size):
            chunk = records[start : start + size]
            keys = None
            if sampled:
                keys = completion_keys(self.run.seed + 1_000_003, self.state.step, (first + start) * group_size,
                                       len(chunk) * group_size)
            prompts = [render_prompt(record, self.tokenizer) for record in chunk]
            rollout = self.generator(prompts, keys, group_size, self.run.eval_temperature if sampled else None,
                                     records=chunk)
            scores.append(self.scorer(make_batch(prompts, chunk, rollout.completions, rollout.completion_ids, group_size,
                                                 self.state.step, rollout.episodes, rollout.scored_lengths())))
            completions += rollout.completions
            if start == 0 and self.dist.is_main and not sampled:
                shown = [{"step": self.state.step, "eval": True, "prompt": prompt, "completion": c}
                         for prompt, c in zip(prompts[:4], rollout.completions)]
                if rollout.episodes is not None:  # the whole episode, as the policy and its tools wrote it
                    for row, prompt, messages in zip(shown, rollout.episodes.prompts, rollout.episodes.messages):
                        row.update(prompt=prompt, messages=messages)  # the prompt as rendered, with the tools
        return torch.cat(scores), shown, completions

    def _write(self, metrics: dict[str, Any], shown: list[dict[str, Any]]) -> None:
        history = self.run_dir.read("eval.jsonl") + [metrics]
        warnings = hacking_warnings(history, self.objectives.names, self.run.hacking_patience)
        if warnings:
            metrics["warnings"] = warnings
            for text in warnings:
                log.warning("possible reward hacking at step %d: %s", self.state.step, text)
        self.run_dir.append("eval.jsonl", [metrics])
        self.run_dir.append("samples.jsonl", shown)
        self.hook.zenalign_on_eval_end(context=self.context, step=self.state.step, metrics=metrics)
        summary = "  ".join(f"{name} {metrics[f'eval/reward_mean/{name}']:.3f}" for name in self.objectives.names)
        log.info("eval at step %d: %s", self.state.step, summary)

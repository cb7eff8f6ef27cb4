"""GRPOTrainer: the GRPO loop as a sequence of named, timed phases.

    prompts -> sample (k per prompt) -> score (K objectives) -> normalize (advantages)
            -> reference (log-probs, if KL) -> update (mu passes) -> log

``setup()`` builds the parts, ``train()`` runs the loop, ``cleanup()`` ends it. The CLI
(``zenalign run``) and the Python API (``GRPOTrainer(model=..., reward_model=...)``) both end up
here with the same recipe object. Each phase lives in its own module: rollout
(:mod:`zenalign.generation`), scoring, advantages, the loss (:mod:`zenalign.plugins.losses`), and the
update (:mod:`zenalign.train.update`); checkpoints save the :class:`TrainState`.

Several processes (torchrun or the deepspeed launcher): every rank draws the same global batch of
prompts and samples its own slice of whole groups; rewards are gathered before normalising, so
group and batch statistics are those of the global batch; each rank's loss uses global token
counts, so the update equals the single-process one. Rank 0 writes the run directory.
"""

from __future__ import annotations

import logging
from contextlib import contextmanager
import random
import signal
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Optional, Sequence

import numpy as np
import torch
from tqdm.auto import tqdm

from zenalign.data import PromptSampler, render_prompt
from zenalign.errors import GenerationServerError, RecipeError, ZenalignError
from zenalign.grpo.metrics import PhaseTimer, collapse_rate, reward_metrics, sample_lines
from zenalign.generation.rollout import Rollout
from zenalign.grpo.scoring import Scorer
from zenalign.models.loading import eos_token_ids, pick_device
from zenalign.models.lora import is_adapted
from zenalign.plugins import BuildContext, Critic, Objectives, ReportsMetrics, get_plugin_manager
from zenalign.recipe.loader import LoadedRecipe, recipe_from_options
from zenalign.recipe.schema import Recipe
from zenalign.train import checkpoint as ckpt
from zenalign.train import saving
from zenalign.train.advantage import step_advantages
from zenalign.train.batch import StepBatch
from zenalign.train.build import Builder, Inputs, take_trl_arguments
from zenalign.train.collect import BatchCollector
from zenalign.train.console import close_run_log, console, open_run_log, print_summary, shows_progress_bar
from zenalign.train.context import TrainerContext
from zenalign.train.distributed import Dist, collective_failure, init_distributed
from zenalign.train.engine import create_engine
from zenalign.train.evaluation import Evaluator
from zenalign.generation.generator import Generator
from zenalign.generation.vllm_server import StartStopped
from zenalign.train.memory import keep_freed_memory
from zenalign.train.preemption import StopSignals, Stopped
from zenalign.train.rundir import RunDir, storage_failure
from zenalign.train.state import TrainState, stateful_plugins
from zenalign.train.update import PolicyUpdate

log = logging.getLogger("zenalign")


@dataclass
class TrainResult:
    """What ``train()`` returns: where the run is and the first and last evaluations."""

    output_dir: Path
    steps: int
    initial_eval: dict[str, Any] = field(default_factory=dict)
    final_eval: dict[str, Any] = field(default_factory=dict)


def set_threads(count: Optional[int], report: bool) -> None:
    """``engine.num_threads`` (None: torch's default), and say how many threads the run uses."""
    if count is not None:
        torch.set_num_threads(count)
    if report:
        log.info("torch threads: %d (%s)", torch.get_num_threads(),
                 "engine.num_threads" if count is not None else "torch's default; engine.num_threads sets it")


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def log_to_file(handler: Optional[logging.Handler], level: int, message: str, exc: Optional[BaseException] = None) -> None:
    """A record for the run's run.log only (``handler``), not stderr."""
    if handler is not None:
        handler.handle(logging.makeLogRecord({"name": log.name, "levelno": level, "levelname": logging.getLevelName(level),
                                              "msg": message,
                                              "exc_info": (type(exc), exc, exc.__traceback__) if exc else None}))


def log_traceback(handler: Optional[logging.Handler], exc: BaseException) -> None:
    """The full traceback of what stopped a run goes to its run.log only (stderr gets one line)."""
    log_to_file(handler, logging.ERROR, f"the run stopped: {exc}", exc)


def step_metrics(state: TrainState, dist: Dist, recipe: Recipe, objectives: Objectives, rollout: Rollout,
                 rewards: torch.Tensor, update: dict[str, float], timer: PhaseTimer) -> dict[str, Any]:
    """The step's metrics over all ranks (every rank computes the same numbers)."""
    loss, kl, clip, ratio, tokens, lengths, truncated, entropy, entropy_tokens = dist.sum([
        update["loss"], update["kl"], update["clip"], update["ratio"], update["tokens"],
        float(rollout.policy_lengths.sum()), float(rollout.truncated.sum()), update["entropy"],
        update["entropy_tokens"]])
    seconds = dict(zip(timer.seconds, dist.max(list(timer.seconds.values()))))
    n = len(rollout) * dist.world_size
    step_seconds = dist.max([timer.elapsed()])[0]
    metrics: dict[str, Any] = {"step": state.step, "samples": state.samples_seen}
    metrics.update(reward_metrics(rewards, objectives, recipe.sampling.group_size))
    metrics.update(
        loss=loss, kl=kl / max(tokens, 1.0), clip_frac=clip / max(tokens, 1.0), ratio_mean=ratio / max(tokens, 1.0),
        grad_norm=update["grad_norm"], lr=update["lr"], completion_len=lengths / n,
        truncated_frac=truncated / n, completions_per_s=n / step_seconds if step_seconds > 0 else 0.0,
        entropy=entropy / entropy_tokens if entropy_tokens else None)
    metrics.update({k: update[k] for k in ("entropy_threshold", "nonfinite_skipped") if k in update})
    metrics.update({f"time/{k}": round(v, 6) for k, v in seconds.items()})
    if dist.is_main and state.step % recipe.run.log_interval == 0:
        log.info("step %d/%d  reward %.3f  kl %.4f  clip %.3f  %.1f completions/s", state.step,
                 recipe.run.steps, metrics["reward_mean"], metrics["kl"], metrics["clip_frac"],
                 metrics["completions_per_s"])
    return metrics


def finished_result(run_dir: RunDir, steps: int) -> TrainResult:
    """What a run that had already finished returns: its first and last evaluations, as recorded."""
    evals = run_dir.read("eval.jsonl")
    return TrainResult(run_dir.path, steps, evals[0] if evals else {}, evals[-1] if evals else {})


@contextmanager
def checkpointed_on_server_loss(trainer: "GRPOTrainer", saved: Any) -> Iterator[None]:
    """The generation server went away: keep the run so far in a checkpoint of its last whole step
    (``saved()``: the step checkpointed last), and say how to go on."""
    try:
        yield
    except GenerationServerError as exc:
        if saved() != trainer.state.step:
            trainer.save_checkpoint()
        again = ("run again with --resume auto (it starts a new server)" if trainer.recipe.sampling.vllm.server_url is None
                 else "start the server again, then run again with --resume auto")
        raise GenerationServerError(f"{exc}; the run stopped after step {trainer.state.step} with a checkpoint: "
                                    f"{again}") from None


def signal_received(trainer: "GRPOTrainer") -> int:
    """The stop signal this process received during ``train`` (0: none yet)."""
    signals = getattr(trainer, "signals", None)
    return (signals.received or 0) if signals is not None else 0


@contextmanager
def stopped_while_loading(trainer: "GRPOTrainer", step: int) -> Iterator[None]:
    """A stop signal came while the vLLM server the run starts was loading, which stopped it (on
    every process, agreed, though the signal may have reached one): the run stops as stopped, with
    nothing new to keep."""
    try:
        yield
    except StartStopped:
        signum = int(trainer.dist.max([float(signal_received(trainer))])[0])
        raise Stopped(signum or signal.SIGTERM, step) from None


class GRPOTrainer:
    """Group Relative Policy Optimization.

    ``GRPOTrainer(model=model, reward_model=reward_model, group_size=12, clip_epsilon=0.15).train(prompts)``

    ``model`` is a local Hugging Face directory or a loaded causal LM; ``reward_model`` is a
    reward source, a plain function ``(prompts, completions, **fields) -> scores``, or a list of
    them (one objective each). Any recipe field is accepted by name (``kl_coef=0.0``,
    ``steps=50``) or a whole section as a dict (``grpo={...}``). TRL's ``tools=[functions]`` and
    ``environment_factory=Class`` make every completion a multi-turn episode (docs/agents.md).
    """

    def __init__(self, model: Any = None, reward_model: Any = None, *, tokenizer: Any = None,
                 reference_model: Any = None, normalizer: Any = None, recipe: Optional[LoadedRecipe] = None,
                 **options: Any):
        reward_model, tokenizer, *trl_inputs = take_trl_arguments(options, reward_model, tokenizer)
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
        self.inputs = Inputs(model, tokenizer, reference_model, reward_model, normalizer, *trl_inputs)
        self.hook = get_plugin_manager().hook
        self.dist = Dist()
        self.state = TrainState()
        self.run_dir = RunDir(self.loaded.output_dir)

    @classmethod
    def from_recipe(cls, loaded: LoadedRecipe) -> "GRPOTrainer":
        return cls(recipe=loaded)

    @property
    def step(self) -> int:
        return self.state.step

    @property
    def model(self) -> torch.nn.Module:
        """The policy being trained (the plain Hugging Face module)."""
        return self.engine.model

    # ------------------------------------------------------------------------------------------
    # setup

    def check(self) -> Objectives:
        """Build the prompt source, reward sources and normalizer without loading the policy:
        what ``zenalign validate`` runs, so it catches what ``run`` would reject before step 1.
        Returns the run's objectives (``self.scorer`` holds the reward sources)."""
        builder = Builder(self.loaded, self.inputs, BuildContext(recipe=self.recipe, base_dir=self.loaded.base_dir))
        objectives, self.scorer = builder.check()
        return objectives

    def setup(self, prompts=None, eval_prompts=None, resume: Optional[str] = None) -> None:
        saved = self._join_run(resume)
        with stopped_while_loading(self, saved["step"] if saved else 0):
            self._build_parts(prompts, eval_prompts, saved)
        if saved is not None:
            ckpt.check_compatible(saved["fingerprint"], self._fingerprint(), self.resumed_from)
            if self.finished is not None:  # checked, and nothing to run: write nothing
                log.info("the run finished at step %d already (raise run.steps to continue it)", self.finished)
                return
            ckpt.restore(self.resumed_from, saved, self.state, self._checkpoint_parts())
            self.sampler.reorder()
        own = saved is not None and self.run_dir.holds(self.resumed_from)  # else: this directory starts afresh
        self.run_dir.begin(self.dist, self.state.step if own else None, self.overwrite, self.recipe.model_dump(mode="json"))
        self._log_handler = open_run_log(self.run_dir.path / "run.log") if self.dist.is_main else None
        self.dist.barrier()

    def _join_run(self, resume: Optional[str]) -> Optional[dict[str, Any]]:
        """Join the launcher's process group, find the run directory and the checkpoint to resume
        (its trainer_state.json, verified), and pick the device. Nothing is loaded yet."""
        r = self.recipe
        device = pick_device(r.engine.device)  # first: it decides the process group's backend and DeepSpeed's accelerator
        self.dist = init_distributed(r.engine.backend, r.engine.collective_timeout_s, device.type)
        if r.grpo.prompts_per_step % self.dist.world_size:
            raise RecipeError(
                f"{self.loaded.source}: grpo.prompts_per_step ({r.grpo.prompts_per_step}) must be divisible by the "
                f"number of processes ({self.dist.world_size}), so every process samples whole groups")
        self.resumed_from = ckpt.find_checkpoint(resume, self.run_dir.path) if resume else None
        saved = ckpt.verify(self.resumed_from) if self.resumed_from else None
        # --resume auto before the first checkpoint of a zenalign run: start again over the
        # unfinished attempt's files (only a run's own files; a directory that is not a run is refused)
        self.overwrite = r.run.overwrite or (resume == "auto" and saved is None and self.run_dir.is_run()
                                             and not (self.run_dir.path / "final").exists())
        self.run_dir.check(self.overwrite, resuming=saved is not None and self.run_dir.holds(self.resumed_from))
        done = (saved is not None and saved["step"] >= r.run.steps and self.run_dir.holds(self.resumed_from)
                and (self.run_dir.path / "final").is_dir())
        self.finished: Optional[int] = saved["step"] if done else None  # the step it finished at
        if saved is not None and not done and self.dist.is_main:
            log.info("resuming from %s (step %d)", self.resumed_from, saved["step"])
        seed_everything(r.run.seed)
        set_threads(r.engine.num_threads, self.dist.is_main)
        self.device = torch.device("cuda", self.dist.local_rank) if device.type == "cuda" else device
        if self.device.type == "cpu" and r.engine.keep_freed_memory:
            keep_freed_memory()
        return saved

    def _build_parts(self, prompts, eval_prompts, saved: Optional[dict[str, Any]]) -> None:
        r = self.recipe
        local = r.grpo.prompts_per_step // self.dist.world_size * r.sampling.group_size  # this process's completions
        self.engine = create_engine(r.engine, r.grpo, self.dist, self.device, local)  # first: ZeRO-3 must see the models load
        builder = Builder(self.loaded, self.inputs, BuildContext(recipe=r, base_dir=self.loaded.base_dir, device=self.device))
        self.tokenizer = builder.tokenizer()
        builder.context = BuildContext(recipe=r, base_dir=self.loaded.base_dir, tokenizer=self.tokenizer, device=self.device,
                                       output_dir=self.run_dir.path, rank=self.dist.rank)
        train_records, eval_records = builder.prompts(prompts, eval_prompts)
        environments = builder.environment()
        builder.check_prompts(self.tokenizer, train_records, eval_records)  # lengths and memory, before the weights load
        policy = builder.policy(self.resumed_from / "policy" if saved and saved.get("consolidated") else None)
        self.policy_config_dir = builder.policy_dir
        self.eos_ids = eos_token_ids(policy, self.tokenizer)
        rewards = builder.rewards(environments)
        self.scorer = Scorer(rewards, on_stuck=self.run_dir.unlock)
        self.objectives = builder.objectives(rewards)
        self.normalizer = builder.normalizer()
        critic_kl = self.normalizer.reference_kl_coef if isinstance(self.normalizer, Critic) else 0.0
        wants_kl = r.grpo.kl_coef > 0 or critic_kl > 0  # PPO's critic puts a KL term in its reward
        reference = builder.reference(policy, wants_kl)
        builder.warn_unenforced_constraints(self.objectives, self.normalizer)
        builder.check_inputs(None, train_records, eval_records, rewards)  # the prompts were checked above
        self.sampler = PromptSampler(train_records, seed=r.run.seed, state=self.state.sampler)
        self.engine.attach(policy, r.run.steps * r.grpo.num_iterations, -(-local // (r.engine.micro_batch_size or local)))
        self.generator = Generator(r.sampling, r.engine, r.run.seed, self.engine, self.tokenizer, self.eos_ids,
                                   self.dist, builder.policy_dir, builder.longest_prompt, fresh=saved is None,
                                   environments=environments, stop_requested=lambda: bool(signal_received(self)))
        self.reference = self.engine.prepare_reference(reference) if reference is not None else None
        self.updater = PolicyUpdate.from_recipe(r, self.engine, self.dist, builder.loss(self.normalizer),
                                                reference=self.reference,
                                                base_reference=wants_kl and reference is None and is_adapted(policy))
        self.state.plugins = stateful_plugins(self.normalizer, [bound.source for bound in rewards])
        self.context = TrainerContext(self.state, self.dist, r.run.seed, self.run_dir.path, self.reset_reference_to_policy,
                                      r.model_dump(mode="json"))
        self.collect = BatchCollector(r.sampling, r.grpo.prompts_per_step, r.run, self.dist, self.sampler, self.generator,
                                      self.scorer, self.objectives, builder.filters(), self.tokenizer, self.eos_ids,
                                      self.context, self.state)
        self.evaluator = Evaluator(eval_records, r.run, self.objectives, self.dist, self.run_dir, self.state,
                                   self.generator, self.scorer, self.tokenizer, self.hook, self.context)

    def _fingerprint(self) -> dict[str, Any]:
        return ckpt.fingerprint(self.recipe, self.dist.world_size, self.objectives.names, self.policy_config_dir)

    def _checkpoint_parts(self) -> ckpt.CheckpointParts:
        return ckpt.CheckpointParts(self.engine, self.dist, self.tokenizer, self.reference, self.collect.versions)

    def evaluate(self) -> dict[str, Any]:
        """Greedy (and, with run.eval_group_size, sampled) scores on the held-out prompts; see Evaluator."""
        return self.evaluator()

    def reset_reference_to_policy(self) -> None:
        """Make the KL reference a copy of the current policy (online preference learning may ask
        for it at each reward-model refresh). Checkpoints then carry the reference weights."""
        if self.updater.reset_reference(self.recipe.engine.zero_stage):
            self.state.reference_was_reset = True

    # ------------------------------------------------------------------------------------------
    # train

    def train(self, prompts: Optional[Sequence[Any]] = None, eval_prompts: Optional[Sequence[Any]] = None,
              resume: Optional[str] = None) -> TrainResult:
        """Run ``run.steps`` GRPO steps; evaluate before, every ``run.eval_interval`` steps, and after;
        print what ``zenalign run`` prints, as ``run.log_level`` says (:mod:`zenalign.train.console`).

        ``resume``: ``"auto"`` continues from the newest checkpoint in the run directory (or starts
        fresh if there is none); a path continues from that checkpoint.
        """
        try:
            with console(self.recipe.run.log_level), StopSignals(on_exit=self.run_dir.unlock) as self.signals:
                self.setup(prompts, eval_prompts, resume)
                result = self._loop() if self.finished is None else finished_result(self.run_dir, self.finished)
            return print_summary(result, self.recipe.run.log_level)
        except Stopped as exc:
            log_to_file(getattr(self, "_log_handler", None), logging.WARNING, f"zenalign: {exc}")  # the CLI prints it
            raise
        except Exception as exc:  # a ZenalignError as it is; a collective that timed out, a full disk: one line
            log_traceback(getattr(self, "_log_handler", None), exc)
            if isinstance(exc, ZenalignError):
                raise
            raise (collective_failure(exc, self.dist, self.recipe.engine.collective_timeout_s)
                   or storage_failure(exc, Path(self.recipe.run.output_dir)) or exc)
        finally:
            self.cleanup()

    def _loop(self) -> TrainResult:
        r, main = self.recipe.run, self.dist.is_main
        if main:
            self.hook.zenalign_on_train_start(context=self.context, start_step=self.state.step)
        result = TrainResult(self.run_dir.path, r.steps)
        # rank 0 reads the run directory; every rank must then make the same evaluation calls
        evals = self.dist.broadcast(self.run_dir.read("eval.jsonl") if self.resumed_from and main else [])
        saved = self.state.step if self.resumed_from is not None and self.run_dir.holds(self.resumed_from) else None
        self.signals.stop_here(self.dist, self.state.step, saved, self.save_checkpoint)  # one that came while loading
        result.initial_eval = evals[0] if evals else self.evaluate()
        last_eval = evals[-1]["step"] if evals else 0
        with tqdm(total=r.steps, initial=self.state.step, desc="GRPO", unit="step", dynamic_ncols=True,
                  disable=not (shows_progress_bar(r) and main)) as progress:
            while self.state.step < r.steps:
                self.signals.stop_here(self.dist, self.state.step, saved, self.save_checkpoint)
                self.state.step += 1
                with checkpointed_on_server_loss(self, lambda: saved):
                    metrics = self.train_step()
                    progress.set_postfix(reward=f"{metrics['reward_mean']:.3f}", kl=f"{metrics['kl']:.4f}", refresh=0)
                    progress.update(1)
                    if r.eval_interval and self.state.step % r.eval_interval == 0 and self.state.step < r.steps:
                        self.evaluate()
                        last_eval = self.state.step
                if r.checkpoint_interval and self.state.step % r.checkpoint_interval == 0 and self.state.step < r.steps:
                    self.save_checkpoint()
                    saved = self.state.step
        with checkpointed_on_server_loss(self, lambda: saved):  # the steps since the last checkpoint are kept
            result.final_eval = self.evaluate() if last_eval != self.state.step or not evals else evals[-1]
        if saved != self.state.step:  # a resume that ran no step re-signs nothing it did not verify
            self.save_checkpoint()
        self.save_final()
        if main:
            self.hook.zenalign_on_train_end(context=self.context, step=self.state.step)
        return result

    def train_step(self) -> dict[str, Any]:
        """One step: sample -> score -> filter -> reference -> normalize -> update (-> critic) -> log."""
        timer = PhaseTimer()
        batch = self.collect(self.state.step, timer)  # the sample, score and filter phases (zenalign.train.collect)
        name = getattr(self.recipe.normalizer, "type", type(self.normalizer).__name__)
        step_advantages(batch, self.normalizer, name, self.updater, self.objectives, self.context, timer)
        with timer("update"):
            update = self.updater(batch)
        if isinstance(self.normalizer, Critic):
            with timer("critic"):
                self.normalizer.train_critic(batch.token_batch(), self.context)
        with timer("log"):
            metrics, samples = self.log_step(batch, update, timer)
        metrics["time/log"] = round(timer.seconds["log"], 6)
        if self.dist.is_main:
            self.run_dir.append("metrics.jsonl", [metrics])
            self.hook.zenalign_on_step_end(context=self.context, step=self.state.step, metrics=metrics, samples=samples)
        return metrics

    def log_step(self, batch: StepBatch, update: dict[str, float],
                 timer: PhaseTimer) -> tuple[dict[str, Any], list[dict[str, Any]]]:
        """The step's metrics (every rank computes the same), and the samples.jsonl lines it wrote
        (the main process only, at run.log_interval)."""
        run, group_size = self.recipe.run, batch.group_size
        self.state.samples_seen += len(batch.sampled_rewards)
        metrics = step_metrics(self.state, self.dist, self.recipe, self.objectives, batch.rollout, batch.sampled_rewards,
                               update, timer)
        if batch.advantages_global is not None:
            metrics["adv_collapse_frac"] = collapse_rate(batch.rewards, batch.advantages_global.view(-1, group_size))
        metrics.update(batch.metrics)
        metrics.update(self.normalizer.metrics() if isinstance(self.normalizer, ReportsMetrics) else {})
        metrics.update(self.scorer.metrics())
        metrics.update(self.generator.step_metrics(update))
        samples: list[dict[str, Any]] = []
        if self.dist.is_main and run.log_samples and self.state.step % run.log_interval == 0:
            samples = sample_lines(self.state.step, batch.prompts[:run.log_samples], batch.rollout.completions,
                                   batch.rewards.reshape(-1, batch.rewards.shape[-1]), batch.per_completion_advantages,
                                   self.objectives.names, group_size)
            self.run_dir.append("samples.jsonl", samples)
        return metrics, samples

    def sample(self, records: list[dict[str, Any]], keys: Optional[torch.Tensor], group_size: Optional[int] = None,
               temperature: Optional[float] = None) -> Rollout:
        """``group_size`` (default: the recipe's) sampled completions per prompt, one per key, at
        ``temperature`` (default: the recipe's); or, without keys, one greedy completion per prompt."""
        texts = [render_prompt(rec, self.tokenizer) for rec in records]
        group_size = (group_size or self.recipe.sampling.group_size) if keys is not None else 1
        return self.generator(texts, keys, group_size, temperature, records=records)

    # ------------------------------------------------------------------------------------------
    # saving, cleanup

    def save_checkpoint(self) -> Optional[Path]:
        """A checkpoint of the current step (every rank takes part); its path on rank 0."""
        return ckpt.save_checkpoint(self.run_dir.path, self.state, self._checkpoint_parts(), self._fingerprint(),
                                    self.recipe.engine.consolidate_checkpoints, self.recipe.run.keep_checkpoints)

    def save_final(self) -> Optional[Path]:
        """The trained policy as a save_pretrained directory (safetensors), written atomically."""
        return saving.save_final(self.run_dir.path, self._checkpoint_parts())

    def save_model(self, output_dir: Optional[str | Path] = None, merge: bool = False,
                   base: Optional[str | Path] = None) -> Optional[Path]:
        """TRL's ``trainer.save_model``, after ``train()``: the policy and its tokenizer in a new
        directory (a LoRA policy's adapter, or merged with ``merge=True``), or without one in the
        run's ``final/``; see :func:`zenalign.train.saving.save_model`."""
        if getattr(self, "engine", None) is None or self.engine.model is None:
            raise RecipeError("save_model: the policy is built by train(); call train() first")
        return saving.save_model(self._checkpoint_parts(), self.run_dir.path, output_dir, merge, base)

    def cleanup(self) -> None:
        """Stop the vLLM engine, close run.log and release the run directory's lock (safe after a setup that failed)."""
        if getattr(self, "generator", None) is not None:
            self.generator.close()
        close_run_log(getattr(self, "_log_handler", None))
        self._log_handler = None
        self.run_dir.unlock()

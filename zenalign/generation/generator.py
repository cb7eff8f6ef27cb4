"""The sample phase's backend: the policy itself (zenalign's decoder or transformers' generate), or
vLLM kept in step with the policy (``sampling.decoder: vllm``): a colocated engine in each process,
or vLLM's own server that every process shares (``sampling.vllm.mode: server``,
:mod:`zenalign.generation.vllm_server`; rank 0 pushes the weights). With LoRA, vLLM holds the
base model and is sent the merged weights.

With vLLM, the policy's weights go into the engine before a generation whenever the optimizer has
stepped since the last time (with ``grpo.num_iterations`` mu > 1, once per generation, not per
pass); at ZeRO-3 every process gathers the full weights first. Each process runs its own engine on
its own share of the groups. The time each weight sync takes is logged (``vllm/sync_s``), and with
it the gap between vLLM's and the trainer's log-probs that the update corrects for
(``vllm/logp_diff``, ``vllm/capped_frac``; :mod:`zenalign.grpo.importance`).
"""

from __future__ import annotations

import copy
import logging
import time
from concurrent.futures import Future, ThreadPoolExecutor, wait
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Iterator, Optional, Protocol, Sequence

import torch

from zenalign.errors import RecipeError
from zenalign.generation.environment import Environments
from zenalign.generation.episodes import run_episodes
from zenalign.generation.rollout import Rollout, generate_groups
from zenalign.generation.vllm_engine import VLLMEngine, vllm_episodes, vllm_rollout
from zenalign.generation.vllm_server import VLLMServer, connect, on_every_process
from zenalign.models.logprobs import completion_logprobs, update_pass_kind
from zenalign.models.lora import forward_module, is_adapted, merged_weights
from zenalign.recipe.schema import EngineSection, SamplingSection

log = logging.getLogger("zenalign")


@contextmanager
def full_weights(engine: Any) -> Iterator[dict[str, torch.Tensor]]:
    """The policy's weights by Hugging Face name, whole on every process (gathered at ZeRO-3)."""
    model = engine.model
    if getattr(engine, "stage", 0) == 3:
        import deepspeed

        with deepspeed.zero.GatheredParameters(list(model.parameters())):
            yield model.state_dict()
    else:
        yield model.state_dict()


def cpu_copy(weights: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``weights`` copied to the CPU, names that share a tensor (a tied LM head) still sharing one."""
    copies: dict[int, torch.Tensor] = {}
    for t in weights.values():
        if t.data_ptr() not in copies:
            copies[t.data_ptr()] = t.detach().to("cpu", copy=True)
    return {name: copies[t.data_ptr()] for name, t in weights.items()}


class Collectives(Protocol):
    """What the generator needs of the run's processes (``zenalign.train.distributed.Dist``): whether
    there are several, this one's rank, a barrier, and sums and maxima of floats over them."""

    @property
    def active(self) -> bool: ...

    @property
    def rank(self) -> int: ...

    @property
    def is_main(self) -> bool: ...

    def barrier(self) -> None: ...

    def sum(self, values: list[float]) -> list[float]: ...

    def max(self, values: list[float]) -> list[float]: ...


class Generator:
    """Samples a step's groups (or greedy completions) with the decoder ``sampling`` names.

    ``engine`` is the update's engine (the policy, its device, autocast and optimizer steps);
    ``precision`` and ``lean_forward`` come from the recipe's ``engine:`` section, ``seed`` from
    ``run.seed`` (vLLM's); ``environments``, the run's environment, makes every completion a
    multi-turn episode (:mod:`zenalign.generation.episodes`); ``log_dir`` holds the log of a vLLM
    server the generator starts (``sampling.vllm.mode: server``), which a true ``stop_requested()``
    (a stop signal) stops while it loads."""

    def __init__(self, sampling: SamplingSection, engine_options: EngineSection, seed: int, engine: Any,
                 tokenizer: Any, eos_ids: Sequence[int], dist: Collectives, policy_dir: Optional[Path],
                 longest_prompt: int, fresh: bool, environments: Optional[Environments] = None,
                 log_dir: Optional[Path] = None, stop_requested: Optional[Callable[[], bool]] = None):
        self.sampling, self.lean_forward = sampling, engine_options.lean_forward
        self.environments = environments
        if environments is not None and engine.synced_gpus and sampling.decoder != "vllm":
            raise RecipeError("environment: episodes across processes at ZeRO-3 are not supported yet (each process "
                              "would run a different number of forward passes); use engine.zero_stage 0-2, or "
                              "sampling.decoder vllm")
        self.engine, self.tokenizer, self.eos_ids, self.dist = engine, tokenizer, eos_ids, dist
        self.engine_options = engine_options
        self.vllm: Optional[VLLMEngine | VLLMServer] = None
        self.sync_seconds, self.syncs = 0.0, 0
        self.lagged = Lagged(self) if sampling.lag else None
        self.shared = sampling.decoder == "vllm" and sampling.vllm.mode == "server"  # one server for every process
        if sampling.decoder != "vllm":
            return
        options = sampling.vllm
        if policy_dir is None:
            raise RecipeError("sampling.decoder: vllm builds its engine from model.path (a plain Hugging Face "
                              "directory); a model object was given; use decoder zenalign")
        max_model_len = options.max_model_len or self.longest_sequence(longest_prompt)
        if self.shared:
            self.vllm = connect(policy_dir, options, max_model_len, engine_options.precision, dist, log_dir,
                                stop_requested)
        else:
            self.vllm = VLLMEngine(policy_dir, options, engine_options.precision, max_model_len, seed,
                                   engine.device.type, distributed=dist.active)
        # the engine holds model.path's weights: the policy's own until the first optimizer step, unless resumed;
        # a server may hold an earlier run's, so it gets the policy's before the first generation
        self.synced_at: Optional[int] = engine.optimizer_steps if fresh and not self.shared else None
        if self.lagged is not None:
            self.lagged.held = 0 if fresh and not self.shared else None

    def __call__(self, prompts: list[str], keys: Optional[torch.Tensor], group_size: int,
                 temperature: Optional[float] = None, records: Optional[list[dict[str, Any]]] = None) -> Rollout:
        """``group_size`` completions per prompt, one per key, at ``temperature`` (default: ``sampling``'s);
        without keys, one greedy completion each. With an environment, ``group_size`` episodes of
        each of ``records`` instead (their prompts rendered with the tools; ``prompts`` unused)."""
        sampling = self.sampling if temperature is None else self.sampling.model_copy(update={"temperature": temperature})
        if self.shared:  # a server lost under some processes' requests stops them all here
            return on_every_process(self.dist, lambda: self.sample(self.engine.model, sampling, prompts, keys,
                                                                   group_size, records))
        return self.sample(self.engine.model, sampling, prompts, keys, group_size, records)

    def sample(self, model: torch.nn.Module, sampling: SamplingSection, prompts: list[str], keys: Optional[torch.Tensor],
               group_size: int, records: Optional[list[dict[str, Any]]]) -> Rollout:
        """What ``__call__`` does, with ``model`` sampling when the decoder is zenalign's or transformers'
        (the live policy, or the lagged sampler's copy) and vLLM holding the live policy otherwise."""
        if self.vllm is not None and model is self.engine.model:
            if self.lagged is not None:
                self.lagged.idle()  # a pending generation first: the sync replaces the weights it samples with
            self.sync()
        if self.environments is not None and self.vllm is not None:
            return vllm_episodes(self.vllm, self.tokenizer, records, group_size, keys, sampling, self.environments,
                                 self.eos_ids, next(self.engine.model.parameters()).device)
        if self.environments is not None:
            return run_episodes(forward_module(model), self.tokenizer, records, group_size, keys, sampling,
                                self.environments, self.eos_ids, autocast=self.engine.autocast())
        if self.vllm is None:
            return generate_groups(forward_module(model), self.tokenizer, prompts, sampling, self.eos_ids,
                                   group_size, keys=keys, autocast=self.engine.autocast(),
                                   synced_gpus=self.engine.synced_gpus, lean_forward=self.lean_forward)
        device = next(self.engine.model.parameters()).device
        return vllm_rollout(self.vllm, self.tokenizer, prompts, sampling, self.eos_ids, group_size, keys, device)

    def longest_sequence(self, longest_prompt: int) -> int:
        """The longest prompt and completion vLLM must hold: with an environment, the prompt and the
        whole episode (``environment.max_episode_tokens``, else what the model's positions allow)."""
        if self.environments is None:
            return longest_prompt + self.sampling.max_new_tokens
        positions = getattr(self.engine.model.config, "max_position_embeddings", None) or 1 << 20
        cap = self.environments.budgets.max_episode_tokens
        return min(positions, longest_prompt + cap) if cap else positions

    def sync(self) -> None:
        """Push the policy's weights into the engine when the optimizer has stepped since the last push
        (or a lagged generation put an older version there)."""
        steps = self.engine.optimizer_steps
        if steps == self.synced_at:
            return
        with torch.no_grad(), full_weights(self.engine) as weights:
            if is_adapted(self.engine.model):  # vLLM holds the base model: W + the adapters' delta
                weights = merged_weights(self.engine.model)
            self.push(weights)
        self.synced_at = steps

    def push(self, weights: dict[str, torch.Tensor]) -> None:
        """Load ``weights`` (Hugging Face names) into the vLLM engine, timed for ``vllm/sync_s``: a
        server shared by every process takes them from rank 0, and no rank samples while it does."""
        start = time.perf_counter()
        if not self.shared:
            self.vllm.load_weights(weights)
        else:  # the others wait for rank 0's push, and learn whether the server took it
            self.dist.barrier()
            on_every_process(self.dist, lambda: self.vllm.load_weights(weights) if self.dist.is_main else None)
        seconds = time.perf_counter() - start
        self.sync_seconds += seconds
        self.syncs += 1
        (log.info if self.syncs == 1 else log.debug)("vLLM weight sync: %.3f s (%d tensors)", seconds, len(weights))
        self.synced_at = None
        if self.lagged is not None:
            self.lagged.held = None

    def step_metrics(self, update: dict[str, float]) -> dict[str, Any]:
        """The step's sampler metrics over every process, from the update's sums: vLLM's (the gap to
        the trainer's log-probs, the share the correction capped, the sync's time) and, with a lag,
        the lag's (the background generation's time); {} for an on-policy run without vLLM."""
        if self.vllm is None and self.lagged is None:
            return {}
        diff, tokens, capped, units = self.dist.sum([update.get(f"sampler_{k}", 0.0)
                                                     for k in ("abs_diff", "tokens", "capped", "units")])
        metrics: dict[str, Any] = {}
        prefix = "vllm" if self.vllm is not None else "sampler"
        metrics[f"{prefix}/logp_diff"] = diff / tokens if tokens else None
        metrics[f"{prefix}/capped_frac"] = capped / units if units else None
        if self.vllm is not None:
            sync, self.sync_seconds = self.dist.max([self.sync_seconds])[0], 0.0
            metrics["vllm/sync_s"] = round(sync, 6)
        if self.lagged is not None:
            metrics.update(self.lagged.metrics())
        return metrics

    def close(self) -> None:
        if self.lagged is not None:
            self.lagged.close()
        if self.vllm is not None:
            self.vllm.close()
            self.vllm = None


class Lagged:
    """The sampler of a run with ``sampling.lag`` >= 1: one background thread that generates a batch
    with a given policy version while the trainer's thread goes on (:mod:`zenalign.train.lag` says
    which version samples which step). vLLM is loaded with that version's weights (colocated or a
    server); zenalign's and transformers' decoders sample with a frozen copy of the policy, which
    also gives the log-prob each token was drawn with (``sampler_logp``), for the off-policy
    correction. Weights change only while nothing is generating, from the trainer's thread."""

    def __init__(self, generator: Generator):
        sampling, engine = generator.sampling, generator.engine
        if generator.environments is not None:
            raise RecipeError("sampling.lag: multi-turn episodes (environment:) are not pipelined yet; use lag 0")
        if engine.synced_gpus and sampling.decoder != "vllm":
            raise RecipeError("sampling.lag: decoder zenalign at ZeRO-3 across processes samples with every process's "
                              "shards; the lagged sampler needs whole weights: use lag 0, ZeRO 0-2, or decoder vllm")
        self.generator = generator
        self.held: Optional[int] = None  # the version the sampler holds; None: unknown or the live policy
        self.copy: Optional[torch.nn.Module] = None
        if sampling.decoder != "vllm":
            self.copy = copy.deepcopy(forward_module(engine.model)).requires_grad_(False).eval()
        self.threads = torch.get_num_threads()
        self.worker = ThreadPoolExecutor(1, thread_name_prefix="zenalign-sampler", initializer=torch.set_num_threads,
                                         initargs=(self.threads,))
        self.running: Optional[Future] = None
        self.seconds = 0.0  # the generation time of the batches this step trained on (added by :meth:`result`)

    def weights(self) -> dict[str, torch.Tensor]:
        """The live policy's weights as the sampler loads them, copied to the CPU: every weight by
        Hugging Face name for vLLM (gathered at ZeRO-3), the trainable ones for the frozen copy."""
        with torch.no_grad():
            if self.copy is None:
                engine = self.generator.engine
                if is_adapted(engine.model):  # vLLM holds the base model: W + the adapters' delta
                    return cpu_copy(merged_weights(engine.model))
                with full_weights(engine) as weights:
                    return cpu_copy(weights)
            model = forward_module(self.generator.engine.model)
            return {name: p.detach().to("cpu", copy=True) for name, p in model.named_parameters() if p.requires_grad}

    def hold(self, version: int, weights: Optional[dict[str, torch.Tensor]]) -> None:
        """Make the sampler hold ``version``: ``weights``, or the live policy's when None."""
        if self.held == version:
            return
        self.idle()
        generator = self.generator
        if self.copy is not None:
            with torch.no_grad():
                if weights is None:
                    weights = {name: p for name, p in forward_module(generator.engine.model).named_parameters()
                               if p.requires_grad}
                self.copy.load_state_dict(weights, strict=False)
        elif weights is None:
            generator.synced_at = None
            generator.sync()
        else:
            generator.push(weights)
        self.held = version

    def submit(self, prompts: list[str], keys: torch.Tensor, group_size: int,
               records: Optional[list[dict[str, Any]]]) -> Future:
        """Generate in the background with the version held; :meth:`result` of the future is the Rollout."""
        self.idle()
        self.running = self.worker.submit(self._generate, prompts, keys, group_size, records, self.held)
        return self.running

    def result(self, future: Future) -> Rollout:
        """A submitted batch, once generated; its generation time counts towards this step's. Called
        by every process at the same point: a server lost under one's background requests stops all."""
        rollout, seconds = (on_every_process(self.generator.dist, future.result) if self.generator.shared
                            else future.result())
        self.seconds += seconds
        return rollout

    def _generate(self, prompts, keys, group_size, records, version) -> tuple[Rollout, float]:
        start = time.perf_counter()
        generator = self.generator
        if self.copy is None:
            rollout = generator.sample(None, generator.sampling, prompts, keys, group_size, records)
        else:
            rollout = generator.sample(self.copy, generator.sampling, prompts, keys, group_size, records)
            rollout.sampler_logp = self.logprobs(rollout)
        rollout.policy_version = version
        return rollout, time.perf_counter() - start

    @torch.no_grad()
    def logprobs(self, rollout: Rollout) -> torch.Tensor:
        """``(N, Tc)``: the log-prob the copy drew each sampled token with, computed as the update's
        passes compute pi_old (the same pass kind, temperature and micro-batches), 0 at padding."""
        options, engine = self.generator.engine_options, self.generator.engine
        lean, share = update_pass_kind(forward_module(engine.train_model), options.lean_forward, options.shared_prompts)
        size = options.micro_batch_size or len(rollout)
        parts = []
        with engine.autocast():
            for start in range(0, len(rollout), size):
                rows = slice(start, start + size)
                parts.append(completion_logprobs(self.copy, rollout.sequences[rows], rollout.attention_mask[rows],
                                                 rollout.prompt_length, self.generator.sampling.temperature,
                                                 share_prompts=share, lean=lean))
        return torch.cat(parts) * rollout.policy_token_mask

    def idle(self) -> None:
        """Wait for the background generation, if one runs (its result stays with its future)."""
        if self.running is not None:
            wait([self.running])
            self.running = None

    def metrics(self) -> dict[str, Any]:
        seconds, self.seconds = self.generator.dist.max([self.seconds])[0], 0.0
        return {"time/generate_background": round(seconds, 6)}

    def close(self) -> None:
        self.worker.shutdown(wait=True, cancel_futures=True)

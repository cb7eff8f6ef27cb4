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

import logging
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator, Optional, Protocol, Sequence

import torch

from zenalign.errors import RecipeError
from zenalign.generation.environment import Environments
from zenalign.generation.episodes import run_episodes
from zenalign.generation.rollout import Rollout, generate_groups
from zenalign.generation.vllm_engine import VLLMEngine, vllm_episodes, vllm_rollout
from zenalign.generation.vllm_server import VLLMServer, connect
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


class Collectives(Protocol):
    """What the generator needs of the run's processes (``zenalign.train.distributed.Dist``): whether
    there are several and this is the first, a barrier, and sums and maxima of floats over them."""

    @property
    def active(self) -> bool: ...

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
    server the generator starts (``sampling.vllm.mode: server``)."""

    def __init__(self, sampling: SamplingSection, engine_options: EngineSection, seed: int, engine: Any,
                 tokenizer: Any, eos_ids: Sequence[int], dist: Collectives, policy_dir: Optional[Path],
                 longest_prompt: int, fresh: bool, environments: Optional[Environments] = None,
                 log_dir: Optional[Path] = None):
        self.sampling, self.lean_forward = sampling, engine_options.lean_forward
        self.environments = environments
        if environments is not None and engine.synced_gpus and sampling.decoder != "vllm":
            raise RecipeError("environment: episodes across processes at ZeRO-3 are not supported yet (each process "
                              "would run a different number of forward passes); use engine.zero_stage 0-2, or "
                              "sampling.decoder vllm")
        self.engine, self.tokenizer, self.eos_ids, self.dist = engine, tokenizer, eos_ids, dist
        self.vllm: Optional[VLLMEngine | VLLMServer] = None
        self.sync_seconds, self.syncs = 0.0, 0
        if sampling.decoder != "vllm":
            return
        options = sampling.vllm
        self.shared = options.mode == "server"  # one server for every process: rank 0 pushes the weights
        if policy_dir is None:
            raise RecipeError("sampling.decoder: vllm builds its engine from model.path (a plain Hugging Face "
                              "directory); a model object was given; use decoder zenalign")
        max_model_len = options.max_model_len or self.longest_sequence(longest_prompt)
        if self.shared:
            self.vllm = connect(policy_dir, options, max_model_len, engine_options.precision, dist, log_dir)
        else:
            self.vllm = VLLMEngine(policy_dir, options, engine_options.precision, max_model_len, seed,
                                   engine.device.type, distributed=dist.active)
        # the engine holds model.path's weights: the policy's own until the first optimizer step, unless resumed;
        # a server may hold an earlier run's, so it gets the policy's before the first generation
        self.synced_at: Optional[int] = engine.optimizer_steps if fresh and not self.shared else None

    def __call__(self, prompts: list[str], keys: Optional[torch.Tensor], group_size: int,
                 temperature: Optional[float] = None, records: Optional[list[dict[str, Any]]] = None) -> Rollout:
        """``group_size`` completions per prompt, one per key, at ``temperature`` (default: ``sampling``'s);
        without keys, one greedy completion each. With an environment, ``group_size`` episodes of
        each of ``records`` instead (their prompts rendered with the tools; ``prompts`` unused)."""
        sampling = self.sampling if temperature is None else self.sampling.model_copy(update={"temperature": temperature})
        if self.environments is not None and self.vllm is not None:
            self.sync()
            return vllm_episodes(self.vllm, self.tokenizer, records, group_size, keys, sampling, self.environments,
                                 self.eos_ids, next(self.engine.model.parameters()).device)
        if self.environments is not None:
            return run_episodes(forward_module(self.engine.model), self.tokenizer, records, group_size, keys, sampling,
                                self.environments, self.eos_ids, autocast=self.engine.autocast())
        if self.vllm is None:
            return generate_groups(forward_module(self.engine.model), self.tokenizer, prompts, sampling, self.eos_ids,
                                   group_size, keys=keys, autocast=self.engine.autocast(),
                                   synced_gpus=self.engine.synced_gpus, lean_forward=self.lean_forward)
        self.sync()
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
        """Push the policy's weights into the engine when the optimizer has stepped since the last push."""
        steps = self.engine.optimizer_steps
        if steps == self.synced_at:
            return
        start = time.perf_counter()
        with torch.no_grad(), full_weights(self.engine) as weights:
            if is_adapted(self.engine.model):  # vLLM holds the base model: W + the adapters' delta
                weights = merged_weights(self.engine.model)
            if not self.shared:
                self.vllm.load_weights(weights)
            else:  # no rank samples while rank 0 pushes, and none samples before it is done
                self.dist.barrier()
                if self.dist.is_main:
                    self.vllm.load_weights(weights)
                self.dist.barrier()
        seconds = time.perf_counter() - start
        self.sync_seconds += seconds
        self.syncs += 1
        (log.info if self.syncs == 1 else log.debug)("vLLM weight sync: %.3f s (%d tensors)", seconds, len(weights))
        self.synced_at = steps

    def step_metrics(self, update: dict[str, float]) -> dict[str, Any]:
        """The step's vLLM metrics over every process, from the update's sums; {} without vLLM."""
        if self.vllm is None:
            return {}
        diff, tokens, capped, units = self.dist.sum([update.get(f"sampler_{k}", 0.0)
                                                     for k in ("abs_diff", "tokens", "capped", "units")])
        sync, self.sync_seconds = self.dist.max([self.sync_seconds])[0], 0.0
        return {"vllm/logp_diff": diff / tokens if tokens else None,
                "vllm/capped_frac": capped / units if units else None, "vllm/sync_s": round(sync, 6)}

    def close(self) -> None:
        if self.vllm is not None:
            self.vllm.close()
            self.vllm = None

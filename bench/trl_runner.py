"""The TRL half of the zenalign-vs-TRL benchmark: time Hugging Face TRL's GRPOTrainer on CPU.

TRL is an optional dependency of this benchmark only (``pip install "trl==1.16.0"``); zenalign
itself never imports it.

Configuration chosen to match a zenalign run with the same arguments (zenalign's defaults in
brackets where they differ from TRL's):

* one optimizer step == one generation batch of ``prompts_per_step * group_size`` completions:
  ``per_device_train_batch_size = prompts_per_step * group_size``, ``gradient_accumulation_steps = 1``,
  ``steps_per_generation = 1`` (so ``generation_batch_size`` is the same number), ``num_generations =
  group_size``, ``num_iterations = 1``. With these, TRL's RepeatSampler hands each step
  ``prompts_per_step`` distinct prompts, each repeated ``group_size`` times; ``_prepare_inputs``
  generates once per step and uses the whole batch in one forward/backward (like zenalign's
  ``micro_batch_size: null``), and TRL skips the "old log-prob" forward pass (ratio == 1), as
  zenalign does with ``num_iterations: 1``.
* fp32 and no activation checkpointing: TRL's config defaults are ``bf16=True`` (bf16 autocast, even
  on CPU) and ``gradient_checkpointing=True``; both are turned off here [zenalign: fp32, none].
* plain AdamW (``optim="adamw_torch"``), constant learning rate, no warm-up, no weight decay,
  ``max_grad_norm=1.0`` [TRL defaults: fused AdamW, linear decay].
* ``loss_type="grpo"`` (per-completion token mean, then mean over completions) [TRL default:
  ``"dapo"``], ``scale_rewards="group"``, ``epsilon=0.2``: zenalign's defaults.
* plain-text prompts: the dataset's ``prompt`` column holds strings, so TRL never applies a chat
  template; the tokenizer is called without special tokens (ByT5 would otherwise append ``</s>``,
  i.e. EOS, to every prompt; zenalign encodes prompts with ``add_special_tokens=False``).
* no vLLM, no continuous batching, ``report_to="none"``, ``save_strategy="no"``, no eval, no
  completion logging; the Hugging Face Hub and datasets are forced offline.
"""

from __future__ import annotations

import os

# Before anything imports huggingface_hub / transformers / datasets (their constants are read at import).
for _var in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE"):
    os.environ[_var] = "1"
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import resource
import statistics
import sys
import time
from typing import Any, Callable

__all__ = ["build_trl_trainer", "run_trl", "trl_config"]


def _force_offline() -> None:
    """Also flip the already-imported constants, in case transformers/datasets came in first."""
    for _var in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE"):
        os.environ[_var] = "1"
    try:
        import huggingface_hub.constants as hub_constants

        hub_constants.HF_HUB_OFFLINE = True
    except Exception:  # pragma: no cover - best effort
        pass
    try:
        import datasets.config as datasets_config

        datasets_config.HF_HUB_OFFLINE = True
        if hasattr(datasets_config, "HF_DATASETS_OFFLINE"):
            datasets_config.HF_DATASETS_OFFLINE = True
    except Exception:  # pragma: no cover - best effort
        pass


class _NoAutoSpecialTokens:
    """Mixin: encode with ``add_special_tokens=False`` unless the caller says otherwise.

    TRL tokenizes plain-text prompts with ``processing_class(text=prompts)``; for ByT5 that appends
    ``</s>`` (id 1, which is also the model's EOS), so every prompt would end in EOS.
    """

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        kwargs.setdefault("add_special_tokens", False)
        return super().__call__(*args, **kwargs)


def _load_tokenizer(model_dir: str, add_special_tokens: bool) -> Any:
    """ByT5Tokenizer loaded by its class: in transformers 5, AutoTokenizer on a qwen2 directory returns a
    Qwen2Tokenizer (ignoring tokenizer_config.json's ``ByT5Tokenizer``) that encodes text to nothing."""
    import json
    from pathlib import Path

    import transformers

    declared = "ByT5Tokenizer"
    config_file = Path(model_dir) / "tokenizer_config.json"
    if config_file.is_file():
        declared = json.loads(config_file.read_text(encoding="utf-8")).get("tokenizer_class") or declared
    cls = getattr(transformers, declared, None) or transformers.ByT5Tokenizer
    tokenizer = cls.from_pretrained(model_dir, local_files_only=True)
    if not add_special_tokens:
        base = type(tokenizer)
        tokenizer.__class__ = type(base.__name__, (_NoAutoSpecialTokens, base), {"__module__": __name__})
    tokenizer.padding_side = "left"
    tokenizer.truncation_side = "left"
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    probe = tokenizer("reverse abc:")["input_ids"]
    bytes_expected = "ByT5" in type(tokenizer).__name__  # one id per byte; a word-level one: 3 known words
    if len(probe) < (len("reverse abc:") if bytes_expected else 3) or tokenizer.unk_token_id in probe:
        raise RuntimeError(f"{type(tokenizer).__name__} from {model_dir} encodes 'reverse abc:' to {probe}")
    return tokenizer


def trl_config(
    *,
    steps: int,
    prompts_per_step: int = 8,
    group_size: int = 8,
    max_new_tokens: int = 16,
    temperature: float = 1.0,
    learning_rate: float = 1e-6,
    beta: float = 0.0,
    seed: int = 0,
    output_dir: str,
    loss_type: str = "grpo",
    bf16: bool = False,
    activation_checkpointing: bool = False,
    use_cpu: bool = True,
):
    """The GRPOConfig used by :func:`run_trl` (exposed so the benchmark can print it); ``use_cpu``
    False lets accelerate place the model on the GPU."""
    from trl import GRPOConfig

    batch = prompts_per_step * group_size
    # zenalign's KL term is the plain k3 estimator of DeepSeekMath (eq. 4). TRL (1.x) by default
    # multiplies it by the importance ratio (use_bias_correction_kl), which at mu = 1 equals 1 but
    # adds kl * grad(log pi) to the gradient; turned off here so both differentiate the same loss.
    same_kl = {"use_bias_correction_kl": False} if "use_bias_correction_kl" in GRPOConfig.__dataclass_fields__ else {}
    return GRPOConfig(
        **same_kl,
        output_dir=output_dir,
        # --- steps <-> generation batches: one optimizer step == one generation batch
        max_steps=steps,
        per_device_train_batch_size=batch,  # completions per step (prompts x group)
        gradient_accumulation_steps=1,
        steps_per_generation=1,  # => generation_batch_size == batch
        num_generations=group_size,
        num_iterations=1,  # mu
        shuffle_dataset=True,
        # --- generation (transformers.generate, no vLLM)
        max_completion_length=max_new_tokens,
        temperature=temperature,
        top_p=1.0,
        top_k=0,
        min_p=None,
        repetition_penalty=1.0,
        use_vllm=False,
        use_transformers_continuous_batching=False,
        # --- objective
        beta=beta,
        epsilon=0.2,
        loss_type=loss_type,
        scale_rewards="group",
        mask_truncated_completions=False,
        # --- optimizer
        learning_rate=learning_rate,
        optim="adamw_torch",
        adam_beta1=0.9,
        adam_beta2=0.999,
        weight_decay=0.0,
        lr_scheduler_type="constant",
        warmup_steps=0,
        max_grad_norm=1.0,
        # --- precision / memory: plain fp32 on CPU (or the GPU with use_cpu=False)
        use_cpu=use_cpu,
        bf16=bf16,
        fp16=False,
        activation_checkpointing=activation_checkpointing,  # TRL's default is True; off unless asked
        torch_compile=False,
        # --- no side effects
        report_to="none",
        logging_steps=1,
        logging_strategy="steps",
        save_strategy="no",
        eval_strategy="no",
        log_completions=False,
        push_to_hub=False,
        disable_tqdm=True,
        dataloader_num_workers=0,
        remove_unused_columns=False,  # extra dataset columns reach the reward function
        seed=seed,
        data_seed=seed,
    )


def _step_timer():
    from transformers import TrainerCallback

    class StepTimer(TrainerCallback):
        """Wall time of each optimizer step.

        ``core``: on_step_begin -> on_step_end (generation, rewards, forward/backward, clip, AdamW).
        ``wall``: previous on_step_end -> this on_step_end (adds the trainer's logging of the previous
        step and fetching the next prompts; the first one starts at its on_step_begin).
        """

        def __init__(self) -> None:
            self.core: list[float] = []
            self.wall: list[float] = []
            self._begin: float | None = None
            self._last_end: float | None = None

        def on_step_begin(self, args, state, control, **kwargs):
            self._begin = time.perf_counter()

        def on_step_end(self, args, state, control, **kwargs):
            now = time.perf_counter()
            self.core.append(now - self._begin)
            self.wall.append(now - (self._last_end if self._last_end is not None else self._begin))
            self._last_end = now

    return StepTimer()


def _warmup_count(steps: int, warmup_steps: int | None) -> int:
    if warmup_steps is None:
        # Step 1 always pays one-time costs (AdamW state allocation, first-call kernel/allocator
        # warm-up, lazily built generation config); step 2 is often still a little slow. Drop two
        # when at least three steps remain after them, else one; never drop everything.
        warmup_steps = 2 if steps >= 5 else 1
    return max(0, min(warmup_steps, steps - 1))


def build_trl_trainer(model_dir: str, prompts: list[dict], reward_fn: Callable[..., list[float]], *, steps: int,
                      output_dir: str, add_special_tokens: bool = False, **config: Any):
    """TRL's GRPOTrainer over the saved model in ``model_dir``, configured by :func:`trl_config`, with
    a step timer attached; returns ``(trainer, timer)``. Nothing has run yet."""
    _force_offline()

    import datasets
    import torch
    import transformers
    from transformers import AutoModelForCausalLM
    from trl import GRPOTrainer

    if steps < 1:
        raise ValueError("steps must be >= 1")
    if not prompts or "prompt" not in prompts[0]:
        raise ValueError("prompts must be a non-empty list of {'prompt': str, ...} records")

    datasets.disable_progress_bars()
    transformers.logging.set_verbosity_error()

    tokenizer = _load_tokenizer(model_dir, add_special_tokens)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32, local_files_only=True)
    dataset = datasets.Dataset.from_list([dict(p) for p in prompts])
    args = trl_config(steps=steps, output_dir=output_dir, **config)
    prompts_per_step, group_size = args.per_device_train_batch_size // args.num_generations, args.num_generations
    if len(prompts) < prompts_per_step:
        raise ValueError(f"need at least prompts_per_step={prompts_per_step} prompts, got {len(prompts)}")
    batch = prompts_per_step * group_size
    assert args.generation_batch_size == batch and args.steps_per_generation == 1, (
        args.generation_batch_size, args.steps_per_generation)

    def reward(prompts, completions, **kwargs):  # TRL names the metric after __name__
        return [float(r) for r in reward_fn(prompts, completions, **kwargs)]

    name = getattr(reward_fn, "__name__", "")
    reward.__name__ = name if name.isidentifier() else "reward"

    timer = _step_timer()
    trainer = GRPOTrainer(
        model=model,
        reward_funcs=reward,
        args=args,
        train_dataset=dataset,
        processing_class=tokenizer,
        callbacks=[timer],
    )
    from transformers.trainer_callback import PrinterCallback

    trainer.remove_callback(PrinterCallback)  # logs still land in trainer.state.log_history
    return trainer, timer


def run_trl(
    model_dir: str,
    prompts: list[dict],
    reward_fn: Callable[..., list[float]],
    *,
    steps: int,
    output_dir: str,
    warmup_steps: int | None = None,
    add_special_tokens: bool = False,
    **config: Any,
) -> dict:
    """Train TRL's GRPOTrainer for exactly ``steps`` optimizer steps on CPU and time it.

    Each step samples ``prompts_per_step`` prompts x ``group_size`` completions of up to
    ``max_new_tokens`` tokens, scores them with ``reward_fn(prompts, completions, **columns)``
    (TRL-style; extra dataset columns such as ``answer`` arrive as keyword arguments), and takes one
    AdamW step.

    Returns ``seconds_per_step`` (median of ``per_step_seconds`` after ``warmup_steps_skipped``
    warm-up steps), ``completions_per_s``, ``per_step_seconds`` (trainer wall time between
    consecutive step ends), ``per_step_core_seconds``, ``reward_mean_per_step`` and the mean completion
    length / truncated fraction per step (from TRL's logged metrics), ``peak_rss_mb`` (ru_maxrss of the
    whole process: includes everything the process did before, e.g. building models), ``trl_version``
    and the effective config.
    """
    import torch
    import transformers
    import trl

    trainer, timer = build_trl_trainer(model_dir, prompts, reward_fn, steps=steps, output_dir=output_dir,
                                       add_special_tokens=add_special_tokens, **config)
    args, model = trainer.args, trainer.model
    batch, max_new_tokens = args.per_device_train_batch_size, args.max_completion_length
    # The generation settings TRL will use (it overrides the model's generation_config with these).
    gen = trainer.generation_config
    if gen.max_new_tokens != max_new_tokens or gen.min_new_tokens not in (None, 0):
        raise RuntimeError(f"unexpected TRL generation config: {gen}")

    start = time.perf_counter()
    trainer.train()
    total = time.perf_counter() - start

    if trainer.state.global_step != steps or len(timer.wall) != steps:
        raise RuntimeError(f"TRL ran {trainer.state.global_step} optimizer steps ({len(timer.wall)} timed), not {steps}")

    logs = [entry for entry in trainer.state.log_history if "reward" in entry]

    def per_step(key: str) -> list[float | None]:
        return [entry.get(key) for entry in logs]

    skip = _warmup_count(steps, warmup_steps)
    seconds_per_step = statistics.median(timer.wall[skip:])
    peak_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux, bytes on macOS
    peak_mb = peak_kb / (1024 * 1024) if sys.platform == "darwin" else peak_kb / 1024
    return {
        "framework": "trl",
        "trl_version": trl.__version__,
        "transformers_version": transformers.__version__,
        "torch_version": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "steps": steps,
        "completions_per_step": batch,
        "warmup_steps_skipped": skip,
        "seconds_per_step": seconds_per_step,
        "completions_per_s": batch / seconds_per_step,
        "core_seconds_per_step": statistics.median(timer.core[skip:]),
        "per_step_seconds": timer.wall,
        "per_step_core_seconds": timer.core,
        "train_seconds": total,
        "reward_mean_per_step": per_step("reward"),
        "completion_mean_length_per_step": per_step("completions/mean_length"),
        "clipped_ratio_per_step": per_step("completions/clipped_ratio"),
        "peak_rss_mb": peak_mb,
        "peak_rss_note": "ru_maxrss of the whole process (model load, dataset, anything run before in it)",
        "num_parameters": sum(p.numel() for p in model.parameters()),
        "config": {
            "per_device_train_batch_size": args.per_device_train_batch_size,
            "gradient_accumulation_steps": args.gradient_accumulation_steps,
            "steps_per_generation": args.steps_per_generation,
            "generation_batch_size": args.generation_batch_size,
            "num_generations": args.num_generations,
            "num_iterations": args.num_iterations,
            "max_completion_length": args.max_completion_length,
            "temperature": args.temperature,
            "beta": args.beta,
            "loss_type": args.loss_type,
            "learning_rate": args.learning_rate,
            "optim": str(getattr(args.optim, "value", args.optim)),
            "bf16": args.bf16,
            "activation_checkpointing": args.activation_checkpointing,
        },
    }

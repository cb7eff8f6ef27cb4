"""What runs the update, behind one small interface.

    engine = create_engine(recipe.engine, recipe.grpo, dist, device, local_batch)   # before the policy loads (ZeRO-3)
    engine.attach(policy, optimizer_steps, micro_batches)
    with engine.micro_batch(last): loss = ...(engine.train_model ...); engine.backward(loss)
    grad_norm = engine.optimizer_step()

- ``TorchEngine``: plain AdamW on one process, DistributedDataParallel under ``torchrun``.
- ``DeepSpeedEngine``: DeepSpeed ZeRO stages 0-3 with optional CPU offload; its JSON config is
  generated from the recipe's ``engine`` section, with the user's raw keys merged on top.

Both average gradients over processes, so the trainer scales each process's loss by the world
size and normalises it with global token counts: the update equals the single-process one.
"""

from __future__ import annotations

import logging
import math
import warnings
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import torch

from zenalign.models.attention import float32_attention_on_cpu
from zenalign.models.loading import load_tensors_only, unpickling_reason
from zenalign.models.lora import forward_module
from zenalign.errors import ModelLoadError, NonFiniteError, RecipeError
from zenalign.recipe.schema import EngineSection, GRPOSection
from zenalign.train.distributed import Dist, prepare_deepspeed_env

log = logging.getLogger("zenalign")


def lr_lambda(schedule: str, warmup_steps: int, total_steps: int):
    """Multiplier of the peak learning rate at optimizer step ``s`` (0-based)."""

    def factor(step: int) -> float:
        if warmup_steps and step < warmup_steps:
            return (step + 1) / warmup_steps
        if schedule == "constant":
            return 1.0
        decay_steps = max(1, total_steps - warmup_steps)
        progress = min(1.0, (step - warmup_steps) / decay_steps)
        if schedule == "linear":
            return 1.0 - progress
        return 0.5 * (1.0 + math.cos(math.pi * progress))  # cosine

    return factor


def _scheduler(optimizer, optim: GRPOSection, total_steps: int):
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(optim.lr_schedule, optim.warmup_steps, total_steps))


def adamw_options(optim: GRPOSection) -> dict[str, Any]:
    """AdamW's settings from the recipe's ``grpo`` section, for both engines."""
    return {"lr": optim.learning_rate, "betas": tuple(optim.adam_betas), "weight_decay": optim.weight_decay}


def retarget_learning_rate(scheduler: Any, lr: float) -> None:
    """After a resume: the loaded schedule holds the peak rate of the run that wrote it. Continue
    it, from its step, with the recipe's ``grpo.learning_rate`` instead, and say so when it changed
    (the schedule's shape always comes from the recipe: it is not saved)."""
    old = float(scheduler.base_lrs[0])
    if old == lr:
        return
    scheduler.base_lrs = [lr for _ in scheduler.base_lrs]
    for group, factor in zip(scheduler.optimizer.param_groups, scheduler.lr_lambdas):
        group["initial_lr"] = lr
        group["lr"] = lr * factor(scheduler.last_epoch)
    scheduler._last_lr = [group["lr"] for group in scheduler.optimizer.param_groups]
    log.warning("grpo.learning_rate changed on resume: %g -> %g; the schedule continues from optimizer step %d "
                "with the new peak rate", old, lr, scheduler.last_epoch)


def enable_gradient_checkpointing(model: torch.nn.Module, settings: EngineSection) -> None:
    """``engine.gradient_checkpointing``: transformers' own, non-reentrant (it needs no input that
    requires grad, so frozen embeddings and LoRA work); the lean forward reads the same flag."""
    if settings.gradient_checkpointing:
        target = forward_module(model)
        if not getattr(target, "supports_gradient_checkpointing", False):
            raise RecipeError(f"engine.gradient_checkpointing: {type(target).__name__} does not support it; set it to false")
        if hasattr(target, "activation_checkpointing_enable"):  # transformers >= 5.2x's name
            target.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
        else:
            target.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})


def cuda_matmuls_use_tf32() -> bool:
    """Whether this process lets CUDA run float32 matrix products in TF32 (a 10-bit mantissa)."""
    matmul = torch.backends.cuda.matmul
    mode = getattr(matmul, "fp32_precision", None)  # torch >= 2.9; "none" defers to the global setting
    if mode is None:
        return bool(matmul.allow_tf32)
    return mode == "tf32" or (mode == "none" and getattr(torch.backends, "fp32_precision", "none") == "tf32")


def check_fp32_matmuls(device: torch.device, precision: str) -> None:
    """How a GPU multiplies, chosen here rather than inherited by accident:

    - ``engine.precision: fp32`` means IEEE float32 products, torch's default on CUDA, which
      zenalign leaves as it is: TF32 would round every product's inputs to a 10-bit mantissa, and
      the tolerances the device tests hold fp32 to (the lean forward within 2e-5 of transformers'
      log-probs, as on a CPU) assume float32. A process that turned TF32 on (for instance with
      ``torch.set_float32_matmul_precision("high")``) gets one warning: its "fp32" runs are TF32.
    - ``engine.precision: bf16`` is bf16 autocast over float32 weights and optimizer state, on a
      GPU as on a CPU (:meth:`TorchEngine.autocast`); TF32 does not enter into it. Attention runs
      in bf16 on a GPU (the CPU's float32 attention is for its slow bf16 kernels only)."""
    if device.type == "cuda" and precision == "fp32" and cuda_matmuls_use_tf32():
        log.warning("engine.precision fp32 on %s: this process has TF32 matrix products turned on, so float32 "
                    "products are rounded to TF32 (torch.backends.cuda.matmul.fp32_precision = 'ieee' turns it off)",
                    device)


def create_engine(settings: EngineSection, optim: GRPOSection, dist: Dist, device: torch.device, local_batch: int):
    """The engine ``engine.backend`` names; ``optim`` holds the optimizer's settings (the recipe's
    ``grpo`` section) and ``local_batch`` is the number of completions each process updates on."""
    if settings.backend == "deepspeed":
        return DeepSpeedEngine(settings, optim, dist, device, local_batch)
    return TorchEngine(settings, optim, dist, device)


class _Engine:
    def __init__(self, settings: EngineSection, optim: GRPOSection, dist: Dist, device: torch.device):
        self.settings, self.optim, self.dist, self.device = settings, optim, dist, device

    def _continue_schedule(self) -> None:
        retarget_learning_rate(self.scheduler, self.optim.learning_rate)


class TorchEngine(_Engine):
    """AdamW on one process, or DistributedDataParallel across a torchrun launch."""

    synced_gpus = False

    def attach(self, model: torch.nn.Module, optimizer_steps: int, micro_batches: int) -> None:
        enable_gradient_checkpointing(model, self.settings)
        check_fp32_matmuls(self.device, self.settings.precision)
        self.model = model.to(self.device)
        float32_attention_on_cpu(self.model, self.device, self.settings.precision)
        self.train_model: torch.nn.Module = self.model
        if self.dist.active:
            from torch.nn.parallel import DistributedDataParallel

            ids = [self.device.index] if self.device.type == "cuda" else None
            self.train_model = DistributedDataParallel(self.model, device_ids=ids)
        params = [p for p in self.model.parameters() if p.requires_grad]
        self.optimizer = adamw(params, **adamw_options(self.optim))
        self.scheduler = _scheduler(self.optimizer, self.optim, optimizer_steps)

    def prepare_reference(self, reference: torch.nn.Module) -> torch.nn.Module:
        float32_attention_on_cpu(reference, self.device, self.settings.precision)
        return reference.to(self.device)

    def autocast(self):
        """bf16 autocast for forward passes when ``engine.precision`` is bf16, on the run's device
        (see :func:`check_fp32_matmuls`)."""
        if self.settings.precision == "bf16":
            return torch.autocast(device_type=self.device.type, dtype=torch.bfloat16)
        return nullcontext()

    def micro_batch(self, last: bool):
        """Under DDP, gradients are all-reduced once per optimizer step, on the last micro-batch."""
        if self.train_model is not self.model and not last:
            return self.train_model.no_sync()
        return nullcontext()

    def backward(self, loss: torch.Tensor) -> None:
        loss.backward()

    def optimizer_step(self) -> float:
        """Clip, step the optimizer and the schedule, clear gradients. Returns the grad norm; when
        it is NaN or infinite, nothing is stepped."""
        params = [p for p in self.model.parameters() if p.grad is not None]
        max_norm = self.settings.max_grad_norm
        norm = float(torch.nn.utils.clip_grad_norm_(params, max_norm if max_norm is not None else float("inf")))
        if math.isfinite(norm):  # a NaN or infinite gradient never reaches the weights (engine.on_nonfinite)
            self.optimizer.step()
            self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        return norm

    @property
    def optimizer_steps(self) -> int:
        """Optimizer steps taken (the schedule's count: restored on resume, not advanced by a dropped step)."""
        return int(self.scheduler.last_epoch)

    @property
    def learning_rate(self) -> float:
        return float(self.optimizer.param_groups[0]["lr"])

    def policy_state_dict(self) -> dict[str, torch.Tensor] | None:
        """The full policy weights, on rank 0 (None elsewhere)."""
        return self.model.state_dict() if self.dist.is_main else None

    def save_state(self, directory: Path) -> None:
        """Optimizer and schedule state; read back with ``torch.load(weights_only=True)`` (no pickle code)."""
        if self.dist.is_main:
            directory.mkdir(parents=True, exist_ok=True)
            with (directory / "optimizer.pt").open("wb") as f:  # a Python file: a full disk surfaces as OSError
                torch.save({"optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict()}, f)

    def load_state(self, directory: Path) -> None:
        state = load_tensors_only(directory / "optimizer.pt", self.device)
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self._continue_schedule()


def deepspeed_safe_globals() -> list[Any]:
    """The classes DeepSpeed's own ZeRO checkpoints pickle besides tensors and containers: its
    ZeRO-stage enum, its loss scalers and its fragment addresses. Nothing else is accepted."""
    from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    return [ZeroStageEnum, LossScaler, DynamicLossScaler, fragment_address]


def refuse_pickled_code(directory: Path, what: str = "--resume") -> None:
    """DeepSpeed reads its checkpoints with ``torch.load(weights_only=False)``, which would run any
    code pickled into them. So every ``.pt`` file under ``directory`` is first opened with torch's
    weights-only unpickler (memory-mapped, so the tensors are not read), allowing only the classes
    of :func:`deepspeed_safe_globals`; a file that needs anything else is refused, naming it."""
    allowed = deepspeed_safe_globals()
    for path in sorted(Path(directory).rglob("*.pt")):
        try:
            with torch.serialization.safe_globals(allowed), warnings.catch_warnings():
                warnings.simplefilter("ignore")  # nothing printed before the one line below
                torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except Exception as exc:
            raise ModelLoadError(f"{what}: '{path}' holds more than tensors and DeepSpeed's own state "
                                 f"({unpickling_reason(exc)}); it was not loaded, because loading it could run "
                                 f"code. zenalign and DeepSpeed never write such a file") from None


def deep_merge(base: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in extra.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = deep_merge(out[key], value)
        else:
            out[key] = value
    return out


def adamw(params: list[torch.nn.Parameter], **options) -> torch.optim.AdamW:
    """torch's fused AdamW (one vectorised kernel over all parameters instead of a per-parameter
    loop, the same update; measurements: docs/performance-notes.md), or the loop where fused is not
    available for these parameters' device or dtype."""
    try:
        return torch.optim.AdamW(params, fused=True, **options)
    except (RuntimeError, TypeError, ValueError):
        return torch.optim.AdamW(params, **options)


def deepspeed_config(e: EngineSection, optim: GRPOSection, micro_batch_size: int, micro_batches: int,
                     device_type: str = "cpu") -> dict[str, Any]:
    """DeepSpeed's JSON config, generated from the recipe's engine and grpo sections (offloaded
    states in pinned memory when the run is on a GPU, where copies from it need not wait)."""
    adam = adamw_options(optim)
    zero: dict[str, Any] = {"stage": e.zero_stage}
    pinned = device_type == "cuda"
    if e.offload_optimizer:
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": pinned}
    if e.offload_params:
        zero["offload_param"] = {"device": "cpu", "pin_memory": pinned}
    config = {
        "train_micro_batch_size_per_gpu": micro_batch_size,
        "gradient_accumulation_steps": micro_batches,
        "gradient_clipping": e.max_grad_norm or 0.0,
        "zero_optimization": zero,
        "optimizer": {
            "type": "AdamW",
            # DeepSpeed's CPU Adam is required for offload; otherwise plain torch AdamW, as the torch engine.
            "params": {"lr": adam["lr"], "betas": list(adam["betas"]), "eps": 1e-8, "weight_decay": adam["weight_decay"],
                       **({} if e.offload_optimizer else {"torch_adam": True})},
        },
        "bf16": {"enabled": e.precision == "bf16"},
        "steps_per_print": 2**31 - 1,
        "wall_clock_breakdown": False,
    }
    return deep_merge(config, e.deepspeed_config)


class DeepSpeedEngine(_Engine):
    """DeepSpeed ZeRO. Create it before loading the policy: at stage 3 it keeps transformers'
    ``HfDeepSpeedConfig`` alive so ``from_pretrained`` loads the weights already partitioned."""

    def __init__(self, settings: EngineSection, optim: GRPOSection, dist: Dist, device: torch.device,
                 local_batch: int):
        prepare_deepspeed_env(device.type)
        try:
            import deepspeed  # noqa: F401
        except ImportError as exc:
            raise RecipeError("engine.backend: deepspeed is not installed; pip install 'zenalign[deepspeed]'") from exc
        super().__init__(settings, optim, dist, device)
        self.stage = settings.zero_stage
        self.synced_gpus = self.stage == 3 and dist.world_size > 1
        self.micro_batch_size = min(settings.micro_batch_size or local_batch, local_batch)
        self.micro_batches = math.ceil(local_batch / self.micro_batch_size)
        self.config = deepspeed_config(settings, optim, self.micro_batch_size, self.micro_batches, device.type)
        self._hf_config = None
        if self.stage == 3:
            try:
                from transformers.integrations import HfDeepSpeedConfig

                self._hf_config = HfDeepSpeedConfig(self.config)  # must stay referenced while models load
            except Exception as exc:  # accelerate missing, mostly
                raise RecipeError(f"engine.zero_stage 3: transformers' DeepSpeed integration is unavailable: {exc}") from exc

    def attach(self, model: torch.nn.Module, optimizer_steps: int, micro_batches: int) -> None:
        import deepspeed

        enable_gradient_checkpointing(model, self.settings)
        try:
            self.train_model, self.optimizer, _, self.scheduler = deepspeed.initialize(
                model=model,
                model_parameters=[p for p in model.parameters() if p.requires_grad],
                config=self.config,
                lr_scheduler=lambda optimizer: _scheduler(optimizer, self.optim, optimizer_steps),
            )
        except Exception as exc:
            raise RecipeError(f"engine: DeepSpeed rejected the configuration: {type(exc).__name__}: {exc}") from exc
        self.model = self.train_model.module

    def prepare_reference(self, reference: torch.nn.Module) -> torch.nn.Module:
        """A frozen copy in the policy's precision; at ZeRO-3 an inference-only ZeRO engine."""
        if self.settings.precision == "bf16":
            reference = reference.to(torch.bfloat16)
        if self.stage != 3:
            return reference.to(self.train_model.device)
        import deepspeed

        config = {key: self.config[key] for key in ("train_micro_batch_size_per_gpu", "bf16")}
        config["zero_optimization"] = {"stage": 3, **({"offload_param": self.config["zero_optimization"]["offload_param"]}
                                                      if self.settings.offload_params else {})}
        engine, *_ = deepspeed.initialize(model=reference, config=config)
        engine.eval()
        return engine

    def autocast(self):
        return nullcontext()  # DeepSpeed holds the weights in the compute precision itself

    def micro_batch(self, last: bool):
        return nullcontext()

    def backward(self, loss: torch.Tensor) -> None:
        # Token weights already normalise over the whole batch: no extra 1/accumulation scaling.
        engine = self.train_model
        engine.backward(loss, scale_wrt_gas=False)
        if engine.is_gradient_accumulation_boundary() and not engine.zero_optimization():
            # Without ZeRO, DeepSpeed clips with a norm it does not keep; the gradients are
            # all-reduced by now, so measure it here, before the optimizer step clears them.
            grads = [p.grad.detach().float().norm() for p in engine.module.parameters() if p.grad is not None]
            self._norm = float(torch.linalg.vector_norm(torch.stack(grads))) if grads else 0.0
            if not math.isfinite(self._norm):  # ZeRO skips such a step itself; stage 0 would take it
                raise NonFiniteError(
                    f"optimizer step {engine.global_steps + 1}: the gradient norm is {self._norm}; it was stopped "
                    f"before DeepSpeed stepped it, and nothing was saved from it. Lower grpo.learning_rate or set "
                    f"engine.max_grad_norm")
        engine.step()  # steps the optimizer only at the accumulation boundary

    def optimizer_step(self) -> float:
        if self.train_model.micro_steps % self.micro_batches:
            raise RuntimeError("DeepSpeed's gradient accumulation is out of step with zenalign's micro-batches")
        norm = self.train_model.get_global_grad_norm()
        if norm is None:
            norm = getattr(self, "_norm", float("nan"))
        return float(norm)

    @property
    def optimizer_steps(self) -> int:
        """Optimizer steps taken (the schedule's count: restored on resume, not advanced by a dropped step)."""
        return int(self.scheduler.last_epoch)

    @property
    def learning_rate(self) -> float:
        return float(self.scheduler.get_last_lr()[0])

    def policy_state_dict(self) -> dict[str, torch.Tensor] | None:
        """The full policy weights on rank 0 (gathered from every rank at ZeRO-3)."""
        if self.stage == 3:
            state = self.train_model._zero3_consolidated_16bit_state_dict()  # collective: every rank calls it
            return state if self.dist.is_main else None
        return self.model.state_dict() if self.dist.is_main else None

    def save_state(self, directory: Path) -> None:
        self.train_model.save_checkpoint(str(directory), tag="zero", save_latest=False)

    def load_state(self, directory: Path) -> None:
        refuse_pickled_code(directory)  # before DeepSpeed's own torch.load(weights_only=False)
        path, _ = self.train_model.load_checkpoint(
            str(directory), tag="zero", load_optimizer_states=True, load_lr_scheduler_states=True
        )
        if path is None:
            raise ModelLoadError(f"checkpoint '{directory.parent}': the DeepSpeed engine state in {directory} could not be loaded")
        self._continue_schedule()

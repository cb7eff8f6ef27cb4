"""TRL's option names for the Python API: ``GRPOTrainer(beta=0.04, num_generations=8, ...)``.

Each maps to the zenalign field that means the same (docs/from-trl.md has the table). Two of them,
``loss_type`` and ``scale_rewards``, select built-in plugins by name, which is why this mapping
lives in a module of its own: it is the one place in the core that names specific normalizers
and losses, on purpose.
"""

from __future__ import annotations

from typing import Any

from zenalign.errors import RecipeError

# TRL's GRPOConfig names that the Python API accepts, and the field each one sets (docs/from-trl.md).
TRL_NAMES = {"beta": "kl_coef", "num_generations": "group_size", "max_completion_length": "max_new_tokens",
             "epsilon": "clip_epsilon", "epsilon_high": "clip_epsilon_high", "max_steps": "steps",
             "lr_scheduler_type": "lr_schedule", "logging_steps": "log_interval", "save_steps": "checkpoint_interval",
             "eval_steps": "eval_interval", "save_total_limit": "keep_checkpoints"}
TRL_LOSS_TYPES = {"grpo": "grpo", "bnpo": "dapo", "dapo": "dapo", "dr_grpo": "dr_grpo"}
TRL_SCALE_REWARDS = {True: "group_zscore", "group": "group_zscore", False: "dr_grpo", "none": "dr_grpo",
                     "batch": "batch_zscore"}


def translate_trl_options(options: dict[str, Any]) -> dict[str, Any]:
    """TRL's option names as zenalign's: ``beta`` -> ``kl_coef``, ``loss_type`` ->
    ``grpo.loss_aggregation`` (or ``loss``), ``scale_rewards`` -> ``normalizer``; see TRL_NAMES."""
    out: dict[str, Any] = {}
    for key, value in options.items():
        target = TRL_NAMES.get(key) or {"loss_type": "loss_aggregation", "scale_rewards": "normalizer"}.get(key)
        if target and target in options:
            raise RecipeError(f"GRPOTrainer: {key} (TRL's name) and {target} both set {target}; give it once")
        if key in TRL_NAMES:
            out[TRL_NAMES[key]] = value
        elif key == "loss_type":
            if value == "cispo":
                out["loss"] = {"type": "cispo"}
            elif value in TRL_LOSS_TYPES:
                out["loss_aggregation"] = TRL_LOSS_TYPES[value]
            else:
                raise RecipeError(f"GRPOTrainer: loss_type={value!r} (TRL) has no zenalign equivalent; accepted: "
                                  f"{', '.join([*TRL_LOSS_TYPES, 'cispo'])}")
        elif key == "scale_rewards":
            if value not in TRL_SCALE_REWARDS or isinstance(value, int) and not isinstance(value, bool):
                raise RecipeError(f"GRPOTrainer: scale_rewards={value!r} (TRL); accepted: group, batch, none, True, False")
            kind = TRL_SCALE_REWARDS[value]
            out["normalizer"] = {"type": kind, "center": "group"} if kind == "batch_zscore" else {"type": kind}
        else:
            out[key] = value
    return out

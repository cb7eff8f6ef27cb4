"""LoRA adapters through peft (an optional extra: ``pip install 'zenalign[lora]'``).

The policy becomes a ``peft.PeftModel`` whose adapters are the only trainable parameters. The KL
reference is the same module with its adapters switched off (peft's ``disable_adapter()``), so
no second copy of the base weights exists. Log-prob passes and sampling run on the module peft
wraps (``get_base_model()``: the transformers model with adapter layers inside), which keeps
transformers' KV-cache and ``logits_to_keep`` arguments; the lean forward does not take adapter
layers and falls back to transformers' forward (logged once per model).
"""

from __future__ import annotations

import json
import re
import shutil
import sys
import warnings
from contextlib import contextmanager, nullcontext
from pathlib import Path
from typing import Any, Iterator

import torch

from zenalign.errors import ModelLoadError, RecipeError
from zenalign.models.loading import load_causal_lm

INSTALL = "pip install 'zenalign[lora]'"
ADAPTER_CONFIG = "adapter_config.json"


def require_peft(field: str = "model.lora") -> Any:
    """The peft module, or a one-line error with the install command."""
    try:
        import peft
    except ImportError as exc:
        raise RecipeError(f"{field}: LoRA needs peft, which is not installed; {INSTALL}") from exc
    return peft


def is_adapted(model: Any) -> bool:
    """Whether ``model`` is a peft model (without importing peft when nothing has)."""
    peft = sys.modules.get("peft")
    return peft is not None and isinstance(model, peft.PeftModel)


def forward_module(model: torch.nn.Module) -> torch.nn.Module:
    """The module to run forward passes on: a peft model's wrapped transformers model (its adapter
    layers active, or not, as the peft model says), any other model itself."""
    return model.get_base_model() if is_adapted(model) else model


def adapters_off(model: torch.nn.Module):
    """A context in which a peft model computes its base model's outputs (no-op for other models)."""
    return model.disable_adapter() if is_adapted(model) else nullcontext()


def linear_module_names(model: torch.nn.Module) -> list[str]:
    """The distinct last names of the model's linear layers (what ``target_modules`` entries match)."""
    return sorted({name.rsplit(".", 1)[-1] for name, module in model.named_modules()
                   if isinstance(module, torch.nn.Linear)})


def add_adapters(model: torch.nn.Module, lora: Any) -> torch.nn.Module:
    """``model`` with fresh LoRA adapters from the recipe's ``model.lora`` section."""
    peft = require_peft()
    targets = lora.target_modules
    if targets != "all-linear":
        names = linear_module_names(model)
        unknown = [t for t in targets if not any(n == t.rsplit(".", 1)[-1] for n in names)]
        if unknown:
            raise RecipeError(f"model.lora.target_modules: {', '.join(unknown)} names no linear module of the model; "
                              f"its linear modules: {', '.join(names)} (or use all-linear)")
    config = peft.LoraConfig(r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout, target_modules=targets,
                             modules_to_save=list(lora.modules_to_save) or None, task_type="CAUSAL_LM")
    try:
        with _quiet_peft():
            adapted = peft.get_peft_model(model, config)
    except ValueError as exc:  # e.g. modules_to_save naming nothing
        raise RecipeError(f"model.lora: peft refused the adapters: {' '.join(str(exc).split())}") from exc
    for settings in adapted.peft_config.values():  # peft keeps a set, which adapter_config.json lists in hash order
        if isinstance(settings.target_modules, (set, frozenset, list, tuple)):
            settings.target_modules = sorted(settings.target_modules)
    return adapted


@contextmanager
def _quiet_peft() -> Iterator[None]:
    """peft reads transformers' deprecated ``is_gradient_checkpointing``; its FutureWarning says
    nothing a zenalign user can act on."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
        yield


def holds_adapter(directory: Path) -> bool:
    return (Path(directory) / ADAPTER_CONFIG).is_file()


def load_adapter(base: torch.nn.Module, directory: Path, trainable: bool = True) -> torch.nn.Module:
    """A saved adapter directory on ``base``: a peft model (adapters trainable unless told otherwise)."""
    peft = require_peft("--resume")
    try:
        with _quiet_peft():
            return peft.PeftModel.from_pretrained(base, str(directory), is_trainable=trainable)
    except Exception as exc:
        raise ModelLoadError(f"cannot load the LoRA adapter in '{directory}': {type(exc).__name__}: "
                             f"{' '.join(str(exc).split())}") from exc


def load_adapter_weights(model: torch.nn.Module, directory: Path) -> None:
    """Put a saved adapter's weights into an existing peft model with the same adapter layout."""
    peft = require_peft("--resume")
    from safetensors.torch import load_file

    weights = load_file(str(Path(directory) / "adapter_model.safetensors"))
    try:
        result = peft.set_peft_model_state_dict(model, weights)
    except RuntimeError as exc:  # shapes differ: another rank r
        raise ModelLoadError(f"the LoRA adapter in '{directory}' does not fit the model given: "
                             f"{' '.join(str(exc).split())[:300]}") from exc
    missing = [k for k in result.missing_keys if "lora_" in k]
    if result.unexpected_keys or missing:
        names = (list(result.unexpected_keys) + missing)[:3]
        raise ModelLoadError(f"the LoRA adapter in '{directory}' does not fit the model given (other target modules): "
                             f"{', '.join(names)}")


def adapter_base_path(directory: Path) -> str | None:
    """The base model an adapter directory was saved from, as peft recorded it."""
    config = json.loads((Path(directory) / ADAPTER_CONFIG).read_text(encoding="utf-8"))
    return config.get("base_model_name_or_path")


TOKENIZER_FILES = {"special_tokens_map.json", "added_tokens.json", "vocab.json", "merges.txt", "chat_template.jinja"}


def merge_adapter(policy: Path, out: Path, base: Path | None, where: str = "export --merge",
                  base_option: str = "--base DIR") -> Path:
    """The adapter in ``policy`` merged into its base model (``base``, or the directory the
    adapter records), saved to ``out`` as a plain model with the tokenizer saved beside the
    adapter. ``where`` and ``base_option`` name the command and its option in errors."""
    recorded = adapter_base_path(policy)
    base = base or (Path(recorded) if recorded else None)
    if base is None or not base.is_dir():
        raise ModelLoadError(f"{where}: the adapter's base model '{recorded}' is not a local directory; "
                             f"give it with {base_option}")
    model = load_adapter(load_causal_lm(base, base_option.split()[0]), policy, trainable=False).merge_and_unload()
    model.save_pretrained(out, safe_serialization=True)
    for item in policy.iterdir():  # the tokenizer the run used, as it was saved
        if item.is_file() and (item.name.startswith("tokenizer") or item.name in TOKENIZER_FILES):
            shutil.copy(item, out / item.name)
    return out


def merged_weights(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """A peft model's weights as its base model names them, each LoRA layer's weight merged
    (W + its active adapters' ``get_delta_weight``), as ``merge_and_unload`` would leave them, the
    model itself untouched; a ``modules_to_save`` module's trained copy under the original name. Other
    tensors are the model's own (a tied LM head stays the embedding's tensor)."""
    from peft.tuners.lora import LoraLayer

    base = model.get_base_model()
    merged = {}
    for name, module in base.named_modules():
        if isinstance(module, LoraLayer) and not module.merged:
            weight = module.get_base_layer().weight.detach()
            deltas = [module.get_delta_weight(a) for a in module.active_adapters if a in module.lora_A]
            merged[f"{name}.weight"] = weight + sum(deltas) if deltas else weight
    weights = {}
    for key, tensor in base.state_dict().items():
        if ".lora_" in key or ".original_module." in key:
            continue
        key = re.sub(r"\.modules_to_save\.[^.]+\.", ".", key.replace(".base_layer.", "."))
        weights[key] = merged.get(key, tensor)
    return weights

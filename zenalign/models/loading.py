"""Loading policies, reference models and tokenizers from local Hugging Face directories.

Only safetensors weights are read (no pickle), ``trust_remote_code`` is off unless the recipe
turns it on, and nothing is downloaded: every path must be a local directory.
"""

from __future__ import annotations

import json
import logging
import re
import warnings
from pathlib import Path
from typing import Any, Optional

import torch

from zenalign.errors import ModelLoadError, one_line

log = logging.getLogger("zenalign")


def is_directory(path: Path, field: str) -> bool:
    """``path.is_dir()``, with a path the file system cannot even look up (a name too long, a NUL
    byte) a one-line error instead of an OSError."""
    try:
        return path.is_dir()
    except (OSError, ValueError) as exc:
        shown = str(path) if len(str(path)) <= 80 else f"{str(path)[:60]}... ({len(str(path)):,} characters)"
        raise ModelLoadError(f"{field}: '{shown}' is not a usable path ({type(exc).__name__}: {exc.args[-1]}); "
                             f"give a local Hugging Face model directory") from None


def check_model_dir(path: Path, field: str) -> Path:
    """A directory with config.json and safetensors weights, or a one-line error saying what is wrong."""
    if not is_directory(path, field) and not path.exists():
        raise ModelLoadError(f"{field}: '{path}' does not exist; give a local Hugging Face model directory")
    if not path.is_dir():
        raise ModelLoadError(f"{field}: '{path}' is a file; give the directory that holds config.json")
    if not (path / "config.json").is_file():
        raise ModelLoadError(f"{field}: '{path}' is not a Hugging Face model directory (no config.json)")
    if not any(path.glob("*.safetensors")):
        pickles = [p.name for p in path.glob("*.bin")] + [p.name for p in path.glob("*.pt")]
        hint = (
            f"; it has {', '.join(pickles)}, which zenalign does not unpickle. Convert it once with "
            f"AutoModelForCausalLM.from_pretrained(...).save_pretrained(dir) in a trusted environment"
            if pickles
            else ""
        )
        raise ModelLoadError(f"{field}: '{path}' has no *.safetensors weights{hint}")
    return path


def load_causal_lm(path: Path, field: str, trust_remote_code: bool = False) -> torch.nn.Module:
    """``AutoModelForCausalLM.from_pretrained`` from a checked local directory, fp32 weights."""
    from transformers import AutoModelForCausalLM

    check_model_dir(path, field)
    try:
        model = AutoModelForCausalLM.from_pretrained(
            str(path),
            trust_remote_code=trust_remote_code,
            use_safetensors=True,
            local_files_only=True,
            dtype=torch.float32,
        )
    except Exception as exc:
        raise ModelLoadError(f"{field}: cannot load '{path}' as a causal LM: {type(exc).__name__}: {one_line(exc)}") from exc
    return model


def load_tokenizer(path: Path, field: str, trust_remote_code: bool = False) -> Any:
    """Load a tokenizer set up for batched generation: left padding and a pad token."""
    from transformers import AutoTokenizer

    if not is_directory(path, field):
        raise ModelLoadError(f"{field}: '{path}' does not exist; give a local Hugging Face model directory (with its tokenizer files)")
    if not any((path / name).is_file() for name in TOKENIZER_FILES):
        raise ModelLoadError(f"{field}: '{path}' holds no tokenizer files ({', '.join(TOKENIZER_FILES[:3])}, ...); "
                             f"save them there with tokenizer.save_pretrained(DIR), or give model.tokenizer_path")
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(path), trust_remote_code=trust_remote_code, local_files_only=True)
        tokenizer = _declared_class(tokenizer, path)
    except ModelLoadError:
        raise
    except Exception as exc:
        raise ModelLoadError(f"{field}: cannot load a tokenizer from '{path}': {type(exc).__name__}: {one_line(exc)}") from exc
    if len(tokenizer) == 0:
        raise ModelLoadError(f"{field}: the tokenizer in '{path}' has an empty vocabulary; its files are incomplete")
    return prepare_tokenizer(tokenizer)


TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json", "vocab.txt",
                   "spiece.model", "sentencepiece.bpe.model")


def model_config(path: Optional[Path]) -> dict[str, Any]:
    """A model directory's config.json as a dict ({} when there is none)."""
    try:
        return json.loads((Path(path) / "config.json").read_text(encoding="utf-8")) if path else {}
    except (OSError, ValueError):
        return {}


def check_tokenizer_fits(tokenizer: Any, model_dir: Optional[Path], field: str) -> None:
    """A tokenizer whose ids reach past the model's embedding table would index out of it. (A
    smaller vocabulary is normal: embedding tables are often padded, Qwen2's to 151,936.)"""
    config = model_config(model_dir)
    config = config.get("text_config", config)
    size = config.get("vocab_size")
    if isinstance(size, int) and len(tokenizer) > size:
        raise ModelLoadError(f"{field}: the tokenizer has {len(tokenizer):,} tokens but the model in '{model_dir}' embeds "
                             f"only {size:,} (vocab_size in config.json); give the tokenizer the model was trained with")


def _declared_class(tokenizer: Any, path: Path) -> Any:
    """Respect the tokenizer class named in tokenizer_config.json.

    transformers 5 may pick the model type's default tokenizer (e.g. Qwen2Tokenizer for a qwen2
    config) even when the directory declares another built-in class such as ByT5Tokenizer; the
    result silently encodes text to nothing. Load the declared class in that case.
    """
    import transformers

    config_file = path / "tokenizer_config.json"
    if not config_file.is_file():
        return tokenizer
    declared = json.loads(config_file.read_text(encoding="utf-8")).get("tokenizer_class")
    if not declared or type(tokenizer).__name__.removesuffix("Fast") == declared.removesuffix("Fast"):
        return tokenizer
    cls = getattr(transformers, declared, None)
    if cls is None:
        return tokenizer
    log.debug("tokenizer_config.json declares %s; AutoTokenizer gave %s; using the declared class", declared, type(tokenizer).__name__)
    return cls.from_pretrained(str(path), local_files_only=True)


def prepare_tokenizer(tokenizer: Any) -> Any:
    """Left padding (so generation continues from the real end of every prompt) and a pad token."""
    tokenizer.padding_side = "left"
    if tokenizer.pad_token_id is None:
        if tokenizer.eos_token_id is None:
            raise ModelLoadError("the tokenizer has neither a pad token nor an EOS token; completions could not end")
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def eos_token_ids(model: Any, tokenizer: Any) -> list[int]:
    """Every token id that ends a completion: the tokenizer's EOS plus the model's generation config."""
    ids: list[int] = []
    for source in (tokenizer.eos_token_id, getattr(getattr(model, "generation_config", None), "eos_token_id", None)):
        if source is None:
            continue
        for i in source if isinstance(source, (list, tuple)) else [source]:
            if int(i) not in ids:
                ids.append(int(i))
    if not ids:
        raise ModelLoadError("neither the tokenizer nor the model's generation config defines an EOS token")
    return ids


def pick_device(choice: str) -> torch.device:
    if choice == "cuda" and not torch.cuda.is_available():
        raise ModelLoadError("engine.device: 'cuda' was requested but no CUDA device is available; use auto or cpu")
    if choice == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(choice)


def frozen_copy(model: torch.nn.Module) -> torch.nn.Module:
    """A frozen, eval-mode copy of a model (the reference policy when none is given by path)."""
    import copy

    ref = copy.deepcopy(model)
    ref.eval()
    ref.requires_grad_(False)
    return ref


def load_tensors_only(path: Path, device: Any) -> Any:
    """``torch.load(weights_only=True)``: tensors and plain containers, never pickled code. A file
    that holds anything else is a one-line error naming it."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return torch.load(path, map_location=device, weights_only=True)
    except Exception as exc:
        raise ModelLoadError(f"--resume: '{path}' could not be read as plain tensors ({unpickling_reason(exc)}); "
                             f"zenalign never unpickles code, so this file was not written by zenalign or is "
                             f"damaged") from None


def unpickling_reason(exc: BaseException) -> str:
    """What torch's weights-only unpickler refused, without its advice to load the file with
    ``weights_only=False`` (which would run the code) or its terminal colour codes."""
    text = re.sub(r"\x1b\[[0-9;]*m", "", one_line(exc))
    found = re.search(r"Unsupported (global|operand)[^.]*", text)
    return f"{type(exc).__name__}: {found.group(0) if found else text[:160]}"

"""The memory a step's batches need, estimated from the model's config.json before anything is
loaded, against the memory the run's device has free: ``sampling.group_size: 1000000000`` is a
one-line error at validate (and at run start, before the policy loads), not an out-of-memory
traceback at step 1.

The estimate counts, per process, the largest of:

- sampling (zenalign's decoder or transformers' generate): the KV cache of every row at full
  length, ``rows x (longest prompt + max_new_tokens) x layers x 2 x kv_heads x head_dim`` values in
  the compute precision (4 bytes fp32, 2 bf16), plus one step's float32 logits, ``rows x vocab x 4``.
  Training rows are ``grpo.prompts_per_step / processes x sampling.group_size``; evaluation rows are
  ``run.eval_batch_size`` prompts (or fewer held-out ones) times ``run.eval_group_size``. With
  ``sampling.decoder: vllm`` the sampling side is vLLM's own budget (``sampling.vllm``) and is left out;
- the update: each layer's input, ``rows x length x hidden x layers`` values, which the backward
  pass keeps even under gradient checkpointing (rows: ``engine.micro_batch_size``, or the whole batch).

It leaves out the weights, gradients and optimizer states (they depend on the engine's sharding),
the activations inside a layer, the sampler's working copies and the allocator's slack: it is a
floor. So a batch whose floor exceeds the memory available is refused; one whose floor takes more
than half of it is warned about.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from typing import Any, Optional

from zenalign.errors import RecipeError
from zenalign.recipe.schema import Recipe

log = logging.getLogger("zenalign")

WARN_SHARE = 0.5  # warn when the floor takes more than this share of the available memory


@dataclass(frozen=True)
class ModelShape:
    """What the estimate needs from config.json."""

    layers: int
    hidden: int
    kv_heads: int
    head_dim: int
    vocab: int

    @classmethod
    def of(cls, config: dict[str, Any]) -> Optional["ModelShape"]:
        """The shape, or None when config.json lacks a field (the estimate is then skipped)."""
        text = config.get("text_config", config)
        layers = text.get("num_hidden_layers", text.get("n_layer"))
        hidden = text.get("hidden_size", text.get("n_embd"))
        heads = text.get("num_attention_heads", text.get("n_head"))
        vocab = text.get("vocab_size")
        if not all(isinstance(v, int) and v > 0 for v in (layers, hidden, heads, vocab)):
            return None
        kv_heads = text.get("num_key_value_heads") or heads
        head_dim = text.get("head_dim") or hidden // heads
        return cls(layers, hidden, kv_heads, head_dim, vocab)


@dataclass(frozen=True)
class Batch:
    """One batch the estimate counts: its rows, their length in tokens, and the fields that set them."""

    what: str
    rows: int
    length: int
    fields: str


def sampling_bytes(shape: ModelShape, batch: Batch, precision_bytes: int, with_cache: bool = True) -> int:
    """KV cache at full length plus one step's float32 logits."""
    cache = batch.rows * batch.length * shape.layers * 2 * shape.kv_heads * shape.head_dim * precision_bytes
    return (cache if with_cache else 0) + batch.rows * shape.vocab * 4


def update_bytes(shape: ModelShape, batch: Batch, precision_bytes: int) -> int:
    """Each layer's input, kept for the backward pass."""
    return batch.rows * batch.length * shape.hidden * shape.layers * precision_bytes


def available_bytes(device_type: str) -> tuple[int, str]:
    """Free memory on the run's device, per process: (bytes, where)."""
    if device_type == "cuda":
        import torch

        index = torch.cuda.current_device()
        free, _ = torch.cuda.mem_get_info(index)
        return free, f"free on cuda:{index}"
    total = _mem_available()
    processes = int(os.environ.get("LOCAL_WORLD_SIZE", "1") or 1)  # processes of one machine share its memory
    shared = f", shared by {processes} processes" if processes > 1 else ""
    return total // max(processes, 1), f"of this machine's memory available{shared}"


def _mem_available() -> int:
    """MemAvailable from /proc/meminfo (Linux); elsewhere the free physical pages."""
    try:
        with open("/proc/meminfo", encoding="ascii") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


def size_text(count: float) -> str:
    """Bytes in binary units: 1536 -> '1.5 KiB'; beyond 1,024 PiB, bytes in powers of ten."""
    if count >= 1024**6:
        return f"{count:.1e} bytes"
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if count < 1024:
            return f"{count:.0f} {unit}" if unit == "B" else f"{count:.1f} {unit}"
        count /= 1024
    return f"{count:.1f} PiB"


def batches(recipe: Recipe, longest_prompt: int, eval_prompts: int, world_size: int) -> list[tuple[Batch, str]]:
    """The batches a step and an evaluation hold at once, per process: (batch, 'sampling' or 'update')."""
    s, run = recipe.sampling, recipe.run
    length = longest_prompt + s.max_new_tokens
    train_rows = -(-recipe.grpo.prompts_per_step // world_size) * s.group_size
    found = [(Batch("the sampling batch", train_rows, length,
                    "sampling.group_size, grpo.prompts_per_step or sampling.max_new_tokens"), "sampling")]
    if eval_prompts:
        prompts = min(run.eval_batch_size, -(-eval_prompts // world_size))
        found.append((Batch("an evaluation batch", prompts * max(run.eval_group_size, 1), length,
                            "run.eval_batch_size or run.eval_group_size"), "sampling"))
    micro = min(recipe.engine.micro_batch_size or train_rows, train_rows)
    found.append((Batch("the update's micro-batch", micro, length,
                        "engine.micro_batch_size, or the sampling batch's fields"), "update"))
    return found


def check_memory(recipe: Recipe, config: dict[str, Any], longest_prompt: int, eval_prompts: int, device_type: str,
                 source: str, world_size: Optional[int] = None) -> Optional[int]:
    """Refuse (RecipeError) a batch whose memory floor exceeds the available memory, warn when it
    takes more than half. Returns the largest floor in bytes (None when config.json lacks the shape)."""
    shape = ModelShape.of(config)
    if shape is None:
        return None
    world_size = world_size or int(os.environ.get("WORLD_SIZE", "1") or 1)
    precision_bytes = 2 if recipe.engine.precision == "bf16" else 4
    with_cache = recipe.sampling.decoder != "vllm"
    need = [(sampling_bytes(shape, b, precision_bytes, with_cache) if kind == "sampling"
             else update_bytes(shape, b, precision_bytes), b) for b, kind in batches(recipe, longest_prompt, eval_prompts, world_size)]
    largest, batch = max(need, key=lambda item: item[0])
    free, what = available_bytes(device_type)
    text = (f"{batch.what} holds {batch.rows:,} rows of up to {batch.length:,} tokens per process: at least "
            f"{size_text(largest)} (docs/scaling.md, \"Memory\"), with {size_text(free)} {what}")
    if largest > free:
        raise RecipeError(f"{source}: {text}; lower {batch.fields}")
    if largest > WARN_SHARE * free:
        log.warning("%s: %s; more than half of it, before weights and optimizer states (lower %s if the run runs out "
                    "of memory)", source, text, batch.fields)
    return largest

"""Build the benchmark models: tiny Qwen2ForCausalLM over the ByT5 byte vocabulary, and a
SmolLM-135M-shaped Llama over a 49,152-entry word-level fast tokenizer.

Both zenalign and TRL load the same saved directory, so the two halves of the benchmark train the
very same weights. Sizes (parameters, tied embeddings):

    1m   Qwen2, hidden 128, 4 layers, intermediate  512, 4 heads, 2 kv heads  -> 1,034,368
    10m  Qwen2, hidden 256, 10 layers, intermediate 1024, 4 heads, 2 kv heads -> 9,939,200
    135m Llama, hidden 576, 30 layers, intermediate 1536, 9 heads, 3 kv heads, vocabulary 49,152
         (SmolLM-135M's shape)                                               -> 134,515,008

Usage:  python bench/make_bench_models.py OUT_ROOT [1m 10m]   (writes OUT_ROOT/qwen2-1m, ...)
"""

from __future__ import annotations

import argparse
from itertools import count, product
from pathlib import Path
from string import ascii_lowercase

import torch

# name -> keyword arguments of build_qwen2
SIZES: dict[str, dict[str, int]] = {
    "1m": dict(hidden=128, layers=4, intermediate=512, heads=4, kv_heads=2),
    "10m": dict(hidden=256, layers=10, intermediate=1024, heads=4, kv_heads=2),
}


def count_parameters(model: torch.nn.Module) -> int:
    """Unique parameters (the tied embedding / LM head counted once)."""
    return sum(p.numel() for p in model.parameters())


def build_qwen2(
    out_dir: str | Path,
    hidden: int,
    layers: int,
    intermediate: int | None = None,
    heads: int = 4,
    kv_heads: int = 2,
    *,
    seed: int = 0,
    max_position_embeddings: int = 512,
) -> int:
    """Build a randomly initialised Qwen2ForCausalLM on the 384-id ByT5 vocabulary, save it
    (safetensors) with a ByT5Tokenizer into ``out_dir``, and return its parameter count."""
    from transformers import ByT5Tokenizer, Qwen2Config, Qwen2ForCausalLM

    if hidden % heads or heads % kv_heads:
        raise ValueError(f"hidden ({hidden}) must divide by heads ({heads}), heads by kv_heads ({kv_heads})")
    torch.manual_seed(seed)
    config = Qwen2Config(
        vocab_size=384,
        hidden_size=hidden,
        intermediate_size=intermediate or 4 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        max_position_embeddings=max_position_embeddings,
        tie_word_embeddings=True,
        pad_token_id=0,
        eos_token_id=1,
        bos_token_id=None,
        use_sliding_window=False,
    )
    model = Qwen2ForCausalLM(config)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out, safe_serialization=True)
    tokenizer = ByT5Tokenizer()
    tokenizer.padding_side = "left"  # ByT5 already has <pad> (id 0) and </s> (id 1)
    tokenizer.save_pretrained(out)
    return count_parameters(model)


SMOL_135M = dict(hidden_size=576, num_hidden_layers=30, num_attention_heads=9, num_key_value_heads=3,
                 intermediate_size=1536, tie_word_embeddings=True, max_position_embeddings=2048)


def word_vocabulary(size: int, words=()) -> dict[str, int]:
    """``<pad>`` 0, ``</s>`` 1, ``<unk>`` 2, then "reverse", ":", the given words, then every
    lowercase string by length (a, b, ..., aa, ab, ...) until there are ``size`` entries."""
    vocab = {"<pad>": 0, "</s>": 1, "<unk>": 2}
    for word in ("reverse", ":", *words):
        vocab.setdefault(word, len(vocab))
    for n in count(1):
        for letters in product(ascii_lowercase, repeat=n):
            if len(vocab) >= size:
                return vocab
            vocab.setdefault("".join(letters), len(vocab))
    raise AssertionError("unreachable")


def build_llama_135m(out_dir: str | Path, *, seed: int = 0, vocab_size: int = 49_152, words=()) -> int:
    """A randomly initialised SmolLM-135M-shaped LlamaForCausalLM over a ``vocab_size``-entry
    word-level fast tokenizer (whitespace/punctuation pre-tokenizer, built in-process from
    :func:`word_vocabulary`, so nothing is downloaded), saved into ``out_dir``; returns its
    parameter count. ``words`` go into the vocabulary first (the benchmark's prompt words)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=vocab_size, pad_token_id=0, eos_token_id=1, bos_token_id=None, **SMOL_135M)
    model = LlamaForCausalLM(config)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out, safe_serialization=True)
    word_tokenizer(vocab_size, words).save_pretrained(out)
    return count_parameters(model)


def word_tokenizer(vocab_size: int, words=()):
    """A left-padding word-level fast tokenizer over :func:`word_vocabulary` (whitespace and
    punctuation pre-tokenizer; ``<pad>`` 0, ``</s>`` 1, ``<unk>`` 2), built in-process."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer(models.WordLevel(word_vocabulary(vocab_size, words), unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="<pad>", eos_token="</s>", unk_token="<unk>")
    tokenizer.padding_side = "left"
    return tokenizer


def build_size(name: str, out_dir: str | Path, seed: int = 0, words=()) -> int:
    if name == "135m":
        return build_llama_135m(out_dir, seed=seed, words=words)
    return build_qwen2(out_dir, **SIZES[name], seed=seed)


def model_dir_name(size: str) -> str:
    return "llama-135m" if size == "135m" else f"qwen2-{size}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out_root")
    parser.add_argument("sizes", nargs="*", help=f"any of {[*SIZES, '135m']}; default: the Qwen2 sizes")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    unknown = [s for s in args.sizes if s not in [*SIZES, "135m"]]
    if unknown:
        parser.error(f"unknown size(s) {unknown}; choose from {[*SIZES, '135m']}")
    for name in args.sizes or list(SIZES):
        path = Path(args.out_root) / model_dir_name(name)
        n = build_size(name, path, seed=args.seed)
        print(f"{name}: {n:,} parameters ({n / 1e6:.2f}M) -> {path}  {SIZES.get(name, SMOL_135M)}")


if __name__ == "__main__":
    main()

"""Shared fixtures: tiny real models built in-process, plugin registration, CLI subprocesses."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
RECIPES = REPO / "recipes"
REVERSE_POLICY = RECIPES / "models" / "reverse-policy"


def build_tiny_llama(seed: int = 0, hidden: int = 32, layers: int = 2, **overrides):
    """A real LlamaForCausalLM over the 384-id byte vocabulary, small enough for unit tests."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=384, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
        num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=128,
        tie_word_embeddings=True, pad_token_id=0, eos_token_id=1, bos_token_id=None, **overrides,
    )
    return LlamaForCausalLM(config)


def end_some_completions_early(rollout, eos: int = 1):
    """A random model rarely samples EOS: end four of a 12-row rollout's completions early by
    hand (EOS, then padding), so batches hold ragged completions next to truncated ones."""
    tp = rollout.prompt_length
    for row, length in ((1, 3), (4, 1), (6, 6), (11, 2)):
        rollout.sequences[row, tp + length - 1] = eos
        rollout.sequences[row, tp + length:] = 0
        rollout.completion_mask[row, length:] = 0
        rollout.attention_mask[row, tp + length:] = 0
        rollout.truncated[row] = False
    return rollout


def byte_tokenizer():
    from transformers import ByT5Tokenizer

    from zenalign.models.loading import prepare_tokenizer

    return prepare_tokenizer(ByT5Tokenizer())


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    """A saved tiny Llama + ByT5 tokenizer directory (safetensors), loadable with from_pretrained."""
    path = tmp_path_factory.mktemp("tiny-llama")
    build_tiny_llama().save_pretrained(path, safe_serialization=True)
    byte_tokenizer().save_pretrained(path)
    return path


@pytest.fixture
def register_plugin():
    """Register throwaway plugins on the global manager; they are unregistered afterwards."""
    from zenalign.plugins import get_plugin_manager

    pm = get_plugin_manager()
    added = []

    def register(plugin, name=None):
        pm.register(plugin, name=name)
        added.append(plugin)
        return plugin

    try:
        yield register
    finally:
        for plugin in added:
            pm.unregister(plugin)


def run_cli(*args: str, cwd: Path | None = None, timeout: float = 600) -> subprocess.CompletedProcess:
    """Run the real `zenalign` command in a subprocess."""
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    return subprocess.run(
        [sys.executable, "-m", "zenalign", *args],
        cwd=cwd or REPO, env=env, capture_output=True, text=True, timeout=timeout,
    )

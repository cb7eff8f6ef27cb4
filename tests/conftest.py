"""Fixtures, which arrive by name (``tiny_model_dir``, ``scripted_agent_dir``, ``rollout``, ``register_plugin``,
``vllm_quickstart``), and the
hook that skips gpu tests without a CUDA device. The functions and constants tests share are in
tests/helpers.py."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from helpers import VLLM_QUICKSTART, build_tiny_llama, byte_tokenizer, ragged_rollout, train_scripted_agent


def pytest_collection_modifyitems(config, items):
    """Tests marked gpu are skipped, with one line, where torch sees no CUDA device."""
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU (bench/gpu_check.py runs pytest -m gpu on one)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="module")
def rollout(model):
    """:func:`ragged_rollout` of the requesting module's ``model`` fixture."""
    return ragged_rollout(model)


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    """A saved tiny Llama + ByT5 tokenizer directory (safetensors), loadable with from_pretrained."""
    path = tmp_path_factory.mktemp("tiny-llama")
    build_tiny_llama().save_pretrained(path, safe_serialization=True)
    byte_tokenizer().save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def scripted_agent_dir(tmp_path_factory) -> Path:
    """:func:`helpers.train_scripted_agent`: a tiny chat model that calls echo("a"), echo("b"), then
    answers "done" (about 7 s to train)."""
    return train_scripted_agent(tmp_path_factory.mktemp("scripted-agent"))


@pytest.fixture(scope="session")
def vllm_quickstart(tmp_path_factory) -> Path:
    """The run directory of 20 quickstart steps sampled by a colocated vLLM engine (one torch thread,
    no eval but the first and last), for the vLLM tests that learn from it or compare with it: with
    the quickstart's constant learning rate, a shorter run of the same recipe is its first steps."""
    from helpers import run_cli

    out = tmp_path_factory.mktemp("vllm-quickstart") / "run"
    done = run_cli("run", *VLLM_QUICKSTART, f"run.output_dir={out}", timeout=400)
    assert done.returncode == 0, done.stderr[-3000:]
    return out


@pytest.fixture
def register_plugin():
    """Register throwaway plugins on the global manager through ``zenalign.plugins.register``
    (which checks hook names and signatures); they are unregistered afterwards."""
    from zenalign.plugins import get_plugin_manager, register as register_on

    pm = get_plugin_manager()
    added = []

    def register(plugin, name=None):
        register_on(pm, plugin, name)
        added.append(plugin)
        return plugin

    try:
        yield register
    finally:
        for plugin in added:
            pm.unregister(plugin)


"""The Generator (zenalign.generation.generator) on its own: built from the recipe's typed sections
(sampling, engine, the seed), it samples what generate_groups samples with them, at its own
temperature or a given one, and refuses a vLLM decoder it cannot build."""

import pytest
import torch

from helpers import EOS, PROMPTS, RECIPES, build_tiny_llama, byte_tokenizer
from zenalign.errors import RecipeError
from zenalign.generation import rollout
from zenalign.generation.generator import Generator
from zenalign.generation.gumbel import completion_keys
from zenalign.generation.rollout import generate_groups
from zenalign.recipe.loader import load_recipe
from zenalign.train.distributed import Dist
from zenalign.train.engine import TorchEngine


def generator_for(overrides: list[str]):
    recipe = load_recipe(RECIPES / "quickstart.yaml", ["sampling.max_new_tokens=6", *overrides]).recipe
    engine = TorchEngine(recipe.engine, recipe.grpo, Dist(), torch.device("cpu"))
    engine.attach(build_tiny_llama(seed=5), optimizer_steps=1, micro_batches=1)
    generator = Generator(recipe.sampling, recipe.engine, recipe.run.seed, engine, byte_tokenizer(), [EOS], Dist(),
                          policy_dir=None, longest_prompt=40, fresh=True)
    return recipe, engine, generator


@pytest.mark.parametrize("lean_forward", [True, False])
def test_the_generator_samples_with_its_sections_and_the_engine_sections_lean_forward(lean_forward, monkeypatch):
    recipe, engine, generator = generator_for(["sampling.temperature=0.7", f"engine.lean_forward={lean_forward}"])
    asked = []
    checked = rollout.checked_lean_model
    monkeypatch.setattr(rollout, "checked_lean_model", lambda *a: asked.append(True) or checked(*a))
    keys = completion_keys(seed=1, step=2, first_completion=0, count=len(PROMPTS) * 4)
    got = generator(PROMPTS, keys, 4)
    assert bool(asked) == lean_forward  # engine.lean_forward reaches the decoder
    asked.clear()
    expected = generate_groups(engine.model, byte_tokenizer(), PROMPTS, recipe.sampling, [EOS], 4, keys=keys)
    assert got.sequences.shape[0] == 12 and torch.equal(got.sequences, expected.sequences)
    hotter = generator(PROMPTS, keys, 4, temperature=3.0)  # an evaluation's own temperature, for this call only
    assert generator.sampling.temperature == 0.7
    at_three = generate_groups(engine.model, byte_tokenizer(), PROMPTS, recipe.sampling.model_copy(
        update={"temperature": 3.0}), [EOS], 4, keys=keys)
    assert torch.equal(hotter.sequences, at_three.sequences) and not torch.equal(hotter.sequences, got.sequences)
    assert generator.step_metrics({"sampler_tokens": 5.0}) == {}  # no vLLM: no vLLM metrics
    generator.close()


def test_greedy_without_keys_is_one_argmax_completion_per_prompt():
    _, engine, generator = generator_for([])
    greedy = generator(PROMPTS[:1], None, 1)
    ids = byte_tokenizer()(PROMPTS[:1], add_special_tokens=False, return_tensors="pt")["input_ids"]
    with torch.no_grad():
        first = engine.model(input_ids=ids).logits[0, -1].argmax()
    assert greedy.sequences.shape[0] == 1 and int(greedy.sequences[0, ids.shape[1]]) == int(first)


def test_a_vllm_decoder_without_a_model_directory_is_refused():
    with pytest.raises(RecipeError, match="sampling.decoder: vllm builds its engine from model.path"):
        generator_for(["sampling.decoder=vllm"])

"""Input bounds at validate (issue 30.5): the memory floor of a step's batches, empty prompts, text
files that are not UTF-8. The CLI's one-line errors for these are in test_bad_input.py."""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import logging

import pytest

from helpers import RECIPES, REVERSE_POLICY
from zenalign.data import check_records, jsonl_objects, read_utf8
from zenalign.errors import DataError, RecipeError
from zenalign.recipe.loader import load_recipe
from zenalign.train import budget
from zenalign.train.budget import Batch, ModelShape, check_memory, sampling_bytes, update_bytes

QUICKSTART = RECIPES / "quickstart.yaml"


# ---------------------------------------------------------------------------------------------- memory

def reverse_policy_config() -> dict:
    return json.loads((REVERSE_POLICY / "config.json").read_text())


def test_the_model_shape_comes_from_config_json():
    # reverse-policy: 4 layers, hidden 128, 4 heads over 2 key/value heads of 32, 384 ids
    assert ModelShape.of(reverse_policy_config()) == ModelShape(layers=4, hidden=128, kv_heads=2, head_dim=32, vocab=384)
    assert ModelShape.of({"n_layer": 2, "n_embd": 64, "n_head": 4, "vocab_size": 100}) == ModelShape(2, 64, 4, 16, 100)
    assert ModelShape.of({"vocab_size": 100}) is None  # nothing to estimate from: no check


def test_the_floor_counts_the_kv_cache_the_logits_and_each_layers_input():
    shape = ModelShape.of(reverse_policy_config())
    batch = Batch("the sampling batch", rows=64, length=17, fields="")
    # KV cache: 64 rows x 17 tokens x 4 layers x (keys, values) x 2 heads x 32 values x 4 bytes = 2,228,224
    # logits: 64 rows x 384 ids x 4 bytes = 98,304
    assert sampling_bytes(shape, batch, precision_bytes=4) == 2_228_224 + 98_304
    assert sampling_bytes(shape, batch, precision_bytes=2) == 1_114_112 + 98_304  # bf16 cache, float32 logits
    assert sampling_bytes(shape, batch, precision_bytes=4, with_cache=False) == 98_304  # vLLM holds its own cache
    # each layer's input: 64 x 17 x 128 hidden x 4 layers x 4 bytes
    assert update_bytes(shape, batch, precision_bytes=4) == 2_228_224


def test_the_batches_are_per_process_and_include_evaluation():
    recipe = load_recipe(QUICKSTART, ["run.eval_batch_size=50", "run.eval_group_size=4",
                                      "engine.micro_batch_size=16"]).recipe
    found = {b.what: (b.rows, b.length, kind) for b, kind in budget.batches(recipe, longest_prompt=13,
                                                                             eval_prompts=200, world_size=2)}
    assert found == {"the sampling batch": (4 * 8, 13 + 8, "sampling"),  # 8 prompts over 2 processes, 8 each
                     "an evaluation batch": (50 * 4, 21, "sampling"),  # 50 of the 100 held-out prompts a process has
                     "the update's micro-batch": (16, 21, "update")}


def test_a_floor_above_half_the_memory_warns_and_above_all_of_it_refuses(monkeypatch, caplog):
    recipe = load_recipe(QUICKSTART).recipe
    # quickstart: 64 rows of 9 + 8 tokens: 2,228,224 + 98,304 = 2,326,528 bytes (2.2 MiB)
    monkeypatch.setattr(budget, "available_bytes", lambda device: (5_000_000, "available"))
    with caplog.at_level(logging.WARNING, logger="zenalign"):
        assert check_memory(recipe, reverse_policy_config(), 9, 0, "cpu", "q.yaml") == 2_326_528
    assert not caplog.records
    monkeypatch.setattr(budget, "available_bytes", lambda device: (4_000_000, "available"))
    with caplog.at_level(logging.WARNING, logger="zenalign"):
        check_memory(recipe, reverse_policy_config(), 9, 0, "cpu", "q.yaml")
    assert [r.getMessage() for r in caplog.records] == [
        'q.yaml: the sampling batch holds 64 rows of up to 17 tokens per process: at least 2.2 MiB (docs/scaling.md, '
        '"Memory"), with 3.8 MiB available; more than half of it, before weights and optimizer states (lower '
        'sampling.group_size, grpo.prompts_per_step or sampling.max_new_tokens if the run runs out of memory)']
    monkeypatch.setattr(budget, "available_bytes", lambda device: (2_000_000, "available"))
    with pytest.raises(RecipeError, match=r"^q\.yaml: the sampling batch holds 64 rows .* at least 2\.2 MiB .* with "
                                          r"1\.9 MiB available; lower sampling\.group_size"):
        check_memory(recipe, reverse_policy_config(), 9, 0, "cpu", "q.yaml")


def test_sizes_read_in_binary_units():
    assert [budget.size_text(n) for n in (512, 1536, 2_326_528, 1.126e13, 1024**5 * 3, 1.8e20)] == [
        "512 B", "1.5 KiB", "2.2 MiB", "10.2 TiB", "3.0 PiB", "1.8e+20 bytes"]


def validate_quickstart(*overrides: str) -> list[str]:
    """`zenalign validate recipes/quickstart.yaml` in this process: the warnings it logs."""
    from zenalign.commands.cli import cmd_validate

    records: list[str] = []
    handler = logging.Handler(logging.WARNING)
    handler.emit = lambda record: records.append(record.getMessage())
    logger = logging.getLogger("zenalign")
    logger.addHandler(handler)
    try:
        with contextlib.redirect_stdout(io.StringIO()):
            cmd_validate(argparse.Namespace(recipe=str(QUICKSTART), overrides=list(overrides)))
    finally:
        logger.removeHandler(handler)
    return records


def test_the_quickstart_validates_without_a_warning():
    assert validate_quickstart() == []


def test_a_huge_group_size_is_refused_at_validate_in_process():
    with pytest.raises(RecipeError, match="the sampling batch holds 8,000,000,000 rows of up to 23 tokens"):
        validate_quickstart("sampling.group_size=1000000000")


def test_the_python_api_refuses_a_batch_beyond_memory_before_loading_the_policy(tmp_path, monkeypatch):
    from zenalign import GRPOTrainer
    from zenalign.train import build

    def no_loading(*args, **kwargs):
        raise AssertionError("the policy was loaded")

    monkeypatch.setattr(build, "load_causal_lm", no_loading)
    trainer = GRPOTrainer(model=str(REVERSE_POLICY), reward_model=lambda completions, **kw: [1.0] * len(completions),
                          group_size=10**9, output_dir=str(tmp_path / "run"))
    with pytest.raises(RecipeError, match="the sampling batch holds 8,000,000,000 rows"):
        trainer.train(prompts=["reverse abc:", "reverse dog:"])


# ---------------------------------------------------------------------------------------------- empty prompts

def test_blank_prompts_are_counted_and_left_out(caplog):
    records = ["reverse abc:", "", {"prompt": " \n\t"}, {"messages": [{"role": "user", "content": "  "}]},
               {"messages": [{"role": "user", "content": "hi"}]}]
    with caplog.at_level(logging.WARNING, logger="zenalign"):
        kept = check_records(records, "data (inline)")
    assert kept == [{"prompt": "reverse abc:"}, {"messages": [{"role": "user", "content": "hi"}]}]
    assert [r.getMessage() for r in caplog.records] == [
        "data (inline): 3 of 5 prompts are empty or whitespace only; they are left out (the policy would have "
        "nothing to continue from)"]


def test_a_prompt_set_of_blank_prompts_is_one_line():
    with pytest.raises(DataError, match=r"^data \(jsonl, p\.jsonl\): all 2 prompts are empty or whitespace only; "
                                        r"give prompts with text$"):
        check_records(["", {"prompt": "   "}], "data (jsonl, p.jsonl)")
    assert check_records([], "eval_prompts") == []  # no prompts at all is not this error


def test_empty_prompts_given_to_the_python_api_never_reach_the_model(tmp_path, caplog):
    """The API path goes through the same check: with an empty prompt in the batch the lean
    forward's first-prompt check disagreed with transformers ("differ by 1.42e+01")."""
    from zenalign import GRPOTrainer

    trainer = GRPOTrainer(model=str(REVERSE_POLICY), reward_model=lambda completions, **kw: [1.0] * len(completions),
                          group_size=2, prompts_per_step=2, max_new_tokens=4, steps=1, progress_bar=False,
                          output_dir=str(tmp_path / "run"))
    with caplog.at_level(logging.WARNING, logger="zenalign"):
        trainer.train(prompts=["", "reverse abc:"])
    messages = [r.getMessage() for r in caplog.records]
    assert "prompts: 1 of 2 prompts are empty or whitespace only; they are left out" in messages[0]
    assert not any("disagrees" in m for m in messages), messages
    assert trainer.sampler.records == [{"prompt": "reverse abc:"}]


# ---------------------------------------------------------------------------------------------- text files

def test_a_jsonl_line_that_is_not_utf8_names_the_file_and_line(tmp_path):
    path = tmp_path / "p.jsonl"
    path.write_bytes(b'{"prompt": "a"}\n\n{"prompt": "\xff"}\n')
    with pytest.raises(DataError, match=rf"^{path}:3: not valid UTF-8 \(byte 0xff at byte 13 of the line\); save the "
                                        r"file as UTF-8$"):
        list(jsonl_objects(path, "missing"))


def test_a_byte_order_mark_is_accepted(tmp_path):
    path = tmp_path / "p.jsonl"
    path.write_bytes(b'\xef\xbb\xbf{"prompt": "a"}\n{"prompt": "b"}\n')
    assert list(jsonl_objects(path, "missing")) == [(1, {"prompt": "a"}), (2, {"prompt": "b"})]
    text = tmp_path / "t.txt"
    text.write_bytes(b"\xef\xbb\xbfone\ntwo\n")
    assert read_utf8(text) == "one\ntwo\n"


def test_a_principles_file_that_is_not_utf8_names_the_file_and_line(tmp_path):
    from zenalign.recipe.principles import load_principles

    (tmp_path / "principles.txt").write_bytes(b"Be kind.\nBe caf\xe9.\n")
    with pytest.raises(RecipeError, match=r"principles\.txt:2: not valid UTF-8 \(byte 0xe9 at byte 7 of the line\)"):
        load_principles([], "principles.txt", tmp_path)

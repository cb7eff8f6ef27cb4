"""Input bounds at validate (issue 30.5): empty prompts, text files that are not UTF-8. The CLI's
one-line errors for these are in test_bad_input.py."""

from __future__ import annotations

import logging

import pytest

from conftest import REVERSE_POLICY
from zenalign.data import check_records, jsonl_objects, read_utf8
from zenalign.errors import DataError, RecipeError


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

"""Input bounds at validate (issue 30.5): text files that are not UTF-8. The CLI's one-line
errors for these are in test_bad_input.py."""

from __future__ import annotations

import pytest

from zenalign.data import jsonl_objects, read_utf8
from zenalign.errors import DataError, RecipeError


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

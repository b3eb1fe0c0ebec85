"""`hf_d3.atomic`: what a writer stages appears under its final name whole, or not at all."""

import json

import pytest

from hf_d3.atomic import staged, write_json


def test_a_file_appears_only_when_complete(tmp_path):
    final = tmp_path / "sub" / "done.json"
    with staged(final) as staging:
        staging.write_text("{}")
        assert not final.exists()  # nothing under the final name while writing
    assert final.read_text() == "{}" and list(final.parent.iterdir()) == [final]


def test_a_failing_writer_leaves_the_previous_version(tmp_path):
    final = tmp_path / "done.json"
    write_json(final, {"version": 1})
    with pytest.raises(OSError, match="disk full"), staged(final) as staging:
        staging.write_text("half")
        raise OSError("disk full")
    assert json.loads(final.read_text()) == {"version": 1} and list(tmp_path.iterdir()) == [final]


def test_a_folder_is_replaced_whole(tmp_path):
    final = tmp_path / "pipeline"
    for version in ("old", "new"):
        with staged(final) as staging:
            staging.mkdir()
            (staging / version).write_text(version)
    assert [p.name for p in final.iterdir()] == ["new"] and list(tmp_path.iterdir()) == [final]


def test_keep_existing_drops_the_staged_copy(tmp_path):
    final = tmp_path / "cache"
    for version in ("first", "second"):
        with staged(final, replace=False) as staging:
            staging.mkdir()
            (staging / version).write_text(version)
    assert [p.name for p in final.iterdir()] == ["first"] and list(tmp_path.iterdir()) == [final]

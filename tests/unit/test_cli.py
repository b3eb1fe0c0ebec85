"""The recipes' errors (hf_d3.cli): a mistake in the input is one line on stderr and status 1; --debug or
HF_D3_DEBUG=1 gives the traceback; a bug keeps its traceback."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from hf_d3.cli import run_recipe

RECIPES = Path(__file__).resolve().parents[2] / "recipes"


def refuse():
    raise ValueError("num_subtasks=0 is not valid;\nvalid: >= 1")


def test_a_user_error_is_one_line(monkeypatch):
    monkeypatch.setattr(sys, "argv", ["recipe"])
    monkeypatch.delenv("HF_D3_DEBUG", raising=False)
    with pytest.raises(SystemExit) as exit:  # a message as the code: Python prints it on stderr, status 1
        run_recipe(refuse)
    assert exit.value.code == "error: num_subtasks=0 is not valid; valid: >= 1 (--debug shows the traceback)"


def test_debug_raises_and_is_taken_out_of_the_arguments(monkeypatch):
    monkeypatch.setattr(sys, "argv", ["recipe", "--debug", "--iterations", "5"])
    seen = []
    with pytest.raises(ValueError, match="num_subtasks=0"):
        run_recipe(lambda: seen.append(list(sys.argv)) or refuse())
    assert seen == [["recipe", "--iterations", "5"]]
    monkeypatch.setattr(sys, "argv", ["recipe"])
    monkeypatch.setenv("HF_D3_DEBUG", "1")
    with pytest.raises(ValueError):
        run_recipe(refuse)


def test_a_bug_keeps_its_traceback(monkeypatch):
    monkeypatch.setattr(sys, "argv", ["recipe"])
    with pytest.raises(KeyError):
        run_recipe(lambda: {}["missing"])


def test_the_distill_recipe_refuses_a_bad_setting_in_one_line():
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    done = subprocess.run([sys.executable, str(RECIPES / "distill.py"), "--num_subtasks", "0"], capture_output=True,
                          text=True, env=env, timeout=120)
    assert done.returncode == 1
    assert done.stderr.strip().splitlines() == [
        "error: num_subtasks=0 is not valid; valid: >= 1 (--debug shows the traceback)"], done.stderr

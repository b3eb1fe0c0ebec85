"""The marked code snippets of README.md and docs/*.md, which the tests run as written.

A snippet is a fenced block right after `<!-- snippet: NAME -->`; names are unique across the files, so a snippet
may move between the README and docs/ without its test changing.
"""

from __future__ import annotations

import re
import shlex
from pathlib import Path

ROOT = Path(__file__).parents[1]
README = ROOT / "README.md"
DOCUMENTS = [README, *sorted((ROOT / "docs").glob("*.md"))]
MARKED = re.compile(r"<!-- snippet: (\w+) -->\n```(\w+)\n(.*?)```", flags=re.DOTALL)


def snippets() -> dict[str, tuple[str, str]]:
    """{name: (language, code)} of the marked snippets of the README and docs/*.md."""
    found = [snippet for document in DOCUMENTS for snippet in MARKED.findall(document.read_text())]
    names = [name for name, _, _ in found]
    twice = sorted({name for name in names if names.count(name) > 1})
    assert not twice, f"snippet names used twice across README.md and docs/: {twice}"
    return {name: (language, code) for name, language, code in found}


def shell_commands(name: str) -> list[list[str]]:
    """The commands of a bash snippet as argument lists: continuation lines joined, comments left out."""
    language, code = snippets()[name]
    assert language == "bash", f"snippet {name!r} is {language}, not bash"
    commands = (shlex.split(line, comments=True) for line in code.replace("\\\n", " ").splitlines())
    return [command for command in commands if command]

"""What the recipes share: a mistake in their input is told in one line, the traceback only when asked for."""

from __future__ import annotations

import os
import sys
from collections.abc import Callable
from typing import Any

DEBUG_FLAG = "--debug"
DEBUG_ENV = "HF_D3_DEBUG"
# What hf_d3 raises for input a user can mend (a setting, a path, a dataset, a Hub repo, a diverged run): its
# message says what was wrong and what would be valid. Anything else is a bug and keeps its traceback.
USER_ERRORS = (ValueError, FileNotFoundError, FloatingPointError)


def run_recipe(main: Callable[[], Any]) -> Any:
    """Run a recipe's `main`. A user error (`USER_ERRORS`) is printed as one line on stderr and exits with status 1;
    with `--debug` on the command line (taken out before `main` parses it) or `HF_D3_DEBUG=1`, it raises as is."""
    debug = DEBUG_FLAG in sys.argv or os.environ.get(DEBUG_ENV, "") not in ("", "0")
    sys.argv = [arg for arg in sys.argv if arg != DEBUG_FLAG]
    try:
        return main()
    except USER_ERRORS as error:
        if debug:
            raise
        message = " ".join(str(error).split())  # one line, whatever the message's own line breaks
        sys.exit(f"error: {message} ({DEBUG_FLAG} shows the traceback)")  # on stderr, status 1

"""Shared test setup.

Section 1 must stay at the very top: huggingface_hub, datasets and diffusers read their Hub settings when they are
imported, so the environment has to point them at the local test Hub before anything imports them.
"""

# ======================================================================================================
# 1. Hub environment (before any import of huggingface_hub / datasets / diffusers / hf_d3)
# ======================================================================================================
import atexit
import os
import shutil
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))  # tests/ helpers (hub_server) importable from test modules

from hub_server import free_port  # noqa: E402  (stdlib-only module)

HUB_HOST = "127.0.0.1"
HUB_PORT = free_port(HUB_HOST)
HUB_TOKEN = "hf_local_test_token_d3"  # only valid on the local test Hub
HUB_USER = "d3-tester"
_HF_HOME = tempfile.mkdtemp(prefix="hf_d3-tests-hf-home-")
atexit.register(shutil.rmtree, _HF_HOME, ignore_errors=True)

os.environ.update(
    {
        "HF_ENDPOINT": f"http://{HUB_HOST}:{HUB_PORT}",
        "HF_HOME": _HF_HOME,
        "HF_TOKEN": HUB_TOKEN,
        "HF_HUB_DISABLE_XET": "1",
        "HF_HUB_DISABLE_TELEMETRY": "1",
        "HF_HUB_DISABLE_UPDATE_CHECK": "1",
        "HF_HUB_DISABLE_PROGRESS_BARS": "1",
        "DO_NOT_TRACK": "1",
    }
)
# Nothing can reach the real Hub: every Hub call goes to the local server, so offline mode is not needed to fail
# fast, and the Hub tests need online mode (tests that want offline mode set it in a subprocess).
for _name in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_TOKEN_PATH", "HF_HUB_CACHE"):
    os.environ.pop(_name, None)

import uuid  # noqa: E402

import pytest  # noqa: E402
from hub_server import LocalHub, wait_until_up  # noqa: E402


# ======================================================================================================
# 2. Hub fixtures
# ======================================================================================================
@pytest.fixture(scope="session")
def local_hub(tmp_path_factory):
    """A Hub-compatible server on `HF_ENDPOINT`, for the whole session.

    Yields a `hub_server.LocalHub`: `.url`, `.token`, `.user`, `.root` (its storage folder), inspection helpers
    (`.commit_ids(repo_id, repo_type)`, `.files(...)`, `.requests`) and `.fault(method, path_regex, status=...,
    disconnect=..., times=...)`, a context manager that makes matching requests fail with an HTTP status or drop the
    connection halfway through the upload.
    """
    import huggingface_hub.constants

    if huggingface_hub.constants.ENDPOINT != os.environ["HF_ENDPOINT"]:
        pytest.fail(
            "huggingface_hub was imported before tests/conftest.py set HF_ENDPOINT "
            f"(it uses {huggingface_hub.constants.ENDPOINT}); a plugin or sitecustomize imports it too early"
        )
    hub = LocalHub(tmp_path_factory.mktemp("local_hub"), token=HUB_TOKEN, port=HUB_PORT, host=HUB_HOST, user=HUB_USER)
    with hub:
        wait_until_up(hub.url)
        yield hub


@pytest.fixture
def new_repo_id(local_hub):
    """A factory of repo ids no test has used yet: `new_repo_id("d3-mnist")` -> "d3-tester/d3-mnist-1a2b3c4d"."""

    def make(stem: str = "repo") -> str:
        return f"{local_hub.user}/{stem}-{uuid.uuid4().hex[:8]}"

    return make

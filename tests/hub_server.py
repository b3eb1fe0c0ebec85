"""A local Hugging Face Hub for tests: the HTTP endpoints that `huggingface_hub`, `datasets` and `diffusers`
call to publish and pull repos, served from a temporary folder.

It speaks the real wire protocol (no client is mocked), so publishing code is exercised end to end:

- `POST /api/repos/create` (409 when the repo exists), `DELETE /api/repos/delete`, `GET /api/whoami-v2`,
  `POST /api/validate-yaml`;
- `GET /api/{models,datasets}/{repo}[/revision/{rev}]` (siblings, sha, cardData), `.../tree/{rev}[/{path}]`
  (`recursive`, `expand`), `POST .../paths-info/{rev}`, `GET .../commits/{rev}`, `GET .../refs`,
  `POST .../branch/{name}`;
- `POST .../preupload/{rev}` (`.safetensors`, `.parquet`, binary and large files go through LFS), the LFS batch
  API at `POST /[datasets/]{repo}.git/info/lfs/objects/batch` with the signed upload and verify URLs it hands
  out, and `POST .../commit/{rev}` (ndjson; a commit is atomic: it is validated in full before anything is
  written, and one commit is one revision);
- `GET`/`HEAD /[datasets/]{repo}/resolve/{rev}/{path}` with `ETag`, `X-Repo-Commit`, `X-Linked-Etag`,
  `X-Linked-Size` and `Range` support.

Writes need `Authorization: Bearer <token>` with the server's token (401 otherwise); a wrong token is refused
on every request, as on the Hub. Faults can be injected per request (`LocalHub.fault`) to test failures: an
HTTP error status, or a connection dropped halfway through the request body ("dying mid-upload").
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import hmac
import json
import os
import re
import secrets
import socket
import tempfile
import threading
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, unquote, urlencode, urlsplit

import yaml

# Files the preupload endpoint sends through LFS, whatever their content (others: when binary or large).
LFS_SUFFIXES = (".safetensors", ".parquet", ".bin", ".pt", ".pth", ".ckpt", ".h5", ".onnx", ".arrow", ".npz")
LFS_SIZE_THRESHOLD = 10 * 1024 * 1024
GITATTRIBUTES = "".join(f"*{suffix} filter=lfs diff=lfs merge=lfs -text\n" for suffix in LFS_SUFFIXES).encode()
REPO_TYPES = {"models": "model", "datasets": "dataset", "spaces": "space"}
URL_PREFIXES = {"model": "", "dataset": "datasets/", "space": "spaces/"}


class HubError(Exception):
    """An HTTP error answer: status, message, and the `X-Error-Code` the clients map to their exceptions."""

    def __init__(self, status: int, message: str, code: str | None = None, headers: dict | None = None):
        super().__init__(message)
        self.status, self.message, self.code, self.headers = status, message, code, headers or {}


def git_blob_sha1(data: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


def lfs_pointer(sha256: str, size: int) -> bytes:
    return f"version https://git-lfs.github.com/spec/v1\noid sha256:{sha256}\nsize {size}\n".encode()


def _now() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%S.%f")[:-3] + "Z"


def _front_matter(text: str) -> dict | None:
    """The YAML metadata block of a card, None when there is none; raises yaml.YAMLError when malformed."""
    match = re.match(r"^---\s*\n(.*?)\n---\s*(\n|$)", text, flags=re.DOTALL)
    if match is None:
        return None
    data = yaml.safe_load(match.group(1))
    return data if data is not None else {}


def validate_card_metadata(text: str) -> tuple[list[str], list[str]]:
    """(errors, warnings) for a README's metadata, checking the few fields the Hub rejects most often."""
    try:
        data = _front_matter(text)
    except yaml.YAMLError as error:
        return [f"Invalid YAML in the metadata block: {error}"], []
    if data is None:
        return [], ["Empty or missing yaml metadata in repo card"]
    if not isinstance(data, dict):
        return ["The metadata block must be a YAML mapping"], []
    errors = []
    for key in ("license", "library_name", "pipeline_tag"):
        if key in data and not isinstance(data[key], str):
            errors.append(f'"{key}" must be a string')
    for key in ("tags", "datasets", "language"):
        if key in data and not isinstance(data[key], str | list):
            errors.append(f'"{key}" must be a string or a list of strings')
    if "model-index" in data:
        index = data["model-index"]
        if not isinstance(index, list) or not all(isinstance(m, dict) and "name" in m for m in index):
            errors.append('"model-index" must be a list of entries with a "name"')
        else:
            for model in index:
                for result in model.get("results", []):
                    if not isinstance(result, dict) or "task" not in result or "metrics" not in result:
                        errors.append('"model-index" results need a "task" and "metrics"')
                    elif any("type" not in m or "value" not in m for m in result["metrics"]):
                        errors.append('"model-index" metrics need a "type" and a "value"')
    if "configs" in data:
        configs = data["configs"]
        if not isinstance(configs, list) or not all(isinstance(c, dict) and "config_name" in c for c in configs):
            errors.append('"configs" must be a list of entries with a "config_name"')
    return errors, []


@dataclass
class FileEntry:
    """A file in a commit: content address (sha256), size, git blob id, and whether it is stored in LFS."""

    sha256: str
    size: int
    lfs: bool
    blob_id: str

    def to_json(self) -> dict:
        return {"sha256": self.sha256, "size": self.size, "lfs": self.lfs, "blob_id": self.blob_id}


@dataclass
class Commit:
    id: str
    parents: list[str]
    title: str
    message: str
    date: str
    author: str
    files: dict[str, FileEntry]

    def to_json(self) -> dict:
        return {
            "id": self.id,
            "parents": self.parents,
            "title": self.title,
            "message": self.message,
            "date": self.date,
            "author": self.author,
            "files": {path: entry.to_json() for path, entry in self.files.items()},
        }


@dataclass
class Repo:
    repo_type: str
    repo_id: str
    private: bool
    created_at: str
    refs: dict[str, str] = field(default_factory=dict)
    commits: dict[str, Commit] = field(default_factory=dict)
    lfs_objects: set[str] = field(default_factory=set)  # LFS objects uploaded to this repo (scoped, as on the Hub)

    def to_json(self) -> dict:
        return {
            "repo_type": self.repo_type,
            "repo_id": self.repo_id,
            "private": self.private,
            "created_at": self.created_at,
            "refs": self.refs,
            "commits": {oid: commit.to_json() for oid, commit in self.commits.items()},
            "lfs_objects": sorted(self.lfs_objects),
        }

    def resolve(self, revision: str) -> Commit:
        """The commit of a branch name or of a (possibly shortened, >= 7 characters) commit id."""
        if revision in self.refs:
            return self.commits[self.refs[revision]]
        if re.fullmatch(r"[0-9a-f]{7,40}", revision):
            matches = [oid for oid in self.commits if oid.startswith(revision)]
            if len(matches) == 1:
                return self.commits[matches[0]]
        raise HubError(404, f"Invalid rev id: {revision}", "RevisionNotFound")

    def history(self, revision: str) -> list[Commit]:
        commit, history = self.resolve(revision), []
        while True:
            history.append(commit)
            if not commit.parents:
                return history
            commit = self.commits[commit.parents[0]]


@dataclass
class Fault:
    """Answer requests whose method matches and whose path matches `path` (a regex) with `status`, or drop
    the connection halfway through the request body (`disconnect=True`), `times` times (None: always)."""

    method: str
    path: str
    status: int = 500
    disconnect: bool = False
    times: int | None = 1
    hits: int = 0

    def matches(self, method: str, path: str) -> bool:
        return method == self.method and re.search(self.path, path) is not None and self.times != 0


class LocalHub:
    """A Hub-compatible server on `host:port` storing repos and LFS objects under `root`.

    Attributes:
        url: the endpoint to put in `HF_ENDPOINT`.
        token: the only token accepted.
        root: where `objects/` (content-addressed file contents) and `repos/` (one JSON file per repo: refs and
            commits) are kept.
        user: the name `whoami` answers for the token, and the default namespace of new repos.
    """

    def __init__(
        self, root: str | os.PathLike, token: str, port: int = 0, host: str = "127.0.0.1", user: str = "tester"
    ):
        self.root = Path(root)
        self.token, self.user, self.host = token, user, host
        self._port = port
        self._secret = secrets.token_bytes(32)
        self._lock = threading.RLock()
        self._repos: dict[tuple[str, str], Repo] = {}
        self._faults: list[Fault] = []
        self.requests: list[tuple[str, str]] = []  # (method, path) of every request, for assertions
        self._server: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None
        (self.root / "objects").mkdir(parents=True, exist_ok=True)
        (self.root / "repos").mkdir(parents=True, exist_ok=True)

    # -- lifecycle -------------------------------------------------------------------------------------------

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self._port}"

    def start(self) -> LocalHub:
        handler = type("BoundHubHandler", (_HubHandler,), {"hub": self})
        self._server = _Server((self.host, self._port), handler)
        self._port = self._server.server_address[1]
        self._thread = threading.Thread(target=self._server.serve_forever, name="local-hub", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        """Stop serving and drop every open connection (a later `start()` serves the same repos again)."""
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server.close_all_connections()
            self._thread.join(timeout=5)
            self._server = self._thread = None

    def __enter__(self) -> LocalHub:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    # -- fault injection -------------------------------------------------------------------------------------

    @contextlib.contextmanager
    def fault(self, method: str, path: str, status: int = 500, disconnect: bool = False, times: int | None = 1):
        """Inject a `Fault` while the block runs; yields it (`fault.hits` counts the requests it hit)."""
        injected = Fault(method.upper(), path, status, disconnect, times)
        with self._lock:
            self._faults.append(injected)
        try:
            yield injected
        finally:
            with self._lock:
                self._faults.remove(injected)

    def _take_fault(self, method: str, path: str) -> Fault | None:
        with self._lock:
            for candidate in self._faults:
                if candidate.matches(method, path):
                    candidate.hits += 1
                    if candidate.times is not None:
                        candidate.times -= 1
                    return candidate
        return None

    # -- inspection helpers for tests -----------------------------------------------------------------------

    def repo(self, repo_id: str, repo_type: str = "model") -> Repo:
        with self._lock:
            try:
                return self._repos[(repo_type, repo_id)]
            except KeyError:
                raise KeyError(f"no {repo_type} repo {repo_id!r} on the local hub") from None

    def commit_ids(self, repo_id: str, repo_type: str = "model", revision: str = "main") -> list[str]:
        """Commit ids reachable from `revision`, newest first."""
        with self._lock:
            return [c.id for c in self.repo(repo_id, repo_type).history(revision)]

    def files(self, repo_id: str, repo_type: str = "model", revision: str = "main") -> dict[str, bytes]:
        with self._lock:
            commit = self.repo(repo_id, repo_type).resolve(revision)
            return {path: self._object(entry.sha256).read_bytes() for path, entry in commit.files.items()}

    # -- storage ---------------------------------------------------------------------------------------------

    def _object(self, sha256: str) -> Path:
        return self.root / "objects" / sha256

    def _write_object(self, data: bytes) -> str:
        sha = hashlib.sha256(data).hexdigest()
        path = self._object(sha)
        if not path.exists():
            with tempfile.NamedTemporaryFile(dir=path.parent, prefix=".incoming-", delete=False) as tmp:
                tmp.write(data)
            os.replace(tmp.name, path)
        return sha

    def _persist(self, repo: Repo) -> None:
        path = self.root / "repos" / repo.repo_type / f"{repo.repo_id}.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile("w", dir=path.parent, prefix=".incoming-", delete=False) as tmp:
            json.dump(repo.to_json(), tmp, indent=1)
        os.replace(tmp.name, path)

    def _get_repo(self, repo_type: str, repo_id: str, authorized: bool) -> Repo:
        repo = self._repos.get((repo_type, repo_id))
        if repo is None or (repo.private and not authorized):
            raise HubError(404, "Repository not found", "RepoNotFound")
        return repo

    def _new_commit(self, repo: Repo, parent: str | None, files: dict[str, FileEntry], title: str, message: str):
        date = _now()
        seed = json.dumps([repo.repo_id, parent, title, date, secrets.token_hex(8), sorted(files)])
        commit = Commit(
            id=hashlib.sha1(seed.encode()).hexdigest(),
            parents=[parent] if parent else [],
            title=title,
            message=message,
            date=date,
            author=self.user,
            files=files,
        )
        repo.commits[commit.id] = commit
        return commit

    def _entry_for(self, data: bytes, lfs: bool) -> FileEntry:
        sha = self._write_object(data)
        blob_id = git_blob_sha1(lfs_pointer(sha, len(data))) if lfs else git_blob_sha1(data)
        return FileEntry(sha256=sha, size=len(data), lfs=lfs, blob_id=blob_id)

    def create_repo(self, repo_type: str, repo_id: str, private: bool) -> Repo:
        with self._lock:
            if (repo_type, repo_id) in self._repos:
                raise HubError(409, f"You already created this {repo_type} repo", None, {"url": repo_id})
            repo = Repo(repo_type=repo_type, repo_id=repo_id, private=private, created_at=_now())
            first = self._new_commit(
                repo, None, {".gitattributes": self._entry_for(GITATTRIBUTES, lfs=False)}, "initial commit", ""
            )
            repo.refs["main"] = first.id
            self._repos[(repo_type, repo_id)] = repo
            self._persist(repo)
            return repo

    def delete_repo(self, repo_type: str, repo_id: str) -> None:
        with self._lock:
            if self._repos.pop((repo_type, repo_id), None) is None:
                raise HubError(404, "Repository not found", "RepoNotFound")
            (self.root / "repos" / repo_type / f"{repo_id}.json").unlink(missing_ok=True)

    def commit(self, repo: Repo, branch: str, lines: list[dict]) -> Commit:
        """Apply an ndjson commit atomically: everything is checked before the new revision is written."""
        if not lines or lines[0].get("key") != "header":
            raise HubError(400, "The first line of a commit must be its header")
        header = lines[0].get("value") or {}
        title = header.get("summary") or ""
        if not title:
            raise HubError(400, "A commit needs a summary")
        with self._lock:
            if branch not in repo.refs:
                raise HubError(404, f"Invalid rev id: {branch} (commits go to a branch)", "RevisionNotFound")
            head = repo.commits[repo.refs[branch]]
            expected_parent = header.get("parentCommit")
            if expected_parent and not head.id.startswith(expected_parent):
                raise HubError(412, f"A commit has happened since {expected_parent}: the branch is at {head.id}")
            files = dict(head.files)
            new_contents: dict[str, bytes] = {}
            for line in lines[1:]:
                key, value = line.get("key"), line.get("value") or {}
                path = value.get("path", "")
                if key == "deletedFolder":
                    path = path.rstrip("/")
                if not path or path.startswith("/") or ".." in path.split("/") or path.endswith("/"):
                    raise HubError(400, f"Invalid path in commit: {path!r}")
                if key == "file":
                    if value.get("encoding") != "base64":
                        raise HubError(400, f"Unsupported encoding for {path}: {value.get('encoding')}")
                    try:
                        new_contents[path] = base64.b64decode(value["content"], validate=True)
                    except (KeyError, ValueError) as error:
                        raise HubError(400, f"Bad content for {path}: {error}") from None
                    files.pop(path, None)
                elif key == "lfsFile":
                    oid = value.get("oid", "")
                    if oid not in repo.lfs_objects or not self._object(oid).is_file():
                        raise HubError(422, f"LFS object {oid} of {path} was never uploaded to {repo.repo_id}")
                    size = self._object(oid).stat().st_size
                    if value.get("size") not in (None, size):
                        raise HubError(422, f"LFS object {oid} of {path} has size {size}, not {value['size']}")
                    files[path] = FileEntry(oid, size, True, git_blob_sha1(lfs_pointer(oid, size)))
                    new_contents.pop(path, None)
                elif key == "deletedFile":
                    if path not in files and path not in new_contents:
                        raise HubError(404, f"A file with this name doesn't exist: {path}", "EntryNotFound")
                    files.pop(path, None)
                    new_contents.pop(path, None)
                elif key == "deletedFolder":
                    prefix = path.rstrip("/") + "/"
                    doomed = [p for p in [*files, *new_contents] if p.startswith(prefix)]
                    if not doomed:
                        raise HubError(404, f"A folder with this name doesn't exist: {path}", "EntryNotFound")
                    for p in doomed:
                        files.pop(p, None)
                        new_contents.pop(p, None)
                else:
                    raise HubError(400, f"Unknown commit operation {key!r}")
            if "README.md" in new_contents:
                errors, _ = validate_card_metadata(new_contents["README.md"].decode("utf-8", "replace"))
                if errors:
                    raise HubError(400, "Invalid metadata in README.md: " + "; ".join(errors))
            # Validated: only now write the regular files' contents, the commit and the moved branch.
            for path, data in new_contents.items():
                files[path] = self._entry_for(data, lfs=False)
            commit = self._new_commit(repo, head.id, files, title, header.get("description") or "")
            repo.refs[branch] = commit.id
            self._persist(repo)
            return commit

    def create_branch(self, repo: Repo, branch: str, starting_point: str | None) -> None:
        with self._lock:
            if branch in repo.refs:
                raise HubError(409, f"Reference already exists: refs/heads/{branch}")
            repo.refs[branch] = repo.resolve(starting_point or "main").id
            self._persist(repo)

    # -- LFS signatures -------------------------------------------------------------------------------------

    def _sign(self, repo_key: str, oid: str, size: int) -> str:
        return hmac.new(self._secret, f"{repo_key}:{oid}:{size}".encode(), hashlib.sha256).hexdigest()

    def add_lfs_object(self, repo_key: str, oid: str, data: bytes) -> None:
        with self._lock:
            repo_type, _, repo_id = repo_key.partition(":")
            repo = self._repos.get((repo_type, repo_id))
            if repo is None:
                raise HubError(404, "Repository not found", "RepoNotFound")
            self._write_object(data)
            repo.lfs_objects.add(oid)
            self._persist(repo)


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.open_connections: set[socket.socket] = set()
        self.connections_lock = threading.Lock()

    def close_all_connections(self) -> None:
        """Cut the keep-alive connections too, so a stopped server is really gone for its clients."""
        with self.connections_lock:
            for connection in self.open_connections:
                with contextlib.suppress(OSError):
                    connection.shutdown(socket.SHUT_RDWR)
            self.open_connections.clear()


def _tree_entry(path: str, entry: FileEntry, last_commit: Commit | None = None) -> dict:
    item = {"type": "file", "oid": entry.blob_id, "size": entry.size, "path": path}
    if entry.lfs:
        item["lfs"] = {
            "oid": entry.sha256,
            "size": entry.size,
            "pointerSize": len(lfs_pointer(entry.sha256, entry.size)),
        }
    if last_commit is not None:
        item["lastCommit"] = {"id": last_commit.id, "title": last_commit.title, "date": last_commit.date}
    return item


def _folder_entry(path: str, files: dict[str, FileEntry], last_commit: Commit | None = None) -> dict:
    listing = json.dumps(sorted((p, e.blob_id) for p, e in files.items() if p.startswith(path + "/")))
    item = {"type": "directory", "oid": hashlib.sha1(listing.encode()).hexdigest(), "size": 0, "path": path}
    if last_commit is not None:
        item["lastCommit"] = {"id": last_commit.id, "title": last_commit.title, "date": last_commit.date}
    return item


REPO = r"(?P<ns>[\w.\-]+)/(?P<name>[\w.\-]+?)"
ROUTES = [
    ("GET", r"/api/whoami-v2", "whoami"),
    ("POST", r"/api/repos/create", "create_repo"),
    ("DELETE", r"/api/repos/delete", "delete_repo"),
    ("POST", r"/api/validate-yaml", "validate_yaml"),
    ("GET", rf"/api/(?P<kind>models|datasets|spaces)/{REPO}(?:/revision/(?P<rev>[^/]+))?", "info"),
    ("GET", rf"/api/(?P<kind>models|datasets|spaces)/{REPO}/tree/(?P<rev>[^/]+)(?:/(?P<path>.*))?", "tree"),
    ("POST", rf"/api/(?P<kind>models|datasets|spaces)/{REPO}/paths-info/(?P<rev>[^/]+)", "paths_info"),
    ("GET", rf"/api/(?P<kind>models|datasets|spaces)/{REPO}/commits/(?P<rev>[^/]+)", "commits"),
    ("GET", rf"/api/(?P<kind>models|datasets|spaces)/{REPO}/refs", "refs"),
    ("POST", rf"/api/(?P<kind>models|datasets|spaces)/{REPO}/branch/(?P<branch>[^/]+)", "branch"),
    ("POST", rf"/api/(?P<kind>models|datasets|spaces)/{REPO}/preupload/(?P<rev>[^/]+)", "preupload"),
    ("POST", rf"/api/(?P<kind>models|datasets|spaces)/{REPO}/commit/(?P<rev>[^/]+)", "commit"),
    ("POST", rf"/(?:(?P<kind>datasets|spaces)/)?{REPO}\.git/info/lfs/objects/batch", "lfs_batch"),
    ("PUT", r"/lfs/upload/(?P<oid>[0-9a-f]{64})", "lfs_upload"),
    ("POST", r"/lfs/verify", "lfs_verify"),
    ("GET", rf"/(?:(?P<kind>datasets|spaces)/)?{REPO}/resolve/(?P<rev>[^/]+)/(?P<path>.+)", "resolve"),
    ("HEAD", rf"/(?:(?P<kind>datasets|spaces)/)?{REPO}/resolve/(?P<rev>[^/]+)/(?P<path>.+)", "resolve"),
]


class _HubHandler(BaseHTTPRequestHandler):
    hub: LocalHub  # set on the bound subclass
    protocol_version = "HTTP/1.1"

    def log_message(self, format, *args):  # keep pytest output clean; `hub.requests` records the traffic
        pass

    def setup(self):
        super().setup()
        with self.server.connections_lock:
            self.server.open_connections.add(self.connection)

    def finish(self):
        with self.server.connections_lock:
            self.server.open_connections.discard(self.connection)
        super().finish()

    # -- plumbing --------------------------------------------------------------------------------------------

    def do_GET(self):
        self._handle("GET")

    def do_HEAD(self):
        self._handle("HEAD")

    def do_POST(self):
        self._handle("POST")

    def do_PUT(self):
        self._handle("PUT")

    def do_DELETE(self):
        self._handle("DELETE")

    def _handle(self, method: str) -> None:
        split = urlsplit(self.path)
        self.query = parse_qs(split.query)
        self.hub.requests.append((method, split.path))
        fault = self.hub._take_fault(method, split.path)
        if fault is not None and fault.disconnect:
            self._read_body(limit_fraction=0.5)
            self._drop_connection()
            return
        body = self._read_body()
        try:
            if fault is not None:
                raise HubError(fault.status, f"Injected fault: {fault.status} on {method} {split.path}")
            self.authorized = self._check_token()
            for route_method, pattern, name in ROUTES:
                match = re.fullmatch(pattern, split.path)
                if route_method == method and match is not None:
                    params = {k: unquote(v) if v is not None else None for k, v in match.groupdict().items()}
                    getattr(self, f"route_{name}")(body=body, **params)
                    return
            raise HubError(404, f"Not found: {method} {split.path}")
        except HubError as error:
            self._send_error(error)
        except Exception as error:  # a bug here must show up as a 500, not as a hung client
            self._send_error(HubError(500, f"{type(error).__name__}: {error}"))

    def _read_body(self, limit_fraction: float = 1.0) -> bytes:
        if "chunked" in self.headers.get("Transfer-Encoding", "").lower():
            chunks = []
            while True:
                size = int(self.rfile.readline().split(b";")[0].strip() or b"0", 16)
                if size == 0:
                    while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                        pass
                    break
                chunks.append(self.rfile.read(size))
                self.rfile.readline()
                if limit_fraction < 1.0:
                    break
            return b"".join(chunks)
        length = int(self.headers.get("Content-Length") or 0)
        return self.rfile.read(int(length * limit_fraction)) if length else b""

    def _drop_connection(self) -> None:
        self.close_connection = True
        with contextlib.suppress(OSError):
            self.connection.shutdown(socket.SHUT_RDWR)

    def _check_token(self) -> bool:
        auth = self.headers.get("Authorization")
        if auth is None:
            return False
        scheme, _, token = auth.partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip(), self.hub.token):
            raise HubError(401, "Invalid credentials in Authorization header")
        return True

    def _require_token(self) -> None:
        if not self.authorized:
            raise HubError(401, "You must be authenticated to do this: pass a token in the Authorization header")

    def _send(self, status: int, body: bytes = b"", headers: dict | None = None, content_type="application/json"):
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        for key, value in (headers or {}).items():
            self.send_header(key, str(value))
        self.end_headers()
        if self.command != "HEAD" and body:
            self.wfile.write(body)

    def _json(self, data, status: int = 200, headers: dict | None = None) -> None:
        self._send(status, json.dumps(data).encode(), headers)

    def _send_error(self, error: HubError) -> None:
        headers = {"X-Error-Message": error.message.replace("\n", " ")}
        if error.code:
            headers["X-Error-Code"] = error.code
        headers.update(error.headers)
        body = {"error": error.message, **({"url": error.headers["url"]} if "url" in error.headers else {})}
        self._json(body, error.status, headers)

    def _repo(self, kind: str | None, ns: str, name: str) -> Repo:
        repo_type = REPO_TYPES[kind] if kind else "model"
        return self.hub._get_repo(repo_type, f"{ns}/{name}", self.authorized)

    def _repo_url(self, repo: Repo) -> str:
        return f"{self.hub.url}/{URL_PREFIXES[repo.repo_type]}{repo.repo_id}"

    # -- account and repos -----------------------------------------------------------------------------------

    def route_whoami(self, body):
        self._require_token()
        self._json(
            {
                "type": "user",
                "id": "0" * 24,
                "name": self.hub.user,
                "fullname": "Local Hub Tester",
                "orgs": [],
                "auth": {"type": "access_token", "accessToken": {"displayName": "tests", "role": "write"}},
            }
        )

    def route_create_repo(self, body):
        self._require_token()
        payload = json.loads(body or b"{}")
        repo_type = payload.get("type") or "model"
        if repo_type not in URL_PREFIXES:
            raise HubError(400, f"Invalid repo type {repo_type!r}")
        name = payload.get("name") or ""
        namespace = payload.get("organization") or self.hub.user
        if not re.fullmatch(r"[\w.\-]{1,96}", name) or not re.fullmatch(r"[\w.\-]{1,96}", namespace):
            raise HubError(400, f"Invalid repo name {namespace}/{name}")
        if namespace != self.hub.user:
            raise HubError(403, f"You don't have the rights to create a repo under the namespace {namespace!r}")
        private = payload.get("visibility") == "private" or bool(payload.get("private"))
        repo_id = f"{namespace}/{name}"
        url = f"{self.hub.url}/{URL_PREFIXES[repo_type]}{repo_id}"
        try:
            self.hub.create_repo(repo_type, repo_id, private)
        except HubError as error:
            error.headers["url"] = url
            raise
        self._json({"url": url, "name": repo_id, "id": repo_id})

    def route_delete_repo(self, body):
        self._require_token()
        payload = json.loads(body or b"{}")
        namespace = payload.get("organization") or self.hub.user
        self.hub.delete_repo(payload.get("type") or "model", f"{namespace}/{payload.get('name')}")
        self._json({})

    def route_validate_yaml(self, body):
        payload = json.loads(body or b"{}")
        errors, warnings = validate_card_metadata(payload.get("content") or "")
        status = 400 if errors else 200
        self._json({"errors": [{"message": e} for e in errors], "warnings": [{"message": w} for w in warnings]}, status)

    def route_info(self, body, kind, ns, name, rev=None):
        repo = self._repo(kind, ns, name)
        commit = repo.resolve(rev or "main")
        blobs = self.query.get("blobs", ["false"])[0].lower() in ("1", "true")
        siblings = []
        for path, entry in sorted(commit.files.items()):
            sibling = {"rfilename": path}
            if blobs:
                sibling.update(size=entry.size, blobId=entry.blob_id)
                if entry.lfs:
                    sibling["lfs"] = {
                        "size": entry.size,
                        "sha256": entry.sha256,
                        "pointerSize": len(lfs_pointer(entry.sha256, entry.size)),
                    }
            siblings.append(sibling)
        card_data = None
        if "README.md" in commit.files:
            with contextlib.suppress(yaml.YAMLError, UnicodeDecodeError):
                card_data = _front_matter(self.hub._object(commit.files["README.md"].sha256).read_text("utf-8"))
        info = {
            "_id": hashlib.sha1(repo.repo_id.encode()).hexdigest()[:24],
            "id": repo.repo_id,
            "author": repo.repo_id.split("/")[0],
            "sha": commit.id,
            "lastModified": commit.date,
            "createdAt": repo.created_at,
            "private": repo.private,
            "disabled": False,
            "gated": False,
            "downloads": 0,
            "likes": 0,
            "tags": list((card_data or {}).get("tags") or []),
            "siblings": siblings,
            "usedStorage": sum(e.size for e in commit.files.values()),
        }
        if card_data is not None:
            info["cardData"] = card_data
            if repo.repo_type == "model" and "library_name" in card_data:
                info["library_name"] = card_data["library_name"]
        self._json(info)

    # -- browsing ------------------------------------------------------------------------------------------

    def _last_commits(self, repo: Repo, commit: Commit, paths: list[str]) -> dict[str, Commit]:
        """For each path (file or folder), the newest commit in `commit`'s history that changed it."""

        def state(c: Commit, p: str):
            if p in c.files:
                return c.files[p].blob_id
            return sorted((q, e.blob_id) for q, e in c.files.items() if q.startswith(p + "/")) or None

        found, history = {}, repo.history(commit.id)
        for path in paths:
            current = state(commit, path)
            last = commit
            for older in history[1:]:
                if state(older, path) != current:
                    break
                last = older
            found[path] = last
        return found

    def _listing(self, repo: Repo, commit: Commit, folder: str, recursive: bool, expand: bool) -> list[dict]:
        prefix = folder + "/" if folder else ""
        files, folders = {}, set()
        for path, entry in commit.files.items():
            if not path.startswith(prefix):
                continue
            rest = path[len(prefix) :].split("/")
            for depth in range(1, len(rest)):
                if recursive or depth == 1:
                    folders.add(prefix + "/".join(rest[:depth]))
            if recursive or len(rest) == 1:
                files[path] = entry
        last = self._last_commits(repo, commit, [*folders, *files]) if expand else {}
        items = [_folder_entry(p, commit.files, last.get(p)) for p in sorted(folders)]
        return items + [_tree_entry(p, e, last.get(p)) for p, e in sorted(files.items())]

    def route_tree(self, body, kind, ns, name, rev, path=None):
        repo = self._repo(kind, ns, name)
        commit = repo.resolve(rev)
        folder = (path or "").strip("/")
        if folder and not any(p.startswith(folder + "/") for p in commit.files):
            raise HubError(404, f"{folder} does not exist on {rev}", "EntryNotFound")
        recursive = self.query.get("recursive", ["false"])[0].lower() in ("1", "true")
        expand = self.query.get("expand", ["false"])[0].lower() in ("1", "true")
        self._json(self._listing(repo, commit, folder, recursive, expand))

    def route_paths_info(self, body, kind, ns, name, rev):
        repo = self._repo(kind, ns, name)
        commit = repo.resolve(rev)
        form = parse_qs(body.decode())
        if self.headers.get("Content-Type", "").startswith("application/json"):
            form = {k: v if isinstance(v, list) else [v] for k, v in json.loads(body).items()}
        expand = str(form.get("expand", ["false"])[0]).lower() in ("1", "true")
        paths = [p.strip("/") for p in form.get("paths", [])]
        last = self._last_commits(repo, commit, paths) if expand else {}
        items = []
        for path in paths:
            if path in commit.files:
                items.append(_tree_entry(path, commit.files[path], last.get(path)))
            elif any(p.startswith(path + "/") for p in commit.files):
                items.append(_folder_entry(path, commit.files, last.get(path)))
        self._json(items)

    def route_commits(self, body, kind, ns, name, rev):
        repo = self._repo(kind, ns, name)
        self._json(
            [
                {
                    "id": c.id,
                    "title": c.title,
                    "message": c.message,
                    "date": c.date,
                    "authors": [{"user": c.author}],
                }
                for c in repo.history(rev)
            ]
        )

    def route_refs(self, body, kind, ns, name):
        repo = self._repo(kind, ns, name)
        branches = [{"name": b, "ref": f"refs/heads/{b}", "targetCommit": c} for b, c in sorted(repo.refs.items())]
        self._json({"branches": branches, "tags": [], "converts": [], "pullRequests": []})

    def route_branch(self, body, kind, ns, name, branch):
        self._require_token()
        repo = self._repo(kind, ns, name)
        payload = json.loads(body or b"{}")
        self.hub.create_branch(repo, branch, payload.get("startingPoint"))
        self._json({})

    # -- uploads --------------------------------------------------------------------------------------------

    def route_preupload(self, body, kind, ns, name, rev):
        self._require_token()
        repo = self._repo(kind, ns, name)
        commit = repo.resolve(rev)
        files = []
        for item in json.loads(body).get("files", []):
            path, size = item["path"], int(item.get("size", 0))
            sample = base64.b64decode(item.get("sample") or "")
            lfs = path.endswith(LFS_SUFFIXES) or size >= LFS_SIZE_THRESHOLD or b"\0" in sample
            existing = commit.files.get(path)
            oid = None
            if existing is not None:
                oid = existing.sha256 if existing.lfs else existing.blob_id
            files.append({"path": path, "uploadMode": "lfs" if lfs else "regular", "shouldIgnore": False, "oid": oid})
        self._json({"files": files, "commitOid": commit.id})

    def route_commit(self, body, kind, ns, name, rev):
        self._require_token()
        repo = self._repo(kind, ns, name)
        if self.query.get("create_pr"):
            raise HubError(400, "This local hub does not support pull requests")
        try:
            lines = [json.loads(line) for line in body.decode().splitlines() if line.strip()]
        except (UnicodeDecodeError, json.JSONDecodeError) as error:
            raise HubError(400, f"Malformed ndjson commit payload: {error}") from None
        commit = self.hub.commit(repo, rev, lines)
        self._json(
            {
                "success": True,
                "commitOid": commit.id,
                "commitUrl": f"{self._repo_url(repo)}/commit/{commit.id}",
                "hookOutput": "",
                "pullRequestUrl": None,
            }
        )

    def route_lfs_batch(self, body, kind, ns, name):
        self._require_token()
        repo = self._repo(kind, ns, name)
        payload = json.loads(body)
        if payload.get("operation") != "upload":
            raise HubError(400, "This local hub only serves LFS uploads through the batch API")
        objects = []
        for obj in payload.get("objects", []):
            oid, size = obj.get("oid", ""), obj.get("size")
            if not re.fullmatch(r"[0-9a-f]{64}", oid) or not isinstance(size, int) or size < 0:
                objects.append({"oid": str(oid), "size": int(size or 0), "error": {"code": 422, "message": "bad oid"}})
                continue
            answer = {"oid": oid, "size": size, "authenticated": True}
            if oid not in repo.lfs_objects:
                repo_key = f"{repo.repo_type}:{repo.repo_id}"
                query = urlencode({"repo": repo_key, "size": size, "sig": self.hub._sign(repo_key, oid, size)})
                answer["actions"] = {
                    "upload": {"href": f"{self.hub.url}/lfs/upload/{oid}?{query}", "header": {}},
                    "verify": {"href": f"{self.hub.url}/lfs/verify?{urlencode({'repo': repo_key})}", "header": {}},
                }
            objects.append(answer)
        self._json({"transfer": "basic", "objects": objects, "hash_algo": "sha256", "repo": repo.repo_id})

    def route_lfs_upload(self, body, oid):
        # The client sends no Authorization header here: the signed URL from the batch answer is the credential.
        repo_key = self.query.get("repo", [""])[0]
        size = int(self.query.get("size", ["-1"])[0])
        signature = self.query.get("sig", [""])[0]
        if not hmac.compare_digest(signature, self.hub._sign(repo_key, oid, size)):
            raise HubError(403, "Invalid or expired upload signature")
        if len(body) != size or hashlib.sha256(body).hexdigest() != oid:
            raise HubError(400, f"Uploaded content does not match oid {oid} and size {size}")
        self.hub.add_lfs_object(repo_key, oid, body)
        self._send(200, b"", {"ETag": f'"{oid}"'}, content_type="text/plain")

    def route_lfs_verify(self, body):
        self._require_token()
        payload = json.loads(body or b"{}")
        repo_type, _, repo_id = self.query.get("repo", [""])[0].partition(":")
        repo = self.hub._get_repo(repo_type, repo_id, self.authorized)
        oid = str(payload.get("oid", ""))
        if oid not in repo.lfs_objects or self.hub._object(oid).stat().st_size != payload.get("size"):
            raise HubError(404, f"LFS object {oid} was not uploaded to {repo_id}")
        self._json({"success": True})

    # -- downloads ------------------------------------------------------------------------------------------

    def route_resolve(self, body, kind, ns, name, rev, path):
        repo = self._repo(kind, ns, name)
        commit = repo.resolve(rev)
        entry = commit.files.get(path)
        if entry is None:
            raise HubError(404, f"Entry not found: {path}", "EntryNotFound", {"X-Repo-Commit": commit.id})
        data = self.hub._object(entry.sha256).read_bytes()
        etag = entry.sha256 if entry.lfs else entry.blob_id
        headers = {"ETag": f'"{etag}"', "X-Repo-Commit": commit.id, "Accept-Ranges": "bytes"}
        if entry.lfs:
            headers.update({"X-Linked-Etag": f'"{entry.sha256}"', "X-Linked-Size": entry.size})
        status, wanted = 200, self.headers.get("Range")
        if wanted:
            match = re.fullmatch(r"bytes=(\d*)-(\d*)", wanted.strip())
            if match is None or (not match.group(1) and not match.group(2)):
                raise HubError(416, f"Bad range {wanted}", None, {"Content-Range": f"bytes */{len(data)}"})
            if match.group(1):
                start = int(match.group(1))
                end = min(int(match.group(2)), len(data) - 1) if match.group(2) else len(data) - 1
            else:
                start, end = max(len(data) - int(match.group(2)), 0), len(data) - 1
            if start >= len(data) or start > end:
                raise HubError(416, f"Range {wanted} not satisfiable", None, {"Content-Range": f"bytes */{len(data)}"})
            headers["Content-Range"] = f"bytes {start}-{end}/{len(data)}"
            status, data = 206, data[start : end + 1]
        self._send(status, data, headers, content_type="application/octet-stream")


def free_port(host: str = "127.0.0.1") -> int:
    """A port that was free a moment ago (bind port 0, read it, close)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind((host, 0))
        return probe.getsockname()[1]


def wait_until_up(url: str, timeout: float = 10.0) -> None:
    host, port = urlsplit(url).hostname, urlsplit(url).port
    deadline = time.monotonic() + timeout
    while True:
        try:
            with socket.create_connection((host, port), timeout=1):
                return
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.05)


__all__ = ["Fault", "HubError", "LocalHub", "free_port", "validate_card_metadata", "wait_until_up"]

"""A local stand-in for the Hugging Face Hub's HTTP API, so that pushing and reloading models is tested offline.

`huggingface_hub` has no offline double of the Hub, and the tests have no network. `FakeHub` serves, on 127.0.0.1, the
part of the API that `create_repo`, `whoami`, `repo_info`/`model_info`, `list_repo_tree`, `upload_folder`/
`create_commit`/`upload_file`, `hf_hub_download`/`snapshot_download` and so `from_pretrained` use (checked against
huggingface_hub 2.4):

- `POST /api/repos/create`, `POST|DELETE /api/repos/delete`, `GET /api/whoami-v2`, `POST /api/validate-yaml`;
- `GET /api/{models,datasets,spaces}/{repo}[/revision/{rev}]`, `GET .../tree/{rev}[/{path}]`;
- `POST .../preupload/{rev}`: every file is answered `uploadMode: "regular"`, so the client inlines it base64 in the
  commit and never starts an LFS or Xet transfer, with or without `hf_xet` installed;
- `POST .../commit/{rev}`: the NDJSON body (`header`, `file`, `deletedFile`, `deletedFolder`; `lfsFile` is refused);
- `GET|HEAD /[datasets/|spaces/]{repo}/resolve/{rev}/{path}` with `ETag` (the git blob sha1), `X-Repo-Commit` and
  `Content-Length`, and `X-Error-Code` (`RepoNotFound`, `RevisionNotFound`, `EntryNotFound`) on a 404, as the client
  expects. No `X-Xet-Hash` header is ever sent, so downloads are plain HTTP.

Permissions follow the Hub: a write without `Authorization: Bearer <token>`, or with an unknown token, is a 401; a write
to a namespace that is neither the token's user nor one of its organizations is a 403. Reads of public repositories
need no token; private ones are a 404 to anyone else, like the Hub. Requests it does not know are answered 404 and
recorded in `FakeHub.unhandled`, so that a test failing against it says which endpoint is missing.

`huggingface_hub` reads `HF_ENDPOINT` once, at import; `FakeHub.patch` points the already imported libraries at the
fake hub (see its docstring), and the `fake_hub` fixture does that for a test.
"""

from __future__ import annotations

import base64
import hashlib
import itertools
import json
import os
import tempfile
import threading
import traceback
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import datetime, timezone
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, unquote, urlsplit

import pytest
import yaml

__all__ = ["DEFAULT_TOKENS", "FakeHub", "HubError", "fake_hub"]

# Token -> user name. The default lets a test write under `user/` with `token="hf_test"`.
DEFAULT_TOKENS = {"hf_test": "user"}

_REPO_TYPES = {"models": "model", "datasets": "dataset", "spaces": "space"}
_URL_PREFIXES = {"model": "", "dataset": "datasets/", "space": "spaces/"}


def git_blob_sha1(content: bytes) -> str:
    """The git object id of a file, which the Hub uses as the `ETag` and tree `oid` of a regular (non-LFS) file."""
    return hashlib.sha1(b"blob %d\0" % len(content) + content).hexdigest()


@dataclass
class _Commit:
    oid: str
    message: str
    files: dict[str, bytes]
    parent: str | None
    date: str


@dataclass
class _Repo:
    repo_type: str
    repo_id: str
    private: bool
    branches: dict[str, str] = field(default_factory=dict)  # ref name -> commit oid
    commits: dict[str, _Commit] = field(default_factory=dict)
    created_at: str = ""

    def resolve(self, revision: str) -> _Commit | None:
        oid = self.branches.get(revision, revision)
        return self.commits.get(oid)


class HubError(Exception):
    """An HTTP error answer, with the headers the Hub sets and `huggingface_hub` turns into its own exceptions."""

    def __init__(
        self,
        status: int,
        message: str,
        error_code: str | None = None,
        headers: dict[str, str] | None = None,
        body: dict[str, Any] | None = None,
    ):
        super().__init__(message)
        self.status = status
        self.message = message
        self.error_code = error_code
        self.headers = headers or {}
        self.body = body or {}


class FakeHub:
    """
    An in-memory Hub served over HTTP on 127.0.0.1, on a free port.

    Args:
        tokens (`dict[str, str]`, *optional*):
            Valid tokens and the user each belongs to; defaults to `{"hf_test": "user"}`.
        organizations (`dict[str, list[str]]`, *optional*):
            Organization name to its members, who may write under it.

    Example:
        ```python
        with FakeHub() as hub:
            HfApi(endpoint=hub.url, token="hf_test").create_repo("user/m")
            ...
            assert hub.files("user/m")["config.json"] == expected
        ```
    """

    def __init__(self, tokens: dict[str, str] | None = None, organizations: dict[str, list[str]] | None = None):
        self.tokens = dict(DEFAULT_TOKENS if tokens is None else tokens)
        self.organizations = {name: list(members) for name, members in (organizations or {}).items()}
        self.requests: list[tuple[str, str]] = []
        self.unhandled: list[tuple[str, str]] = []
        self.server_errors: list[str] = []
        self._repos: dict[tuple[str, str], _Repo] = {}
        self._lock = threading.RLock()
        self._counter = itertools.count()
        self._server: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None

    # --- Lifecycle ----------------------------------------------------------------------------------------------------

    @property
    def url(self) -> str:
        """The endpoint to pass as `HfApi(endpoint=...)` or `HF_ENDPOINT`; the hub must be started."""
        if self._server is None:
            raise RuntimeError("FakeHub is not started; call start() or use it as a context manager.")
        host, port = self._server.server_address[:2]
        return f"http://{host}:{port}"

    def start(self) -> FakeHub:
        if self._server is not None:
            return self
        hub = self

        class Handler(_Handler):
            fake_hub = hub

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        self._thread = threading.Thread(
            # A short poll interval: `shutdown()` waits for one, and every test stops a hub.
            target=self._server.serve_forever,
            kwargs={"poll_interval": 0.05},
            name="fake-hub",
            daemon=True,
        )
        self._thread.start()
        return self

    def stop(self) -> None:
        if self._server is None:
            return
        self._server.shutdown()
        self._server.server_close()
        if self._thread is not None:
            self._thread.join(timeout=5)
        self._server = None
        self._thread = None

    def __enter__(self) -> FakeHub:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    # --- Inspection and set-up, for tests -----------------------------------------------------------------------------

    def files(self, repo_id: str, revision: str = "main", repo_type: str = "model") -> dict[str, bytes]:
        """The files of a repository at a branch or commit, path to content."""
        with self._lock:
            repo = self._repos.get((repo_type, repo_id))
            if repo is None:
                raise KeyError(f"No {repo_type} repository {repo_id!r} on the fake hub.")
            commit = repo.resolve(revision)
            if commit is None:
                raise KeyError(f"No revision {revision!r} in {repo_id!r}.")
            return dict(commit.files)

    def commit_messages(self, repo_id: str, revision: str = "main", repo_type: str = "model") -> list[str]:
        """Commit summaries from the newest back to the repository's creation."""
        with self._lock:
            repo = self._repos[(repo_type, repo_id)]
            commit = repo.resolve(revision)
            messages = []
            while commit is not None:
                messages.append(commit.message)
                commit = repo.commits.get(commit.parent) if commit.parent else None
            return messages

    def repo_exists(self, repo_id: str, repo_type: str = "model") -> bool:
        with self._lock:
            return (repo_type, repo_id) in self._repos

    def add_repo(
        self, repo_id: str, files: dict[str, bytes] | None = None, repo_type: str = "model", private: bool = False
    ) -> None:
        """Creates a repository directly, e.g. one under someone else's namespace, to test what a token cannot do."""
        with self._lock:
            repo = self._create(repo_type, repo_id, private)
            if files:
                self._commit(repo, "main", "Add files", dict(files), parent=None)

    # --- Patching the client libraries --------------------------------------------------------------------------------

    def patch(self, monkeypatch: pytest.MonkeyPatch, cache_dir: str | os.PathLike | None = None) -> None:
        """
        Points `huggingface_hub` and `transformers`, already imported, at this hub, for the duration of a test.

        - `huggingface_hub.constants.ENDPOINT` and `HUGGINGFACE_CO_URL_TEMPLATE`: read at import from `HF_ENDPOINT`,
          and used by `hf_hub_download`/`snapshot_download` (hence `from_pretrained`) and by every new `HfApi()`.
        - `huggingface_hub.hf_api.api.endpoint`: the instance behind the module-level `create_repo`, `upload_folder`...
        - `transformers.utils.hub._hf_api`: transformers caches one `HfApi` (with the endpoint of its creation time)
          for `Trainer.push_to_hub`, `push_to_hub` and `model_info`; reset so that it is rebuilt against this hub.
        - `constants.HF_HUB_OFFLINE = False`: the suite runs with `HF_HUB_OFFLINE=1`, which blocks every request.
        - `constants.HF_HUB_DISABLE_TELEMETRY = True`: otherwise the first request's user agent fetches an "agent
          harnesses" registry from the endpoint and caches it under `HF_HOME`.
        - `constants.HF_TOKEN_PATH`, `HF_TOKEN`, `HF_OIDC_RESOURCE`: no implicit token from the machine, so that a
          call without `token=` is really anonymous.
        - `constants.HF_HUB_CACHE` (when `cache_dir` is given): downloads land in the test's folder, not the user's.
        - Environment variables with the same values (`HF_ENDPOINT`, `HF_HUB_OFFLINE=0`, ...), for subprocesses such as
          `python run_clip.py ... --push_to_hub`, which read them at their own import.
        """
        from huggingface_hub import constants, hf_api

        url = self.url
        monkeypatch.setattr(constants, "ENDPOINT", url)
        monkeypatch.setattr(constants, "HUGGINGFACE_CO_URL_TEMPLATE", url + "/{repo_id}/resolve/{revision}/{filename}")
        monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
        monkeypatch.setattr(constants, "HF_HUB_DISABLE_TELEMETRY", True)
        monkeypatch.setattr(hf_api.api, "endpoint", url)
        # A path that does not exist: `huggingface_hub` then finds no saved login.
        no_token_file = Path(tempfile.gettempdir()) / f"fake-hub-{os.getpid()}-{id(self)}-no-token"
        monkeypatch.setattr(constants, "HF_TOKEN_PATH", str(no_token_file))
        try:
            import transformers.utils.hub as transformers_hub
        except ImportError:
            transformers_hub = None
        if transformers_hub is not None and hasattr(transformers_hub, "_hf_api"):
            monkeypatch.setattr(transformers_hub, "_hf_api", None)

        monkeypatch.setenv("HF_ENDPOINT", url)
        monkeypatch.setenv("HF_HUB_OFFLINE", "0")
        monkeypatch.setenv("TRANSFORMERS_OFFLINE", "0")
        monkeypatch.setenv("HF_HUB_DISABLE_TELEMETRY", "1")
        monkeypatch.setenv("HF_TOKEN_PATH", str(no_token_file))
        monkeypatch.setenv("NO_PROXY", "127.0.0.1,localhost")
        for name in ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "HF_OIDC_RESOURCE"):
            monkeypatch.delenv(name, raising=False)
        if cache_dir is not None:
            monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache_dir))
            monkeypatch.setenv("HF_HUB_CACHE", str(cache_dir))

    # --- Server-side logic (called from the handler threads) ----------------------------------------------------------

    def _user(self, headers: Any, required: bool) -> str | None:
        authorization = headers.get("Authorization") or ""
        if not authorization:
            if required:
                raise HubError(401, "Authentication required: pass a token with write access (Authorization: Bearer)")
            return None
        scheme, _, token = authorization.partition(" ")
        user = self.tokens.get(token.strip()) if scheme.lower() == "bearer" else None
        if user is None:
            # The Hub's own wording, which `huggingface_hub` recognises as a bad token rather than a missing repo.
            raise HubError(401, "Invalid credentials in Authorization header")
        return user

    def _can_write(self, user: str, namespace: str) -> bool:
        return namespace == user or user in self.organizations.get(namespace, [])

    def _check_write(self, user: str, repo_id: str, action: str) -> None:
        namespace = repo_id.split("/")[0]
        if not self._can_write(user, namespace):
            raise HubError(403, f"You don't have the rights to {action} under the namespace {namespace!r}")

    def _readable_repo(self, repo_type: str, repo_id: str, user: str | None) -> _Repo:
        repo = self._repos.get((repo_type, repo_id))
        if repo is None or (repo.private and (user is None or not self._can_write(user, repo_id.split("/")[0]))):
            raise HubError(404, f"Repository {repo_id} not found", "RepoNotFound")
        return repo

    def _commit_at(self, repo: _Repo, revision: str) -> _Commit:
        commit = repo.resolve(revision)
        if commit is None:
            raise HubError(404, f"Invalid rev id: {revision}", "RevisionNotFound")
        return commit

    def _create(self, repo_type: str, repo_id: str, private: bool) -> _Repo:
        now = datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.000Z")
        repo = _Repo(repo_type=repo_type, repo_id=repo_id, private=private, created_at=now)
        self._repos[(repo_type, repo_id)] = repo
        # The Hub's first commit adds a .gitattributes; an empty one keeps `files()` equal to what the test uploads.
        self._commit(repo, "main", "initial commit", {}, parent=None)
        return repo

    def _commit(self, repo: _Repo, branch: str, message: str, files: dict[str, bytes], parent: str | None) -> _Commit:
        digest = hashlib.sha1(f"{repo.repo_id}\0{branch}\0{message}\0{next(self._counter)}".encode())
        for path in sorted(files):
            digest.update(f"{path}\0{git_blob_sha1(files[path])}".encode())
        now = datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.000Z")
        commit = _Commit(oid=digest.hexdigest(), message=message, files=files, parent=parent, date=now)
        repo.commits[commit.oid] = commit
        repo.branches[branch] = commit.oid
        return commit

    def _repo_url(self, repo: _Repo) -> str:
        return f"{self.url}/{_URL_PREFIXES[repo.repo_type]}{repo.repo_id}"

    def _repo_info(self, repo: _Repo, commit: _Commit) -> dict[str, Any]:
        author = repo.repo_id.split("/")[0]
        return {
            "_id": hashlib.md5(repo.repo_id.encode()).hexdigest()[:24],
            "id": repo.repo_id,
            "modelId": repo.repo_id,
            "author": author,
            "sha": commit.oid,
            "lastModified": commit.date,
            "createdAt": repo.created_at,
            "private": repo.private,
            "gated": False,
            "disabled": False,
            "downloads": 0,
            "likes": 0,
            "tags": [],
            "siblings": [{"rfilename": path} for path in sorted(commit.files)],
        }

    def _tree(self, commit: _Commit, path: str, recursive: bool) -> list[dict[str, Any]]:
        base = path.strip("/")
        prefix = f"{base}/" if base else ""
        names = [name for name in sorted(commit.files) if name.startswith(prefix)]
        if base and not names:
            raise HubError(404, f"Folder {base} not found", "EntryNotFound")
        entries: dict[str, dict[str, Any]] = {}
        for name in names:
            parts = name[len(prefix) :].split("/")
            # Folders come before their content; a flat listing shows only the first level of folders.
            for depth in range(1, len(parts) if recursive else min(len(parts), 2)):
                folder = prefix + "/".join(parts[:depth])
                oid = hashlib.sha1(folder.encode()).hexdigest()
                entries.setdefault(folder, {"type": "directory", "oid": oid, "size": 0, "path": folder})
            if recursive or len(parts) == 1:
                content = commit.files[name]
                entries[name] = {"type": "file", "oid": git_blob_sha1(content), "size": len(content), "path": name}
        return list(entries.values())


class _Handler(BaseHTTPRequestHandler):
    """One request: parse the route, run it under the hub's lock, answer JSON or bytes."""

    fake_hub: FakeHub
    server_version = "FakeHub/1.0"
    # HTTP/1.0: one request per connection, so no keep-alive connection outlives `stop()` or confuses the client pool.
    protocol_version = "HTTP/1.0"

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - the base class's signature
        pass  # the test log is not the place for an access log; `FakeHub.requests` records the routes

    def do_GET(self) -> None:
        self._dispatch("GET")

    def do_HEAD(self) -> None:
        self._dispatch("HEAD")

    def do_POST(self) -> None:
        self._dispatch("POST")

    def do_DELETE(self) -> None:
        self._dispatch("DELETE")

    def do_PUT(self) -> None:
        self._dispatch("PUT")

    # --- Plumbing -----------------------------------------------------------------------------------------------------

    def _body(self) -> bytes:
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            chunks = []
            while True:
                size = int(self.rfile.readline().split(b";")[0].strip() or b"0", 16)
                if size == 0:
                    self.rfile.readline()
                    return b"".join(chunks)
                chunks.append(self.rfile.read(size))
                self.rfile.readline()
        length = int(self.headers.get("Content-Length") or 0)
        return self.rfile.read(length) if length else b""

    def _json_body(self) -> Any:
        body = self._body()
        try:
            return json.loads(body or b"{}")
        except json.JSONDecodeError as error:
            raise HubError(400, f"Request body is not JSON: {error}") from None

    def _send(self, status: int, body: bytes, headers: dict[str, str], method: str) -> None:
        self.send_response(status)
        for name, value in headers.items():
            self.send_header(name, value)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if method != "HEAD":
            self.wfile.write(body)

    def _send_json(self, method: str, payload: Any, status: int = 200, headers: dict[str, str] | None = None) -> None:
        body = json.dumps(payload).encode()
        self._send(status, body, {"Content-Type": "application/json", **(headers or {})}, method)

    def _dispatch(self, method: str) -> None:
        hub = self.fake_hub
        split = urlsplit(self.path)
        query = {key: values[-1] for key, values in parse_qs(split.query).items()}
        # Segments stay quoted until routed: a revision or a folder may be one segment holding an encoded "/".
        segments = [segment for segment in split.path.split("/") if segment]
        hub.requests.append((method, split.path))
        try:
            with hub._lock:
                handled = self._route(method, segments, query)
            if not handled:
                hub.unhandled.append((method, split.path))
                raise HubError(404, f"FakeHub does not implement {method} {split.path}")
        except HubError as error:
            headers = {"X-Error-Message": error.message, **error.headers}
            if error.error_code:
                headers["X-Error-Code"] = error.error_code
            self._send_json(method, {"error": error.message, **error.body}, status=error.status, headers=headers)
        except Exception as error:  # a bug in the fake: answer 500 with the reason, rather than hang the client
            hub.server_errors.append(traceback.format_exc())
            self._send_json(method, {"error": f"FakeHub error: {error!r}"}, status=500)

    # --- Routes -------------------------------------------------------------------------------------------------------

    def _route(self, method: str, segments: list[str], query: dict[str, str]) -> bool:
        if segments[:1] == ["api"]:
            return self._route_api(method, segments[1:], query)
        if len(segments) >= 4 and method in ("GET", "HEAD"):
            repo_type = "model"
            if segments[0] in ("datasets", "spaces"):
                repo_type = _REPO_TYPES[segments[0]]
                segments = segments[1:]
            if len(segments) >= 5 and segments[2] == "resolve":
                repo_id = f"{unquote(segments[0])}/{unquote(segments[1])}"
                revision = unquote(segments[3])
                path = unquote("/".join(segments[4:]))
                self._resolve(method, repo_type, repo_id, revision, path)
                return True
        return False

    def _route_api(self, method: str, segments: list[str], query: dict[str, str]) -> bool:
        hub = self.fake_hub
        if segments == ["whoami-v2"] and method == "GET":
            user = hub._user(self.headers, required=True)
            orgs = [
                {"name": org, "type": "org", "roleInOrg": "write"}
                for org, members in hub.organizations.items()
                if user in members
            ]
            self._send_json(
                method,
                {
                    "type": "user",
                    "id": user,
                    "name": user,
                    "fullname": user,
                    "orgs": orgs,
                    "auth": {"type": "access_token", "accessToken": {"displayName": "fake-hub", "role": "write"}},
                },
            )
            return True
        if segments == ["repos", "create"] and method == "POST":
            self._create_repo(method)
            return True
        if segments == ["repos", "delete"] and method in ("POST", "DELETE"):
            self._delete_repo(method)
            return True
        if segments == ["validate-yaml"] and method == "POST":
            self._validate_yaml(method)
            return True
        if len(segments) < 3 or segments[0] not in _REPO_TYPES:
            return False
        repo_type = _REPO_TYPES[segments[0]]
        repo_id = f"{unquote(segments[1])}/{unquote(segments[2])}"
        rest = segments[3:]
        if not rest and method == "GET":
            self._info(method, repo_type, repo_id, "main")
            return True
        if len(rest) == 2 and rest[0] == "revision" and method == "GET":
            self._info(method, repo_type, repo_id, unquote(rest[1]))
            return True
        if len(rest) >= 2 and rest[0] == "tree" and method == "GET":
            path = unquote("/".join(rest[2:]))
            self._list_tree(method, repo_type, repo_id, unquote(rest[1]), path, query)
            return True
        if len(rest) == 2 and rest[0] == "preupload" and method == "POST":
            self._preupload(method, repo_type, repo_id, unquote(rest[1]), query)
            return True
        if len(rest) == 2 and rest[0] == "commit" and method == "POST":
            self._create_commit(method, repo_type, repo_id, unquote(rest[1]), query)
            return True
        return False

    def _create_repo(self, method: str) -> None:
        hub = self.fake_hub
        user = hub._user(self.headers, required=True)
        payload = self._json_body()
        name = payload.get("name")
        if not name:
            raise HubError(400, "Missing repository name")
        namespace = payload.get("organization") or user
        repo_type = payload.get("type") or "model"
        repo_id = f"{namespace}/{name}"
        hub._check_write(user, repo_id, f"create a {repo_type}")
        existing = hub._repos.get((repo_type, repo_id))
        if existing is not None:
            # The Hub's 409 carries the repo's URL, which `create_repo(..., exist_ok=True)` returns.
            raise HubError(409, f"You already created this {repo_type} repo", body={"url": hub._repo_url(existing)})
        private = bool(payload.get("private")) or payload.get("visibility") == "private"
        repo = hub._create(repo_type, repo_id, private)
        self._send_json(method, {"url": hub._repo_url(repo), "name": repo_id, "id": repo_id})

    def _delete_repo(self, method: str) -> None:
        hub = self.fake_hub
        user = hub._user(self.headers, required=True)
        payload = self._json_body()
        repo_id = f"{payload.get('organization') or user}/{payload.get('name')}"
        repo_type = payload.get("type") or "model"
        hub._check_write(user, repo_id, f"delete a {repo_type}")
        if hub._repos.pop((repo_type, repo_id), None) is None:
            raise HubError(404, f"Repository {repo_id} not found", "RepoNotFound")
        self._send_json(method, {})

    def _validate_yaml(self, method: str) -> None:
        # The Hub validates the card's metadata before a commit touching README.md; here: "is it a YAML mapping".
        content = self._json_body().get("content", "")
        errors = []
        if content.startswith("---"):
            block = content.split("---", 2)[1] if content.count("---") >= 2 else ""
            try:
                data = yaml.safe_load(block)
                if data is not None and not isinstance(data, dict):
                    errors.append({"message": "metadata must be a YAML mapping"})
            except yaml.YAMLError as error:
                errors.append({"message": f"invalid YAML: {error}"})
        self._send_json(method, {"errors": errors, "warnings": []}, status=400 if errors else 200)

    def _info(self, method: str, repo_type: str, repo_id: str, revision: str) -> None:
        hub = self.fake_hub
        repo = hub._readable_repo(repo_type, repo_id, hub._user(self.headers, required=False))
        self._send_json(method, hub._repo_info(repo, hub._commit_at(repo, revision)))

    def _list_tree(self, method: str, repo_type: str, repo_id: str, revision: str, path: str, query: dict) -> None:
        hub = self.fake_hub
        repo = hub._readable_repo(repo_type, repo_id, hub._user(self.headers, required=False))
        commit = hub._commit_at(repo, revision)
        recursive = query.get("recursive", "false").lower() in ("1", "true")
        self._send_json(method, hub._tree(commit, path, recursive))

    def _writable_repo(self, repo_type: str, repo_id: str, action: str) -> _Repo:
        hub = self.fake_hub
        user = hub._user(self.headers, required=True)
        hub._check_write(user, repo_id, action)
        return hub._readable_repo(repo_type, repo_id, user)

    def _preupload(self, method: str, repo_type: str, repo_id: str, revision: str, query: dict) -> None:
        repo = self._writable_repo(repo_type, repo_id, "upload files")
        commit = repo.resolve(revision)
        payload = self._json_body()
        files = []
        for item in payload.get("files", []):
            path = item["path"]
            existing = commit.files.get(path) if commit is not None else None
            # "regular" for everything: the client then sends the content inline in the commit, no LFS/Xet upload.
            files.append(
                {
                    "path": path,
                    "uploadMode": "regular",
                    "shouldIgnore": False,
                    "oid": git_blob_sha1(existing) if existing is not None else None,
                }
            )
        self._send_json(method, {"files": files, "commitOid": commit.oid if commit else None})

    def _create_commit(self, method: str, repo_type: str, repo_id: str, revision: str, query: dict) -> None:
        hub = self.fake_hub
        repo = self._writable_repo(repo_type, repo_id, "push commits")
        lines = [json.loads(line) for line in self._body().splitlines() if line.strip()]
        header = next((line["value"] for line in lines if line.get("key") == "header"), {})
        create_pr = query.get("create_pr") in ("1", "true")
        base = repo.resolve(revision)
        if base is None:
            raise HubError(404, f"Invalid rev id: {revision}", "RevisionNotFound")
        parent_commit = header.get("parentCommit")
        if parent_commit and parent_commit != base.oid:
            raise HubError(412, f"A commit has happened since {parent_commit}; the head of {revision} is {base.oid}")

        files = dict(base.files)
        for line in lines:
            key, value = line.get("key"), line.get("value", {})
            if key == "file":
                if value.get("encoding", "base64") != "base64":
                    raise HubError(400, f"Unsupported encoding {value.get('encoding')!r} for {value.get('path')}")
                files[value["path"]] = base64.b64decode(value["content"])
            elif key == "deletedFile":
                if files.pop(value["path"], None) is None:
                    raise HubError(404, f"A file with this name doesn't exist: {value['path']}", "EntryNotFound")
            elif key == "deletedFolder":
                prefix = value["path"].rstrip("/") + "/"
                files = {name: content for name, content in files.items() if not name.startswith(prefix)}
            elif key == "lfsFile":
                raise HubError(400, f"FakeHub stores no LFS objects, yet {value.get('path')} was sent as LFS")
            elif key != "header":
                raise HubError(400, f"Unknown commit operation {key!r}")

        branch = revision
        pr_url = None
        if create_pr:
            number = 1 + sum(name.startswith("refs/pr/") for name in repo.branches)
            branch = f"refs/pr/{number}"
            pr_url = f"{hub._repo_url(repo)}/discussions/{number}"
        elif revision not in repo.branches:
            raise HubError(400, f"Cannot commit to {revision}: not a branch")
        commit = hub._commit(repo, branch, header.get("summary") or "", files, parent=base.oid)
        self._send_json(
            method,
            {
                "success": True,
                "commitOid": commit.oid,
                "commitUrl": f"{hub._repo_url(repo)}/commit/{commit.oid}",
                "pullRequestUrl": pr_url,
            },
        )

    def _resolve(self, method: str, repo_type: str, repo_id: str, revision: str, path: str) -> None:
        hub = self.fake_hub
        repo = hub._readable_repo(repo_type, repo_id, hub._user(self.headers, required=False))
        commit = hub._commit_at(repo, revision)
        content = commit.files.get(path)
        if content is None:
            # The commit id lets `hf_hub_download` cache the file's absence for this revision, as it does on the Hub.
            raise HubError(404, f"Entry {path} not found", "EntryNotFound", {"X-Repo-Commit": commit.oid})
        headers = {
            "Content-Type": "application/octet-stream",
            "ETag": f'"{git_blob_sha1(content)}"',
            "X-Repo-Commit": commit.oid,
            "Accept-Ranges": "bytes",
        }
        status = 200
        range_header = self.headers.get("Range", "")
        if range_header.startswith("bytes="):
            # `hf_hub_download` resumes an interrupted download with an open range, "bytes=N-".
            start_text, _, end_text = range_header[len("bytes=") :].partition("-")
            start = int(start_text or 0)
            end = int(end_text) if end_text else len(content) - 1
            headers["Content-Range"] = f"bytes {start}-{end}/{len(content)}"
            content = content[start : end + 1]
            status = HTTPStatus.PARTIAL_CONTENT
        self._send(status, content, headers, method)


@pytest.fixture
def fake_hub(monkeypatch: pytest.MonkeyPatch, tmp_path_factory: pytest.TempPathFactory) -> Iterator[FakeHub]:
    """A started `FakeHub` that `huggingface_hub` and `transformers` talk to for this test (see `FakeHub.patch`).

    Valid token: `"hf_test"`, user `"user"`. Downloads are cached in a fresh folder, so every test downloads anew.
    """
    with FakeHub() as hub:
        hub.patch(monkeypatch, cache_dir=tmp_path_factory.mktemp("hf_cache"))
        yield hub

"""A small in-memory stand-in for the Hugging Face Hub HTTP API, for push/pull tests without network.

Speaks just enough of the protocol huggingface_hub 2.4 uses for `create_repo`, `create_branch`, `upload_folder`
(YAML validation, pre-upload answered as "regular" for every file, NDJSON commit with base64 contents),
`model_info` / `list_repo_tree`, and `hf_hub_download` (HEAD/GET on /{repo}/resolve/{revision}/{path} with the
X-Repo-Commit / ETag / Content-Length headers, and X-Error-Code on 404s).

Write endpoints require `Authorization: Bearer <token>` with the token the server was started with; every request's
method, path and Authorization header are recorded in `server.requests` so a test can check what was sent.

    with FakeHub(token="hf_...") as hub:
        os.environ["HF_ENDPOINT"] = hub.url   # in the process that imports huggingface_hub
"""

from __future__ import annotations

import base64
import hashlib
import json
import re
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import unquote, urlsplit

import yaml

_API_REPO = re.compile(r"^/api/models/(?P<repo>[^/]+/[^/]+)(?:/(?P<action>preupload|commit|revision|tree|branch)"
                       r"/(?P<rest>.+))?$")
_RESOLVE = re.compile(r"^/(?P<repo>[^/]+/[^/]+)/resolve/(?P<rev>[^/]+)/(?P<path>.+)$")
_FRONT_MATTER = re.compile(r"\A\s*---\s*\n(.*?)\n---\s*\n", re.DOTALL)


def git_blob_oid(content: bytes) -> str:
    """The git object id of a file, which the Hub reports as `oid` / ETag for non-LFS files."""
    return hashlib.sha1(b"blob %d\0" % len(content) + content).hexdigest()


@dataclass
class Repo:
    private: bool
    commits: dict = field(default_factory=dict)  # commit sha -> {path: bytes}
    branches: dict = field(default_factory=dict)  # branch name -> commit sha

    def commit(self, branch: str, files: dict, message: str) -> str:
        parent = self.branches.get(branch, "")
        listing = "".join(f"{p}:{git_blob_oid(c)}\n" for p, c in sorted(files.items()))
        sha = hashlib.sha1(f"{parent}\n{message}\n{listing}{time.time_ns()}".encode()).hexdigest()
        self.commits[sha] = dict(files)
        self.branches[branch] = sha
        return sha

    def resolve(self, revision: str) -> str | None:
        if revision in self.branches:
            return self.branches[revision]
        return revision if revision in self.commits else None


class _Handler(BaseHTTPRequestHandler):
    server: "_Server"

    def log_message(self, format, *args):  # keep test output clean
        pass

    # --- plumbing -------------------------------------------------------------------------------------------
    def _body(self) -> bytes:
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            chunks = []
            while True:
                size = int(self.rfile.readline().strip(), 16)
                if size == 0:
                    self.rfile.readline()
                    return b"".join(chunks)
                chunks.append(self.rfile.read(size))
                self.rfile.readline()
        return self.rfile.read(int(self.headers.get("Content-Length") or 0))

    def _send(self, status: int, body: bytes = b"", headers: dict | None = None, content_type="application/json"):
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        for key, value in (headers or {}).items():
            self.send_header(key, value)
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def _json(self, status: int, obj, headers: dict | None = None):
        self._send(status, json.dumps(obj).encode(), headers)

    def _error(self, status: int, code: str | None, message: str, headers: dict | None = None):
        headers = dict(headers or {})
        if code:
            headers["X-Error-Code"] = code
        headers["X-Error-Message"] = message
        self._json(status, {"error": message}, headers)

    def _authorized(self) -> bool:
        return self.headers.get("Authorization") == f"Bearer {self.server.token}"

    def _require_auth(self) -> bool:
        if self._authorized():
            return True
        self._error(401, None, "Invalid credentials in Authorization header")
        return False

    def _record(self):
        path = urlsplit(self.path).path
        with self.server.lock:
            self.server.requests.append((self.command, path, self.headers.get("Authorization")))
        return path

    def _repo(self, repo_id: str):
        repo = self.server.repos.get(repo_id)
        if repo is None or (repo.private and not self._authorized()):
            self._error(404 if repo is None else 401, "RepoNotFound", "Repository not found")
            return None
        return repo

    # --- verbs ----------------------------------------------------------------------------------------------
    def do_POST(self):
        path = self._record()
        body = self._body()
        if path == "/api/validate-yaml":
            return self._validate_yaml(json.loads(body))
        if not self._require_auth():
            return
        if path == "/api/repos/create":
            return self._create_repo(json.loads(body))
        m = _API_REPO.match(path)
        if m and m["action"] in ("preupload", "commit", "branch"):
            repo = self._repo(m["repo"])
            if repo is None:
                return
            rest = unquote(m["rest"])
            with self.server.lock:
                if m["action"] == "preupload":
                    return self._preupload(repo, rest, json.loads(body))
                if m["action"] == "commit":
                    return self._commit(m["repo"], repo, rest, body)
                return self._create_branch(repo, rest, json.loads(body) if body else {})
        self._record_unhandled(path)

    def do_GET(self):
        path = self._record()
        m = _RESOLVE.match(path)
        if m:
            return self._resolve(m["repo"], unquote(m["rev"]), unquote(m["path"]))
        m = _API_REPO.match(path)
        if m and m["action"] in (None, "revision"):
            return self._model_info(m["repo"], unquote(m["rest"]) if m["rest"] else "main")
        if m and m["action"] == "tree":
            revision, _, prefix = m["rest"].partition("/")
            return self._tree(m["repo"], unquote(revision), unquote(prefix))
        self._record_unhandled(path)

    def do_HEAD(self):
        path = self._record()
        m = _RESOLVE.match(path)
        if m:
            return self._resolve(m["repo"], unquote(m["rev"]), unquote(m["path"]))
        self._record_unhandled(path)

    def _record_unhandled(self, path):
        with self.server.lock:
            self.server.unhandled.append((self.command, path))
        self._error(404, None, f"fake hub: no route for {self.command} {path}")

    # --- endpoints ------------------------------------------------------------------------------------------
    def _validate_yaml(self, payload):
        match = _FRONT_MATTER.match(payload.get("content", ""))
        try:
            data = yaml.safe_load(match.group(1)) if match else {}
        except yaml.YAMLError as err:
            return self._json(400, {"errors": [{"message": f"invalid YAML: {err}"}]})
        if data is not None and not isinstance(data, dict):
            return self._json(400, {"errors": [{"message": "metadata must be a mapping"}]})
        self._json(200, {"errors": [], "warnings": []})

    def _create_repo(self, payload):
        name, organization = payload["name"], payload.get("organization")
        repo_id = f"{organization or self.server.username}/{name}"
        with self.server.lock:
            self.server.create_payloads.append(payload)
            if repo_id in self.server.repos:
                return self._error(409, None, "You already created this model repo")
            repo = Repo(private=payload.get("visibility") == "private" or bool(payload.get("private")))
            repo.commit("main", {".gitattributes": b"*.safetensors filter=lfs diff=lfs merge=lfs -text\n"},
                        "initial commit")
            self.server.repos[repo_id] = repo
        self._json(200, {"url": f"{self.server.url}/{repo_id}", "name": repo_id, "id": repo_id})

    def _preupload(self, repo, revision, payload):
        sha = repo.resolve(revision)
        if sha is None:
            return self._error(404, "RevisionNotFound", f"Revision {revision} not found")
        current = repo.commits[sha]
        files = [{"path": f["path"], "uploadMode": "regular", "shouldIgnore": False,
                  "oid": git_blob_oid(current[f["path"]]) if f["path"] in current else None}
                 for f in payload["files"]]
        self._json(200, {"files": files, "commitOid": sha})

    def _commit(self, repo_id, repo, branch, body):
        if branch not in repo.branches:
            return self._error(404, "RevisionNotFound", f"Branch {branch} not found")
        files = dict(repo.commits[repo.branches[branch]])
        message = ""
        for line in body.splitlines():
            if not line.strip():
                continue
            item = json.loads(line)
            key, value = item["key"], item["value"]
            if key == "header":
                message = value["summary"]
            elif key == "file":
                if value.get("encoding") != "base64":
                    return self._error(400, None, "fake hub: only base64 file contents are supported")
                files[value["path"]] = base64.b64decode(value["content"])
            elif key == "deletedFile":
                files.pop(value["path"], None)
            else:  # lfsFile etc. never happen: pre-upload answers "regular" for everything
                return self._error(400, None, f"fake hub: unsupported commit entry {key!r}")
        sha = repo.commit(branch, files, message)
        self.server.commit_messages.append(message)
        self._json(200, {"commitUrl": f"{self.server.url}/{repo_id}/commit/{sha}", "commitOid": sha,
                         "success": True, "pullRequestUrl": None})

    def _create_branch(self, repo, branch, payload):
        if branch in repo.branches:
            return self._error(409, None, f"Branch {branch} already exists")
        source = repo.resolve(payload.get("startingPoint") or "main")
        repo.branches[branch] = source
        self._json(200, {})

    def _snapshot(self, repo_id, revision):
        repo = self._repo(repo_id)
        if repo is None:
            return None, None
        sha = repo.resolve(revision)
        if sha is None:
            self._error(404, "RevisionNotFound", f"Revision {revision} not found")
            return None, None
        return sha, repo.commits[sha]

    def _model_info(self, repo_id, revision):
        sha, files = self._snapshot(repo_id, revision)
        if sha is None:
            return
        self._json(200, {
            "_id": repo_id, "id": repo_id, "modelId": repo_id, "author": repo_id.split("/")[0], "sha": sha,
            "private": self.server.repos[repo_id].private, "disabled": False, "gated": False, "downloads": 0,
            "likes": 0, "tags": [], "library_name": "transformers", "lastModified": "2025-01-01T00:00:00.000Z",
            "createdAt": "2025-01-01T00:00:00.000Z",
            "siblings": [{"rfilename": path, "size": len(content)} for path, content in sorted(files.items())],
        })

    def _tree(self, repo_id, revision, prefix):
        sha, files = self._snapshot(repo_id, revision)
        if sha is None:
            return
        prefix = prefix.strip("/")
        entries = [{"type": "file", "oid": git_blob_oid(c), "size": len(c), "path": p}
                   for p, c in sorted(files.items()) if not prefix or p.startswith(prefix + "/") or p == prefix]
        self._json(200, entries)

    def _resolve(self, repo_id, revision, path):
        sha, files = self._snapshot(repo_id, revision)
        if sha is None:
            return
        if path not in files:
            return self._error(404, "EntryNotFound", f"{path} does not exist on {revision}", {"X-Repo-Commit": sha})
        content = files[path]
        oid = git_blob_oid(content)
        self._send(200, content, {"X-Repo-Commit": sha, "ETag": f'"{oid}"', "Accept-Ranges": "none"},
                   content_type="application/octet-stream")


class _Server(ThreadingHTTPServer):
    daemon_threads = True


class FakeHub:
    """Context manager running the fake Hub on 127.0.0.1 with a free port in a background thread."""

    def __init__(self, token: str, username: str = "tester"):
        self._server = _Server(("127.0.0.1", 0), _Handler)
        s = self._server
        s.token, s.username = token, username
        s.url = f"http://127.0.0.1:{s.server_address[1]}"
        s.lock = threading.Lock()
        s.repos, s.requests, s.unhandled, s.create_payloads, s.commit_messages = {}, [], [], [], []
        self._thread = threading.Thread(target=s.serve_forever, name="fake-hub", daemon=True)

    url = property(lambda self: self._server.url)
    repos = property(lambda self: self._server.repos)
    requests = property(lambda self: self._server.requests)  # [(method, path, Authorization header or None)]
    unhandled = property(lambda self: self._server.unhandled)
    create_payloads = property(lambda self: self._server.create_payloads)
    commit_messages = property(lambda self: self._server.commit_messages)

    def files(self, repo_id: str, revision: str = "main") -> dict:
        repo = self.repos[repo_id]
        return dict(repo.commits[repo.resolve(revision)])

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=5)

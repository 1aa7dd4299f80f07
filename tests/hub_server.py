"""A Hugging Face Hub stand-in on 127.0.0.1 that receives uploads AND serves repositories.

huggingface_hub (and through it ``datasets`` and ``transformers``) honours ``HF_ENDPOINT``. This server
answers the calls those libraries make, for model and dataset repositories:

* uploads: create repo, validate YAML, pre-upload (the upload mode of each file is negotiated as the real
  Hub does it: "lfs" for binary formats and large files, "regular" for small text), the LFS batch API and
  the PUT of each LFS object, commit (regular contents base64 in the payload, LFS files by oid; deletions);
* reads: repo info (``/api/{models|datasets}/{id}[/revision/{rev}]``), the tree listing (recursive or
  not), paths-info, and file download (``/{id}/resolve/{rev}/{path}``, ``/datasets/{id}/resolve/...``) with
  the headers huggingface_hub reads (X-Repo-Commit, ETag / X-Linked-Etag, Content-Length) and Range requests;
* no Xet: clients must run with ``HF_HUB_DISABLE_XET=1`` (huggingface_hub then uploads through LFS);
* gated repositories: every read needs an ``Authorization: Bearer`` token, as on the Hub after accepting a
  dataset's terms; without one the answer is 401 with ``X-Error-Code: GatedRepo``.

Repositories live on disk: ``{type}s/{org}/{name}`` under ``root/{type}s/{org}/{name}/`` (what a test reads
with ``files()``), one branch, ``main``. A revision is ``main`` or the commit id the server reports for the current
files (a hash of them; there is no history: an older commit id no longer resolves). ``commits`` records every commit received (operations and their upload modes), so a
test can check what a push did (e.g. that stale shards were deleted).
"""

from __future__ import annotations

import base64
import hashlib
import json
import shutil
import threading
import urllib.parse
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

# Formats the Hub's default .gitattributes stores with LFS; any file over 10 MB goes to LFS as well.
LFS_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".parquet", ".arrow", ".h5", ".msgpack", ".zip", ".gz", ".npy")
LFS_MIN_BYTES = 10 * 1024 * 1024
REPO_TYPES = {"models": "model", "datasets": "dataset", "spaces": "space"}


def _git_blob_sha(data: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


class HubHandler(BaseHTTPRequestHandler):
    hub: LocalHub
    protocol_version = "HTTP/1.1"

    def log_message(self, *args):  # keep test output quiet
        pass

    # ---- responses -------------------------------------------------------------------

    def _send(self, status: int, payload, headers: dict | None = None) -> None:
        body = json.dumps(payload).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        for key, value in (headers or {}).items():
            self.send_header(key, value)
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def _error(self, status: int, message: str, code: str | None = None) -> None:
        self._send(status, {"error": message}, {"X-Error-Code": code, "X-Error-Message": message} if code else None)

    def _body(self) -> bytes:
        return self.body

    def _authorized(self) -> bool:
        return self.headers.get("Authorization", "").startswith("Bearer ")

    # ---- routing ---------------------------------------------------------------------

    def do_HEAD(self):  # noqa: N802 (http.server naming)
        self._route("HEAD")

    def do_GET(self):  # noqa: N802
        self._route("GET")

    def do_POST(self):  # noqa: N802
        self._route("POST")

    def do_PUT(self):  # noqa: N802
        self._route("PUT")

    def _route(self, method: str) -> None:
        url = urllib.parse.urlsplit(self.path)
        parts = [urllib.parse.unquote(p) for p in url.path.strip("/").split("/")]
        query = urllib.parse.parse_qs(url.query)
        # Read the whole body first: an unread body would be parsed as the next request of the connection.
        self.body = self.rfile.read(int(self.headers.get("Content-Length", 0))) if method in ("POST", "PUT") else b""
        self.hub.requests.append((method, url.path))
        try:
            if parts[:2] == ["api", "agent-harnesses"]:  # a registry huggingface_hub reads once: an empty one
                return self._send(200, {"standardEnvVars": [], "harnesses": {}})
            if parts[:2] == ["api", "whoami-v2"] or parts[:2] == ["api", "whoami"]:
                return self._send(200, {"name": "tester", "type": "user", "orgs": [], "auth": {}})
            if method == "POST" and parts[:3] == ["api", "repos", "create"]:
                return self._create_repo(json.loads(self._body() or b"{}"))
            if method == "POST" and parts[:2] == ["api", "validate-yaml"]:
                return self._send(200, {})
            if method == "PUT" and parts[0] == "lfs-upload":
                self.hub.lfs_dir.mkdir(parents=True, exist_ok=True)
                (self.hub.lfs_dir / parts[1]).write_bytes(self._body())
                return self._send(200, {})
            if method == "POST" and len(parts) >= 6 and parts[-4:] == ["info", "lfs", "objects", "batch"][-4:]:
                return self._lfs_batch(parts)
            if parts[0] == "api" and len(parts) >= 4 and parts[1] in REPO_TYPES:
                return self._api(method, parts[1], f"{parts[2]}/{parts[3]}", parts[4:], query)
            if "resolve" in parts and method in ("GET", "HEAD"):
                return self._resolve(method, parts)
            self.hub.unhandled.append((method, self.path))
            return self._error(404, f"unhandled {method} {self.path}")
        except FileNotFoundError as err:
            return self._error(404, str(err), "EntryNotFound")

    # ---- uploads ---------------------------------------------------------------------

    def _create_repo(self, request: dict) -> None:
        name = request.get("name")
        org = request.get("organization") or "tester"
        repo_id = name if "/" in name else f"{org}/{name}"
        repo_type = (request.get("type") or "model") + "s"
        self.hub.repo_dir(repo_type, repo_id).mkdir(parents=True, exist_ok=True)
        if request.get("private"):
            self.hub.gated.add((repo_type, repo_id))
        return self._send(200, {"url": f"{self.hub.endpoint}/{repo_id}", "name": repo_id})

    def _lfs_batch(self, parts: list[str]) -> None:
        request = json.loads(self._body())
        objects = []
        for obj in request["objects"]:
            stored = self.hub.lfs_dir / obj["oid"]
            entry = {"oid": obj["oid"], "size": obj["size"], "authenticated": True}
            if not stored.is_file():
                entry["actions"] = {"upload": {"href": f"{self.hub.endpoint}/lfs-upload/{obj['oid']}"}}
            objects.append(entry)
        body = json.dumps({"transfer": "basic", "objects": objects}).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/vnd.git-lfs+json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def _api(self, method: str, repo_type: str, repo_id: str, rest: list[str], query: dict) -> None:
        action = rest[0] if rest else ""
        if method == "POST" and action == "preupload":
            files = json.loads(self._body())["files"]
            modes = [
                {"path": f["path"], "uploadMode": self.hub.upload_mode(f["path"], f["size"]), "shouldIgnore": False}
                for f in files
            ]
            return self._send(200, {"files": modes})
        if method == "POST" and action == "commit":
            return self._commit(repo_type, repo_id, "/".join(rest[1:]) or "main", self._body())
        if not self.hub.repo_dir(repo_type, repo_id).is_dir():
            return self._error(404, f"Repository {repo_id} not found", "RepoNotFound")
        if (repo_type, repo_id) in self.hub.gated and not self._authorized():
            return self._error(
                401, f"Access to {repo_id} is restricted: accept its conditions and log in.", "GatedRepo"
            )
        if method in ("GET", "HEAD") and action in ("", "revision"):
            revision = urllib.parse.unquote("/".join(rest[1:])) if action == "revision" else "main"
            return self._info(repo_type, repo_id, revision)
        if method == "GET" and action == "tree":
            revision, path = rest[1], "/".join(rest[2:])
            recursive = query.get("recursive", ["false"])[0].lower() in ("true", "1")
            return self._tree(repo_type, repo_id, revision, path, recursive)
        if method == "POST" and action == "paths-info":
            form = urllib.parse.parse_qs(self._body().decode())
            paths = form.get("paths", [])
            if not paths and self.headers.get("Content-Type", "").startswith("application/json"):
                paths = json.loads(self._body() or b"{}").get("paths", [])
            return self._paths_info(repo_type, repo_id, rest[1], paths)
        self.hub.unhandled.append((method, self.path))
        return self._error(404, f"unhandled {method} {self.path}")

    def _commit(self, repo_type: str, repo_id: str, revision: str, body: bytes) -> None:
        _, target = self.hub.resolve_revision(repo_type, repo_id, urllib.parse.unquote(revision))
        if target is None or not target.is_dir():
            return self._error(404, f"Revision {revision} not found", "RevisionNotFound")
        operations = []
        for line in body.decode().splitlines():
            if not line.strip():
                continue
            op = json.loads(line)
            key, value = op.get("key"), op.get("value", {})
            if key == "file":
                path = target / value["path"]
                path.parent.mkdir(parents=True, exist_ok=True)
                path.write_bytes(base64.b64decode(value["content"]))
                operations.append(("add", value["path"], "regular"))
            elif key == "lfsFile":
                stored = self.hub.lfs_dir / value["oid"]
                if not stored.is_file():
                    return self._error(422, f"LFS object {value['oid']} of {value['path']} was never uploaded")
                path = target / value["path"]
                path.parent.mkdir(parents=True, exist_ok=True)
                shutil.copyfile(stored, path)
                operations.append(("add", value["path"], "lfs"))
            elif key in ("deletedFile", "deletedFolder"):
                gone = target / value["path"]
                if gone.is_dir():
                    shutil.rmtree(gone)
                else:
                    gone.unlink(missing_ok=True)
                operations.append(("delete", value["path"], None))
        self.hub.commits.append(
            {"repo_type": repo_type, "repo_id": repo_id, "revision": revision, "operations": operations}
        )
        oid = self.hub.commit_of(repo_type, repo_id, revision)
        return self._send(
            200, {"commitUrl": f"{self.hub.endpoint}/{repo_id}/commit/{oid}", "commitOid": oid, "pullRequestUrl": None}
        )

    # ---- reads -----------------------------------------------------------------------

    def _entry(self, base: Path, file: Path) -> dict:
        relative = file.relative_to(base).as_posix()
        if file.is_dir():
            return {
                "type": "directory",
                "oid": hashlib.sha1(relative.encode()).hexdigest(),
                "size": 0,
                "path": relative,
            }
        data = file.read_bytes()
        entry = {"type": "file", "oid": _git_blob_sha(data), "size": len(data), "path": relative}
        if self.hub.upload_mode(relative, len(data)) == "lfs":
            entry["lfs"] = {"oid": hashlib.sha256(data).hexdigest(), "size": len(data), "pointerSize": 134}
        return entry

    def _info(self, repo_type: str, repo_id: str, revision: str) -> None:
        branch, base = self.hub.resolve_revision(repo_type, repo_id, revision)
        if base is None:
            return self._error(404, f"Revision {revision} not found in {repo_id}", "RevisionNotFound")
        files = sorted(p for p in base.rglob("*") if p.is_file())
        siblings = [{"rfilename": p.relative_to(base).as_posix(), "size": p.stat().st_size} for p in files]
        gated = (repo_type, repo_id) in self.hub.gated
        return self._send(
            200,
            {
                "id": repo_id,
                "_id": hashlib.sha1(repo_id.encode()).hexdigest()[:24],
                "sha": self.hub.commit_of(repo_type, repo_id, branch),
                "private": False,
                "gated": "auto" if gated else False,
                "disabled": False,
                "downloads": 0,
                "likes": 0,
                "tags": [],
                "siblings": siblings,
                "lastModified": "2026-01-01T00:00:00.000Z",
            },
        )

    def _tree(self, repo_type: str, repo_id: str, revision: str, path: str, recursive: bool) -> None:
        _, base = self.hub.resolve_revision(repo_type, repo_id, urllib.parse.unquote(revision))
        if base is None:
            return self._error(404, f"Revision {revision} not found in {repo_id}", "RevisionNotFound")
        folder = base / path
        if not folder.is_dir():
            return self._error(404, f"{path} not found in {repo_id}", "EntryNotFound")
        children = sorted(folder.rglob("*") if recursive else folder.iterdir())
        return self._send(200, [self._entry(base, child) for child in children])

    def _paths_info(self, repo_type: str, repo_id: str, revision: str, paths: list[str]) -> None:
        _, base = self.hub.resolve_revision(repo_type, repo_id, urllib.parse.unquote(revision))
        if base is None:
            return self._error(404, f"Revision {revision} not found in {repo_id}", "RevisionNotFound")
        return self._send(200, [self._entry(base, base / p) for p in paths if (base / p).exists()])

    def _resolve(self, method: str, parts: list[str]) -> None:
        at = parts.index("resolve")
        repo_type = "datasets" if parts[0] == "datasets" else "spaces" if parts[0] == "spaces" else "models"
        owner_name = parts[1:at] if repo_type != "models" else parts[:at]
        repo_id = "/".join(owner_name)
        revision, path = urllib.parse.unquote(parts[at + 1]), "/".join(parts[at + 2 :])
        if not self.hub.repo_dir(repo_type, repo_id).is_dir():
            return self._error(404, f"Repository {repo_id} not found", "RepoNotFound")
        if (repo_type, repo_id) in self.hub.gated and not self._authorized():
            return self._error(
                401, f"Access to {repo_id} is restricted: accept its conditions and log in.", "GatedRepo"
            )
        branch, base = self.hub.resolve_revision(repo_type, repo_id, revision)
        if base is None:
            return self._error(404, f"Revision {revision} not found in {repo_id}", "RevisionNotFound")
        file = base / path
        if not file.is_file():
            return self._error(404, f"{path} not found in {repo_id}@{revision}", "EntryNotFound")
        data = file.read_bytes()
        entry = self._entry(base, file)
        etag = entry["lfs"]["oid"] if "lfs" in entry else entry["oid"]
        status, start, end = 200, 0, len(data)
        requested = self.headers.get("Range", "")
        if requested.startswith("bytes="):
            first, _, last = requested[len("bytes=") :].partition("-")
            if first == "":  # suffix range: the last N bytes
                start = max(0, len(data) - int(last))
            else:
                start, end = int(first), min(len(data), int(last) + 1) if last else len(data)
            status = 206
        self.send_response(status)
        self.send_header("Content-Type", "application/octet-stream")
        self.send_header("Content-Length", str(end - start))
        self.send_header("ETag", f'"{etag}"')
        self.send_header("X-Repo-Commit", self.hub.commit_of(repo_type, repo_id, branch))
        self.send_header("Accept-Ranges", "bytes")
        if status == 206:
            self.send_header("Content-Range", f"bytes {start}-{end - 1}/{len(data)}")
        if "lfs" in entry:
            self.send_header("X-Linked-Etag", f'"{etag}"')
            self.send_header("X-Linked-Size", str(len(data)))
        self.end_headers()
        if method == "GET":
            self.wfile.write(data[start:end])


class LocalHub:
    """Run the stand-in Hub in a thread: ``with LocalHub(tmp_path) as hub: ... hub.endpoint``."""

    def __init__(self, root: Path):
        self.root = Path(root)
        self.lfs_dir = self.root / ".lfs"
        self.gated: set[tuple[str, str]] = set()
        self.commits: list[dict] = []
        self.requests: list[tuple[str, str]] = []
        self.unhandled: list[tuple[str, str]] = []  # calls this stand-in does not know: a test should see none
        handler = type("BoundHubHandler", (HubHandler,), {"hub": self})
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
        self.endpoint = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self) -> LocalHub:
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.server.shutdown()
        self.server.server_close()

    # ---- storage ---------------------------------------------------------------------

    @staticmethod
    def upload_mode(path: str, size: int) -> str:
        return "lfs" if path.lower().endswith(LFS_SUFFIXES) or size >= LFS_MIN_BYTES else "regular"

    def repo_dir(self, repo_type: str, repo_id: str) -> Path:
        return self.root / repo_type / repo_id

    def commit_of(self, repo_type: str, repo_id: str, branch: str = "main") -> str:
        """A commit id for the repository's current files (changes whenever a file changes)."""
        base = self.repo_dir(repo_type, repo_id)
        digest = hashlib.sha1(f"{repo_type}/{repo_id}@{branch}".encode())
        for file in sorted(p for p in base.rglob("*") if p.is_file()):
            digest.update(file.relative_to(base).as_posix().encode() + b"\0" + file.read_bytes())
        return digest.hexdigest()

    def resolve_revision(self, repo_type: str, repo_id: str, revision: str | None) -> tuple[str, Path | None]:
        """("main", folder) of ``main`` or of the commit id the server reported; (revision, None) otherwise."""
        revision = revision or "main"
        if revision in ("main", "refs/heads/main") or revision == self.commit_of(repo_type, repo_id):
            return "main", self.repo_dir(repo_type, repo_id)
        return revision, None

    # ---- what tests use --------------------------------------------------------------

    def files(self, repo_id: str, repo_type: str = "models") -> list[str]:
        base = self.repo_dir(repo_type, repo_id)
        return sorted(str(p.relative_to(base)) for p in base.rglob("*") if p.is_file())

    def add_files(self, repo_id: str, files: dict[str, bytes | str | Path], repo_type: str = "models") -> None:
        """Serve these files (path in repo -> content or a local file) from a repository, as if pushed."""
        self.repo_dir(repo_type, repo_id).mkdir(parents=True, exist_ok=True)
        base = self.repo_dir(repo_type, repo_id)
        for path_in_repo, content in files.items():
            target = base / path_in_repo
            target.parent.mkdir(parents=True, exist_ok=True)
            if isinstance(content, Path):
                shutil.copyfile(content, target)
            else:
                target.write_bytes(content.encode() if isinstance(content, str) else content)

    def gate(self, repo_id: str, repo_type: str = "datasets") -> None:
        """Make a repository gated: reads need a token (as after accepting its terms on the Hub)."""
        self.gated.add((repo_type, repo_id))

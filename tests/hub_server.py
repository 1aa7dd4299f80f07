"""A minimal Hugging Face Hub stand-in on 127.0.0.1, for testing push_to_hub end to end.

huggingface_hub honours ``HF_ENDPOINT``. This server answers the calls an upload makes
(create repo, validate YAML, pre-upload, commit) and writes every committed file under
``root/<repo_type>s/<repo_id>/<path>``, so a test can check exactly what was pushed.
Every file is declared "regular" at pre-upload, so contents arrive base64-encoded inside the
commit payload and no LFS or Xet storage is needed.
"""

from __future__ import annotations

import base64
import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path


class HubHandler(BaseHTTPRequestHandler):
    root: Path

    def log_message(self, *args):  # keep test output quiet
        pass

    def _send(self, status: int, payload) -> None:
        body = json.dumps(payload).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def _body(self) -> bytes:
        return self.rfile.read(int(self.headers.get("Content-Length", 0)))

    def do_GET(self):  # noqa: N802 (http.server naming)
        if self.path.startswith("/api/whoami"):
            return self._send(200, {"name": "tester", "type": "user", "orgs": [], "auth": {}})
        return self._send(404, {"error": "not found"})

    def do_POST(self):  # noqa: N802
        body = self._body()
        parts = self.path.split("?")[0].strip("/").split("/")
        if self.path.startswith("/api/repos/create"):
            request = json.loads(body or b"{}")
            name = request.get("name")
            org = request.get("organization") or "tester"
            repo_id = name if "/" in name else f"{org}/{name}"
            return self._send(200, {"url": f"http://127.0.0.1/{repo_id}", "name": repo_id})
        if self.path.startswith("/api/validate-yaml"):
            return self._send(200, {})
        # /api/{models|datasets|spaces}/{owner}/{name}/{preupload|commit}/{revision}
        if len(parts) >= 6 and parts[0] == "api" and parts[4] in ("preupload", "commit"):
            repo_type, repo_id, action = parts[1], f"{parts[2]}/{parts[3]}", parts[4]
            if action == "preupload":
                files = json.loads(body)["files"]
                return self._send(
                    200,
                    {"files": [{"path": f["path"], "uploadMode": "regular", "shouldIgnore": False} for f in files]},
                )
            target = self.root / repo_type / repo_id
            for line in body.decode().splitlines():
                if not line.strip():
                    continue
                op = json.loads(line)
                if op.get("key") == "file":
                    path = target / op["value"]["path"]
                    path.parent.mkdir(parents=True, exist_ok=True)
                    path.write_bytes(base64.b64decode(op["value"]["content"]))
                elif op.get("key") == "deletedFile":
                    (target / op["value"]["path"]).unlink(missing_ok=True)
            return self._send(
                200,
                {"commitUrl": f"http://127.0.0.1/{repo_id}/commit/0", "commitOid": "0" * 40, "pullRequestUrl": None},
            )
        return self._send(404, {"error": f"unhandled {self.path}"})


class LocalHub:
    """Run the stand-in Hub in a thread: ``with LocalHub(tmp_path) as hub: ... hub.endpoint``."""

    def __init__(self, root: Path):
        self.root = Path(root)
        handler = type("BoundHubHandler", (HubHandler,), {"root": self.root})
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
        self.endpoint = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self) -> LocalHub:
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.server.shutdown()
        self.server.server_close()

    def files(self, repo_id: str, repo_type: str = "models") -> list[str]:
        base = self.root / repo_type / repo_id
        return sorted(str(p.relative_to(base)) for p in base.rglob("*") if p.is_file())

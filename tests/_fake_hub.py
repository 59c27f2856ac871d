"""A fake Hugging Face Hub on localhost: the endpoints huggingface_hub's downloads call, served from folders.

`GET /api/models/{repo}/revision/{rev}` (model_info, with sizes), `GET /api/models/{repo}/tree/{rev}`
(list_repo_tree, used by snapshot_download), `HEAD`/`GET /{repo}/resolve/{rev}/{path}` (hf_hub_download).
A repository marked gated answers its file requests with a given status (401 with the hub's
`X-Error-Code: GatedRepo`, or 403), as the real hub does before a user has accepted its terms.
"""

from __future__ import annotations

import hashlib
import json
import re
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import unquote, urlsplit

API = re.compile(r"^/api/models/([^/]+/[^/]+)/(revision|tree)/([^/]+)(/.*)?$")
RESOLVE = re.compile(r"^/([^/]+/[^/]+)/resolve/([^/]+)/(.+)$")


class FakeHub:
    """Serve `repos` (repo id -> folder) at `url`; record every request as (method, path)."""

    def __init__(self) -> None:
        self.repos: dict[str, Path] = {}
        self.gated: dict[str, int] = {}  # repo id -> status its files answer with
        self.requests: list[tuple[str, str]] = []
        hub = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args) -> None:  # keep the test output clean
                pass

            def do_HEAD(self) -> None:
                hub._answer(self, body=False)

            def do_GET(self) -> None:
                hub._answer(self, body=True)

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self) -> FakeHub:
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.server.shutdown()
        self.server.server_close()

    def add(self, repo_id: str, folder: Path, gated: int | None = None) -> None:
        self.repos[repo_id] = folder
        if gated is not None:
            self.gated[repo_id] = gated

    def sha(self, repo_id: str) -> str:
        """A stable 40-hex commit for a repository (from its file names and sizes)."""
        listing = "".join(f"{p}:{n}" for p, n in sorted(self.files(repo_id).items()))
        return hashlib.sha1(f"{repo_id}\n{listing}".encode()).hexdigest()

    def files(self, repo_id: str) -> dict[str, int]:
        root = self.repos[repo_id]
        return {p.relative_to(root).as_posix(): p.stat().st_size for p in sorted(root.rglob("*")) if p.is_file()}

    def _answer(self, req: BaseHTTPRequestHandler, body: bool) -> None:
        path = unquote(urlsplit(req.path).path)
        self.requests.append((req.command, path))
        api, resolve = API.match(path), RESOLVE.match(path)
        repo_id = (api or resolve).group(1) if (api or resolve) else None
        if repo_id not in self.repos:
            return self._send(req, 404, b'{"error": "Repository not found"}', {"X-Error-Code": "RepoNotFound"}, body)
        sha, files = self.sha(repo_id), self.files(repo_id)
        if api and api.group(2) == "revision":
            doc = {"id": repo_id, "modelId": repo_id, "sha": sha, "private": False,
                   "siblings": [{"rfilename": p, "size": n} for p, n in files.items()]}
            return self._send(req, 200, json.dumps(doc).encode(), {"Content-Type": "application/json"}, body)
        if api:
            doc = [{"type": "file", "path": p, "size": n, "oid": hashlib.sha1(p.encode()).hexdigest()} for p, n in files.items()]
            return self._send(req, 200, json.dumps(doc).encode(), {"Content-Type": "application/json"}, body)
        if repo_id in self.gated:
            status = self.gated[repo_id]
            extra = {"X-Error-Code": "GatedRepo", "X-Error-Message": "Access to this model is restricted"} if status == 401 else {}
            return self._send(req, status, b'{"error": "restricted"}', {**extra, "X-Repo-Commit": sha}, body)
        name = resolve.group(3)
        if name not in files:
            return self._send(req, 404, b'{"error": "Entry not found"}', {"X-Error-Code": "EntryNotFound", "X-Repo-Commit": sha}, body)
        data = (self.repos[repo_id] / name).read_bytes()
        headers = {"X-Repo-Commit": sha, "ETag": f'"{hashlib.sha256(data).hexdigest()}"', "Content-Type": "application/octet-stream"}
        return self._send(req, 200, data, headers, body)

    @staticmethod
    def _send(req: BaseHTTPRequestHandler, status: int, data: bytes, headers: dict, body: bool) -> None:
        req.send_response(status)
        for key, value in headers.items():
            req.send_header(key, value)
        req.send_header("Content-Length", str(len(data)))
        req.end_headers()
        if body:
            req.wfile.write(data)

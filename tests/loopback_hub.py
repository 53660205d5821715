"""A Hugging Face Hub on 127.0.0.1 that serves repos from local folders, takes pushes, logs every
request and fails on purpose where a test asks.

It answers what `huggingface_hub` and `datasets` ask a real Hub when they download, stream and
upload, in the Hub's formats: repo info (with a revision), tree listings, paths-info, `resolve`
with HEAD, ETag, X-Repo-Commit and HTTP range requests (206), whoami, repo creation, preupload
and commits (files inline, as `huggingface_hub` sends small files). A repo's revision is a hash of
its files, so it changes when a push changes them.

Why not an existing server: olah 0.5.4 (a self-hosted Hub mirror) serves local git repos offline
and handles `datasets.load_dataset` downloads, but it answers a range request for a mirrored file
with the whole file and status 200, so streaming reads a wrong parquet footer; it cannot take
pushes; and it brings about twenty packages (FastAPI, uvicorn, GitPython, peewee...). Tests also
need faults on the wire that no mirror offers. This file is the part of the Hub our tests use.
"""

from __future__ import annotations

import base64
import email.utils
import hashlib
import http.server
import json
import threading
import time
import urllib.parse
from dataclasses import dataclass
from pathlib import Path

REPO_TYPES = {"datasets": "dataset", "models": "model"}


@dataclass
class Fault:
    """Fail the next ``times`` requests whose path contains ``match`` (and whose method is ``method``):
    ``status`` answers that HTTP status; ``drop_after`` sends the headers and that many bytes of the
    body, then closes the connection."""

    match: str
    status: int | None = None
    drop_after: int | None = None
    times: int = 1
    method: str = "GET"
    active: bool = True  # a test can arm a fault later, once the run it watches has got somewhere


class LoopbackHub:
    def __init__(self, root: Path):
        self.root = root
        self.requests: list[tuple[str, str, int]] = []  # (method, path, status)
        self.faults: list[Fault] = []
        self.valid_tokens: set[str] | None = None  # None: any token (or none) is accepted
        self.gone = False  # every request answers 503, as a Hub outage does
        self.validated_cards: list[dict] = []  # the metadata of every model card the server checked
        self.lock = threading.Lock()
        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _handler(self))
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()

    # ----- repos -----
    def repo_path(self, repo_type: str, repo_id: str) -> Path:
        return self.root / repo_type / repo_id

    def files(self, repo_type: str, repo_id: str) -> dict[str, Path]:
        folder = self.repo_path(repo_type, repo_id)
        return {p.relative_to(folder).as_posix(): p for p in sorted(folder.rglob("*")) if p.is_file()}

    def revision(self, repo_type: str, repo_id: str) -> str:
        digest = hashlib.sha1()
        for name, path in self.files(repo_type, repo_id).items():
            digest.update(name.encode() + b"\0" + _git_oid(path.read_bytes()).encode())
        return digest.hexdigest()

    def requested(self, fragment: str, method: str = "GET") -> list[str]:
        """Paths of answered requests of ``method`` containing ``fragment``."""
        with self.lock:
            return [p for m, p, _ in self.requests if m == method and fragment in p]

    def take_fault(self, method: str, path: str) -> Fault | None:
        with self.lock:
            for fault in self.faults:
                if fault.active and fault.times > 0 and fault.method == method and fault.match in path:
                    fault.times -= 1
                    return fault
        return None


def _git_oid(data: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


def _entry(path: str, file: Path | None) -> dict:
    if file is None:
        return {"type": "directory", "oid": hashlib.sha1(path.encode()).hexdigest(), "size": 0, "path": path}
    data = file.read_bytes()
    return {"type": "file", "oid": _git_oid(data), "size": len(data), "path": path}


def _card_data(readme: Path | None) -> dict | None:
    import yaml

    if readme is None:
        return None
    text = readme.read_text()
    if not text.startswith("---"):
        return None
    return yaml.safe_load(text.split("---")[1])


def _handler(hub: LoopbackHub):
    class Handler(http.server.BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *args):
            pass

        # ----- plumbing -----
        def _send(self, status: int, body: bytes = b"", headers: dict | None = None, content_type: str = "application/json") -> None:
            with hub.lock:
                hub.requests.append((self.command, self.path, status))
            self.send_response(status)
            self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(len(body)))
            for key, value in (headers or {}).items():
                self.send_header(key, value)
            self.end_headers()
            if self.command != "HEAD":
                self.wfile.write(body)

        def _json(self, status: int, payload) -> None:
            self._send(status, json.dumps(payload).encode())

        def _error(self, status: int, message: str) -> None:
            self._send(status, json.dumps({"error": message}).encode(), {"X-Error-Message": message})

        def _route(self) -> None:
            if hub.gone:
                return self._error(503, "Service Unavailable")
            token = self.headers.get("Authorization", "").removeprefix("Bearer ")
            if hub.valid_tokens is not None and token and token not in hub.valid_tokens:
                return self._error(401, "Invalid credentials in Authorization header")
            fault = hub.take_fault(self.command, self.path)
            if fault is not None and fault.status is not None:
                return self._error(fault.status, "an injected fault")
            url = urllib.parse.urlsplit(self.path)
            parts = [urllib.parse.unquote(p) for p in url.path.strip("/").split("/")]
            if parts[:2] == ["api", "whoami-v2"]:
                return self._json(200, {"type": "user", "name": "local-user", "auth": {"accessToken": {"role": "write"}}})
            if parts[0] == "api" and len(parts) >= 4 and parts[1] in REPO_TYPES:
                return self._api(parts[1], f"{parts[2]}/{parts[3]}", parts[4:], urllib.parse.parse_qs(url.query))
            repo_type = "datasets" if parts[0] == "datasets" else "models"
            parts = parts[1:] if parts[0] == "datasets" else parts
            if len(parts) >= 4 and parts[2] == "resolve":
                return self._resolve(repo_type, f"{parts[0]}/{parts[1]}", "/".join(parts[4:]), fault)
            return self._error(404, f"not implemented by the loopback Hub: {self.command} {url.path}")

        # ----- reading -----
        def _api(self, repo_type: str, repo_id: str, rest: list[str], query: dict) -> None:
            if not hub.repo_path(repo_type, repo_id).is_dir():
                return self._error(404, "Repository not found")
            files = hub.files(repo_type, repo_id)
            sha = hub.revision(repo_type, repo_id)
            if not rest or rest[0] == "revision":
                return self._json(200, {
                    "_id": sha[:24], "id": repo_id, "sha": sha, "private": False, "gated": False, "disabled": False, "tags": [],
                    "lastModified": "2026-12-01T00:00:00.000Z", "createdAt": "2026-12-01T00:00:00.000Z", "downloads": 0, "likes": 0,
                    "siblings": [{"rfilename": name} for name in files], "cardData": _card_data(files.get("README.md")),
                })
            if rest[0] == "tree":
                prefix = "/".join(rest[2:]).strip("/")
                recursive = query.get("recursive", ["false"])[0].lower() == "true"
                return self._json(200, _listing(files, prefix, recursive))
            if rest[0] == "paths-info" and self.command == "POST":
                form = urllib.parse.parse_qs(self._body().decode())
                paths = form.get("paths", [])
                directories = {"/".join(name.split("/")[:i]) for name in files for i in range(1, name.count("/") + 1)}
                return self._json(200, [_entry(p, files.get(p)) for p in paths if p in files or p in directories])
            return self._error(404, f"not implemented by the loopback Hub: {'/'.join(rest)}")

        def _resolve(self, repo_type: str, repo_id: str, name: str, fault: Fault | None) -> None:
            files = hub.files(repo_type, repo_id) if hub.repo_path(repo_type, repo_id).is_dir() else {}
            if name not in files:
                return self._send(404, b"Entry not found", {"X-Error-Code": "EntryNotFound", "X-Error-Message": "Entry not found"})
            data = files[name].read_bytes()
            headers = {"ETag": f'"{_git_oid(data)}"', "X-Repo-Commit": hub.revision(repo_type, repo_id), "Accept-Ranges": "bytes",
                       "Last-Modified": email.utils.formatdate(usegmt=True)}
            status, body = 200, data
            wanted = self.headers.get("Range")
            if wanted and wanted.startswith("bytes="):
                start_text, _, end_text = wanted[len("bytes="):].partition("-")
                if start_text == "":  # the last N bytes, as a parquet footer is read
                    start, end = max(0, len(data) - int(end_text)), len(data) - 1
                else:
                    start, end = int(start_text), min(int(end_text) if end_text else len(data) - 1, len(data) - 1)
                if start >= len(data):
                    return self._send(416, b"", {"Content-Range": f"bytes */{len(data)}"})
                status, body = 206, data[start : end + 1]
                headers["Content-Range"] = f"bytes {start}-{end}/{len(data)}"
            if fault is not None and fault.drop_after is not None and self.command == "GET":
                return self._drop(status, body, headers, fault.drop_after)
            self._send(status, body, headers, "application/octet-stream")

        def _drop(self, status: int, body: bytes, headers: dict, after: int) -> None:
            """Promise the whole body, send part of it, and cut the connection."""
            with hub.lock:
                hub.requests.append((self.command, self.path, -1))
            self.send_response(status)
            self.send_header("Content-Length", str(len(body)))
            for key, value in headers.items():
                self.send_header(key, value)
            self.end_headers()
            self.wfile.write(body[:after])
            self.wfile.flush()
            time.sleep(0.05)
            self.close_connection = True
            self.connection.shutdown(2)

        # ----- writing -----
        def _body(self) -> bytes:
            return self.rfile.read(int(self.headers.get("Content-Length", 0)))

        def do_POST(self):
            if hub.gone or (hub.valid_tokens is not None and self.headers.get("Authorization", "").removeprefix("Bearer ") not in hub.valid_tokens):
                self._body()
                return self._route()
            parts = urllib.parse.urlsplit(self.path).path.strip("/").split("/")
            if parts == ["api", "repos", "create"]:
                payload = json.loads(self._body())
                repo_type = {"dataset": "datasets"}.get(payload.get("type"), "models")
                repo_id = f"{payload.get('organization') or 'local-user'}/{payload['name']}"
                hub.repo_path(repo_type, repo_id).mkdir(parents=True, exist_ok=True)
                return self._json(200, {"url": f"{hub.url}/{repo_id}", "name": repo_id})
            if parts == ["api", "validate-yaml"]:  # the Hub checks a card's metadata before a commit that holds it
                problems, metadata = _check_card(json.loads(self._body()).get("content", ""))
                if problems:
                    return self._json(400, {"error": "; ".join(problems), "errors": [{"message": m} for m in problems]})
                with hub.lock:
                    hub.validated_cards.append(metadata)
                return self._json(200, {"warnings": []})
            if len(parts) == 6 and parts[0] == "api" and parts[1] in REPO_TYPES and parts[4] == "preupload":
                files = json.loads(self._body())["files"]
                return self._json(200, {"files": [{"path": f["path"], "uploadMode": "regular", "shouldIgnore": False} for f in files]})
            if len(parts) == 6 and parts[0] == "api" and parts[1] in REPO_TYPES and parts[4] == "commit":
                fault = hub.take_fault("POST", self.path)
                body = self._body()
                if fault is not None and fault.status is not None:
                    return self._error(fault.status, "an injected fault")
                folder = hub.repo_path(parts[1], f"{parts[2]}/{parts[3]}")
                for line in (json.loads(x) for x in body.decode().splitlines() if x.strip()):
                    if line["key"] == "file":
                        target = folder / line["value"]["path"]
                        target.parent.mkdir(parents=True, exist_ok=True)
                        target.write_bytes(base64.b64decode(line["value"]["content"]))
                    elif line["key"] == "deletedFile":
                        (folder / line["value"]["path"]).unlink(missing_ok=True)
                sha = hub.revision(parts[1], f"{parts[2]}/{parts[3]}")
                return self._json(200, {"commitUrl": f"{hub.url}/{parts[2]}/{parts[3]}/commit/{sha}", "commitOid": sha})
            self._body()
            self._route()

        do_GET = _route
        do_HEAD = _route

    return Handler


def _check_card(content: str) -> tuple[list[str], dict | None]:
    """The Hub's checks of a card's YAML that matter here: it parses, and a model-index is a list of
    {name, results: [{task: {type}, dataset: {type, name}, metrics: [{type, value}]}]}."""
    import yaml

    if not content.startswith("---"):
        return [], None
    try:
        metadata = yaml.safe_load(content.split("---")[1]) or {}
    except yaml.YAMLError as e:
        return [f"invalid YAML: {e}"], None
    problems = []
    for index, model in enumerate(metadata.get("model-index") or []):
        if not model.get("name"):
            problems.append(f"model-index[{index}] has no name")
        for result in model.get("results") or []:
            if not (result.get("task") or {}).get("type"):
                problems.append("a model-index result has no task.type")
            dataset = result.get("dataset") or {}
            if not (dataset.get("type") and dataset.get("name")):
                problems.append("a model-index result's dataset needs a type and a name")
            for metric in result.get("metrics") or []:
                if not metric.get("type") or not isinstance(metric.get("value"), (int, float)):
                    problems.append(f"a model-index metric needs a type and a numeric value, got {metric}")
    return problems, metadata


def _listing(files: dict[str, Path], prefix: str, recursive: bool) -> list[dict]:
    """The tree under ``prefix``: its files and folders, one level deep unless ``recursive``."""
    base = f"{prefix}/" if prefix else ""
    entries, seen = [], set()
    for name, path in files.items():
        if not name.startswith(base):
            continue
        rest = name[len(base):].split("/")
        for depth in range(1, len(rest)):
            folder = base + "/".join(rest[:depth])
            if folder not in seen and (recursive or depth == 1):
                seen.add(folder)
                entries.append(_entry(folder, None))
        if recursive or len(rest) == 1:
            entries.append(_entry(name, path))
    return entries

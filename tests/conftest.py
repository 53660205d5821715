"""Shared helpers: run the real command line in a subprocess, and small local datasets."""

from __future__ import annotations

import http.server
import os
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import PIL.Image
import pytest

from .forked_cli import run_command

REPO = Path(__file__).resolve().parents[1]

if os.environ.get("PYTEST_XDIST_WORKER"):
    # Under `pytest -n 2` two workers share the cores: one thread each for the tests that train in
    # process (set before torch is imported), as the subprocesses already run with (cli_env).
    os.environ["OMP_NUM_THREADS"] = "1"

# Flags that keep a test run small: few steps, no tracker, checkpoints only where a test asks.
FAST = ["--max_train_steps", "4", "--train_batch_size", "8", "--logging_steps", "2", "--save_images_steps", "0",
        "--checkpointing_steps", "0", "--report_to", "none", "--eval_batch_size", "4", "--num_inference_steps", "2"]


def cli_env(**overrides: str) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_HUB_OFFLINE", "HF_ENDPOINT", "ACCELERATE_", "LOCAL_RANK", "WORLD_SIZE", "RANK"))}
    env.update(PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false")
    env.update(overrides)
    return env


def run_train(args: list[str], timeout: float = 300, **env: str) -> subprocess.CompletedProcess:
    """Run `python train_ddpm.py ARGS` from the repository root, as a user would (forked_cli says how)."""
    return run_command(["train_ddpm.py", *args], cli_env(**env), REPO, timeout)


def run_module(module: str, *args: str, timeout: float = 600, cwd: Path = REPO, **env: str) -> subprocess.CompletedProcess:
    """Run `python -m MODULE ARGS` (or `python SCRIPT ARGS` for a path ending in .py) as a user would."""
    command = [module, *args] if module.endswith(".py") else ["-m", module, *args]
    return run_command(command, cli_env(**env), cwd, timeout)


def _variable_pointing_at(variable: str, folder):
    """Point ``variable`` at ``folder`` for the session (subprocesses inherit it), then restore it."""
    previous = os.environ.get(variable)
    os.environ[variable] = str(folder)
    yield folder
    if previous is None:
        os.environ.pop(variable, None)
    else:
        os.environ[variable] = previous


@pytest.fixture(scope="session", autouse=True)
def isolated_hf_home(tmp_path_factory):
    """Keep the Hugging Face caches of the tests away from the user's."""
    yield from _variable_pointing_at("HF_HOME", tmp_path_factory.mktemp("hf_home"))


@pytest.fixture(scope="session", autouse=True)
def shared_evaluation_cache(tmp_path_factory):
    """One DDPM_HF_CACHE for the whole test run, shared by pytest-xdist's workers: the digit
    classifier of the offline digits is trained once, by the first process that needs it (the
    cache's file lock makes the others wait for it), and reused by the rest."""
    root = tmp_path_factory.getbasetemp()
    if os.environ.get("PYTEST_XDIST_WORKER"):  # basetemp is pytest-N/popen-gwK: its parent is the run's, shared
        root = root.parent
    folder = root / "ddpm_hf_cache"
    folder.mkdir(exist_ok=True)
    yield from _variable_pointing_at("DDPM_HF_CACHE", folder)


# The classifier that Evaluator.build trains on all 5,000 offline digits with seed 0, in the shared cache.
OFFLINE_DIGITS_CLASSIFIER = "classifiers/mnist-5k-offline-train-28px-seed0.safetensors"


@pytest.fixture
def rgb_image_folder(tmp_path) -> Path:
    """Twelve 40x30 RGB PNGs in two class folders (datasets' imagefolder layout)."""
    rng = np.random.default_rng(0)
    for label in ("cats", "dogs"):
        (tmp_path / "images" / label).mkdir(parents=True)
        for i in range(6):
            pixels = rng.integers(0, 256, size=(30, 40, 3), dtype=np.uint8)
            PIL.Image.fromarray(pixels).save(tmp_path / "images" / label / f"{i}.png")
    return tmp_path / "images"


@pytest.fixture
def loopback_hub():
    """Start HTTP servers on 127.0.0.1 that answer every GET with (status, body); yields a starter
    returning the server's URL, to point HF_ENDPOINT at. Stopped after the test."""
    servers = []

    def start(status: int, body: bytes) -> str:
        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self):
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args):
                pass

        server = http.server.HTTPServer(("127.0.0.1", 0), Handler)
        threading.Thread(target=server.serve_forever, daemon=True).start()
        servers.append(server)
        return f"http://127.0.0.1:{server.server_address[1]}"

    yield start
    for server in servers:
        server.shutdown()


class RecordingHub:
    """What a loopback stand-in for the Hub was asked to do: repos created and files committed."""

    def __init__(self):
        self.created: list[dict] = []
        self.commits: list[dict] = []  # {"repo", "summary", "files": {path: bytes}}
        self.authorizations: set[str] = set()
        self.unknown: list[str] = []
        self.validated_cards: list = []
        self.lock = threading.Lock()


@pytest.fixture
def recording_hub():
    """A loopback HTTP server answering the calls `huggingface_hub` makes to create a repo and
    commit files (preupload says "regular" for every file, so contents arrive inline, base64, in
    the commit's NDJSON). Yields (endpoint URL, RecordingHub); set ``refuse_create`` on the record
    to answer 401 to repo creation."""
    import base64
    import json

    record = RecordingHub()
    record.refuse_create = False

    class Handler(http.server.BaseHTTPRequestHandler):
        def _reply(self, status: int, payload: dict) -> None:
            body = json.dumps(payload).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def do_POST(self):
            body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
            with record.lock:
                record.authorizations.add(self.headers.get("Authorization", ""))
            endpoint = f"http://127.0.0.1:{self.server.server_address[1]}"
            if self.path == "/api/repos/create":
                if record.refuse_create:
                    return self._reply(401, {"error": "Invalid credentials in Authorization header"})
                payload = json.loads(body)
                with record.lock:
                    record.created.append(payload)
                repo = f"{payload.get('organization') or 'local-user'}/{payload['name']}"
                return self._reply(200, {"url": f"{endpoint}/{repo}", "name": repo})
            if self.path == "/api/validate-yaml":  # the model card's front matter must parse, as the Hub checks
                import yaml

                content = json.loads(body)["content"]
                try:
                    metadata = yaml.safe_load(content.split("---")[1]) if content.startswith("---") else None
                except yaml.YAMLError as e:
                    return self._reply(400, {"errors": [{"message": str(e)}]})
                with record.lock:
                    record.validated_cards.append(metadata)
                return self._reply(200, {"warnings": []})
            parts = self.path.split("/")  # /api/models/<ns>/<name>/(preupload|commit)/<revision>
            if len(parts) == 7 and parts[1:3] == ["api", "models"] and parts[5] == "preupload":
                files = json.loads(body)["files"]
                return self._reply(200, {"files": [{"path": f["path"], "uploadMode": "regular", "shouldIgnore": False} for f in files]})
            if len(parts) == 7 and parts[1:3] == ["api", "models"] and parts[5] == "commit":
                lines = [json.loads(line) for line in body.decode().splitlines() if line.strip()]
                header = next(line["value"] for line in lines if line["key"] == "header")
                files = {line["value"]["path"]: base64.b64decode(line["value"]["content"]) for line in lines if line["key"] == "file"}
                with record.lock:
                    record.commits.append({"repo": f"{parts[3]}/{parts[4]}", "summary": header.get("summary"), "files": files})
                oid = f"{len(record.commits):040x}"
                return self._reply(200, {"commitUrl": f"{endpoint}/{parts[3]}/{parts[4]}/commit/{oid}", "commitOid": oid})
            with record.lock:
                record.unknown.append(f"POST {self.path}")
            self._reply(404, {"error": "not implemented by the loopback Hub"})

        def do_GET(self):
            with record.lock:
                record.unknown.append(f"GET {self.path}")
            self._reply(404, {"error": "not implemented by the loopback Hub"})

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}", record
    server.shutdown()

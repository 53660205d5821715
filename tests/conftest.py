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

REPO = Path(__file__).resolve().parents[1]

# Flags that keep a test run small: few steps, no tracker, checkpoints only where a test asks.
FAST = ["--max_train_steps", "4", "--train_batch_size", "8", "--logging_steps", "2", "--save_images_steps", "0",
        "--checkpointing_steps", "0", "--report_to", "none", "--eval_batch_size", "4", "--num_inference_steps", "2"]


def cli_env(**overrides: str) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_HUB_OFFLINE", "HF_ENDPOINT", "ACCELERATE_", "LOCAL_RANK", "WORLD_SIZE", "RANK"))}
    env.update(PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false")
    env.update(overrides)
    return env


def run_train(args: list[str], timeout: float = 300, **env: str) -> subprocess.CompletedProcess:
    """Run `python train_ddpm.py ARGS` from the repository root, as a user would."""
    return subprocess.run([sys.executable, "train_ddpm.py", *args], cwd=REPO, env=cli_env(**env),
                          capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="session", autouse=True)
def isolated_hf_home(tmp_path_factory):
    """Keep the Hugging Face caches of the tests away from the user's."""
    home = tmp_path_factory.mktemp("hf_home")
    previous = os.environ.get("HF_HOME")
    os.environ["HF_HOME"] = str(home)
    yield home
    if previous is None:
        os.environ.pop("HF_HOME", None)
    else:
        os.environ["HF_HOME"] = previous


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

"""The forked command runner of the tests gives what a fresh interpreter gives."""

import subprocess
import sys

from .conftest import REPO, cli_env, run_module
from .forked_cli import _key, _zygotes


def test_a_forked_command_matches_a_fresh_interpreter(tmp_path):
    args = ["ddpm_hf.sample", str(tmp_path / "no-model"), "--grid", str(tmp_path / "g.png")]
    forked = [run_module(*args) for _ in range(2)]  # the second one is forked from the environment's zygote at the latest
    assert _key(cli_env()) in _zygotes
    fresh = subprocess.run([sys.executable, "-m", *args], cwd=REPO, env=cli_env(), capture_output=True, text=True, timeout=300)
    for result in forked:
        assert (result.returncode, result.stdout, result.stderr) == (fresh.returncode, fresh.stdout, fresh.stderr)
    assert fresh.returncode == 2 and fresh.stderr.startswith("error: ") and "is not a folder" in fresh.stderr

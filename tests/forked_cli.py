"""Run the package's commands as separate processes, forked from one that has already imported the stack.

Why: every `python train_ddpm.py ...` spends about 8 s of CPU importing torch, diffusers, accelerate,
datasets and transformers before it reads its first flag, and the suite runs about a hundred
commands on a 2-core machine: the imports alone were a third of the suite's time. A "zygote"
process imports them once and forks a child per command. The child is still a separate process
with its own pid, memory, working folder, environment, exit status and stdout/stderr, running the
same entry point (`train_ddpm.py` as `__main__`, or `python -m MODULE`) a user runs, so the tests
keep testing the command line, not a function.

Some variables are read when a library is imported (HF_ENDPOINT, HF_HOME, HF_HUB_OFFLINE, ...): a
zygote started with one value of them cannot serve a command that needs another. So each zygote
serves one environment, apart from the variables in `READ_AT_RUN_TIME`; a command whose
environment gets one the second time it is asked for (at most `MAX_ZYGOTES` per test process);
otherwise the command runs as a plain subprocess. Tests that need the process itself (signals, resource limits, `accelerate launch`)
call `subprocess` directly.
"""

from __future__ import annotations

import atexit
import contextlib
import io
import json
import os
import queue
import runpy
import signal
import subprocess
import sys
import tempfile
import threading
import traceback
import warnings
from pathlib import Path

# The heavy imports every command makes; a zygote imports them once.
PRELOAD = ["torch", "diffusers", "accelerate", "datasets", "transformers", "matplotlib.pyplot",
           "ddpm_hf.training", "ddpm_hf.generation", "ddpm_hf.scoring"]

# Variables the package and its libraries read when a command runs, not when they are imported.
READ_AT_RUN_TIME = {"ACCELERATE_DYNAMO_BACKEND", "OMP_NUM_THREADS", "PYTHONUNBUFFERED", "TOKENIZERS_PARALLELISM", "DDPM_HF_CACHE", "DDPM_HF_FAULT_NONFINITE_STEPS",
                    "TORCH_HOME", "PYTEST_CURRENT_TEST", "HF_TOKEN"}
MAX_ZYGOTES = 4  # each holds about 0.5 GB

_zygotes: dict[tuple, "Zygote"] = {}
_seen: set[tuple] = set()


def _key(environment: dict) -> tuple:
    return tuple(sorted((k, v) for k, v in environment.items() if k not in READ_AT_RUN_TIME))


class Zygote:
    """A process that has imported PRELOAD and forks one child per request (see `serve`)."""

    def __init__(self, environment: dict):
        self.process = subprocess.Popen([sys.executable, "-c", "import tests.forked_cli as f; f.serve()"], cwd=Path(__file__).parents[1],
                                        env=environment, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        self.replies: queue.Queue = queue.Queue()
        threading.Thread(target=self._read_replies, daemon=True).start()
        atexit.register(self.process.kill)

    def _read_replies(self) -> None:
        for line in self.process.stdout:
            self.replies.put(json.loads(line))
        self.replies.put(None)  # the zygote is gone

    def _reply(self, timeout: float | None) -> dict:
        reply = self.replies.get(timeout=timeout)
        if reply is None:
            raise RuntimeError("the zygote process of the tests exited")
        return reply

    def run(self, command: list[str], cwd: Path, environment: dict, timeout: float) -> subprocess.CompletedProcess:
        with tempfile.TemporaryDirectory() as folder:
            out, err = os.path.join(folder, "stdout"), os.path.join(folder, "stderr")
            request = {"command": command, "cwd": str(cwd), "environment": environment, "stdout": out, "stderr": err}
            self.process.stdin.write(json.dumps(request) + "\n")
            self.process.stdin.flush()
            pid = self._reply(60)["pid"]
            try:
                status = self._reply(timeout)["status"]
            except queue.Empty:
                os.kill(pid, signal.SIGKILL)
                self._reply(60)
                raise subprocess.TimeoutExpired([sys.executable, *command], timeout) from None
            return subprocess.CompletedProcess([sys.executable, *command], status, Path(out).read_text(errors="replace"),
                                               Path(err).read_text(errors="replace"))


def serve() -> None:
    """The zygote's loop: import once, then for each request line fork a child that becomes the command."""
    import importlib

    for name in PRELOAD:
        importlib.import_module(name)
    replies = sys.stdout
    for line in sys.stdin:
        request = json.loads(line)
        pid = os.fork()
        if pid == 0:
            _child(request["command"], request["cwd"], request["environment"], request["stdout"], request["stderr"])
        replies.write(json.dumps({"pid": pid}) + "\n")
        replies.flush()
        _, status = os.waitpid(pid, 0)
        replies.write(json.dumps({"status": os.waitstatus_to_exitcode(status)}) + "\n")
        replies.flush()


def _child(command: list[str], cwd: str, environment: dict, stdout_path: str, stderr_path: str) -> None:
    """In the forked process: become `python COMMAND` in `cwd`, then exit with its status."""
    for fd, path in ((1, stdout_path), (2, stderr_path)):
        target = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
        os.dup2(target, fd)
        os.close(target)
    stdin = os.open(os.devnull, os.O_RDONLY)  # not the zygote's request pipe
    os.dup2(stdin, 0)
    os.close(stdin)
    # Fresh, unbuffered streams on the redirected descriptors, as PYTHONUNBUFFERED=1 gives a subprocess.
    sys.stdout, sys.stderr = (io.TextIOWrapper(io.FileIO(fd, "w", closefd=False), line_buffering=True, write_through=True) for fd in (1, 2))
    sys.stdin = open(os.devnull)
    os.chdir(cwd)
    os.environ.clear()
    os.environ.update(environment)
    status = 0
    try:
        if command[0] == "-m":
            sys.argv = [command[1], *command[2:]]
            sys.path[0] = cwd  # `python -m` puts the working folder first
            with warnings.catch_warnings():
                # runpy warns when the module was preloaded; `python -m` imports it fresh, silently.
                warnings.filterwarnings("ignore", message=".*found in sys.modules", category=RuntimeWarning)
                runpy.run_module(command[1], run_name="__main__", alter_sys=True)
        else:
            script = str(Path(cwd, command[0]))
            sys.argv = [command[0], *command[1:]]
            sys.path[0] = str(Path(script).parent)  # `python SCRIPT` puts the script's folder first
            runpy.run_path(script, run_name="__main__")
    except SystemExit as e:  # the interpreter's rules for the exit status
        if e.code is None:
            status = 0
        elif isinstance(e.code, int):
            status = e.code
        else:
            print(e.code, file=sys.stderr)
            status = 1
    except BaseException:
        traceback.print_exc()
        status = 1
    with contextlib.suppress(BaseException):
        atexit._run_exitfuncs()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(status)


def run_command(command: list[str], environment: dict, cwd: Path, timeout: float) -> subprocess.CompletedProcess:
    """`python COMMAND` (COMMAND is `SCRIPT ARGS` or `-m MODULE ARGS`) in `cwd`, forked from the zygote
    of its environment when there is one, else a subprocess. An environment gets a zygote the second
    time it is asked for: a one-off (a test pointing HF_ENDPOINT at a server that only answers 404)
    costs the same as a subprocess either way, and would hold a zygote's memory for nothing."""
    key = _key(environment)
    zygote = _zygotes.get(key)
    if zygote is None and key in _seen and len(_zygotes) < MAX_ZYGOTES:
        zygote = _zygotes[key] = Zygote(environment)
    _seen.add(key)
    if zygote is None:
        return subprocess.run([sys.executable, *command], cwd=cwd, env=environment, capture_output=True, text=True, timeout=timeout)
    return zygote.run(command, cwd, environment, timeout)

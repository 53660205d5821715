"""Run the package's commands as separate processes, forked from one that has already imported the stack.

Why: every `python train_ddpm.py ...` spends about 8 s of CPU importing torch, diffusers, accelerate,
datasets and transformers before it reads its first flag, and the suite runs some eighty commands on
a 2-core machine: the imports alone were a third of the suite's time. Python's own
`multiprocessing` forkserver imports them once (per xdist worker) and forks a child per command.
The child is still a separate process with its own memory, working folder, environment, exit
status and stdout/stderr, running the same entry point (`train_ddpm.py` as `__main__`, or
`python -m MODULE`) a user runs, so the tests keep testing the command line, not a function.

A command runs as a plain subprocess instead when the fork could differ from a fresh interpreter:
its environment changes a variable that a library reads at import time (HF_ENDPOINT,
HF_HUB_OFFLINE, ...: anything outside `READ_AT_RUN_TIME`), or the test needs the process itself
(signals, resource limits, `accelerate launch`): those tests call `subprocess` directly.
"""

from __future__ import annotations

import atexit
import contextlib
import io
import multiprocessing
import os
import runpy
import subprocess
import sys
import tempfile
import traceback
import warnings
from pathlib import Path

# The heavy imports every command makes; the server imports them once.
PRELOAD = ["torch", "diffusers", "accelerate", "datasets", "transformers", "matplotlib.pyplot",
           "ddpm_hf.training", "ddpm_hf.generation", "ddpm_hf.scoring"]

# Variables the package and its libraries read when a command runs, not when they are imported.
READ_AT_RUN_TIME = {"OMP_NUM_THREADS", "PYTHONUNBUFFERED", "TOKENIZERS_PARALLELISM", "DDPM_HF_CACHE", "DDPM_HF_FAULT_NONFINITE_STEPS",
                    "TORCH_HOME", "PYTEST_CURRENT_TEST"}

_server: dict = {}  # {"context": forkserver context, "environment": the environment it was started with}


def _start_server(environment: dict) -> None:
    context = multiprocessing.get_context("forkserver")
    context.set_forkserver_preload(PRELOAD)
    saved = dict(os.environ)
    os.environ.clear()
    os.environ.update(environment)  # the server (and so every child) starts from this environment
    try:
        from multiprocessing import forkserver

        forkserver.ensure_running()
    finally:
        os.environ.clear()
        os.environ.update(saved)
    _server.update(context=context, environment=dict(environment))


def _can_fork(environment: dict) -> bool:
    if not _server:
        return False
    base = _server["environment"]
    changed = {k for k in base.keys() | environment.keys() if base.get(k) != environment.get(k)}
    if os.environ.get("DDPM_HF_TEST_FORK_REPORT") and changed - READ_AT_RUN_TIME:
        print(f"forked_cli: a subprocess, because of {sorted(changed - READ_AT_RUN_TIME)}", file=sys.stderr)
    return changed <= READ_AT_RUN_TIME


def _child(command: list[str], cwd: str, environment: dict, stdout_path: str, stderr_path: str) -> None:
    """In the forked process: become `python COMMAND` in `cwd`, then exit with its status."""
    for fd, path in ((1, stdout_path), (2, stderr_path)):
        target = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
        os.dup2(target, fd)
        os.close(target)
    # Fresh, unbuffered streams on the redirected descriptors, as PYTHONUNBUFFERED=1 gives a subprocess.
    sys.stdout, sys.stderr = (io.TextIOWrapper(io.FileIO(fd, "w", closefd=False), line_buffering=True, write_through=True) for fd in (1, 2))
    sys.stdin = open(os.devnull)
    os.chdir(cwd)
    os.environ.clear()
    os.environ.update(environment)
    # multiprocessing marks a forked child as a non-main process; a command is a main process.
    multiprocessing.current_process().name = "MainProcess"
    multiprocessing.process._parent_process = None
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
    """`python COMMAND` (COMMAND is `SCRIPT ARGS` or `-m MODULE ARGS`) in `cwd`, forked when that is
    equivalent to a fresh interpreter, else a subprocess. Output is captured as text."""
    if not _server:
        _start_server(environment)
    if not _can_fork(environment):
        return subprocess.run([sys.executable, *command], cwd=cwd, env=environment, capture_output=True, text=True, timeout=timeout)
    with tempfile.TemporaryDirectory() as folder:
        out, err = os.path.join(folder, "stdout"), os.path.join(folder, "stderr")
        process = _server["context"].Process(target=_child, args=(command, str(cwd), environment, out, err))
        process.start()
        process.join(timeout)
        if process.exitcode is None:
            process.kill()
            process.join()
            raise subprocess.TimeoutExpired([sys.executable, *command], timeout)
        return subprocess.CompletedProcess([sys.executable, *command], process.exitcode,
                                           Path(out).read_text(errors="replace"), Path(err).read_text(errors="replace"))

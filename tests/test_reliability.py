"""Surviving interruptions and faults: signals, SIGKILL at random moments, damaged checkpoints,
non-finite losses, a full disk. Each runs the real command line."""

import importlib.util
import json
import resource
import shutil
import signal
import subprocess
import sys
import time

import pytest
from safetensors.torch import load_file

from ddpm_hf.checkpoints import checkpoint_problem, read_training_state

from .conftest import FAST, REPO, cli_env, run_train

spec = importlib.util.spec_from_file_location("kill_soak", REPO / "scripts" / "kill_soak.py")
kill_soak = importlib.util.module_from_spec(spec)
spec.loader.exec_module(kill_soak)

STEPS = 24


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    out = tmp_path_factory.mktemp("reference") / "run"
    result = kill_soak.run_to_completion(str(out), STEPS)
    assert result.returncode == 0, result.stderr[-3000:]
    return out


def _same_final_weights(a, b) -> bool:
    return kill_soak.max_weight_difference(str(a), str(b)) == 0.0


def test_sigkill_at_random_moments_then_resume_ends_with_identical_weights(uninterrupted, tmp_path):
    out = tmp_path / "killed"
    # Kills within 1.5 s of the loop starting: the 24 steps take longer than that, so each lands mid-run.
    outcome = kill_soak.run_with_kills(str(out), STEPS, kills=3, seed=0, max_delay=1.5, log=lambda line: None)
    assert outcome["ok"], outcome.get("error")
    assert outcome["killed"] >= 2
    assert _same_final_weights(uninterrupted, out)  # bitwise on the CPU


# SIGINT (Ctrl-C) through the same path: tests/test_user_reports.py, where the command is rerun as it was typed.
@pytest.mark.parametrize("signum", [signal.SIGTERM])
def test_a_signal_finishes_the_step_writes_a_checkpoint_and_says_how_to_resume(uninterrupted, tmp_path, signum):
    out = tmp_path / "signalled"
    process = subprocess.Popen(kill_soak.training_command(str(out), STEPS), cwd=REPO, env=cli_env(), stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    while not (out / "metrics.jsonl").is_file() and time.monotonic() < deadline and process.poll() is None:
        time.sleep(0.05)
    process.send_signal(signum)
    stdout, stderr = process.communicate(timeout=120)
    assert process.returncode == 128 + signum, stderr[-2000:]
    last_line = stderr.strip().splitlines()[-1]
    assert last_line.startswith(f"stopped by {signal.Signals(signum).name} after step ") and "run the same command again" in last_line
    assert "Traceback" not in stderr
    step = int(last_line.split("after step ")[1].split(":")[0])
    assert 0 < step < STEPS
    assert checkpoint_problem(str(out / f"checkpoints/checkpoint-{step}")) is None
    if signum == signal.SIGTERM:  # and the resumed run ends exactly where the uninterrupted one does
        resumed = kill_soak.run_to_completion(str(out), STEPS)
        assert resumed.returncode == 0 and f"resumed from {out}/checkpoints/checkpoint-{step}" in resumed.stdout
        assert _same_final_weights(uninterrupted, out)


def test_damaged_and_incomplete_checkpoints_are_reported_skipped_and_kept(uninterrupted, tmp_path):
    out = tmp_path / "damaged"
    shutil.copytree(uninterrupted, out)
    root = out / "checkpoints"
    assert sorted(p.name for p in root.iterdir()) == ["checkpoint-21", "checkpoint-24"]
    # The newest is truncated, an older one's optimizer state is garbage, and a save was cut short.
    shutil.copytree(root / "checkpoint-21", root / "checkpoint-18")  # a stand-in older checkpoint
    weights = root / "checkpoint-24/model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    (root / "checkpoint-21/optimizer.bin").write_bytes(b"not a torch file")
    (root / ".tmp-checkpoint-27").mkdir()
    result = run_train([*kill_soak.training_command(str(out), STEPS)[2:]])
    assert result.returncode == 0, result.stderr[-3000:]
    lines = result.stdout
    assert f"skipping {root}/.tmp-checkpoint-27: an incomplete save" in lines
    assert f"skipping {root}/checkpoint-24: model.safetensors is corrupt" in lines
    assert f"skipping {root}/checkpoint-21: it could not be loaded" in lines
    assert f"resumed from {root}/checkpoint-18 at step 21" in lines
    assert (root / ".tmp-checkpoint-27").is_dir()  # reported, not deleted
    assert _same_final_weights(uninterrupted, out)  # checkpoint-18 holds step 21's state: the run ends where it should


def test_an_explicit_damaged_checkpoint_is_refused(uninterrupted, tmp_path):
    out = tmp_path / "explicit"
    shutil.copytree(uninterrupted, out)
    (out / "checkpoints/checkpoint-24/random_states_0.pkl").unlink()
    result = run_train([*FAST, "--output_dir", str(out), "--resume_from_checkpoint", str(out / "checkpoints/checkpoint-24")])
    assert result.returncode == 2 and "random_states_0.pkl is missing" in result.stderr and "Traceback" not in result.stderr


def test_a_nonfinite_step_is_skipped_and_counted(tmp_path):
    out = tmp_path / "one-nan"
    result = run_train([*FAST, "--output_dir", str(out), "--checkpointing_steps", "4"], DDPM_HF_FAULT_NONFINITE_STEPS="1")
    assert result.returncode == 0, result.stderr[-3000:]
    assert "step 2: non-finite loss or gradient (t in [" in result.stdout and "update skipped" in result.stdout
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["skipped_steps"] for r in rows] == [1, 0]
    assert all(r["loss"] == r["loss"] for r in rows)  # no NaN reaches the log
    ema = read_training_state(str(out / "checkpoints/checkpoint-4"))["ema"]
    assert ema["applied_updates"] == 3  # the EMA skipped the bad step too


def test_consecutive_nonfinite_steps_stop_and_leave_the_last_good_checkpoint(tmp_path):
    out = tmp_path / "nans"
    args = [*FAST, "--max_train_steps", "8", "--checkpointing_steps", "2", "--max_nonfinite_steps", "3", "--output_dir", str(out)]
    result = run_train(args, DDPM_HF_FAULT_NONFINITE_STEPS="2,3,4")
    assert result.returncode == 2 and "Traceback" not in result.stderr
    last = result.stderr.strip().splitlines()[-1]
    # Steps 3-5 are bad; the flags are read at logging steps (every 2nd), so the stop comes at step 6.
    assert last.startswith("error: stopping at step 6: 3 steps in a row had a non-finite loss or gradient")
    assert f"the last good checkpoint is {out}/checkpoints/checkpoint-4" in last
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["checkpoint-2", "checkpoint-4"]
    assert checkpoint_problem(str(out / "checkpoints/checkpoint-4")) is None
    weights = load_file(str(out / "checkpoints/checkpoint-4/model.safetensors"))
    assert all(bool(t.isfinite().all()) for t in weights.values())


def _limit_file_size(limit_bytes: int):
    def apply():  # Python ignores SIGXFSZ, so an oversized write fails with EFBIG, as a full disk fails with ENOSPC
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit_bytes, limit_bytes))
    return apply


def test_a_full_disk_while_writing_a_checkpoint_keeps_the_previous_one(tmp_path):
    out = tmp_path / "full"
    args = [*FAST, "--checkpointing_steps", "2", "--output_dir", str(out), "--resume_from_checkpoint", "latest"]
    assert run_train([*args, "--max_train_steps", "2"]).returncode == 0
    before = {p: p.read_bytes() for p in (out / "checkpoints/checkpoint-2").iterdir()}
    result = subprocess.run([sys.executable, "train_ddpm.py", *args], cwd=REPO, env=cli_env(), capture_output=True, text=True, timeout=300,
                            preexec_fn=_limit_file_size(1_000_000))  # the 4.4 MB weights file cannot be written
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr[-2000:]
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("error: could not write the checkpoint for step 4")
    assert f"the newest complete checkpoint, {out}/checkpoints/checkpoint-2, is intact" in last and "--resume_from_checkpoint latest" in last
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["checkpoint-2"]  # no half-written folder left
    assert {p: p.read_bytes() for p in (out / "checkpoints/checkpoint-2").iterdir()} == before

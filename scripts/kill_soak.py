#!/usr/bin/env python
"""Kill a training run with SIGKILL at random moments, resume it each time, and check that it ends
with exactly the weights of an uninterrupted run.

    python scripts/kill_soak.py --kills 20 --seed 0 [--steps 200] [--workdir /tmp/kill-soak]

Each attempt runs the same command (`--resume_from_checkpoint latest`) and is killed a random
delay after its training loop has started, which lands anywhere: mid-step, mid-checkpoint-write,
during a sample grid or the final save. After the kills the run is resumed until it finishes. Prints one line per attempt and
a summary; exits 1 if the final weights differ from the uninterrupted run's.
"""

from __future__ import annotations

import argparse
import os
import random
import shutil
import signal
import subprocess
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def training_command(output_dir: str, steps: int) -> list[str]:
    # Small and CPU-friendly; a checkpoint every 3 steps so kills often land near a save.
    return [sys.executable, "train_ddpm.py", "--max_train_steps", str(steps), "--train_batch_size", "8", "--logging_steps", "2",
            "--checkpointing_steps", "3", "--checkpoints_total_limit", "2", "--save_images_steps", "0", "--report_to", "none",
            "--eval_batch_size", "2", "--num_inference_steps", "2", "--output_dir", output_dir, "--resume_from_checkpoint", "latest"]


def _environment() -> dict:
    return {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}


def run_to_completion(output_dir: str, steps: int) -> subprocess.CompletedProcess:
    return subprocess.run(training_command(output_dir, steps), cwd=REPO, env=_environment(), capture_output=True, text=True, timeout=900)


def run_with_kills(output_dir: str, steps: int, kills: int, seed: int, max_delay: float = 6.0, log=print) -> dict:
    """Start, SIGKILL a random delay after training has started, repeat ``kills`` times; then run to completion."""
    rng = random.Random(seed)
    killed = finished_early = 0
    for attempt in range(1, kills + 1):
        delay = rng.uniform(0.0, max_delay)
        process = subprocess.Popen(training_command(output_dir, steps), cwd=REPO, env=_environment(),
                                   stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
        # The clock starts when training is set up (imports and data loading take seconds and vary
        # with the machine's load), so the kills land in the loop, the saves and the final save.
        for line in process.stdout:
            if line.startswith("examples:"):
                break
        try:
            process.wait(timeout=delay)
            finished_early += 1
            log(f"attempt {attempt}: finished before the kill at {delay:.1f} s (exit {process.returncode})")
        except subprocess.TimeoutExpired:
            process.send_signal(signal.SIGKILL)
            process.wait()
        finally:
            process.stdout.close()
        if process.returncode not in (0, -signal.SIGKILL):
            log(f"attempt {attempt}: exited with status {process.returncode}")
        if process.returncode == -signal.SIGKILL:
            killed += 1
            checkpoints = sorted(os.listdir(os.path.join(output_dir, "checkpoints"))) if os.path.isdir(os.path.join(output_dir, "checkpoints")) else []
            log(f"attempt {attempt}: SIGKILL {delay:.1f} s into training; on disk: {', '.join(checkpoints) or 'no checkpoint yet'}")
    resumes = 0
    while True:
        result = run_to_completion(output_dir, steps)
        resumes += 1
        if result.returncode != 0:
            return {"killed": killed, "finished_early": finished_early, "final_resumes": resumes, "ok": False, "error": result.stderr[-2000:]}
        if "done:" in result.stdout:
            return {"killed": killed, "finished_early": finished_early, "final_resumes": resumes, "ok": True, "stdout": result.stdout}


def max_weight_difference(a_dir: str, b_dir: str) -> float:
    from safetensors.torch import load_file

    name = "unet/diffusion_pytorch_model.safetensors"
    a, b = load_file(os.path.join(a_dir, name)), load_file(os.path.join(b_dir, name))
    if a.keys() != b.keys():
        return float("inf")
    return max((a[k].float() - b[k].float()).abs().max().item() for k in a)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--kills", type=int, default=20)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--steps", type=int, default=200, help="long enough that the kills spread over the whole run")
    parser.add_argument("--max_delay", type=float, default=6.0, help="kill delays are uniform in [0, max_delay] seconds after training starts")
    parser.add_argument("--workdir", default="/tmp/kill-soak")
    args = parser.parse_args()
    shutil.rmtree(args.workdir, ignore_errors=True)
    reference, interrupted = os.path.join(args.workdir, "uninterrupted"), os.path.join(args.workdir, "interrupted")
    started = time.time()
    reference_run = run_to_completion(reference, args.steps)
    if reference_run.returncode != 0:
        print(f"the uninterrupted run failed:\n{reference_run.stderr[-3000:]}")
        return 1
    outcome = run_with_kills(interrupted, args.steps, args.kills, args.seed, args.max_delay)
    difference = max_weight_difference(reference, interrupted) if outcome["ok"] else float("nan")
    same = outcome["ok"] and difference == 0.0
    print(f"kills: {outcome['killed']} SIGKILLs ({outcome['finished_early']} attempts finished before their kill); "
          f"resumed to completion in {outcome['final_resumes']} more run(s): {'ok' if outcome['ok'] else 'FAILED'}; "
          f"final weights vs uninterrupted: max |difference| = {difference} ({'identical' if same else 'DIFFERENT'}); {time.time() - started:.0f} s")
    if not outcome["ok"]:
        print(outcome["error"])
    return 0 if same else 1


if __name__ == "__main__":
    sys.exit(main())

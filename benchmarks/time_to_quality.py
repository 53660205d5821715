#!/usr/bin/env python
"""Wall time until a recipe's EMA samples are good digits.

    python benchmarks/time_to_quality.py                                   # the quick start, configs/mnist-5k-cpu.yaml
    python benchmarks/time_to_quality.py --eval_start_step=3800            # extra flags (--flag=value) go to train_ddpm.py (as measured)
    python benchmarks/time_to_quality.py configs/fast-digits-cpu.yaml --eval_steps 550 --eval_num_samples 200 --max_fid 20 --json benchmarks/time_to_quality_fast_digits.json
                                                                           # the conditional recipe, at its own bar
    python benchmarks/time_to_quality.py --short                           # CI: a few steps, checks it runs

It trains the recipe as a user would (`train_ddpm.py CONFIG`) with the in-training evaluation
every --eval_steps steps: --eval_num_samples EMA samples, drawn with the recipe's own sampler and
guidance, scored by the project's digit classifier (ddpm_hf/features.py). It reports the first
evaluation whose mean top-class confidence reaches --min_confidence and whose digit-FID is at most
--max_fid, at two clocks: the optimisation time, and the wall time since the process started less
the evaluations themselves (they are this measurement's cost, not the recipe's). Prints a table and
writes JSON (--json, default benchmarks/time_to_quality.json). The defaults are the quick start's bar:
an evaluation every 100 steps on 1,000 samples, confidence >= 0.9 and digit-FID <= 10.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHORT = ["--max_train_steps", "4", "--num_inference_steps", "2", "--eval_batch_size", "8",
         "--checkpointing_steps", "0", "--logging_steps", "2"]


def first_good(rows: list[dict], min_confidence: float, max_fid: float) -> dict | None:
    return next((r for r in rows if r["mean_confidence"] >= min_confidence and r["fid"] <= max_fid), None)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("config", nargs="?", default="configs/mnist-5k-cpu.yaml")
    parser.add_argument("--eval_steps", type=int, default=100)
    parser.add_argument("--eval_num_samples", type=int, default=1000)
    parser.add_argument("--min_confidence", type=float, default=0.9)
    parser.add_argument("--max_fid", type=float, default=10.0, help="digit-FID bar (at --eval_num_samples; small samples read high)")
    parser.add_argument("--output_dir", default=None, help="default: a temporary folder, removed afterwards")
    parser.add_argument("--json", default=os.path.join(REPO, "benchmarks", "time_to_quality.json"))
    parser.add_argument("--short", action="store_true", help="a few steps and samples: checks that it runs, not the figures")
    args, overrides = parser.parse_known_args(argv)

    with tempfile.TemporaryDirectory() as scratch:
        output_dir = args.output_dir or os.path.join(scratch, "run")
        if args.short:
            args.eval_steps, args.eval_num_samples = 2, 8
        command = [sys.executable, "train_ddpm.py", args.config, "--output_dir", output_dir,
                   "--eval_steps", str(args.eval_steps), "--eval_num_samples", str(args.eval_num_samples), "--report_to", "none",
                   *(SHORT if args.short else []), *overrides]
        print("$ " + " ".join(command[1:]), flush=True)
        started = time.time()
        result = subprocess.run(command, cwd=REPO)
        if result.returncode != 0:
            print(f"training failed with exit status {result.returncode}", file=sys.stderr)
            return result.returncode
        total_s = time.time() - started
        with open(os.path.join(output_dir, "evaluation.jsonl")) as f:
            rows = [json.loads(line) for line in f]
        with open(os.path.join(output_dir, "training_config.json")) as f:
            config = json.load(f)
        with open(os.path.join(output_dir, "train_stats.json")) as f:
            stats = json.load(f)

    print(f"\n{'step':>6} {'train s':>8} {'wall s':>8} {'digit-FID':>10} {'confidence':>10} {'entropy bits':>12}")
    for r in rows:
        print(f"{r['step']:>6} {r['train_s']:>8.0f} {r['wall_s']:>8.0f} {r['fid']:>10.2f} {r['mean_confidence']:>10.3f} {r['class_entropy_bits']:>12.3f}")
    good = first_good(rows, args.min_confidence, args.max_fid)
    bar = f"mean confidence >= {args.min_confidence} and digit-FID <= {args.max_fid} ({args.eval_num_samples} samples)"
    if good:
        print(f"\n{bar}: reached at step {good['step']}, after {good['train_s']:.0f} s of training, "
              f"{good['wall_s']:.0f} s ({good['wall_s'] / 60:.1f} min) of wall time")
        if good is rows[0] and config.get("eval_start_step"):
            print(f"  (at the first evaluation: the crossing may lie before step {good['step']}; lower --eval_start_step to locate it)")
    else:
        print(f"\n{bar}: not reached in {rows[-1]['step']} steps")
    report = {
        "date": time.strftime("%Y-%m-%d"), "machine": f"{platform.node()} ({platform.processor() or platform.machine()}, {os.cpu_count()} cores)",
        "device": stats["device"], "config": args.config, "overrides": overrides, "short": args.short,
        "bar": {"min_confidence": args.min_confidence, "max_fid": args.max_fid, "num_samples": args.eval_num_samples},
        "sampler": {"name": config["sampler"], "steps": config["num_inference_steps"],
                    # classifier-free guidance (conditional) or autoguidance from guide_step on; a plain unconditional run has none
                    "guidance_scale": config["guidance_scale"] if config.get("class_conditional") or config.get("guide_step") else None,
                    "guide_step": config.get("guide_step")},
        "training_images_per_s": stats["images_per_s"],  # the machine's speed: times scale with it
        "reached": good, "evaluations": rows, "process_seconds_with_evaluations": round(total_s, 1),
    }
    with open(args.json, "w") as f:
        json.dump(report, f, indent=2)
        f.write("\n")
    print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

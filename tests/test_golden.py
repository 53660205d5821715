"""A seeded regression: six steps of the `tiny` UNet on the CPU must give these exact numbers.

A self-consistency test cannot see a change in what a run computes (another seed stream, a
reordered draw, a different loss reduction); this one can. When a change is *meant* to alter
the numbers, run ``python -m tests.test_golden`` from the repository root, paste what it prints
over GOLDEN below, and say in the commit which change moved them and why.
"""

import json
import sys

import pytest
import torch
from safetensors.torch import load_file

from ddpm_hf.config import TrainingConfig
from ddpm_hf.training import train

# Recorded on 2026-12-02 (torch 2.13.0 CPU, diffusers 0.42.1) after the named seed streams of ddpm_hf/seeds.py.
GOLDEN = {
    "losses": [1.1716320514678955, 0.6387205719947815, 0.4820520877838135, 0.49012187123298645, 0.2745230197906494, 0.21996645629405975],
    "ema_weights": [1716.4658586096466, 3060.600545070267],
    "live_weights": [1698.5768531108013, 3064.3355784416635],
}
HOW_TO_UPDATE = "if the change is meant to alter a run's numbers, run `python -m tests.test_golden` and update GOLDEN (see the module docstring)"


def _checksum(path) -> list[float]:
    """The sum and the sum of squares of every weight, in float64."""
    weights = load_file(str(path))
    return [sum(float(weights[k].double().sum()) for k in sorted(weights)), sum(float(weights[k].double().pow(2).sum()) for k in sorted(weights))]


def golden_run(out) -> dict:
    torch.set_num_threads(1)  # the reduction order of one thread: the same numbers on any core count
    train(TrainingConfig(output_dir=str(out), max_train_steps=6, train_batch_size=8, max_train_samples=64, logging_steps=1,
                         learning_rate=1e-3, lr_warmup_steps=0, save_images_steps=0, checkpointing_steps=0, report_to="none",
                         eval_batch_size=4, num_inference_steps=2))  # the final grid (not in the numbers): kept cheap
    return {
        "losses": [json.loads(line)["loss"] for line in (out / "metrics.jsonl").read_text().splitlines()],
        "ema_weights": _checksum(out / "unet/diffusion_pytorch_model.safetensors"),
        "live_weights": _checksum(out / "checkpoints/checkpoint-6/model.safetensors"),
    }


def test_six_seeded_steps_give_the_recorded_losses_and_weights(tmp_path):
    threads = torch.get_num_threads()
    try:
        result = golden_run(tmp_path / "golden")
    finally:
        torch.set_num_threads(threads)
    for key, expected in GOLDEN.items():
        # Tight enough that any change of draws or maths shows (those move the losses by percents),
        # loose enough for another CPU's vector width.
        assert result[key] == pytest.approx(expected, rel=1e-5), f"{key}: got {result[key]}, recorded {expected}; {HOW_TO_UPDATE}"


if __name__ == "__main__":
    import tempfile
    from pathlib import Path

    print(json.dumps(golden_run(Path(tempfile.mkdtemp())), indent=1), file=sys.stdout if len(sys.argv) < 2 else open(sys.argv[1], "w"))

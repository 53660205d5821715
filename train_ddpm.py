#!/usr/bin/env python
"""Train a DDPM: `python train_ddpm.py [config.yaml] [--flags]` or `accelerate launch train_ddpm.py ...`.

With no arguments it trains the `tiny` UNet on the 5,000 MNIST digits bundled offline and
writes a loadable `DDPMPipeline` to ./ddpm-mnist-5k. `--help` lists every option.
"""

import sys

from ddpm_hf.cli import run_command
from ddpm_hf.config import parse_config
from ddpm_hf.training import train


def main(argv=None) -> int:
    return run_command(lambda: train(parse_config(argv)))


if __name__ == "__main__":
    sys.exit(main())

#!/usr/bin/env python
"""Train a DDPM: `python train_ddpm.py [config.yaml] [--flags]` or `accelerate launch train_ddpm.py ...`.

With no arguments it trains the `tiny` UNet on the 5,000 MNIST digits bundled offline and
writes a loadable `DDPMPipeline` to ./ddpm-mnist-5k. `--help` lists every option.
"""

import sys

from ddpm_hf.cli import run_command
from ddpm_hf.config import parse_config


def main(argv=None) -> int:
    def parse_then_train():
        config = parse_config(argv)
        # Imported once the flags are valid: a mistyped flag is reported in about a second,
        # not after the five seconds torch, diffusers and datasets take to load.
        from ddpm_hf.training import train

        train(config)

    return run_command(parse_then_train)


if __name__ == "__main__":
    sys.exit(main())

"""Compare runs: ``python -m ddpm_hf.compare RUN_DIR... --out DIR``.

Writes comparison.csv and comparison.md (the config keys that differ, then each run's losses,
FID, confidence, bits/dim, images/s and wall time), validation_eps_mse.png (validation loss on one
scale for every target and weighting, against images seen), timestep_profiles.png (each run's
last per-timestep profile), profiles_<run>.png (every validation of a run) and grids.png (the last
sample grids side by side). See comparison.py.
"""

from __future__ import annotations

import os
import sys

from .cli import OneLineArgumentParser, run_command
from .errors import UserError


def parse_args(argv=None):
    parser = OneLineArgumentParser(prog="python -m ddpm_hf.compare", description="Compare training runs side by side.")
    parser.add_argument("runs", nargs="+", help="run folders written by train_ddpm.py")
    parser.add_argument("--out", default="comparison", help="where the table and figures go (default: ./comparison)")
    args = parser.parse_args(argv)
    for run in args.runs:
        if not os.path.isdir(run):
            raise UserError(f"{run} is not a folder; pass run folders written by train_ddpm.py")
    if len(set(map(os.path.realpath, args.runs))) < len(args.runs):
        raise UserError("a run folder is listed twice; list each run once")
    return args


def main(argv=None) -> None:
    args = parse_args(argv)
    from .comparison import write_comparison

    rows = write_comparison(args.runs, args.out)
    print(f"compared {len(rows)} runs: {os.path.join(args.out, 'comparison.md')}")


if __name__ == "__main__":
    sys.exit(run_command(main))

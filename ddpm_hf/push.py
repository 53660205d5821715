"""Push a finished run to the Hub: ``python -m ddpm_hf.push OUTPUT_DIR [--hub_model_id user/name]``.

What `train_ddpm.py --push_to_hub` pushes at the end (the pipeline, the model card, the run's
record and its last sample grid, in one commit), for a run trained without a network or whose
push failed; ``--checkpoints`` adds every checkpoint. Training runs on; this only uploads.
"""

from __future__ import annotations

import os
import sys

from .cli import OneLineArgumentParser, run_command
from .errors import UserError
from .files import read_json


def parse_args(argv=None):
    parser = OneLineArgumentParser(prog="python -m ddpm_hf.push", description="Push a finished training run to the Hugging Face Hub.")
    parser.add_argument("output_dir", help="a run folder written by train_ddpm.py")
    parser.add_argument("--hub_model_id", default=None, help="'name' or 'user/name'; default: the run's own --hub_model_id, else the folder's name")
    parser.add_argument("--hub_token", default=None, help="default: HF_TOKEN or the one saved by `hf auth login`")
    parser.add_argument("--hub_private_repo", action="store_true", help="create the repo as private")
    parser.add_argument("--checkpoints", action="store_true", help="also push checkpoints/ (large)")
    args = parser.parse_args(argv)
    if not os.path.isfile(os.path.join(args.output_dir, "model_index.json")):
        raise UserError(f"{args.output_dir} holds no finished pipeline (no model_index.json); finish the run first "
                        "(run its training command again), then push")
    return args


def main(argv=None) -> None:
    args = parse_args(argv)
    from .hub import HubPusher, last_grid_of, measured_results, model_card

    saved = read_json(os.path.join(args.output_dir, "training_config.json"))
    repo_id = args.hub_model_id or saved.get("hub_model_id") or os.path.basename(os.path.normpath(args.output_dir))
    pusher = HubPusher(repo_id, args.hub_token, args.hub_private_repo)
    grid = last_grid_of(args.output_dir)
    stats = read_json(os.path.join(args.output_dir, "train_stats.json"))
    if saved and stats:  # the card again, with what was measured since training (evaluate's FID and bits/dim)
        with open(os.path.join(args.output_dir, "README.md"), "w") as f:
            f.write(model_card(pusher.repo_id, saved, stats, grid, measured_results(args.output_dir)))
    extra = tuple(p for p in (grid, "checkpoints/**" if args.checkpoints else None) if p)
    url = pusher.push_run(args.output_dir, f"Training run pushed from {os.path.basename(os.path.normpath(args.output_dir))}", extra)
    print(f"pushed {args.output_dir} to the Hub: {url}")


if __name__ == "__main__":
    sys.exit(run_command(main))

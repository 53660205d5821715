"""Where along the chain does many-step DDIM go wrong? Draws the same seeds with deterministic DDIM
over hand-made timestep lists that are fine (every timestep) in one noise range and coarse (every
20th) in the other, one row per list, into one labelled grid:

    python studies/ddim/where.py MODEL --split 100 --grid studies/ddim/report/where.png

If "fine below the split" fails and "fine above it" does not, the net's low-noise predictions are
what 1,000 steps integrate into the failure. The update is the one ConsistentDDIMScheduler makes
(clipped x0, noise re-derived from it), written out because diffusers' DDIMScheduler only steps
over evenly spaced timesteps.
"""

import argparse
import os
import sys

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

from ddpm_hf.generation import image_grid, load_unet_and_schedule  # noqa: E402
from ddpm_hf.objective import predicted_x0  # noqa: E402
from diffusers import DDPMScheduler  # noqa: E402


def timestep_lists(num_train_timesteps: int, split: int, coarse: int = 20) -> dict[str, list[int]]:
    """Descending timestep lists: all coarse, all fine, and fine on one side of ``split`` only."""
    every = list(range(num_train_timesteps - 1, -1, -1))
    sparse = [t for t in every if t % coarse == 0]
    return {
        f"every {coarse}th": sparse,
        "every step": every,
        f"fine t>={split}": [t for t in every if t >= split] + [t for t in sparse if t < split],
        f"fine t<{split}": [t for t in sparse if t >= split] + [t for t in every if t < split],
    }


@torch.no_grad()
def ddim(unet, alphas_cumprod: torch.Tensor, prediction_type: str, timesteps: list[int], noise: torch.Tensor) -> torch.Tensor:
    x = noise
    for i, t in enumerate(timesteps):
        abar = alphas_cumprod[t]
        abar_next = alphas_cumprod[timesteps[i + 1]] if i + 1 < len(timesteps) else torch.tensor(1.0)
        step = torch.full((x.shape[0],), t, dtype=torch.long)
        x0 = predicted_x0(x, unet(x, step).sample, step, alphas_cumprod, prediction_type).clamp(-1, 1)
        eps = (x - abar.sqrt() * x0) / (1 - abar).sqrt()
        x = abar_next.sqrt() * x0 + (1 - abar_next).sqrt() * eps
    return x


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model")
    parser.add_argument("--split", type=int, default=100, help="the timestep between 'low' and 'high' noise")
    parser.add_argument("--num_images", type=int, default=8)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--grid", required=True)
    args = parser.parse_args(argv)
    unet, scheduler_config, _ = load_unet_and_schedule(args.model)
    unet.eval()
    schedule = DDPMScheduler.from_config(scheduler_config)
    size = unet.config.sample_size
    noise = torch.randn((args.num_images, unet.config.in_channels, size, size), generator=torch.Generator().manual_seed(args.seed))
    rows = timestep_lists(schedule.config.num_train_timesteps, args.split)
    images = []
    for name, timesteps in rows.items():
        print(f"{name}: {len(timesteps)} steps", flush=True)
        images.append(ddim(unet, schedule.alphas_cumprod, schedule.config.prediction_type, timesteps, noise))
    pixels = ((torch.cat(images) + 1) / 2).clamp(0, 1).permute(0, 2, 3, 1).numpy().astype(np.float32)
    labels = [f"{name} ({len(t)})" for name, t in rows.items()]
    os.makedirs(os.path.dirname(os.path.abspath(args.grid)), exist_ok=True)
    image_grid(pixels, columns=args.num_images, row_labels=labels,
               caption=f"DDIM over mixed timestep lists, {os.path.basename(args.model.rstrip('/'))}").save(args.grid)


if __name__ == "__main__":
    main()

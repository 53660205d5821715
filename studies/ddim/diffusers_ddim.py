"""`python -m ddpm_hf.evaluate` or `python -m ddpm_hf.sample` with diffusers' own DDIMScheduler in
place of ours: the study's "before" rows. diffusers steps with the clipped x0 but the network's
unclipped noise (`use_clipped_model_output=False`); ours re-derives the noise from the clipped x0.

    python studies/ddim/diffusers_ddim.py evaluate|sample ARGS...
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

from diffusers import DDIMScheduler  # noqa: E402

from ddpm_hf import evaluate, generation, sample  # noqa: E402

generation.SCHEDULERS["ddim"] = DDIMScheduler.from_config
command = {"evaluate": evaluate.main, "sample": sample.main}[sys.argv[1]]
sys.exit(command(sys.argv[2:]))

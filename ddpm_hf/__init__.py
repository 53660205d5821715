"""ddpm-hf: train Denoising Diffusion Probabilistic Models on the Hugging Face stack."""

__version__ = "0.1.0"

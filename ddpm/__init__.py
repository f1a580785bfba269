"""A Denoising Diffusion Probabilistic Model (Ho et al. 2020) for small images, in PyTorch."""

__version__ = "0.1.0"

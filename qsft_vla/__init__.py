"""qsft_vla: Q-SFT for vision-language robot policies in JAX/Flax."""

__version__ = "0.1.0"

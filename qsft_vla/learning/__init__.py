"""Q-SFT learning: targets (support ratio, Bellman weights), losses, Polyak
target updates and the inference-time reweighting (QSFT.md).

Everything here is pure JAX on logits arrays, model-agnostic and TF-free.
"""

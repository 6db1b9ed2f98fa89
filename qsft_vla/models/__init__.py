"""Backbones that map (observation history, instruction, action tokens) to logits over action ids.

layers.py holds the shared pieces (FiLM, a cached causal transformer block);
rt1_small.py is the small RT-1-style network trained from scratch.
"""

"""Datasets: the episode layout and its checks, RLDS reading/writing, statistics, the input pipeline."""

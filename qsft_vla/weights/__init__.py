"""Pretrained weights: packaged artifacts (packaged.py) and readers for HF folders
(safetensors), GGUF and legacy torch .pth files, with the param mappings to our models."""

"""The causal-LM loss implementations loss.py offers (a leaf: the recipe reads it without torch)."""

IMPLEMENTATIONS = ("chunked", "liger", "hf")

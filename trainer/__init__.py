"""Contrastive training of text-embedding bi-encoders.

The library part (``losses``, ``distributed``, ``gradcache``, ``model``, ``calibration``) is usable
from your own training loop; the Hydra harness sits on top of it.
"""

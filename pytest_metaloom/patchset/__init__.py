"""Patch sets: manifests and claims, overlays of mlx-lm, and the check command."""

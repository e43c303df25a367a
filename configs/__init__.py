"""Hydra configs, shipped as package data so that `pkg://configs` resolves from any directory."""

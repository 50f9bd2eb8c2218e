"""Hydra config groups shipped with the package (the registries)."""

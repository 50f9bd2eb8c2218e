"""Test code vendored from other projects, unchanged, with its licence (see README.md here)."""

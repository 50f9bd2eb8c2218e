"""diffusers' tests/ layout, for the relative imports of the vendored file (README.md one level up)."""

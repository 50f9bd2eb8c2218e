"""scheduler_common.py: diffusers' tests/schedulers/test_schedulers.py, vendored unchanged (../../README.md)."""

"""fewstep's stand-ins for the two names scheduler_common.py imports from diffusers' tests/testing_utils.py."""

from __future__ import annotations

import io
import logging

torch_device = "cpu"  # the scheduler tests are device-agnostic; the suite runs on the CPU


class CaptureLogger:
    """``with CaptureLogger(logger) as cap: ...`` then ``cap.out``: what ``logger`` emitted inside the block."""

    def __init__(self, logger: logging.Logger):
        self.logger = logger
        self.stream = io.StringIO()
        self.handler = logging.StreamHandler(self.stream)
        self.out = ""

    def __enter__(self):
        self.logger.addHandler(self.handler)
        return self

    def __exit__(self, *exc):
        self.logger.removeHandler(self.handler)
        self.out = self.stream.getvalue()

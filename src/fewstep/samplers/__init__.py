"""Samplers: the UCGM few/any/multi-step sampler and the plain Euler baseline.

The diffusers ``TwinFlowScheduler`` lives in :mod:`fewstep.samplers.scheduler`
(imported on demand, so this package does not pull in diffusers).
"""

from fewstep.samplers.euler import EulerSampler
from fewstep.samplers.ucgm import UCGMSampler

__all__ = ["EulerSampler", "UCGMSampler"]

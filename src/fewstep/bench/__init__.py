"""Benchmarks (``python -m fewstep.bench``): the command (:mod:`.command`), one objective's timed training step
(:mod:`.runner`, built as the training loop builds it), the markdown tables (:mod:`.tables`) and a step's memory
and FLOPs estimated without allocating them (:mod:`.estimate`)."""

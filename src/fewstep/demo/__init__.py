"""The real model path end to end on a tiny SD3 built here (``make demo``, ``python -m fewstep.demo``).

The 1,500 training digits of :mod:`fewstep.data.digits_split` become a captioned image folder
(:mod:`fewstep.demo.images`); a tiny ``StableDiffusion3Pipeline`` gets a VAE trained on those images and random
text encoders (:mod:`fewstep.demo.pipeline`); fewstep itself trains its transformer by flow matching (the
teacher), distils the teacher with TwinFlow, exports both as pipeline folders, and the images they generate through
``StableDiffusion3Pipeline`` are scored by the project's digits evaluator against the digit each prompt names
(:mod:`fewstep.demo.score`). :mod:`fewstep.demo.run` chains the stages, each skipped when its output exists.
"""

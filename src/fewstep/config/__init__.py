"""Configuration: the typed schemas of every config group (:mod:`.schema`), the user's config folders on Hydra's
search path (:mod:`.searchpath`) and the checks on combinations of values that run before any weight loads
(:mod:`.validate`). An objective's own schema and checks live with the objective (:mod:`fewstep.objectives`)."""

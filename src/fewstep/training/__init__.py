"""Training: the one loop (:mod:`.loop`, ``python -m fewstep``), the trainable networks it builds and steps
(:mod:`.trainables`, shared with the bench), checkpoints (:mod:`.checkpoint`), resume checks (:mod:`.resume`),
sharding (:mod:`.distributed`), a finished run loaded again (:mod:`.runs`), the grids and evaluations a run ends
with (:mod:`.outputs`) and memory probes (:mod:`.memory`).

Nothing is imported here: ``fewstep.models`` imports :mod:`.distributed` without pulling in the loop."""

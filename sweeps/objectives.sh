#!/usr/bin/env bash
# flow_matching, rcgm, twinflow, meanflow, scm, dmd2 on the digits default at one equal wall-clock budget
# (trainer.time_limit_s, 240 s each: <= 30 min on 2 CPU cores); dmd2 starts from the flow-matching run of the
# same sweep. docs/objectives.md holds the measured table. Extra arguments are Hydra overrides.
exec "${PYTHON:-python}" -m fewstep -m experiment=sweep/objectives "$@"

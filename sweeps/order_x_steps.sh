#!/usr/bin/env bash
# RCGM estimate_order (1, 2, 3) x target_step_count (1, 2, 4) on the digits default: 9 runs, <= 30 min on 2 CPU
# cores. target_step_count sets the validation-grid NFE; every run is evaluated at 1, 2 and 4 NFE, so compare
# nfe_<target_step_count>/fd across rows of report.md. Extra arguments are Hydra overrides.
exec "${PYTHON:-python}" -m fewstep -m experiment=sweep/order_x_steps "$@"

#!/usr/bin/env bash
# 2 x 2 delta_t x estimate_order on 2-D moons: about a minute; checks the sweep -> report path (report.md,
# heatmap_nfe_1_swd.png, loss_curves.png). Extra arguments are Hydra overrides.
exec "${PYTHON:-python}" -m fewstep -m experiment=sweep/toy2d_smoke "$@"

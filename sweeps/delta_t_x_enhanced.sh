#!/usr/bin/env bash
# RCGM delta_t (0.005, 0.01, 0.02) x enhanced_ratio (0, 0.5, 0.8) on the digits default: 9 runs, <= 30 min on
# 2 CPU cores (3,000 steps or 150 s of training each, then 1/2/4-NFE evaluation).
# Writes multirun/<date>/<time>/{0..8}/ and, after every run, report.csv, report.md, heatmap_nfe_1_fd.png and
# loss_curves.png in multirun/<date>/<time>/. Extra arguments are Hydra overrides, e.g. trainer.max_steps=500,
# hydra/launcher=slurm_accelerate, or objective.enhanced_ratio=0.5 (collapses that axis).
exec "${PYTHON:-python}" -m fewstep -m experiment=sweep/delta_t_x_enhanced "$@"

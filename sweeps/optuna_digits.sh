#!/usr/bin/env bash
# Optuna TPE search over delta_t (log 0.002-0.05), enhanced_ratio (0-1), estimate_order (1-3) and
# dist_match_coef (0.25/0.5/0.75), minimising the 1-NFE digits-FD (optimize_metric=eval.nfe_1.fd); 12 trials.
# Needs: pip install hydra-optuna-sweeper. Best point: multirun/<date>/<time>/optimization_results.yaml.
exec "${PYTHON:-python}" -m fewstep -m experiment=sweep/optuna_digits "$@"

#!/usr/bin/env bash
# Runs the dataset pipeline from dataflow_config.json: on Dataflow, or locally with --local.
#
#   ./run_dataflow.sh [--config PATH] --stage [--dry-run]    # copy the inputs to stage_to
#   ./run_dataflow.sh [--config PATH] [--dry-run] [--local [--limit N]] [--records N]
#                     [--compute_indices_only] [--skip-preflight] [extra pipeline flags...]
#
# Validation, the mapping of config keys onto flags, staging, the preflight and the --dry-run
# estimate live in pipelines/dataflow_config.py; this script only finds Python and calls it.
# PYTHON overrides the interpreter (default: this repository's .venv).
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
export PYTHONPATH="${here}${PYTHONPATH:+:${PYTHONPATH}}"
exec "${PYTHON:-${here}/.venv/bin/python}" -m pipelines.dataflow_config "$@"

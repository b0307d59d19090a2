#!/usr/bin/env bash
# Runs every benchmark in turn (about 42 minutes on 2 cores; big_model.py needs ~10 GB of disk and
# RAM) and exits non-zero if any missed its target (bench_rewrite_time.py does, see the README).
# Uses the virtual environment of the README (.venv/bin/python), or set PYTHON.
set -u
cd "$(dirname "$0")"
PYTHON=${PYTHON:-../.venv/bin/python}
status=0
for script in bench_finetune_step.py bench_export_latency.py bench_accuracy.py bench_coverage.py bench_rewrite_time.py big_model.py bench_sandbox.py; do
  echo "== $script"
  "$PYTHON" "$script" || status=1
done
# calibration: only the cost part (about two minutes); its accuracy parts take about an hour
echo "== bench_calibration.py --only cost"
"$PYTHON" bench_calibration.py --only cost || status=1
exit $status

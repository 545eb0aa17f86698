#!/usr/bin/env bash
# The whole janus-lab loop on the local stack, with the debug model and the sample dataset.
# Run through `make demo` (which starts the stack and writes data/sample first).
set -euo pipefail
cd "$(dirname "$0")/../.."
# shellcheck disable=SC1091
source run/stack/env.sh
PY=.venv/bin/python
RAY=.venv/bin/ray
RUN="demo-$(date +%Y%m%d-%H%M%S)"
DATASET="s3://${JANUS_BUCKET}/datasets/sample"

echo "== 1/4 ingest data/sample -> ${DATASET} (Ray Data on the local cluster)"
"$PY" jobs/ingest.py --config jobs/configs/ingest_sample.yaml "output.uri=${DATASET}" output.overwrite=true

echo "== 2/4 fine-tune the debug model: ray job submit jobs/finetune.py (run ${RUN})"
LOG="run/${RUN}-finetune.log"
"$RAY" job submit --working-dir . -- python jobs/finetune.py --config jobs/configs/debug.yaml \
    "name=${RUN}" "data.uri=${DATASET}" "train.storage_path=s3://${JANUS_BUCKET}/runs" train.eval_every=10 \
    | tee "$LOG"
RUN_ID=$(sed -n 's/.*MLflow run id: \([0-9a-f]\{32\}\).*/\1/p' "$LOG" | tail -n 1)

echo "== 3/4 register the export and promote it (janus-4o @challenger, @champion if better on val_nll)"
"$PY" jobs/promote.py "run_id=\"${RUN_ID}\""   # quoted: settings are read as YAML

echo "== 4/4 generate with models:/janus-4o@champion"
"$PY" jobs/generate.py "model=models:/janus-4o@champion" "prompt=a red circle on a blue background" \
    parallel_size=4 seed=0 "output_dir=outputs/${RUN}"

echo
echo "MLflow run:  ${MLFLOW_TRACKING_URI}/#/experiments (experiment janus-4o-debug, run ${RUN}, id ${RUN_ID})"
echo "Registry:    ${MLFLOW_TRACKING_URI}/#/models/janus-4o"
echo "Checkpoints and export: s3://${JANUS_BUCKET}/runs/${RUN}/   Images: outputs/${RUN}/"
echo "Stop the stack with: make down"

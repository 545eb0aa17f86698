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

echo "== 1/3 ingest data/sample -> ${DATASET} (Ray Data on the local cluster)"
"$PY" jobs/ingest.py --config jobs/configs/ingest_sample.yaml "output.uri=${DATASET}" output.overwrite=true

echo "== 2/3 fine-tune the debug model: ray job submit jobs/finetune.py (run ${RUN})"
"$RAY" job submit --working-dir . -- python jobs/finetune.py --config jobs/configs/debug.yaml \
    "name=${RUN}" "data.uri=${DATASET}" "train.storage_path=s3://${JANUS_BUCKET}/runs" train.eval_every=10

EXPORT="s3://${JANUS_BUCKET}/runs/${RUN}/export"
echo "== 3/3 generate with the export ${EXPORT}"
"$PY" jobs/generate.py "model=${EXPORT}" "prompt=a red circle on a blue background" parallel_size=4 seed=0 \
    "output_dir=outputs/${RUN}"

echo
echo "MLflow UI: ${MLFLOW_TRACKING_URI} (experiment janus-4o-debug, run ${RUN})"
echo "Checkpoints and export: s3://${JANUS_BUCKET}/runs/${RUN}/   Images: outputs/${RUN}/"
echo "Stop the stack with: make down"

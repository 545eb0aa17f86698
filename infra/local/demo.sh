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

echo "== 1/6 ingest data/sample -> ${DATASET} (Ray Data on the local cluster)"
"$PY" jobs/ingest.py --config jobs/configs/ingest_sample.yaml "output.uri=${DATASET}" output.overwrite=true

echo "== 2/6 fine-tune the debug model: ray job submit jobs/finetune.py (run ${RUN})"
LOG="run/${RUN}-finetune.log"
"$RAY" job submit --working-dir . -- python jobs/finetune.py --config jobs/configs/debug.yaml \
    "name=${RUN}" "data.uri=${DATASET}" "train.storage_path=s3://${JANUS_BUCKET}/runs" train.eval_every=10 \
    | tee "$LOG"
RUN_ID=$(sed -n 's/.*MLflow run id: \([0-9a-f]\{32\}\).*/\1/p' "$LOG" | tail -n 1)

echo "== 3/6 register the export and promote it (janus-4o @challenger, @champion if better on val_nll)"
"$PY" jobs/promote.py "run_id=\"${RUN_ID}\""   # quoted: settings are read as YAML

echo "== 4/6 generate with models:/janus-4o@champion"
"$PY" jobs/generate.py "model=models:/janus-4o@champion" "prompt=a red circle on a blue background" \
    parallel_size=4 seed=0 "output_dir=outputs/${RUN}"

echo "== 5/6 2 x 2 masking ablation: ray job submit sweeps/masking_ablation.py (4 short fine-tunes, table at the end)"
"$RAY" job submit --working-dir . -- python sweeps/masking_ablation.py --config sweeps/configs/debug.yaml \
    "name=masking-${RUN}" "overrides.data.uri=${DATASET}" "overrides.train.storage_path=s3://${JANUS_BUCKET}/sweeps/runs" \
    "run.storage_path=s3://${JANUS_BUCKET}/sweeps"

echo "== 6/6 serve the champion: serve deploy serve/config.yaml, then a text-to-image and an edit request over HTTP"
SERVE=.venv/bin/serve
"$SERVE" deploy serve/config.yaml
ENDPOINT="http://127.0.0.1:8000"
"$PY" - "$ENDPOINT" "outputs/${RUN}/served" <<'PYEOF'
import base64, json, os, sys, time, urllib.error, urllib.request

import requests

endpoint, folder = sys.argv[1], sys.argv[2]
os.makedirs(folder, exist_ok=True)
deadline = time.monotonic() + 180
while True:  # the replica downloads the champion from the registry before it answers
    try:
        with urllib.request.urlopen(f"{endpoint}/v1/models", timeout=5) as answer:
            print("serving:", json.load(answer)["data"][0])
        break
    except (urllib.error.URLError, OSError):
        if time.monotonic() > deadline:
            sys.exit(f"the server at {endpoint} did not come up in 180 s; see `serve status`")
        time.sleep(2)

def save(answer: requests.Response, name: str) -> bytes:
    if answer.status_code != 200:
        sys.exit(f"{answer.request.method} {answer.request.path_url} -> {answer.status_code}: {answer.text}")
    data = answer.json()
    png = base64.b64decode(data["data"][0]["b64_json"])
    path = os.path.join(folder, name)
    with open(path, "wb") as out:
        out.write(png)
    print(f"{answer.request.method} {answer.request.path_url} -> {path} "
          f"(seed {data['seed']}, version {data['model']['version']})")
    return png


made = save(requests.post(f"{endpoint}/v1/images/generations", timeout=120,
                          json={"prompt": "a red circle on a blue background", "n": 1, "seed": 0}), "t2i.png")
# The edit takes the picture just made as its input image (multipart, as OpenAI's edits endpoint).
save(requests.post(f"{endpoint}/v1/images/edits", timeout=120, files={"image": ("t2i.png", made, "image/png")},
                   data={"prompt": "make the circle green", "n": "1", "seed": "0"}), "edit.png")
PYEOF

echo
echo "MLflow run:  ${MLFLOW_TRACKING_URI}/#/experiments (experiment janus-4o-debug, run ${RUN}, id ${RUN_ID})"
echo "Registry:    ${MLFLOW_TRACKING_URI}/#/models/janus-4o"
echo "Checkpoints and export: s3://${JANUS_BUCKET}/runs/${RUN}/   Images: outputs/${RUN}/ (served: outputs/${RUN}/served/)"
echo "Server:      ${ENDPOINT}/v1/images/generations (serve status; serve shutdown -y stops it)"
echo "Stop the stack with: make down"

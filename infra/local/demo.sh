#!/usr/bin/env bash
# The whole janus-lab loop on the local stack, on the miniature study: the shipped `mini` base
# (draws the world's scenes from text, has never seen an edit) fine-tuned on text-to-image plus
# edit records of the procedural world into a model that edits (docs/miniature.md).
# Run through `make demo` (which starts the stack first). Sizes can be set from the
# environment: DEMO_T2I, DEMO_EDITS (records), DEMO_STEPS (fine-tuning steps), DEMO_SWEEP_STEPS.
set -euo pipefail
cd "$(dirname "$0")/../.."
# shellcheck disable=SC1091
source run/stack/env.sh
PY=.venv/bin/python
RAY=.venv/bin/ray
RUN="demo-$(date +%Y%m%d-%H%M%S)"
WORLD=data/mini-world
DATASET="s3://${JANUS_BUCKET}/datasets/mini-world"
OUT="outputs/${RUN}"
mkdir -p "$OUT"

echo "== 1/8 the miniature world in the ShareGPT-4o-Image layout (${WORLD}), ingested to ${DATASET} (Ray Data)"
if [ ! -f "${WORLD}/text_to_image.json" ]; then
    "$PY" jobs/sample_data.py --world mini --out "$WORLD" --t2i "${DEMO_T2I:-1000}" --edits "${DEMO_EDITS:-2000}"
fi
"$PY" jobs/ingest.py --config jobs/configs/ingest_mini.yaml "source.path=${WORLD}" "output.uri=${DATASET}" \
    output.overwrite=true

echo "== 2/8 fine-tune the mini base on text-to-image + edits: ray job submit jobs/finetune.py (run ${RUN})"
LOG="run/${RUN}-finetune.log"
"$RAY" job submit --working-dir . -- python jobs/finetune.py --config jobs/configs/mini.yaml \
    "name=${RUN}" "data.uri=${DATASET}" "train.storage_path=s3://${JANUS_BUCKET}/runs" \
    "train.max_steps=${DEMO_STEPS:-400}" | tee "$LOG"
RUN_ID=$(sed -n 's/.*MLflow run id: \([0-9a-f]\{32\}\).*/\1/p' "$LOG" | tail -n 1)

echo "== 3/8 base vs fine-tuned on the held-out records, read by the world's exact scorer"
"$PY" jobs/evaluate_world.py "models=[mini,s3://${JANUS_BUCKET}/runs/${RUN}/export]" "labels=[base,fine-tuned]" \
    "output_dir=${OUT}/scores" cfg_weight=2 cfg_weight2=2

echo "== 4/8 register the export and promote it: janus-4o @champion only if it beats the champion on world_mean"
"$PY" jobs/promote.py "run_id=\"${RUN_ID}\"" metric=world_mean direction=maximize

echo "== 5/8 generate with models:/janus-4o@champion"
"$PY" jobs/generate.py "model=models:/janus-4o@champion" "prompt=a red circle on a blue background" \
    parallel_size=4 seed=0 "output_dir=${OUT}/generated"

echo "== 6/8 2 x 2 masking ablation x 2 seeds: ray job submit sweeps/masking_ablation.py (table: mean ± sd)"
"$RAY" job submit --working-dir . -- python sweeps/masking_ablation.py --config sweeps/configs/masking_mini.yaml \
    "name=masking-${RUN}" "overrides.data.uri=${DATASET}" "overrides.train.storage_path=s3://${JANUS_BUCKET}/sweeps/runs" \
    "overrides.train.max_steps=${DEMO_SWEEP_STEPS:-100}" "run.storage_path=s3://${JANUS_BUCKET}/sweeps"

echo "== 7/8 CFG sweep on the champion, scored by the world's scorer (w = 1 is no guidance)"
"$PY" sweeps/cfg_sweep.py --config sweeps/configs/cfg_mini.yaml "name=cfg-${RUN}" "model=models:/janus-4o@champion" \
    "best_settings=${OUT}/best_settings.yaml"

echo "== 8/8 serve the champion with the sweep's best setting: serve deploy, then a text-to-image and an edit request"
SERVE=.venv/bin/serve
SERVE_CONFIG="run/${RUN}-serve.yaml"   # serve/config.yaml with args.defaults_file = the sweep's best setting
sed "s|defaults_file: null|defaults_file: $(pwd)/${OUT}/best_settings.yaml|" serve/config.yaml > "$SERVE_CONFIG"
"$SERVE" deploy "$SERVE_CONFIG"
ENDPOINT="http://127.0.0.1:8000"
"$PY" - "$ENDPOINT" "${OUT}/served" <<'PYEOF'
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
                   data={"prompt": "make the background green", "n": "1", "seed": "0"}), "edit.png")
PYEOF

echo
echo "MLflow run:  ${MLFLOW_TRACKING_URI}/#/experiments (experiment janus-4o-mini, run ${RUN}, id ${RUN_ID})"
echo "Registry:    ${MLFLOW_TRACKING_URI}/#/models/janus-4o"
echo "Checkpoints and export: s3://${JANUS_BUCKET}/runs/${RUN}/   Scores and images: ${OUT}/ (scores/, generated/, served/)"
echo "Playground:  ${ENDPOINT}/   (a web page: prompt, settings, upload, the image growing as it streams)"
echo "Server:      ${ENDPOINT}/v1/images/generations (serve status; serve shutdown -y stops it)"
echo "Stop the stack with: make down"

#!/usr/bin/env bash
# Screenshots of the MLflow UI on a tiny demo run (README "From the model registry"): the training previews,
# the dataset input and the registered generator. Writes benchmarks/results/mlflow-ui-*.png.
#
#   bash benchmarks/mlflow_ui_screenshots.sh            # needs chromium (apt-get install -y chromium); ~2 min CPU
#
# Everything stays on 127.0.0.1: a sqlite store in a temp folder, `mlflow server --workers 1` on a free port
# (stopped by its PID), headless Chromium.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python}
OUT=${OUT:-benchmarks/results}
KEEP=${WORK:-}                    # WORK=<folder>: keep the demo job there (a second run only takes the screenshots)
WORK=${WORK:-$(mktemp -d)}
URI="sqlite:///$WORK/mlflow.db"
NAME=demo-generator
SERVER=""
cleanup() { [ -n "$SERVER" ] && kill "$SERVER" 2>/dev/null; [ -n "$KEEP" ] || rm -rf "$WORK"; }
trap cleanup EXIT

over=(experiment=demo_2d model=unet_tiny "paths.output_dir=$WORK/job" "tracking.uri=$URI" "tracking.register=$NAME"
  training.max_steps=60 training.batch_size=16 training.ckpt_every=60 training.log_every=10 training.preview_every=20
  data.demo.n_per_class=10)
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-2}
if [ ! -f "$WORK/job/train/checkpoints/last.pt" ]; then
  nice -n 10 "$PY" -m pipelines.prepare "${over[@]}" >"$WORK/prepare.log" 2>&1
  nice -n 10 "$PY" -m pipelines.train "${over[@]}" >"$WORK/train.log" 2>&1
fi

read -r EXP RUN PREVIEW < <("$PY" - "$URI" <<'EOF'
import sys
from mlflow.tracking import MlflowClient
c = MlflowClient(sys.argv[1])
exp = c.get_experiment_by_name("medaug-demo_2d")
run = c.search_runs([exp.experiment_id], order_by=["attributes.start_time DESC"])[0]
previews = [a.path for a in c.list_artifacts(run.info.run_id, "images") if a.path.endswith(".png")]
last = max(previews, key=lambda p: int(p.split("+step+")[1].split("+")[0]))  # the last step's preview grid
print(exp.experiment_id, run.info.run_id, last)
EOF
)
PORT=$("$PY" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
MLFLOW_SERVER_ENABLE_JOB_EXECUTION=false nice -n 10 "$PY" -m mlflow server --workers 1 --host 127.0.0.1 \
  --port "$PORT" --backend-store-uri "$URI" >"$WORK/server.log" 2>&1 &
SERVER=$!
for _ in $(seq 60); do curl -sf "http://127.0.0.1:$PORT/health" >/dev/null && break; sleep 1; done

BASE="http://127.0.0.1:$PORT/#"
shot() {  # shot <name> <url>: a 1400x1000 PNG after the page's scripts had 20 s (virtual time) to render
  chromium --headless --no-sandbox --disable-gpu --hide-scrollbars --window-size=1400,1000 \
    --virtual-time-budget=20000 --screenshot="$OUT/mlflow-ui-$1.png" "$2" >/dev/null 2>&1
  echo "$OUT/mlflow-ui-$1.png <- $2"
}
mkdir -p "$OUT"
shot run-overview "$BASE/experiments/$EXP/runs/$RUN"
shot preview "$BASE/experiments/$EXP/runs/$RUN/artifacts/$PREVIEW"
shot registered-model "$BASE/models/$NAME/versions/1"

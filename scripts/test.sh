#!/usr/bin/env bash
# The test command: installs what the tests need (scripts/setup.sh --services), then runs the whole suite:
# first every test but the container test, then the container test (marker `containers`: builds the images
# with podman and starts compose.yaml, about 10 minutes; it installs podman itself and skips itself when not root
# or with less than 25 GB free). Extra arguments go to both pytest runs.
# Tests start their own servers (redis-server, an S3 server, gRPC services, a Celery worker, Orthanc) on loopback.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh --services
if [ -z "${CFRSEG_LA_DIR:-}" ] && [ -d ../shared/data/la2018 ]; then
  export CFRSEG_LA_DIR="$(cd ../shared/data/la2018 && pwd)"
fi
[ -n "${CFRSEG_LA_DIR:-}" ] || echo "[test] CFRSEG_LA_DIR not set and ../shared/data/la2018 absent: LA tests will be skipped"
if [ -z "${CFRSEG_ACDC_DIR:-}" ] && [ -d ../shared/data/acdc ]; then
  export CFRSEG_ACDC_DIR="$(cd ../shared/data/acdc && pwd)"
fi
[ -n "${CFRSEG_ACDC_DIR:-}" ] || echo "[test] CFRSEG_ACDC_DIR not set and ../shared/data/acdc absent: ACDC tests will be skipped"
.venv/bin/python -m pytest tests -m "not containers" "$@"
rc=0
.venv/bin/python -m pytest tests -m containers "$@" || rc=$?
[ "$rc" = 5 ] && rc=0   # 5: the extra arguments selected no container test
exit "$rc"

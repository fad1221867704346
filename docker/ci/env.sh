#!/usr/bin/env bash
# Runs a command with this engine's settings:  bash docker/ci/env.sh podman ps -a
source "$(dirname "$0")/lib.sh"
exec "$@"

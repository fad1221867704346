#!/usr/bin/env bash
# Starts/stops what stands in for a Docker engine:  bash docker/ci/engine.sh prepare|start|stop|status
#   prepare: install the tools (apt, once) and write the engine's configs (lib.sh); start does it too.
#   - `podman system service`: the Docker-compatible API on $CFRSEG_CTR_DIR/run/podman.sock (DOCKER_HOST) that
#     Compose v2 talks to;
#   - healthchecks.sh: podman schedules healthchecks with systemd timers; without systemd nothing runs them and
#     `depends_on: service_healthy` / `up --wait` never succeed, so this loop plays the timer.
# Both run in the background with pid files in $CFRSEG_CTR_DIR/run, logs in $CFRSEG_CTR_DIR/logs.
source "$(dirname "$0")/lib.sh"

running() { [ -s "$CTR_DIR/run/$1.pid" ] && kill -0 "$(cat "$CTR_DIR/run/$1.pid")" 2>/dev/null; }

start() {
  prepare
  if ! running podman-service; then
    rm -f "$CTR_DIR/run/podman.sock"
    setsid podman system service --time=0 "$DOCKER_HOST" >"$CTR_DIR/logs/podman-service.log" 2>&1 &
    echo $! > "$CTR_DIR/run/podman-service.pid"
  fi
  if ! running healthchecks; then
    setsid bash "$CI_DIR/healthchecks.sh" >"$CTR_DIR/logs/healthchecks.log" 2>&1 &
    echo $! > "$CTR_DIR/run/healthchecks.pid"
  fi
  for _ in $(seq 100); do [ -S "$CTR_DIR/run/podman.sock" ] && break; sleep 0.1; done
  [ -S "$CTR_DIR/run/podman.sock" ] || { log "podman system service did not start: $CTR_DIR/logs/podman-service.log"; exit 1; }
  log "engine up: DOCKER_HOST=$DOCKER_HOST"
}

stop() {
  local name pid
  for name in healthchecks podman-service; do
    if running "$name"; then
      pid=$(cat "$CTR_DIR/run/$name.pid")
      kill "$pid" 2>/dev/null || true
      for _ in $(seq 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
      kill -9 "$pid" 2>/dev/null || true
    fi
    rm -f "$CTR_DIR/run/$name.pid"
  done
  log "engine stopped"
}

case "${1:-}" in
  prepare) prepare ;;
  start) start ;;
  stop) stop ;;
  status) for n in podman-service healthchecks; do running "$n" && echo "$n: running" || echo "$n: stopped"; done ;;
  *) echo "usage: $0 prepare|start|stop|status" >&2; exit 2 ;;
esac

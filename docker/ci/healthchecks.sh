#!/usr/bin/env bash
# Plays podman's healthcheck timer (podman schedules healthchecks with systemd timers; there is no systemd here):
# runs each running container's healthcheck every 2 s while it is "starting" (so `up --wait` sees it healthy soon
# after it is), then at the container's own healthcheck interval. Results are recorded by podman as usual
# (podman ps, inspect). Started and stopped by engine.sh.
source "$(dirname "$0")/lib.sh"
trap 'exit 0' TERM INT
declare -A due=()
while :; do
  now=$(date +%s)
  ids=$(podman ps -q --filter health=starting --filter health=healthy --filter health=unhealthy 2>/dev/null || true)
  if [ -n "$ids" ]; then
    # shellcheck disable=SC2086
    while read -r id status interval; do
      interval=${interval%.*}; [ "${interval:-0}" -gt 0 ] 2>/dev/null || interval=30
      if [ "$status" = starting ] || [ "${due[$id]:-0}" -le "$now" ]; then
        timeout 60 podman healthcheck run "$id" </dev/null >/dev/null 2>&1 || true   # not our stdin
        due[$id]=$(( $(date +%s) + interval ))
      fi
    done < <(podman inspect --format '{{.ID}} {{.State.Health.Status}} {{.Config.Healthcheck.Interval.Seconds}}' \
               $ids 2>/dev/null || true)
  fi
  sleep 2
done

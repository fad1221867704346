#!/usr/bin/env bash
# Builds the images the stack needs, without a Docker engine:  bash docker/ci/images.sh [base|project|all]
#   base     LOCAL STAND-INS for the third-party images (no registry is reachable here). They are NOT the official
#            images: a Debian bookworm base made with mmdebstrap from the host's own apt sources, then
#            python:3.11-slim (Debian's CPython 3.11), redis:7.2-alpine (Debian's redis 7.0) and an S3 server
#            (nanio behind a MinIO-like entrypoint; compose runs it through MINIO_IMAGE).
#   project  every target of the unchanged docker/Dockerfile, tagged as compose.yaml names them (cfrseg-<t>:latest).
# Images live in $CFRSEG_CTR_DIR/storage (see lib.sh); `--layers` keeps the build cache there.
source "$(dirname "$0")/lib.sh"
what=${1:-all}
TARGETS=(finetune pseudolabel retrain gateway worker tools)
S3_STANDIN=localhost/cfrseg-ci/s3-standin:latest
bud() { nice -n 19 buildah bud --layers --pull=never --format docker "$@"; }

host_debian_sources() {  # the host's own Debian apt sources, pasted into the base image (no mirror in the repo)
  local f
  for f in /etc/apt/sources.list.d/debian.sources /etc/apt/sources.list; do
    [ -s "$f" ] && { echo "$f"; return 0; }
  done
  log "no Debian apt sources on this host (/etc/apt/sources.list[.d/debian.sources])"; return 1
}

base() {
  if ! podman image exists localhost/debian:bookworm-slim; then
    local src tar=$CTR_DIR/bookworm.tar
    src=$(host_debian_sources)
    log "debian:bookworm-slim (stand-in) with mmdebstrap from $src"
    nice -n 19 mmdebstrap --quiet --variant=minbase --include=ca-certificates \
      --aptopt='Apt::Install-Recommends "false"' --aptopt='Acquire::Check-Valid-Until "false"' \
      --dpkgopt='path-exclude=/usr/share/man/*' --dpkgopt='path-exclude=/usr/share/doc/*' \
      --dpkgopt='path-exclude=/usr/share/locale/*' --customize-hook='rm -rf "$1"/var/lib/apt/lists/*' \
      bookworm "$tar" "$src"
    podman import --change 'CMD ["bash"]' "$tar" localhost/debian:bookworm-slim >/dev/null
    rm -f "$tar"
  fi
  log "stand-ins: python:3.11-slim, redis:7.2-alpine, $S3_STANDIN"
  bud -t docker.io/library/python:3.11-slim "$CI_DIR/standins/python"
  bud -t docker.io/library/redis:7.2-alpine "$CI_DIR/standins/redis"
  bud -t "$S3_STANDIN" "$CI_DIR/standins/s3"
}

project() {
  local t
  for t in "${TARGETS[@]}"; do   # the first one pays for the torch layer (~4 min), the others take seconds
    log "cfrseg-$t:latest"
    bud -f "$ROOT/docker/Dockerfile" --ignorefile "$ROOT/docker/Dockerfile.dockerignore" --target "$t" \
      -t "cfrseg-$t:latest" "$ROOT"
  done
  podman image prune -f >/dev/null   # dangling images of earlier builds
}

prepare
case "$what" in
  base) base ;;
  project) project ;;
  all) base; project ;;
  *) echo "usage: $0 [base|project|all]" >&2; exit 2 ;;
esac

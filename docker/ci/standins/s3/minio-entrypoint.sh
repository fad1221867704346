#!/bin/sh
# MinIO-like entrypoint for the nanio stand-in: credentials from MINIO_ROOT_USER/_PASSWORD or their _FILE
# variants (a path, or a compose secret name under /run/secrets), then `server DIR` serves DIR on port 9000.
set -e
secret() { case "$1" in /*) cat "$1" ;; *) cat "/run/secrets/$1" ;; esac; }
[ -n "$MINIO_ROOT_USER_FILE" ] && MINIO_ROOT_USER=$(secret "$MINIO_ROOT_USER_FILE")
[ -n "$MINIO_ROOT_PASSWORD_FILE" ] && MINIO_ROOT_PASSWORD=$(secret "$MINIO_ROOT_PASSWORD_FILE")
export NANIO_ACCESS_KEY="${MINIO_ROOT_USER:-minioadmin}" NANIO_SECRET_KEY="${MINIO_ROOT_PASSWORD:-minioadmin}"
if [ "$1" = server ]; then
  mkdir -p "$2"
  exec nanio serve --host 0.0.0.0 --port 9000 --data-dir "$2"
fi
exec "$@"

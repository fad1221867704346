#!/bin/sh
# stand-in entrypoint: Debian's redis.conf defaults aside, listen on every interface of the container
if [ "$1" = redis-server ]; then shift; set -- redis-server --bind 0.0.0.0 --protected-mode no "$@"; fi
exec "$@"

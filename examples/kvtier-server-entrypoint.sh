#!/bin/sh
# Container entrypoint for the kvtier node cache: run it in its own container (or as a sidecar)
# that shares /dev/shm and the socket folder with the engine containers on the same host:
#
#   docker run -d --name kvtier-cache --ipc=shareable -v kvtier-run:/run/kvtier \
#       -e KVTIER_MAX_BYTES=32GiB IMAGE /entrypoint.sh
#   docker run ... --ipc=container:kvtier-cache -v kvtier-run:/run/kvtier \
#       -e KVTIER_NODE__SOCKET=/run/kvtier/node.sock ENGINE-IMAGE ...
#
# Engines and server must run as the same uid (segments and socket are 0600) and share the IPC
# namespace (--ipc), so that the engines can map the server's segments in /dev/shm. Give the
# container a /dev/shm larger than the cache (--shm-size): the memory is allocated there at start.
set -eu

SOCKET="${KVTIER_SOCKET:-/run/kvtier/node.sock}"
MAX_BYTES="${KVTIER_MAX_BYTES:-4GiB}"
SLOT_BYTES="${KVTIER_SLOT_BYTES:-1MiB}"
LEASE_TIMEOUT_S="${KVTIER_LEASE_TIMEOUT_S:-30}"

# exec: the server replaces this shell (it is PID 1), so `docker stop` (SIGTERM) reaches it and it
# removes its socket and segments before the container exits. Extra arguments are passed through.
exec kvtier server --socket "$SOCKET" --max-bytes "$MAX_BYTES" --slot-bytes "$SLOT_BYTES" \
    --lease-timeout-s "$LEASE_TIMEOUT_S" "$@"

#!/usr/bin/env bash
# A PostgreSQL server for the tests, on 127.0.0.1 only: installs Debian's postgresql when missing (as root), starts a
# throwaway cluster (trust auth, loopback) unless one already answers, and prints its URL on the last line.
# Idempotent: the test suite calls it when FEWVISION_TEST_POSTGRES is not set; .ci/run calls it before make test.
set -euo pipefail
PORT=${FEWVISION_PG_PORT:-54329}
DIR=${FEWVISION_PG_DIR:-/tmp/fewvision-test-pg}
URL="postgresql://fewvision@127.0.0.1:${PORT}/fewvision_test"

if ! ls /usr/lib/postgresql/*/bin/postgres >/dev/null 2>&1; then
  if [ "$(id -u)" != 0 ]; then
    echo "PostgreSQL is not installed; run as root: apt-get install -y postgresql" >&2
    exit 1
  fi
  (apt-get install -y -q postgresql || (apt-get update -q && apt-get install -y -q postgresql)) >/dev/null
fi
BIN=$(ls -d /usr/lib/postgresql/*/bin | sort -V | tail -n 1)

as_owner() {  # the server refuses to run as root
  if [ "$(id -u)" = 0 ]; then runuser -u postgres -- "$@"; else "$@"; fi
}

if ! "$BIN/pg_isready" -q -h 127.0.0.1 -p "$PORT"; then
  rm -rf "$DIR"
  mkdir -p "$DIR"
  [ "$(id -u)" = 0 ] && chown postgres "$DIR"
  as_owner "$BIN/initdb" -D "$DIR/data" -A trust -U fewvision -E UTF8 >/dev/null
  as_owner "$BIN/pg_ctl" -D "$DIR/data" -l "$DIR/server.log" -w \
    -o "-c listen_addresses=127.0.0.1 -p $PORT -k $DIR -c fsync=off -c max_connections=200" start >/dev/null
  "$BIN/createdb" -h 127.0.0.1 -p "$PORT" -U fewvision fewvision_test
fi
echo "$URL"

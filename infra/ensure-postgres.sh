#!/usr/bin/env bash
# The PostgreSQL server binaries the saga tests need (tests/sagas/pg.py starts a private server
# from them on a free port): installed from the system packages when missing. Debian may also
# start its own cluster on 5432, which nothing uses. Run by `make test`.
set -euo pipefail

pg_initdb() { ls -1 /usr/lib/postgresql/*/bin/initdb 2>/dev/null | sort -V | tail -n 1 || true; }
if [ -z "$(pg_initdb)" ] && [ -z "${BACKBEAT_TEST_POSTGRES_URL:-}" ]; then
    echo "make: installing PostgreSQL from the system packages (apt-get install postgresql)"
    sudo=""
    [ "$(id -u)" -eq 0 ] || sudo="sudo"
    $sudo apt-get update -qq
    $sudo env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq postgresql >/dev/null
fi
if [ -n "${BACKBEAT_TEST_POSTGRES_URL:-}" ]; then
    echo "make: saga tests use the PostgreSQL at BACKBEAT_TEST_POSTGRES_URL"
    exit 0
fi
initdb="$(pg_initdb)"
if [ -z "$initdb" ]; then
    echo "make: no /usr/lib/postgresql/*/bin/initdb after installing postgresql" >&2
    exit 1
fi
echo "make: saga tests use PostgreSQL $("$initdb" --version | awk '{print $3}') from $(dirname "$initdb")"

#!/usr/bin/env bash
# The PostgreSQL server binaries the saga tests need (tests/sagas/pg.py starts a private server
# from them on a free port): installed from the system packages with apt-get when missing. Debian
# may also start its own cluster on 5432, which nothing uses. Run by `make test`.
#
# Where they cannot be installed (no apt-get, no root and no sudo, the install failed) this says
# so and what to install, and exits 0: the rest of the suite still runs, and the PostgreSQL saga
# tests fail with the same explanation (they are never skipped).
set -uo pipefail

# Where Debian/Ubuntu install the server binaries (overridable for tests/infra/test_ensure_postgres.py).
PG_LIB_DIR="${PG_LIB_DIR:-/usr/lib/postgresql}"

pg_bindir() {
    local initdb
    initdb="$(ls -1 "$PG_LIB_DIR"/*/bin/initdb 2>/dev/null | sort -V | tail -n 1)"
    [ -n "$initdb" ] || initdb="$(command -v initdb 2>/dev/null)"
    if [ -n "$initdb" ] && [ -x "$(dirname "$initdb")/pg_ctl" ] && [ -x "$(dirname "$initdb")/postgres" ]; then
        dirname "$initdb"
    fi
}

missing() {  # $1: why it could not be installed
    cat >&2 <<EOF
make: WARNING: PostgreSQL is not installed and $1.
make:   The PostgreSQL saga tests (tests/sagas: the event store contract on PostgreSQL, the fault
make:   run) will FAIL without it; everything else runs. Install the PostgreSQL server, e.g.
make:     Debian/Ubuntu:  apt-get install -y postgresql
make:     Fedora/RHEL:    dnf install postgresql-server
make:     macOS:          brew install postgresql
make:   (initdb, pg_ctl and postgres under /usr/lib/postgresql/<version>/bin or on PATH), or set
make:   BACKBEAT_TEST_POSTGRES_URL=postgresql://user@host:port/db to a server where the tests may
make:   create databases. Then run 'make test' again.
EOF
    exit 0
}

if [ -n "${BACKBEAT_TEST_POSTGRES_URL:-}" ]; then
    echo "make: saga tests use the PostgreSQL at BACKBEAT_TEST_POSTGRES_URL"
    exit 0
fi

if [ -z "$(pg_bindir)" ]; then
    command -v apt-get >/dev/null 2>&1 || missing "apt-get is not available to install it"
    sudo=""
    if [ "$(id -u)" -ne 0 ]; then
        command -v sudo >/dev/null 2>&1 || missing "installing it needs root (no sudo here)"
        sudo="sudo"
    fi
    echo "make: installing PostgreSQL from the system packages ($sudo apt-get install postgresql)"
    $sudo apt-get update -qq || missing "'$sudo apt-get update' failed"
    $sudo env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq postgresql >/dev/null \
        || missing "'$sudo apt-get install postgresql' failed"
fi

bindir="$(pg_bindir)"
[ -n "$bindir" ] || missing "no initdb, pg_ctl and postgres were found after installing it"
echo "make: saga tests use PostgreSQL $("$bindir/initdb" --version | awk '{print $3}') from $bindir"

# Start a throwaway local PostgreSQL server for the store tests and export its URL.
#
#   source .ci/postgres.sh          # installs PostgreSQL if missing, starts it, exports BLIP2_TEST_POSTGRES_URL
#   bash .ci/postgres.sh --stop     # stops it again (fast shutdown; nothing to do when it is not running)
#
# Idempotent: a second `source` finds the cluster running and only re-exports the URL. The cluster lives in
# $BLIP2_PG_DIR (default /tmp/blip2-ci-postgres), listens on 127.0.0.1:$BLIP2_PG_PORT (default 54329) and a unix
# socket in the same directory, so it never touches a system cluster on 5432. A `source` that started the server
# sets BLIP2_PG_STARTED=1 (0 when it was already running), so a caller can stop only a server it started.
#
# Meant to be sourced by a `set -euo pipefail` shell: everything runs in a function that returns non-zero on failure
# and leaves the caller's options alone. Also works when executed (`bash .ci/postgres.sh`): it then prints the export line.

_blip2_pg_bindir() {  # newest /usr/lib/postgresql/<ver>/bin with initdb, else initdb on PATH
    local d
    d="$(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V | tail -n 1 || true)"
    if [ -n "$d" ] && [ -x "$d/initdb" ]; then echo "$d"; return 0; fi
    if command -v initdb >/dev/null 2>&1; then dirname "$(command -v initdb)"; return 0; fi
    return 1
}

_blip2_pg_main() {
    local dir="${BLIP2_PG_DIR:-/tmp/blip2-ci-postgres}"
    local port="${BLIP2_PG_PORT:-54329}"
    local user=blip2 password=blip2 db=blip2_test
    local bin=""
    BLIP2_PG_STARTED=0

    if ! bin="$(_blip2_pg_bindir)"; then
        echo "postgres.sh: installing PostgreSQL (apt-get)" >&2
        local sudo=""
        [ "$(id -u)" -eq 0 ] || sudo="sudo"
        $sudo apt-get update -q >&2 || return 1
        DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -q postgresql >&2 || return 1
        bin="$(_blip2_pg_bindir)" || { echo "postgres.sh: initdb not found after install" >&2; return 1; }
    fi

    # initdb and the server refuse to run as root: run them as the postgres user then.
    local -a as_pg=()
    if [ "$(id -u)" -eq 0 ]; then
        id postgres >/dev/null 2>&1 || useradd --system --home-dir /var/lib/postgresql --shell /bin/bash postgres || return 1
        as_pg=(runuser -u postgres --)
    fi

    mkdir -p "$dir" || return 1
    [ "$(id -u)" -eq 0 ] && chown postgres: "$dir"
    chmod 700 "$dir"

    if [ ! -s "$dir/data/PG_VERSION" ]; then
        local pwfile="$dir/pw"
        ( umask 077; echo "postgres" > "$pwfile" )
        [ "$(id -u)" -eq 0 ] && chown postgres: "$pwfile"
        "${as_pg[@]}" "$bin/initdb" -D "$dir/data" -U postgres --pwfile="$pwfile" --auth-local=trust \
            --auth-host=scram-sha-256 -E UTF8 --locale=C.UTF-8 >"$dir/initdb.log" 2>&1 \
            || { echo "postgres.sh: initdb failed, see $dir/initdb.log" >&2; rm -f "$pwfile"; return 1; }
        rm -f "$pwfile"
    fi

    if ! "${as_pg[@]}" "$bin/pg_ctl" -D "$dir/data" status >/dev/null 2>&1; then
        BLIP2_PG_STARTED=1  # before the start itself: a server that comes up late is still ours to stop
        "${as_pg[@]}" "$bin/pg_ctl" -D "$dir/data" -l "$dir/server.log" -w -t 60 \
            -o "-c listen_addresses=127.0.0.1 -c port=$port -c unix_socket_directories=$dir -c fsync=off" start >&2 \
            || { echo "postgres.sh: server did not start, see $dir/server.log" >&2; return 1; }
    fi

    local -a psql=("${as_pg[@]}" "$bin/psql" -h "$dir" -p "$port" -U postgres -d postgres -v ON_ERROR_STOP=1 -qAtX)
    if [ "$("${psql[@]}" -c "SELECT 1 FROM pg_roles WHERE rolname = '$user'")" != "1" ]; then
        "${psql[@]}" -c "CREATE ROLE $user LOGIN PASSWORD '$password'" || return 1
    fi
    if [ "$("${psql[@]}" -c "SELECT 1 FROM pg_database WHERE datname = '$db'")" != "1" ]; then
        "${psql[@]}" -c "CREATE DATABASE $db OWNER $user" || return 1
    fi

    export BLIP2_TEST_POSTGRES_URL="postgresql+psycopg://$user:$password@127.0.0.1:$port/$db"
    echo "export BLIP2_TEST_POSTGRES_URL=$BLIP2_TEST_POSTGRES_URL"
}

_blip2_pg_stop() {
    local dir="${BLIP2_PG_DIR:-/tmp/blip2-ci-postgres}"
    local bin
    [ -s "$dir/data/PG_VERSION" ] || return 0  # no cluster here: nothing was started
    bin="$(_blip2_pg_bindir)" || { echo "postgres.sh: pg_ctl not found" >&2; return 1; }
    local -a as_pg=()
    [ "$(id -u)" -eq 0 ] && as_pg=(runuser -u postgres --)
    if "${as_pg[@]}" "$bin/pg_ctl" -D "$dir/data" status >/dev/null 2>&1; then
        # fast: roll back open sessions instead of waiting for clients (a killed test run may leave some)
        "${as_pg[@]}" "$bin/pg_ctl" -D "$dir/data" -m fast -w -t 60 stop >&2 || return 1
    fi
    unset BLIP2_TEST_POSTGRES_URL
}

# Inside `if`, a caller's errexit is off for the function body; each step checks its own status instead.
if [ "${1:-}" = "--stop" ]; then
    if _blip2_pg_stop; then _blip2_pg_status=0; else _blip2_pg_status=$?; fi
    [ "$_blip2_pg_status" -eq 0 ] || echo "postgres.sh: PostgreSQL could not be stopped" >&2
else
    if _blip2_pg_main; then _blip2_pg_status=0; else _blip2_pg_status=$?; fi
    [ "$_blip2_pg_status" -eq 0 ] || echo "postgres.sh: PostgreSQL could not be started" >&2
fi
unset -f _blip2_pg_main _blip2_pg_stop _blip2_pg_bindir
# `return` when sourced, `exit` when executed.
(return 0 2>/dev/null) && { return "$_blip2_pg_status"; } || exit "$_blip2_pg_status"

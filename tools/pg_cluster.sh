#!/usr/bin/env bash
# A throwaway PostgreSQL cluster for the tests (and .ci/run).
#
#   eval "$(tools/pg_cluster.sh start DIR)"   # prints export COLLAB_TRIO_TEST_DATABASE_URL=...
#   tools/pg_cluster.sh stop DIR              # stops it and deletes DIR
#
# The cluster lives in DIR (created; it must not hold one already), listens on
# a unix socket in DIR only (no TCP port to collide with), trusts local
# connections, and has a database `collab` owned by the superuser `postgres`.
# Durability settings are off: the data is thrown away, and the tests never
# crash Postgres itself. Run as root, the server runs as the `postgres` user
# (initdb refuses root); the `postgresql` Debian package is installed when no
# initdb is found.
set -euo pipefail

usage() { echo "usage: $0 start|stop DIR" >&2; exit 2; }
[ $# -eq 2 ] || usage
action=$1
dir=$2

find_bin() {
    local found
    for found in /usr/lib/postgresql/*/bin; do
        if [ -x "$found/initdb" ]; then
            echo "$found"
            return 0
        fi
    done
    return 1
}

as_owner() {
    if [ "$(id -u)" = 0 ]; then
        runuser -u postgres -- "$@"
    else
        "$@"
    fi
}

bin=$(find_bin || true)
if [ -z "$bin" ] && [ "$action" = start ]; then
    echo "pg_cluster: no PostgreSQL found; installing the postgresql package" >&2
    if [ "$(id -u)" != 0 ]; then
        echo "pg_cluster: run as root to install it, or install postgresql yourself" >&2
        exit 1
    fi
    apt-get update -qq >&2
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq postgresql >/dev/null
    bin=$(find_bin)
fi

case "$action" in
start)
    if [ -e "$dir/data" ]; then
        echo "pg_cluster: $dir already holds a cluster" >&2
        exit 1
    fi
    mkdir -p "$dir"
    if [ "$(id -u)" = 0 ]; then
        chown postgres: "$dir"
    fi
    as_owner "$bin/initdb" -D "$dir/data" -U postgres --auth=trust -E UTF8 --locale=C.UTF-8 >"$dir/initdb.log" 2>&1 \
        || { cat "$dir/initdb.log" >&2; exit 1; }
    as_owner "$bin/pg_ctl" -D "$dir/data" -l "$dir/server.log" -w -t 60 start \
        -o "-c listen_addresses='' -k $dir -c fsync=off -c full_page_writes=off -c max_connections=300" >/dev/null \
        || { cat "$dir/server.log" >&2; exit 1; }
    as_owner "$bin/psql" -h "$dir" -U postgres -d postgres -q -c "CREATE DATABASE collab" >/dev/null
    echo "export COLLAB_TRIO_TEST_DATABASE_URL='postgresql://postgres@/collab?host=$dir'"
    ;;
stop)
    if [ -n "$bin" ] && [ -e "$dir/data/postmaster.pid" ]; then
        as_owner "$bin/pg_ctl" -D "$dir/data" -m immediate -w stop >/dev/null 2>&1 || true
    fi
    rm -rf "$dir"
    ;;
*)
    usage
    ;;
esac

#!/usr/bin/env bash
# Quick checks on your own machine after `pip install '.[qt]'`:
#   [1/4] start `collab-trio serve` on 127.0.0.1:PORT
#   [2/4] the PyQt6 smoke client against it (tools/qt_smoke_client.py)
#   [3/4] the multi-client integration run against it (tools/collab_integration.py --url)
#   [4/4] stop the server with SIGTERM and check that the port can be bound again
#
# Usage: tools/run_tests.sh [PORT]  or  tools/run_tests.sh --port PORT
#   PORT defaults to 8765; 0 picks a free port (read from the server's log).
#   PYTHON=/path/to/python selects the interpreter (default: python3).
# Exits 0 only when every check passes; the server is always stopped.
set -euo pipefail

usage() {
    sed -n '2,11p' "$0" | sed 's/^# \{0,1\}//'
}

# -- arguments -------------------------------------------------------------------

port=8765
port_given=""
while [ $# -gt 0 ]; do
    case $1 in
        -h | --help)
            usage
            exit 0
            ;;
        --port)
            if [ $# -lt 2 ]; then
                echo "error: --port needs a value" >&2
                exit 2
            fi
            port=$2
            shift 2
            ;;
        --port=*)
            port=${1#--port=}
            shift
            ;;
        -*)
            echo "error: unknown option: $1" >&2
            usage >&2
            exit 2
            ;;
        *)
            if [ -n "$port_given" ]; then
                echo "error: unexpected argument: $1" >&2
                usage >&2
                exit 2
            fi
            port=$1
            port_given=1
            shift
            ;;
    esac
done
case $port in
    '' | *[!0-9]*)
        echo "error: the port must be a number from 0 to 65535, not '$port'" >&2
        exit 2
        ;;
esac
if [ "${#port}" -gt 5 ] || [ "$port" -gt 65535 ]; then
    echo "error: the port must be a number from 0 to 65535, not '$port'" >&2
    exit 2
fi

root=$(cd "$(dirname "$0")/.." && pwd)
python=${PYTHON:-python3}
# The server runs in its own directory, so a relative interpreter path must become absolute.
case $python in
    */*) python=$(cd "$(dirname "$python")" && pwd)/$(basename "$python") ;;
esac
export QT_QPA_PLATFORM=${QT_QPA_PLATFORM:-offscreen}
export PYTHONUNBUFFERED=1

# Bounds for every wait below (each loop step sleeps 0.1 s).
START_STEPS=200     # 20 s for the server's "Listening on" line
STOP_STEPS=100      # 10 s for the server to exit after SIGTERM (then it is killed)
TOOL_LIMIT_S=180    # an outer limit for each client tool, when `timeout` exists

# -- state and cleanup ----------------------------------------------------------

server_pid=""
workdir=""
summary=""
failures=0
skipped=0

stop_server() {
    # SIGTERM, wait at most STOP_STEPS/10 s, then SIGKILL; sets stop_status and stop_how.
    stop_status=""
    stop_how="SIGTERM"
    kill -TERM "$server_pid" 2>/dev/null || true
    for _ in $(seq 1 "$STOP_STEPS"); do
        kill -0 "$server_pid" 2>/dev/null || break
        sleep 0.1
    done
    if kill -0 "$server_pid" 2>/dev/null; then
        kill -KILL "$server_pid" 2>/dev/null || true
        stop_how="SIGKILL (still running $((STOP_STEPS / 10)) s after SIGTERM)"
    fi
    stop_status=0
    wait "$server_pid" 2>/dev/null || stop_status=$?
    server_pid=""
}

cleanup() {
    local status=$?
    trap - EXIT INT TERM
    if [ -n "$server_pid" ]; then
        echo "cleanup: stopping the server (pid $server_pid)" >&2
        stop_server
    fi
    if [ -n "$workdir" ]; then
        rm -rf "$workdir"
    fi
    exit "$status"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

# -- helpers ---------------------------------------------------------------------

now_us() {
    # Microseconds; bash 5 has EPOCHREALTIME, older shells get whole seconds.
    if [ -n "${EPOCHREALTIME:-}" ]; then
        local t=${EPOCHREALTIME/[.,]/}
        echo "${t#0}"
    else
        echo $((SECONDS * 1000000))
    fi
}

seconds_since() {
    local us=$(($(now_us) - $1))
    printf '%d.%d s' $((us / 1000000)) $(((us / 100000) % 10))
}

record() {
    # record NUMBER NAME RESULT: one line of the summary
    summary="${summary}$(printf '  [%s/4] %-18s %s' "$1" "$2" "$3")"$'\n'
    case $3 in
        ok) ;;
        skipped) skipped=$((skipped + 1)) ;;
        *) failures=$((failures + 1)) ;;
    esac
}

indented() {
    # Run a command with its output indented, line by line as it comes; return its status.
    local status=0
    "$@" 2>&1 | while IFS= read -r line; do printf '      | %s\n' "$line"; done || status=$?
    return "$status"
}

server_gone=""
server_alive() {
    # True while the server runs. When it has stopped on its own (a crash, or a
    # Ctrl+C that reached it too), reap it once and say so.
    if [ -z "$server_pid" ]; then
        return 1
    fi
    if kill -0 "$server_pid" 2>/dev/null; then
        return 0
    fi
    local status=0
    wait "$server_pid" 2>/dev/null || status=$?
    server_pid=""
    server_gone="the server stopped on its own with exit status $status"
    echo "      ! $server_gone; last lines of its log:"
    tail -n 5 "$log" | sed 's/^/      | /'
    return 1
}

limit=""
if command -v timeout >/dev/null 2>&1; then
    limit="timeout $TOOL_LIMIT_S"
fi

# -- preflight -------------------------------------------------------------------

if ! command -v "$python" >/dev/null 2>&1; then
    echo "error: no Python interpreter '$python' (set PYTHON=/path/to/python)" >&2
    exit 1
fi
if ! import_error=$("$python" -c 'import collab_trio, PyQt6.QtWebSockets' 2>&1); then
    echo "error: $python cannot import collab_trio and PyQt6.QtWebSockets;" >&2
    echo "       install them with: pip install '.[qt]'" >&2
    echo "$import_error" | tail -n 3 | sed 's/^/       /' >&2
    exit 1
fi
version=$("$python" -m collab_trio --version 2>&1 || true)
echo "collab-trio quick checks: $version, $python"
workdir=$(mktemp -d "${TMPDIR:-/tmp}/collab-trio-checks.XXXXXX")
log=$workdir/server.log
: >"$log"  # exists before the server starts, so waiting on it never races its creation

# -- [1/4] start the server ------------------------------------------------------

url=""
started=$(now_us)
printf '[1/4] starting server on 127.0.0.1 port %s ... ' "$port"
# Its own directory and data dir: a server that stores sessions on disk leaves nothing behind.
(cd "$workdir" && COLLAB_TRIO_DATA_DIR=$workdir/collab-data exec "$python" -m collab_trio serve \
    --host 127.0.0.1 --port "$port") >"$log" 2>&1 &
server_pid=$!
for _ in $(seq 1 "$START_STEPS"); do
    if grep -q 'Listening on ws://' "$log" || ! kill -0 "$server_pid" 2>/dev/null; then
        break
    fi
    sleep 0.1
done
listening=$(grep -m 1 -o 'Listening on ws://[^ ]*' "$log" || true)
actual_port=$(printf '%s\n' "$listening" | sed -n 's|.*:\([0-9][0-9]*\)/ws/.*|\1|p')
if [ -n "$actual_port" ]; then
    url="ws://127.0.0.1:$actual_port"
    echo "ok: $url (pid $server_pid, $(seconds_since "$started"))"
    record 1 "start server" "ok"
else
    if kill -0 "$server_pid" 2>/dev/null; then
        echo "FAILED: no 'Listening on' line within $((START_STEPS / 10)) s"
    else
        status=0
        wait "$server_pid" || status=$?
        server_pid=""
        echo "FAILED: the server exited with status $status"
    fi
    sed 's/^/      | /' "$log"
    record 1 "start server" "FAILED"
fi

# -- [2/4] the Qt smoke client ---------------------------------------------------

if [ -n "$url" ] && server_alive; then
    echo "[2/4] Qt smoke client: tools/qt_smoke_client.py $url --duration 5 --interval 1"
    started=$(now_us)
    if indented $limit "$python" "$root/tools/qt_smoke_client.py" "$url" --duration 5 --interval 1; then
        echo "[2/4] Qt smoke client ... ok ($(seconds_since "$started"))"
        record 2 "Qt smoke client" "ok"
    else
        echo "[2/4] Qt smoke client ... FAILED ($(seconds_since "$started"))"
        record 2 "Qt smoke client" "FAILED"
    fi
else
    echo "[2/4] Qt smoke client ... skipped (${server_gone:-no server})"
    record 2 "Qt smoke client" "skipped"
fi

# -- [3/4] the integration run ---------------------------------------------------

if [ -n "$url" ] && server_alive; then
    echo "[3/4] integration: tools/collab_integration.py --url $url"
    started=$(now_us)
    if indented $limit "$python" "$root/tools/collab_integration.py" --url "$url"; then
        echo "[3/4] integration ... ok ($(seconds_since "$started"))"
        record 3 "integration" "ok"
    else
        echo "[3/4] integration ... FAILED ($(seconds_since "$started"))"
        record 3 "integration" "FAILED"
    fi
else
    echo "[3/4] integration ... skipped (${server_gone:-no server})"
    record 3 "integration" "skipped"
fi

# -- [4/4] stop the server and check the port ------------------------------------

if [ -n "$url" ] && server_alive; then
    started=$(now_us)
    printf '[4/4] stopping server (SIGTERM) ... '
    stop_server
    problems=""
    if [ "$stop_how" != "SIGTERM" ]; then
        problems="stopped by $stop_how; "
    fi
    if [ "$stop_status" != 0 ]; then
        problems="${problems}exit status $stop_status, expected 0; "
    fi
    # Bind the way a new server would (SO_REUSEADDR, as trio sets it).
    if "$python" -c 'import socket, sys; s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1); s.bind(("127.0.0.1", int(sys.argv[1]))); s.listen(); s.close()' "$actual_port" 2>"$workdir/bind.err"; then
        released="port $actual_port released"
    else
        released="port $actual_port NOT released: $(tail -n 1 "$workdir/bind.err")"
        problems="${problems}port $actual_port still in use; "
    fi
    if [ -z "$problems" ]; then
        echo "ok: exit status 0, $released ($(seconds_since "$started"))"
        record 4 "stop server" "ok"
    else
        echo "FAILED: ${problems%; } ($released)"
        echo "      server log:"
        sed 's/^/      | /' "$log"
        record 4 "stop server" "FAILED"
    fi
elif [ -n "$server_gone" ]; then
    echo "[4/4] stopping server ... FAILED: $server_gone before it was stopped"
    record 4 "stop server" "FAILED"
else
    echo "[4/4] stopping server ... skipped (no server)"
    record 4 "stop server" "skipped"
fi

# -- summary ---------------------------------------------------------------------

echo
echo "summary:"
printf '%s' "$summary"
if [ "$failures" -eq 0 ] && [ "$skipped" -eq 0 ]; then
    echo "ALL 4 CHECKS PASSED"
    exit 0
fi
if [ "$skipped" -gt 0 ]; then
    echo "FAILED: $failures of 4 checks failed, $skipped skipped"
else
    echo "FAILED: $failures of 4 checks failed"
fi
exit 1

#!/usr/bin/env bash
# The same `gust` on its embedded store (sled) and on PostgreSQL, in one
# run: the HTTP hello (the `http-hello` fixture as a public wasi:http
# function) and `POST /v1/functions/hello/invoke` (the `hello` handler,
# authenticated, with its invocation record), each loaded by wrk, two
# interleaved rounds; then two hosts on one database, both loaded at once.
# Prints successful answers per second, p50, p99 and errors per run and the
# Postgres/sled ratios (target >= 0.8x).
#
#   benches/store.sh                          # starts PostgreSQL if needed
#   GUST_BENCH_POSTGRES=postgres://… benches/store.sh
#   GUST=/path/to/gust DURATION=20s benches/store.sh
#
# GUST_BENCH_POSTGRES is the URL of a role that may create databases; each
# host set gets a fresh database, dropped at the end. Without it,
# scripts/start-postgres.sh starts Debian's cluster (root). Needs wrk.
set -euo pipefail
cd "$(dirname "$0")/.."

DURATION="${DURATION:-10s}"
if ! command -v wrk >/dev/null; then
    apt-get update -qq && apt-get install -y -qq wrk
fi
admin="${GUST_BENCH_POSTGRES:-$(scripts/start-postgres.sh)}"
cargo build --release -q -p gust-host
cargo build -q -p gust-test-artifacts
target_dir="$(cargo metadata --format-version 1 --no-deps | sed -n 's/.*"target_directory":"\([^"]*\)".*/\1/p')"
guests="$target_dir/gust-guests/wasm32-wasip2/release"
http_component="$guests/http_hello.wasm"
hello_component="$guests/hello.wasm"
gust="${GUST:-$target_dir/release/gust}"

work="$(mktemp -d)"
pids=()
databases=()
psql_admin() { psql -q -v ON_ERROR_STOP=1 "$admin" -c "$1" >/dev/null; }
cleanup() {
    for pid in "${pids[@]}"; do kill "$pid" 2>/dev/null || true; done
    wait 2>/dev/null || true
    for db in "${databases[@]}"; do psql_admin "DROP DATABASE IF EXISTS $db WITH (FORCE)" || true; done
    rm -rf "$work"
}
trap cleanup EXIT

# A fresh database, dropped at the end; its URL in $url. (Not a command
# substitution: the list of databases to drop must outlive it.)
database() { # name
    local name="gust_bench_$1_$$"
    psql_admin "CREATE DATABASE $name"
    databases+=("$name")
    local root="${admin%%\?*}" query=""
    [[ "$admin" == *\?* ]] && query="?${admin#*\?}"
    url="${root%/*}/$name$query"
}

mkdir -p "$work/policies"
printf 'max_concurrency = 64\nmax_anonymous_concurrency = 64\n' >"$work/policies/default.toml"
cat >"$work/invoke.lua" <<'EOF'
wrk.method = "POST"
wrk.body = "Ada"
wrk.headers["Authorization"] = "Bearer " .. os.getenv("GUST_KEY")
wrk.headers["Content-Type"] = "text/plain"
EOF

wait_for() { # url
    for _ in $(seq 1 300); do
        if curl -s -o /dev/null "$1"; then return 0; fi
        sleep 0.1
    done
    echo "server at $1 did not come up" >&2
    cat "$work"/*.err >&2 || true
    exit 1
}

start() { # name port store [deploy]
    GUST_LOG=warn "$gust" serve --listen "127.0.0.1:$2" --data-dir "$work/$1" --store "$3" \
        --policies "$work/policies" --admin-key "gust_bench-admin-key-not-secret-0123456789abcd" \
        >"$work/$1.out" 2>"$work/$1.err" &
    pids+=($!)
    echo $! >"$work/$1.pid"
    wait_for "http://127.0.0.1:$2/healthz"
    if [ -n "${4:-}" ]; then
        local key
        key="$(cat "$work/$1/demo.key")"
        curl -sf -X PUT --data-binary @"$http_component" -H "Authorization: Bearer $key" \
            "http://127.0.0.1:$2/v1/functions/web?public=true" >/dev/null
        curl -sf -X PUT --data-binary @"$hello_component" -H "Authorization: Bearer $key" \
            "http://127.0.0.1:$2/v1/functions/hello" >/dev/null
        echo "$key" >"$work/$1.key"
    fi
}

wrk_run() { # connections key-file url
    if [ -n "$2" ]; then
        GUST_KEY="$(cat "$2")" wrk -t2 -c"$1" -d"$DURATION" --latency -s "$work/invoke.lua" "$3"
    else
        wrk -t2 -c"$1" -d"$DURATION" --latency "$3"
    fi
}

report() { # label wrk-output
    # Successful answers per second: wrk's req/s counts refusals too.
    local rps
    rps="$(awk '/ requests in / {n = $1; t = $4; sub(/s,$/, "", t)} /Non-2xx/ {bad = $5}
        END {printf "%.2f", (n - bad) / t}' <<<"$2")"
    printf '%-26s %10s ok/s   p50 %9s   p99 %9s   %s\n' "$1" "$rps" \
        "$(awk '$1 == "50%" {print $2}' <<<"$2")" \
        "$(awk '$1 == "99%" {print $2}' <<<"$2")" \
        "$(grep -E 'Non-2xx|Socket errors' <<<"$2" | tr '\n' ' ' || true)"
    echo "$rps" >"$work/rps.$(tr ' ()' '___' <<<"$1")"
}

run() { # label url [host-name-for-invoke]
    local key="" connections=32
    if [ -n "${3:-}" ]; then key="$work/$3.key"; connections=16; fi
    # Warm-up, then the measured run.
    if [ -n "$key" ]; then
        GUST_KEY="$(cat "$key")" wrk -t2 -c"$connections" -d2s -s "$work/invoke.lua" "$2" >/dev/null
    else
        wrk -t2 -c"$connections" -d2s "$2" >/dev/null
    fi
    report "$1" "$(wrk_run "$connections" "$key" "$2")"
}

start sled 18191 sled deploy
database single
start pg 18192 "$url" deploy
echo "$(date -u '+%F %T') UTC, $(nproc) cores; gust: $gust; $(psql -Atc 'SELECT version()' "$admin" | cut -d' ' -f1-2)"
for round in 1 2; do
    run "http sled ($round)" "http://127.0.0.1:18191/http/demo/web/"
    run "http postgres ($round)" "http://127.0.0.1:18192/http/demo/web/"
    run "invoke sled ($round)" "http://127.0.0.1:18191/v1/functions/hello/invoke" sled
    run "invoke postgres ($round)" "http://127.0.0.1:18192/v1/functions/hello/invoke" pg
done
for host in sled pg; do
    echo "RSS $host: $(awk '/^VmRSS/ {print $2, $3}' "/proc/$(cat "$work/$host.pid")/status")"
done
ratio() { # what
    awk -v what="$1" -v s1="$(cat "$work/rps.${1}_sled__1_")" -v s2="$(cat "$work/rps.${1}_sled__2_")" \
        -v p1="$(cat "$work/rps.${1}_postgres__1_")" -v p2="$(cat "$work/rps.${1}_postgres__2_")" \
        'BEGIN { printf "postgres/sled %-7s %.2fx (target >= 0.8x)\n", what, (p1 + p2) / (s1 + s2) }'
}
ratio http
ratio invoke
for host in sled pg; do kill "$(cat "$work/$host.pid")"; done

# Two hosts on one database, loaded at once (wrk's connections split over
# both): a shared load, every answer a success.
database shared
start a 18193 "$url" deploy
start b 18194 "$url"
cp "$work/a.key" "$work/b.key"
# Host B serves what A deployed once it has followed the deploy.
for _ in $(seq 1 100); do
    curl -sf -o /dev/null -X POST -H "Authorization: Bearer $(cat "$work/b.key")" \
        --data Ada "http://127.0.0.1:18194/v1/functions/hello/invoke" && break
    sleep 0.1
done
for what in http invoke; do
    if [ "$what" = http ]; then path=/http/demo/web/; key=""; else path=/v1/functions/hello/invoke; key=x; fi
    out_a="$work/two.$what.a"
    out_b="$work/two.$what.b"
    wrk_run 8 "${key:+$work/a.key}" "http://127.0.0.1:18193$path" >"$out_a" &
    load_a=$!
    wrk_run 8 "${key:+$work/b.key}" "http://127.0.0.1:18194$path" >"$out_b" &
    load_b=$!
    wait "$load_a" "$load_b"
    report "two hosts $what: A" "$(cat "$out_a")"
    report "two hosts $what: B" "$(cat "$out_b")"
done

#!/usr/bin/env bash
# A/B of two `gust` builds in one run: the HTTP hello (the `http-hello`
# fixture as a public wasi:http function, and the same component under
# `wasmtime serve` as the peer) and `POST /v1/functions/hello/invoke` (the
# `hello` handler), each loaded by wrk in turn, two interleaved rounds.
#
#   A=/path/to/old/gust B=target/release/gust benches/ab.sh
#   WASMTIME=/path/to/wasmtime A=… B=… benches/ab.sh
#
# Both hosts get max_concurrency and max_anonymous_concurrency of 64 (more
# than wrk's connections: this measures throughput, not the limits) and
# fresh data directories. wrk: 2 threads, 32 connections on the HTTP hello,
# 16 on invoke, a 2 s warm-up then DURATION (10s) per server. Prints req/s,
# p50 and p99 per run and each host's RSS at the end. Needs wrk and the
# test guests (`cargo build -p gust-test-artifacts`).
set -euo pipefail
cd "$(dirname "$0")/.."

: "${A:?A=path of the first gust binary}"
: "${B:?B=path of the second gust binary}"
DURATION="${DURATION:-10s}"
target_dir="$(cargo metadata --format-version 1 --no-deps | sed -n 's/.*"target_directory":"\([^"]*\)".*/\1/p')"
guests="$target_dir/gust-guests/wasm32-wasip2/release"
http_component="$guests/http_hello.wasm"
hello_component="$guests/hello.wasm"
[ -f "$http_component" ] && [ -f "$hello_component" ] || {
    echo "missing test guests: cargo build -p gust-test-artifacts" >&2
    exit 1
}

work="$(mktemp -d)"
pids=()
cleanup() { for pid in "${pids[@]}"; do kill "$pid" 2>/dev/null || true; done; rm -rf "$work"; }
trap cleanup EXIT

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
    exit 1
}

start() { # name binary port
    GUST_LOG=warn "$2" serve --listen "127.0.0.1:$3" --data-dir "$work/$1" \
        --policies "$work/policies" --admin-key "gust_bench-admin-key-not-secret-0123456789abcd" \
        >"$work/$1.out" 2>"$work/$1.err" &
    pids+=($!)
    echo $! >"$work/$1.pid"
    wait_for "http://127.0.0.1:$3/healthz"
    local key
    key="$(cat "$work/$1/demo.key")"
    curl -sf -X PUT --data-binary @"$http_component" -H "Authorization: Bearer $key" \
        "http://127.0.0.1:$3/v1/functions/web?public=true" >/dev/null
    curl -sf -X PUT --data-binary @"$hello_component" -H "Authorization: Bearer $key" \
        "http://127.0.0.1:$3/v1/functions/hello" >/dev/null
    echo "$key" >"$work/$1.key"
}

run() { # label url [host-name-for-invoke]
    local out
    if [ -n "${3:-}" ]; then
        export GUST_KEY
        GUST_KEY="$(cat "$work/$3.key")"
        wrk -t2 -c16 -d2s -s "$work/invoke.lua" "$2" >/dev/null
        out="$(wrk -t2 -c16 -d"$DURATION" --latency -s "$work/invoke.lua" "$2")"
    else
        wrk -t2 -c32 -d2s "$2" >/dev/null
        out="$(wrk -t2 -c32 -d"$DURATION" --latency "$2")"
    fi
    printf '%-22s %10s req/s   p50 %9s   p99 %9s   %s\n' "$1" \
        "$(awk '/^Requests\/sec:/ {print $2}' <<<"$out")" \
        "$(awk '$1 == "50%" {print $2}' <<<"$out")" \
        "$(awk '$1 == "99%" {print $2}' <<<"$out")" \
        "$(grep -E 'Non-2xx|Socket errors' <<<"$out" | tr '\n' ' ' || true)"
}

start a "$A" 18181
start b "$B" 18182
peer=""
if [ -n "${WASMTIME:-}" ]; then
    "$WASMTIME" serve --addr 127.0.0.1:18183 -S cli=y "$http_component" >"$work/wasmtime.out" 2>&1 &
    pids+=($!)
    wait_for "http://127.0.0.1:18183/"
    peer="$("$WASMTIME" --version)"
fi
echo "$(date -u '+%F %T') UTC, $(nproc) cores; A=$A; B=$B; ${peer:-no wasmtime peer}"
for round in 1 2; do
    run "http A ($round)" "http://127.0.0.1:18181/http/demo/web/"
    run "http B ($round)" "http://127.0.0.1:18182/http/demo/web/"
    [ -z "$peer" ] || run "http wasmtime ($round)" "http://127.0.0.1:18183/"
    run "invoke A ($round)" "http://127.0.0.1:18181/v1/functions/hello/invoke" a
    run "invoke B ($round)" "http://127.0.0.1:18182/v1/functions/hello/invoke" b
done
for host in a b; do
    echo "RSS $host: $(awk '/^VmRSS/ {print $2, $3}' "/proc/$(cat "$work/$host.pid")/status")"
done

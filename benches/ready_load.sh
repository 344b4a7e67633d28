#!/usr/bin/env bash
# Ready instances end to end: the Python hello through `gust serve`
# (`POST /v1/functions/hello/invoke`), tenant `on` (policy `ready_instances
# = 1`, the default) against tenant `off` (`ready_instances = 0`), same
# component, same host, interleaved:
#   - spaced calls (one keep-alive connection, a pause between calls):
#     the latency a caller sees when the host has idle time;
#   - saturated (wrk, 1 and 4 connections, back to back): req/s and p50.
# Both tenants' functions are deployed after a third one compiled the
# component, so both load it from the compiled cache (the copy that was
# compiled in process answers ~10% slower under load; not compared here).
#
#   benches/ready_load.sh        # needs a release build and componentize-py
#
# Environment: GUST_BIN (default target/release/gust), GAPS (pauses in ms,
# default "5 1"), ROUNDS (default 2), CALLS (spaced calls per run, 400).
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
target="${CARGO_TARGET_DIR:-$root/target}"
bin="${GUST_BIN:-$target/release/gust}"
gaps="${GAPS:-5 1}"
rounds="${ROUNDS:-2}"
calls="${CALLS:-400}"
port=18191
admin=adminkey-ready-load-0123456789

command -v wrk >/dev/null || { apt-get update -qq && apt-get install -y -qq wrk >/dev/null; }
[ -x "$bin" ] || (cd "$root" && cargo build --release -p gust-host --bin gust)
work="$(mktemp -d /var/tmp/gust-ready-load.XXXXXX)"
trap 'kill "${pid:-0}" 2>/dev/null || true; rm -rf "$work"' EXIT
cd "$work"

# The Python hello, built by the CLI with componentize-py.
"$bin" build "$root/examples/python/hello/app.py" -o hello.wasm >/dev/null

mkdir policies
common='timeout_ms = 5000
memory_mb = 256
max_component_bytes = 67108864
max_concurrency = 64'
for t in first on; do printf '%s\n' "$common" > "policies/$t.toml"; done
printf '%s\nready_instances = 0\n' "$common" > policies/off.toml
"$bin" serve --listen "127.0.0.1:$port" --data-dir data --policies policies \
    --admin-key "$admin" > serve.log 2>&1 &
pid=$!
url="http://127.0.0.1:$port"
for _ in $(seq 100); do curl -sf "$url/healthz" >/dev/null && break; sleep 0.1; done

declare -A key
for t in first on off; do
    key[$t]=$(curl -sf -X POST -H "Authorization: Bearer $admin" -d "{\"name\":\"$t\"}" \
        "$url/v1/tenants" | python3 -c 'import json,sys; print(json.load(sys.stdin)["key"]["key"])')
    curl -sf -o /dev/null -X PUT -H "Authorization: Bearer ${key[$t]}" \
        --data-binary @hello.wasm "$url/v1/functions/hello"
    for _ in 1 2 3; do
        curl -sf -o /dev/null -X POST -H "Authorization: Bearer ${key[$t]}" \
            "$url/v1/functions/hello/invoke"
    done
done

spaced() { # tenant gap_ms -> "median p90" in µs
    python3 - "$url" "${key[$1]}" "$2" "$calls" <<'PY'
import http.client, sys, time, urllib.parse
url, key, gap, n = sys.argv[1], sys.argv[2], float(sys.argv[3]), int(sys.argv[4])
u = urllib.parse.urlparse(url)
conn = http.client.HTTPConnection(u.hostname, u.port)
lat = []
for _ in range(n):
    t = time.perf_counter()
    conn.request("POST", "/v1/functions/hello/invoke", body=b"",
                 headers={"Authorization": f"Bearer {key}"})
    r = conn.getresponse(); r.read()
    assert r.status == 200, r.status
    lat.append((time.perf_counter() - t) * 1e6)
    time.sleep(gap / 1000)
lat.sort()
print(f"{lat[len(lat) // 2]:.0f} {lat[int(len(lat) * 0.9)]:.0f}")
PY
}

echo "spaced calls (one connection, a pause between): median / p90, µs"
for gap in $gaps; do
    for round in $(seq "$rounds"); do
        read -r on_med on_p90 < <(spaced on "$gap")
        read -r off_med off_p90 < <(spaced off "$gap")
        awk -v g="$gap" -v r="$round" -v a="$on_med" -v b="$on_p90" -v c="$off_med" -v d="$off_p90" \
            'BEGIN { printf "  pause %s ms, round %s: ready %s / %s, fresh %s / %s, median ready/fresh %.2fx\n", g, r, a, b, c, d, a / c }'
    done
done

echo "saturated (wrk, back to back, 8 s): req/s, p50"
printf 'wrk.method = "POST"\n' > post.lua
for c in 1 4; do
    for round in $(seq "$rounds"); do
        line=""
        for t in off on; do
            out=$(wrk -t1 -c"$c" -d8s --latency -s post.lua \
                -H "Authorization: Bearer ${key[$t]}" "$url/v1/functions/hello/invoke")
            rps=$(echo "$out" | awk '/Requests\/sec/ {print $2}')
            p50=$(echo "$out" | awk '$1=="50%" {print $2}')
            line="$line $t $rps $p50"
        done
        echo "$line" | awk -v c="$c" -v r="$round" \
            '{ printf "  %s connections, round %s: fresh %s req/s (p50 %s), ready %s req/s (p50 %s), ready/fresh %.2fx\n", c, r, $2, $3, $5, $6, $5 / $2 }'
    done
done
curl -sf -H "Authorization: Bearer $admin" "$url/metrics" \
    | grep -E '^gust_(instantiations_total|instance_ready_hits_total)' | sed 's/^/  /'
